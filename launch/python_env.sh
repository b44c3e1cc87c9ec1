#!/usr/bin/env bash
# Makes (once) the Python environment the package's tests, examples and benchmark use, and
# prints its interpreter's path on stdout. The virtual environment lives outside the clone,
# in ${RINGATTN_VENV:-~/.cache/ringattn/venv}, so torch (a download of a few GB from PyPI) is
# fetched once per machine and reused by every clone. Interpreter: $RINGATTN_PYTHON, default
# /usr/bin/python3 (Debian's; its headers come from python3-dev).
# Usage: py=$(bash launch/python_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh >&2  # the compiler and MPI that mpi4py builds against
python=${RINGATTN_PYTHON:-/usr/bin/python3}
venv=${RINGATTN_VENV:-$HOME/.cache/ringattn/venv}
# What the tests import; torch >= 2.4 is the oldest the package supports (torch.library.custom_op).
requirements=("torch>=2.4" numpy pytest mpi4py matplotlib nanobind scikit-build-core)

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
if [ "$python" = /usr/bin/python3 ]; then
  missing=()
  for p in python3-dev python3-venv; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "# python_env: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

py=$venv/bin/python
# A venv made by another interpreter is made again (its site-packages would not match).
if [ -x "$py" ] && [ "$(cat "$venv/.interpreter" 2>/dev/null)" != "$python" ]; then
  echo "# python_env: $venv was not made by $python; making it again" >&2
  rm -rf "$venv"
fi
if [ ! -x "$py" ]; then
  echo "# python_env: making $venv with $python" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
  echo "$python" > "$venv/.interpreter"
fi
if ! "$py" - "${requirements[@]}" >/dev/null 2>&1 <<'PY'; then
import sys
from importlib.metadata import version
import torch  # noqa: F401  (importable, not only installed)
major, minor = (int(x) for x in version("torch").split(".")[:2])
assert (major, minor) >= (2, 4)
for name in sys.argv[1:]:
    version(name.split(">")[0])
PY
  echo "# python_env: installing ${requirements[*]} into $venv (torch is a large download)" >&2
  # mpi4py from source, against the MPI that ringattn links (its MPI_Comm handles are passed
  # to the C++ module, so both must be the same MPI).
  "$py" -m pip install --quiet --upgrade pip >&2
  "$py" -m pip install --quiet --no-binary mpi4py "${requirements[@]}" >&2
fi
echo "$py"
