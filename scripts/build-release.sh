#!/usr/bin/env bash
# Builds the release `cove` binary, statically linked, and prints its path; with DEST, also
# installs it there (as a new file, renamed into place: a running `cove` is left alone).
#   BIN=$(scripts/build-release.sh)
#   scripts/build-release.sh /usr/local/bin/cove
# Static linking is not about portability: measured here, a static `cove run -- /bin/true`
# starts about 1 ms faster (fewer mappings to relocate, copy at each fork, and tear down at
# each exit). Its relative relocations are packed (RELR, `-z pack-relative-relocs`: binutils
# 2.38, glibc 2.36): the binary stays position-independent, and the start-up relocation no
# longer reads a 390 KB table (16,000 entries) on every start: measured here, 385 -> 296 page
# faults per `cove run -- /bin/true`. A non-PIE build relocates nothing (`cove --version`: 188
# -> 125 page faults; `cove run -- /bin/true` 0.28-0.34 ms faster, interleaved runs of 300) but
# loses address randomisation of the binary, which `cove serve` runs as too: not taken. The
# test suite uses the ordinary debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
host=$(rustc -vV | sed -n 's/^host: //p')
# With an explicit --target, RUSTFLAGS reach only the target's crates, not build scripts or
# proc-macros (which cannot be linked statically).
#
# Its code is laid out for 2 MiB pages (`-z max-page-size=0x200000`: each segment's address
# and file offset agree modulo 2 MiB, at no cost in file size), and the binary is written in
# 2 MiB writes (`place` below). ext4 then keeps it in the page cache as 2 MiB folios, which
# the kernel maps into every `cove` process with one page-table entry each (the kernel loads
# a binary this large at a 2 MiB-aligned address anyway). How the page cache holds the binary
# decides much of what a `cove` process costs: each supervisor and init maps about 1,000 of
# its pages. Page faults per `cove run --image ROOTFS -- /bin/true` (perf stat -r 40):
#   order-0 pages (what the linker's mmap writes, and page faults reading it back, leave): 253
#   folios of up to 64 KiB (what `cp` or `install` leave): 236
#   2 MiB folios, mapped whole: 209
# Wall time in shuffled turns beside bench/start-latency.sh's other tools (bench/interleave.py
# 200, under its crun wrapper): `cove run --image ROOTFS -- /bin/true` 6.45 ms from order-0
# pages, 5.72 ms from 2 MiB folios (bwrap 6.13 ms); `cove run -- /bin/true` 7.34 and 6.17 ms.
# Without crun beside them, 64 KiB and 2 MiB folios were within noise of each other, both 0.3
# to 0.5 ms under order-0 pages. After a reboot the page cache is refilled by whoever reads
# the binary first: page faults in order-0 pages, read(2) mostly in large folios (the systemd
# unit of scripts/install.sh reads it before `cove serve` starts); installing again restores
# the 2 MiB folios.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs -C link-arg=-Wl,-z,max-page-size=0x200000" \
  cargo build --release --locked -p cove --target "$host" >&2
bin="${CARGO_TARGET_DIR:-$PWD/target}/$host/release/cove"

# place SRC DST: DST as a new copy of SRC written in 2 MiB writes, renamed into place.
place() {
  dd if="$1" of="$2.new" bs=2M status=none
  chmod 0755 "$2.new"
  mv -f "$2.new" "$2"
}
place "$bin" "$bin"
if [ $# -gt 0 ]; then
  place "$bin" "$1"
fi
echo "$bin"
