#!/usr/bin/env bash
# Runs every benchmark of the project once, in turn, and writes the raw JSON and the ratio tables
# of docs/performance.md into one directory. About 25 minutes on a quiet 2-CPU machine (14 on
# 2026-12-03, before issue 18 added the durable, process_vm_readv pipeline, buffer and hole_punch
# chunk benchmarks), plus the handover benchmark of issue 19 (256 MiB, 1 and 4 GiB through
# memsnapd, its own repetitions: see its header; MEMSNAP_HANDOVER_SIZES makes it smaller); the
# QEMU benchmark, ~12 minutes more, only with --qemu. Run it when nothing
# else runs: every figure is a ratio to a reference measured in the same run, but a busy machine
# still widens the spread.
#   bash tools/bench/run-all.sh [--out DIR] [--reps N] [--qemu]
# Needs a release build (bash tools/run-tests.sh --stage release, or cmake --preset release &&
# cmake --build --preset release).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="${MEMSNAP_BENCH_BIN:-$root/build/release/bin}"
out="bench-$(date -u +%Y-%m-%d-%H%M)"
reps=3
qemu=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --qemu) qemu=1; shift ;;
    *) echo "usage: $0 [--out DIR] [--reps N] [--qemu]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
for b in memsnap-bench memsnap-resume-bench memsnap-flags-bench snapshot_writer_bench \
         memsnap-handover-bench; do
  [[ -x "$bin/$b" ]] || { echo "$bin/$b is missing: build the release preset first" >&2; exit 1; }
done
gb=(--benchmark_repetitions="$reps" --benchmark_enable_random_interleaving=true
    --benchmark_out_format=json)
step() { echo "== $(date -u +%H:%M:%S) $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$out/log" >&2; }

step "export: memsnap-bench"
"$bin/memsnap-bench" "${gb[@]}" --benchmark_out="$out/export.json" >> "$out/log" 2>&1
"$root/tools/bench/ratios.py" "$out/export.json" > "$out/export.md"
"$root/tools/bench/durable_ratios.py" "$out/export.json" > "$out/durable.md"

step "resume and fault service: memsnap-resume-bench"
"$bin/memsnap-resume-bench" "${gb[@]}" --benchmark_out="$out/resume.json" >> "$out/log" 2>&1
"$root/tools/bench/resume_ratios.py" "$out/resume.json" > "$out/resume.md"

step "flag evaluation and load: memsnap-flags-bench"
"$bin/memsnap-flags-bench" --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true \
    --benchmark_out_format=json --benchmark_out="$out/flags.json" >> "$out/log" 2>&1
"$root/tools/bench/flags_ratios.py" "$out/flags.json" > "$out/flags.md"

step "snapshot writer against write(): snapshot_writer_bench"
"$bin/snapshot_writer_bench" "${MEMSNAP_BENCH_DIR:-/var/tmp}" 1024 7 > "$out/snapshot_writer.txt" 2>&1

step "copy against handover pauses through memsnapd: memsnap-handover-bench"
"$bin/memsnap-handover-bench" --out "$out/handover.json" >> "$out/log" 2>&1
"$root/tools/bench/handover_ratios.py" "$out/handover.json" > "$out/handover.md"

if [[ "$qemu" == 1 ]]; then
  step "QEMU microVM: qemu_bench.py"
  "$root/tools/bench/qemu_bench.py" --reps "$reps" --out "$out/qemu.json" > "$out/qemu.md"
fi
step "done"
echo "results in $out: export.md resume.md flags.md snapshot_writer.txt handover.md$([[ $qemu == 1 ]] && echo " qemu.md")" >&2
