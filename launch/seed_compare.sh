#!/usr/bin/env bash
# Times the seed's Python DilatedAttention (bench/seed_python.py: its algorithm on torch's CPU
# attention) and ringattn's forward side by side on this machine, on the seed's three
# configurations (causal, groups, 8 heads of 64), in fp32 and bf16, and prints the speed-ups.
# The first run installs a current torch into ~/.cache/ringattn/seed-venv (outside the clone,
# kept between runs; /usr/bin/python3's venv): a large download (PyPI's Linux wheel brings
# CUDA libraries, a few GB), so this is not part of launch/run.sh.
# Usage: launch/seed_compare.sh [--threads T] [--iters N] [--rounds R] [--dtypes "fp32 bf16"]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$(nproc)
iters=3
rounds=2
dtypes="fp32 bf16"
torch_version=2.15.0
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --iters) iters=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --dtypes) dtypes=$2; shift 2 ;;
    *) echo "seed_compare.sh: unknown argument '$1' (use --threads T, --iters N, --rounds R," \
         "--dtypes \"fp32 bf16\")" >&2
       exit 2 ;;
  esac
done
BUILD_DIR=${BUILD_DIR:-build} bash launch/build.sh >/dev/null
bench=${BUILD_DIR:-build}/bench/ringattn_bench
venv=${HOME}/.cache/ringattn/seed-venv
py="$venv/bin/python"
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" \
    2>/dev/null; then
  if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "# seed_compare: installing torch $torch_version into $venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "torch==$torch_version" numpy
fi
json=$(mktemp)
trap 'rm -f "$json"' EXIT
echo "# $(date -u +%FT%TZ), $threads threads, $iters timed iterations, best of $rounds rounds," \
     "load average $(cut -d' ' -f1-3 /proc/loadavg)"
"$py" -c "import torch; print('# torch', torch.__version__, '| ringattn CPU bf16 products:', end=' ')"
"$bench" --impl dilated --config small --dtype bf16 --iters 1 --warmup 0 --threads 1 \
  --json "$json" >/dev/null 2>&1
"$py" -c "import json, sys; print(json.load(open(sys.argv[1]))[0]['products'])" "$json"
printf "%-8s %5s %12s %12s %9s\n" config dtype seed_ms ours_ms speedup
for config in small medium large; do
  for dtype in $dtypes; do
    seed=() ours=()
    # Alternating rounds; the lower mean of each side is kept (the host's noise hits both).
    for _ in $(seq "$rounds"); do
      seed+=("$("$py" bench/seed_python.py --config "$config" --dtype "$dtype" \
                --threads "$threads" --iters "$iters" | awk '!/^#/ { print $2 }')")
      "$bench" --impl dilated --config "$config" --dtype "$dtype" --threads "$threads" \
        --iters "$iters" --warmup 1 --json "$json" >/dev/null 2>&1
      ours+=("$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))[0]['mean_ms'])" \
                "$json")")
    done
    "$py" - "$config" "$dtype" "${seed[*]}" "${ours[*]}" <<'PY'
import sys
name, dtype = sys.argv[1], sys.argv[2]
seed, ours = min(map(float, sys.argv[3].split())), min(map(float, sys.argv[4].split()))
print(f"{name:8s} {dtype:>5s} {seed:12.1f} {ours:12.1f} {seed / ours:8.2f}x")
PY
  done
done
