#!/usr/bin/env bash
# Runs ringattn_bench (or any command) under Open MPI's mpirun: P ranks of T OpenMP threads.
#
#   launch/mpirun.sh -np P [-t THREADS_PER_RANK] [--bind core|none] -- ringattn_bench ARGS...
#
# "ringattn_bench" as the command means ${BUILD_DIR:-build}/bench/ringattn_bench, brought up
# to date first with launch/build.sh (quietly; RINGATTN_NO_BUILD=1 skips that).
#   -t T          OMP_NUM_THREADS of every rank (default 1).
#   --bind core   (default) each rank gets T cores of its own (--map-by slot:PE=T
#                 --bind-to core) and its threads are pinned to them (OMP_PROC_BIND=close,
#                 OMP_PLACES=cores). When P x T exceeds the cores, ranks are left unbound.
#   --bind none   no binding (--bind-to none).
# --allow-run-as-root is added when run as root, --oversubscribe when P x T exceeds the
# cores (Open MPI busy-polls while waiting, so time only runs with P x T <= cores). More
# mpirun options (a hostfile, ...) go in MPIRUN_ARGS. The mpirun command line is printed
# first, with a leading #.
set -euo pipefail
cd "$(dirname "$0")/.."

source launch/options.sh

np="" threads=1 bind=core
parse_options "-np:np -n:np -t:threads --threads:threads --bind:bind" \
  "the command goes after --" "$@"
require_positive -np "$np" -t "$threads"
if [ "$bind" != core ] && [ "$bind" != none ]; then
  usage_error "--bind takes core or none, not '$bind'"
fi
[ ${#rest[@]} -gt 0 ] || usage_error "no command after --"

command=("${rest[@]}")
if [ "${command[0]}" = ringattn_bench ]; then
  build_unless_told
  command[0]=${BUILD_DIR:-build}/bench/ringattn_bench
fi

cores=$(nproc)
args=(mpirun -np "$np")
if [ "$(id -u)" -eq 0 ]; then
  args+=(--allow-run-as-root)
fi
env_vars=(OMP_NUM_THREADS="$threads")
if ((np * threads > cores)); then
  args+=(--oversubscribe)
  if [ "$bind" = core ]; then
    echo "# $np ranks x $threads threads > $cores cores: oversubscribed, ranks left unbound"
    bind=none
  fi
fi
if [ "$bind" = core ]; then
  args+=(--map-by "slot:PE=$threads" --bind-to core)
  env_vars+=(OMP_PROC_BIND=close OMP_PLACES=cores)
else
  args+=(--bind-to none)
fi
for v in "${env_vars[@]}"; do
  export "${v?}"
  args+=(-x "${v%%=*}")
done
# shellcheck disable=SC2206  # MPIRUN_ARGS is split on purpose
args+=(${MPIRUN_ARGS:-} "${command[@]}")

printf -v line ' %q' "${args[@]}"
echo "# ${env_vars[*]}$line"
exec "${args[@]}"
