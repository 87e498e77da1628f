//! `--image PATH`: a root filesystem directory, read-only under a private writable layer.
//! The test builds its own image from Debian's static busybox; nothing is downloaded.

mod common;

use std::path::{Path, PathBuf};

use common::{require_root, run};

/// A busybox root filesystem in a fresh directory, removed on drop.
struct Rootfs(PathBuf);

impl Rootfs {
    fn new() -> Rootfs {
        let dir = std::env::temp_dir().join(format!("cove-rootfs-{}", common::new_id()));
        for d in ["bin", "etc", "proc", "dev", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is needed (scripts/deps.sh test installs it)");
        std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        for applet in [
            "sh", "cat", "echo", "ls", "id", "hostname", "touch", "mkdir", "grep",
        ] {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
        std::fs::write(dir.join("etc/motd"), "image file\n").unwrap();
        Rootfs(dir)
    }

    fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_directory_image_runs_with_its_own_files() {
    require_root();
    let img = Rootfs::new();
    let out = run(&[
        "--image",
        &img.arg(),
        "--",
        "/bin/sh",
        "-c",
        "cat /etc/motd; ls /bin | grep -c .; id -u",
    ]);
    assert_eq!(out.stdout, "image file\n10\n0\n", "{}", out.stderr);
}

#[test]
fn writes_go_to_a_private_layer_and_never_reach_the_image() {
    require_root();
    let img = Rootfs::new();
    let out = run(&[
        "--image",
        &img.arg(),
        "--",
        "/bin/sh",
        "-c",
        "echo new > /newfile && mkdir -p /srv/x && echo ok; cat /newfile",
    ]);
    assert_eq!(out.stdout, "ok\nnew\n", "{}", out.stderr);
    assert!(
        !img.0.join("newfile").exists(),
        "the write reached the image"
    );
    assert!(!img.0.join("srv").exists());
}

#[test]
fn the_image_sandbox_is_contained_like_the_host_one() {
    require_root();
    let img = Rootfs::new();
    let out = run(&[
        "--image",
        &img.arg(),
        "--",
        "/bin/sh",
        "-c",
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; ls /dev | grep -c .",
    ]);
    assert_eq!(
        out.stdout, "CapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n13\n",
        "{}",
        out.stderr
    );
}

#[test]
fn a_file_is_not_an_image() {
    require_root();
    let out = run(&["--image", "/etc/hostname", "--", "true"]);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("not a directory"), "{}", out.stderr);
}
