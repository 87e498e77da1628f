#!/usr/bin/env bash
# Start latency of `cove run -- /bin/true`, side by side in one run with bubblewrap and crun on
# the same busybox rootfs, and the breakdown of where Cove's start time goes. Cove runs it three
# ways: the rootfs directory (`cove`), the host's own /usr (`cove-host`), and the rootfs imported
# as a stored image (`cove-image`: what an image sandbox costs once its layers are cached).
#
#   sudo bench/start-latency.sh            # 200 runs per tool (ROUNDS x RUNS: 5 x 40)
#   ROUNDS=10 RUNS=50 sudo bench/start-latency.sh
#
# Every tool runs once per turn, in an order shuffled each turn (bench/interleave.py), so that a
# slow patch of the machine hurts every tool alike, and the teardown one tool leaves to the
# kernel falls on no tool in particular; medians are over all runs. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "start-latency.sh: run as root" >&2; exit 1; }
ROUNDS="${ROUNDS:-5}"
RUNS="${RUNS:-40}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench}"
OUT="$WORK/results"
scripts/deps.sh bench
COVE=$(scripts/build-release.sh 2>/dev/null)

# The shared rootfs: Debian's static busybox, nothing else; and the same as a stored image.
. bench/lib.sh
ROOTFS="$WORK/rootfs"
rm -rf "$WORK"; mkdir -p "$OUT"
busybox_rootfs "$ROOTFS"
export COVE_IMAGE_STORE="$WORK/images"
import_as_image "$COVE" "$ROOTFS" "$WORK/layout" cove-bench/busybox:v1

# crun's default config (crun spec), on the same rootfs, without a terminal.
BUNDLE="$WORK/crun-bundle"
mkdir -p "$BUNDLE"
(cd "$BUNDLE" && crun spec >/dev/null)
python3 - "$BUNDLE/config.json" "$ROOTFS" <<'PY'
import json, sys
path, rootfs = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["root"] = {"path": rootfs, "readonly": True}
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/true"]
json.dump(c, open(path, "w"), indent=1)
PY
CRUN_WRAP="$WORK/crun-legacy.sh"
crun_legacy_wrapper "$CRUN_WRAP"

declare -A CMD=(
  [cove]="$COVE run --image $ROOTFS -- /bin/true"
  [cove-host]="$COVE run -- /bin/true"
  [cove-image]="$COVE run --pull never --image cove-bench/busybox:v1 -- /bin/true"
  [bwrap]="bwrap --unshare-all --die-with-parent --ro-bind $ROOTFS / --proc /proc --dev /dev --tmpfs /tmp /bin/true"
  # Closer to what Cove does (still without cgroups or seccomp): a user namespace, no
  # capabilities, a new session.
  [bwrap-userns-capdrop]="bwrap --unshare-all --unshare-user --cap-drop ALL --new-session --die-with-parent --ro-bind $ROOTFS / --proc /proc --dev /dev --tmpfs /tmp /bin/true"
  [crun]="crun run --bundle $BUNDLE cove-bench-crun"
  [fork-exec]="$ROOTFS/bin/true"
)
ORDER=(cove cove-host cove-image bwrap bwrap-userns-capdrop crun fork-exec)

# Every tool once per turn, shuffled, ROUNDS x RUNS turns: this machine drifts within seconds,
# and blocks of runs of one tool (hyperfine's way, this script's before) let the drift decide
# (two tools doing the same work differed by 11 % that way). All run under the crun wrapper's
# private mount namespace, which costs none of them anything per run.
ARGS=()
for name in "${ORDER[@]}"; do ARGS+=("${CMD[$name]}"); done
"$CRUN_WRAP" python3 bench/interleave.py --json "$OUT/times.json" $((ROUNDS * RUNS)) "${ARGS[@]}" >/dev/null

# Where Cove's time goes: its own per-step clock (--timing), median over RUNS runs.
for i in $(seq 1 "$RUNS"); do "$COVE" run --timing --image "$ROOTFS" -- /bin/true 2>>"$OUT/timing.txt"; done

python3 - "$OUT" "${ORDER[@]}" -- "${ARGS[@]}" <<'PY'
import json, re, statistics, sys
out = sys.argv[1]
split = sys.argv.index("--")
names, cmds = sys.argv[2:split], sys.argv[split + 1:]
measured = json.load(open(f"{out}/times.json"))
med = {}
for n, cmd in zip(names, cmds):
    times = measured[cmd]
    med[n] = statistics.median(times) * 1000
    p90 = statistics.quantiles(times, n=10)[-1] * 1000
    print(f"{n:21s} median {med[n]:6.2f} ms   p90 {p90:6.2f} ms   ({len(times)} runs)")
print()
for n in names:
    if n != "bwrap":
        print(f"{n:21s} / bwrap = {med[n] / med['bwrap']:.2f}")
print(f"\nstored image over --image host: {med['cove-image'] - med['cove-host']:+.2f} ms; "
      f"over a rootfs directory: {med['cove-image'] - med['cove']:+.2f} ms")
steps = {}
for line in open(f"{out}/timing.txt"):
    for k, v in re.findall(r"(\w+)=(\d+)", line):
        steps.setdefault(k, []).append(int(v))
print("\ncove --timing, medians in microseconds from the start of `run` (child steps from the clone):")
print("  " + "  ".join(f"{k}={statistics.median(v):.0f}" for k, v in steps.items()))
PY
crun delete -f cove-bench-crun >/dev/null 2>&1 || true

# Where Cove and bubblewrap differ: the same four phases of each run, from kernel trace events
# (a tracefs instance of its own, so that nothing else's tracing is touched), RUNS runs of each,
# alternating.
# A fresh boot may not have tracefs mounted yet.
TRACEFS=/sys/kernel/tracing
[ -d "$TRACEFS/instances" ] || mount -t tracefs tracefs "$TRACEFS" 2>/dev/null ||
  TRACEFS=/sys/kernel/debug/tracing
INSTANCE="$TRACEFS/instances/cove-bench-$$"
trace_events() {
  echo 4096 >"$INSTANCE/buffer_size_kb" || return 1
  for e in sched/sched_process_exec sched/sched_process_fork \
           syscalls/sys_enter_exit_group syscalls/sys_exit_wait4; do
    echo 1 >"$INSTANCE/events/$e/enable" || return 1
  done
}
if mkdir "$INSTANCE" 2>/dev/null && trap 'rmdir "$INSTANCE" 2>/dev/null' EXIT && trace_events; then
  echo 1 >"$INSTANCE/tracing_on"
  for i in $(seq 1 "$RUNS"); do
    ${CMD[cove]} >/dev/null
    ${CMD[bwrap]} >/dev/null
  done
  echo 0 >"$INSTANCE/tracing_on"
  cat "$INSTANCE/trace" >"$OUT/phases.trace"
  echo
  echo "Phases from kernel trace events, cove (--image ROOTFS) and bwrap --unshare-all:"
  python3 bench/phases.py "$OUT/phases.trace" /bin/true cove bwrap
else
  echo "(no tracefs instance with these events: phases skipped)" >&2
fi
