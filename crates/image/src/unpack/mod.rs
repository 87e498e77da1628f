//! The layer unpacker: one OCI/Docker image layer (a tar stream, plain, gzip or zstd) into its own
//! directory, ready to be stacked with the others as an overlayfs lower layer.
//!
//! Hostile archives are the normal case, so the unpacker is built around one rule: **nothing is
//! created, changed or followed outside the layer directory.** How:
//!
//! - Entry paths are normalised first: a leading `/` is dropped (`/etc/x` is `etc/x`, as OCI
//!   tools do) and any `..` component is an [`UnpackError::Escape`].
//! - Every filesystem call is relative to a descriptor of the layer directory (see `root`):
//!   parents are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so a symlink
//!   unpacked earlier is followed as it would be inside the image but can never leave it
//!   (`link -> /` then `link/x` writes `dest/x`); the final component is never followed.
//!   We chose Docker's and containerd's "in root" semantics over refusing every symlink on the
//!   way, because real images do write through their own symlinks (`lib -> usr/lib`).
//! - Hardlinks may only point at a regular file already unpacked in this layer, reached without
//!   any symlink; symlink targets are stored verbatim and never resolved by us.
//! - Character and block devices are skipped (counted in [`UnpackStats::skipped_devices`]); a
//!   sandbox gets its devices from the jail, and a `0:0` character device in an archive would
//!   otherwise be a forged overlayfs whiteout.
//! - Owners are shifted by [`UnpackOptions::id_shift`] so the image's root is the sandbox's root,
//!   not the host's; setuid/setgid bits are kept (they are applied after the `chown`, which would
//!   clear them). A `security.capability` xattr is rewritten to the namespaced (v3) form with the
//!   shifted root id, so its capabilities only apply inside the sandbox's user namespace.
//! - Whiteouts become overlayfs whiteouts: `.wh.NAME` → a `0:0` character device `NAME`;
//!   `.wh..wh..opq` → `trusted.overlay.opaque=y` *and* `user.overlay.opaque=y` on the directory
//!   (the first for overlay mounted by the host's root, the second for overlay mounted with
//!   `userxattr` inside a user namespace, where `trusted.*` is invisible; `trusted.*` is skipped
//!   when we may not set it). Other `.wh..wh.*` names are AUFS metadata and skipped. Archive
//!   xattrs are limited to `user.*` (minus `user.overlay.*`, which only whiteouts may set) and
//!   `security.capability`, and only with [`UnpackOptions::preserve_xattrs`].
//! - An existing entry at an entry's path is replaced (a non-empty directory is removed through
//!   descriptors, depth-first), except that a directory over a directory is updated in place.
//!   `dest` must start empty, so whatever is found there came from this layer; it gets owner
//!   `id_shift:id_shift` and mode 0755 unless the archive carries `./`.
//! - Directory modes and mtimes are applied after all entries (creating children changes a
//!   directory's mtime, and a read-only directory would stop us creating them), each reopened
//!   without following symlinks and only if it is still the same inode.
//!
//! The caller must not let untrusted processes change `dest` while it is being unpacked; the
//! archive is the adversary here, not a concurrent writer.
//!
//! Rejected: the `tar` crate's own `unpack`/`unpack_in` (it is used here only to parse headers):
//! it resolves paths through symlinks created earlier in the same archive with path strings and
//! `..` checks instead of descriptor-relative resolution, and knows nothing of overlay whiteouts.
//! `pathrs` (libpathrs): a sound in-root resolver, but an extra dependency for what `openat2`
//! gives directly on the kernels we run (Linux ≥ 5.6; `ENOSYS` before that is reported as is).

mod root;
mod stream;
#[cfg(test)]
pub(crate) mod tests;

use std::ffi::CString;
use std::fs::{File, FileTimes, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt, fchown};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use crate::sys;
use root::{Cleared, EntryPath, Root, cname};
pub use stream::Compression;
pub(crate) use stream::decompress;

/// How to unpack a layer.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Added to every uid and gid in the archive (e.g. 1_500_000_000), so that root in the image
    /// is the sandbox's root and not the host's. Directories the archive needs but does not list,
    /// and the layer directory itself, get `id_shift:id_shift`.
    pub id_shift: u32,
    /// Keep `user.*` and `security.capability` xattrs from PAX `SCHILY.xattr.*` records. Others
    /// (`trusted.*`, `security.selinux`, `system.*`, `user.overlay.*`) are always skipped.
    pub preserve_xattrs: bool,
}

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Archive members handled (files, directories, links, whiteouts, skipped devices, ...);
    /// PAX and GNU extension headers are not counted.
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
    /// Whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`) converted.
    pub whiteouts: u64,
    /// Character and block devices skipped.
    pub skipped_devices: u64,
}

/// A failed unpack. Entry names are the archive's, lossily decoded.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer directory could not be opened or prepared.
    #[error("cannot {op} layer directory {}", path.display())]
    Dest {
        /// The layer directory.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The layer directory was not empty.
    #[error("layer directory {} is not empty", path.display())]
    DestNotEmpty {
        /// The layer directory.
        path: PathBuf,
    },
    /// The stream could not be read, decompressed or parsed as tar.
    #[error("cannot read the layer stream{}", after(last_entry.as_deref()))]
    Stream {
        /// The last entry read successfully, if any.
        last_entry: Option<String>,
        /// The read, decompression or tar error.
        #[source]
        source: io::Error,
    },
    /// The content of an entry could not be read from the stream.
    #[error("cannot read the content of entry {entry:?}")]
    ReadData {
        /// The entry.
        entry: String,
        /// The read or decompression error.
        #[source]
        source: io::Error,
    },
    /// An entry tried to reach outside the layer directory.
    #[error("entry {entry:?} would escape the layer: {reason}")]
    Escape {
        /// The entry.
        entry: String,
        /// How.
        reason: String,
    },
    /// An entry that cannot be unpacked (bad header field, unsupported type, ...).
    #[error("entry {entry:?} is invalid: {reason}")]
    Invalid {
        /// The entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A filesystem operation for an entry failed.
    #[error("entry {entry:?}: cannot {op}")]
    Io {
        /// The entry (`.` for the final directory pass on the root).
        entry: String,
        /// What was attempted.
        op: &'static str,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn after(last: Option<&str>) -> String {
    last.map(|e| format!(" after entry {e:?}"))
        .unwrap_or_default()
}

/// An entry-level failure, before the entry name is attached.
#[derive(Debug)]
enum Fail {
    Escape(String),
    Invalid(String),
    Io(&'static str, io::Error),
    Read(io::Error),
}

impl Fail {
    fn for_entry(self, raw: &[u8]) -> UnpackError {
        let entry = String::from_utf8_lossy(raw).into_owned();
        match self {
            Fail::Escape(reason) => UnpackError::Escape { entry, reason },
            Fail::Invalid(reason) => UnpackError::Invalid { entry, reason },
            Fail::Io(op, source) => UnpackError::Io { entry, op, source },
            Fail::Read(source) => UnpackError::ReadData { entry, source },
        }
    }
}

/// Attaches the operation to an I/O error.
trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, Fail>;
}

impl<T> Op<T> for io::Result<T> {
    fn op(self, op: &'static str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Io(op, e))
    }
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
const XATTR_CAPS: &str = "security.capability";
const COPY_BUFFER: usize = 128 * 1024;

/// Unpacks one OCI/Docker image layer (a tar stream, possibly gzip- or zstd-compressed, told
/// apart by its first bytes) into `dest`, an existing empty directory that becomes this layer's
/// own directory. Whiteouts are converted to overlayfs form (see the module docs).
///
/// On error, `dest` holds whatever was unpacked so far; the caller removes it.
pub fn unpack_layer(
    reader: impl Read,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let root = Root::open(dest, opts.id_shift)?;
    let stream_err =
        |last_entry: Option<String>| move |source| UnpackError::Stream { last_entry, source };
    let tar_stream = stream::decompress(reader).map_err(stream_err(None))?;
    let mut archive = tar::Archive::new(tar_stream);
    let mut unpacker = Unpacker {
        root,
        opts,
        stats: UnpackStats::default(),
        dirs: Vec::new(),
        buf: vec![0; COPY_BUFFER],
    };
    let mut last_entry = None;
    for entry in archive.entries().map_err(stream_err(None))? {
        let mut entry = entry.map_err(stream_err(last_entry.clone()))?;
        let raw = entry.path_bytes().into_owned();
        unpacker
            .entry(&mut entry, &raw)
            .map_err(|f| f.for_entry(&raw))?;
        last_entry = Some(String::from_utf8_lossy(&raw).into_owned());
    }
    // Read to the end so the gzip CRC / zstd checksum is checked and a digesting reader sees
    // every byte.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(stream_err(last_entry))?;
    unpacker.finish_dirs()?;
    Ok(unpacker.stats)
}

struct Unpacker<'o> {
    root: Root,
    opts: &'o UnpackOptions,
    stats: UnpackStats,
    /// Directories whose mode and mtime are applied at the end, in archive order.
    dirs: Vec<DirFixup>,
    /// Copy buffer for file contents, reused across entries.
    buf: Vec<u8>,
}

struct DirFixup {
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    mode: u32,
    mtime: Mtime,
}

/// Seconds and nanoseconds since the epoch (may be negative).
#[derive(Debug, Clone, Copy)]
struct Mtime {
    secs: i64,
    nanos: u32,
}

impl Mtime {
    /// The time as a `SystemTime`, or `None` if it cannot be represented (a hostile header
    /// could carry any 64-bit value, and `SystemTime` arithmetic panics on overflow).
    fn system_time(self) -> Option<SystemTime> {
        let secs = Duration::from_secs(self.secs.unsigned_abs());
        let t = if self.secs >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(secs)?
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(secs)?
        };
        t.checked_add(Duration::from_nanos(self.nanos.into()))
    }

    /// Access and modification time both set to this time; `Meta::read` has checked that it
    /// is representable.
    fn file_times(self) -> FileTimes {
        let t = self.system_time().unwrap_or(SystemTime::UNIX_EPOCH);
        FileTimes::new().set_accessed(t).set_modified(t)
    }

    /// Parses a PAX `mtime` value: decimal seconds with an optional fraction, possibly negative.
    fn parse_pax(value: &[u8]) -> Option<Mtime> {
        let value = std::str::from_utf8(value).ok()?;
        let (int, frac) = value.split_once('.').unwrap_or((value, ""));
        let mut secs: i64 = int.parse().ok()?;
        if frac.is_empty() {
            return Some(Mtime { secs, nanos: 0 });
        }
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        let mut nanos: u32 = digits.parse().ok()?;
        if int.starts_with('-') && nanos > 0 {
            secs = secs.checked_sub(1)?;
            nanos = 1_000_000_000 - nanos;
        }
        Some(Mtime { secs, nanos })
    }
}

/// Owner, mode, mtime and xattrs of an entry, with the id shift applied.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Mtime,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, opts: &UnpackOptions) -> Result<Meta, Fail> {
        let header = entry.header();
        let bad = |what: &str, e: io::Error| Fail::Invalid(format!("bad {what} field: {e}"));
        let shift = |what: &str, id: u64| {
            u32::try_from(id)
                .ok()
                .and_then(|id| id.checked_add(opts.id_shift))
                .filter(|&id| id != u32::MAX)
                .ok_or_else(|| {
                    Fail::Invalid(format!(
                        "{what} {id} shifted by {} is not a valid 32-bit id",
                        opts.id_shift
                    ))
                })
        };
        let uid = shift("uid", header.uid().map_err(|e| bad("uid", e))?)?;
        let gid = shift("gid", header.gid().map_err(|e| bad("gid", e))?)?;
        let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let header_mtime = header.mtime().map_err(|e| bad("mtime", e))?;
        let mut mtime = Mtime {
            secs: i64::try_from(header_mtime)
                .map_err(|_| Fail::Invalid(format!("mtime {header_mtime} is out of range")))?,
            nanos: 0,
        };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| Fail::Invalid(format!("bad PAX header: {e}")))?
        {
            for record in pax {
                let record = record.map_err(|e| Fail::Invalid(format!("bad PAX record: {e}")))?;
                let key = record.key_bytes();
                if key == b"mtime" {
                    mtime = Mtime::parse_pax(record.value_bytes()).ok_or_else(|| {
                        Fail::Invalid(format!(
                            "bad PAX mtime {:?}",
                            String::from_utf8_lossy(record.value_bytes())
                        ))
                    })?;
                } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.")
                    && opts.preserve_xattrs
                    && xattr_allowed(name)
                {
                    let value = if name == XATTR_CAPS.as_bytes() {
                        shift_caps(record.value_bytes(), opts.id_shift)?
                    } else {
                        record.value_bytes().to_vec()
                    };
                    xattrs.push((cname(name)?, value));
                }
            }
        }
        if mtime.system_time().is_none() {
            return Err(Fail::Invalid(format!(
                "mtime {}.{:09} is out of range",
                mtime.secs, mtime.nanos
            )));
        }
        Ok(Meta {
            uid,
            gid,
            mode,
            mtime,
            xattrs,
        })
    }

    /// Owner, then mode (a `chown` clears setuid/setgid), then xattrs (a `chown` also clears
    /// `security.capability`), then times, on an open file or directory.
    fn apply(&self, file: &File, with_mode_and_times: bool) -> Result<(), Fail> {
        fchown(file, Some(self.uid), Some(self.gid)).op("chown")?;
        if with_mode_and_times {
            file.set_permissions(Permissions::from_mode(self.mode))
                .op("chmod")?;
        }
        for (name, value) in &self.xattrs {
            sys::fsetxattr(file.as_fd(), name, value).op("set xattr")?;
        }
        if with_mode_and_times {
            file.set_times(self.mtime.file_times()).op("set times")?;
        }
        Ok(())
    }
}

fn xattr_allowed(name: &[u8]) -> bool {
    name == XATTR_CAPS.as_bytes()
        || (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
}

/// Rewrites a `security.capability` value so that it only applies in a user namespace whose
/// root is `id_shift`: v2 (no root id) becomes v3 with root id `id_shift`; a v3 root id is
/// shifted like any uid. Without a shift the value is kept as it is.
fn shift_caps(value: &[u8], id_shift: u32) -> Result<Vec<u8>, Fail> {
    const REVISION_MASK: u32 = 0xff00_0000;
    const REVISION_2: u32 = 0x0200_0000;
    const REVISION_3: u32 = 0x0300_0000;
    const SIZE_2: usize = 20;
    const SIZE_3: usize = 24;
    if id_shift == 0 {
        return Ok(value.to_vec());
    }
    let invalid = || Fail::Invalid("malformed security.capability xattr".into());
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(value.get(at..at + 4)?.try_into().ok()?))
    };
    let magic = word(0).ok_or_else(invalid)?;
    let (body, root) = match (magic & REVISION_MASK, value.len()) {
        (REVISION_2, SIZE_2) => (&value[4..SIZE_2], 0),
        (REVISION_3, SIZE_3) => (&value[4..SIZE_2], word(SIZE_2).ok_or_else(invalid)?),
        _ => return Err(invalid()),
    };
    let root = root
        .checked_add(id_shift)
        .ok_or_else(|| Fail::Invalid("security.capability root id overflows".into()))?;
    let mut out = Vec::with_capacity(SIZE_3);
    out.extend_from_slice(&((magic & !REVISION_MASK) | REVISION_3).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&root.to_le_bytes());
    Ok(out)
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<(), Fail> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            // Global PAX headers carry defaults (often just a comment); nothing to create.
            return Ok(());
        }
        self.stats.entries += 1;
        let path = EntryPath::parse(raw)?;

        if let Some((parent, name)) = path.split_last() {
            if parent.iter().any(|c| c.starts_with(WHITEOUT_META_PREFIX)) {
                return Ok(()); // inside an AUFS metadata directory (`.wh..wh.plnk/...`)
            }
            if let Some(c) = parent.iter().find(|c| c.starts_with(WHITEOUT_PREFIX)) {
                return Err(Fail::Invalid(format!(
                    "an entry inside the whiteout {:?}",
                    String::from_utf8_lossy(c)
                )));
            }
            if name == WHITEOUT_OPAQUE {
                return self.opaque(parent);
            }
            if name.starts_with(WHITEOUT_META_PREFIX) {
                return Ok(()); // other AUFS metadata
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let meta = Meta::read(entry, self.opts)?;
                return self.whiteout(parent, hidden, &meta);
            }
        }

        match kind {
            // Old (V7) archives mark directories as regular files with a trailing slash.
            EntryType::Regular if raw.ends_with(b"/") => {
                let meta = Meta::read(entry, self.opts)?;
                self.dir(&path, meta)
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let meta = Meta::read(entry, self.opts)?;
                self.file(&path, entry, &meta)
            }
            EntryType::Directory => {
                let meta = Meta::read(entry, self.opts)?;
                self.dir(&path, meta)
            }
            EntryType::Symlink => {
                let meta = Meta::read(entry, self.opts)?;
                let target = link_target(entry)?;
                self.symlink(&path, &target, &meta)
            }
            EntryType::Link => {
                let target = link_target(entry)?;
                self.hardlink(&path, &target)
            }
            EntryType::Fifo => {
                let meta = Meta::read(entry, self.opts)?;
                self.fifo(&path, &meta)
            }
            EntryType::Char | EntryType::Block => {
                self.stats.skipped_devices += 1;
                Ok(())
            }
            other => Err(Fail::Invalid(format!(
                "unsupported tar entry type {:?}",
                char::from(other.as_byte())
            ))),
        }
    }

    /// The parent directory's descriptor and the final name, for an entry that is not the root.
    fn place(&self, path: &EntryPath<'_>) -> Result<(OwnedFd, CString), Fail> {
        let (parent, name) = path
            .split_last()
            .ok_or_else(|| Fail::Invalid("only a directory can stand for the layer root".into()))?;
        Ok((self.root.dir(parent)?, cname(name)?))
    }

    fn file<R: Read>(
        &mut self,
        path: &EntryPath<'_>,
        data: &mut tar::Entry<'_, R>,
        meta: &Meta,
    ) -> Result<(), Fail> {
        let (parent, name) = self.place(path)?;
        root::clear(parent.as_fd(), &name, false)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let mut file =
            File::from(sys::openat(parent.as_fd(), &name, flags, 0o600).op("create file")?);
        let mut written = 0u64;
        loop {
            let n = match data.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::Read(e)),
            };
            file.write_all(&self.buf[..n]).op("write file")?;
            written += n as u64;
        }
        // The tar crate hands out a short read, not an error, when the stream ends early.
        if written != data.size() {
            return Err(Fail::Read(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the stream ended after {written} of {} bytes", data.size()),
            )));
        }
        self.stats.bytes += written;
        meta.apply(&file, true)
    }

    fn dir(&mut self, path: &EntryPath<'_>, meta: Meta) -> Result<(), Fail> {
        let dir = match path.split_last() {
            None => root::open_dir(self.root.fd(), c".").op("open layer root")?,
            Some(_) => {
                let (parent, name) = self.place(path)?;
                if root::clear(parent.as_fd(), &name, true)? == Cleared::Empty {
                    sys::mkdirat(parent.as_fd(), &name, 0o700).op("create directory")?;
                }
                root::open_dir(parent.as_fd(), &name).op("open directory")?
            }
        };
        let dir = File::from(dir);
        meta.apply(&dir, false)?;
        let st = dir.metadata().op("stat directory")?;
        self.dirs.push(DirFixup {
            path: path.comps().join(&b'/'),
            dev: st.dev(),
            ino: st.ino(),
            mode: meta.mode,
            mtime: meta.mtime,
        });
        Ok(())
    }

    fn symlink(&mut self, path: &EntryPath<'_>, target: &[u8], meta: &Meta) -> Result<(), Fail> {
        if target.is_empty() {
            return Err(Fail::Invalid("empty symlink target".into()));
        }
        let target = CString::new(target)
            .map_err(|_| Fail::Invalid("the symlink target contains a NUL byte".into()))?;
        let (parent, name) = self.place(path)?;
        root::clear(parent.as_fd(), &name, false)?;
        sys::symlinkat(&target, parent.as_fd(), &name).op("create symlink")?;
        sys::lchownat(parent.as_fd(), &name, meta.uid, meta.gid).op("chown symlink")?;
        sys::lutimensat(parent.as_fd(), &name, meta.mtime.secs, meta.mtime.nanos)
            .op("set symlink times")
    }

    /// A hardlink to a regular file unpacked earlier in this layer, reached without symlinks.
    /// The link shares the target's inode, so the entry's own owner and mode are not applied.
    fn hardlink(&mut self, path: &EntryPath<'_>, target_raw: &[u8]) -> Result<(), Fail> {
        let shown = String::from_utf8_lossy(target_raw);
        let target = EntryPath::parse(target_raw).map_err(|f| match f {
            Fail::Escape(reason) => Fail::Escape(format!("hardlink target {shown:?}: {reason}")),
            other => other,
        })?;
        let not_in_layer = || {
            Fail::Escape(format!(
                "hardlink target {shown:?} is not a regular file unpacked earlier in this layer"
            ))
        };
        let (target_dir, target_name) = target.split_last().ok_or_else(not_in_layer)?;
        let target_parent = match self.root.dir_without_symlinks(target_dir) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(Fail::Escape(format!(
                    "hardlink target {shown:?} passes through a symlink"
                )));
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ENOTDIR | libc::EXDEV)
                ) =>
            {
                return Err(not_in_layer());
            }
            Err(e) => return Err(Fail::Io("open hardlink target directory", e)),
        };
        let target_name = cname(target_name)?;
        let target_st = match sys::lstatat(target_parent.as_fd(), &target_name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(not_in_layer()),
            Err(e) => return Err(Fail::Io("inspect hardlink target", e)),
        };
        if root::file_type(&target_st) != libc::S_IFREG {
            return Err(not_in_layer());
        }
        let (parent, name) = self.place(path)?;
        if let Ok(st) = sys::lstatat(parent.as_fd(), &name)
            && st.st_dev == target_st.st_dev
            && st.st_ino == target_st.st_ino
        {
            return Ok(()); // already this file (a link to itself, or a repeated entry)
        }
        root::clear(parent.as_fd(), &name, false)?;
        sys::linkat(target_parent.as_fd(), &target_name, parent.as_fd(), &name)
            .op("create hardlink")
    }

    fn fifo(&mut self, path: &EntryPath<'_>, meta: &Meta) -> Result<(), Fail> {
        let (parent, name) = self.place(path)?;
        root::clear(parent.as_fd(), &name, false)?;
        sys::mknodat(parent.as_fd(), &name, libc::S_IFIFO | 0o600, 0).op("create fifo")?;
        // A FIFO opened for reading with O_NONBLOCK does not wait for a writer; the descriptor
        // lets us set owner, mode and times without a path lookup.
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW;
        let fifo = File::from(sys::openat(parent.as_fd(), &name, flags, 0).op("open fifo")?);
        Meta {
            xattrs: Vec::new(),
            ..*meta
        }
        .apply(&fifo, true)
    }

    /// `.wh.NAME`: `NAME` becomes an overlayfs whiteout (a `0:0` character device), replacing
    /// anything this layer put there.
    fn whiteout(&mut self, parent: &[&[u8]], hidden: &[u8], meta: &Meta) -> Result<(), Fail> {
        if matches!(hidden, b"" | b"." | b"..") {
            return Err(Fail::Invalid("a whiteout must name an entry".into()));
        }
        let dir = self.root.dir(parent)?;
        let name = cname(hidden)?;
        root::clear(dir.as_fd(), &name, false)?;
        sys::mknodat(dir.as_fd(), &name, libc::S_IFCHR, libc::makedev(0, 0))
            .op("create whiteout")?;
        sys::lchownat(dir.as_fd(), &name, meta.uid, meta.gid).op("chown whiteout")?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// `.wh..wh..opq`: the directory hides everything below it in lower layers.
    fn opaque(&mut self, dir: &[&[u8]]) -> Result<(), Fail> {
        let fd = self.root.dir(dir)?;
        let dir = root::open_dir(fd.as_fd(), c".").op("open opaque directory")?;
        set_opaque(dir.as_fd()).op("set overlay opaque xattr")?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest first, each directory once with the values of
    /// its last entry, skipping directories that later entries replaced.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let dirs = std::mem::take(&mut self.dirs);
        let mut last = std::collections::HashMap::new();
        for (i, d) in dirs.iter().enumerate() {
            last.insert(d.path.as_slice(), i);
        }
        let mut order: Vec<usize> = last.into_values().collect();
        let depth = |i: usize| dirs[i].path.split(|&b| b == b'/').count();
        order.sort_by_key(|&i| (std::cmp::Reverse(depth(i)), i));
        for i in order {
            let d = &dirs[i];
            let shown = if d.path.is_empty() { b"." } else { &d.path[..] };
            let comps: Vec<&[u8]> = d
                .path
                .split(|&b| b == b'/')
                .filter(|c| !c.is_empty())
                .collect();
            let fixup = || -> Result<(), Fail> {
                let Some(dir) = self
                    .root
                    .reopen_dir(&comps, d.dev, d.ino)
                    .op("reopen directory")?
                else {
                    return Ok(());
                };
                dir.set_permissions(Permissions::from_mode(d.mode))
                    .op("chmod directory")?;
                dir.set_times(d.mtime.file_times())
                    .op("set directory times")
            };
            fixup().map_err(|f| f.for_entry(shown))?;
        }
        Ok(())
    }
}

/// Marks a directory opaque for overlayfs in both xattr namespaces (see the module docs). One
/// of the two is enough: `trusted.*` fails with `EPERM` in a user namespace, and `user.*` fails on
/// a filesystem without user xattrs; if both fail, the `trusted.*` error is reported unless it
/// was that expected `EPERM`.
fn set_opaque(dir: BorrowedFd<'_>) -> io::Result<()> {
    let trusted = sys::fsetxattr(dir, c"trusted.overlay.opaque", b"y");
    let user = sys::fsetxattr(dir, c"user.overlay.opaque", b"y");
    match (trusted, user) {
        (_, Ok(())) | (Ok(()), _) => Ok(()),
        (Err(e), Err(_)) if e.raw_os_error() != Some(libc::EPERM) => Err(e),
        (Err(_), Err(e)) => Err(e),
    }
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> Result<Vec<u8>, Fail> {
    entry
        .link_name_bytes()
        .map(|t| t.into_owned())
        .ok_or_else(|| Fail::Invalid("a link without a target".into()))
}
