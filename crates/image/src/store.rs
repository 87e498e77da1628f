//! The content-addressed image store: verified blobs, layers unpacked once, and one small record
//! per tagged image.
//!
//! ```text
//! <root>/store.json              the id shift the layers below were unpacked with
//! <root>/lock                    flock: shared by writers, exclusive by prune
//! <root>/blobs/sha256/<hex>      every blob, named by the digest of its content (mode 0444)
//! <root>/layers/<hex>/           a layer blob unpacked, named by the blob's digest
//! <root>/images/<ref>.json       an ImageRecord, named by the escaped canonical reference
//! ```
//!
//! - **Blobs are verified while written**, into a `.tmp-*` file beside their final place, then
//!   renamed: a blob at `blobs/sha256/<hex>` always has that digest, and a reader never sees a
//!   half-written one. A blob already present is not rewritten; reading one verifies nothing
//!   again ([`Store::verify_blob`] does, for `cove image inspect --verify`).
//! - **Layers are unpacked once**, with [`unpack_layer`], into `layers/.tmp-<hex>-<pid>-<n>` and
//!   renamed into place with `RENAME_NOREPLACE`: of two processes (or threads) unpacking the same
//!   layer, the loser discards its copy and uses the winner's. The blob is digested again while
//!   it is unpacked, because a layer directory, once in place, is trusted for good. Owners are
//!   shifted by the store's id shift ([`SANDBOX_ID_BASE`] in production) so the image's root is
//!   the sandbox's root; the shift is recorded in `store.json` and a store is never reopened
//!   with another one. `user.*` xattrs and file capabilities are kept (the unpacker rewrites
//!   capabilities to the namespaced form, so they only apply inside the sandbox).
//! - **Records are small JSON files** ([`ImageRecord`]) holding the digests and the config fields
//!   Cove runs with, so starting a sandbox reads one file, not a manifest and a config.
//! - **Garbage is collected, not reference-counted**: [`Store::prune`] removes blobs and layers
//!   no record names. Writers hold a shared `flock` on `lock` from their first blob to their
//!   record ([`Store::hold`]), and prune takes it exclusively, so it never removes what an
//!   import in progress has stored but not yet recorded, nor a temporary file still being
//!   written.
//!
//! - **Running sandboxes pin their layers** ([`Store::pin_layers`]): a shared `flock` on each
//!   layer directory for the sandbox's lifetime. Prune leaves a pinned layer in place even when
//!   no record names it any more, and removes it at a later prune.
//!
//! Rejected: a database (redb) for the records. A directory of files is enough for the few
//! hundred images a node holds, is atomic per file with `rename`, and is readable with `cat`.

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::reference::Reference;
use crate::sys;
use crate::unpack::{UnpackError, UnpackOptions, unpack_layer};

/// Where the image store lives on a node.
pub const DEFAULT_ROOT: &str = "/var/lib/cove/images";
/// Host uid and gid of the sandbox's root: the jail maps the sandbox's ids 0.. to this base, so
/// layers are unpacked with owners shifted by it.
pub const SANDBOX_ID_BASE: u32 = 1_500_000_000;

/// Prefix of everything being written and not yet renamed into place.
const TMP_PREFIX: &str = ".tmp-";
const RECORD_SUFFIX: &str = ".json";
/// Largest image record read back (ours, but a damaged disk should not make us allocate).
const MAX_RECORD: u64 = 16 << 20;
const COPY_BUFFER: usize = 128 * 1024;
/// The root and `layers/` may be traversed (an overlay mounted from inside a user namespace
/// needs to reach the layer directories) but not listed; blobs and records are private.
const TRAVERSABLE_DIR_MODE: u32 = 0o711;
const PRIVATE_DIR_MODE: u32 = 0o700;
const BLOB_MODE: u32 = 0o444;

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// A unique name for something being written, in this process and across processes.
fn tmp_name(what: &str) -> String {
    let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{what}{}-{n}", std::process::id())
}

/// The image store rooted at one directory. Cloning it is cheap (a few paths), so that
/// blocking work can be handed to other threads.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    blobs: PathBuf,
    layers: PathBuf,
    images: PathBuf,
    lock: PathBuf,
    id_shift: u32,
}

/// What Cove records about one tagged image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    /// The reference the image is stored under.
    pub reference: Reference,
    /// Digest of the image manifest (for a docker-save archive: of the manifest import wrote).
    pub manifest_digest: Digest,
    /// Digest of the image configuration blob; Docker's "image id".
    pub config_digest: Digest,
    /// The layer blobs, bottom first.
    pub layers: Vec<Digest>,
    /// How to run the image.
    pub config: RunConfig,
}

/// The fields of an image configuration that Cove runs with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// `Entrypoint`; empty when unset.
    pub entrypoint: Vec<String>,
    /// `Cmd`; empty when unset.
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// `WorkingDir`, if set.
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`, ...), if set; resolved against the image's files later.
    pub user: Option<String>,
    /// `ExposedPorts` as `port/protocol`, sorted.
    pub exposed_ports: Vec<String>,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs removed.
    pub blobs_removed: u64,
    /// Unpacked layer directories removed.
    pub layers_removed: u64,
    /// Leftovers of interrupted writes removed.
    pub temp_removed: u64,
    /// Bytes of regular-file content freed (a hardlinked file counted once).
    pub bytes_freed: u64,
    /// Unreferenced layer directories kept because a running sandbox uses them.
    pub layers_in_use: u64,
}

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on the store failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The content being stored could not be read.
    #[error("cannot read the content of the blob being stored")]
    Source {
        /// The read error.
        #[source]
        source: io::Error,
    },
    /// The store was set up with a different id shift.
    #[error(
        "image store {} was set up for id shift {stored}, not {requested}: its unpacked layers \
         are owned accordingly",
        root.display()
    )]
    IdShift {
        /// The store root.
        root: PathBuf,
        /// The shift in `store.json`.
        stored: u32,
        /// The shift asked for.
        requested: u32,
    },
    /// Content did not match the digest it was stored or looked up under.
    #[error("blob content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the content should have.
        expected: Digest,
        /// The digest it has.
        actual: Digest,
    },
    /// A blob is not in the store.
    #[error("blob {digest} is not in the store")]
    MissingBlob {
        /// The blob.
        digest: Digest,
    },
    /// A blob read into memory is larger than allowed.
    #[error("blob {digest} is larger than {limit} bytes")]
    TooLarge {
        /// The blob.
        digest: Digest,
        /// The limit.
        limit: u64,
    },
    /// A layer blob could not be unpacked.
    #[error("cannot unpack layer {digest}")]
    Unpack {
        /// The layer blob.
        digest: Digest,
        /// The unpacker's error, naming the entry.
        #[source]
        source: UnpackError,
    },
    /// No record for a reference.
    #[error(
        "no such image: {reference}; pull it with `cove image pull` or import it with `cove image import`"
    )]
    NoSuchImage {
        /// The reference looked up.
        reference: Reference,
    },
    /// A store file (record or `store.json`) could not be parsed.
    #[error("store file {} is corrupt", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Attaches the operation and path to an I/O error.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// `store.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    id_shift: u32,
}

/// Keeps [`Store::prune`] waiting while held (a shared `flock` on the store's lock file): hold
/// one from the first blob an operation stores until its image record is saved.
#[derive(Debug)]
pub struct Hold {
    _file: File,
}

/// The unpacked layer directories of one image, pinned for a sandbox's lifetime: each is
/// `flock`ed shared until this is dropped, and [`Store::prune`] skips a layer that is locked.
/// The locks are close-on-exec descriptors, so a sandbox never holds them itself.
#[derive(Debug)]
pub struct PinnedLayers {
    /// The directories, bottom first.
    pub dirs: Vec<PathBuf>,
    _locks: Vec<File>,
}

impl PinnedLayers {
    /// The shared locks that pin the layers (another process may hold copies: a pin lasts as
    /// long as any copy is open).
    pub fn locks(&self) -> &[File] {
        &self._locks
    }
}

/// Blobs and layer directories an operation added to the store, so that it can remove the ones
/// that ended up unreferenced (see [`Store::discard_unreferenced`]).
#[derive(Debug, Default)]
pub(crate) struct Added {
    pub(crate) blobs: HashSet<Digest>,
    pub(crate) layers: HashSet<Digest>,
}

/// A file or directory being written; removed on drop unless it was put in place.
struct Temp {
    path: PathBuf,
    armed: bool,
}

impl Temp {
    fn new(path: PathBuf) -> Temp {
        Temp { path, armed: true }
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if self.armed {
            // A directory is an unpacked layer; std's remove_dir_all does not follow symlinks.
            let _ = match fs::symlink_metadata(&self.path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&self.path),
                _ => fs::remove_file(&self.path),
            };
        }
    }
}

impl Store {
    /// Opens the store at `root`, creating it if needed. `id_shift` is added to every uid and gid
    /// in unpacked layers ([`SANDBOX_ID_BASE`] outside tests); an existing store must have been
    /// created with the same shift.
    pub fn open(root: impl Into<PathBuf>, id_shift: u32) -> Result<Store, StoreError> {
        let root = root.into();
        let store = Store {
            blobs: root.join("blobs").join("sha256"),
            layers: root.join("layers"),
            images: root.join("images"),
            lock: root.join("lock"),
            root,
            id_shift,
        };
        let mkdir = |path: &Path, mode: u32| {
            DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(path)
                .map_err(io_err("create", path))
        };
        mkdir(&store.root, TRAVERSABLE_DIR_MODE)?;
        mkdir(&store.blobs, PRIVATE_DIR_MODE)?;
        mkdir(&store.layers, TRAVERSABLE_DIR_MODE)?;
        mkdir(&store.images, PRIVATE_DIR_MODE)?;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&store.lock)
            .map_err(io_err("create", &store.lock))?;
        store.check_id_shift()?;
        Ok(store)
    }

    /// Records the id shift in a new store, or checks it against an existing one.
    fn check_id_shift(&self) -> Result<(), StoreError> {
        let path = self.root.join("store.json");
        let stored = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<StoreFile>(&bytes)
                    .map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?
                    .id_shift
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = Temp::new(self.root.join(tmp_name("store-")));
                let json = serde_json::to_vec(&StoreFile {
                    id_shift: self.id_shift,
                })
                .expect("a struct of integers serialises");
                fs::write(&tmp.path, json).map_err(io_err("write", &tmp.path))?;
                match sys::rename_noreplace(&tmp.path, &path) {
                    Ok(()) => {
                        tmp.keep();
                        return Ok(());
                    }
                    // Another process created the store at the same time: check its file.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        return self.check_id_shift();
                    }
                    Err(e) => return Err(io_err("create", &path)(e)),
                }
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        if stored != self.id_shift {
            return Err(StoreError::IdShift {
                root: self.root.clone(),
                stored,
                requested: self.id_shift,
            });
        }
        Ok(())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The shift applied to uids and gids in unpacked layers.
    pub fn id_shift(&self) -> u32 {
        self.id_shift
    }

    /// Takes a shared hold on the store; see [`Hold`].
    pub fn hold(&self) -> Result<Hold, StoreError> {
        let file = self.open_lock()?;
        file.lock_shared().map_err(io_err("lock", &self.lock))?;
        Ok(Hold { _file: file })
    }

    fn open_lock(&self) -> Result<File, StoreError> {
        File::open(&self.lock).map_err(io_err("open", &self.lock))
    }

    /// Where the blob `digest` is (or would be) stored.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }

    /// Whether the blob `digest` is stored.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file())
    }

    /// Stores everything `reader` yields as a blob and returns its digest. With `expected`, the
    /// content must have that digest: otherwise nothing is stored and the error names both
    /// digests. The whole reader is always read and digested, also when the blob is already
    /// stored (it is then not rewritten).
    pub fn put_blob(
        &self,
        reader: impl Read,
        expected: Option<&Digest>,
    ) -> Result<Digest, StoreError> {
        let _hold = self.hold()?;
        self.put_blob_tracked(reader, expected, &mut Added::default())
    }

    /// [`Store::put_blob`] without taking a hold, recording a blob it adds in `added`.
    pub(crate) fn put_blob_tracked(
        &self,
        mut reader: impl Read,
        expected: Option<&Digest>,
        added: &mut Added,
    ) -> Result<Digest, StoreError> {
        if let Some(expected) = expected
            && self.has_blob(expected)
        {
            let mut sink = Hasher::new(io::sink());
            copy(&mut reader, &mut sink, Path::new("/dev/null"))?;
            return check_digest(expected, sink.digest());
        }
        let tmp = Temp::new(self.blobs.join(tmp_name("")));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(BLOB_MODE)
            .open(&tmp.path)
            .map_err(io_err("create", &tmp.path))?;
        let mut writer = Hasher::new(io::BufWriter::new(file));
        copy(&mut reader, &mut writer, &tmp.path)?;
        writer.flush().map_err(io_err("write", &tmp.path))?;
        let actual = writer.digest();
        drop(writer);
        if let Some(expected) = expected {
            check_digest(expected, actual)?;
        }
        match sys::rename_noreplace(&tmp.path, &self.blob_path(&actual)) {
            Ok(()) => {
                tmp.keep();
                added.blobs.insert(actual);
                Ok(actual)
            }
            // Stored before (without `expected`) or meanwhile; ours goes with `tmp`.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(actual),
            Err(e) => Err(io_err("rename into place", &tmp.path)(e)),
        }
    }

    /// Where a pull keeps the blob `digest` while downloading it: a name per digest, not per
    /// process, so that the next pull resumes it (and locks it while it does). Its prefix makes
    /// it a temporary file for [`Store::prune`].
    pub(crate) fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.blobs
            .join(format!("{TMP_PREFIX}pull-{}", digest.hex()))
    }

    /// Puts the completely downloaded, verified file at `path` in place as the blob `digest`.
    /// If the blob is there already, `path` is removed instead.
    pub(crate) fn install_blob(&self, path: &Path, digest: &Digest) -> Result<(), StoreError> {
        fs::set_permissions(path, fs::Permissions::from_mode(BLOB_MODE))
            .map_err(io_err("set the mode of", path))?;
        match sys::rename_noreplace(path, &self.blob_path(digest)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(path).map_err(io_err("remove", path))
            }
            Err(e) => Err(io_err("rename into place", path)(e)),
        }
    }

    /// Removes the blob `digest` (found corrupt) so that it can be fetched again.
    pub(crate) fn remove_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.blob_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Whether the layer blob `digest` is unpacked already.
    pub fn has_layer(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.layers.join(digest.hex())).is_ok_and(|m| m.is_dir())
    }

    /// Opens the blob `digest` for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.blob_path(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob { digest: *digest },
            _ => io_err("open", &path)(e),
        })
    }

    /// The size of the blob `digest` in bytes.
    pub fn blob_size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let path = self.blob_path(digest);
        match fs::symlink_metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::MissingBlob { digest: *digest })
            }
            Err(e) => Err(io_err("inspect", &path)(e)),
        }
    }

    /// Reads the blob `digest` into memory, refusing one larger than `limit` bytes.
    pub(crate) fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let file = self.open_blob(digest)?;
        let mut out = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut out)
            .map_err(io_err("read", &self.blob_path(digest)))?;
        if out.len() as u64 > limit {
            return Err(StoreError::TooLarge {
                digest: *digest,
                limit,
            });
        }
        Ok(out)
    }

    /// Reads the blob `digest` again and checks that its content still has that digest.
    pub fn verify_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let mut file = self.open_blob(digest)?;
        let mut sink = Hasher::new(io::sink());
        copy(&mut file, &mut sink, &self.blob_path(digest))?;
        check_digest(digest, sink.digest()).map(drop)
    }

    /// The directory holding the layer blob `digest` unpacked, unpacking it on first use.
    pub fn layer_dir(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        let _hold = self.hold()?;
        self.layer_dir_tracked(digest, &mut Added::default())
    }

    /// [`Store::layer_dir`] without taking a hold, recording a layer it unpacks in `added`.
    pub(crate) fn layer_dir_tracked(
        &self,
        digest: &Digest,
        added: &mut Added,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.layers.join(digest.hex());
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
            return Ok(dir);
        }
        let blob = self.open_blob(digest)?;
        let tmp = Temp::new(self.layers.join(tmp_name(&format!("{}-", digest.hex()))));
        fs::create_dir(&tmp.path).map_err(io_err("create", &tmp.path))?;
        let opts = UnpackOptions {
            id_shift: self.id_shift,
            preserve_xattrs: true,
        };
        let mut reader = Hasher::new(BufReader::with_capacity(COPY_BUFFER, blob));
        unpack_layer(&mut reader, &tmp.path, &opts).map_err(|source| StoreError::Unpack {
            digest: *digest,
            source,
        })?;
        // The unpacker reads to the end of the stream; make sure of it before comparing.
        copy(&mut reader, &mut io::sink(), &self.blob_path(digest))?;
        check_digest(digest, reader.digest())?;
        match sys::rename_noreplace(&tmp.path, &dir) {
            Ok(()) => {
                tmp.keep();
                added.layers.insert(*digest);
                Ok(dir)
            }
            // Another process or thread unpacked it first; ours goes with `tmp`.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => Ok(dir),
            Err(e) => Err(io_err("rename into place", &tmp.path)(e)),
        }
    }

    /// The unpacked layer directories of `image`, bottom first, unpacking layers as needed.
    pub fn resolve_layers(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, StoreError> {
        let _hold = self.hold()?;
        let mut added = Added::default();
        image
            .layers
            .iter()
            .map(|layer| self.layer_dir_tracked(layer, &mut added))
            .collect()
    }

    /// [`Store::resolve_layers`], pinning the layers until the result is dropped. Pinning
    /// happens while the store is held, so prune cannot remove a layer between the two.
    pub fn pin_layers(&self, image: &ImageRecord) -> Result<PinnedLayers, StoreError> {
        let _hold = self.hold()?;
        let mut added = Added::default();
        let mut dirs = Vec::with_capacity(image.layers.len());
        let mut locks = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let dir = self.layer_dir_tracked(layer, &mut added)?;
            let lock = File::open(&dir).map_err(io_err("open", &dir))?;
            lock.lock_shared().map_err(io_err("lock", &dir))?;
            dirs.push(dir);
            locks.push(lock);
        }
        Ok(PinnedLayers {
            dirs,
            _locks: locks,
        })
    }

    fn record_path(&self, reference: &Reference) -> PathBuf {
        self.images
            .join(format!("{}{RECORD_SUFFIX}", reference.file_stem()))
    }

    /// Saves `image`'s record, replacing any earlier record for the same reference. Every blob
    /// it names must be stored.
    pub fn save_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        let _hold = self.hold()?;
        self.save_image_held(image)
    }

    /// [`Store::save_image`] without taking a hold.
    pub(crate) fn save_image_held(&self, image: &ImageRecord) -> Result<(), StoreError> {
        let blobs = [&image.manifest_digest, &image.config_digest];
        if let Some(missing) = blobs
            .into_iter()
            .chain(&image.layers)
            .find(|d| !self.has_blob(d))
        {
            return Err(StoreError::MissingBlob { digest: *missing });
        }
        let json = serde_json::to_vec_pretty(image).expect("an image record serialises");
        let tmp = Temp::new(self.images.join(tmp_name("")));
        fs::write(&tmp.path, json).map_err(io_err("write", &tmp.path))?;
        let path = self.record_path(&image.reference);
        fs::rename(&tmp.path, &path).map_err(io_err("rename into place", &tmp.path))?;
        tmp.keep();
        Ok(())
    }

    /// The record of the image stored under `reference`.
    pub fn image(&self, reference: &Reference) -> Result<ImageRecord, StoreError> {
        let path = self.record_path(reference);
        match read_record(&path)? {
            Some(image) if image.reference == *reference => Ok(image),
            _ => Err(StoreError::NoSuchImage {
                reference: reference.clone(),
            }),
        }
    }

    /// Every image record, sorted by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let mut images = Vec::new();
        for (name, path) in list(&self.images)? {
            if name.starts_with(TMP_PREFIX) || !name.ends_with(RECORD_SUFFIX) {
                continue;
            }
            // Removed since the listing: not an error.
            images.extend(read_record(&path)?);
        }
        images.sort_by_key(|i| i.reference.canonical());
        Ok(images)
    }

    /// Removes the record of `reference` and returns it. Its blobs and layers stay until
    /// [`Store::prune`].
    pub fn remove_image(&self, reference: &Reference) -> Result<ImageRecord, StoreError> {
        let image = self.image(reference)?;
        let path = self.record_path(reference);
        match fs::remove_file(&path) {
            Ok(()) => Ok(image),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NoSuchImage {
                reference: reference.clone(),
            }),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Removes every blob and unpacked layer that no image record names, and what interrupted
    /// writes left behind. Waits for operations holding the store ([`Store::hold`]) to finish.
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let lock = self.open_lock()?;
        lock.lock().map_err(io_err("lock", &self.lock))?;
        self.collect(None)
    }

    /// Removes the blobs and layers in `added` that no record names (an import's leftovers: the
    /// other platforms' blobs, a docker-save archive's legacy files, everything after a failure).
    /// Best effort, and only if no other operation holds the store right now; otherwise
    /// [`Store::prune`] removes them later. The caller must not hold the store itself.
    pub(crate) fn discard_unreferenced(&self, added: &Added) {
        if added.blobs.is_empty() && added.layers.is_empty() {
            return;
        }
        let Ok(lock) = self.open_lock() else { return };
        if lock.try_lock().is_ok() {
            // An error leaves garbage for prune; the operation's own result matters more.
            let _ = self.collect(Some(added));
        }
    }

    /// Removes unreferenced blobs and layers (only those in `only`, if given; otherwise also
    /// temporary leftovers). The caller holds the lock exclusively, so nothing is in flight.
    fn collect(&self, only: Option<&Added>) -> Result<PruneReport, StoreError> {
        let images = self.images()?;
        let mut used_blobs = HashSet::new();
        let mut used_layers = HashSet::new();
        for image in &images {
            used_blobs.insert(image.manifest_digest);
            used_blobs.insert(image.config_digest);
            used_blobs.extend(&image.layers);
            used_layers.extend(&image.layers);
        }
        let mut report = PruneReport::default();
        for (dir, used, of_added) in [
            (&self.blobs, &used_blobs, only.map(|a| &a.blobs)),
            (&self.layers, &used_layers, only.map(|a| &a.layers)),
        ] {
            for (name, path) in list(dir)? {
                let remove = if name.starts_with(TMP_PREFIX) {
                    only.is_none()
                } else if let Ok(digest) = Digest::from_hex(&name) {
                    !used.contains(&digest) && of_added.is_none_or(|a| a.contains(&digest))
                } else {
                    false // not the store's: leave it alone
                };
                if !remove {
                    continue;
                }
                if dir == &self.layers && !name.starts_with(TMP_PREFIX) && pinned(&path)? {
                    report.layers_in_use += 1;
                    continue;
                }
                report.bytes_freed += remove_tree(&path)?;
                if name.starts_with(TMP_PREFIX) {
                    report.temp_removed += 1;
                } else if dir == &self.blobs {
                    report.blobs_removed += 1;
                } else {
                    report.layers_removed += 1;
                }
            }
        }
        if only.is_none() {
            for (name, path) in list(&self.images)? {
                if name.starts_with(TMP_PREFIX) {
                    report.bytes_freed += remove_tree(&path)?;
                    report.temp_removed += 1;
                }
            }
        }
        Ok(report)
    }
}

fn check_digest(expected: &Digest, actual: Digest) -> Result<Digest, StoreError> {
    if *expected == actual {
        Ok(actual)
    } else {
        Err(StoreError::DigestMismatch {
            expected: *expected,
            actual,
        })
    }
}

/// Copies `reader` to `writer`, telling read errors (the source's) from write errors (`path`'s).
fn copy(reader: &mut impl Read, writer: &mut impl Write, path: &Path) -> Result<(), StoreError> {
    let mut buf = vec![0; COPY_BUFFER];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(StoreError::Source { source }),
        };
        writer.write_all(&buf[..n]).map_err(io_err("write", path))?;
    }
}

/// Reads an image record; `None` if it does not exist.
fn read_record(path: &Path) -> Result<Option<ImageRecord>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_RECORD)
        .read_to_end(&mut bytes)
        .map_err(io_err("read", path))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            path: path.to_path_buf(),
            source,
        })
}

/// The entries of `dir` with UTF-8 names (the store writes no others).
fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    Ok(out)
}

/// Whether a running sandbox pins the layer directory `path` ([`Store::pin_layers`]). The
/// caller holds the store exclusively, so no new pin can appear meanwhile.
fn pinned(path: &Path) -> Result<bool, StoreError> {
    let dir = match File::open(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    match dir.try_lock() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", path)(e)),
    }
}

/// Removes a file or a directory tree (never following symlinks) and returns the bytes of
/// regular-file content it held, each inode counted once.
fn remove_tree(path: &Path) -> Result<u64, StoreError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    if !meta.is_dir() {
        fs::remove_file(path).map_err(io_err("remove", path))?;
        return Ok(meta.len());
    }
    let mut bytes = 0;
    let mut seen = HashSet::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            let meta = entry
                .metadata() // does not follow symlinks
                .map_err(io_err("inspect", &entry.path()))?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                bytes += meta.len();
            }
        }
    }
    fs::remove_dir_all(path).map_err(io_err("remove", path))?;
    Ok(bytes)
}
