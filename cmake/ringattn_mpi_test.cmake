# ringattn_add_mpi_test(NAME <prefix> TARGET <executable> NP <n>...
#                       [TIMEOUT <seconds>] [LABELS <label>...] [ARGS <arg>...]
#                       [LAUNCHER <command>...])
#
# Registers one CTest test per process count: <prefix>_np<n> runs
#   [<launcher>] mpiexec -n <n> [--oversubscribe] <executable> <args>
# with label "mpi" (plus LABELS), a timeout (default 300 s, so a hang fails instead of
# stalling) and the environment OpenMPI needs in this setup (RINGATTN_MPI_TEST_ENV).
# Run them with `ctest -L mpi`.

# Running as root (containers) needs both OMPI_ALLOW_RUN_AS_ROOT* variables; more ranks than
# cores needs oversubscription. The variables are ignored by other MPI implementations.
set(RINGATTN_MPI_TEST_ENV
    "OMPI_ALLOW_RUN_AS_ROOT=1"
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
    "OMPI_MCA_rmaps_base_oversubscribe=1"
    "OMP_NUM_THREADS=1")

if(NOT DEFINED RINGATTN_MPIEXEC_IS_OPENMPI)
  execute_process(COMMAND ${MPIEXEC_EXECUTABLE} --version OUTPUT_VARIABLE _mpiexec_version
                  ERROR_QUIET RESULT_VARIABLE _mpiexec_rc)
  set(_is_openmpi OFF)
  if(_mpiexec_rc EQUAL 0 AND _mpiexec_version MATCHES "Open MPI|OpenRTE")
    set(_is_openmpi ON)
  endif()
  set(RINGATTN_MPIEXEC_IS_OPENMPI ${_is_openmpi} CACHE INTERNAL "mpiexec is OpenMPI's")
endif()

function(ringattn_add_mpi_test)
  cmake_parse_arguments(PARSE_ARGV 0 ARG "" "NAME;TARGET;TIMEOUT" "NP;LABELS;ARGS;LAUNCHER")
  if(NOT ARG_NAME OR NOT ARG_TARGET OR NOT ARG_NP)
    message(FATAL_ERROR "ringattn_add_mpi_test: NAME, TARGET and NP are required")
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  # --oversubscribe is an OpenMPI flag (MPICH always allows more ranks than cores).
  set(_oversubscribe "")
  if(RINGATTN_MPIEXEC_IS_OPENMPI)
    set(_oversubscribe --oversubscribe)
  endif()
  foreach(_np IN LISTS ARG_NP)
    set(_test ${ARG_NAME}_np${_np})
    add_test(NAME ${_test}
             COMMAND ${ARG_LAUNCHER} ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${_np}
                     ${_oversubscribe}
                     ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${ARG_TARGET}> ${MPIEXEC_POSTFLAGS}
                     ${ARG_ARGS})
    set_tests_properties(${_test} PROPERTIES
                         ENVIRONMENT "${RINGATTN_MPI_TEST_ENV}"
                         TIMEOUT ${ARG_TIMEOUT}
                         LABELS "mpi;${ARG_LABELS}"
                         PROCESSORS ${_np})
  endforeach()
endfunction()
