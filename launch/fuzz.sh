#!/usr/bin/env bash
# The fuzzer over the public API (tests/dist/fuzz_main.cc) for longer than the test suite runs it:
# one process, then mpirun at 2, 3 and 4 ranks, --seconds each (default 300), seed --seed.
#   launch/fuzz.sh [--seconds S] [--seed X] [--ranks "1 2 3 4"]
# Builds first (launch/build.sh; BUILD_DIR as there). Prints each run's counts per class and
# API; exits non-zero if any run failed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=300 seed=$(date +%s) ranks="1 2 3 4"
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    *) echo "usage: launch/fuzz.sh [--seconds S] [--seed X] [--ranks \"1 2 3 4\"]" >&2; exit 2 ;;
  esac
done
build_dir=${BUILD_DIR:-build}
bash launch/build.sh >/dev/null
fuzz=${build_dir}/tests/ringattn_fuzz
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
status=0
for p in ${ranks}; do
  echo "## ${p} rank(s), ${seconds} s, seed ${seed}"
  mpiexec -n "${p}" --oversubscribe "${fuzz}" --seconds "${seconds}" --seed "${seed}" || status=1
done
exit ${status}
