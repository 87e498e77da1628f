#!/usr/bin/env bash
# Installs Cove on a fresh Debian machine and runs a first sandbox.
#   sudo scripts/install.sh
# Builds the release binary, installs it as /usr/local/bin/cove, runs
# `cove run -- python3 -c ...` to show that sandboxes start, then starts the main job,
# `cove serve`, on its defaults (a systemd service where systemd runs) and runs a sandbox
# through its API.
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

scripts/build-release.sh /usr/local/bin/cove >/dev/null
echo "installed /usr/local/bin/cove ($(/usr/local/bin/cove --version))"
echo "first sandbox:"
/usr/local/bin/cove run -- python3 -c 'import os, socket; print(f"hello from {socket.gethostname()}: pid {os.getpid()}, uid {os.getuid()}")'

# The main job: `cove serve` on its defaults (API on 127.0.0.1:7070, state in /var/lib/cove).
# Under systemd it becomes a service; elsewhere it is started in the background, once.
if [ -d /run/systemd/system ]; then
  cat >/etc/systemd/system/cove.service <<'UNIT'
[Unit]
Description=Cove: isolated sandboxes on demand
After=network.target

[Service]
# After a boot, the binary is read once before anything runs it: read(2) fills the page cache
# with large folios, where the first exec's page faults would fill it with 4 KiB pages, which
# every sandbox's supervisor and init then map one at a time (README, "Speed").
ExecStartPre=/bin/dd if=/usr/local/bin/cove of=/dev/null bs=128K status=none
ExecStart=/usr/local/bin/cove serve
# Sandboxes are not the server's children: stopping or restarting it leaves them running.
KillMode=process
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
  systemctl daemon-reload
  systemctl enable --now cove.service
  echo "cove serve runs as the systemd service cove (journalctl -u cove)"
elif ! curl -fsS http://127.0.0.1:7070/healthz >/dev/null 2>&1; then
  mkdir -p /var/log
  setsid nohup /usr/local/bin/cove serve >>/var/log/cove.log 2>&1 </dev/null &
  echo "cove serve started in the background (pid $!, log /var/log/cove.log)"
fi
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:7070/healthz >/dev/null 2>&1 && break
  sleep 0.1
done
echo "first sandbox through the API:"
id=$(/usr/local/bin/cove create -- sleep 60)
/usr/local/bin/cove exec "$id" -- sh -c 'echo "hello from sandbox $(hostname) through cove serve"'
/usr/local/bin/cove rm -f "$id" >/dev/null
echo "next: export COVE_TOKEN=\$(cat /var/lib/cove/admin-token); cove create -- sleep 600; cove --help"
