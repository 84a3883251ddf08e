#!/usr/bin/env python3
"""The "Handover pauses" tables of docs/performance.md (issue 19) from memsnap-handover-bench's JSON.

usage: build/release/bin/memsnap-handover-bench --out handover.json
       tools/bench/handover_ratios.py handover.json

Quantiles are nearest-rank over the rounds of the run (with 10 or fewer rounds, p99 is the
largest). Durable ratios divide medians of the same run; "speed vs reference" is reference time /
time as elsewhere in docs/performance.md (1.00x = as fast as the machine's best durable write of
the same bytes in this run, lower = slower). CPU per GiB divides by the bytes exported.
"""
import json
import math
import statistics
import sys
from collections import defaultdict

GIB = float(1 << 30)


def q(values, p):
    v = sorted(values)
    return v[max(0, math.ceil(p * len(v)) - 1)]


def verdict(ok):
    return "met" if ok else "**missed**"


def main(path):
    with open(path) as f:
        data = json.load(f)
    ctx = data["context"]
    runs = data["runs"]
    by = defaultdict(list)  # (size, kind) -> runs; refs as ("ref", way)
    sizes = []
    for r in runs:
        if r["size"] not in sizes:
            sizes.append(r["size"])
        key = (r["size"], r["kind"] if r["kind"] != "ref" else "ref:" + r["way"])
        by[key].append(r)
    name = {r["size"]: r["size_name"] for r in runs}
    loads = [float(r["load"].split()[0]) for r in runs]
    print(f"{ctx['date']}, {ctx['cpus']} CPUs, kernel {ctx['kernel']}, strategy {ctx['strategy']}, "
          f"sync on; load average {ctx['load_start']} at the start, "
          f"{ctx.get('load_end', '?')} at the end, 1-min load {min(loads):.2f}-{max(loads):.2f} "
          f"over the operations\n")

    def get(size, kind, field):
        return [r[field] for r in by[(size, kind)] if field in r]

    print("### The answer the caller waits for\n")
    print("| guest | mode | rounds | client wall p50 | client wall p99 | server handover_seconds p50 "
          "| server p99 | GET of the sandbox, p50 (the API's floor) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sizes:
        for m in ("copy", "handover"):
            c = get(s, m, "client_answer_s")
            h = get(s, m, "handover_s")
            g = get(s, m, "client_get_s")
            if not c:
                continue
            fmt = (lambda x: f"{x * 1e3:.2f} ms") if m == "handover" else (lambda x: f"{x:.3f} s")
            print(f"| {name[s]} | {m} | {len(c)} | {fmt(q(c, .5))} | {fmt(q(c, .99))} | "
                  f"{fmt(q(h, .5))} | {fmt(q(h, .99))} | {q(g, .5) * 1e3:.2f} ms |")

    print("\n### Durable: request to committed snapshot\n")
    print("| guest | copy (whole pause) p50 | handover (durable_seconds) p50 | handover / copy "
          "| per-round ratio, median (range) | best write + fsync, same run | copy vs it | "
          "handover vs it |")
    print("|---|---|---|---|---|---|---|---|")
    durable_ratio = {}
    for s in sizes:
        cd = get(s, "copy", "durable_s")
        hd = get(s, "handover", "durable_s")
        if not cd or not hd:
            continue
        pairs = defaultdict(dict)
        for r in by[(s, "copy")] + by[(s, "handover")]:
            pairs[r["rep"]][r["kind"]] = r["durable_s"]
        per = [p["handover"] / p["copy"] for p in pairs.values() if len(p) == 2]
        refs = {k[1]: statistics.median(r["durable_s"] for r in v)
                for k, v in by.items() if k[0] == s and k[1].startswith("ref:")}
        ratio = statistics.median(hd) / statistics.median(cd)
        durable_ratio[s] = ratio
        if refs:
            best = min(refs, key=refs.get)
            label = by[(s, best)][0]["label"]
            ref_s = refs[best]
            ref_txt = f"{ref_s:.3f} s ({label})"
            vs = (f"{ref_s / statistics.median(cd):.2f}x", f"{ref_s / statistics.median(hd):.2f}x")
        else:
            ref_txt, vs = "-", ("-", "-")
        print(f"| {name[s]} | {statistics.median(cd):.3f} s | {statistics.median(hd):.3f} s | "
              f"**{ratio:.3f}x** | {statistics.median(per):.3f}x ({min(per):.3f}-{max(per):.3f}) | "
              f"{ref_txt} | {vs[0]} | {vs[1]} |")

    print("\n### Host CPU seconds per exported GiB (medians)\n")
    print("| guest | copy: pause cpu_seconds | copy: memsnapd process | handover: exporter | "
          "handover: memsnapd process, pause to durable | handover total | memsnapd threads during "
          "the handover answer (ms, not per GiB) | best reference's CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for s in sizes:
        def per_gib(kind, f):
            return [r[f] / (r["bytes"] / GIB) for r in by[(s, kind)] if f in r]
        if not by[(s, "copy")] or not by[(s, "handover")]:
            continue
        c_pause = statistics.median(per_gib("copy", "pause_cpu_s"))
        c_proc = statistics.median(per_gib("copy", "memsnapd_cpu_s"))
        h_exp = statistics.median(per_gib("handover", "export_cpu_s"))
        h_d = statistics.median(per_gib("handover", "memsnapd_cpu_s"))
        h_tot = statistics.median(
            [(r["export_cpu_s"] + r["memsnapd_cpu_s"]) / (r["bytes"] / GIB)
             for r in by[(s, "handover")]])
        h_ans = statistics.median(get(s, "handover", "memsnapd_threads_cpu_answer_s"))
        refs = {k[1]: v for k, v in by.items() if k[0] == s and k[1].startswith("ref:")}
        if refs:
            best = min(refs, key=lambda k: statistics.median(r["durable_s"] for r in refs[k]))
            ref_cpu = f"{statistics.median(r['cpu_s'] / (r['bytes'] / GIB) for r in refs[best]):.3f}"
        else:
            ref_cpu = "-"
        print(f"| {name[s]} | {c_pause:.3f} | {c_proc:.3f} | {h_exp:.3f} | {h_d:.3f} | "
              f"**{h_tot:.3f}** | {h_ans * 1e3:.2f} ms | {ref_cpu} |")

    early_sizes = [s for s in sizes if by[(s, "early")] or by[(s, "early_map")] or by[(s, "late")]]
    if early_sizes:
        print("\n### A resume right after a handover pause (--kinds early,late)\n")
        print("early: resumed as soon as the pause answered, from the memory held for the export, "
              "map_ahead off; early_map: the same with map_ahead (the default); late: resumed "
              "once durable, warm. Medians; ratios are to late in the same run (lower is "
              "better).\n")
        print("| guest | kind | rounds | ready_seconds (handshake to runnable) | pause request "
              "to VMM running | pause request to every page read by the guest | the guest's "
              "read of every page | fill | durable_seconds |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in early_sizes:
            for k in ("early", "early_map", "late"):
                if not by[(s, k)]:
                    continue
                med = lambda f: statistics.median(get(s, k, f)) if get(s, k, f) else float("nan")
                print(f"| {name[s]} | {k} | {len(by[(s, k)])} | {med('ready_s') * 1e3:.3f} ms | "
                      f"{med('pause_to_running_s'):.3f} s | {med('pause_to_work_s'):.3f} s | "
                      f"{med('touch_all_s'):.3f} s | {med('fill_s'):.3f} s | "
                      f"{med('durable_s'):.3f} s |")
            for k in ("early", "early_map"):
                if not (by[(s, k)] and by[(s, "late")]):
                    continue
                m = lambda k, f: statistics.median(get(s, k, f))
                print(f"| {name[s]} | {k} / late | | {m(k, 'ready_s') / m('late', 'ready_s'):.2f}x | "
                      f"{m(k, 'pause_to_running_s') / m('late', 'pause_to_running_s'):.2f}x | "
                      f"{m(k, 'pause_to_work_s') / m('late', 'pause_to_work_s'):.2f}x | "
                      f"{m(k, 'touch_all_s') / m('late', 'touch_all_s'):.2f}x | | "
                      f"{m(k, 'durable_s') / m('late', 'durable_s'):.2f}x |")

    print("\n### Issue 19's targets\n")
    print("| target | figure | verdict |")
    print("|---|---|---|")
    hs = [s for s in sizes if get(s, "handover", "handover_s")]
    if len(hs) >= 2:
        lo, hi = min(hs), max(hs)
        for field, what in (("handover_s", "server"), ("client_answer_s", "client")):
            r = q(get(hi, "handover", field), .5) / q(get(lo, "handover", field), .5)
            print(f"| handover p50 {name[hi]} / {name[lo]} <= 1.5 ({what}) | {r:.2f}x | "
                  f"{verdict(r <= 1.5)} |")
    for s in hs:
        for field, what in (("handover_s", "server"), ("client_answer_s", "client")):
            p99 = q(get(s, "handover", field), .99)
            print(f"| handover p99 <= 5 ms, {name[s]} ({what}) | {p99 * 1e3:.2f} ms | "
                  f"{verdict(p99 <= 0.005)} |")
    for s, r in durable_ratio.items():
        print(f"| durable, handover / copy <= 1.1, {name[s]} (medians) | {r:.3f}x | "
              f"{verdict(r <= 1.1)} |")
    for s in early_sizes:
        ready = get(s, "early_map", "ready_s") or get(s, "early", "ready_s")
        if ready:
            p50 = q(ready, .5)
            print(f"| a resume right after handover ready in <= 1 ms, {name[s]} (ready_seconds p50, "
                  f"p99 {q(ready, .99) * 1e3:.3f} ms) | {p50 * 1e3:.3f} ms | {verdict(p50 <= 0.001)} |")


if __name__ == "__main__":
    main(sys.argv[1])
