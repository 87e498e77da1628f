//! Pulling an image from a registry into the store (`cove image pull`).
//!
//! The steps, in order:
//!
//! 1. **Manifest.** `GET /v2/<repo>/manifests/<tag or digest>`, at most [`MAX_MANIFEST`]
//!    bytes, digested as received; a reference by digest must get exactly that content. An
//!    index (manifest list) is resolved to the manifest for this host's platform, which is
//!    fetched by digest and verified in turn.
//! 2. **Config.** Fetched (or taken from the store, verified again), parsed for the fields Cove
//!    runs with, its platform and layer count checked, as for an import.
//! 3. **Layers**, at most [`PARALLEL_LAYERS`] at a time. A layer already unpacked costs nothing;
//!    otherwise its blob is downloaded into `blobs/sha256/.tmp-pull-<hex>`, digested as it
//!    arrives, checked against the descriptor's size (a registry sending more is cut off), and
//!    renamed into place only when complete and verified. Each layer is unpacked as soon as it
//!    is in, while the others download.
//! 4. **Record**, saved last: a failed pull names nothing.
//!
//! **Resuming.** The partial file is named by the digest, not by the process, and kept when a
//! pull fails or is killed: the next pull of any image with that layer continues it with a
//! `Range` request (re-digesting the bytes already there first). A registry that ignores the
//! range (200) or cannot satisfy it (416) makes us start over. Within one pull, transient
//! failures (connection errors, timeouts, 5xx, 429, a body cut short) are resumed the same way,
//! [`RETRIES`] times with backoff. A download whose digest does not match is deleted, never
//! used; if it had been resumed, it is fetched once more from the start.
//!
//! **One download per blob.** The partial file is locked (`flock`) while written. A second pull
//! of the same layer (another process, or another image sharing it) waits for the lock, then
//! finds the blob in place and skips it.
//!
//! **Corruption on disk.** A stored blob is verified again whenever it is used: a config when
//! read, a layer while unpacked. One that no longer matches its digest (or its descriptor's
//! size) is deleted and fetched again.
//!
//! The store is held ([`Store::hold`]) for the whole pull, so prune never removes a blob that a
//! pull stored but has not yet recorded; partial files survive until prune (which runs only
//! when no pull does) removes them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt, stream};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};

use crate::digest::{Digest, Hasher};
use crate::import::layout::{Kind, classify, platform_name};
use crate::import::{ImportError, host_platform_name, runs_here};
use crate::oci::{AnyManifest, Descriptor, ImageConfig, media};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError, RegistryOptions};
use crate::store::{ImageRecord, Store, StoreError};

/// Largest manifest or index accepted (registries themselves refuse more than 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;
/// Largest image configuration accepted.
const MAX_CONFIG: usize = 16 << 20;
/// Layers downloaded at once (Docker's default is 3; a fourth helps small layers on loopback).
pub const PARALLEL_LAYERS: usize = 4;
/// Attempts after the first at a blob download that failed for a transient reason.
pub const RETRIES: u32 = 4;
/// Backoff before the first retry; doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Talking to the registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image's documents or blobs are wrong (the same checks as for an import).
    #[error(transparent)]
    Image(#[from] ImportError),
    /// A document was larger than we accept.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// Which document.
        what: String,
        /// The limit.
        limit: usize,
    },
    /// The registry sent fewer bytes than the descriptor says; resumable.
    #[error("{what} was cut short at {got} of {expected} bytes")]
    Truncated {
        /// Which blob.
        what: String,
        /// Bytes received in all.
        got: u64,
        /// The descriptor's size.
        expected: u64,
    },
    /// A resumed download did not match its digest; fetching it whole may help.
    #[error("{what} does not match its digest after resuming at byte {resumed_at}")]
    ResumedMismatch {
        /// Which blob.
        what: String,
        /// Where the download resumed.
        resumed_at: u64,
    },
    /// A partial download file could not be used.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl PullError {
    fn is_transient(&self) -> bool {
        match self {
            PullError::Registry(e) => e.is_transient(),
            PullError::Truncated { .. } | PullError::ResumedMismatch { .. } => true,
            _ => false,
        }
    }
}

/// How a pull is going, for progress bars and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is resolved; the layers are these (digest and compressed size), bottom first.
    Resolved {
        /// Digest of the image manifest for this platform.
        manifest: Digest,
        /// The layers.
        layers: Vec<(Digest, u64)>,
    },
    /// Something happened to layer `index` (0-based, bottom first).
    Layer {
        /// The layer.
        index: usize,
        /// What.
        state: LayerState,
    },
}

/// The state of one layer during a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerState {
    /// Unpacked already: nothing to do.
    Cached,
    /// Another pull is downloading this blob; waiting for it.
    Waiting,
    /// Downloading: `done` of `total` bytes (including bytes resumed from a partial file).
    Downloading {
        /// Bytes in the partial file.
        done: u64,
        /// The blob's size.
        total: u64,
    },
    /// A download attempt failed and will be resumed.
    Retrying {
        /// Why it failed.
        error: String,
    },
    /// Downloaded and verified; `resumed_from` bytes came from an earlier attempt.
    Downloaded {
        /// Bytes taken from an earlier, interrupted download.
        resumed_from: u64,
    },
    /// Unpacked into the store.
    Unpacked,
}

/// Receives [`PullEvent`]s; called from the pulling task, so it should be quick.
pub trait PullProgress: Send + Sync {
    /// One event.
    fn event(&self, event: PullEvent);
}

/// A [`PullProgress`] that ignores everything.
pub struct NoProgress;

impl PullProgress for NoProgress {
    fn event(&self, _: PullEvent) {}
}

/// Pulls `reference` into `store` and records it under that reference.
pub async fn pull(
    store: &Store,
    reference: &Reference,
    options: &RegistryOptions,
    progress: &dyn PullProgress,
) -> Result<ImageRecord, PullError> {
    let client = Client::new(reference, options)?;
    let _hold = store
        .hold()
        .map_err(store_err("cannot hold the image store"))?;
    let cx = Cx {
        store,
        client,
        progress,
        reference,
    };
    cx.pull().await
}

fn store_err(context: impl Into<String>) -> impl FnOnce(StoreError) -> PullError {
    let context = context.into();
    move |source| {
        PullError::Image(ImportError::Store {
            context,
            source: Box::new(source),
        })
    }
}

struct Cx<'a> {
    store: &'a Store,
    client: Client,
    progress: &'a dyn PullProgress,
    reference: &'a Reference,
}

/// A manifest as fetched: its digest, media type (from the response) and bytes.
struct Fetched {
    digest: Digest,
    media_type: Option<String>,
    body: Vec<u8>,
}

impl Cx<'_> {
    async fn pull(&self) -> Result<ImageRecord, PullError> {
        let what = "manifest".to_string();
        let name = match self.reference.digest() {
            Some(d) => d.to_string(),
            None => self.reference.tag().unwrap_or("latest").to_string(),
        };
        let top = self.manifest(&name, self.reference.digest(), &what).await?;
        let doc = parse_json::<AnyManifest>(&top.body, &what)?;
        let (manifest, config, layers) = match classify(top.media_type.as_deref(), &what, doc)? {
            Kind::Manifest(config, layers) => (top, config, layers),
            Kind::Index(entries) => self.select(&entries).await?,
            Kind::Other(media_type) => {
                return Err(ImportError::Unsupported {
                    what: self.reference.to_string(),
                    reason: format!("it is a {media_type}, not a container image"),
                }
                .into());
            }
        };
        let image_what = self.reference.to_string();
        let image = self.config(&config, &image_what).await?;
        if !runs_here(image.os.as_deref(), image.architecture.as_deref()) {
            return Err(ImportError::Platform {
                what: image_what,
                wanted: host_platform_name(),
                found: platform_name(
                    image.os.as_deref().unwrap_or("?"),
                    image.architecture.as_deref().unwrap_or("?"),
                    None,
                ),
            }
            .into());
        }
        if let Some(rootfs) = &image.rootfs
            && rootfs.diff_ids.len() != layers.len()
        {
            return Err(ImportError::Invalid {
                what: image_what,
                reason: format!(
                    "its manifest lists {} layers, but its config's rootfs lists {}",
                    layers.len(),
                    rootfs.diff_ids.len()
                ),
            }
            .into());
        }
        for (i, layer) in layers.iter().enumerate() {
            if let Some(media_type) = layer.media_type.as_deref()
                && !media::LAYERS.contains(&media_type)
            {
                return Err(ImportError::Unsupported {
                    what: format!("layer {} of {image_what}", i + 1),
                    reason: format!("media type {media_type:?} is not a tar layer"),
                }
                .into());
            }
        }
        self.store
            .put_blob(&manifest.body[..], Some(&manifest.digest))
            .map_err(store_err(format!("cannot store {what}")))?;
        self.progress.event(PullEvent::Resolved {
            manifest: manifest.digest,
            layers: layers.iter().map(|l| (l.digest, l.size)).collect(),
        });
        // The same blob twice in one image (empty layers) is fetched and unpacked once.
        let mut unique: Vec<(usize, &Descriptor)> = Vec::new();
        for (i, layer) in layers.iter().enumerate() {
            if !unique.iter().any(|(_, l)| l.digest == layer.digest) {
                unique.push((i, layer));
            }
        }
        stream::iter(unique)
            .map(|(i, layer)| self.layer(i, layer))
            .buffer_unordered(PARALLEL_LAYERS)
            .try_collect::<Vec<()>>()
            .await?;
        let record = ImageRecord {
            reference: self.reference.clone(),
            manifest_digest: manifest.digest,
            config_digest: config.digest,
            layers: layers.iter().map(|l| l.digest).collect(),
            config: image.config.unwrap_or_default().run_config(),
        };
        self.store
            .save_image(&record)
            .map_err(store_err(format!("cannot save {}", record.reference)))?;
        Ok(record)
    }

    /// The manifest for this host among an index's entries, with its config and layers.
    async fn select(
        &self,
        entries: &[Descriptor],
    ) -> Result<(Fetched, Descriptor, Vec<Descriptor>), PullError> {
        let mut found = Vec::new();
        for entry in entries {
            if let Some(p) = &entry.platform
                && !runs_here(Some(&p.os), Some(&p.architecture))
            {
                found.push(platform_name(&p.os, &p.architecture, p.variant.as_deref()));
                continue;
            }
            let what = format!("manifest {}", entry.digest);
            let fetched = self
                .manifest(&entry.digest.to_string(), Some(&entry.digest), &what)
                .await?;
            if fetched.body.len() as u64 != entry.size {
                return Err(ImportError::Size {
                    what,
                    expected: entry.size,
                    actual: fetched.body.len() as u64,
                }
                .into());
            }
            let doc = parse_json::<AnyManifest>(&fetched.body, &what)?;
            let media_type = entry
                .media_type
                .as_deref()
                .or(fetched.media_type.as_deref());
            match classify(media_type, &what, doc)? {
                Kind::Manifest(config, layers) => {
                    if entry.platform.is_none() {
                        let image = self.config(&config, &what).await?;
                        let (os, arch) = (image.os.as_deref(), image.architecture.as_deref());
                        if !runs_here(os, arch) {
                            found.push(platform_name(os.unwrap_or("?"), arch.unwrap_or("?"), None));
                            continue;
                        }
                    }
                    return Ok((fetched, config, layers));
                }
                Kind::Index(_) => found.push("a nested index (not followed)".into()),
                Kind::Other(media_type) => found.push(format!("{media_type} (not an image)")),
            }
        }
        Err(ImportError::Platform {
            what: self.reference.to_string(),
            wanted: host_platform_name(),
            found: if found.is_empty() {
                "no image manifests".into()
            } else {
                found.join(", ")
            },
        }
        .into())
    }

    /// Fetches the manifest `name` (a tag or a digest); with `expected`, it must have that digest.
    async fn manifest(
        &self,
        name: &str,
        expected: Option<&Digest>,
        what: &str,
    ) -> Result<Fetched, PullError> {
        let mut headers = HeaderMap::new();
        let accept = [
            media::OCI_INDEX,
            media::DOCKER_LIST,
            media::OCI_MANIFEST,
            media::DOCKER_MANIFEST,
        ]
        .join(", ");
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_str(&accept).expect("media types are valid header values"),
        );
        let response = self.client.get("manifests", name, headers, what).await?;
        if !response.status().is_success() {
            return Err(self.client.status(what, response).await.into());
        }
        let media_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .filter(|v| !v.is_empty() && v != "application/json" && v != "text/plain");
        let body = self.read_limited(response, MAX_MANIFEST, what).await?;
        let digest = Digest::of(&body);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(ImportError::Digest {
                what: what.to_string(),
                expected: *expected,
                actual: digest,
            }
            .into());
        }
        Ok(Fetched {
            digest,
            media_type,
            body,
        })
    }

    /// The image configuration `desc` names: from the store if there (verified again), else
    /// fetched, verified and stored.
    async fn config(&self, desc: &Descriptor, image: &str) -> Result<ImageConfig, PullError> {
        let what = format!("config {}", desc.digest);
        if let Some(media_type) = desc.media_type.as_deref()
            && ![media::OCI_CONFIG, media::DOCKER_CONFIG].contains(&media_type)
        {
            return Err(ImportError::Unsupported {
                what: image.to_string(),
                reason: format!(
                    "its config has media type {media_type:?}, so it is not a container image"
                ),
            }
            .into());
        }
        let stored = if self.store.has_blob(&desc.digest) {
            match self.store.read_blob(&desc.digest, MAX_CONFIG as u64) {
                Ok(bytes) if Digest::of(&bytes) == desc.digest => Some(bytes),
                // Damaged on disk: fetch it again.
                _ => {
                    self.store
                        .remove_blob(&desc.digest)
                        .map_err(store_err(format!("cannot remove the damaged {what}")))?;
                    None
                }
            }
        } else {
            None
        };
        let bytes = match stored {
            Some(bytes) => bytes,
            None => {
                let response = self
                    .client
                    .get("blobs", &desc.digest.to_string(), HeaderMap::new(), &what)
                    .await?;
                if !response.status().is_success() {
                    return Err(self.client.status(&what, response).await.into());
                }
                let bytes = self.read_limited(response, MAX_CONFIG, &what).await?;
                let actual = Digest::of(&bytes);
                if actual != desc.digest {
                    return Err(ImportError::Digest {
                        what,
                        expected: desc.digest,
                        actual,
                    }
                    .into());
                }
                self.store
                    .put_blob(&bytes[..], Some(&desc.digest))
                    .map_err(store_err(format!("cannot store {what}")))?;
                bytes
            }
        };
        if bytes.len() as u64 != desc.size {
            return Err(ImportError::Size {
                what,
                expected: desc.size,
                actual: bytes.len() as u64,
            }
            .into());
        }
        parse_json(&bytes, &what)
    }

    /// Reads a whole response body of at most `limit` bytes.
    async fn read_limited(
        &self,
        mut response: reqwest::Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, PullError> {
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(PullError::TooLarge {
                what: what.to_string(),
                limit,
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.client.transport(what, e))?
        {
            if body.len() + chunk.len() > limit {
                return Err(PullError::TooLarge {
                    what: what.to_string(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Makes sure layer `index` is downloaded and unpacked.
    async fn layer(&self, index: usize, desc: &Descriptor) -> Result<(), PullError> {
        let digest = desc.digest;
        let what = format!("layer {} ({digest})", index + 1);
        if self.store.has_layer(&digest) {
            self.event(index, LayerState::Cached);
            return Ok(());
        }
        for first in [true, false] {
            self.blob(index, desc, &what).await?;
            let store = self.store.clone();
            let unpacked = tokio::task::spawn_blocking(move || store.layer_dir(&digest))
                .await
                .map_err(|e| PullError::Io {
                    op: "unpack",
                    path: self.store.blob_path(&digest),
                    source: io::Error::other(e.to_string()),
                })?;
            match unpacked {
                Ok(_) => {
                    self.event(index, LayerState::Unpacked);
                    return Ok(());
                }
                // The stored blob no longer matches its digest: fetch it again, once.
                Err(StoreError::DigestMismatch { .. }) if first => {
                    self.store
                        .remove_blob(&digest)
                        .map_err(store_err(format!("cannot remove the damaged {what}")))?;
                }
                Err(e) => return Err(store_err(format!("cannot unpack {what}"))(e)),
            }
        }
        unreachable!("the second attempt returns")
    }

    fn event(&self, index: usize, state: LayerState) {
        self.progress.event(PullEvent::Layer { index, state });
    }

    /// Makes sure the blob `desc` names is in the store with the descriptor's size,
    /// downloading it (once, across processes) if not.
    async fn blob(&self, index: usize, desc: &Descriptor, what: &str) -> Result<(), PullError> {
        let digest = desc.digest;
        match self.store.blob_size(&digest) {
            Ok(size) if size == desc.size => return Ok(()),
            Ok(_) => self
                .store
                .remove_blob(&digest)
                .map_err(store_err(format!("cannot remove the damaged {what}")))?,
            Err(_) => {}
        }
        let path = self.store.partial_path(&digest);
        let Some(partial) = self.lock_partial(index, &path, &digest).await? else {
            return Ok(()); // another pull stored it meanwhile
        };
        let file = &partial.file;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        let resumed_from = loop {
            match self.download(index, file, &path, desc, what).await {
                Ok(resumed_from) => break resumed_from,
                Err(e) if !e.is_transient() || attempt >= RETRIES => return Err(e),
                Err(e) => {
                    attempt += 1;
                    self.event(
                        index,
                        LayerState::Retrying {
                            error: error_chain(&e),
                        },
                    );
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        };
        self.store
            .install_blob(&path, &digest)
            .map_err(store_err(format!("cannot store {what}")))?;
        drop(partial);
        self.event(index, LayerState::Downloaded { resumed_from });
        Ok(())
    }

    /// Opens and locks the partial file for `digest`. `None` when, by the time the lock is
    /// ours, another pull has put the blob in place.
    async fn lock_partial(
        &self,
        index: usize,
        path: &Path,
        digest: &Digest,
    ) -> Result<Option<Partial>, PullError> {
        let io_err = |op| partial_err(op, path);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(io_err("open"))?;
            let file = match file.try_lock() {
                Ok(()) => file,
                Err(std::fs::TryLockError::WouldBlock) => {
                    self.event(index, LayerState::Waiting);
                    tokio::task::spawn_blocking(move || file.lock().map(|()| file))
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))
                        .and_then(|r| r)
                        .map_err(io_err("lock"))?
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock")(e)),
            };
            // Whoever held the lock may have renamed the file into place or removed it: then
            // the path names another file (or none) and ours is not the partial any more.
            let ours = file.metadata().map_err(io_err("inspect"))?;
            let current = std::fs::symlink_metadata(path);
            let same = current.is_ok_and(|m| m.dev() == ours.dev() && m.ino() == ours.ino());
            if self.store.has_blob(digest) {
                if same {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(None);
            }
            if same {
                return Ok(Some(Partial {
                    path: path.to_path_buf(),
                    file,
                }));
            }
        }
    }

    /// One download attempt into the locked partial `file`, resuming after the bytes it holds.
    /// Returns how many bytes were resumed from.
    async fn download(
        &self,
        index: usize,
        file: &File,
        path: &Path,
        desc: &Descriptor,
        what: &str,
    ) -> Result<u64, PullError> {
        let io_err = |op| partial_err(op, path);
        let size = desc.size;
        let mut have = file.metadata().map_err(io_err("inspect"))?.len();
        if have > size {
            file.set_len(0).map_err(io_err("truncate"))?;
            have = 0;
        }
        let mut hasher = if have > 0 {
            let copy = file.try_clone().map_err(io_err("reopen"))?;
            tokio::task::spawn_blocking(move || digest_prefix(&copy, have))
                .await
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(io_err("read"))?
        } else {
            Hasher::new(io::sink())
        };
        let resumed_from = have;
        if have < size {
            let mut headers = HeaderMap::new();
            if have > 0 {
                headers.insert(
                    header::RANGE,
                    HeaderValue::from_str(&format!("bytes={have}-"))
                        .expect("a number is a valid header value"),
                );
            }
            let mut response = self
                .client
                .get("blobs", &desc.digest.to_string(), headers, what)
                .await?;
            let status = response.status();
            if status == StatusCode::PARTIAL_CONTENT && have > 0 {
                if content_range_start(response.headers()) != Some(have) {
                    file.set_len(0).map_err(io_err("truncate"))?;
                    return Err(PullError::Truncated {
                        what: format!("{what} (the registry answered another range)"),
                        got: 0,
                        expected: size,
                    });
                }
            } else if status == StatusCode::OK {
                if have > 0 {
                    file.set_len(0).map_err(io_err("truncate"))?;
                    have = 0;
                    hasher = Hasher::new(io::sink());
                }
            } else if status == StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
                file.set_len(0).map_err(io_err("truncate"))?;
                return Err(PullError::Truncated {
                    what: format!("{what} (the registry refused to resume)"),
                    got: 0,
                    expected: size,
                });
            } else {
                return Err(self.client.status(what, response).await.into());
            }
            let start = have;
            loop {
                let chunk = match response.chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(e) => {
                        if have > start {
                            break; // resume from what arrived
                        }
                        return Err(self.client.transport(what, e).into());
                    }
                };
                if have + chunk.len() as u64 > size {
                    file.set_len(0).map_err(io_err("truncate"))?;
                    return Err(ImportError::Size {
                        what: what.to_string(),
                        expected: size,
                        actual: have + chunk.len() as u64,
                    }
                    .into());
                }
                file.write_all_at(&chunk, have).map_err(io_err("write"))?;
                hasher.write_all(&chunk).expect("a sink never fails");
                have += chunk.len() as u64;
                self.event(
                    index,
                    LayerState::Downloading {
                        done: have,
                        total: size,
                    },
                );
            }
            if have < size {
                return Err(PullError::Truncated {
                    what: what.to_string(),
                    got: have,
                    expected: size,
                });
            }
        }
        let actual = hasher.digest();
        if actual != desc.digest {
            file.set_len(0).map_err(io_err("truncate"))?;
            if resumed_from > 0 {
                return Err(PullError::ResumedMismatch {
                    what: what.to_string(),
                    resumed_at: resumed_from,
                });
            }
            return Err(ImportError::Digest {
                what: what.to_string(),
                expected: desc.digest,
                actual,
            }
            .into());
        }
        Ok(resumed_from)
    }
}

/// A locked partial download. Dropped (the pull done, failed, or cancelled because another
/// layer failed), it keeps the bytes it holds for the next pull to resume, but an empty one is
/// removed rather than left as litter.
struct Partial {
    path: std::path::PathBuf,
    file: File,
}

impl Drop for Partial {
    fn drop(&mut self) {
        let (Ok(ours), Ok(current)) = (self.file.metadata(), std::fs::symlink_metadata(&self.path))
        else {
            return; // renamed into place, or removed
        };
        if ours.len() == 0 && ours.dev() == current.dev() && ours.ino() == current.ino() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Attaches the operation and the partial file to an I/O error.
fn partial_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PullError + 'a {
    move |source| PullError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Digests the first `len` bytes of `file`.
fn digest_prefix(file: &File, len: u64) -> io::Result<Hasher<io::Sink>> {
    let mut hasher = Hasher::new(io::sink());
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0;
    while offset < len {
        let want = buf.len().min((len - offset) as usize);
        let n = file.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        hasher.write_all(&buf[..n])?;
        offset += n as u64;
    }
    Ok(hasher)
}

/// The first byte of a `Content-Range: bytes START-END/TOTAL` header.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, PullError> {
    serde_json::from_slice(bytes).map_err(|source| {
        ImportError::Json {
            what: what.to_string(),
            source,
        }
        .into()
    })
}

pub use cove_types::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        let mut h = HeaderMap::new();
        assert_eq!(content_range_start(&h), None);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/200"),
        );
        assert_eq!(content_range_start(&h), Some(100));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes */200"),
        );
        assert_eq!(content_range_start(&h), None);
    }
}
