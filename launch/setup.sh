#!/usr/bin/env bash
# Installs what ringattn needs to build, test and benchmark on Debian/Ubuntu, when missing.
# Safe to run repeatedly: installs nothing when everything is present.
set -euo pipefail

packages=(build-essential cmake pkg-config clang-format libhwy-dev libopenblas-dev libgtest-dev
          libcli11-dev nlohmann-json3-dev libopenmpi-dev openmpi-bin jq)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "# setup: installing ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
