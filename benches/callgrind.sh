#!/usr/bin/env bash
# Instructions per inference, counted by valgrind's callgrind: a figure a noisy machine does not move.
#
#   benches/callgrind.sh MODEL[+plain]... -- BENCH_OPTIONS...
#
# Each model runs in `quench bench --in-process --warmup 0 --runs 2`, with instructions collected only
# inside tract's plan execution (`SimpleState::run_plan_with_eval`, which runs every node of a session's
# run; callgrind's --toggle-collect): half the count is
# what one inference costs, without loading, planning (the session plans on its first run for an
# input shape) or input generation. MODEL+plain
# runs it with --tract-plain (tract's own operators instead of quench's kernels). The first model is the
# baseline of the ratio column.
#
# valgrind emulates no AVX-512 (nor AVX-VNNI), so under it both tract and quench pick their AVX2 code:
# the counts describe an AVX2 machine, whatever this one has.
set -euo pipefail
QUENCH=${QUENCH:-target/release/quench}
models=()
while [[ $# -gt 0 && $1 != -- ]]; do models+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
[[ ${#models[@]} -gt 0 ]] || { echo "usage: $0 MODEL[+plain]... -- BENCH_OPTIONS..." >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count() { # model flag
    valgrind --tool=callgrind --callgrind-out-file="$tmp/out" \
        --toggle-collect='tract_core::plan::SimpleState*::run_plan_with_eval' \
        "$QUENCH" bench "$1" "${@:3}" --in-process --warmup 0 --runs 2 $2 >/dev/null 2>"$tmp/err" ||
        { cat "$tmp/err" >&2; exit 1; }
    grep -o 'Collected : [0-9]*' "$tmp/err" | grep -o '[0-9]*$'
}
printf '%-40s %16s %8s\n' model "instructions/run" "× first"
base=
for spec in "${models[@]}"; do
    model=${spec%+plain}
    flag=
    [[ $spec == *+plain ]] && flag=--tract-plain
    per=$(( $(count "$model" "$flag" "$@") / 2 ))
    base=${base:-$per}
    awk -v m="$(basename "$model")${flag:+ (plain)}" -v p="$per" -v b="$base" \
        'BEGIN { printf "%-40s %16.0f %8.2f\n", m, p, p / b }'
done
