#!/usr/bin/env bash
# Runs every test: installs the Python tooling, builds, fetches and verifies the zoo, then cargo test.
# Under CI=true a missing runtime or zoo model fails the run instead of being skipped. Every test
# binary runs even when one fails; on a CPU with AVX-512 the kernel tests run again on the AVX2 paths.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export QUENCH_PYTHON="$PWD/.venv/bin/python"
cargo test --locked --no-run
target/debug/quench zoo fetch --python "$QUENCH_PYTHON"
status=0
cargo test --locked --no-fail-fast || status=$?
if grep -q avx512f /proc/cpuinfo 2>/dev/null; then
  echo "== the kernel tests again on the AVX2 paths (QUENCH_KERNELS=avx2)"
  QUENCH_KERNELS=avx2 cargo test --locked --no-fail-fast --test kernels || status=$?
fi
exit $status
