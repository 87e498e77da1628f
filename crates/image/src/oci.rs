//! The few OCI image-spec and Docker structures import reads and writes, hand-written.
//!
//! Rejected: the `oci-spec` crate. Its types are builders over every optional field of three
//! specs, while import needs six structs, and hand-written ones let us accept what real archives
//! contain (a descriptor without `mediaType`, `null` where a list is expected) without a fork.
//! Input from images ignores fields it does not know (images carry many: history, labels,
//! healthchecks); every field we do read has an explicit type, so a wrong shape is an error,
//! not a silent default.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::store::RunConfig;

/// Media types import recognises.
pub(crate) mod media {
    pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub(crate) const DOCKER_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub(crate) const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub(crate) const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

    /// Layer media types whose blobs are tar streams (compression is sniffed from the bytes
    /// anyway): OCI's, their deprecated "nondistributable" forms, and Docker's.
    pub(crate) const LAYERS: &[&str] = &[
        OCI_LAYER,
        OCI_LAYER_GZIP,
        OCI_LAYER_ZSTD,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
}

/// `org.opencontainers.image.ref.name`: the name of an image in a layout's `index.json`.
pub(crate) const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// `io.containerd.image.name`: the full reference containerd, nerdctl, BuildKit and Docker ≥ 25
/// write next to a `ref.name` that holds only the tag.
pub(crate) const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: Digest,
    pub(crate) size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) platform: Option<Platform>,
}

impl Descriptor {
    pub(crate) fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// The platform of a manifest in an index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) variant: Option<String>,
}

/// An image index / manifest list, or an image manifest: which one is told by the media type,
/// and, when that is missing, by which fields are present.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AnyManifest {
    pub(crate) schema_version: Option<u32>,
    pub(crate) media_type: Option<String>,
    pub(crate) manifests: Option<Vec<Descriptor>>,
    pub(crate) config: Option<Descriptor>,
    pub(crate) layers: Option<Vec<Descriptor>>,
}

/// An image manifest as import writes it for a docker-save archive, which has none.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManifestOut {
    pub(crate) schema_version: u32,
    pub(crate) media_type: &'static str,
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

/// The `oci-layout` file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LayoutFile {
    pub(crate) image_layout_version: String,
}

/// An image configuration (`application/vnd.oci.image.config.v1+json`, Docker's is the same).
#[derive(Debug, Deserialize)]
pub(crate) struct ImageConfig {
    pub(crate) architecture: Option<String>,
    pub(crate) os: Option<String>,
    pub(crate) config: Option<ContainerConfig>,
    pub(crate) rootfs: Option<RootFs>,
}

/// The `config` object of an image configuration: how to run the image.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ContainerConfig {
    pub(crate) user: Option<String>,
    pub(crate) exposed_ports: Option<BTreeMap<String, IgnoredAny>>,
    pub(crate) env: Option<Vec<String>>,
    pub(crate) entrypoint: Option<Vec<String>>,
    pub(crate) cmd: Option<Vec<String>>,
    pub(crate) working_dir: Option<String>,
}

impl ContainerConfig {
    /// The fields Cove runs an image with. Empty strings mean "not set"; a port without a
    /// protocol is TCP, as Docker reads it.
    pub(crate) fn run_config(self) -> RunConfig {
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        RunConfig {
            entrypoint: self.entrypoint.unwrap_or_default(),
            cmd: self.cmd.unwrap_or_default(),
            env: self.env.unwrap_or_default(),
            working_dir: non_empty(self.working_dir),
            user: non_empty(self.user),
            exposed_ports: self
                .exposed_ports
                .unwrap_or_default()
                .into_keys()
                .map(|p| {
                    if p.contains('/') {
                        p
                    } else {
                        format!("{p}/tcp")
                    }
                })
                .collect(),
        }
    }
}

/// `rootfs` of an image configuration.
#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    pub(crate) diff_ids: Vec<Digest>,
}

/// One image in a docker-save archive's `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DockerArchiveImage {
    /// Archive path of the configuration.
    pub(crate) config: String,
    /// `name:tag` references; `null` when the image was saved by id.
    pub(crate) repo_tags: Option<Vec<String>>,
    /// Archive paths of the layer tars, bottom first.
    pub(crate) layers: Vec<String>,
}

/// The platform this process runs on, in OCI's (Go's) words: `linux` and `amd64`, `arm64`, ...
pub(crate) fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other, // arm, riscv64, s390x, mips64, ... are spelled the same
    };
    ("linux", arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_config_fields_and_their_defaults() {
        let json = r#"{
            "architecture": "amd64", "os": "linux", "history": [{"created_by": "x"}],
            "config": {
                "User": "nginx", "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}},
                "Env": ["PATH=/usr/bin", "A=b=c"], "Entrypoint": ["/docker-entrypoint.sh"],
                "Cmd": ["nginx", "-g", "daemon off;"], "WorkingDir": "/srv",
                "Labels": {"a": "b"}, "StopSignal": "SIGQUIT", "Healthcheck": {"Test": ["NONE"]}
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let config: ImageConfig = serde_json::from_str(json).unwrap();
        let run = config.config.unwrap().run_config();
        assert_eq!(
            run,
            RunConfig {
                entrypoint: vec!["/docker-entrypoint.sh".into()],
                cmd: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
                env: vec!["PATH=/usr/bin".into(), "A=b=c".into()],
                working_dir: Some("/srv".into()),
                user: Some("nginx".into()),
                exposed_ports: vec!["53/udp".into(), "80/tcp".into(), "8080/tcp".into()],
            }
        );
        let nulls = r#"{"config": {"Entrypoint": null, "Cmd": null, "Env": null,
            "ExposedPorts": null, "User": "", "WorkingDir": ""}}"#;
        let config: ImageConfig = serde_json::from_str(nulls).unwrap();
        assert_eq!(config.config.unwrap().run_config(), RunConfig::default());
        assert!(serde_json::from_str::<ImageConfig>(r#"{"config": {"Cmd": "sh"}}"#).is_err());
    }
}
