//! `docker save` / `podman save` archives: `manifest.json` lists each image's config file, its
//! `RepoTags` and its layer files, by archive path.
//!
//! The archive has no OCI manifest, so import writes one (config and layers as descriptors, the
//! layer media type from the blob's first bytes) and stores it: every record then names a
//! manifest, whatever the source. Its digest is ours, not one a registry would show.
//!
//! The archive names files, not digests, so what can be checked is checked against the config:
//! a config file named `<hex>.json` (Docker and Podman name it by its digest) must have that
//! digest, and an uncompressed layer must have the digest the config's `rootfs.diff_ids` lists
//! for it, as `docker load` checks. (A compressed layer's diff id is the digest of its
//! decompressed content, which is not computed here.)

use std::io::Read;

use super::archive::{Contents, Stored};
use super::{Cx, ImportError, store_err};
use crate::digest::Digest;
use crate::oci::{DockerArchiveImage, ManifestOut, media};
use crate::reference::Reference;
use crate::store::ImageRecord;
use crate::unpack::Compression;

/// The images `manifest.json` lists.
pub(super) fn images(
    cx: &mut Cx<'_>,
    manifest: &[u8],
    contents: &Contents,
    tag_override: Option<&Reference>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let entries: Vec<DockerArchiveImage> =
        serde_json::from_slice(manifest).map_err(|source| ImportError::Json {
            what: format!("manifest.json of {}", cx.path.display()),
            source,
        })?;
    if entries.is_empty() {
        return Err(ImportError::NotAnImage {
            path: cx.path.to_path_buf(),
            reason: "its manifest.json lists no images".into(),
        });
    }
    let mut records = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let references = match entry.repo_tags.as_deref() {
            Some(tags) if !tags.is_empty() => tags
                .iter()
                .map(|t| {
                    t.parse().map_err(|source| ImportError::Name {
                        name: t.clone(),
                        source,
                    })
                })
                .collect::<Result<Vec<Reference>, _>>()?,
            _ => vec![tag_override.cloned().ok_or_else(|| ImportError::NoName {
                what: format!("image {} of manifest.json ({})", i + 1, entry.config),
            })?],
        };
        let what = references[0].to_string();
        let file = |name: &str, role: String| {
            contents.lookup(name).ok_or_else(|| ImportError::Missing {
                what: format!("{role} {name:?}, named by manifest.json,"),
                path: cx.path.to_path_buf(),
            })
        };
        let config = file(&entry.config, format!("the config of {what}"))?;
        check_config_name(&entry.config, config, &what)?;
        let layers = entry
            .layers
            .iter()
            .enumerate()
            .map(|(n, l)| file(l, format!("layer {} of {what}", n + 1)))
            .collect::<Result<Vec<Stored>, _>>()?;
        let (config, layers) = descriptors(cx, config, &layers, &what)?;
        let json = serde_json::to_vec(&ManifestOut {
            schema_version: 2,
            media_type: media::OCI_MANIFEST,
            config: config.clone(),
            layers: layers.clone(),
        })
        .expect("a manifest serialises");
        let manifest = cx
            .store
            .put_blob_tracked(&json[..], None, cx.added)
            .map_err(store_err(format!("cannot store the manifest of {what}")))?;
        let image = cx.image(&what, manifest, &config, &layers)?;
        if let Some(diff_ids) = &image.diff_ids {
            for (n, (layer, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
                if layer.media_type.as_deref() == Some(media::OCI_LAYER) && layer.digest != *diff_id
                {
                    return Err(ImportError::Digest {
                        what: format!("layer {} of {what} (uncompressed)", n + 1),
                        expected: *diff_id,
                        actual: layer.digest,
                    });
                }
            }
        }
        for reference in references {
            records.push(image.record(reference)?);
        }
    }
    Ok(records)
}

/// Docker and Podman name the config `<hex>.json` after its digest; if it is so named, it must
/// have that digest.
fn check_config_name(name: &str, config: Stored, what: &str) -> Result<(), ImportError> {
    let stem = name.trim_start_matches("./").strip_suffix(".json");
    if let Some(named) = stem.and_then(|hex| Digest::from_hex(hex).ok())
        && named != config.digest
    {
        return Err(ImportError::Digest {
            what: format!("the config of {what} ({name:?})"),
            expected: named,
            actual: config.digest,
        });
    }
    Ok(())
}

/// Descriptors for the config and layers, with each layer's media type read off its first bytes.
fn descriptors(
    cx: &Cx<'_>,
    config: Stored,
    layers: &[Stored],
    what: &str,
) -> Result<(crate::oci::Descriptor, Vec<crate::oci::Descriptor>), ImportError> {
    let descriptor = |stored: Stored, media_type: &str| crate::oci::Descriptor {
        media_type: Some(media_type.to_string()),
        digest: stored.digest,
        size: stored.size,
        annotations: None,
        platform: None,
    };
    let mut out = Vec::new();
    for (n, layer) in layers.iter().enumerate() {
        let mut head = [0u8; 4];
        let mut blob = cx
            .store
            .open_blob(&layer.digest)
            .map_err(store_err(format!("cannot open layer {} of {what}", n + 1)))?;
        let len = read_head(&mut blob, &mut head).map_err(|source| ImportError::Io {
            op: "read",
            path: cx.store.blob_path(&layer.digest),
            source,
        })?;
        let media_type = match Compression::sniff(&head[..len]) {
            Compression::None => media::OCI_LAYER,
            Compression::Gzip => media::OCI_LAYER_GZIP,
            Compression::Zstd => media::OCI_LAYER_ZSTD,
        };
        out.push(descriptor(*layer, media_type));
    }
    Ok((descriptor(config, media::OCI_CONFIG), out))
}

/// Reads up to `buf.len()` bytes; fewer only at the end of the file.
fn read_head(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut len = 0;
    while len < buf.len() {
        match reader.read(&mut buf[len..])? {
            0 => break,
            n => len += n,
        }
    }
    Ok(len)
}
