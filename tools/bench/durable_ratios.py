#!/usr/bin/env python3
"""The durable-pause table of docs/performance.md (issue 18 part 4) from memsnap-bench's JSON.

usage: memsnap-bench --benchmark_filter=Durable --benchmark_repetitions=3 \
           --benchmark_enable_random_interleaving=true \
           --benchmark_out=durable.json --benchmark_out_format=json
       tools/bench/durable_ratios.py durable.json

Medians over the repetitions. The reference is the fastest durable write of the run (write() +
fsync or O_DIRECT + fsync, any chunk size): every wall-clock ratio is reference time / time
(1.0 = as fast as the reference), every CPU ratio CPU / the reference's CPU, both within one run.
"""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    wall = defaultdict(list)
    cpu = defaultdict(list)
    label = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        if "Durable" not in b["run_name"]:
            continue
        unit = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9}[b["time_unit"]]
        wall[b["run_name"]].append(b["real_time"] * unit)
        cpu[b["run_name"]].append(b["cpu_s_per_gib"])
        label[b["run_name"]] = b.get("label", "")
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    refs = [k for k in med if "WriteReference" in k]
    if not refs:
        sys.exit("no BM_DurableWriteReference in " + path)
    best = min(refs, key=lambda k: med[k])
    ctx = data.get("context", {})
    reps = max(len(v) for v in wall.values())
    print(f"{ctx.get('date', '?')}, {ctx.get('num_cpus', '?')} CPUs, medians of {reps}; "
          f"reference: {label[best]} ({med[best]:.2f} s, {med_cpu[best]:.3f} CPU-s/GiB)\n")
    print("| what | wall s | wall ratio to reference | CPU-s per GiB | CPU / reference's |")
    print("|---|---|---|---|---|")
    for k in sorted(med, key=lambda k: ("Pause" in k, label[k])):
        print(f"| {label[k]} | {med[k]:.2f} | {med[best] / med[k]:.2f}x | {med_cpu[k]:.3f} | "
              f"{med_cpu[k] / med_cpu[best]:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
