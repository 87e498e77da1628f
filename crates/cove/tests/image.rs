//! `--image PATH`: a root filesystem directory, read-only under a private writable layer.
//! The test builds its own image from Debian's static busybox; nothing is downloaded.

mod common;

use common::images::{Rootfs, oci_layout};
use common::{require_root, run};

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

fn cove(args: &[&str]) -> common::Out {
    common::Out::from(
        std::process::Command::new(common::cove_bin())
            .args(args)
            .output()
            .unwrap(),
    )
}

#[test]
fn an_imported_image_runs_with_its_own_config() {
    require_root();
    let img = Rootfs::new();
    std::fs::create_dir_all(img.0.join("srv")).unwrap();
    let name = format!("cove-test/bb-{}:v1", common::new_id());
    let layout = oci_layout(&img, &name);
    let out = cove(&["image", "import", &layout.display().to_string()]);
    std::fs::remove_dir_all(&layout).unwrap();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains(&name), "{}", out.stdout);
    let ls = cove(&["image", "ls"]);
    assert!(ls.stdout.contains(&name), "{}", ls.stdout);

    // No command: the image's Cmd, Env and WorkingDir.
    let out = run(&["--image", &name]);
    assert_eq!(out.stdout, "from-cmd hello\n/srv\n", "{}", out.stderr);
    // A command and flags override them; the image's files are owned by the sandbox's root.
    let out = run(&[
        "--image",
        &name,
        "-w",
        "/",
        "-e",
        "GREETING=hi",
        "--",
        "/bin/sh",
        "-c",
        "echo $GREETING; pwd; echo x > /bin/new && echo writable",
    ]);
    assert_eq!(out.stdout, "hi\n/\nwritable\n", "{}", out.stderr);

    let out = cove(&["image", "rm", &name]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(&["--pull", "never", "--image", &name]);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("no such image"), "{}", out.stderr);
    let out = cove(&["image", "prune"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}
