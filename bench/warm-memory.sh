#!/usr/bin/env bash
# What a warm sandbox costs while it waits: `cove serve` idle without a warm pool, then with
# N members (`--warm-pool N`, default 100) once they are all ready; the machine's MemAvailable
# and MemFree (page cache dropped, the median of three readings) each time; the difference
# per member.
#
#   sudo bench/warm-memory.sh
#   N=200 sudo bench/warm-memory.sh
#
# Nothing else should run meanwhile. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "warm-memory.sh: run as root" >&2; exit 1; }
N="${N:-100}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench-warm}"
# COVE=PATH measures that binary instead of building one (to compare two builds).
COVE="${COVE:-$(scripts/build-release.sh 2>/dev/null)}"
rm -rf "$WORK"; mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

python3 - "$COVE" "$N" "$WORK" <<'PY'
import http.client, os, re, subprocess, sys, time
cove, n, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def meminfo():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(1)
    m = dict(l.split(":", 1) for l in open("/proc/meminfo"))
    return int(m["MemAvailable"].split()[0]), int(m["MemFree"].split()[0])

def measure(pool):
    data = f"{work}/data-{pool}"
    log = open(f"{work}/serve-{pool}.log", "w")
    server = subprocess.Popen([cove, "serve", "--listen", "127.0.0.1:0", "--proxy-listen",
                               "127.0.0.1:0", "--proxy-tls-listen", "127.0.0.1:0", "--data-dir",
                               data, "--warm-pool", str(pool)], stderr=log)
    try:
        url = None
        for _ in range(200):
            time.sleep(0.05)
            m = re.search(r"listening on http://([\d.]+):(\d+)", open(log.name).read())
            if m:
                url = m
                break
        assert url, open(log.name).read()
        token = open(f"{data}/admin-token").read().strip()
        conn = http.client.HTTPConnection(url.group(1), int(url.group(2)))
        for _ in range(1200):
            if pool == 0:
                break
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
            text = conn.getresponse().read().decode()
            ready = re.search(r'^cove_warm_pool_ready\{image="host"\} (\S+)$', text, re.M)
            if ready and float(ready.group(1)) >= pool:
                break
            time.sleep(0.1)
        else:
            sys.exit(f"the pool of {pool} was not ready after 2 minutes")
        time.sleep(3)
        readings = sorted(meminfo() for _ in range(3))
        return readings[1]
    finally:
        server.terminate()
        server.wait()
        time.sleep(3)

none = measure(0)
full = measure(n)
print(f"MemAvailable: {none[0]} KiB without a pool, {full[0]} KiB with {n} warm sandboxes")
print(f"per warm sandbox: MemAvailable {(none[0] - full[0]) / n:.0f} KiB, "
      f"MemFree {(none[1] - full[1]) / n:.0f} KiB")
PY
