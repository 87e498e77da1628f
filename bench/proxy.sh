#!/usr/bin/env bash
# The edge proxy's throughput and latency, side by side in one run: the same HTTP server (nginx
# answering a 6-byte body, one worker) inside a sandbox of `cove serve`, loaded by wrk
#   direct  wrk inside the sandbox's network namespace, to the server itself
#   nginx   wrk inside that namespace, to nginx as a reverse proxy (keep-alive upstream, as
#           many workers as CPUs) beside the server
#   cove    wrk on the host, to Cove's proxy (Host: 8000-<id>.cove.localhost), which reaches
#           the server from its dialer thread through the sandbox's namespace
# Then the proxy's own answer (no sandbox behind it: 404) as a floor.
#
#   sudo bench/proxy.sh                       # 10 s per run, 32 connections, 3 rounds
#   DURATION=20 CONNS=64 ROUNDS=5 sudo bench/proxy.sh
#
# Prints requests/s and p50/p99 latency per path per round, then the medians over rounds
# and Cove's ratios to nginx (throughput) and its added p99 over direct. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "proxy.sh: run as root" >&2; exit 1; }
DURATION="${DURATION:-10}"
CONNS="${CONNS:-32}"
ROUNDS="${ROUNDS:-3}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench-proxy}"
scripts/deps.sh bench
COVE=$(scripts/build-release.sh 2>/dev/null)

rm -rf "$WORK"; mkdir -p "$WORK"
SERVER_PID= ; NGINX_PID= ; ID=
cleanup() {
  [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null
  [ -n "$ID" ] && COVE_URL="$URL" COVE_TOKEN="$TOKEN" "$COVE" rm -f "$ID" >/dev/null 2>&1
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$COVE" serve --listen 127.0.0.1:0 --proxy-listen 127.0.0.1:0 --proxy-tls-listen 127.0.0.1:0 \
  --data-dir "$WORK/data" 2>"$WORK/serve.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$WORK/serve.log" 2>/dev/null && break; sleep 0.05; done
URL=$(sed -n 's/^cove: listening on //p' "$WORK/serve.log")
PROXY=$(sed -n 's|^cove: proxy on http://||p' "$WORK/serve.log")
TOKEN=$(cat "$WORK/data/admin-token")
export COVE_URL="$URL" COVE_TOKEN="$TOKEN"

# The server inside the sandbox: nginx, one worker, everything under its private /tmp (as the
# sandbox's root, which has no capabilities: no switch to another user).
UPSTREAM_CONF='daemon off; user root root; worker_processes 1; pid /tmp/nginx.pid; error_log /tmp/error.log;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 100000;
  client_body_temp_path /tmp; proxy_temp_path /tmp; fastcgi_temp_path /tmp;
  uwsgi_temp_path /tmp; scgi_temp_path /tmp;
  server { listen 127.0.0.1:8000; location / { return 200 "hello\n"; } } }'
ID=$("$COVE" create --public --memory 256M -- /bin/sh -c \
  "printf '%s' '$UPSTREAM_CONF' >/tmp/nginx.conf && exec /usr/sbin/nginx -c /tmp/nginx.conf -e /tmp/error.log")
for _ in $(seq 100); do
  curl -sf -o /dev/null -H "Host: 8000-$ID.cove.localhost" "http://$PROXY/" && break
  sleep 0.1
done
# Any process of the sandbox names its network namespace.
CG=$(ls -d /sys/fs/cgroup/pids/cove/"$ID" /sys/fs/cgroup/cove/"$ID" 2>/dev/null | head -1 || true)
PID=$(head -1 "$CG/cgroup.procs")
NETNS="/proc/$PID/ns/net"

# The reverse proxy to compare with, in the sandbox's namespace beside the server.
cat >"$WORK/nginx-proxy.conf" <<CONF
daemon off; worker_processes auto; pid $WORK/nginx-proxy.pid; error_log $WORK/nginx-proxy.err;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK;
  uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  upstream sandbox { server 127.0.0.1:8000; keepalive 64; }
  server { listen 127.0.0.1:8100;
    location / { proxy_pass http://sandbox; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host \$host; } } }
CONF
nsenter --net="$NETNS" /usr/sbin/nginx -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.err" &
NGINX_PID=$!
for _ in $(seq 50); do nsenter --net="$NETNS" curl -s -o /dev/null http://127.0.0.1:8100/ && break; sleep 0.1; done

# run NAME [nsenter...] -- URL [headers]: one wrk run; prints "NAME rps p50_ms p99_ms".
run() {
  local name=$1; shift
  local out
  out=$("$@" --latency -t2 -c"$CONNS" -d"${DURATION}s" 2>&1)
  python3 - "$name" "$out" <<'PY'
import re, sys
name, out = sys.argv[1], sys.argv[2]
def ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
lat = {p: ms(v, u) for p, v, u in re.findall(r"\s(50|99)%\s+([\d.]+)(us|ms|s)\b", out)}
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
print(f"{name} {rps:.0f} {lat['50']:.3f} {lat['99']:.3f} {errors.group(1) if errors else 0}")
PY
}

echo "# $CONNS connections, ${DURATION}s per run, $ROUNDS rounds; rps p50_ms p99_ms non2xx" >&2
: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
  {
    run direct nsenter --net="$NETNS" wrk http://127.0.0.1:8000/
    run nginx nsenter --net="$NETNS" wrk http://127.0.0.1:8100/
    run cove wrk -H "Host: 8000-$ID.cove.localhost" "http://$PROXY/"
    run cove-404 wrk "http://$PROXY/proxy/0123456789ab/8000/"
  } | tee -a "$WORK/results" | sed "s/^/round $r: /"
done
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99, _ = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: [statistics.median(c) for c in zip(*v)] for n, v in rows.items()}
print("\nmedians        rps      p50 ms   p99 ms")
for n in ("direct", "nginx", "cove", "cove-404"):
    rps, p50, p99 = med[n]
    print(f"{n:<10} {rps:>9.0f} {p50:>9.3f} {p99:>8.3f}")
print(f"\ncove / nginx throughput: {med['cove'][0] / med['nginx'][0]:.2f}")
print(f"p99 added over direct: cove {med['cove'][2] - med['direct'][2]:.3f} ms, "
      f"nginx {med['nginx'][2] - med['direct'][2]:.3f} ms")
PY
