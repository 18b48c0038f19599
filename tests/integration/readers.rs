use crate::common::*;

#[test]
fn pyarrow_reads_digits_output() {
    let Some(python) = python_with(&["pyarrow"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("digits.arrow");
    let outcome =
        stochflow(&["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let check =
        std::process::Command::new(&python).arg(repo("tests/python/check_output.py")).arg(&output).output().unwrap();
    assert!(
        check.status.success(),
        "pyarrow check failed:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// pyarrow reads LZ4 and zstd output as the same table as the uncompressed
/// file.
#[test]
fn pyarrow_reads_compressed_output() {
    let Some(python) = python_with(&["pyarrow"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |settings: &str| {
        format!(
            "seed: 8\nsource: {{kind: latent, records: 500, shape: [16]}}\nsink:\n  kind: arrow_file\n  path: unused.arrow\n{settings}"
        )
    };
    let plain = run_ok(dir.path(), "none", &pipeline(""));
    let lz4 = run_ok(dir.path(), "lz4", &pipeline("  compression: lz4\n"));
    let zstd = run_ok(dir.path(), "zstd", &pipeline("  compression: zstd\n  compression_level: 19\n"));
    let script = r#"
import sys
import pyarrow as pa
import pyarrow.ipc

def read(path):
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()

plain = read(sys.argv[1])
assert plain.num_rows == 500, plain.num_rows
for path in sys.argv[2:]:
    table = read(path)
    assert table.equals(plain), path
print("ok")
"#;
    let check = std::process::Command::new(&python).args(["-c", script]).args([&plain, &lz4, &zstd]).output().unwrap();
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).trim() == "ok",
        "pyarrow check failed:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// pyarrow reads the stream of `run --output -` from a pipe as it comes.
#[test]
fn pyarrow_reads_stream_from_a_pipe() {
    let Some(python) = python_with(&["pyarrow"]) else { return };
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = r#"
import sys
import pyarrow as pa
import pyarrow.ipc

reader = pa.ipc.open_stream(sys.stdin.buffer)
assert isinstance(reader.schema.field("logits").type, pa.FixedShapeTensorType), reader.schema
assert reader.schema.metadata[b"stochflow.seed"] == b"42", reader.schema.metadata
rows = sum(batch.num_rows for batch in reader)
print(rows)
"#;
    let read =
        std::process::Command::new(&python).args(["-c", script]).stdin(run.stdout.take().unwrap()).output().unwrap();
    let ran = run.wait_with_output().unwrap();
    assert_eq!(ran.status.code(), Some(0), "{}", String::from_utf8_lossy(&ran.stderr));
    assert!(
        read.status.success() && String::from_utf8_lossy(&read.stdout).trim() == "2250",
        "pyarrow check failed:\n{}\n{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr)
    );
}

/// polars reads the files (plain, LZ4, zstd) and the stream with its own IPC
/// reader. DuckDB queries the tensor columns as fixed-size arrays. Both see
/// the values pyarrow reads (tests/python/check_readers.py).
#[test]
fn polars_and_duckdb_read_the_output() {
    let Some(python) = python_with(&["pyarrow", "polars", "duckdb"]) else { return };
    let dir = tempfile::tempdir().unwrap();
    let digits = std::fs::read_to_string(repo("pipelines/digits.yaml")).unwrap();
    let digits = digits.replace("../fixtures/", &format!("{}/", repo("fixtures").display()));
    let mut files = Vec::new();
    for (name, settings) in [("plain", ""), ("lz4", "\n  compression: lz4"), ("zstd", "\n  compression: zstd")] {
        let yaml = digits.replace("sink:\n  kind: arrow_file", &format!("sink:\n  kind: arrow_file{settings}"));
        assert_ne!(yaml.contains("compression"), settings.is_empty(), "the sink of pipelines/digits.yaml is found");
        files.push(run_ok(dir.path(), name, &yaml));
    }
    let streamed = std::process::Command::new(env!("CARGO_BIN_EXE_stochflow"))
        .args(["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", "-"])
        .output()
        .unwrap();
    assert_eq!(streamed.status.code(), Some(0), "{}", String::from_utf8_lossy(&streamed.stderr));
    let stream = dir.path().join("digits.arrows");
    std::fs::write(&stream, &streamed.stdout).unwrap();

    let check = std::process::Command::new(&python)
        .arg(repo("tests/python/check_readers.py"))
        .args(&files)
        .arg(&stream)
        .output()
        .unwrap();
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).trim() == "ok",
        "reader check failed:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
