use crate::common::*;

/// Python with pyarrow: `STOCHFLOW_TEST_PYTHON`, else `python3`.
fn python() -> String {
    std::env::var("STOCHFLOW_TEST_PYTHON").unwrap_or_else(|_| String::from("python3"))
}

#[test]
fn pyarrow_reads_digits_output() {
    let has_pyarrow =
        std::process::Command::new(python()).args(["-c", "import pyarrow"]).status().is_ok_and(|s| s.success());
    if !has_pyarrow {
        // The test script installs pyarrow and sets STOCHFLOW_REQUIRE_PYARROW,
        // so this check cannot be skipped there.
        assert!(
            std::env::var_os("STOCHFLOW_REQUIRE_PYARROW").is_none(),
            "pyarrow is required but `{} -c 'import pyarrow'` failed",
            python()
        );
        eprintln!("skipping: pyarrow is not installed for {}; run tests/run.sh to include this check", python());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("digits.arrow");
    let outcome =
        stochflow(&["run", repo("pipelines/digits.yaml").to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let check =
        std::process::Command::new(python()).arg(repo("tests/python/check_output.py")).arg(&output).output().unwrap();
    assert!(
        check.status.success(),
        "pyarrow check failed:\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
