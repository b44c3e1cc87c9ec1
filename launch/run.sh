#!/usr/bin/env bash
# The main job: installs what is missing, builds Release, and runs the benchmark on the
# seed's configurations (plus the dense-segment kernel rows) with a correctness pass, on the
# CPU and, when the machine has a GPU (nvidia-smi lists one), on the GPU too.
# Extra arguments go to ringattn_bench, e.g. launch/run.sh --threads 2 --json results.json
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build} bash launch/build.sh >/dev/null
bench=${BUILD_DIR:-build}/bench/ringattn_bench
"$bench" --impl all --config all --check "$@"
"$bench" --impl dilated --config dense --head-dim 64 --check "$@"
"$bench" --impl dilated --config dense --head-dim 128 --check "$@"
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  # The seed measured fp16 on its GPUs; bf16 is what training runs use.
  "$bench" --backend cuda --impl dilated --config all --dtype fp16 --check "$@"
  "$bench" --backend cuda --impl dilated --config all --dtype bf16 "$@"
  "$bench" --backend cuda --impl ring --config all --dtype bf16 "$@"
  "$bench" --backend cuda --impl dilated --config dense --head-dim 128 --dtype bf16 "$@"
fi
