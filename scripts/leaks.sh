#!/usr/bin/env bash
# Fails (and lists them) if any host object of a Cove sandbox is left: cgroups under cove/ (a
# server's sandboxes) or named cove-<id> (`cove run`'s), lock files under /run/cove, mounts with cove in their path, processes named cove-*,
# egress links cv<id> and the egress table (which `cove gc --pool` removes once unused).
set -uo pipefail
found=0
report() { echo "leak: $*" >&2; found=1; }
for d in /sys/fs/cgroup/*/cove /sys/fs/cgroup/cove; do
  [ -d "$d" ] || continue
  while IFS= read -r c; do report "cgroup $c"; done < <(find "$d" -mindepth 1 -type d)
done
for c in /sys/fs/cgroup/*/cove-* /sys/fs/cgroup/cove-*; do
  [ -d "$c" ] && report "cgroup $c"
done
if [ -d /run/cove ]; then
  while IFS= read -r s; do report "state $s"; done < <(find /run/cove -mindepth 1 -maxdepth 1)
fi
while IFS= read -r l; do report "link $l"; done < <(ip -o link show 2>/dev/null | grep -oE '^[0-9]+: cv[0-9a-f]{12}[@:]' | cut -d' ' -f2 | tr -d '@:')
if command -v nft >/dev/null && nft list table inet cove >/dev/null 2>&1; then
  report "nftables table inet cove"
fi
while IFS= read -r m; do report "mount $m"; done < <(awk '$5 ~ /cove/ {print $5}' /proc/self/mountinfo)
while IFS= read -r p; do report "process $p"; done < <(ps -eo pid=,comm= | awk '$2 ~ /^cove-/ {print $1" "$2}')
if [ "$found" = 0 ]; then echo "leaks: none"; fi
exit "$found"
