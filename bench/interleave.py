#!/usr/bin/env python3
"""Wall time of commands run in turn, for comparing two builds of Cove (or Cove and a peer) on
this noisy machine: a slow patch hurts every command alike, where runs of one command after the
other (hyperfine's way) let the machine's drift decide. Each turn runs every command once, in
an order shuffled anew (seeded, so a run can be repeated): a command that leaves work to the
kernel after it exits (a namespace's or a cgroup's teardown) slows whichever runs next, and a
fixed order would always hand that cost to the same neighbour.

    bench/interleave.py [--json FILE] N 'CMD A' 'CMD B' ...

Each command runs N times (after 5 unmeasured turns), its stdout to /dev/null; a command that
exits non-zero stops the run. Prints each command's median, quartiles and median relative to
the last command's; with --json, also writes every time (seconds) to FILE, as
{"CMD A": [...], ...}.
"""
import json
import os
import random
import shlex
import statistics
import sys
import time


def main():
    args = sys.argv[1:]
    json_out = None
    if args[0] == "--json":
        json_out, args = args[1], args[2:]
    n = int(args[0])
    names = args[1:]
    cmds = [shlex.split(c) for c in names]
    devnull = os.open(os.devnull, os.O_WRONLY)
    times = [[] for _ in cmds]
    order = random.Random(0)
    for turn in range(n + 5):
        turn_order = list(range(len(cmds)))
        order.shuffle(turn_order)
        for i in turn_order:
            cmd = cmds[i]
            t0 = time.perf_counter_ns()
            pid = os.posix_spawnp(cmd[0], cmd, os.environ,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
            _, status = os.waitpid(pid, 0)
            t1 = time.perf_counter_ns()
            if status != 0:
                sys.exit(f"{shlex.join(cmd)}: wait status {status}")
            if turn >= 5:
                times[i].append((t1 - t0) / 1e6)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({c: [ms / 1000 for ms in t] for c, t in zip(names, times)}, f)
    last = statistics.median(times[-1])
    for cmd, t in zip(names, times):
        q1, _, q3 = statistics.quantiles(t, n=4)
        print(f"{statistics.median(t):7.3f} ms  (q1 {q1:.3f}, q3 {q3:.3f})  "
              f"x{statistics.median(t) / last:.3f}  {cmd}")


if __name__ == "__main__":
    main()
