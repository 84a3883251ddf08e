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
    thread_cpu = defaultdict(list)  # run_name -> [cpu_time of the benchmark's thread in ms]
    counters = defaultdict(list)  # (run_name, counter) -> [value]
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6}[b["time_unit"]]
        times[b["run_name"]].append(b["real_time"] * unit)
        thread_cpu[b["run_name"]].append(b["cpu_time"] * unit)
        if "us_per_page" in b:
            counters[(b["run_name"], "us_per_page")].append(b["us_per_page"])
        if "cpu_s_per_pause" in b:
            cpu[b["run_name"]].append(b["cpu_s_per_pause"] * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = {k: len(v) for k, v in times.items()}
    gib = 1 << 30
    size = None
    ctx = data.get("context", {})
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, "
          f"{ctx.get('date', '?')}; medians of {max(n.values()) if n else 0} repetitions\n")

    # The reference is the best way this machine writes the same bytes into a new file, in this
    # run: the fastest of the write() variants (chunk sizes, preallocated or not; with fsync the
    # fastest write+fsync).
    refs = {}  # (chunk KiB, mode) -> ms; mode 0 plain, 1 fsync, 2 fallocate first
    for k, v in med.items():
        parts = k.split("/")
        if parts[0] == "BM_WriteReference" and len(parts) >= 3:
            refs[(int(parts[1]), int(parts[2]))] = v

    def ref(sync):
        times = [t for (chunk, mode), t in refs.items() if (mode == 1) == bool(sync)]
        return min(times) if times else None

    memcpy = med.get("BM_Memcpy/iterations:5/real_time")
    print("| reference | fsync | median ms | GiB/s |")
    print("|---|---|---|---|")
    if memcpy:
        print(f"| memcpy | - | {memcpy:.1f} | {1000 / memcpy:.2f} |")
    labels = {0: "new file", 1: "new file", 2: "new file, fallocate first"}
    for (chunk, mode), t in sorted(refs.items()):
        best = " (**best: the reference**)" if t == ref(mode == 1) else ""
        print(f"| write() in {chunk} KiB calls, {labels[mode]}{best} | {'yes' if mode == 1 else 'no'} | "
              f"{t:.1f} | {1000 / t:.2f} |")
    names = ["write() from a long-lived filled mapping of the memfd", "sendfile() from the memfd",
             "splice() from the memfd through a pipe", "pread() of the memfd + write() (two copies)",
             "write() from a fresh mapping of the memfd, populated in bulk"]
    for method, name in enumerate(names):
        t = med.get(f"BM_MemfdToFile/{method}/iterations:5/real_time")
        if t:
            print(f"| {name}, 1 MiB calls, new file | no | {t:.1f} | {1000 / t:.2f} |")
    print()
    print("| single copy out of a memfd (1 MiB calls, new file, no fsync) | median ms | "
          "vs pread + write | CPU ms of the thread |")
    print("|---|---|---|---|")
    two_copy = med.get("BM_MemfdToFile/3/iterations:5/real_time")
    for method, name in enumerate(names):
        key = f"BM_MemfdToFile/{method}/iterations:5/real_time"
        if key in med:
            print(f"| {name} | {med[key]:.1f} | {fmt_x(two_copy, med[key])} | "
                  f"{statistics.median(thread_cpu[key]):.1f} |")
    for bulk, label in ((0, "a fault a page"), (1, "MADV_POPULATE_READ")):
        v = counters.get((f"BM_PopulateMapping/{bulk}/iterations:3/real_time", "us_per_page"))
        if v:
            print(f"| filling a fresh mapping's page tables, {label}: "
                  f"{statistics.median(v):.2f} us a page | | | |")
    print()
    print("| benchmark | dirty | fsync | median ms | GiB/s | vs best write() | vs memcpy | CPU ms/pause |")
    print("|---|---|---|---|---|---|---|---|")
    full = {}
    for strategy in ("process_vm_readv", "memfd", "memfd_mmap", "memfd_mmap_unpopulated",
                     "hole_punch"):
        for sync in (0, 1):
            for pct in (100, 10):
                key = f"BM_Pause_{strategy}/{pct}/{sync}/iterations:5/real_time"
                if key not in med:
                    key = key.replace("iterations:5", "iterations:2")
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
    print("| hole_punch, 100% dirty, no fsync: data per make_durable + punch | read method | "
          "median ms | vs best write() | punch cost a page (vs memfd pread, same run) |")
    print("|---|---|---|---|---|")
    memfd_full = med.get("BM_Pause_memfd/100/0/iterations:5/real_time")
    pages = (1 << 30) / 4096
    for mib in (2, 16, 64):
        for method, label in ((0, "pread"), (1, "mmap")):
            t = med.get(f"BM_Pause_hole_punch_chunk/{mib}/{method}/iterations:3/real_time")
            if t:
                per_page = (t - memfd_full) * 1000 / pages if memfd_full else float("nan")
                print(f"| {mib} MiB | {label} | {t:.1f} | {fmt_x(ref(0), t)} | {per_page:.2f} us |")
    ten_hp = med.get("BM_Pause_hole_punch/10/0/iterations:5/real_time")
    ten_memfd = med.get("BM_Pause_memfd/10/0/iterations:5/real_time")
    if ten_hp and ten_memfd:
        print(f"| 10% scattered 4 KiB pages (26,214 punches) | pread | {ten_hp:.1f} | - | "
              f"{(ten_hp - ten_memfd) * 1000 / (pages / 10):.2f} us |")
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
