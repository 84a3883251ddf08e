#!/usr/bin/env python3
"""Pause and resume of a real QEMU microVM per strategy, next to QEMU's own migration of the
same guest to a file and back (the reference a user would otherwise pick), measured in the same
run; writes the raw results as JSON and prints the table of docs/performance.md.

usage: tools/bench/qemu_bench.py [--memsnap build/release/bin/memsnap] [--reps 3]
                                 [--sizes 256M:64,1G:256] [--sync] [--out results.json]
                                 [--handover]

--handover adds the memfd and hole_punch strategies in pause mode handover (issue 19): the pause
is answered once QEMU is stopped, its device state committed and its RAM memfd held; the
"answered" column is that moment, "pause full"/"pause diff" stay the time until durable.

Like with like: QEMU saves to its file without fsync and unthrottled (max-bandwidth raised, as
`virsh save` does), so memsnap pauses without fsync too unless --sync is given.

Each size is MEMORY:GUEST_MIB (the guest's checked memory). Each repetition runs
`memsnap qemu cycle --reference --json` once per strategy (two generations: a full pause, then a
diff), strategies interleaved so machine noise hits them alike. Figures are medians over the
repetitions; ratios divide medians of the same run.
"""
import argparse
import json
import statistics
import subprocess
import sys

STRATEGIES = [("process_vm_readv", "qemu", "copy"), ("memfd", "memsnap", "copy"),
              ("hole_punch", "memsnap", "copy")]
HANDOVER = [("memfd", "memsnap", "handover"), ("hole_punch", "memsnap", "handover")]


def med(values):
    return statistics.median(values) if values else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--memsnap", default="build/release/bin/memsnap")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="256M:64,1G:256")
    ap.add_argument("--out", default="")
    ap.add_argument("--sync", action="store_true", help="memsnap fsyncs its snapshots")
    ap.add_argument("--handover", action="store_true", help="also pause mode handover")
    ap.add_argument("--table-only", default="", metavar="RESULTS",
                    help="print the table of an earlier --out file; run nothing")
    a = ap.parse_args()
    arms = STRATEGIES + (HANDOVER if a.handover else [])
    if a.table_only:
        with open(a.table_only) as f:
            print_table(json.load(f)["runs"], arms)
        return

    runs = []
    for size_spec in a.sizes.split(","):
        memory, guest_mib = size_spec.split(":")
        for rep in range(a.reps):
            for strategy, ram, mode in arms:
                cmd = [a.memsnap, "qemu", "cycle", "--strategy", strategy, "--ram", ram,
                       "--memory", memory, "--guest-mib", guest_mib, "--generations", "2",
                       "--mode", mode, "--reference", "--json"] + ([] if a.sync else ["--no-sync"])
                print(f"{memory} rep {rep + 1}/{a.reps} {strategy} {mode}", file=sys.stderr,
                      flush=True)
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr, file=sys.stderr)
                    sys.exit(f"failed: {' '.join(cmd)}")
                r = json.loads(p.stdout)
                r["memory"] = memory
                r["rep"] = rep
                r["mode"] = mode
                runs.append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"runs": runs}, f, indent=1)
    print_table(runs, arms)


def print_table(runs, arms):

    print("| guest | strategy (RAM), mode | answered full | pause full | pause diff | resume | "
          "vs QEMU save | vs QEMU load | pause phases (full) | resume phases |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for memory in dict.fromkeys(r["memory"] for r in runs):
        ref_save = med([r["reference"]["save_ms"] for r in runs if r["memory"] == memory])
        ref_load = med([r["reference"]["load_ms"] for r in runs if r["memory"] == memory])
        ref_bytes = med([r["reference"]["bytes"] for r in runs if r["memory"] == memory])
        for strategy, ram, mode in arms:
            rs = [r for r in runs if r["memory"] == memory and r["strategy"] == strategy
                  and r["mode"] == mode]
            if not rs:
                continue
            full = med([r["generations"][0]["pause_ms"] for r in rs])
            answered = med([r["generations"][0]["answered_ms"] for r in rs])
            diff = med([r["generations"][1]["pause_ms"] for r in rs])
            resume = med([g["resume_ms"] for r in rs for g in r["generations"]])
            phases = {}
            for name in rs[0]["generations"][0]["pause_phases_ms"]:
                phases[name] = med([r["generations"][0]["pause_phases_ms"][name] for r in rs])
            rphases = {}
            for name in rs[0]["generations"][0]["resume_phases_ms"]:
                rphases[name] = med([g["resume_phases_ms"][name] for r in rs
                                     for g in r["generations"]])
            resume_mode = rs[0]["generations"][0]["resume_mode"]
            print(f"| {memory} | {strategy} ({ram}), {mode} | {answered:.1f} ms | {full:.0f} ms | "
                  f"{diff:.0f} ms | "
                  f"{resume:.0f} ms ({resume_mode}) | {full / ref_save:.2f}x | {resume / ref_load:.2f}x | "
                  + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + " | "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rphases.items()) + " |")
        print(f"| {memory} | QEMU migrate to a file (reference) | {ref_save:.0f} ms | "
              f"{ref_save:.0f} ms | - | "
              f"{ref_load:.0f} ms | 1.00x | 1.00x | {ref_bytes / 2**20:.0f} MiB written | |")


if __name__ == "__main__":
    main()
