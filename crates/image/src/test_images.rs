//! Test images built in memory: layer tars (with the unpacker tests' tar writer, which also
//! writes hostile names), configs and manifests, OCI layouts as directories or archives, and
//! docker-save archives, plus a temporary directory that removes itself.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

pub(crate) use crate::unpack::tests::{E, tar};
use crate::{Digest, SANDBOX_ID_BASE, Store};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed (with everything in it) on drop.
pub(crate) struct TempDir {
    pub(crate) path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("cove-image-test-{}-{n}-{tag}", std::process::id()));
        fs::create_dir(&path).unwrap();
        TempDir { path }
    }

    pub(crate) fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// A store at `<dir>/store` with the production id shift.
    pub(crate) fn store(&self) -> Store {
        Store::open(self.join("store"), SANDBOX_ID_BASE).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Names in a directory, sorted (empty if it does not exist).
pub(crate) fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

pub(crate) use crate::pull::error_chain as chain;

/// A layer tar holding regular files `(path, content)`.
pub(crate) fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<E> = files
        .iter()
        .map(|(p, c)| E::file(p, c.as_bytes()))
        .collect();
    tar(&entries)
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A blob: content and digest.
#[derive(Clone)]
pub(crate) struct Blob {
    pub(crate) bytes: Vec<u8>,
    pub(crate) digest: Digest,
}

impl Blob {
    pub(crate) fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: Digest::of(&bytes),
            bytes,
        }
    }

    pub(crate) fn json(value: &Value) -> Blob {
        Blob::new(serde_json::to_vec(value).unwrap())
    }

    pub(crate) fn descriptor(&self, media_type: &str) -> Value {
        json!({
            "mediaType": media_type,
            "digest": self.digest.to_string(),
            "size": self.bytes.len(),
        })
    }
}

/// An image: config, layer blobs (bottom first) and an OCI manifest for them.
#[derive(Clone)]
pub(crate) struct TestImage {
    pub(crate) config: Blob,
    pub(crate) layers: Vec<Blob>,
    pub(crate) manifest: Blob,
}

impl TestImage {
    /// An image for linux/`arch` with these (uncompressed) layer tars, gzipped if `gzipped`,
    /// and a config that sets every field Cove runs with.
    pub(crate) fn new(arch: &str, layer_tars: &[Vec<u8>], gzipped: bool) -> TestImage {
        TestImage::with_config(arch, layer_tars, gzipped, sample_config())
    }

    /// The same with `container_config` as the config's `config` object.
    pub(crate) fn with_config(
        arch: &str,
        layer_tars: &[Vec<u8>],
        gzipped: bool,
        container_config: Value,
    ) -> TestImage {
        let diff_ids: Vec<String> = layer_tars
            .iter()
            .map(|t| Digest::of(t).to_string())
            .collect();
        let config = Blob::json(&json!({
            "architecture": arch,
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "config": container_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "test"}],
        }));
        let layers: Vec<Blob> = layer_tars
            .iter()
            .map(|t| Blob::new(if gzipped { gzip(t) } else { t.clone() }))
            .collect();
        let layer_type = if gzipped {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        let manifest = Blob::json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
            "layers": layers.iter().map(|l| l.descriptor(layer_type)).collect::<Vec<_>>(),
            "annotations": {"org.opencontainers.image.created": "2026-01-01T00:00:00Z"},
        }));
        TestImage {
            config,
            layers,
            manifest,
        }
    }

    pub(crate) fn layer_digests(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| l.digest).collect()
    }
}

/// The `config` object [`TestImage::new`] uses.
pub(crate) fn sample_config() -> Value {
    json!({
        "User": "1000:1000",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello world"],
        "Entrypoint": ["/bin/entry"],
        "Cmd": ["serve", "--port", "80"],
        "WorkingDir": "/srv",
        "Labels": {"org.example": "yes"},
    })
}

/// An OCI image layout being built.
#[derive(Default)]
pub(crate) struct Layout {
    blobs: BTreeMap<String, Vec<u8>>,
    index: Vec<Value>,
}

impl Layout {
    /// Adds a blob (config, layer, manifest, index).
    pub(crate) fn add_blob(&mut self, blob: &Blob) {
        self.blobs.insert(blob.digest.hex(), blob.bytes.clone());
    }

    /// Adds an image's blobs and returns its manifest's descriptor.
    pub(crate) fn add_image(&mut self, image: &TestImage) -> Value {
        self.add_blob(&image.config);
        for layer in &image.layers {
            self.add_blob(layer);
        }
        self.add_blob(&image.manifest);
        image.manifest.descriptor(OCI_MANIFEST)
    }

    /// Adds an image index over `manifests` and returns its descriptor.
    pub(crate) fn add_index(&mut self, manifests: Vec<Value>) -> Value {
        let index = Blob::json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": manifests,
        }));
        self.add_blob(&index);
        index.descriptor(OCI_INDEX)
    }

    /// Lists `descriptor` in `index.json`.
    pub(crate) fn list(&mut self, descriptor: Value) {
        self.index.push(descriptor);
    }

    /// Replaces the content stored for `digest` (which keeps its name).
    pub(crate) fn corrupt(&mut self, digest: &Digest, bytes: &[u8]) {
        self.blobs.insert(digest.hex(), bytes.to_vec());
    }

    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": self.index,
        });
        let mut files = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion": "1.0.0"}"#.to_vec(),
            ),
            (
                "index.json".to_string(),
                serde_json::to_vec(&index).unwrap(),
            ),
        ];
        for (hex, bytes) in &self.blobs {
            files.push((format!("blobs/sha256/{hex}"), bytes.clone()));
        }
        files
    }

    /// Writes the layout as a directory at `dir`.
    pub(crate) fn write_dir(&self, dir: &Path) {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        for (name, bytes) in self.files() {
            fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// The layout as a tar archive, blobs first and the metadata files last, so the archive
    /// pass cannot depend on seeing `index.json` before the blobs.
    pub(crate) fn tar(&self) -> Vec<u8> {
        let mut entries = vec![E::dir("blobs/"), E::dir("blobs/sha256/")];
        let mut files = self.files();
        files.rotate_left(2);
        entries.extend(files.iter().map(|(n, b)| E::file(n, b)));
        tar(&entries)
    }
}

/// Adds `key: value` to a descriptor's annotations.
pub(crate) fn annotated(mut descriptor: Value, key: &str, value: &str) -> Value {
    descriptor["annotations"][key] = json!(value);
    descriptor
}

/// Adds a platform to a descriptor.
pub(crate) fn for_platform(mut descriptor: Value, os: &str, arch: &str) -> Value {
    descriptor["platform"] = json!({"os": os, "architecture": arch});
    descriptor
}

/// A `docker save` archive in the pre-25 format: `<id>/layer.tar` per layer (a layer shared with
/// an earlier image is a symlink to the first copy, as Docker writes it), `<id>/json` and
/// `<id>/VERSION` beside it, `<config hex>.json`, `manifest.json` and `repositories`.
pub(crate) fn docker_save(images: &[(&TestImage, &[&str])]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut manifest = Vec::new();
    let mut first_copy: BTreeMap<Digest, String> = BTreeMap::new();
    let mut next_id = 0u32;
    for (image, tags) in images {
        let mut layer_paths = Vec::new();
        for layer in &image.layers {
            next_id += 1;
            let id = format!("{next_id:064x}");
            entries.push(E::dir(&format!("{id}/")));
            entries.push(E::file(&format!("{id}/VERSION"), b"1.0"));
            entries.push(E::file(
                &format!("{id}/json"),
                format!(r#"{{"id":"{id}"}}"#).as_bytes(),
            ));
            let path = format!("{id}/layer.tar");
            match first_copy.get(&layer.digest) {
                Some(first) => entries.push(E::symlink(&path, &format!("../{first}"))),
                None => {
                    entries.push(E::file(&path, &layer.bytes));
                    first_copy.insert(layer.digest, path.clone());
                }
            }
            layer_paths.push(path);
        }
        let config_name = format!("{}.json", image.config.digest.hex());
        entries.push(E::file(&config_name, &image.config.bytes));
        manifest.push(json!({
            "Config": config_name,
            "RepoTags": if tags.is_empty() { Value::Null } else { json!(tags) },
            "Layers": layer_paths,
        }));
    }
    entries.push(E::file(
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    ));
    entries.push(E::file("repositories", b"{}"));
    tar(&entries)
}
