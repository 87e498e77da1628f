#!/usr/bin/env bash
# What egress networking adds to a sandbox's life: `cove run -- /bin/true` without and with
# --net egress (a veth pair, addresses and routes over netlink, under the shared nftables
# table), and with an allow list (its own nftables chain: one `nft` run at start, one at the
# end), in one hyperfine run. The sandboxes' resolver is set to a documentation address; no
# packet leaves the machine (/bin/true sends none).
#
#   sudo bench/egress.sh                 # 300 runs each
#   RUNS=1000 sudo bench/egress.sh
#
# Prints hyperfine's table and the mean time each egress variant adds. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "egress.sh: run as root" >&2; exit 1; }
RUNS="${RUNS:-300}"
scripts/deps.sh bench
COVE=$(scripts/build-release.sh 2>/dev/null)
export COVE_EGRESS_DNS=192.0.2.53
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
hyperfine -N -w 30 -r "$RUNS" --export-json "$OUT" \
  -n none "$COVE run -- /bin/true" \
  -n egress "$COVE run --net egress -- /bin/true" \
  -n egress+allow "$COVE run --net egress --allow 198.51.100.0/24:443 -- /bin/true"
python3 - "$OUT" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
base = r["none"]["mean"]
for name in ("egress", "egress+allow"):
    print(f"{name}: +{(r[name]['mean'] - base) * 1000:.2f} ms mean, "
          f"+{(r[name]['median'] - r['none']['median']) * 1000:.2f} ms median over no network")
PY
