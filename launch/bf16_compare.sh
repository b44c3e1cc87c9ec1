#!/usr/bin/env bash
# fp32 against bf16 on the CPU: the same problem as fp32, and as bf16 with each product kernel
# this CPU has (widen: bf16 widened to fp32 while packing; dot: AVX512_BF16 vdpbf16ps; amx:
# AMX-BF16 tiles), forward and backward, the runs alternated (fp32, widen, dot, amx, fp32, ...)
# --repeat R times, then a summary: min and median over the runs' min_ms, the speed-up of each
# bf16 kernel over fp32 (from the min and from the median), and %ceil (each row against the
# ceiling of its own products, measured in its run: the FMA peak for fp32 and widen, the
# vdpbf16ps peak for dot, the TDPBF16PS peak for amx; the median over the runs).
#
#   launch/bf16_compare.sh [--config large] [--threads 2] [--repeat R] [--passes "fwd bwd"]
#                          [-- more ringattn_bench flags, e.g. --iters 5]
#
# The runs' own output is shown with "# " in front, so the summary rows are the only lines
# without a leading #. Builds first (launch/build.sh; RINGATTN_NO_BUILD=1 skips it). Needs jq.
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/options.sh

config=large threads=2 repeat=3 passes="fwd bwd"
parse_options "--config:config --threads:threads --repeat:repeat --passes:passes" \
  "ringattn_bench flags go after --" "$@"
set -- "${rest[@]}"
require_positive --threads "$threads" --repeat "$repeat"
require_jq

build_unless_told
bench=${BUILD_DIR:-build}/bench/ringattn_bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The kernels this CPU has: `auto` picks the best, so dot is there when auto is dot or amx.
"$bench" --impl dilated --config small --dtype bf16 --iters 1 --warmup 0 --threads 1 \
  --json "$out/probe.json" >/dev/null 2>&1
best=$(jq -r '.[0].products' "$out/probe.json")
variants="fp32 widen"
[ "$best" = dot ] && variants="$variants dot"
[ "$best" = amx ] && variants="$variants dot amx"

for ((i = 1; i <= repeat; ++i)); do
  for pass in $passes; do
    backward=0
    [ "$pass" = bwd ] && backward=1
    for v in $variants; do
      if [ "$v" = fp32 ]; then flags=(--dtype fp32); else flags=(--dtype bf16 --cpu-bf16 "$v"); fi
      echo "# load average $(cut -d' ' -f1-3 /proc/loadavg): $v $pass (run $i)"
      "$bench" --impl dilated --config "$config" --threads "$threads" --backward "$backward" \
        "${flags[@]}" --json "$out/$pass.$v.$i.json" "$@" 2>&1 | sed '/^#/!s/^/# /'
    done
  done
done

# stat PASS VARIANT EXPR REDUCE: REDUCE (min or median) over the runs of the jq expression
# EXPR of each run's first record.
stat() {
  local reduce='min'
  [ "$4" = median ] && reduce='sort | .[(length - 1) / 2 | floor]'
  jq -s "map(.[0] | $3) | $reduce" "$out/$1.$2".*.json
}
echo "#"
echo "# fp32 vs bf16, config $config, $threads threads, $repeat alternated run(s) of each;" \
  "speedup = t(fp32) / t(row)"
printf '# %-4s %-6s %5s %10s %10s %9s %9s %8s %8s %9s\n' pass dtype prod min_ms median_ms \
  speedup_min speedup_med GFLOP/s %ceil ceiling
for pass in $passes; do
  base_min=$(stat "$pass" fp32 .min_ms min)
  base_med=$(stat "$pass" fp32 .min_ms median)
  for v in $variants; do
    dtype=bf16
    [ "$v" = fp32 ] && dtype=fp32
    t_min=$(stat "$pass" "$v" .min_ms min)
    t_med=$(stat "$pass" "$v" .min_ms median)
    printf '  %-4s %-6s %5s %10.1f %10.1f %9.2f %9.2f %8.1f %8.1f %9.1f\n' "$pass" "$dtype" \
      "$(jq -r '.[0].products' "$out/$pass.$v.1.json")" "$t_min" "$t_med" \
      "$(jq -rn "$base_min / $t_min")" "$(jq -rn "$base_med / $t_med")" \
      "$(stat "$pass" "$v" .gflops median)" \
      "$(stat "$pass" "$v" '100 * .gflops / .ceiling_gflops' median)" \
      "$(stat "$pass" "$v" .ceiling_gflops median)"
  done
done
