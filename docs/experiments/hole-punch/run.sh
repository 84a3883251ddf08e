#!/usr/bin/env bash
# The seed's question, with data: does progressive hole punching slow pause and resume, and how
# much host memory does it save? memfd (baseline) against hole_punch, same stand-in sandboxes
# (memfd-backed guest memory), through memsnapd and the flag split, per guest size and dirty
# fraction. Writes results-<size>-<dirty>.json and its report (.md, .json, .svg) here.
#   bash docs/experiments/hole-punch/run.sh                 # 256M and 1G, dirty 1% 10% 100%
#   SIZES="4G" DIRTIES="0.1" bash docs/experiments/hole-punch/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${MEMSNAP_BIN:-$here/../../../build/release/bin/memsnap}"
sizes="${SIZES:-256M 1G}"
dirties="${DIRTIES:-0.01 0.1 1.0}"
sandboxes="${SANDBOXES:-6}"
cycles="${CYCLES:-3}"
for size in $sizes; do
  for dirty in $dirties; do
    out="$here/results-$size-$dirty.json"
    echo "== $size, dirty $dirty" >&2
    "$bin" experiment run --arms memfd=1,hole_punch=1 --sandboxes "$sandboxes" --cycles "$cycles" \
        --size "$size" --dirty "$dirty" --out "$out"
    "$bin" experiment report "$out" --baseline memfd --out "$here/report-$size-$dirty" > /dev/null
  done
done
