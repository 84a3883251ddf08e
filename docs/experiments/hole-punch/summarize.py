#!/usr/bin/env python3
"""The study's summary table (README.md) from the committed reports: per configuration, hole_punch
against memfd on the diff pauses (p50 ratio with its 95% interval and Mann-Whitney p), and what
each arm holds while paused. usage: python3 summarize.py [report-*.json ...]"""
import glob
import json
import sys


def cell(c):
    if c is None:
        return "-"
    p50, mw = c["p50"], c["mann_whitney"]
    mark = {"worse": " **slower**", "better": " **faster**"}.get(c["outcome"], "")
    if c["metric"] == "cpu_seconds":
        mark = {"worse": " **more**", "better": " **less**"}.get(c["outcome"], "")
    return (f"{p50['estimate']:.2f}x ({p50['low']:.2f}-{p50['high']:.2f}, "
            f"p={mw['p_adjusted']:.2g}){mark}")


def gib(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def size_key(path):
    name = path.split("report-")[1].rsplit(".json", 1)[0]
    size, _, rest = name.partition("-")
    mult = {"M": 1, "G": 1024}[size[-1]]
    return (rest.endswith("thp"), int(size[:-1]) * mult, float(rest.split("-")[0]))


def main(paths):
    paths = sorted(paths or glob.glob("report-*.json"), key=size_key)
    print("| guest | dirty | diff pauses (hole_punch / memfd) | pause p50 ratio | resume p50 ratio | "
          "CPU p50 ratio | held while paused: memfd / hole_punch | released per pause |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths:
        r = json.load(open(path))
        name = path.split("report-")[1].rsplit(".json", 1)[0]
        size, _, dirty = name.partition("-")
        comp = {c["metric"]: c for c in r["comparisons"]}
        n, p50 = {}, {}
        for a in r["arms"]:
            for metric, st in a["metrics"].items():
                p50[(metric, a["name"])] = st["p50"]["estimate"]
            n[a["name"]] = a["metrics"].get("pause_seconds", {}).get("n", "?")
        held = (f"{gib(p50.get(('held_memory_bytes', 'memfd'), 0))} / "
                f"{gib(p50.get(('held_memory_bytes', 'hole_punch'), 0))}")
        rel = gib(p50.get(("released_bytes", "hole_punch"), 0))
        counts = f"{n.get('hole_punch', '?')} / {n.get('memfd', '?')}"
        print(f"| {size} | {dirty.replace('-thp', ', THP')} | {counts} | "
              f"{cell(comp.get('pause_seconds'))} | {cell(comp.get('resume_seconds'))} | "
              f"{cell(comp.get('cpu_seconds'))} | {held} | {rel} |")


if __name__ == "__main__":
    main(sys.argv[1:])
