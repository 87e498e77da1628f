//! The only place in this crate where `unsafe` is allowed: thin wrappers over the `*at` system
//! calls the layer unpacker makes, and the one `renameat2` the image store needs. Each takes Rust
//! types, returns `std::io::Result`, and keeps the raw-pointer handling next to its `// SAFETY:`
//! justification. What the standard library already offers safely on an open file (`fchown`,
//! `fchmod`, `futimens`, `fstat`) is used from there instead.
//!
//! Every call here is relative to a directory file descriptor and never follows a symlink in the
//! final component (the `*at` calls that could follow get `AT_SYMLINK_NOFOLLOW`); resolving the
//! directories *leading* to that component is `openat2`'s job, with the `RESOLVE_*` flags the
//! caller picks.
//!
//! Rejected: `rustix`/`nix` for ~15 calls (the jail made the same choice: one `libc` dependency
//! keeps the whole unsafe surface in one reviewable file), and `libc::open_how` (it is
//! `#[non_exhaustive]`, so it cannot be built without `mem::zeroed`; the kernel ABI struct is
//! declared here instead).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

pub(crate) use libc::{
    RESOLVE_BENEATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS,
};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Retries `f` while it fails with `EINTR` (and, for `openat2`, `EAGAIN`, which the kernel returns
/// when a concurrent rename might have let a resolution escape, and asks the caller to retry).
fn retry<T>(retry_eagain: bool, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut attempts = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if retry_eagain && e.raw_os_error() == Some(libc::EAGAIN) && attempts < 32 => {
                attempts += 1;
            }
            other => return other,
        }
    }
}

/// `struct open_how` from `linux/openat2.h` (kernel ABI, version 0: 24 bytes).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(2)`: opens `path` relative to `dir` with the given `O_*` flags and `RESOLVE_*` rules.
/// `O_CLOEXEC` is always added.
pub(crate) fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: libc::c_int,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    let fd = retry(true, || {
        // SAFETY: `path` is NUL-terminated and `how` is a live, correctly laid out `open_how`
        // whose size we pass; the kernel only reads both during the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret as libc::c_int)
        }
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(2)` of a single name in `dir`. `O_CLOEXEC` is always added; callers pass
/// `O_NOFOLLOW` (or `O_CREAT|O_EXCL`, which never follows) themselves.
pub(crate) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let fd = retry(false, || {
        // SAFETY: `name` is NUL-terminated and outlives the call.
        check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        })
    })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat(2)`.
pub(crate) fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `symlinkat(2)`: creates `name` in `dir` pointing at `target`, stored verbatim.
pub(crate) fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat(2)` without `AT_SYMLINK_FOLLOW`: links exactly the inode named `old_name` in `old_dir`
/// (a symlink there would be linked as a symlink, never followed).
pub(crate) fn linkat(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated and outlive the call.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
    .map(drop)
}

/// `mknodat(2)`; `mode` includes the file type (`S_IFCHR`, `S_IFIFO`).
pub(crate) fn mknodat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

/// `unlinkat(2)`; `flags` is 0 or `AT_REMOVEDIR`.
pub(crate) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `fchownat(2)` with `AT_SYMLINK_NOFOLLOW` (changes a symlink itself, never its target).
pub(crate) fn lchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `utimensat(2)` with `AT_SYMLINK_NOFOLLOW`: sets both atime and mtime of `name` itself.
pub(crate) fn lutimensat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    secs: i64,
    nanos: u32,
) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: nanos as libc::c_long,
    };
    let times = [t, t];
    // SAFETY: `name` is NUL-terminated and `times` is an array of two timespecs, as required;
    // both outlive the call.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fstatat(2)` with `AT_SYMLINK_NOFOLLOW` (an `lstat` relative to `dir`).
pub(crate) fn lstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated; `st` points to writable memory for one `struct stat`.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so the kernel filled in the whole struct.
    Ok(unsafe { st.assume_init() })
}

/// `fsetxattr(2)`: sets `name` to `value` on the open file `fd` (create or replace).
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `value` is a valid slice of the given length; the
    // kernel copies both during the call.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `fgetxattr(2)` of `name` on the open file `fd`, or `None` if it is not set (tests only).
#[cfg(test)]
pub(crate) fn fgetxattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    // SAFETY: `name` is NUL-terminated and `buf` is writable for `buf.len()` bytes.
    let ret = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(ret as usize);
    Ok(Some(buf))
}

/// The names in the directory open as `dir` (an `O_RDONLY|O_DIRECTORY` descriptor), without `.`
/// and `..`. Reads from the start, whatever the descriptor's offset was.
pub(crate) fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of the descriptor it is given, so hand it a duplicate.
    let dup = dir.try_clone_to_owned()?;
    // SAFETY: `dup` is an open directory descriptor we own; on success the DIR stream owns it
    // (and closedir below closes it), so we release it from the OwnedFd first.
    let stream = unsafe { libc::fdopendir(dup.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(dup);
    // The duplicate shares the file offset with `dir`, which may sit at the end from an earlier
    // listing.
    // SAFETY: `stream` is the valid DIR pointer fdopendir just returned.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    let result = loop {
        // readdir reports errors only through errno, so clear it first.
        // SAFETY: __errno_location returns this thread's errno slot, valid for writes.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is valid until the closedir below; the returned entry is only read
        // before the next readdir call on the same stream.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: a non-NULL readdir result points to a dirent whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is valid and not used after this; closedir also closes the duplicate.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// `renameat2(2)` with `RENAME_NOREPLACE`: renames `from` to `to` unless `to` already exists
/// (then `EEXIST`), in one atomic step. The image store puts unpacked layer directories in place
/// with it, so that of two processes unpacking the same layer, the second cannot replace (or
/// merge into) the first one's directory. Unlike the calls above, both are plain paths: they
/// are the store's own, not an archive's.
pub(crate) fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    retry(false, || {
        // SAFETY: both paths are NUL-terminated and outlive the call.
        check(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        })
    })
    .map(drop)
}
