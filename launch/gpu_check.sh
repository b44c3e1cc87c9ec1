#!/usr/bin/env bash
# The CUDA path on a real GPU, in one go (no network needed; the steps' time limits add up to
# 7 min 45 s, so the script ends within 8 minutes even when every step runs to its limit; each
# step's limit is above the time limits of the tests inside it, and every communicator wait
# has a deadline of RINGATTN_TIMEOUT_S = 60 s, so a hang is reported by the test's name):
#   1. build with CUDA (Release, CUDA_ARCH = native by default, warnings not errors: a newer
#      compiler's new warnings must not stop the only run) into ${BUILD_DIR:-build-gpu};
#   2. every GPU test (ctest label gpu), with RINGATTN_REQUIRE_GPU=1 so a skip is a failure;
#   3. compute-sanitizer memcheck on small forward/backward cases;
#   4. the benchmark table: the seed's configurations in fp16 and bf16 and the bf16
#      dense-segment row, against a cuBLAS bf16 GEMM measured in the same run;
#   5. the GPU ring: 2 ranks sharing the GPU over the mpi communicator, with --check.
# Prints a summary line per step and exits non-zero if any step failed.
# Usage: launch/gpu_check.sh [extra cmake arguments]
# Needs nvcc, CMake and a C++ compiler; Highway, GoogleTest, CLI11, nlohmann-json, OpenBLAS
# and OpenMPI come from the machine or, on one without network, from .gpu-deps/ made by
# launch/gpu_deps.sh beforehand (device tool: carry [".gpu-deps"]).
set -uo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build-gpu}
arch=${CUDA_ARCH:-native}
jobs=$(nproc)
start=$(date +%s)
status=0
summary=()

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, records the result
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  echo "### ${name}"
  timeout "${limit}" "$@"
  local rc=$?
  local t=$(($(date +%s) - t0))
  if [ $rc -eq 0 ]; then summary+=("PASS ${name} (${t} s)"); else
    summary+=("FAIL ${name} (exit ${rc}, ${t} s)")
    status=1
  fi
  return $rc
}

export PATH=/usr/local/cuda/bin:${PATH}
echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
git log -1 --format='# commit %h %s' 2>/dev/null || true
echo "# $(ldd --version 2>&1 | head -1)"
echo "# $(c++ --version 2>&1 | head -1); $(nvcc --version 2>&1 | tail -1)"
echo "# cuBLAS: $(ls /usr/local/cuda/include/cublas_v2.h /usr/local/cuda/lib64/libcublas.so 2>&1 | tr '\n' ' ')"

# (A script of its own for `timeout`; extra arguments go to cmake.)
build_script='generator=(); command -v make >/dev/null || generator=(-G Ninja)
cmake -S . -B "$0" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DRINGATTN_WITH_CUDA=ON \
  -DRINGATTN_WERROR=OFF -DCMAKE_CUDA_ARCHITECTURES="$1" "${@:3}" >"$0.log" 2>&1 &&
  cmake --build "$0" -j "$2" >>"$0.log" 2>&1
rc=$?; tail -5 "$0.log"; exit $rc'
# Packages carried from a machine with network (launch/gpu_deps.sh), when .gpu-deps/ exists.
source launch/gpu_deps_env.sh
step build 170 bash -c "${build_script}" "${build_dir}" "${arch}" "${jobs}" "${cmake_deps_args[@]}" "$@" || { printf '%s\n' "${summary[@]}"; exit 1; }

export RINGATTN_REQUIRE_GPU=1 RINGATTN_TIMEOUT_S=60 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# (ctest's own limit per test, --timeout, below the step's: a hang shows the test's name.)
step gpu-tests 150 ctest --test-dir "${build_dir}" -L gpu --output-on-failure -j 4 --timeout 100

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "${sanitizer}" ]; then
  step memcheck 40 "${sanitizer}" --tool memcheck --error-exitcode 1 \
    "${build_dir}/tests/ringattn_gpu_tests" \
    --gtest_filter='CudaForward.RunsOnTheGivenStream:CudaBackward.TilesAndEdgeHeadDims'
else
  summary+=("FAIL memcheck (compute-sanitizer not found)")
  status=1
fi

bench=${build_dir}/bench/ringattn_bench
# The tests above are the correctness check; here one row also runs the benchmark's own
# --check (fp64 reference on the CPU, batch 0), the others are timed only.
step bench-check 20 "${bench}" --backend cuda --impl dilated --config small --dtype fp16 \
  --iters 2 --check
step bench-fp16 20 "${bench}" --backend cuda --impl dilated --config all --dtype fp16
step bench-bf16 20 "${bench}" --backend cuda --impl dilated --config all --dtype bf16
step bench-dense-bf16 20 "${bench}" --backend cuda --impl dilated --seq 8192 --segments 8192 \
  --dilations 1 --causal 1 --head-dim 128 --heads 16 --dtype bf16

mpirun_args=(-np 2 --oversubscribe)
[ "$(id -u)" = 0 ] && mpirun_args+=(--allow-run-as-root)
step bench-ring-mpi2 25 mpirun "${mpirun_args[@]}" "${bench}" --backend cuda --impl ring \
  --config small --dtype bf16 --iters 3 --check

echo "# summary ($(($(date +%s) - start)) s in all)"
printf '%s\n' "${summary[@]}"
exit ${status}
