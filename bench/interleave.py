#!/usr/bin/env python3
"""Wall time of commands run in turn, A B C A B C ..., for comparing two builds of Cove (or Cove
and a peer) on this noisy machine: a slow patch hurts every command alike, where runs of one
command after the other (hyperfine's way) let the machine's drift decide.

    bench/interleave.py N 'CMD A' 'CMD B' ...

Each command runs N times (after 5 unmeasured turns), its stdout to /dev/null; a command that
exits non-zero stops the run. Prints each command's median, quartiles and median relative to
the last command's.
"""
import os
import shlex
import statistics
import sys
import time


def main():
    n = int(sys.argv[1])
    cmds = [shlex.split(c) for c in sys.argv[2:]]
    devnull = os.open(os.devnull, os.O_WRONLY)
    times = [[] for _ in cmds]
    for turn in range(n + 5):
        for i, cmd in enumerate(cmds):
            t0 = time.perf_counter_ns()
            pid = os.posix_spawnp(cmd[0], cmd, os.environ,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1)])
            _, status = os.waitpid(pid, 0)
            t1 = time.perf_counter_ns()
            if status != 0:
                sys.exit(f"{shlex.join(cmd)}: wait status {status}")
            if turn >= 5:
                times[i].append((t1 - t0) / 1e6)
    last = statistics.median(times[-1])
    for cmd, t in zip(sys.argv[2:], times):
        q1, _, q3 = statistics.quantiles(t, n=4)
        print(f"{statistics.median(t):7.3f} ms  (q1 {q1:.3f}, q3 {q3:.3f})  "
              f"x{statistics.median(t) / last:.3f}  {cmd}")


if __name__ == "__main__":
    main()
