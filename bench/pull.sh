#!/usr/bin/env bash
# Pull + unpack of one multi-layer image from a registry on loopback: `cove image pull` side by
# side in one run with `skopeo copy` + `umoci unpack` (both from Debian), each starting from
# nothing every time (empty store / empty OCI layout and bundle), against the same
# docker-registry serving the same image.
#
#   sudo bench/pull.sh                  # 3 rounds x 3 runs per tool, interleaved
#   ROUNDS=5 RUNS=3 sudo bench/pull.sh
#
# The image has five gzip layers built from this machine's own files (a busybox root, Python's
# standard library, Perl's, /usr/share/doc with its many small files, GCC's libraries), about
# 300 MiB unpacked; it is built once per run of this script. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "pull.sh: run as root" >&2; exit 1; }
ROUNDS="${ROUNDS:-3}"
RUNS="${RUNS:-3}"
WORK="${BENCH_WORK:-/var/tmp/cove-bench-pull}"
scripts/deps.sh bench
COVE=$(scripts/build-release.sh 2>/dev/null)

REGISTRY_PID=
cleanup() { [ -n "$REGISTRY_PID" ] && kill "$REGISTRY_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
rm -rf "$WORK"; mkdir -p "$WORK/results" "$WORK/layout/blobs/sha256"

# The image, as an OCI layout, built with tar + gzip (default level, as docker build does).
python3 - "$WORK/layout" <<'PY'
import hashlib, json, os, shutil, subprocess, sys, tempfile
layout = sys.argv[1]
blobs = os.path.join(layout, "blobs/sha256")
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(os.path.join(blobs, h), "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
root = tempfile.mkdtemp()
os.makedirs(f"{root}/bin"); os.makedirs(f"{root}/etc")
shutil.copy("/bin/busybox", f"{root}/bin/busybox")
for a in ["sh", "true", "ls", "cat"]:
    os.symlink("busybox", f"{root}/bin/{a}")
sources = [(root, ".")] + [("/", d) for d in
           ["usr/lib/python3.11", "usr/share/perl", "usr/share/doc", "usr/lib/gcc"]]
layers, diff_ids = [], []
for cwd, path in sources:
    tar = subprocess.run(["tar", "-C", cwd, "--numeric-owner", "--sort=name", "-cf", "-", path],
                         check=True, capture_output=True).stdout
    diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
    gz = subprocess.run(["gzip", "-n"], input=tar, check=True, capture_output=True).stdout
    layers.append(dict(put(gz), mediaType="application/vnd.oci.image.layer.v1.tar+gzip"))
shutil.rmtree(root)
config = put(json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
manifest = put(json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                           "layers": layers}).encode())
json.dump({"schemaVersion": 2, "manifests": [dict(manifest,
           mediaType="application/vnd.oci.image.manifest.v1+json",
           annotations={"org.opencontainers.image.ref.name": "v1"})]},
          open(os.path.join(layout, "index.json"), "w"))
open(os.path.join(layout, "oci-layout"), "w").write('{"imageLayoutVersion":"1.0.0"}')
total = sum(l["size"] for l in layers)
print(f"image: {len(layers)} layers, {total / 2**20:.1f} MiB compressed", file=sys.stderr)
PY

# The registry, on a free loopback port.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: 127.0.0.1:$PORT
YML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$PORT/v2/" >/dev/null && break; sleep 0.1; done
REF="127.0.0.1:$PORT/bench/pull:v1"
skopeo --insecure-policy copy -q --preserve-digests --dest-tls-verify=false \
  "oci:$WORK/layout:v1" "docker://$REF"

declare -A CMD=(
  [cove]="COVE_IMAGE_STORE=$WORK/cove-store $COVE image pull -q $REF"
  [skopeo+umoci]="skopeo --insecure-policy copy -q --src-tls-verify=false docker://$REF oci:$WORK/oci:v1 && umoci unpack --image $WORK/oci:v1 $WORK/bundle >/dev/null"
)
declare -A PREPARE=(
  [cove]="rm -rf $WORK/cove-store; sync"
  [skopeo+umoci]="rm -rf $WORK/oci $WORK/bundle; sync"
)
ORDER=(cove skopeo+umoci)
for r in $(seq 1 "$ROUNDS"); do
  for name in "${ORDER[@]}"; do
    hyperfine -w 1 -r "$RUNS" --prepare "${PREPARE[$name]}" \
      --export-json "$WORK/results/$name-$r.json" "${CMD[$name]}" >/dev/null
  done
  echo "round $r/$ROUNDS done" >&2
done
# What each produced, for the record: the unpacked bytes on disk.
echo "unpacked: cove $(du -sh "$WORK/cove-store/layers" | cut -f1), umoci $(du -sh "$WORK/bundle/rootfs" | cut -f1)" >&2

python3 - "$WORK/results" "$ROUNDS" "${ORDER[@]}" <<'PY'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
med = {}
for n in names:
    times = []
    for r in range(1, rounds + 1):
        times += json.load(open(f"{out}/{n}-{r}.json"))["results"][0]["times"]
    med[n] = statistics.median(times)
    print(f"{n:13s} median {med[n]:6.2f} s   min {min(times):6.2f} s   max {max(times):6.2f} s   ({len(times)} runs)")
print(f"\ncove / skopeo+umoci = {med['cove'] / med['skopeo+umoci']:.2f}")
PY
rm -rf "$WORK/cove-store" "$WORK/oci" "$WORK/bundle" "$WORK/registry"
