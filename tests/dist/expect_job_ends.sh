#!/usr/bin/env bash
# Runs a command (an mpirun job) under a time limit and passes when it ends by itself with a
# non-zero exit code: a job with a dead rank must end, not hang and not report success.
#   expect_job_ends.sh <seconds> <command...>
set -u
limit=$1
shift
start=$(date +%s)
timeout --kill-after=5 "$limit" "$@"
rc=$?
elapsed=$(($(date +%s) - start))
if [ "$elapsed" -ge "$limit" ]; then
  echo "FAIL: the job did not end within $limit s (exit code $rc)"
  exit 1
fi
if [ "$rc" -eq 0 ]; then
  echo "FAIL: the job reported success although a rank died"
  exit 1
fi
echo "ok: the job ended by itself after ${elapsed} s with exit code $rc"
