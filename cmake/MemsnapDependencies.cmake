# Every dependency comes from Debian 12's packages (tools/setup.sh installs them). Why each one
# was chosen is in docs/dependencies.md.
find_package(Threads REQUIRED)
find_package(Boost 1.74 REQUIRED COMPONENTS filesystem)  # Boost.DLL is header-only on top of it
find_package(spdlog REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(yaml-cpp REQUIRED)  # target yaml-cpp (Debian 12 ships 0.7)
# Metrics (core/metrics): targets prometheus-cpp::core and prometheus-cpp::pull (Debian 12: 1.0.1)
find_package(prometheus-cpp CONFIG REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(XXHASH REQUIRED IMPORTED_TARGET libxxhash)
if(MEMSNAP_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
if(MEMSNAP_BUILD_BENCHMARKS)
  find_package(benchmark REQUIRED)
endif()
