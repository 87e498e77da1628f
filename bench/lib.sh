# Shared by the benchmarks (sourced): the busybox rootfs every tool runs, the same rootfs as a
# stored Cove image, and the wrapper crun needs on a hybrid cgroup host.

# busybox_rootfs DIR: Debian's static busybox and its applets, /www with a page, nothing else.
busybox_rootfs() {
  mkdir -p "$1"/{bin,proc,dev,tmp,etc,www}
  cp /bin/busybox "$1/bin/busybox"
  for a in true sh httpd nc echo sleep; do ln -sf busybox "$1/bin/$a"; done
  echo "hello from a sandbox" >"$1/www/index.html"
}

# import_as_image COVE ROOTFS LAYOUT REF: ROOTFS as a one-layer OCI layout, imported as REF.
import_as_image() {
  python3 - "$2" "$3" "$4" <<'PY'
import hashlib, json, os, subprocess, sys
rootfs, layout, ref = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(f"{layout}/blobs/sha256")
def put(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{layout}/blobs/sha256/{h}", "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
tar = subprocess.run(["tar", "-C", rootfs, "--numeric-owner", "-cf", "-", "."],
                     check=True, capture_output=True).stdout
layer = dict(put(tar), mediaType="application/vnd.oci.image.layer.v1.tar")
config = put(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
manifest = put(json.dumps({"schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
    "layers": [layer]}).encode())
json.dump({"schemaVersion": 2, "manifests": [dict(manifest,
    mediaType="application/vnd.oci.image.manifest.v1+json",
    annotations={"org.opencontainers.image.ref.name": ref})]},
    open(f"{layout}/index.json", "w"))
open(f"{layout}/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
PY
  "$1" image import "$3" >/dev/null
}

# crun_legacy_wrapper PATH: crun refuses a "hybrid" cgroup host whose cgroup2 mount has any
# controller; inside a private mount namespace without that mount it sees plain cgroup v1
# (no per-run cost).
crun_legacy_wrapper() {
  cat >"$1" <<'SH'
#!/usr/bin/env bash
if grep -q ' /sys/fs/cgroup/unified ' /proc/self/mountinfo; then
  exec unshare -m --propagation private bash -c 'umount /sys/fs/cgroup/unified && exec "$@"' bash "$@"
fi
exec "$@"
SH
  chmod +x "$1"
}
