# cmake -DROOT=<source dir> -P cmake/check_layers.cmake
# The layering of src/ and comm/: every #include "src/..." or "comm/..." of a file must be in
# a folder its own folder may use (below); anything else is listed and the script fails.
#   src/base          base
#   src/plan          base, plan
#   src/ring          base, plan, ring (the K/V transport, RingRun)
#   src/backend       base, plan, ring, backend (all of it: the selector knows every backend)
#   src/backend/<b>   base, plan, ring, the interface headers in src/backend/, backend/<b>
#   src/layer         base, plan, the backend interface, layer
#   src/api           base, plan, the backend interface, ring, layer, api
#   comm              base, comm (and the public headers, as everything may)
set(interface "src/backend/[^/]+")
set(rule_src/base "src/base/")
set(rule_src/plan "src/base/|src/plan/")
set(rule_src/backend "src/base/|src/plan/|src/ring/|src/backend/")
set(rule_src/ring "src/base/|src/plan/|src/ring/")
set(rule_src/layer "src/base/|src/plan/|${interface}$|src/layer/")
set(rule_src/api "src/base/|src/plan/|${interface}$|src/ring/|src/layer/|src/api/")
set(rule_comm "src/base/|comm/")

file(GLOB_RECURSE sources RELATIVE ${ROOT} ${ROOT}/src/*.h ${ROOT}/src/*.cc ${ROOT}/src/*.cu
     ${ROOT}/src/*.cuh ${ROOT}/comm/*.h ${ROOT}/comm/*.cc)
set(violations "")
foreach(f IN LISTS sources)
  get_filename_component(dir ${f} DIRECTORY)
  if(dir MATCHES "^src/backend/([^/]+)")
    set(allowed "src/base/|src/plan/|src/ring/|${interface}$|src/backend/${CMAKE_MATCH_1}/")
  elseif(DEFINED rule_${dir})
    set(allowed "${rule_${dir}}")
  else()
    list(APPEND violations "${f}: its folder ${dir} has no layering rule (cmake/check_layers.cmake)")
    continue()
  endif()
  file(STRINGS ${ROOT}/${f} includes REGEX "^#include \"(src|comm)/")
  foreach(line IN LISTS includes)
    string(REGEX REPLACE "^#include \"([^\"]+)\".*" "\\1" inc "${line}")
    if(NOT inc MATCHES "^(${allowed})")
      list(APPEND violations "${f} includes ${inc}")
    endif()
  endforeach()
endforeach()
if(violations)
  list(JOIN violations "\n  " text)
  message(FATAL_ERROR "includes across the layers (cmake/check_layers.cmake):\n  ${text}")
endif()
