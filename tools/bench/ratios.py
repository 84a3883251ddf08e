#!/usr/bin/env python3
"""Turns memsnap-bench's JSON output into the ratio table of docs/performance.md.

usage: memsnap-bench --benchmark_format=json [...] > bench.json
       tools/bench/ratios.py bench.json

Every figure is a median over the run's repetitions, and every ratio compares two benchmarks of
the same run (same machine, same minute), which is what stays meaningful on a noisy machine.
"""
import json
import statistics
import sys
from collections import defaultdict


def fmt_x(num, den):
    return f"{num / den:.2f}x" if num and den else "-"


def main(path):
    with open(path) as f:
        data = json.load(f)
    times = defaultdict(list)  # run_name -> [real_time in ms]
    cpu = defaultdict(list)
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6}[b["time_unit"]]
        times[b["run_name"]].append(b["real_time"] * unit)
        if "cpu_s_per_pause" in b:
            cpu[b["run_name"]].append(b["cpu_s_per_pause"] * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = {k: len(v) for k, v in times.items()}
    gib = 1 << 30
    size = None
    ctx = data.get("context", {})
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, "
          f"{ctx.get('date', '?')}; medians of {max(n.values()) if n else 0} repetitions\n")

    def ref(sync):
        return med.get(f"BM_WriteReference/{sync}/iterations:5/real_time")

    memcpy = med.get("BM_Memcpy/iterations:5/real_time")
    print("| benchmark | dirty | fsync | median ms | GiB/s | vs write() ref | vs memcpy | CPU ms/pause |")
    print("|---|---|---|---|---|---|---|---|")
    if memcpy:
        print(f"| memcpy (reference) | 100% | - | {memcpy:.1f} | {1000 / memcpy:.2f} | - | 1.00x | - |")
    for sync in (0, 1):
        r = ref(sync)
        if r:
            print(f"| write() (reference) | 100% | {'yes' if sync else 'no'} | {r:.1f} | "
                  f"{1000 / r:.2f} | 1.00x | {fmt_x(memcpy, r)} | - |")
    pre = med.get("BM_WriteReference/2/iterations:5/real_time")
    if pre and ref(0):
        print(f"| write() into a preallocated file (reference) | 100% | no | {pre:.1f} | "
              f"{1000 / pre:.2f} | {ref(0) / pre:.2f}x | {fmt_x(memcpy, pre)} | - |")
    full = {}
    for strategy in ("process_vm_readv", "memfd", "memfd_mmap", "hole_punch"):
        for sync in (0, 1):
            for pct in (100, 10):
                key = f"BM_Pause_{strategy}/{pct}/{sync}/iterations:5/real_time"
                if key not in med:
                    continue
                t = med[key]
                gbytes = pct / 100.0  # the guest is MEMSNAP_BENCH_GIB (1 GiB by default)
                r = ref(sync)
                speed = gbytes * 1000 / t
                vs_ref = (r / (t / gbytes)) if r else float("nan")
                c = statistics.median(cpu[key]) if cpu.get(key) else float("nan")
                if pct == 100:
                    full[(strategy, sync)] = t
                print(f"| {strategy} | {pct}% | {'yes' if sync else 'no'} | {t:.1f} | {speed:.2f} | "
                      f"{vs_ref:.2f}x | {fmt_x(memcpy, t / gbytes)} | {c:.1f} |")
    print()
    print("| strategy | fsync | 10% dirty time / full export time (target <= 0.15) |")
    print("|---|---|---|")
    for strategy in ("process_vm_readv", "memfd", "memfd_mmap", "hole_punch"):
        for sync in (0, 1):
            ten = med.get(f"BM_Pause_{strategy}/10/{sync}/iterations:5/real_time")
            if ten and (strategy, sync) in full:
                print(f"| {strategy} | {'yes' if sync else 'no'} | {ten / full[(strategy, sync)]:.3f} |")
    print()
    print("| strategy | 10% dirty in 64 KiB runs, no fsync: ms | / full export time | "
          "random 4 KiB pages / 64 KiB runs |")
    print("|---|---|---|---|")
    for strategy in ("process_vm_readv", "memfd", "hole_punch"):
        runs = med.get(f"BM_PauseClustered_{strategy}/10/16/iterations:5/real_time")
        ten = med.get(f"BM_Pause_{strategy}/10/0/iterations:5/real_time")
        if runs and (strategy, 0) in full:
            print(f"| {strategy} | {runs:.1f} | {runs / full[(strategy, 0)]:.3f} | "
                  f"{fmt_x(ten, runs)} |")
    print()
    print("| framework overhead | median |")
    print("|---|---|")
    for key, label in (("BM_EmptyDiffPause/0/iterations:200/real_time", "pause of an empty diff, no fsync"),
                       ("BM_EmptyDiffPause/1/iterations:200/real_time", "pause of an empty diff, fsync + rename + dir fsync"),
                       ("BM_CommitReference/iterations:200/real_time", "reference: write 4 KiB + fsync + rename + dir fsync, no memsnap"),
                       ("BM_LoadPlugins/iterations:50/real_time", "load the plugin directory (3 plugins) + create one strategy")):
        if key in med:
            print(f"| {label} | {med[key]:.3f} ms |")


if __name__ == "__main__":
    main(sys.argv[1])
