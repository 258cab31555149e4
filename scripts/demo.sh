#!/usr/bin/env bash
# The main job on the embedded default: fetch the zoo, inspect a model, convert it losslessly and show that
# the copy is the same model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
quench=target/release/quench
$quench zoo fetch --python .venv/bin/python
model=$($quench zoo path rxnmap)
echo
echo "== quench inspect rxnmap"
$quench inspect "$model"
mkdir -p out
echo
echo "== quench convert rxnmap (lossless re-save, weights to external data)"
$quench convert --external-data "$model" out/rxnmap.onnx
.venv/bin/python - "$model" out/rxnmap.onnx <<'PY'
import sys, onnx
a, b = onnx.load(sys.argv[1]), onnx.load(sys.argv[2])
onnx.checker.check_model(sys.argv[2], full_check=True)
print("onnx.checker: ok; identical to the original:", a == b)
PY
