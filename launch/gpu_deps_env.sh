# Sourced by launch/gpu_check.sh: when .gpu-deps/ holds the packages of launch/gpu_deps.sh,
# unpacks them into a private prefix and points PATH, LD_LIBRARY_PATH, OpenMPI and CMake at
# it (cmake_deps_args). Without .gpu-deps, the machine's own packages are used.
cmake_deps_args=()
if compgen -G ".gpu-deps/*.deb" >/dev/null; then
  deps_root=${GPU_DEPS_ROOT:-/tmp/ringattn-gpu-deps}
  rm -rf "${deps_root}"
  mkdir -p "${deps_root}"
  for f in .gpu-deps/*.deb; do dpkg -x "$f" "${deps_root}"; done
  u=${deps_root}/usr
  lib=${u}/lib/x86_64-linux-gnu
  # dpkg -x makes no Debian "alternatives" links: name the OpenMPI tools directly.
  for t in mpirun mpiexec mpicc mpicxx; do ln -sf "${t}.openmpi" "${u}/bin/${t}"; done
  export PATH=${u}/bin:${PATH}
  export LD_LIBRARY_PATH=${lib}:${lib}/openblas-pthread:${lib}/openmpi/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}
  # A relocated OpenMPI: its prefix, configuration and components come from deps_root.
  export OPAL_PREFIX=${u} OPAL_SYSCONFDIR=${deps_root}/etc/openmpi
  export OPAL_LIBDIR=${lib}/openmpi/lib OPAL_PKGDATADIR=${u}/share/openmpi
  export OMPI_MCA_mca_base_component_path=${lib}/openmpi/lib/openmpi3
  export PMIX_MCA_mca_base_component_path=${lib}/pmix2/lib/pmix
  export PMIX_PREFIX=${lib}/pmix2
  cmake_deps_args=(-DCMAKE_PREFIX_PATH="${u}" -DBLA_VENDOR=OpenBLAS
                   -DCMAKE_LIBRARY_PATH="${lib}/openblas-pthread"
                   -DMPI_CXX_COMPILER="${u}/bin/mpicxx" -DMPIEXEC_EXECUTABLE="${u}/bin/mpirun")
  echo "# gpu deps: $(ls .gpu-deps/*.deb | wc -l) packages unpacked into ${deps_root}"
fi
