#!/usr/bin/env bash
# Idle density: the memory one idle sandbox costs the machine, Cove beside crun in one run.
# Each sandbox runs busybox httpd (from the same busybox rootfs: a stored image for Cove, the
# bundle's root for crun) in its own network namespace; the whole machine's MemAvailable drop
# counts kernel memory too (namespaces, cgroups, page tables, stacks), not only process RSS
# (free pages parked on the per-CPU lists are counted as free: MemAvailable leaves them out).
#
#   sudo bench/density.sh              # 300 sandboxes per tool
#   N=1000 SETTLE=20 sudo bench/density.sh
#   ORDER="cove crun" sudo bench/density.sh   # which tool is measured first
#
# Cove's sandboxes are created through `cove serve` (the whole product: the API, its agent and
# whatever it keeps per sandbox; without its warm pool, whose waiting members are no one's
# sandboxes); crun's are `crun run -d` (detached: nothing left per
# container but the container). Prints per-sandbox MemAvailable drop, slab, page tables,
# kernel stacks, and the proportional memory (PSS) of the processes each kind of sandbox
# leaves, then removes everything. Nothing else should run meanwhile. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "density.sh: run as root" >&2; exit 1; }
N="${N:-300}"
SETTLE="${SETTLE:-10}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench-density}"
scripts/deps.sh bench
COVE=$(scripts/build-release.sh 2>/dev/null)
. bench/lib.sh

rm -rf "$WORK"; mkdir -p "$WORK"
busybox_rootfs "$WORK/rootfs"
export COVE_IMAGE_STORE="$WORK/images"
import_as_image "$COVE" "$WORK/rootfs" "$WORK/layout" cove-bench/httpd:v1
crun_legacy_wrapper "$WORK/crun-legacy.sh"
BUNDLE="$WORK/crun-bundle"
mkdir -p "$BUNDLE"
(cd "$BUNDLE" && crun spec >/dev/null)
python3 - "$BUNDLE/config.json" "$WORK/rootfs" <<'PY'
import json, sys
path, rootfs = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["root"] = {"path": rootfs, "readonly": True}
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
json.dump(c, open(path, "w"), indent=1)
PY

SERVER_PID=
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
  for id in $(crun --root "$WORK/crun-root" list -q 2>/dev/null); do
    "$WORK/crun-legacy.sh" crun --root "$WORK/crun-root" delete -f "$id" >/dev/null 2>&1 || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$COVE" serve --listen 127.0.0.1:0 --proxy-listen 127.0.0.1:0 --proxy-tls-listen 127.0.0.1:0 --data-dir "$WORK/data" --quota-sandboxes 100000 --warm-pool 0 \
  --quota-memory 1000T --quota-cpus 1024 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.log" 2>/dev/null && break; sleep 0.05; done
URL=$(sed -n 's/^cove: listening on //p' "$WORK/serve.log")
TOKEN=$(cat "$WORK/data/admin-token")

python3 - "$URL" "$TOKEN" "$N" "$SETTLE" "$WORK" "$SERVER_PID" <<'PY'
import http.client, json, os, subprocess, sys, time, urllib.parse
url, token, n, settle, work, server_pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], int(sys.argv[6])
u = urllib.parse.urlparse(url)
H = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
conn = http.client.HTTPConnection(u.hostname, u.port)
CRUN = [f"{work}/crun-legacy.sh", "crun", "--root", f"{work}/crun-root"]

def call(method, path, body=None):
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=H)
    r = conn.getresponse()
    data = r.read()
    if r.status >= 400:
        sys.exit(f"density.sh: {method} {path}: {r.status} {data[:300]!r}")
    return json.loads(data) if data else None

def pcp_kib():
    """Free pages parked on the per-CPU lists (/proc/zoneinfo's pagesets). MemFree, and so
    MemAvailable, leaves them out, and the kernel sizes these lists to the allocation rate: up
    to tens of MiB per CPU here, filled or drained between two readings, which moved the
    per-sandbox figure by up to 100 KiB at 300 sandboxes. Counted as free."""
    total, in_pagesets = 0, False
    for line in open("/proc/zoneinfo"):
        f = line.split()
        if f[:1] == ["pagesets"]:
            in_pagesets = True
        elif f[:1] == ["node_unreclaimable:"]:
            in_pagesets = False
        elif in_pagesets and f[:1] == ["count:"]:
            total += int(f[1])
    return total * os.sysconf("SC_PAGE_SIZE") // 1024

def meminfo():
    m = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/meminfo")}
    m["MemAvailable"] += pcp_kib()
    return m

def quiet():
    """Page cache dropped, and the kernel done freeing what earlier sandboxes left (network
    namespaces are destroyed asynchronously, long after their processes): MemFree steady."""
    subprocess.run(["sync"])
    open("/proc/sys/vm/drop_caches", "w").write("3\n")
    last, steady = meminfo()["MemFree"], 0
    for _ in range(120):
        time.sleep(1)
        now = meminfo()["MemFree"]
        steady = steady + 1 if abs(now - last) < 1024 else 0
        last = now
        if steady >= 3:
            break
    open("/proc/sys/vm/drop_caches", "w").write("3\n")

# Kernel memory that is neither slab, page tables nor stacks (seccomp programs are vmalloc'd,
# per-CPU counters of namespaces and cgroups), and what files and processes hold.
OTHER = ["VmallocUsed", "Percpu", "Shmem", "AnonPages", "Cached"]

def pss(pid):
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0

def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

def comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""

def processes(kind):
    """PSS (KiB) of the processes the sandboxes of `kind` keep, by role."""
    roles = {}
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == server_pid:
            continue
        c, name = cmdline(p), comm(p)
        if kind == "cove" and name.startswith("cove-"):
            role = "init"
        elif kind == "cove" and "cove supervise" in c:
            role = "supervisor"
        elif "busybox httpd" in c or name == "httpd":
            role = "httpd"
        else:
            continue
        count, total = roles.get(role, (0, 0))
        roles[role] = (count + 1, total + pss(p))
    return roles

def superblocks(kind):
    """Filesystems a sandbox mounted for itself: the distinct devices in one httpd's mount
    table that the host's has not. Each costs every memory cgroup on the host a little more
    (docs/jail.md, "Superblocks"). The IPC namespace's internal mqueue mount comes on top."""
    def devs(pid):
        return {l.split()[2] for l in open(f"/proc/{pid}/mountinfo")}
    for p in os.listdir("/proc"):
        if p.isdigit() and "busybox httpd" in cmdline(p):
            try:
                return len(devs(p) - devs(1))
            except OSError:
                continue
    return -1

def start(kind, i):
    if kind == "cove":
        return call("POST", "/v1/sandboxes", {
            "image": "cove-bench/httpd:v1",
            "cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
            "limits": {"memory": "16M", "cpus_millis": 100, "pids": 16, "disk": "4M"}})["id"]
    name = f"cove-bench-density-{i}"
    subprocess.run(CRUN + ["run", "-d", "--bundle", f"{work}/crun-bundle", name], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return name

def cpu_seconds(pid):
    # utime + stime, fields 14 and 15 of /proc/<pid>/stat (after the parenthesised name).
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def probe(kind, handle):
    req = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc 127.0.0.1 8080"
    if kind == "cove":
        out = call("POST", f"/v1/sandboxes/{handle}/exec", {"cmd": ["/bin/sh", "-c", req]})["stdout"]
    else:
        out = subprocess.run(CRUN + ["exec", handle, "/bin/sh", "-c", req], capture_output=True,
                             text=True).stdout
    return "hello from a sandbox" in out

def stop(kind, handles):
    for h in handles:
        if kind == "cove":
            call("DELETE", f"/v1/sandboxes/{h}?force=true")
        else:
            subprocess.run(CRUN + ["delete", "-f", h], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

rows = {}
for kind in os.environ.get("ORDER", "crun cove").split():
    quiet()
    before = meminfo()
    server_before = pss(server_pid)
    t0 = time.monotonic()
    handles = [start(kind, i) for i in range(n)]
    started = time.monotonic() - t0
    cpu0 = cpu_seconds(server_pid)
    time.sleep(settle)
    # What the control plane spends on sandboxes that do nothing (its periodic checks).
    idle_cpu = (cpu_seconds(server_pid) - cpu0) / settle
    # Page cache (files either tool read meanwhile) is not the sandboxes' cost.
    quiet()
    after = meminfo()
    procs = processes(kind)
    sbs = superblocks(kind)
    if kind == "cove":
        # The control plane's own growth (records, the agent's state) is the sandboxes' too.
        procs["server"] = (0, pss(server_pid) - server_before)
    served = probe(kind, handles[0]) and probe(kind, handles[-1])
    per = lambda k: (before[k] - after[k]) / n if k == "MemAvailable" else (after[k] - before[k]) / n
    rows[kind] = dict(avail=per("MemAvailable"), slab=per("Slab"), sunreclaim=per("SUnreclaim"),
                      pagetables=per("PageTables"), stacks=per("KernelStack"),
                      procs={r: (c / n, t / n) for r, (c, t) in procs.items()},
                      served=served, start_s=started, idle_cpu=idle_cpu,
                      superblocks=sbs, other={k: (after[k] - before[k]) / n for k in OTHER if k in after})
    stop(kind, handles)
    time.sleep(3)

print(f"{n} idle busybox httpd sandboxes per tool, each in its own network namespace "
      f"(settled {settle:.0f} s); KiB per sandbox:")
print(f"{'':10} {'MemAvail drop':>14} {'Slab':>8} {'(unrecl.)':>10} {'PageTbl':>8} {'KStack':>7}  processes (count, PSS) per sandbox")
for kind, r in rows.items():
    ps = ", ".join(f"{role} {c:.0f}x {p:.0f}" if c else f"{role} +{p:.0f}"
                   for role, (c, p) in sorted(r["procs"].items()))
    print(f"{kind:10} {r['avail']:14.0f} {r['slab']:8.0f} {r['sunreclaim']:10.0f} {r['pagetables']:8.0f} "
          f"{r['stacks']:7.0f}  {ps}{'' if r['served'] else '  (NOT SERVING)'}")
    print(f"{'':10} also grew: " + ", ".join(f"{k} {v:.0f}" for k, v in r["other"].items())
          + f"; superblocks of its own: {r['superblocks']}")
print(f"cove serve's own CPU while its {n} sandboxes idled: "
      f"{100 * rows['cove']['idle_cpu']:.1f}% of one core")
ratio = rows["cove"]["avail"] / rows["crun"]["avail"]
print(f"cove/crun memory per sandbox: {ratio:.2f}; at this cost 4 GiB holds "
      f"{4 * 1024 * 1024 / rows['cove']['avail']:.0f} Cove sandboxes, "
      f"{4 * 1024 * 1024 / rows['crun']['avail']:.0f} crun containers")
PY
