"""Open stochflow output with polars and DuckDB and compare what they read
with what pyarrow reads: row count, column types and every value of the
digits pipeline's output (pipelines/digits.yaml).

Usage: python3 tests/python/check_readers.py OUTPUT.arrow COMPRESSED.arrow... STREAM.arrows

The first file is uncompressed. The files after it hold the same output
compressed, and the last argument is the same output as an Arrow IPC
stream (`run --output -`).
"""

import sys

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc


def tensor(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).combine_chunks().to_numpy_ndarray()


def check_polars(frame: pl.DataFrame, reference: pa.Table, source: str) -> None:
    assert frame.columns == reference.column_names, (source, frame.columns)
    assert frame.height == reference.num_rows, (source, frame.height)
    for name, size in [("pixels", 64), ("logits", 10)]:
        storage = frame[name].ext.storage()
        assert storage.dtype == pl.Array(pl.Float32, size), (source, name, storage.dtype)
        assert np.array_equal(storage.to_numpy(), tensor(reference, name)), (source, name)
    for name in ["id", "label", "sample", "class"]:
        assert frame[name].to_list() == reference.column(name).to_pylist(), (source, name)


def main(plain: str, compressed: list[str], stream: str) -> None:
    reference = pa.ipc.open_file(plain).read_all()
    assert reference.num_rows == 450 * 5, reference.num_rows

    # polars reads the files and the stream itself, with its own IPC reader.
    for path in [plain, *compressed]:
        check_polars(pl.read_ipc(path), reference, path)
    with open(stream, "rb") as source:
        check_polars(pl.read_ipc_stream(source), reference, stream)
    lazy = pl.scan_ipc(plain).filter(pl.col("sample") == 0).select("id", "class").collect()
    assert lazy.height == 450, lazy.height

    # DuckDB queries the Arrow table in place: tensor columns arrive as
    # fixed-size arrays, which SQL can index.
    output = reference
    types = duckdb.sql("select typeof(pixels), typeof(logits) from output limit 1").fetchall()
    assert types == [("FLOAT[64]", "FLOAT[10]")], types
    counts = duckdb.sql('select "class", count(*) from output group by "class" order by "class"').fetchall()
    expected = np.bincount(reference.column("class").to_numpy(), minlength=10)
    assert counts == [(c, int(n)) for c, n in enumerate(expected) if n > 0], counts
    first = duckdb.sql("select logits[1], logits[10] from output").fetchall()
    logits = tensor(reference, "logits")
    assert np.array_equal(np.array(first, dtype=np.float32), logits[:, [0, 9]]), "logits differ in DuckDB"
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:-1], sys.argv[-1])
