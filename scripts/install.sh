#!/usr/bin/env bash
# Installs Cove on a fresh Debian machine and runs a first sandbox.
#   sudo scripts/install.sh
# Builds the release binary, installs it as /usr/local/bin/cove, and runs
# `cove run -- python3 -c ...` to show that sandboxes start.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sandboxes need root to create namespaces and cgroups)" >&2; exit 1; }

scripts/deps.sh runtime

if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "install.sh: no Rust toolchain; installing rustup (Rust >= 1.95 is needed)" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi

bin=$(scripts/build-release.sh)
install -m 0755 "$bin" /usr/local/bin/cove
echo "installed /usr/local/bin/cove ($(/usr/local/bin/cove --version))"
echo "first sandbox:"
/usr/local/bin/cove run -- python3 -c 'import os, socket; print(f"hello from {socket.gethostname()}: pid {os.getpid()}, uid {os.getuid()}")'
