#!/usr/bin/env python3
"""Turns memsnap-flags-bench's JSON output into the table of docs/performance.md.

usage: tools/bench/flags_ratios.py flags.json

Medians over the run's repetitions; each evaluation is compared with the map lookup of the same
run, each load of 1,000 flags with the bare parse of the same text by the same library.
"""
import json
import statistics
import sys
from collections import defaultdict

ROWS = [
    ("static flag", "BM_Eval_Static", "BM_Reference_MapLookup"),
    ("3-way `fractional` on a sandbox context (target < 1 us)", "BM_Eval_Fractional3Way",
     "BM_Reference_MapLookup"),
    ("`sem_ver` + `in` targeting rule", "BM_Eval_SemVerIn", "BM_Reference_MapLookup"),
    ("load 1,000 flags, JSON (target < 50 ms)", "BM_Load1000Flags_Json",
     "BM_Reference_JsonParse1000"),
    ("load 1,000 flags, YAML", "BM_Load1000Flags_Yaml", "BM_Reference_YamlParse1000"),
]
UNIT_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def human(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.1f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.1f} ns"


def main(path):
    with open(path) as f:
        data = json.load(f)
    times = defaultdict(list)
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" or b.get("error_occurred"):
            continue
        times[b["run_name"]].append(b["real_time"] * UNIT_NS[b["time_unit"]])
    med = {name: statistics.median(v) for name, v in times.items()}
    print("| what | median | reference (same run) | ratio |")
    print("|---|---|---|---|")
    for label, name, ref in ROWS:
        if name not in med or ref not in med:
            continue
        print(f"| {label} | {human(med[name])} | {ref.removeprefix('BM_Reference_')}, "
              f"{human(med[ref])} | {med[name] / med[ref]:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
