#!/usr/bin/env bash
# The control plane's latency: `cove serve` on loopback, sandboxes of the `host` image created
# through the REST API and answered once they run (POST /v1/sandboxes waits for `running`).
#
#   sudo bench/api.sh                 # 100 sequential creates, 200 at 50 concurrent, 100 execs
#   SEQ=200 CONC=50 TOTAL=400 EXECS=200 CHURN=6 sudo bench/api.sh
#
# Prints create-to-running p50/p99 (sequential and concurrent), sandboxes created per second
# at that concurrency, and the exec round trip (POST .../exec of `true`), all measured by the
# client (a minimal keep-alive HTTP/1.1 client: see `Conn`), and `cove exec` as a user runs it (the CLI over the exec stream). Then CHURN rounds
# (default 4) of TOTAL creates at CONC clients followed by their removal, as a busy server
# sees sandboxes come and go: per round, sandboxes created per second and the machine's CPU
# time per create (its busy time from /proc/stat, the client's included; with a warm pool,
# until the pool is full again). Last, the quota
# check's cost: a tenant with quotas creates (not waiting for the sandbox to run) beside none
# of its sandboxes, then beside QUOTA_N (default 1000), and create-to-running one at a time
# beside 30 idle sandboxes and beside QUOTA_N + 30 (what grows with every live sandbox).
# Every sandbox is removed at the end.
# WARM=N runs the server with a warm pool of N sandboxes (`--warm-pool N`): each measured
# phase then starts with the pool full, and says how many of its creates the pool served.
# IMAGE=REF creates every sandbox from that stored image (`cove image pull` or `import` it
# first; it needs `sleep`, and `true` for the execs), its pool then `--warm-image REF=N`. GAP=SECONDS spaces the sequential creates apart
# (default 0: each follows the last at once).
# Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "api.sh: run as root" >&2; exit 1; }
SEQ="${SEQ:-100}"
CONC="${CONC:-50}"
TOTAL="${TOTAL:-200}"
EXECS="${EXECS:-100}"
CHURN="${CHURN:-4}"
QUOTA_N="${QUOTA_N:-1000}"
WARM="${WARM:-0}"
IMAGE="${IMAGE:-}"
GAP="${GAP:-0}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench-api}"
scripts/deps.sh bench
# COVE=PATH measures that binary instead of building one (to compare two builds).
COVE="${COVE:-$(scripts/build-release.sh 2>/dev/null)}"

rm -rf "$WORK"; mkdir -p "$WORK"
SERVER_PID=
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$COVE" serve --listen 127.0.0.1:0 --proxy-listen 127.0.0.1:0 --proxy-tls-listen 127.0.0.1:0 --data-dir "$WORK/data" \
  ${IMAGE:+--warm-image "$IMAGE=$WARM"} --warm-pool "$([ -n "$IMAGE" ] && echo 0 || echo "$WARM")" 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.log" 2>/dev/null && break; sleep 0.05; done
URL=$(sed -n 's/^cove: listening on //p' "$WORK/serve.log")
TOKEN=$(cat "$WORK/data/admin-token")

python3 - "$URL" "$TOKEN" "$SEQ" "$CONC" "$TOTAL" "$EXECS" "$COVE" "$CHURN" "$QUOTA_N" "$WARM" "$IMAGE" "$GAP" <<'PY'
import json, re, socket, statistics, sys, threading, time, urllib.parse
url, token, cove = sys.argv[1], sys.argv[2], sys.argv[7]
seq, conc, total, execs, churn, quota_n, warm = map(int, sys.argv[3:7] + sys.argv[8:11])
image, gap = sys.argv[11], float(sys.argv[12])
u = urllib.parse.urlparse(url)
H = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

class Response:
    def __init__(self, status, body):
        self.status, self.body = status, body
    def read(self):
        return self.body

class Conn:
    """A keep-alive HTTP/1.1 connection with http.client's calls used here, the request built
    and the response read by hand (by Content-Length, which the server always sends). Python's
    http.client parses each response's headers with the email package: measured here, a
    /healthz round trip takes 0.55 ms with it and 0.08 ms without, a cost that would count in
    every latency below and take CPU from the server in the bursts."""
    def __init__(self, host, port):
        self.s = socket.create_connection((host, port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host, self.buf = f"{host}:{port}", b""
    def request(self, method, path, body=None, headers={}):
        data = body.encode() if isinstance(body, str) else (body or b"")
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        self.s.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    def recv(self):
        more = self.s.recv(65536)
        if not more:
            raise ConnectionError("the server closed the connection")
        self.buf += more
    def getresponse(self):
        while b"\r\n\r\n" not in self.buf:
            self.recv()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        assert "transfer-encoding" not in fields, lines
        length = int(fields.get("content-length", 0))
        while len(self.buf) < length:
            self.recv()
        body, self.buf = self.buf[:length], self.buf[length:]
        return Response(int(lines[0].split()[1]), body)

def call(conn, method, path, body=None):
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=H)
    r = conn.getresponse()
    data = r.read()
    return r.status, (json.loads(data) if data else None)

tokens = [token]  # the tenant's too, once it is made

def remove_all():
    """Whatever happened above (an assertion too), no sandbox outlives the script: the server is
    stopped next, and its sandboxes would run on without it."""
    c = Conn(u.hostname, u.port)
    for t in tokens:
        h = dict(H, Authorization=f"Bearer {t}")
        for _ in range(100):
            c.request("GET", "/v1/sandboxes", headers=h)
            left = json.loads(c.getresponse().read()).get("sandboxes", [])
            if not left:
                break
            for sb in left:
                c.request("DELETE", f"/v1/sandboxes/{sb['id']}?force=true", headers=h)
                c.getresponse().read()

import atexit
atexit.register(remove_all)

def create(conn):
    t = time.perf_counter()
    body = {"cmd": ["sleep", "3600"]}
    if image:
        body["image"] = image
    status, v = call(conn, "POST", "/v1/sandboxes", body)
    dt = time.perf_counter() - t
    assert status == 201 and v["state"] == "running", (status, v)
    return dt, v["id"]

def metric(name):
    """The sum of metric `name` over its series (one per warm pool)."""
    c = Conn(u.hostname, u.port)
    c.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    text = c.getresponse().read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

def pool_full():
    """With a warm pool: waits until it is full again (up to 60 s); the count taken so far."""
    if warm:
        for _ in range(600):
            if metric("cove_warm_pool_ready") >= warm:
                break
            time.sleep(0.1)
    return metric("cove_warm_pool_taken_total")

def served(before, n):
    return f", {metric('cove_warm_pool_taken_total') - before:.0f} of {n} from the warm pool" if warm else ""

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

ids = []
conn = Conn(u.hostname, u.port)
lat = []
taken = pool_full()
for _ in range(seq):
    dt, i = create(conn); lat.append(dt); ids.append(i)
    time.sleep(gap)
print(f"create-to-running, sequential{f' ({gap:g} s apart)' if gap else ''}:  p50 {pct(lat,50)*1000:6.1f} ms  p99 {pct(lat,99)*1000:6.1f} ms  ({seq} sandboxes{served(taken, seq)})")

per = total // conc
def concurrently(made):
    """`total` creates from `conc` clients at once; their latencies, the ids into `made`."""
    lat, lock = [], threading.Lock()
    def worker():
        c = Conn(u.hostname, u.port)
        for _ in range(per):
            dt, i = create(c)
            with lock:
                lat.append(dt); made.append(i)
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads: t.start()
    for t in threads: t.join()
    return lat

taken = pool_full()
t0 = time.perf_counter()
lat_c = concurrently(ids)
elapsed = time.perf_counter() - t0
n = per * conc
print(f"create-to-running, {conc} concurrent: p50 {pct(lat_c,50)*1000:6.1f} ms  p99 {pct(lat_c,99)*1000:6.1f} ms  ({n} sandboxes{served(taken, n)})")
print(f"sandboxes created per second at {conc} concurrent: {n / elapsed:.0f}")

ex = []
target = ids[0]
for _ in range(execs):
    t = time.perf_counter()
    status, v = call(conn, "POST", f"/v1/sandboxes/{target}/exec", {"cmd": ["true"]})
    ex.append(time.perf_counter() - t)
    assert status == 200 and v["exit_code"] == 0, (status, v)
print(f"exec round trip (true):         p50 {pct(ex,50)*1000:6.1f} ms  p99 {pct(ex,99)*1000:6.1f} ms  ({execs} execs)")

# What a user sees: `cove exec ID -- true` over the WebSocket stream, the CLI's own start
# included.
import os, subprocess
env = dict(os.environ, COVE_URL=url, COVE_TOKEN=token)
cli = []
for _ in range(execs):
    t = time.perf_counter()
    subprocess.run([cove, "exec", target, "--", "true"], env=env, check=True)
    cli.append(time.perf_counter() - t)
print(f"cove exec (CLI, stream):         p50 {pct(cli,50)*1000:6.1f} ms  p99 {pct(cli,99)*1000:6.1f} ms  ({execs} execs)")

for i in ids:
    call(conn, "DELETE", f"/v1/sandboxes/{i}?force=true")

def busy_jiffies():
    f = list(map(int, open("/proc/stat").readline().split()[1:]))
    return sum(f) - f[3] - f[4]   # all but idle and iowait, summed over the CPUs
for r in range(churn):
    made = []
    taken = pool_full()
    b0, t0 = busy_jiffies(), time.perf_counter()
    concurrently(made)
    elapsed = time.perf_counter() - t0
    served_now = served(taken, len(made))
    pool_full()  # the pool's refill is part of what the creates cost
    cpu = (busy_jiffies() - b0) / os.sysconf("SC_CLK_TCK")
    for i in made:
        call(conn, "DELETE", f"/v1/sandboxes/{i}?force=true")
    print(f"churn round {r + 1}: {len(made) / elapsed:4.0f} created per second, "
          f"{cpu / len(made) * 1000:5.1f} ms of CPU per create{served_now}")

if quota_n > 0:
    status, v = call(conn, "POST", "/v1/tenants", {"name": "bench", "quotas": {
        "sandboxes": quota_n + 100, "memory": "1000T", "cpus_millis": 10**9}})
    assert status == 201, (status, v)
    H["Authorization"] = f"Bearer {v['token']}"
    tokens.append(v["token"])
    mine = []
    def tenant_creates(n):
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            status, v = call(conn, "POST", "/v1/sandboxes?wait=false",
                             {"cmd": ["sleep", "3600"], "limits": {"memory": "16M"}})
            ts.append(time.perf_counter() - t)
            assert status == 201, (status, v)
            mine.append(v["id"])
        return ts
    def settle():
        """Until the machine is idle (the starts and removals before are done), up to 2 min."""
        for _ in range(120):
            b0 = busy_jiffies(); time.sleep(1)
            if busy_jiffies() - b0 < 0.1 * os.sysconf("SC_CLK_TCK") * os.cpu_count():
                return
    def sequential_runs(n):
        """Create-to-running, one at a time, each removed once the next is made."""
        ts = []
        for _ in range(n):
            dt, i = create(conn)
            ts.append(dt)
            call(conn, "DELETE", f"/v1/sandboxes/{i}?force=true")
        return ts
    settle()
    alone = tenant_creates(30)
    settle()
    run_alone = sequential_runs(30)
    tenant_creates(quota_n - len(mine))
    settle()
    beside = tenant_creates(30)
    settle()
    run_beside = sequential_runs(30)
    print(f"a tenant's create (quota checked, not waiting to run): p50 {pct(alone,50)*1000:5.1f} ms "
          f"beside none of its sandboxes, {pct(beside,50)*1000:5.1f} ms beside {quota_n}")
    print(f"create-to-running, sequential, beside {len(alone)} idle sandboxes: "
          f"p50 {pct(run_alone,50)*1000:5.1f} ms; beside {len(mine)}: {pct(run_beside,50)*1000:5.1f} ms")
    for i in mine:
        call(conn, "DELETE", f"/v1/sandboxes/{i}?force=true")

PY
