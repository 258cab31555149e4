#!/usr/bin/env bash
# A model over the 2 GiB protobuf limit, end to end: tests/tools/make_encoder.py writes a BERT-shaped
# encoder of 16 layers, 2048 wide, vocabulary 32000 (872M parameters, 3.25 GiB of weights in an
# external data file), then quench inspects it, converts it, quantizes it with w8, w4 (weight-only)
# and w8a8 (two generated calibration batches) verified in both runtimes, runs the results in tract
# and onnxruntime and compares one with the original. Each step prints its seconds and peak RSS (also
# as a multiple of the model's size); the weight pass alone (load, quantize, save, no verification)
# is timed by benches/quant.rs's child mode. Needs scripts/setup.sh's .venv, about 12 GB of disk and
# 16 GB of memory; takes 10–20 minutes on 2 cores.
# Usage: benches/big.sh [DIR]   (default: a temporary folder, removed after)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
py=.venv/bin/python
cargo build --release --quiet
bench=$repo/$(cargo bench --bench quant --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))/\1/p' | tail -1)
if [ $# -gt 0 ]; then
    work=$1
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi
cd "$work"
q="$repo/target/release/quench"
export CI=true
unset RUST_BACKTRACE
[ -f enc.onnx ] || "$py" "$repo/tests/tools/make_encoder.py" enc.onnx --layers 16 --hidden 2048 \
    --heads 16 --ffn 8192 --vocab 32000 --external > /dev/null
size=$(($(stat -c %s enc.onnx) + $(stat -c %s enc.onnx.data)))
echo "model: $(awk "BEGIN { printf \"%.2f GiB\", $size / 2^30 }") (enc.onnx and its data file)"
gen=(--dim batch=1 --dim sequence=16 --range input_ids=0..31999 --range token_type_ids=0..1
    --range attention_mask=1..1)
# Random weights miss the recipes' floors, and shielding a model this size measures site after site
# (tens of minutes): the quantize steps keep the recipe as built.
noshield=--no-shield
step() {
    local name=$1
    shift
    /usr/bin/time -f "%e %M" -o time.txt "$@" > "$name.log" 2>&1 || {
        echo "$name failed:"
        tail -5 "$name.log"
        exit 1
    }
    read -r secs kb < time.txt
    awk -v n="$name" -v s="$secs" -v k="$kb" -v m="$size" \
        'BEGIN { printf "%-24s %8.1f s  peak RSS %6.2f GB = %.2f× the model\n", n, s, k * 1024 / 1e9, k * 1024 / m }'
}
step inspect "$q" inspect enc.onnx
step convert "$q" convert enc.onnx conv.onnx
rm -f conv.onnx conv.onnx.*.data
for r in w8 w4; do
    step "pass $r" env QUENCH_BENCH_PASS="$(printf '%s\n%s\n%s' "$r" enc.onnx "pass-$r.onnx")" "$bench"
done
step "quantize w8" "$q" quantize enc.onnx -o w8.onnx --recipe w8 $noshield "${gen[@]}"
step "quantize w4" "$q" quantize enc.onnx -o w4.onnx --recipe w4 --target tract $noshield "${gen[@]}"
step "quantize w8a8" "$q" quantize enc.onnx -o w8a8.onnx --recipe w8a8 --calib-random 2 $noshield \
    "${gen[@]}"
for m in w8 w4 w8a8; do
    for rt in tract ort; do
        step "run $m $rt" "$q" run "$m.onnx" --random 1 --runtime "$rt" "${gen[@]}"
    done
done
step "compare w4 both" "$q" compare enc.onnx w4.onnx --runtime both --random 1 "${gen[@]}"
echo
for r in w8 w4 w8a8; do
    grep -h "^weights\|^last_hidden_state" "quantize $r.log" | head -3 | sed "s/^/$r: /"
done
grep -h "^last_hidden_state" "compare w4 both.log" | head -2 | sed "s/^/compare w4: /"
