#!/usr/bin/env bash
# The seed's question, with data: does progressive hole punching slow pause and resume, and how
# much host memory does it save? memfd (baseline) against hole_punch, same stand-in sandboxes
# (memfd-backed guest memory), through memsnapd and the flag split, per guest size and dirty
# fraction. Writes results-<size>-<dirty>[-thp].json and its report (.md, .json, .svg) here.
#   bash docs/experiments/hole-punch/run.sh                 # 256M and 1G, dirty 1% 10% 100%
#   SIZES=4G SANDBOXES=4 CYCLES=3 bash docs/experiments/hole-punch/run.sh
#   SIZES=1G DIRTIES=1.0 CYCLES=1 WARMUP=0 THP=1 bash docs/experiments/hole-punch/run.sh
# SEED (default 5) names the sandboxes exp-SEED-1..N; the flag's 1:1 fractional split buckets them
# by that name. Seed 5 puts 2 of the first 4 and 4 of the first 8 in each arm (found with
# `memsnap flags eval`, before any run); seed 1 gives 6:2 with 8. The report still checks the ratio.
# THP=1: the stand-ins ask for 2 MiB transparent huge pages. A memfd gets them only when
# /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it; run as root, this script sets it
# to "advise" (only mappings that ask are affected) for the run and puts the old value back.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${MEMSNAP_BIN:-$here/../../../build/release/bin/memsnap}"
sizes="${SIZES:-256M 1G}"
dirties="${DIRTIES:-0.01 0.1 1.0}"
sandboxes="${SANDBOXES:-8}"
cycles="${CYCLES:-4}"
seed="${SEED:-5}"
warmup="${WARMUP:-1}"  # cycles the report leaves out (the first pause is a full export)
thp_args=() suffix=""
if [[ "${THP:-0}" == 1 ]]; then
  thp_args=(--thp) suffix="-thp"
  knob=/sys/kernel/mm/transparent_hugepage/shmem_enabled
  old="$(sed -E 's/.*\[([a-z_]+)\].*/\1/' "$knob")"
  if [[ "$old" == never || "$old" == deny ]]; then
    if [[ -w "$knob" ]]; then
      echo advise > "$knob"
      trap 'echo "$old" > "$knob"' EXIT
    else
      echo "shmem_enabled is $old: memfd guests will get no huge pages (run as root)" >&2
    fi
  fi
fi
cd "$here"  # results and reports name each other relative to this directory
for size in $sizes; do
  for dirty in $dirties; do
    out="results-$size-$dirty$suffix.json"
    echo "== $size, dirty $dirty${suffix:+, THP}" >&2
    "$bin" experiment run --arms memfd=1,hole_punch=1 --sandboxes "$sandboxes" --cycles "$cycles" \
        --seed "$seed" --size "$size" --dirty "$dirty" "${thp_args[@]}" --out "$out"
    "$bin" experiment report "$out" --baseline memfd --warmup "$warmup" \
        --out "report-$size-$dirty$suffix" > /dev/null
  done
done
