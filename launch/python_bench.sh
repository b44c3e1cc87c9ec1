#!/usr/bin/env bash
# The Python package's benchmark (bench/python_bench.py): builds ringattn with the Python
# module (Release), makes the Python environment (launch/python_env.sh) and times the package
# against ringattn_bench and torch, alternated. Arguments go to the script, e.g.
#   bash launch/python_bench.sh --threads 2 --rounds 3 --json bench.json --png bench.png
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(bash launch/python_env.sh)
build_dir=${BUILD_DIR:-build}
BUILD_DIR=$build_dir bash launch/build.sh -DRINGATTN_BUILD_PYTHON=ON -DPython_EXECUTABLE="$py" \
  >/dev/null
PYTHONPATH="$PWD/$build_dir/python" "$py" bench/python_bench.py --bench "$build_dir/bench/ringattn_bench" "$@"
