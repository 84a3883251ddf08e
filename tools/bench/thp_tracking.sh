#!/usr/bin/env bash
# What write tracking costs a THP guest on a warm resume, and what it saves on the next pause:
# memsnap cycle with a memfd guest, 2 MiB or 4 KiB pages, tracking on or off, REPS times each.
# Prints a table of medians; raw JSON goes to OUT. Sets shmem THP to "advise" for its duration
# (root only) and puts the old value back. About 4 minutes with the defaults.
#   bash tools/bench/thp_tracking.sh [OUT]      (SIZE=1G REPS=3)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-$(mktemp -d /var/tmp/memsnap-thp-XXXXXX)}
size=${SIZE:-1G}
reps=${REPS:-3}
memsnap=${MEMSNAP:-build/release/bin/memsnap}
knob=/sys/kernel/mm/transparent_hugepage/shmem_enabled
old=$(sed -e 's/.*\[\(.*\)\].*/\1/' "$knob")
trap 'echo "$old" > "$knob"' EXIT
echo advise > "$knob"
mkdir -p "$out"
for rep in $(seq 1 "$reps"); do
  for pages in thp 4k; do
    for tracking in on off; do
      args=(cycle --strategy memfd --size "$size" --generations 2 --no-sync --json)
      [[ $pages == thp ]] && args+=(--thp)
      [[ $tracking == off ]] && args+=(--no-track-writes)
      "$memsnap" "${args[@]}" > "$out/$pages-tracking-$tracking-$rep.json" 2> /dev/null
      echo "ran $pages tracking=$tracking rep $rep" >&2
    done
  done
done
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
print("| guest pages | write tracking | MiB in 2 MiB pages after the resume | touching the guest after the resume (s) | next pause, 10% dirty (s) | mismatches |")
print("|---|---|---|---|---|---|")
for pages in ("thp", "4k"):
    for tracking in ("on", "off"):
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{pages}-tracking-{tracking}-*.json"))]
        gens = [g for r in runs for g in r["generations"]]
        huge = [g["huge_bytes"] >> 20 for g in gens]
        touch = statistics.median(g["verify_seconds"] for g in gens)
        diff = statistics.median(r["generations"][1]["pause"]["wall_seconds"] for r in runs)
        bad = sum(r["mismatches"] for r in runs)
        print(f"| {pages} | {tracking} | {min(huge)}-{max(huge)} | {touch:.2f} | {diff:.2f} | {bad} |")
PY
echo "raw: $out" >&2
