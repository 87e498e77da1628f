#!/usr/bin/env bash
# Installs the Debian packages Cove needs.
#   scripts/deps.sh runtime   what Cove needs at run time (python3 for the first demo, curl
#                             to wait for `cove serve`, nftables for --net egress)
#   scripts/deps.sh test      + what the test suite uses: busybox-static for images; a real
#                             registry (docker-registry), skopeo to push to it, htpasswd,
#                             openssl (certificates, token signing), zstd (zstd layers),
#                             curl (raw HTTP against `cove serve`), a Prometheus text parser,
#                             strace (to hold a supervisor up between two of its steps)
#   scripts/deps.sh bench     + the peers the benchmarks compare with (bubblewrap, crun,
#                             hyperfine, umoci, wrk and nginx for the proxy)
# Installs only what is missing, so it costs nothing on a prepared machine.
set -euo pipefail
want=(iproute2 util-linux ca-certificates python3 curl nftables)
test_packages=(busybox-static docker-registry skopeo apache2-utils openssl zstd curl
  python3-prometheus-client strace)
case "${1:-runtime}" in
  runtime) ;;
  test) want+=("${test_packages[@]}") ;;
  bench) want+=("${test_packages[@]}" bubblewrap crun hyperfine umoci wrk nginx-light) ;;
  *) echo "deps.sh: unknown set ${1}; use runtime, test or bench" >&2; exit 2 ;;
esac
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps.sh: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
