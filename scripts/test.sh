#!/usr/bin/env bash
# Runs every test: installs the Python tooling, builds, fetches and verifies the zoo, then cargo test.
# Under CI=true a missing runtime or zoo model fails the run instead of being skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QUENCH_PYTHON="$PWD/.venv/bin/python"
cargo test --locked --no-run
target/debug/quench zoo fetch --python "$QUENCH_PYTHON"
cargo test --locked --no-fail-fast
