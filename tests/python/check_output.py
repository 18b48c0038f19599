"""Open a stochflow output file with pyarrow and check what the README
promises for pipelines/digits.yaml: columns, types, the tensor extension
type, provenance metadata and the row count.

Usage: python3 tests/python/check_output.py OUTPUT.arrow
"""

import sys

import pyarrow as pa
import pyarrow.ipc


def main(path: str) -> None:
    with pa.memory_map(path) as source:
        table = pa.ipc.open_file(source).read_all()

    assert table.column_names == ["id", "pixels", "label", "logits", "sample", "class"], table.column_names
    assert table.num_rows == 450 * 5, table.num_rows

    for name, shape in [("pixels", [64]), ("logits", [10])]:
        column_type = table.schema.field(name).type
        assert isinstance(column_type, pa.FixedShapeTensorType), f"{name} is {column_type}"
        assert column_type.value_type == pa.float32(), column_type.value_type
        assert list(column_type.shape) == shape, column_type.shape
    logits = table.column("logits").combine_chunks().to_numpy_ndarray()
    assert logits.shape == (2250, 10), logits.shape

    assert table.schema.field("id").type == pa.int64()
    assert table.schema.field("sample").type == pa.int32()
    assert table.schema.field("class").type == pa.int32()
    classes = table.column("class").to_pylist()
    assert min(classes) >= 0, min(classes)
    assert max(classes) <= 9, max(classes)
    assert table.column("sample").to_pylist()[:6] == [0, 1, 2, 3, 4, 0]

    metadata = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    for key in ["stochflow.version", "stochflow.seed", "stochflow.config_sha256", "stochflow.model.classify.sha256"]:
        assert key in metadata, f"missing metadata {key}"
    print(f"pyarrow {pa.__version__} read {table.num_rows} rows from {path}")


if __name__ == "__main__":
    main(sys.argv[1])
