#!/usr/bin/env bash
# Packs what launch/gpu_check.sh needs beyond CUDA into .gpu-deps/ (git-ignored), for a GPU
# machine that has nvcc, CMake and a C++ compiler but no network and none of our packages:
# Highway, GoogleTest, CLI11, nlohmann-json, OpenBLAS, OpenMPI (with the libraries a bare image
# lacks: libudev, zlib, libquadmath) and Ninja as Debian packages (about 22 MB). Run it here, where apt works; then send .gpu-deps along with the working tree (the
# device tool: carry [".gpu-deps"]). gpu_check.sh unpacks them with dpkg -x into a private
# prefix, so nothing on the GPU machine's own system is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(
  libhwy-dev libhwy1 libgtest-dev libcli11-dev nlohmann-json3-dev
  libopenblas-dev libopenblas-pthread-dev libopenblas0-pthread libopenblas0 libgfortran5
  libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libpmix2 libhwloc15 libhwloc-plugins
  libevent-2.1-7 libevent-core-2.1-7 libevent-pthreads-2.1-7 libfabric1 libucx0 libibverbs1
  librdmacm1 libpsm-infinipath1 libpsm2-2 libnl-3-200 libnl-route-3-200 libnuma1 libmunge2
  libltdl7 libpciaccess0 libxnvctrl0 libudev1 zlib1g libquadmath0 ninja-build
)
rm -rf .gpu-deps
mkdir -p .gpu-deps
# apt-get download writes into the current directory (as _apt where it can).
chmod 777 .gpu-deps
(cd .gpu-deps && apt-get download -q "${packages[@]}")
echo "# gpu_deps: $(ls .gpu-deps/*.deb | wc -l) packages, $(du -sh .gpu-deps | cut -f1) in .gpu-deps"
