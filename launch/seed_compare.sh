#!/usr/bin/env bash
# Times the seed's Python DilatedAttention (bench/seed_python.py: its algorithm on torch's CPU
# attention) and ringattn's forward side by side on this machine, on the seed's three
# configurations (fp32, causal, groups, 8 heads of 64), and prints the speed-up.
# The first run installs torch 2.6.0 (the seed's version) into .venv-seed/: a large download
# (PyPI's Linux wheel brings CUDA libraries, about 3 GB), so this is not part of launch/run.sh.
# Usage: launch/seed_compare.sh [--threads T] [--iters N] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$(nproc)
iters=3
rounds=2
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "seed_compare.sh: unknown argument '$1' (use --threads T, --iters N, --rounds R)" >&2
       exit 2 ;;
  esac
done
BUILD_DIR=${BUILD_DIR:-build} bash launch/build.sh >/dev/null
bench=${BUILD_DIR:-build}/bench/ringattn_bench
venv=.venv-seed
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "# seed_compare: installing torch 2.6.0 into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.6.0 numpy
fi
py="$venv/bin/python"
json=$(mktemp)
trap 'rm -f "$json"' EXIT
echo "# $(date -u +%FT%TZ), $threads threads, $iters timed iterations, best of $rounds rounds"
printf "%-8s %12s %12s %9s\n" config seed_ms ours_ms speedup
for config in small medium large; do
  seed=() ours=()
  # Alternating rounds; the lower mean of each side is kept (the host's noise hits both).
  for _ in $(seq "$rounds"); do
    seed+=("$("$py" bench/seed_python.py --config "$config" --threads "$threads" \
              --iters "$iters" | awk '!/^#/ { print $2 }')")
    "$bench" --impl dilated --config "$config" --threads "$threads" --iters "$iters" \
      --warmup 1 --json "$json" >/dev/null 2>&1
    ours+=("$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))[0]['mean_ms'])" \
              "$json")")
  done
  "$py" - "$config" "${seed[*]}" "${ours[*]}" <<'PY'
import sys
name, seed, ours = sys.argv[1], min(map(float, sys.argv[2].split())), min(map(float, sys.argv[3].split()))
print(f"{name:8s} {seed:12.1f} {ours:12.1f} {seed / ours:8.2f}x")
PY
done
