#!/usr/bin/env bash
# Two builds of ringattn_bench against each other (before and after a change), the runs
# alternated A B A B ... --repeat R times over one fixed list of rows: dilated small, medium
# and large forward, large backward, the ring on 2 ranks (launch/mpirun.sh, 1 thread each),
# the multihead layer and block-sparse attention. Then a summary per row: the best min_ms of A
# and of B, and B/A as the median of the R pairwise ratios of min_ms (each pair ran back to
# back, so a noisy machine moves both sides alike).
#
#   launch/ab_bench.sh A_BENCH B_BENCH [--repeat R] [--threads T]
#
# The runs' own output is hidden; the summary rows are printed at the end. Needs jq.
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/options.sh

[ $# -ge 2 ] || usage_error "give two ringattn_bench executables"
a=$1 b=$2
shift 2
repeat=3 threads=2
parse_options "--repeat:repeat --threads:threads" "the options are --repeat and --threads" "$@"
for bin in "$a" "$b"; do
  [ -x "$bin" ] || usage_error "$bin is not an executable ringattn_bench"
done
require_positive --threads "$threads" --repeat "$repeat"
require_jq

rows=(
  "dilated-small|--impl dilated --config small"
  "dilated-medium|--impl dilated --config medium"
  "dilated-large|--impl dilated --config large --iters 5"
  "dilated-large-bwd|--impl dilated --config large --backward 1 --iters 3"
  "ring-2ranks|mpi --impl ring --config medium"
  "multihead|--impl multihead --config medium"
  "blocksparse|--impl blocksparse --config sparse --densities 0.1"
)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() {  # run <bench> <json> <row args...>
  local bench=$1 json=$2
  shift 2
  if [ "$1" = mpi ]; then
    shift
    RINGATTN_NO_BUILD=1 bash launch/mpirun.sh -np 2 -t 1 -- "$bench" "$@" --json "$json" \
      >/dev/null 2>&1
  else
    "$bench" --threads "$threads" "$@" --json "$json" >/dev/null 2>&1
  fi
}

for ((r = 0; r < repeat; r++)); do
  for i in "${!rows[@]}"; do
    read -r -a args <<<"${rows[$i]#*|}"
    run "$a" "$out/a_${i}_$r.json" "${args[@]}"
    run "$b" "$out/b_${i}_$r.json" "${args[@]}"
  done
done

printf '%-20s %10s %10s %8s\n' row A_min_ms B_min_ms B/A
for i in "${!rows[@]}"; do
  ratios=() best_a="" best_b=""
  for ((r = 0; r < repeat; r++)); do
    ma=$(jq '[.[].min_ms] | add' "$out/a_${i}_$r.json")
    mb=$(jq '[.[].min_ms] | add' "$out/b_${i}_$r.json")
    ratios+=("$(jq -n "$mb / $ma")")
    best_a=$(jq -n "[$ma, ${best_a:-$ma}] | min")
    best_b=$(jq -n "[$mb, ${best_b:-$mb}] | min")
  done
  median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
  printf '%-20s %10.2f %10.2f %8.3f\n' "${rows[$i]%%|*}" "$best_a" "$best_b" "$median"
done
