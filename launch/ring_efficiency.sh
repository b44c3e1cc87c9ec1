#!/usr/bin/env bash
# Ring efficiency: the same total problem as 1 rank of P threads (--impl dilated) and as
# P ranks of 1 thread (--impl ring), each under launch/mpirun.sh with cores bound, then a
# summary: the time of both (min and mean over the timed iterations), efficiency =
# t(1 rank x P threads) / t(P ranks x 1 thread), and per-rank peak memory of both.
#
#   launch/ring_efficiency.sh [--config large|dense-ring|small|medium|dense|1m] [-P 2]
#                             [--repeat R] [-- more ringattn_bench flags, e.g. --iters 20]
#
# --repeat R alternates the two runs R times (default 1) and summarises them together
# (min_ms: the least over the runs; mean_ms: the mean of the runs' means), which evens out
# a machine whose speed drifts (a shared host).
#
# The two runs' own output is shown with "# " in front, so the summary rows are the only
# lines without a leading #. Builds first (launch/build.sh; RINGATTN_NO_BUILD=1 skips it).
# Needs jq. Time only with P <= the cores (Open MPI busy-polls).
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/options.sh

config=large ranks=2 repeat=1
parse_options "--config:config -P:ranks --repeat:repeat" "ringattn_bench flags go after --" "$@"
set -- "${rest[@]}"
require_positive -P "$ranks" --repeat "$repeat"
require_jq

build_unless_told
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# run NAME RANKS THREADS IMPL [FLAGS...]: one measurement, its output (stdout and stderr)
# commented, its JSON records in $out/NAME.json.
run() {
  local name=$1 np=$2 threads=$3 impl=$4
  shift 4
  RINGATTN_NO_BUILD=1 bash launch/mpirun.sh -np "$np" -t "$threads" --bind core -- \
    ringattn_bench --impl "$impl" --config "$config" --threads "$threads" \
    --json "$out/$name.json" "$@" 2>&1 | sed '/^#/!s/^/# /'
}
for ((i = 1; i <= repeat; ++i)); do
  run "single.$i" 1 "$ranks" dilated "$@"
  run "ring.$i" "$ranks" 1 ring "$@"
done

# field NAME KEY: KEY of the NAME runs' (one per run) JSON records: the least for min_ms,
# the mean otherwise.
field() {
  local reduce=add/length
  [ "$2" = min_ms ] && reduce=min
  jq -s "map(.[0].$2) | $reduce" "$out/$1".*.json
}
echo "#"
echo "# ring efficiency: t1 = 1 rank x $ranks threads (dilated), tP = $ranks ranks x 1 thread" \
  "(ring), $repeat run(s) each; eff = t1 / tP, from min_ms (the robust number) and mean_ms"
printf '# %-10s %3s %10s %10s %7s %10s %10s %8s %10s %10s %10s %10s\n' config P t1_min_ms \
  tP_min_ms eff_min t1_mean_ms tP_mean_ms eff_mean peak1_mb peakP_mb sent_mb wait_ms
printf '  %-10s %3d %10.3f %10.3f %7.3f %10.3f %10.3f %8.3f %10.1f %10.1f %10.2f %10.3f\n' \
  "$config" "$ranks" "$(field single min_ms)" "$(field ring min_ms)" \
  "$(jq -rn "$(field single min_ms) / $(field ring min_ms)")" \
  "$(field single mean_ms)" "$(field ring mean_ms)" \
  "$(jq -rn "$(field single mean_ms) / $(field ring mean_ms)")" \
  "$(field single peak_mb)" "$(field ring peak_mb)" \
  "$(jq -rn "$(field ring bytes_sent) / 1048576")" "$(field ring comm_wait_ms)"
