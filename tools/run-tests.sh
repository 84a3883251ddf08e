#!/usr/bin/env bash
# Builds memsnap and runs every test, from a fresh Debian 12 machine: installs what is missing
# (tools/setup.sh), then three stages, each a CMake preset with its own build directory:
#
#   release  RelWithDebInfo, warnings are errors: every test.
#   asan     ASan + UBSan (Debug, -fno-sanitize-recover): every test but load_test, whose bounds
#            are memsnapd's own RSS, which ASan's shadow memory and quarantine inflate.
#   tsan     ThreadSanitizer (Debug): the tests labelled `concurrent` (flag reload under
#            evaluation, the fault server, concurrent pauses and resumes through memsnapd, the
#            control API, metrics, and the lazy, background-fill and write-tracking resumes end
#            to end), built alone (target memsnap_concurrent_tests).
#
#   bash tools/run-tests.sh                    # every stage (what CI runs)
#   bash tools/run-tests.sh --stage release    # only the named stage(s); repeatable
#   bash tools/run-tests.sh -R e2e             # other arguments go to every stage's ctest
#   MEMSNAP_TEST_STAGES="release asan" bash tools/run-tests.sh
#
# Tests run two at a time (the test presets' execution.jobs; load_test alone, RUN_SERIAL), and
# memsnapd_test as two shards. A sanitizer report fails its test (halt_on_error / exitcode), so
# a stage passes only when ctest does. Each stage prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."

stages=()
ctest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stage)
      [[ $# -ge 2 ]] || { echo "run-tests.sh: --stage needs release, asan or tsan" >&2; exit 2; }
      stages+=("$2")
      shift 2
      ;;
    *)
      ctest_args+=("$1")
      shift
      ;;
  esac
done
if [[ ${#stages[@]} -eq 0 ]]; then
  read -r -a stages <<<"${MEMSNAP_TEST_STAGES:-release asan tsan}"
fi
for s in "${stages[@]}"; do
  case "$s" in
    release | asan | tsan) ;;
    *) echo "run-tests.sh: unknown stage '$s' (release, asan, tsan)" >&2; exit 2 ;;
  esac
done

bash tools/setup.sh

# Sanitizer runtimes: stop at the first report and fail the process; leaks are reported too.
# Every report, also from the child processes a test starts (memsnapd, memsnap-guest, the CLI),
# whose exit status a test may never see, is written to a file in ${san_dir}: a stage with any
# such file fails, whatever ctest said.
san_dir=$(mktemp -d /tmp/memsnap-sanitizers.XXXXXX)
trap 'rm -rf "${san_dir}"' EXIT
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:log_path=${san_dir}/asan${ASAN_OPTIONS:+:${ASAN_OPTIONS}}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=${san_dir}/ubsan${UBSAN_OPTIONS:+:${UBSAN_OPTIONS}}"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:exitcode=66:log_path=${san_dir}/tsan${TSAN_OPTIONS:+:${TSAN_OPTIONS}}"

run_stage() {
  local stage=$1
  local start=$SECONDS
  local status=0
  echo "== run-tests: stage ${stage} =="
  cmake --preset "${stage}" >/dev/null
  case "${stage}" in
    release)
      cmake --build --preset release
      ctest --preset release ${ctest_args[@]+"${ctest_args[@]}"} || status=$?
      ;;
    asan)
      cmake --build --preset asan
      ctest --preset asan -E '^load_test$' ${ctest_args[@]+"${ctest_args[@]}"} || status=$?
      ;;
    tsan)
      cmake --build --preset tsan --target memsnap_concurrent_tests
      ctest --preset tsan ${ctest_args[@]+"${ctest_args[@]}"} || status=$?
      ;;
  esac
  if compgen -G "${san_dir}/*" >/dev/null; then
    echo "== run-tests: stage ${stage}: sanitizer reports ==" >&2
    for f in "${san_dir}"/*; do
      echo "---- ${f##*/}" >&2
      cat "$f" >&2
    done
    rm -f "${san_dir}"/*
    status=1
  fi
  if [[ ${status} -ne 0 ]]; then
    echo "== run-tests: stage ${stage} FAILED after $((SECONDS - start)) s ==" >&2
    exit 1
  fi
  echo "== run-tests: stage ${stage} passed in $((SECONDS - start)) s =="
}

for s in "${stages[@]}"; do
  run_stage "$s"
done
