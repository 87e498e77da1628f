#!/usr/bin/env python3
"""Where each tool's start time goes, from kernel trace events (see start-latency.sh).

    phases.py TRACE CMD TOOL...

TRACE is the text of a tracefs instance that recorded sched_process_exec,
sched_process_fork, sys_enter_exit_group and sys_exit_wait4 while a shell ran each TOOL
(the basename of its executable) on the command CMD (a path), one run after another. Each run
is cut into four phases, the same for every tool:

  start and preparation   the tool's execve -> its first fork (the sandbox's clone, network
                          namespace included for both Cove and bubblewrap)
  sandbox set-up          that fork -> the command's execve
  the command             the command's execve -> its exit_group
  the end                 the command's exit_group -> the shell's wait4 for the tool returns

and the medians are printed per tool, side by side.
"""
import re
import statistics
import sys

EVENT = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+):\s+(\w+)[:( ]\s*(.*)$")
PHASES = ["start and preparation", "sandbox set-up", "the command", "the end", "total"]


def runs(lines, cmd, tools):
    """Yields (tool, [phase durations in ms]) for every complete run in the trace."""
    run = None
    for line in lines:
        m = EVENT.match(line)
        if not m:
            continue
        pid, t, name, rest = int(m.group(2)), float(m.group(3)) * 1e3, m.group(4), m.group(5)
        if name == "sched_process_exec":
            path = re.search(r"filename=(\S+)", rest).group(1)
            tool = path.rsplit("/", 1)[-1]
            if tool in tools:
                run = {"tool": tool, "pid": pid, "exec": t}
            elif run is not None and path == cmd and "clone" in run:
                run["cmd_exec"], run["cmd"] = t, pid
        elif run is None:
            continue
        elif name == "sched_process_fork" and "clone" not in run:
            if int(re.search(r" pid=(\d+)", " " + rest).group(1)) == run["pid"]:
                run["clone"] = t
        elif name == "sys_exit_group" and pid == run.get("cmd") and "cmd_exit" not in run:
            run["cmd_exit"] = t
        elif name == "sys_wait4" and "->" in rest and "cmd_exit" in run:
            if int(rest.split("->")[1].strip(), 16) == run["pid"]:
                marks = [run[k] for k in ("exec", "clone", "cmd_exec", "cmd_exit")] + [t]
                spans = [b - a for a, b in zip(marks, marks[1:])]
                yield run["tool"], spans + [t - run["exec"]]
                run = None


def main():
    trace, cmd, tools = sys.argv[1], sys.argv[2], sys.argv[3:]
    got = {tool: [] for tool in tools}
    with open(trace) as f:
        for tool, spans in runs(f, cmd, tools):
            got[tool].append(spans)
    width = max(len(p) for p in PHASES)
    print(f"{'':{width}s}" + "".join(f"{t:>12s}" for t in tools) + "   (medians, ms)")
    for i, phase in enumerate(PHASES):
        cells = []
        for tool in tools:
            values = [spans[i] for spans in got[tool]]
            cells.append(f"{statistics.median(values):12.3f}" if values else f"{'-':>12s}")
        print(f"{phase:{width}s}" + "".join(cells))
    print(f"{'runs':{width}s}" + "".join(f"{len(got[t]):12d}" for t in tools))


if __name__ == "__main__":
    main()
