#!/usr/bin/env bash
# Checks (default) or applies (--fix) the project's .clang-format to every C++/CUDA source.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.h' '*.cc' '*.cu' '*.cuh')
if [ "${1:-}" = "--fix" ]; then
  clang-format -i "${files[@]}"
else
  clang-format --dry-run -Werror "${files[@]}"
  echo "# format: ${#files[@]} files clean"
fi
