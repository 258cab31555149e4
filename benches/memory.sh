#!/usr/bin/env bash
# Peak memory of `quench compare --runtime both` with per-layer attribution on a BERT-shaped encoder
# (tests/tools/make_encoder.py: 6 layers, 384 wide, 22.6M parameters, 91 MB) fed files of 256 and 4096
# rows of 64 tokens: file data runs in batches that fit the memory budget, so the peak should not grow
# with the rows. Prints rows, batches, seconds and peak RSS per run (and as a multiple of the model).
# Usage: benches/memory.sh [ROWS...]   (default: 256 4096; needs scripts/setup.sh's .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" tests/tools/make_encoder.py "$work/enc.onnx" > /dev/null
target/release/quench quantize "$work/enc.onnx" -o "$work/enc.w8.onnx" --recipe w8 > /dev/null
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(256 4096)
"$py" - "$work" "${rows[@]}" <<'PY'
import os, re, resource, subprocess, sys, time
import numpy as np
work, rows = sys.argv[1], [int(r) for r in sys.argv[2:]]
model = os.path.getsize(f"{work}/enc.onnx")
print(f"model {model / 1e6:.1f} MB; compare --runtime both, per-layer attribution, 64 tokens")
print(f"{'rows':>6} {'batches':>8} {'seconds':>8} {'peak RSS':>10} {'x model':>8}")
for n in rows:
    rng = np.random.default_rng(n)
    data = f"{work}/rows{n}.npz"
    np.savez(data, input_ids=rng.integers(0, 30522, (n, 64)),
             attention_mask=np.ones((n, 64), np.int64), token_type_ids=np.zeros((n, 64), np.int64))
    start = time.time()
    # Each run in a child of its own, so ru_maxrss of the children is this run's peak.
    out = subprocess.run(
        [sys.executable, "-c",
         "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "print(p.stdout); print(p.stderr, file=sys.stderr); "
         "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)",
         "target/release/quench", "compare", f"{work}/enc.onnx", f"{work}/enc.w8.onnx",
         "--inputs", data, "--runtime", "both"],
        capture_output=True, text=True, check=True, env={**os.environ, "CI": "true"})
    secs = time.time() - start
    peak = int(re.search(r"PEAK (\d+)", out.stdout).group(1)) * 1024
    batches = re.search(r"\((\d+) batches\)", out.stdout).group(1)
    print(f"{n:>6} {batches:>8} {secs:>8.1f} {peak / 2**30:>8.2f} GB {peak / model:>8.1f}")
PY
