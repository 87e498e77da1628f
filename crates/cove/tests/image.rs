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

/// An OCI image layout directory holding the busybox rootfs as one layer, named `reference`,
/// with a config that sets Cmd, Env and WorkingDir. Built with tar and sha256sum, as a user's
/// build tool would: nothing is downloaded.
fn oci_layout(rootfs: &Rootfs, reference: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cove-oci-{}", common::new_id()));
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = dir.join("layer.tar");
    let ok = std::process::Command::new("tar")
        .args(["-C", &rootfs.arg(), "--numeric-owner", "-cf"])
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let put = |path: &Path| -> (String, u64) {
        let out = std::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .unwrap();
        let hex = String::from_utf8(out.stdout).unwrap()[..64].to_string();
        let size = std::fs::metadata(path).unwrap().len();
        std::fs::rename(path, blobs.join(&hex)).unwrap();
        (hex, size)
    };
    let (layer_hex, layer_size) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh", "-c", "echo from-cmd $GREETING; pwd"],
                   "Env": ["GREETING=hello", "PATH=/bin"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]}
    });
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, config.to_string()).unwrap();
    let (cfg_hex, cfg_size) = put(&cfg);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{cfg_hex}"), "size": cfg_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": format!("sha256:{layer_hex}"), "size": layer_size}]
    });
    let m = dir.join("manifest.json");
    std::fs::write(&m, manifest.to_string()).unwrap();
    let (m_hex, m_size) = put(&m);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": format!("sha256:{m_hex}"), "size": m_size,
                       "annotations": {"org.opencontainers.image.ref.name": reference}}]
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir
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
