#!/usr/bin/env python3
"""Turns memsnap-resume-bench's JSON output into the resume tables of docs/performance.md.

usage: memsnap-resume-bench --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true \
           --benchmark_out=resume.json --benchmark_out_format=json
       tools/bench/resume_ratios.py resume.json

Every figure is a median over the run's repetitions; every ratio compares two benchmarks of the
same run and the same CPU placement (FaultServer / raw handler), which is what stays meaningful
on a noisy machine.
"""
import json
import statistics
import sys
from collections import defaultdict

OVERHEAD_TARGET = 1.20  # the framework may add at most 20% to the raw ioctl cost
WARM_TARGET_MS = 1.0


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = defaultdict(list)  # run_name without the /iterations:N/manual_time suffix -> [bench]
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        name = b["run_name"].split("/iterations:")[0]
        runs[name].append(b)
    return data, runs


def med(runs, name, key):
    vals = [b[key] for b in runs.get(name, []) if key in b]
    return statistics.median(vals) if vals else None


def ms(b):
    return b["real_time"] * {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b["time_unit"]]


def med_ms(runs, name):
    vals = [ms(b) for b in runs.get(name, [])]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def fault_section(runs):
    print("| path | placement | median us/fault | raw reference us/fault | FaultServer / raw "
          f"(target <= {OVERHEAD_TARGET:.2f}) |")
    print("|---|---|---|---|---|")
    pairs = (("UFFDIO_COPY, lazy (anonymous, MISSING)", "BM_Fault_RawCopy", "BM_Fault_ServerLazy"),
             ("UFFDIO_CONTINUE, background after the fill (memfd, MINOR)", "BM_Fault_RawContinue",
              "BM_Fault_ServerContinue"))
    verdicts = []
    for label, raw, srv in pairs:
        for place in ("same_cpu", "other_cpu"):
            r = med(runs, f"{raw}/{place}", "us_per_fault")
            s = med(runs, f"{srv}/{place}", "us_per_fault")
            ratio = s / r if r and s else None
            print(f"| raw handler: {label} | {place.replace('_', ' ')} | {fmt(r)} | {fmt(r)} | 1.00 |")
            ok = ratio is not None and ratio <= OVERHEAD_TARGET
            print(f"| **memsnap FaultServer**: {label} | {place.replace('_', ' ')} | {fmt(s)} | "
                  f"{fmt(r)} | {fmt(ratio, '.3f')} ({'met' if ok else 'MISSED'}) |")
            verdicts.append((label, place, ratio, ok))
    for kind in ("read", "write"):
        f = med(runs, f"BM_FirstTouch/{kind}", "us_per_fault")
        if f is not None:
            print(f"| floor: first {kind} of fresh anonymous memory, no userfaultfd | - | "
                  f"{fmt(f)} | - | - |")
    # Per-repetition ratios show the spread.
    print()
    print("| FaultServer / raw, by repetition index | same cpu | other cpu |")
    print("|---|---|---|")
    for label, raw, srv in pairs:
        cells = []
        for place in ("same_cpu", "other_cpu"):
            rs = [b["us_per_fault"] for b in runs.get(f"{raw}/{place}", [])]
            ss = [b["us_per_fault"] for b in runs.get(f"{srv}/{place}", [])]
            cells.append(", ".join(f"{s / r:.2f}" for r, s in zip(rs, ss)) or "-")
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    return verdicts


def paired_section(runs):
    """BM_FaultPaired_*: raw handler and FaultServer measured back to back in every iteration."""
    rows = []
    for label, name in (("UFFDIO_COPY, lazy", "BM_FaultPaired_Copy"),
                        ("UFFDIO_CONTINUE, background after the fill", "BM_FaultPaired_Continue")):
        for place in ("same_cpu", "other_cpu"):
            key = f"{name}/{place}"
            if key not in runs:
                continue
            rows.append((label, place, med(runs, key, "raw_us_per_fault"),
                         med(runs, key, "server_us_per_fault"), med(runs, key, "server_over_raw"),
                         [b["server_over_raw"] for b in runs[key]]))
    if not rows:
        return []
    print()
    print("| paired (raw and FaultServer back to back each iteration) | placement | raw us/fault | "
          f"FaultServer us/fault | FaultServer / raw, median (target <= {OVERHEAD_TARGET:.2f}) | "
          "per repetition |")
    print("|---|---|---|---|---|---|")
    verdicts = []
    for label, place, r, s, ratio, reps in rows:
        ok = ratio is not None and ratio <= OVERHEAD_TARGET
        print(f"| {label} | {place.replace('_', ' ')} | {fmt(r)} | {fmt(s)} | "
              f"{fmt(ratio, '.3f')} ({'met' if ok else 'MISSED'}) | "
              f"{', '.join(f'{x:.2f}' for x in reps)} |")
        verdicts.append((label + " (paired)", place, ratio, ok))
    return verdicts


def resume_section(runs):
    print()
    print("| mode | write tracking | ready (median ms) | hand_over ms | fill ms | serve ms | "
          "until every page touched (verify) ms | faults served |")
    print("|---|---|---|---|---|---|---|---|")
    rows = (("lazy (anonymous guest)", "BM_Resume/lazy", "on"),
            ("background (memfd)", "BM_Resume/background", "on"),
            ("eager (memfd)", "BM_Resume/eager", "on"),
            ("warm (memfd)", "BM_Resume/warm", "on"),
            ("warm (memfd)", "BM_Resume/warm_no_tracking", "off"))
    warm = {}
    for label, name, track in rows:
        ready = med_ms(runs, name)
        if ready is None:
            continue
        if name.startswith("BM_Resume/warm"):
            warm[track] = ready
        print(f"| {label} | {track} | {fmt(ready, '.3f')} | "
              f"{fmt(med(runs, name, 'hand_over_ms'), '.3f')} | "
              f"{fmt(med(runs, name, 'fill_ms'), '.1f')} | "
              f"{fmt(med(runs, name, 'serve_ms'), '.3f')} | "
              f"{fmt(med(runs, name, 'touch_all_ms'), '.0f')} | "
              f"{fmt(med(runs, name, 'faults'), '.0f')} |")
    print()
    print("| the stand-in's work before its warm ack (in-process, 1 GiB) | total ms | mmap ms | "
          "UFFDIO_REGISTER WP ms | UFFDIO_WRITEPROTECT ms |")
    print("|---|---|---|---|---|")
    for name, label in (("BM_WarmArm/track_writes", "with write tracking"),
                        ("BM_WarmArm/no_tracking", "without write tracking")):
        t = med_ms(runs, name)
        if t is None:
            continue
        print(f"| {label} | {t:.3f} | {fmt(med(runs, name, 'mmap_ms'), '.3f')} | "
              f"{fmt(med(runs, name, 'register_ms'), '.3f')} | "
              f"{fmt(med(runs, name, 'writeprotect_ms'), '.3f')} |")
    return warm


def main(path):
    data, runs = load(path)
    ctx = data.get("context", {})
    n = max((len(v) for v in runs.values()), default=0)
    print(f"host: {ctx.get('host_name', '?')}, {ctx.get('num_cpus', '?')} CPUs, "
          f"{ctx.get('date', '?')}; medians of {n} repetitions\n")
    verdicts = fault_section(runs)
    verdicts += paired_section(runs)
    warm = resume_section(runs)
    start = med_ms(runs, "BM_ServerStart")
    if start is not None:
        print()
        print(f"FaultServer::start on the 1 GiB chain: {start:.3f} ms (median); "
              f"SnapshotChain::flatten alone: {fmt(med(runs, 'BM_ServerStart', 'flatten_ms'), '.3f')} ms "
              f"for {fmt(med(runs, 'BM_ServerStart', 'extents'), '.0f')} extents")
    print()
    print("| target | result |")
    print("|---|---|")
    for label, place, ratio, ok in verdicts:
        print(f"| FaultServer <= {OVERHEAD_TARGET:.2f}x raw: {label}, {place.replace('_', ' ')} | "
              f"{fmt(ratio, '.3f')}x: {'met' if ok else 'missed'} |")
    for track, ready in sorted(warm.items()):
        print(f"| warm 1 GiB resume < {WARM_TARGET_MS:g} ms, write tracking {track} | "
              f"{ready:.3f} ms: {'met' if ready < WARM_TARGET_MS else 'missed'} |")


if __name__ == "__main__":
    main(sys.argv[1])
