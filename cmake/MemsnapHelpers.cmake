# The project's target helpers: every library, plugin and test is made by one of these, so
# warnings, visibility and output locations are the same everywhere.

function(memsnap_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wshadow -Wnon-virtual-dtor
                                           -Wold-style-cast -Wcast-align)
  if(MEMSNAP_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()

# memsnap_add_library(NAME <name> SOURCES ... [DEPS ...] [PUBLIC_DEPS ...])
# A static library aliased memsnap::<name>. Include paths are rooted at the source tree, so
# code includes "core/snapshot/snapshot_writer.h", "plugins/plugin_api/plugin_api.h" and so on.
function(memsnap_add_library)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES;DEPS;PUBLIC_DEPS" ${ARGN})
  add_library(memsnap_${ARG_NAME} STATIC ${ARG_SOURCES})
  add_library(memsnap::${ARG_NAME} ALIAS memsnap_${ARG_NAME})
  target_include_directories(memsnap_${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(memsnap_${ARG_NAME} PUBLIC ${ARG_PUBLIC_DEPS} PRIVATE ${ARG_DEPS})
  memsnap_set_warnings(memsnap_${ARG_NAME})
endfunction()

# memsnap_add_plugin(NAME <name> LOGIC <sources...> REGISTRATION <plugin.cc> [DEPS ...])
# A strategy plugin is one folder: its logic (a static library memsnap::<name>, so tests use it
# without dlopen) and one registration file that becomes the MODULE library
# lib/memsnap/plugins/memsnap_<name>.so loaded by the host. Plugins see only plugin_api.
function(memsnap_add_plugin)
  cmake_parse_arguments(ARG "" "NAME;REGISTRATION" "LOGIC;DEPS" ${ARGN})
  add_library(memsnap_${ARG_NAME} STATIC ${ARG_LOGIC})
  add_library(memsnap::${ARG_NAME} ALIAS memsnap_${ARG_NAME})
  target_include_directories(memsnap_${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(memsnap_${ARG_NAME} PUBLIC memsnap::plugin_api ${ARG_DEPS})
  set_target_properties(memsnap_${ARG_NAME} PROPERTIES CXX_VISIBILITY_PRESET hidden
                                                       VISIBILITY_INLINES_HIDDEN ON)
  memsnap_set_warnings(memsnap_${ARG_NAME})

  add_library(memsnap_plugin_${ARG_NAME} MODULE ${ARG_REGISTRATION})
  target_link_libraries(memsnap_plugin_${ARG_NAME} PRIVATE memsnap_${ARG_NAME})
  set_target_properties(memsnap_plugin_${ARG_NAME} PROPERTIES
    PREFIX "" OUTPUT_NAME memsnap_${ARG_NAME}
    LIBRARY_OUTPUT_DIRECTORY ${MEMSNAP_PLUGIN_OUTPUT_DIR}
    CXX_VISIBILITY_PRESET hidden VISIBILITY_INLINES_HIDDEN ON)
  target_link_options(memsnap_plugin_${ARG_NAME} PRIVATE -Wl,--no-undefined)
  memsnap_set_warnings(memsnap_plugin_${ARG_NAME})
  add_dependencies(memsnap_plugins memsnap_plugin_${ARG_NAME})
  install(TARGETS memsnap_plugin_${ARG_NAME} LIBRARY DESTINATION lib/memsnap/plugins)
endfunction()

# memsnap_add_plugin_library(NAME <name> SOURCES ...)
# Code shared by several plugins: a static library memsnap::<name> in its own folder under
# plugins/, built like a plugin's logic (sees only plugin_api, hidden visibility) and linked into
# the modules of the plugins that use it, so that no plugin depends on another.
function(memsnap_add_plugin_library)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES" ${ARGN})
  add_library(memsnap_${ARG_NAME} STATIC ${ARG_SOURCES})
  add_library(memsnap::${ARG_NAME} ALIAS memsnap_${ARG_NAME})
  target_include_directories(memsnap_${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(memsnap_${ARG_NAME} PUBLIC memsnap::plugin_api)
  set_target_properties(memsnap_${ARG_NAME} PROPERTIES CXX_VISIBILITY_PRESET hidden
                                                       VISIBILITY_INLINES_HIDDEN ON)
  memsnap_set_warnings(memsnap_${ARG_NAME})
endfunction()

# memsnap_add_test(NAME <name> SOURCES ... [DEPS ...] [LABELS ...] [TIMEOUT s] [ARGS ...]
#                  [CONCURRENT_FILTER <gtest filter>])
# A GoogleTest executable registered with CTest. Tests that load plugins depend on all plugins
# being built and get their directory in MEMSNAP_PLUGIN_DIR. The label `concurrent` marks the
# tests whose code runs on several threads at once; they are what the ThreadSanitizer stage of
# tools/run-tests.sh builds (target memsnap_concurrent_tests) and runs (ctest -L concurrent).
# CONCURRENT_FILTER: only these cases of a long test are concurrent enough to be worth their
# time under TSan; they are registered a second time as <name>_threads, labelled `concurrent`
# and `subset` (the other stages and presets skip `subset`: those cases already ran in <name>).
if(NOT TARGET memsnap_concurrent_tests)
  add_custom_target(memsnap_concurrent_tests)
endif()
function(memsnap_add_test)
  if(NOT MEMSNAP_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT;CONCURRENT_FILTER;SHARDS" "SOURCES;DEPS;LABELS;ARGS"
                        ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gtest_main
                                            Threads::Threads)
  target_include_directories(${ARG_NAME} PRIVATE ${PROJECT_SOURCE_DIR})
  set_target_properties(${ARG_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  memsnap_set_warnings(${ARG_NAME})
  # A test program's own code (its cases, GoogleTest's macros) is optimised for the build, not
  # for speed: at -Og it compiles in half the time of -O2, and it is about half of a release
  # build. What it tests, the libraries and programs it links or starts, keeps the build type's
  # flags.
  if(CMAKE_BUILD_TYPE STREQUAL "RelWithDebInfo" OR CMAKE_BUILD_TYPE STREQUAL "Release")
    target_compile_options(${ARG_NAME} PRIVATE -Og)
  endif()
  add_dependencies(${ARG_NAME} memsnap_plugins)
  if("concurrent" IN_LIST ARG_LABELS OR ARG_CONCURRENT_FILTER)
    add_dependencies(memsnap_concurrent_tests ${ARG_NAME})
  endif()
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set(environment "MEMSNAP_PLUGIN_DIR=${MEMSNAP_PLUGIN_OUTPUT_DIR};MEMSNAP_BIN_DIR=${CMAKE_BINARY_DIR}/bin;MEMSNAP_TEST_BIN_DIR=${CMAKE_BINARY_DIR}/tests")
  # SHARDS N: N CTest tests (<name>_shard<i>), each running every N-th case (GoogleTest's own
  # sharding), so that a long program's cases run side by side under `ctest -j`.
  if(ARG_SHARDS AND ARG_SHARDS GREATER 1)
    math(EXPR last "${ARG_SHARDS} - 1")
    foreach(i RANGE ${last})
      add_test(NAME ${ARG_NAME}_shard${i} COMMAND ${ARG_NAME} ${ARG_ARGS})
      set_tests_properties(${ARG_NAME}_shard${i} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
        LABELS "${ARG_LABELS}"
        ENVIRONMENT "${environment};GTEST_TOTAL_SHARDS=${ARG_SHARDS};GTEST_SHARD_INDEX=${i}")
    endforeach()
  else()
    add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME} ${ARG_ARGS})
    set_tests_properties(${ARG_NAME} PROPERTIES TIMEOUT ${ARG_TIMEOUT}
      LABELS "${ARG_LABELS}" ENVIRONMENT "${environment}")
  endif()
  if(ARG_CONCURRENT_FILTER)
    add_test(NAME ${ARG_NAME}_threads
      COMMAND ${ARG_NAME} ${ARG_ARGS} --gtest_filter=${ARG_CONCURRENT_FILTER})
    set_tests_properties(${ARG_NAME}_threads PROPERTIES TIMEOUT ${ARG_TIMEOUT}
      LABELS "concurrent;subset" ENVIRONMENT "${environment}")
  endif()
endfunction()

# ---- Fuzzing (docs/reliability.md) ----
# MEMSNAP_FUZZ=ON (clang only; the `fuzz` preset, run by tools/fuzz.sh): every target of the build
# is compiled with coverage instrumentation plus ASan and UBSan, and memsnap_add_fuzzer also
# builds the libFuzzer binaries (in <build>/fuzz). Off (any compiler): only the corpus replay
# tests are built. The option itself is declared in the top-level CMakeLists.txt.
if(MEMSNAP_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MEMSNAP_FUZZ needs clang (libFuzzer); configure with the `fuzz` preset "
                        "or -DCMAKE_CXX_COMPILER=clang++")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
                      -fno-omit-frame-pointer)
  add_link_options(-fsanitize=address,undefined)
endif()
# Every fuzzer and replay test, so a build can ask for just them (tools/fuzz.sh does).
add_custom_target(memsnap_fuzzers)
# "<name> <corpus dir>" per line, for tools/fuzz.sh.
set(MEMSNAP_FUZZ_MANIFEST ${CMAKE_BINARY_DIR}/fuzz/targets.txt)
file(WRITE ${MEMSNAP_FUZZ_MANIFEST} "")

# memsnap_add_fuzzer(NAME <name> SOURCES <fuzz.cc>... [DEPS ...] CORPUS <dir>)
# A libFuzzer target (LLVMFuzzerTestOneInput) and its seed corpus, a folder committed beside it.
# Always (with the tests): <name>_corpus_test, the same sources linked with
# cmake/fuzz_replay_main.cc, runs the target over every file of CORPUS; registered with CTest under
# the label `fuzz`, so CI replays every corpus in every build. With MEMSNAP_FUZZ: also the fuzzer
# <build>/fuzz/<name> (-fsanitize=fuzzer,address,undefined).
function(memsnap_add_fuzzer)
  cmake_parse_arguments(ARG "" "NAME;CORPUS" "SOURCES;DEPS" ${ARGN})
  if(NOT ARG_NAME OR NOT ARG_SOURCES OR NOT ARG_CORPUS)
    message(FATAL_ERROR "memsnap_add_fuzzer needs NAME, SOURCES and CORPUS")
  endif()
  get_filename_component(corpus ${ARG_CORPUS} ABSOLUTE BASE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  if(NOT IS_DIRECTORY ${corpus})
    message(FATAL_ERROR "memsnap_add_fuzzer(${ARG_NAME}): no corpus directory ${corpus}")
  endif()

  if(MEMSNAP_BUILD_TESTS)
    set(test ${ARG_NAME}_corpus_test)
    add_executable(${test} ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/cmake/fuzz_replay_main.cc)
    target_link_libraries(${test} PRIVATE ${ARG_DEPS} Threads::Threads)
    target_include_directories(${test} PRIVATE ${PROJECT_SOURCE_DIR})
    set_target_properties(${test} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
    memsnap_set_warnings(${test})
    add_dependencies(memsnap_fuzzers ${test})
    add_test(NAME ${test} COMMAND ${test} ${corpus})
    set_tests_properties(${test} PROPERTIES TIMEOUT 300 LABELS "fuzz")
  endif()

  if(MEMSNAP_FUZZ)
    add_executable(${ARG_NAME} ${ARG_SOURCES})
    target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} Threads::Threads)
    target_include_directories(${ARG_NAME} PRIVATE ${PROJECT_SOURCE_DIR})
    target_compile_options(${ARG_NAME} PRIVATE -fsanitize=fuzzer)
    target_link_options(${ARG_NAME} PRIVATE -fsanitize=fuzzer)
    set_target_properties(${ARG_NAME} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/fuzz)
    memsnap_set_warnings(${ARG_NAME})
    add_dependencies(memsnap_fuzzers ${ARG_NAME})
    file(APPEND ${MEMSNAP_FUZZ_MANIFEST} "${ARG_NAME} ${corpus}\n")
  endif()
endfunction()

# The manual page of a program, generated by the built binary (`TARGET --man`, from its command
# table, tools/cli_spec) into share/man/manSECTION of the build tree, and installed there.
function(memsnap_add_man_page)
  cmake_parse_arguments(ARG "" "TARGET;SECTION" "" ${ARGN})
  set(dir ${CMAKE_BINARY_DIR}/share/man/man${ARG_SECTION})
  set(page ${dir}/${ARG_TARGET}.${ARG_SECTION})
  add_custom_command(OUTPUT ${page}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${dir}
    COMMAND sh -c "\"$<TARGET_FILE:${ARG_TARGET}>\" --man > \"${page}\""
    DEPENDS ${ARG_TARGET} VERBATIM)
  add_custom_target(${ARG_TARGET}_man ALL DEPENDS ${page})
  install(FILES ${page} DESTINATION share/man/man${ARG_SECTION})
endfunction()
