#!/usr/bin/env bash
# Runs the whole test suite, as root (the integration tests start real sandboxes):
#   sudo scripts/test.sh
# Installs what the tests need, checks formatting and lints, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "test.sh: run as root: the integration tests create namespaces and cgroups" >&2; exit 1; }
scripts/deps.sh test
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# TLS is rustls with ring only: no aws-lc or OpenSSL build may creep in with a dependency.
for c in aws-lc-sys openssl-sys; do
  if cargo tree --workspace --locked -e normal -i "$c" >/dev/null 2>&1; then
    echo "test.sh: $c is in the dependency graph (see cargo tree -i $c)" >&2; exit 1
  fi
done
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
# Nothing any test started may be left on the host (the namespace pool is Cove's own stock,
# not a leak: empty it first).
"${CARGO_TARGET_DIR:-target}/debug/cove" gc --pool >/dev/null
scripts/leaks.sh
