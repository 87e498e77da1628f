//! Images for the tests, built from Debian's static busybox: nothing is downloaded.

use std::path::{Path, PathBuf};

/// A busybox root filesystem in a fresh directory, removed on drop.
pub struct Rootfs(pub PathBuf);

impl Rootfs {
    pub fn new() -> Rootfs {
        let dir = std::env::temp_dir().join(format!("cove-rootfs-{}", super::new_id()));
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

    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for Rootfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An OCI image layout directory holding the busybox rootfs as one layer, named `reference`,
/// with a config that sets Cmd, Env and WorkingDir. Built with tar and sha256sum, as a user's
/// build tool would: nothing is downloaded.
pub fn oci_layout(rootfs: &Rootfs, reference: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cove-oci-{}", super::new_id()));
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
