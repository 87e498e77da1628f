//! OCI image layouts: `oci-layout`, `index.json` and `blobs/sha256/<hex>`, as a directory or as an
//! archive (see the parent module for the archive pass).
//!
//! `index.json` may list several images, several platforms of one image (one entry each, or one
//! nested image index), or both. Entries are grouped by name; within a group, indexes are
//! followed (at most [`MAX_DEPTH`] deep) and the first manifest for this host's platform wins.
//! A manifest's platform is its descriptor's `platform`, or, when that is missing (skopeo writes
//! none for a single image), its config's `os` and `architecture`. Manifests of other platforms
//! are not fetched at all, so a layout holding only this host's blobs imports fine.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::{Cx, ImportError, MAX_JSON, host_platform_name, runs_here};
use crate::digest::Digest;
use crate::oci::{
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, AnyManifest, Descriptor, ImageConfig,
    LayoutFile, media,
};
use crate::reference::Reference;
use crate::store::ImageRecord;

/// Deepest nesting of image indexes followed.
const MAX_DEPTH: usize = 8;

/// Where the blob `digest` is in the layout directory `dir`.
pub(super) fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(digest.hex())
}

/// Reads `oci-layout` and `index.json` from a layout directory.
pub(super) fn read_dir_files(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), ImportError> {
    let read = |name: &str| -> Result<Vec<u8>, ImportError> {
        let path = dir.join(name);
        let not_layout = |reason: String| ImportError::NotAnImage {
            path: dir.to_path_buf(),
            reason,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_layout(format!(
                    "a directory without {name}, so not an OCI image layout"
                )));
            }
            Err(source) => {
                return Err(ImportError::Io {
                    op: "open",
                    path,
                    source,
                });
            }
        };
        let mut bytes = Vec::new();
        file.take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| ImportError::Io {
                op: "read",
                path: path.clone(),
                source,
            })?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(not_layout(format!(
                "its {name} is larger than {MAX_JSON} bytes"
            )));
        }
        Ok(bytes)
    };
    Ok((read("oci-layout")?, read("index.json")?))
}

/// The images of the layout whose `oci-layout` and `index.json` are given.
pub(super) fn images(
    cx: &mut Cx<'_>,
    layout: &[u8],
    index: &[u8],
    tag_override: Option<&Reference>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let layout: LayoutFile =
        serde_json::from_slice(layout).map_err(|source| ImportError::Json {
            what: format!("oci-layout of {}", cx.path.display()),
            source,
        })?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(ImportError::Unsupported {
            what: format!("the OCI layout {}", cx.path.display()),
            reason: format!("layout version {:?}", layout.image_layout_version),
        });
    }
    let index_what = format!("index.json of {}", cx.path.display());
    let index: AnyManifest = serde_json::from_slice(index).map_err(|source| ImportError::Json {
        what: index_what.clone(),
        source,
    })?;
    let entries = match classify(None, &index_what, index)? {
        Kind::Index(entries) if !entries.is_empty() => entries,
        _ => {
            return Err(ImportError::NotAnImage {
                path: cx.path.to_path_buf(),
                reason: "its index.json lists no manifests".into(),
            });
        }
    };
    let mut groups: Vec<(Reference, Vec<Descriptor>)> = Vec::new();
    for entry in entries {
        let reference = name(&entry, tag_override)?;
        match groups.iter_mut().find(|(r, _)| *r == reference) {
            Some((_, group)) => group.push(entry),
            None => groups.push((reference, vec![entry])),
        }
    }
    let mut records = Vec::new();
    for (reference, entries) in groups {
        let what = reference.to_string();
        let mut found = Vec::new();
        let (manifest, config, layers) =
            select(cx, &what, &entries, 0, &mut found)?.ok_or_else(|| ImportError::Platform {
                what: what.clone(),
                wanted: host_platform_name(),
                found: if found.is_empty() {
                    "no image manifests".into()
                } else {
                    found.join(", ")
                },
            })?;
        let image = cx.image(&what, manifest, &config, &layers)?;
        records.push(image.record(reference)?);
    }
    Ok(records)
}

/// The name of a top-level index entry (see the parent module for the order).
fn name(entry: &Descriptor, tag_override: Option<&Reference>) -> Result<Reference, ImportError> {
    let parse = |name: &str| {
        name.parse::<Reference>()
            .map_err(|source| ImportError::Name {
                name: name.to_string(),
                source,
            })
    };
    if let Some(full) = entry.annotation(ANNOTATION_CONTAINERD_NAME) {
        return parse(full);
    }
    let ref_name = entry.annotation(ANNOTATION_REF_NAME);
    if let Some(full) = ref_name.filter(|n| n.contains(['/', ':', '@'])) {
        return parse(full);
    }
    tag_override.cloned().ok_or_else(|| ImportError::NoName {
        what: match ref_name {
            Some(tag) => format!("image {} (tagged only {tag:?})", entry.digest),
            None => format!("image {}", entry.digest),
        },
    })
}

/// What a manifest-like blob is.
pub(crate) enum Kind {
    Index(Vec<Descriptor>),
    Manifest(Descriptor, Vec<Descriptor>),
    /// Something else (an artifact, a signature): its media type.
    Other(String),
}

/// Tells an index from a manifest by the descriptor's media type, else the document's own, else
/// by its fields.
pub(crate) fn classify(
    descriptor_type: Option<&str>,
    what: &str,
    doc: AnyManifest,
) -> Result<Kind, ImportError> {
    if let Some(version) = doc.schema_version
        && version != 2
    {
        return Err(ImportError::Unsupported {
            what: what.to_string(),
            reason: format!("schema version {version} (only 2 exists in OCI and Docker today)"),
        });
    }
    let invalid = |reason: &str| ImportError::Invalid {
        what: what.to_string(),
        reason: reason.to_string(),
    };
    let media_type = descriptor_type.or(doc.media_type.as_deref());
    let is_index = match media_type {
        Some(media::OCI_INDEX | media::DOCKER_LIST) => true,
        Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST) => false,
        Some(other) => return Ok(Kind::Other(other.to_string())),
        None if doc.manifests.is_some() => true,
        None if doc.config.is_some() => false,
        None => return Ok(Kind::Other("no media type".into())),
    };
    if is_index {
        let manifests = doc
            .manifests
            .ok_or_else(|| invalid("an index without manifests"))?;
        Ok(Kind::Index(manifests))
    } else {
        let config = doc
            .config
            .ok_or_else(|| invalid("a manifest without config"))?;
        let layers = doc
            .layers
            .ok_or_else(|| invalid("a manifest without layers"))?;
        Ok(Kind::Manifest(config, layers))
    }
}

/// The first manifest among `entries` (following indexes) that runs here: its digest, config
/// and layers. Platforms passed over are added to `found`.
fn select(
    cx: &mut Cx<'_>,
    what: &str,
    entries: &[Descriptor],
    depth: usize,
    found: &mut Vec<String>,
) -> Result<Option<(Digest, Descriptor, Vec<Descriptor>)>, ImportError> {
    for entry in entries {
        let may_be_manifest = matches!(
            entry.media_type.as_deref(),
            None | Some(media::OCI_MANIFEST | media::DOCKER_MANIFEST)
        );
        if let Some(p) = &entry.platform
            && may_be_manifest
            && !runs_here(Some(&p.os), Some(&p.architecture))
        {
            found.push(platform_name(&p.os, &p.architecture, p.variant.as_deref()));
            continue;
        }
        let entry_what = format!("manifest {} of {what}", entry.digest);
        let doc: AnyManifest = cx.read_json(entry, &entry_what)?;
        match classify(entry.media_type.as_deref(), &entry_what, doc)? {
            Kind::Index(nested) => {
                if depth >= MAX_DEPTH {
                    return Err(ImportError::Unsupported {
                        what: what.to_string(),
                        reason: format!("image indexes nested more than {MAX_DEPTH} deep"),
                    });
                }
                if let Some(chosen) = select(cx, what, &nested, depth + 1, found)? {
                    return Ok(Some(chosen));
                }
            }
            Kind::Manifest(config, layers) => {
                if entry.platform.is_none() {
                    let image: ImageConfig =
                        cx.read_json(&config, &format!("the config of {what}"))?;
                    let (os, arch) = (image.os.as_deref(), image.architecture.as_deref());
                    if !runs_here(os, arch) {
                        found.push(platform_name(os.unwrap_or("?"), arch.unwrap_or("?"), None));
                        continue;
                    }
                }
                return Ok(Some((entry.digest, config, layers)));
            }
            Kind::Other(media_type) => found.push(format!("{media_type} (not an image)")),
        }
    }
    Ok(None)
}

pub(crate) fn platform_name(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }
}
