//! Image import from files: an OCI image layout (a directory, or the same as a tar archive) and
//! a `docker save` / `podman save` archive. No registry is involved.
//!
//! The steps, in order:
//!
//! 1. **Read the source.** A layout directory is read in place: a blob is copied into the store
//!    when a manifest names it, and only from `blobs/sha256/<hex>` (which may not be a symlink),
//!    so its content is verified against the name as it is copied. An archive is read once, as a
//!    stream (`archive`): every regular file goes into the store under the digest of its
//!    content (a `blobs/sha256/<hex>` entry must have that digest), and the small metadata
//!    files (`oci-layout`, `index.json`, `manifest.json`) are kept in memory. Entry names are
//!    only ever map keys, never paths on disk. The archive itself may be gzip or zstd
//!    compressed (`docker save | gzip`).
//! 2. **Find the images** (`layout` or `docker`): index entries grouped by name, nested indexes
//!    followed, the manifest for this host's platform picked (linux and the running
//!    architecture); or `manifest.json`'s entries, for which an OCI manifest is written, since
//!    the archive has none. Only blobs the source contains may be used, even if the store
//!    already holds others with the digests named: naming a digest is not having its content.
//!    Every descriptor's size is checked too.
//! 3. **Read each config** for the fields Cove runs with, and check the platform.
//! 4. **Unpack every layer** now, so that a hostile or broken layer fails the import, not the
//!    first sandbox.
//! 5. **Save the records**, all at the end: an import that fails saves none.
//!
//! The store is held ([`Store::hold`]) throughout, so a concurrent prune cannot remove a blob
//! stored in step 1 before step 5 names it. Afterwards, whether the import worked or not, the
//! blobs and layers it added that no record names (other platforms', a docker archive's legacy
//! files, everything after a failure) are removed again, unless another import is running.
//!
//! Names: a layout entry is named by its `io.containerd.image.name` annotation, else by
//! `org.opencontainers.image.ref.name` when that is a full reference (it may be a bare tag like
//! `1.36`, which names no repository), else by the tag override; a docker archive's image by its
//! `RepoTags`, else by the override. An image nothing names is an error asking for `--tag`.
//!
//! Rejected: extracting an archive to a temporary directory and importing that as a layout. It
//! would create files at paths the archive names, which is exactly what the layer unpacker
//! exists to do safely, and this pass needs none of it.

mod archive;
mod docker;
pub(crate) mod layout;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::digest::Digest;
use crate::oci::{Descriptor, ImageConfig, host_platform, media};
use crate::reference::{Reference, ReferenceError};
use crate::store::{Added, ImageRecord, RunConfig, Store, StoreError};

/// Largest manifest, index or config read into memory.
const MAX_JSON: u64 = 16 << 20;

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The tag override is not a valid reference.
    #[error("invalid tag override")]
    Tag {
        /// Why.
        #[source]
        source: ReferenceError,
    },
    /// A file of the source could not be opened or read.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The archive could not be read, decompressed or parsed as tar.
    #[error("cannot read archive {}{}", path.display(), after(last_entry.as_deref()))]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The last entry read successfully, if any.
        last_entry: Option<String>,
        /// The read or tar error.
        #[source]
        source: io::Error,
    },
    /// An archive entry has a name (or link target) we refuse.
    #[error("archive {} has an entry named {entry:?}, which {reason}", path.display())]
    EntryName {
        /// The archive.
        path: PathBuf,
        /// The entry name, lossily decoded.
        entry: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path is neither an OCI layout nor an image archive.
    #[error("{} is not an image: {reason}", path.display())]
    NotAnImage {
        /// The path given.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A JSON document of the image does not parse.
    #[error("{what} is not valid")]
    Json {
        /// Which document.
        what: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The image uses something import does not support.
    #[error("{what} is not supported: {reason}")]
    Unsupported {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// The image's documents contradict each other.
    #[error("{what} is invalid: {reason}")]
    Invalid {
        /// What.
        what: String,
        /// How.
        reason: String,
    },
    /// A name in the image is not a valid reference.
    #[error("image name {name:?} in the source is invalid")]
    Name {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: ReferenceError,
    },
    /// An image the source does not name, and no tag override was given.
    #[error("{what} is not named by the source; name it with --tag NAME[:TAG]")]
    NoName {
        /// The image.
        what: String,
    },
    /// No manifest for this host's platform.
    #[error("{what} has no image for {wanted}; found: {found}")]
    Platform {
        /// The image.
        what: String,
        /// This host's platform.
        wanted: String,
        /// The platforms found.
        found: String,
    },
    /// A blob a manifest names is not in the source.
    #[error("{what} is missing from {}", path.display())]
    Missing {
        /// Which blob.
        what: String,
        /// The source.
        path: PathBuf,
    },
    /// A blob's size differs from its descriptor's.
    #[error("{what} has {actual} bytes, but its descriptor says {expected}")]
    Size {
        /// Which blob.
        what: String,
        /// The descriptor's size.
        expected: u64,
        /// The blob's size.
        actual: u64,
    },
    /// Content does not have the digest something names it by.
    #[error("{what} has digest {actual}, not {expected}")]
    Digest {
        /// Which content, named by what.
        what: String,
        /// The digest it is named by.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// A store operation failed.
    #[error("{context}")]
    Store {
        /// What was being done.
        context: String,
        /// The store's error (boxed: an unpack error inside it is large).
        #[source]
        source: Box<StoreError>,
    },
}

fn after(last: Option<&str>) -> String {
    last.map(|e| format!(" after entry {e:?}"))
        .unwrap_or_default()
}

fn store_err(context: impl Into<String>) -> impl FnOnce(StoreError) -> ImportError {
    let context = context.into();
    move |source| ImportError::Store {
        context,
        source: Box::new(source),
    }
}

/// Imports every image in the OCI layout directory, OCI layout archive or docker-save archive
/// at `path` into `store`, and returns their records. `tag_override` names the images the source
/// does not name itself.
pub fn import(
    store: &Store,
    path: &Path,
    tag_override: Option<&str>,
) -> Result<Vec<ImageRecord>, ImportError> {
    let tag_override = tag_override
        .map(str::parse::<Reference>)
        .transpose()
        .map_err(|source| ImportError::Tag { source })?;
    let mut added = Added::default();
    let result = import_held(store, path, tag_override.as_ref(), &mut added);
    store.discard_unreferenced(&added);
    result
}

fn import_held(
    store: &Store,
    path: &Path,
    tag_override: Option<&Reference>,
    added: &mut Added,
) -> Result<Vec<ImageRecord>, ImportError> {
    let _hold = store
        .hold()
        .map_err(store_err("cannot hold the image store"))?;
    let meta = fs::metadata(path).map_err(|source| ImportError::Io {
        op: "inspect",
        path: path.to_path_buf(),
        source,
    })?;
    let mut images = if meta.is_dir() {
        let (layout, index) = layout::read_dir_files(path)?;
        let mut cx = Cx::new(store, path, Source::Dir, added);
        layout::images(&mut cx, &layout, &index, tag_override)?
    } else {
        let contents = archive::read(store, path, added)?;
        let mut cx = Cx::new(store, path, Source::Archive(contents.digests()), added);
        match (&contents.oci_layout, &contents.index, &contents.manifest) {
            (Some(layout), Some(index), _) => layout::images(&mut cx, layout, index, tag_override)?,
            (_, _, Some(manifest)) => docker::images(&mut cx, manifest, &contents, tag_override)?,
            _ => {
                return Err(ImportError::NotAnImage {
                    path: path.to_path_buf(),
                    reason: "the archive has neither oci-layout and index.json (an OCI layout) \
                             nor manifest.json (docker save)"
                        .into(),
                });
            }
        }
    };
    // One record per reference; a later image with the same name wins, as with `docker load`.
    let mut seen = HashSet::new();
    images.reverse();
    images.retain(|i| seen.insert(i.reference.clone()));
    images.reverse();
    for image in &images {
        for (i, layer) in image.layers.iter().enumerate() {
            store
                .layer_dir_tracked(layer, added)
                .map_err(store_err(format!(
                    "cannot unpack layer {} of {}",
                    i + 1,
                    image.reference
                )))?;
        }
    }
    for image in &images {
        store
            .save_image_held(image)
            .map_err(store_err(format!("cannot save {}", image.reference)))?;
    }
    Ok(images)
}

/// Where an import's blobs come from.
enum Source {
    /// An OCI layout directory (the import path): blobs are copied in when first named.
    Dir,
    /// An archive already copied into the store: only the blobs it contained may be used.
    Archive(HashSet<Digest>),
}

/// The state of one import: where blobs come from and what it added to the store.
struct Cx<'a> {
    store: &'a Store,
    path: &'a Path,
    source: Source,
    added: &'a mut Added,
    /// Blobs already taken from the source by this import.
    fetched: HashSet<Digest>,
}

/// An image found in the source, before it has a name.
struct Found {
    manifest_digest: Digest,
    config_digest: Digest,
    layers: Vec<Digest>,
    config: RunConfig,
    diff_ids: Option<Vec<Digest>>,
}

impl Found {
    /// The record of this image under `reference`, which may only name it by this digest.
    fn record(&self, reference: Reference) -> Result<ImageRecord, ImportError> {
        if let Some(digest) = reference.digest()
            && *digest != self.manifest_digest
        {
            return Err(ImportError::Digest {
                what: format!("the manifest named {reference}"),
                expected: *digest,
                actual: self.manifest_digest,
            });
        }
        Ok(ImageRecord {
            reference,
            manifest_digest: self.manifest_digest,
            config_digest: self.config_digest,
            layers: self.layers.clone(),
            config: self.config.clone(),
        })
    }
}

/// "linux/amd64" for the running host.
pub(crate) fn host_platform_name() -> String {
    let (os, arch) = host_platform();
    format!("{os}/{arch}")
}

/// Whether an image for `os`/`arch` runs here; an unstated field does not disqualify it.
pub(crate) fn runs_here(os: Option<&str>, arch: Option<&str>) -> bool {
    let (host_os, host_arch) = host_platform();
    os.is_none_or(|os| os == host_os) && arch.is_none_or(|arch| arch == host_arch)
}

impl<'a> Cx<'a> {
    fn new(store: &'a Store, path: &'a Path, source: Source, added: &'a mut Added) -> Cx<'a> {
        Cx {
            store,
            path,
            source,
            added,
            fetched: HashSet::new(),
        }
    }

    /// Makes sure the blob `desc` names is in the store, taken from the source and verified,
    /// and has the descriptor's size.
    fn fetch(&mut self, desc: &Descriptor, what: &str) -> Result<(), ImportError> {
        let digest = desc.digest;
        let missing = || ImportError::Missing {
            what: format!("{what} ({digest})"),
            path: self.path.to_path_buf(),
        };
        if !self.fetched.contains(&digest) {
            match &self.source {
                Source::Dir => {
                    let file = layout::blob_path(self.path, &digest);
                    let reader = match OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&file)
                    {
                        Ok(f) => f,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                        Err(source) => {
                            return Err(ImportError::Io {
                                op: "open",
                                path: file,
                                source,
                            });
                        }
                    };
                    self.store
                        .put_blob_tracked(BufReader::new(reader), Some(&digest), self.added)
                        .map_err(store_err(format!(
                            "cannot copy {what} from {}",
                            file.display()
                        )))?;
                }
                Source::Archive(digests) => {
                    if !digests.contains(&digest) {
                        return Err(missing());
                    }
                }
            }
            self.fetched.insert(digest);
        }
        let actual = self
            .store
            .blob_size(&digest)
            .map_err(store_err(format!("cannot inspect {what}")))?;
        if actual != desc.size {
            return Err(ImportError::Size {
                what: format!("{what} ({digest})"),
                expected: desc.size,
                actual,
            });
        }
        Ok(())
    }

    /// Fetches the JSON blob `desc` names and parses it.
    fn read_json<T: DeserializeOwned>(
        &mut self,
        desc: &Descriptor,
        what: &str,
    ) -> Result<T, ImportError> {
        self.fetch(desc, what)?;
        let bytes = self
            .store
            .read_blob(&desc.digest, MAX_JSON)
            .map_err(store_err(format!("cannot read {what}")))?;
        serde_json::from_slice(&bytes).map_err(|source| ImportError::Json {
            what: format!("{what} ({})", desc.digest),
            source,
        })
    }

    /// Reads the config and fetches the layers of the image whose manifest is
    /// `manifest_digest`; `what` names the image in errors.
    fn image(
        &mut self,
        what: &str,
        manifest_digest: Digest,
        config: &Descriptor,
        layers: &[Descriptor],
    ) -> Result<Found, ImportError> {
        if let Some(media_type) = config.media_type.as_deref()
            && ![media::OCI_CONFIG, media::DOCKER_CONFIG].contains(&media_type)
        {
            return Err(ImportError::Unsupported {
                what: what.to_string(),
                reason: format!(
                    "its config has media type {media_type:?}, so it is not a container image"
                ),
            });
        }
        let image: ImageConfig = self.read_json(config, &format!("the config of {what}"))?;
        if !runs_here(image.os.as_deref(), image.architecture.as_deref()) {
            return Err(ImportError::Platform {
                what: what.to_string(),
                wanted: host_platform_name(),
                found: format!(
                    "{}/{}",
                    image.os.as_deref().unwrap_or("?"),
                    image.architecture.as_deref().unwrap_or("?")
                ),
            });
        }
        for (i, layer) in layers.iter().enumerate() {
            let layer_what = format!("layer {} of {what}", i + 1);
            if let Some(media_type) = layer.media_type.as_deref()
                && !media::LAYERS.contains(&media_type)
            {
                return Err(ImportError::Unsupported {
                    what: layer_what,
                    reason: format!("media type {media_type:?} is not a tar layer"),
                });
            }
            self.fetch(layer, &layer_what)?;
        }
        let diff_ids = image.rootfs.map(|r| r.diff_ids);
        if let Some(diff_ids) = &diff_ids
            && diff_ids.len() != layers.len()
        {
            return Err(ImportError::Invalid {
                what: what.to_string(),
                reason: format!(
                    "its manifest lists {} layers, but its config's rootfs lists {}",
                    layers.len(),
                    diff_ids.len()
                ),
            });
        }
        Ok(Found {
            manifest_digest,
            config_digest: config.digest,
            layers: layers.iter().map(|l| l.digest).collect(),
            config: image.config.unwrap_or_default().run_config(),
            diff_ids,
        })
    }
}
