# Install rules (component "devel") and the package configuration that lets another CMake
# project do find_package(ringattn) and link ringattn::ringattn.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(RINGATTN_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/ringattn)
install(TARGETS ringattn EXPORT ringattnTargets COMPONENT devel
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY include/ringattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT devel)
install(EXPORT ringattnTargets NAMESPACE ringattn:: DESTINATION ${RINGATTN_CMAKE_DIR}
        COMPONENT devel)
configure_package_config_file(cmake/ringattnConfig.cmake.in
                              ${CMAKE_CURRENT_BINARY_DIR}/ringattnConfig.cmake
                              INSTALL_DESTINATION ${RINGATTN_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/ringattnConfigVersion.cmake
                                 COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/ringattnConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/ringattnConfigVersion.cmake
        DESTINATION ${RINGATTN_CMAKE_DIR} COMPONENT devel)
