//! Builds the sandbox's resident init (`init/main.rs`): a freestanding program with no
//! standard library, compiled by the same `rustc` for the same target, and embedded in the
//! jail with `include_bytes!`. On targets it is not written for, an empty file is embedded
//! and the first init stays resident instead (see `init.rs`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=init/main.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("cove-init");
    let target = env::var("TARGET").expect("cargo sets TARGET");
    if !(target.starts_with("x86_64-") && target.contains("-linux-")) {
        std::fs::write(&out, b"").expect("write the empty init");
        return;
    }
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition=2024",
            "--crate-type=bin",
            "--crate-name=cove_init",
        ])
        .args(["--target", &target])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=s",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "strip=symbols", "-C", "relocation-model=static"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args([
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-Wl,--build-id=none",
            // No separate read-only-after-relocation segment (nothing is relocated): the
            // writable data, the zeroed data and the stack share one page.
            "-C",
            "link-arg=-Wl,-z,norelro",
            // Each segment starts a page of its own: the writable one is then one page
            // wherever the code before it ends (it would straddle two once the code pushed
            // its start past the last 2.1 KiB of a page).
            "-C",
            "link-arg=-Wl,-z,separate-code",
        ])
        .arg("-o")
        .arg(&out)
        .arg("init/main.rs")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the sandbox's init");
    assert!(status.success(), "building init/main.rs failed");
}
