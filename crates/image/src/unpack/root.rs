//! The layer directory as a confined root: every lookup and every change below it goes through a
//! directory descriptor of `dest`, never through a path string on the host.
//!
//! - Parents of an entry are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
//!   a symlink unpacked earlier is followed the way it would be inside the image, but `/` and
//!   `..` are clamped to the layer directory, so `link -> /` then `link/x` lands at `dest/x`.
//!   Missing parents are created (owned by the image's root, mode 0755), as Docker does.
//! - The final component is never followed: it is created or removed with `*at` calls on the
//!   parent's descriptor (`O_NOFOLLOW`, `O_EXCL`, `AT_SYMLINK_NOFOLLOW`).
//! - Hardlink targets are stricter: `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, so no symlink at all
//!   may sit on the way to them.
//! - Replacing a directory removes its contents depth-first through descriptors, never by path.

use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, fchown};
use std::path::Path;

use super::{Fail, Op, UnpackError};
use crate::sys;

/// Mode of directories that the archive never listed but that a listed entry needs as a parent.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// An archive path split into components, with empty and `.` components dropped and a leading
/// `/` ignored (OCI tools treat `/etc/x` as `etc/x`). `..` is rejected wherever it appears: no
/// layer needs it, and resolving it lexically against symlinks unpacked earlier is ambiguous.
#[derive(Debug)]
pub(super) struct EntryPath<'a> {
    comps: Vec<&'a [u8]>,
}

impl<'a> EntryPath<'a> {
    pub(super) fn parse(raw: &'a [u8]) -> Result<Self, Fail> {
        if raw.contains(&0) {
            return Err(Fail::Invalid("the path contains a NUL byte".into()));
        }
        let mut comps = Vec::new();
        for comp in raw.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => {
                    return Err(Fail::Escape(
                        "the path has a `..` component (rejected wherever it appears)".into(),
                    ));
                }
                _ => comps.push(comp),
            }
        }
        Ok(EntryPath { comps })
    }

    /// The parent's components and the final name; `None` for the layer root itself.
    pub(super) fn split_last(&self) -> Option<(&[&'a [u8]], &'a [u8])> {
        self.comps
            .split_last()
            .map(|(name, parent)| (parent, *name))
    }

    pub(super) fn comps(&self) -> &[&'a [u8]] {
        &self.comps
    }
}

/// `comps` joined with `/` as a C string, `.` when empty.
pub(super) fn join(comps: &[&[u8]]) -> CString {
    if comps.is_empty() {
        return c".".to_owned();
    }
    // Components come from `EntryPath::parse`, which rejected NUL bytes.
    CString::new(comps.join(&b'/')).unwrap_or_else(|_| c".".to_owned())
}

/// One path component as a C string.
pub(super) fn cname(comp: &[u8]) -> Result<CString, Fail> {
    CString::new(comp).map_err(|_| Fail::Invalid("a name contains a NUL byte".into()))
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The file type bits of an `lstat` result.
pub(super) fn file_type(st: &libc::stat) -> libc::mode_t {
    st.st_mode & libc::S_IFMT
}

pub(super) struct Root {
    fd: OwnedFd,
    id_shift: u32,
}

impl Root {
    /// Opens `dest`, which must be an empty directory, and gives it to the image's root user
    /// (mode 0755) unless the archive later carries an entry for `./`.
    pub(super) fn open(dest: &Path, id_shift: u32) -> Result<Root, UnpackError> {
        let err = |op, source| UnpackError::Dest {
            path: dest.to_path_buf(),
            op,
            source,
        };
        // The caller's path is trusted; O_DIRECTORY makes anything but a directory fail.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dest)
            .map_err(|e| err("open", e))?;
        if !sys::read_dir_names(file.as_fd())
            .map_err(|e| err("list", e))?
            .is_empty()
        {
            return Err(UnpackError::DestNotEmpty {
                path: dest.to_path_buf(),
            });
        }
        fchown(&file, Some(id_shift), Some(id_shift)).map_err(|e| err("chown", e))?;
        file.set_permissions(Permissions::from_mode(IMPLICIT_DIR_MODE))
            .map_err(|e| err("chmod", e))?;
        Ok(Root {
            fd: file.into(),
            id_shift,
        })
    }

    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens (`O_PATH`) the directory `comps` resolved in root, creating what is missing.
    pub(super) fn dir(&self, comps: &[&[u8]]) -> Result<OwnedFd, Fail> {
        match self.open_in_root(comps) {
            Ok(fd) => return Ok(fd),
            Err(e) if errno(&e) == libc::ENOENT => {}
            Err(e) => return Err(Fail::Io("open parent directory", e)),
        }
        // Some component is missing: find the deepest existing prefix, then create the rest.
        let mut fd = self.fd.try_clone().op("open parent directory")?;
        for i in 0..comps.len() {
            match self.open_in_root(&comps[..=i]) {
                Ok(next) => fd = next,
                Err(e) if errno(&e) == libc::ENOENT => {
                    for comp in &comps[i..] {
                        fd = self.make_implicit_dir(fd.as_fd(), &cname(comp)?)?;
                    }
                    return Ok(fd);
                }
                Err(e) => return Err(Fail::Io("open parent directory", e)),
            }
        }
        // Every prefix resolved this time, the last one being `comps` itself.
        Ok(fd)
    }

    fn open_in_root(&self, comps: &[&[u8]]) -> io::Result<OwnedFd> {
        sys::openat2(
            self.fd(),
            &join(comps),
            libc::O_PATH | libc::O_DIRECTORY,
            sys::RESOLVE_IN_ROOT | sys::RESOLVE_NO_MAGICLINKS,
        )
    }

    /// Creates a directory the archive did not list, owned by the image's root, mode 0755.
    fn make_implicit_dir(&self, parent: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd, Fail> {
        match sys::mkdirat(parent, name, 0o700) {
            Ok(()) => {}
            // The name exists but resolving it failed with ENOENT: a dangling symlink.
            Err(e) if errno(&e) == libc::EEXIST => {
                return Err(Fail::Invalid(format!(
                    "parent {:?} is a dangling symlink",
                    name.to_string_lossy()
                )));
            }
            Err(e) => return Err(Fail::Io("create parent directory", e)),
        }
        let dir = File::from(open_dir(parent, name).op("open parent directory")?);
        fchown(&dir, Some(self.id_shift), Some(self.id_shift)).op("chown parent directory")?;
        dir.set_permissions(Permissions::from_mode(IMPLICIT_DIR_MODE))
            .op("chmod parent directory")?;
        Ok(dir.into())
    }

    /// Opens (`O_PATH`) the directory `comps` beneath the root with no symlink anywhere on the
    /// way: the rule for hardlink targets.
    pub(super) fn dir_without_symlinks(&self, comps: &[&[u8]]) -> io::Result<OwnedFd> {
        sys::openat2(
            self.fd(),
            &join(comps),
            libc::O_PATH | libc::O_DIRECTORY,
            sys::RESOLVE_BENEATH | sys::RESOLVE_NO_SYMLINKS | sys::RESOLVE_NO_MAGICLINKS,
        )
    }

    /// Reopens the directory at `comps` for the final metadata pass, if it is still the
    /// directory `(dev, ino)` recorded when it was unpacked (a later entry may have replaced it).
    pub(super) fn reopen_dir(
        &self,
        comps: &[&[u8]],
        dev: u64,
        ino: u64,
    ) -> io::Result<Option<File>> {
        let fd = match sys::openat2(
            self.fd(),
            &join(comps),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            sys::RESOLVE_IN_ROOT | sys::RESOLVE_NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(e) if matches!(errno(&e), libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        let meta = file.metadata()?;
        Ok((meta.dev() == dev && meta.ino() == ino).then_some(file))
    }
}

/// Opens `name` in `parent` as a directory for reading, never following a symlink.
pub(super) fn open_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    sys::openat(
        parent,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// What [`clear`] found at the name.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cleared {
    /// Nothing was there, or it was removed.
    Empty,
    /// A directory was there and was kept (only when asked to keep directories).
    KeptDir,
}

/// Makes room for a new entry at `name` in `parent`: removes whatever is there (a directory with
/// all its contents), except that an existing directory stays when `keep_dir` is set (a
/// directory entry over a directory updates it, as in Docker and containerd).
pub(super) fn clear(parent: BorrowedFd<'_>, name: &CStr, keep_dir: bool) -> Result<Cleared, Fail> {
    let st = match sys::lstatat(parent, name) {
        Ok(st) => st,
        Err(e) if errno(&e) == libc::ENOENT => return Ok(Cleared::Empty),
        Err(e) => return Err(Fail::Io("inspect existing entry", e)),
    };
    if file_type(&st) != libc::S_IFDIR {
        sys::unlinkat(parent, name, 0).op("remove existing entry")?;
    } else if keep_dir {
        return Ok(Cleared::KeptDir);
    } else {
        remove_tree(parent, name).op("remove existing directory")?;
    }
    Ok(Cleared::Empty)
}

/// Removes the directory `name` in `parent` and everything below it, depth-first, through
/// descriptors only (`O_NOFOLLOW` on every directory opened, so a symlink inside is unlinked,
/// never entered). Iterative, so a deep tree cannot overflow the stack.
pub(super) fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // Each element: an open directory and its name in the element below (or in `parent`).
    let mut stack: Vec<(OwnedFd, CString)> = vec![(open_dir(parent, name)?, name.to_owned())];
    loop {
        let Some((dir, _)) = stack.last() else {
            return Ok(());
        };
        let mut subdir = None;
        for child in sys::read_dir_names(dir.as_fd())? {
            let st = sys::lstatat(dir.as_fd(), &child)?;
            if file_type(&st) == libc::S_IFDIR {
                subdir = Some(child);
                break;
            }
            sys::unlinkat(dir.as_fd(), &child, 0)?;
        }
        match subdir {
            Some(child) => {
                let fd = open_dir(dir.as_fd(), &child)?;
                stack.push((fd, child));
            }
            None => {
                // `dir` is empty now: remove it from its parent and go back up.
                let Some((_, done)) = stack.pop() else {
                    return Ok(());
                };
                let up = stack.last().map_or(parent, |(fd, _)| fd.as_fd());
                sys::unlinkat(up, &done, libc::AT_REMOVEDIR)?;
            }
        }
    }
}
