#!/usr/bin/env bash
# Runs every libFuzzer target of memsnap for a bounded time (docs/reliability.md, "Fuzzing").
#
#   bash tools/fuzz.sh [SECONDS_PER_TARGET=60] [--merge] [--only NAME]...
#
# Installs what is missing (clang and libFuzzer's runtime, through tools/setup.sh), configures and
# builds the `fuzz` preset (clang, -fsanitize=fuzzer,address,undefined), then runs each fuzzer over
# a working copy of its committed corpus (<build>/fuzz-work/<name>/corpus), one after the other,
# and prints per target: executions, exec/s, corpus size before -> after, crashes.
#   --merge      afterwards, merge the inputs that add coverage back into the committed corpus
#                (libFuzzer -merge=1: only new coverage goes in). Review and commit them by hand.
#   --only NAME  run only this target (repeatable).
# Environment: MEMSNAP_FUZZ_BUILD_DIR (default build/fuzz), MEMSNAP_FUZZ_RSS_MB (default 2048).
# The flags fuzzer also gets the flagd testbed's flag files (../shared/conformance, read where
# they lie, never copied into the repo) as extra seeds of its working corpus, when they exist.
#
# Exit status: 0 when no target crashed; 1 when one did (the crashing input is kept in
# <build>/fuzz-work/<name>/artifacts/ and named in the output: add it to the target's corpus once
# fixed, so its replay test covers it); 2 on a usage or build error.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/.." && pwd)"

seconds=60
merge=0
only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --merge) merge=1 ;;
    --only) shift; only+=("${1:?--only needs a target name}") ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *)
      if [[ "$1" =~ ^[0-9]+$ ]]; then seconds="$1"; else echo "fuzz.sh: unknown argument $1" >&2; exit 2; fi ;;
  esac
  shift
done

build="${MEMSNAP_FUZZ_BUILD_DIR:-$src/build/fuzz}"
rss_mb="${MEMSNAP_FUZZ_RSS_MB:-2048}"

# clang and libFuzzer's runtime (libclang-rt-14-dev) are in tools/setup.sh's list.
if ! command -v clang++ >/dev/null || ! dpkg-query -W -f='${Status}' libclang-rt-14-dev 2>/dev/null |
    grep -q "install ok installed"; then
  bash "$here/setup.sh"
fi

echo "== configure and build the fuzz preset in $build" >&2
(cd "$src" && cmake --preset fuzz -B "$build" >/dev/null) || { echo "fuzz.sh: configure failed" >&2; exit 2; }
cmake --build "$build" --target memsnap_fuzzers || { echo "fuzz.sh: build failed" >&2; exit 2; }

manifest="$build/fuzz/targets.txt"
[ -s "$manifest" ] || { echo "fuzz.sh: no fuzz targets in $manifest" >&2; exit 2; }

# Extra seeds that are not ours to commit, by target.
extra_seeds() {
  local name="$1" dst="$2"
  case "$name" in
    flags_fuzz)
      local tb
      for tb in "$src/../shared/conformance/flagd-testbed" /work/shared/conformance/flagd-testbed; do
        [ -d "$tb" ] || continue
        local f n=0
        while IFS= read -r -d '' f; do
          # The target reads a format byte first: 1 = JSON, 2 = YAML.
          case "$f" in *.json) printf '\001' ;; *) printf '\002' ;; esac >"$dst/testbed-$n"
          cat "$f" >>"$dst/testbed-$n"
          n=$((n + 1))
        done < <(find "$tb" -type f \( -name '*.json' -o -name '*.yaml' -o -name '*.yml' \) -print0)
        break
      done ;;
  esac
}

results=()
crashed=0
while read -r name corpus; do
  [ -n "$name" ] || continue
  if [ ${#only[@]} -gt 0 ] && [[ ! " ${only[*]} " =~ " $name " ]]; then continue; fi
  work="$build/fuzz-work/$name"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$corpus"/* "$work/corpus/"
  extra_seeds "$name" "$work/corpus"
  before=$(find "$work/corpus" -type f | wc -l)
  echo "== $name: ${seconds}s over $before seeds" >&2
  set +e
  "$build/fuzz/$name" -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb="$rss_mb" \
    -timeout=25 -artifact_prefix="$work/artifacts/" "$work/corpus" >"$work/log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/log" | tail -1)
  after=$(find "$work/corpus" -type f | wc -l)
  artifacts=$(find "$work/artifacts" -type f | wc -l)
  status="ok"
  if [ "$rc" -ne 0 ] || [ "$artifacts" -gt 0 ]; then
    status="CRASH (exit $rc): $(find "$work/artifacts" -type f | tr '\n' ' ')"
    crashed=1
    echo "-- $name failed; the end of its log ($work/log):" >&2
    tail -40 "$work/log" >&2
  fi
  results+=("$(printf '%-20s %12s %8s %8s -> %-6s %s' "$name" "${execs:-?}" "${rate:-?}" "$before" "$after" "$status")")
  if [ "$merge" -eq 1 ] && [ "$status" = "ok" ]; then
    n0=$(find "$corpus" -type f | wc -l)
    "$build/fuzz/$name" -merge=1 -rss_limit_mb="$rss_mb" "$corpus" "$work/corpus" >"$work/merge.log" 2>&1
    echo "-- $name: merged into $corpus: $n0 -> $(find "$corpus" -type f | wc -l) files" >&2
  fi
done <"$manifest"

echo
printf '%-20s %12s %8s %18s %s\n' target executions exec/s "corpus seeds->now" result
printf '%s\n' "${results[@]}"
if [ "$crashed" -ne 0 ]; then
  echo "fuzz.sh: a fuzzer crashed; reproduce with <build>/fuzz/<name> <crashing input>" >&2
  exit 1
fi
