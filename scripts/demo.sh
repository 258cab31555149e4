#!/usr/bin/env bash
# The main job: fetch the zoo, inspect a model, convert it losslessly and show that the copy is the same
# model, run and compare it in tract and onnxruntime, quantize it with a built-in recipe, and benchmark.
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
echo "== quench convert rxnmap (lossless re-save; then again with the weights in external data)"
$quench convert "$model" out/rxnmap.onnx
$quench convert --external-data "$model" out/rxnmap-external.onnx
.venv/bin/python - "$model" out/rxnmap.onnx out/rxnmap-external.onnx <<'PY'
import sys
import numpy as np
import onnx
from onnx import numpy_helper
original, copy, external = (onnx.load(p) for p in sys.argv[1:])
for p in sys.argv[2:]:
    onnx.checker.check_model(p, full_check=True)
print("onnx.checker (full): both copies pass")
print("the copy is the same message as the original:", original == copy)
same = all(np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
           for a, b in zip(original.graph.initializer, external.graph.initializer))
print("external-data copy: same graph:", original.graph.node == external.graph.node, "/ same weights:", same)
PY
echo
echo "== quench run rxnmap in tract and onnxruntime (2 batches of valid random inputs from the zoo's spec)"
$quench run zoo:rxnmap --random 2 --runtime tract -o out/rxnmap.tract.npz
$quench run zoo:rxnmap --random 2 --runtime ort -o out/rxnmap.ort.npz
echo
echo "== quench compare rxnmap with its external-data copy, in both runtimes, layer by layer"
$quench compare zoo:rxnmap out/rxnmap-external.onnx --random 2 --runtime both --top 5 --json out/compare.json
echo
echo "== quench quantize rxnmap with the w8 recipe (verified in tract and onnxruntime before it is written)"
$quench quantize zoo:rxnmap -o out/rxnmap.w8.onnx --recipe w8 --report out/rxnmap.w8.json
echo
echo "== quench bench rxnmap fp32 vs w8, tract and onnxruntime (1 thread, each in a fresh process)"
$quench bench zoo:rxnmap out/rxnmap.w8.onnx --random 2 --runs 5 --runtime both
