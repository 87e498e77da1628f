//! The only place in the jail where `unsafe` is allowed: thin, documented wrappers over the
//! system calls the containment pipeline makes. Each wrapper returns `std::io::Result`, takes
//! Rust types, and keeps the raw-pointer handling next to its `// SAFETY:` justification.
//!
//! Rejected: `nix` and `rustix`. The jail needs about forty calls, several of which neither
//! covers in a form we can use (a `fork`-like `clone` with namespace flags, `close_range` with
//! `CLOSE_RANGE_CLOEXEC`, capability bounding-set drops); one dependency (`libc`) keeps the
//! whole unsafe surface in one reviewable file.

pub(crate) mod netlink;
pub(crate) mod seccomp;

use std::convert::Infallible;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

/// `clone(flags | SIGCHLD)` with fork semantics: returns the child's pid in the parent and 0 in
/// the child, which continues on a copy of the parent's stack.
///
/// The caller must be single-threaded (the `cove run` supervisor and the sandbox's init are):
/// the child then holds no lock that another thread owned, so it may allocate freely.
pub(crate) fn clone_fork(flags: libc::c_int) -> io::Result<libc::pid_t> {
    // SAFETY: with a NULL stack pointer the raw clone syscall behaves like fork(2): the child
    // resumes here on a copy-on-write copy of our stack. No Rust invariant is broken because the
    // caller is single-threaded (documented requirement), so no lock is held by a vanished thread.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    check_long(ret).map(|pid| pid as libc::pid_t)
}

/// `fork(2)`; same single-threaded requirement as [`clone_fork`].
pub(crate) fn fork() -> io::Result<libc::pid_t> {
    clone_fork(0)
}

/// Runs `child` in a new process that borrows this one's memory until it calls `execve` or
/// exits (`clone(CLONE_VM | CLONE_VFORK | SIGCHLD)`, the way `posix_spawn` starts a program);
/// returns its pid once it has. Unlike [`fork`], nothing of the address space is copied, and
/// nothing is torn down again at the child's `execve`: for a process the size of Cove's, most
/// of a fork's cost. The child runs on a stack of its own, mapped here and unmapped on return.
///
/// Same single-threaded requirement as [`clone_fork`]. Until it execs or exits, the child
/// writes into this process's memory (its heap included), while this process is suspended:
/// `child` may allocate, but must leave nothing it would need afterwards, and must end in
/// `execve` or [`exit`].
pub(crate) fn spawn_sharing_memory<F: FnOnce() -> Infallible>(child: F) -> io::Result<libc::pid_t> {
    const STACK: usize = 256 * 1024;
    const GUARD: usize = 4096;
    extern "C" fn trampoline<F: FnOnce() -> Infallible>(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `Option<F>` below, alive in the suspended parent's frame; only
        // this child touches it until it execs or exits.
        let slot = unsafe { &mut *arg.cast::<Option<F>>() };
        match slot.take() {
            Some(f) => run(f),
            None => exit(125),
        }
    }
    fn run<F: FnOnce() -> Infallible>(f: F) -> ! {
        match f() {}
    }
    // SAFETY: a fresh anonymous mapping; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK + GUARD,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the lowest page of our own mapping becomes the guard.
    if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
        let e = io::Error::last_os_error();
        // SAFETY: the mapping made above, used by nobody.
        unsafe { libc::munmap(base, STACK + GUARD) };
        return Err(e);
    }
    let mut slot = Some(child);
    // SAFETY: the stack grows down from the mapping's end (16-byte aligned, as mmap returns
    // page-aligned memory). The trampoline gets a pointer to `slot`, which outlives the call:
    // CLONE_VFORK returns only once the child no longer uses this memory.
    let pid = unsafe {
        libc::clone(
            trampoline::<F>,
            base.cast::<u8>().add(STACK + GUARD).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut slot).cast(),
        )
    };
    let result = check(pid);
    // SAFETY: the mapping made above, unused now (see above).
    unsafe { libc::munmap(base, STACK + GUARD) };
    result
}

/// `close(2)` of a descriptor this process owns through nobody (a child's copy of one its
/// parent still holds, after [`spawn_sharing_memory`]).
pub(crate) fn close(fd: RawFd) -> io::Result<()> {
    // SAFETY: closes a descriptor number; no memory is involved.
    check(unsafe { libc::close(fd) }).map(drop)
}

/// `unshare(2)`.
pub(crate) fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes a plain integer and touches no memory of ours.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// `mount(2)`. `None` arguments are passed as NULL.
pub(crate) fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either NULL or points to a NUL-terminated CString that outlives
    // the call; the kernel copies the strings before returning.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(ret).map(drop)
}

/// `umount2(2)`.
pub(crate) fn umount2(target: &str, flags: libc::c_int) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: `target` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `pivot_root(2)`.
pub(crate) fn pivot_root(new_root: &str, put_old: &str) -> io::Result<()> {
    let new_root = cstr(new_root)?;
    let put_old = cstr(put_old)?;
    // SAFETY: both arguments are valid NUL-terminated strings for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check_long(ret).map(drop)
}

/// `sethostname(2)`.
pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe the bytes of `name`, which outlives the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `setresuid(2)` and `setresgid(2)` to the same id, group first.
pub(crate) fn set_ids(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// `setgroups(2)`.
pub(crate) fn setgroups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: pointer and length describe `groups`, which outlives the call.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) }).map(drop)
}

fn prctl(op: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: every prctl operation used in this module takes integer arguments only (or, for
    // PR_SET_NAME, a pointer that the caller guarantees valid; see `set_name`).
    check(unsafe { libc::prctl(op, a, b, 0 as libc::c_ulong, 0 as libc::c_ulong) })
}

/// Deliver `sig` to us when our parent thread exits.
pub(crate) fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0).map(drop)
}

/// Mark the process (not) dumpable: a non-dumpable process cannot be ptraced or have its
/// `/proc/PID/mem` read by processes without `CAP_SYS_PTRACE`.
pub(crate) fn set_dumpable(on: bool) -> io::Result<()> {
    prctl(libc::PR_SET_DUMPABLE, on as libc::c_ulong, 0).map(drop)
}

/// `PR_SET_NO_NEW_PRIVS`: execve can never grant privileges again.
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).map(drop)
}

/// Sets the process name shown in `ps` (truncated by the kernel to 15 bytes).
pub(crate) fn set_name(name: &str) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: PR_SET_NAME reads at most 16 bytes from a NUL-terminated string that outlives the
    // call.
    check(unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Sets the nice value of process `pid` (0: this one). Lowering it takes CAP_SYS_NICE.
pub(crate) fn set_nice(pid: libc::pid_t, nice: i32) -> io::Result<()> {
    // SAFETY: setpriority takes plain integers. PRIO_PROCESS is a c_int constant; glibc's
    // prototype takes its enum, hence the cast.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS as _, pid as libc::id_t, nice) }).map(drop)
}

/// Secure bits: root gets no capabilities from execve, and these bits can never be changed again.
pub(crate) fn lock_securebits() -> io::Result<()> {
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
    const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    prctl(libc::PR_SET_SECUREBITS, bits, 0).map(drop)
}

/// Drops every capability from the bounding set (`last` is the highest capability number).
pub(crate) fn drop_bounding_set(last: u32, keep: u64) -> io::Result<()> {
    for cap in 0..=last {
        if keep & (1 << cap) != 0 {
            continue;
        }
        match prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0) {
            Ok(_) => {}
            // Capabilities newer than this kernel report EINVAL: nothing to drop.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Clears the ambient set.
pub(crate) fn clear_ambient() -> io::Result<()> {
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
    )
    .map(drop)
}

/// `capset(2)`: sets effective, permitted and inheritable to `keep` (a bit mask of
/// capability numbers below 64).
pub(crate) fn capset(keep: u64) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: header and the two-element data array have the layout of the kernel's
    // `__user_cap_header_struct` / `__user_cap_data_struct[2]` for version 3, and live for the
    // whole call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check_long(ret).map(drop)
}

/// `close_range(first, ~0, flags)`: with `cloexec`, marks instead of closing.
pub(crate) fn close_range(first: u32, cloexec: bool) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    let flags = if cloexec { CLOSE_RANGE_CLOEXEC } else { 0 };
    // SAFETY: close_range only manipulates our descriptor table. Descriptors owned by Rust
    // objects that are later dropped would be double-closed, so callers only use this right
    // before execve or when every remaining descriptor is intentionally abandoned.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
    check_long(ret).map(drop)
}

/// Closes every descriptor from 3 up except those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    let mut next = 3;
    for fd in keep {
        if fd > next {
            // SAFETY: see `close_range`; the range [next, fd-1] holds no descriptor we keep.
            let ret =
                unsafe { libc::syscall(libc::SYS_close_range, next as u32, (fd - 1) as u32, 0) };
            check_long(ret)?;
        }
        next = fd + 1;
    }
    close_range(next as u32, false)
}

/// `dup2(2)`.
pub(crate) fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table; `to` is a stdio slot we own.
    check(unsafe { libc::dup2(from, to) }).map(drop)
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connected pair of Unix datagram-like sockets (`SOCK_SEQPACKET`, close-on-exec), to pass
/// descriptors with [`send_fds`] and [`recv_fds`].
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The most descriptors one [`send_fds`] message carries.
pub(crate) const MAX_PASSED_FDS: usize = 8;

/// Sends `fds` (at most [`MAX_PASSED_FDS`]) in one message on `sock` (`SCM_RIGHTS`, with one
/// byte of data so that the message is never empty).
pub(crate) fn send_fds(sock: RawFd, fds: &[RawFd]) -> io::Result<()> {
    send_data_and_fds(sock, &[0], fds)
}

/// Sends `data` (not empty) and `fds` (at most [`MAX_PASSED_FDS`]) in one message on `sock`.
pub(crate) fn send_data_and_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an empty message",
        ));
    }
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let payload = std::mem::size_of_val(fds) as u32;
    // sendmsg only reads the data, but an iovec points at mutable bytes.
    let mut data = data.to_vec();
    with_message(&mut data, |msg| {
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: the control buffer (128 bytes) holds CMSG_SPACE of 8 descriptors (48 bytes),
        // so the first header and its data lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        // SAFETY: `msg` describes live buffers (`with_message`).
        retry_eintr(|| unsafe { libc::sendmsg(sock, msg, libc::MSG_NOSIGNAL) }).map(drop)
    })
}

/// Calls `f` with a message header of `data` and a 128-byte control buffer (all live for the
/// call).
fn with_message<R>(data: &mut [u8], f: impl FnOnce(&mut libc::msghdr) -> R) -> R {
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive `f`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    f(&mut msg)
}

/// Calls `call` again while it fails with `EINTR`.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Receives the descriptors of one [`send_fds`] message on `sock` (close-on-exec). The peer's
/// end closed without a message is `UnexpectedEof`.
pub(crate) fn recv_fds(sock: RawFd) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    recv_data_and_fds(sock, &mut byte).map(|(_, fds)| fds)
}

/// Receives one message of data (into `buf`; its length returned) and descriptors from `sock`
/// ([`send_data_and_fds`]). A message longer than `buf` is an error.
pub(crate) fn recv_data_and_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    with_message(buf, |msg| receive_fds(sock, msg))
}

fn receive_fds(sock: RawFd, msg: &mut libc::msghdr) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: `msg` describes live buffers (`with_message`).
    let n = retry_eintr(|| unsafe { libc::recvmsg(sock, msg, libc::MSG_CMSG_CLOEXEC) })?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` and set msg_controllen; the CMSG_* walk stays inside
    // it, and each SCM_RIGHTS payload holds cmsg_len - CMSG_LEN(0) bytes of descriptors that
    // are new in this process and owned by nobody else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data: *const RawFd = libc::CMSG_DATA(cmsg).cast();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors were truncated"));
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("a message was truncated"));
    }
    Ok((n, fds))
}

/// `setsid(2)`.
pub(crate) fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Makes `fd` (a terminal) the controlling terminal of this session.
pub(crate) fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) }).map(drop)
}

/// Sets a resource limit (soft and hard).
pub(crate) fn setrlimit(
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    check(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

/// A set of signals.
pub(crate) struct SigSet(libc::sigset_t);

impl SigSet {
    /// The empty set.
    pub(crate) fn empty() -> SigSet {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
        let mut set = unsafe { std::mem::zeroed::<libc::sigset_t>() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        SigSet(set)
    }
    /// Every signal.
    pub(crate) fn full() -> SigSet {
        let mut s = SigSet::empty();
        // SAFETY: `s.0` is a valid sigset_t.
        unsafe { libc::sigfillset(&mut s.0) };
        s
    }
    /// The set of `sigs`.
    pub(crate) fn of(sigs: &[libc::c_int]) -> SigSet {
        let mut s = SigSet::empty();
        for &sig in sigs {
            // SAFETY: `s.0` is a valid sigset_t; invalid numbers only make sigaddset fail.
            unsafe { libc::sigaddset(&mut s.0, sig) };
        }
        s
    }
    /// Blocks these signals; returns the previous mask.
    pub(crate) fn block(&self) -> io::Result<SigSet> {
        let mut old = SigSet::empty();
        // SAFETY: both pointers are valid sigset_t values for the duration of the call.
        let ret = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &self.0, &mut old.0) };
        check(ret).map(|_| old)
    }
    /// Makes this set the signal mask.
    pub(crate) fn set_mask(&self) -> io::Result<()> {
        // SAFETY: valid sigset_t pointer; NULL old-set pointer is allowed.
        let ret = unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        check(ret).map(drop)
    }
    /// Waits for one of these (blocked) signals; returns (signal, sender pid, si_code).
    pub(crate) fn wait(&self) -> io::Result<(libc::c_int, libc::pid_t, libc::c_int)> {
        self.wait_for(None)
            .map(|s| s.expect("no timeout, so a signal"))
    }

    /// [`SigSet::wait`] for at most `timeout` (`None` after it).
    pub(crate) fn wait_for(
        &self,
        timeout: Option<std::time::Duration>,
    ) -> io::Result<Option<(libc::c_int, libc::pid_t, libc::c_int)>> {
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
        });
        loop {
            // SAFETY: siginfo_t is plain data that sigtimedwait fills in.
            let mut info = unsafe { std::mem::zeroed::<libc::siginfo_t>() };
            let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const _);
            // SAFETY: the pointers are valid for the duration of the call (a null timeout
            // waits forever).
            let ret = unsafe { libc::sigtimedwait(&self.0, &mut info, ts_ptr) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) if timeout.is_some() => return Ok(None),
                    _ => return Err(e),
                }
            }
            // SAFETY: si_pid is valid to read for every signal; for signals without a sender it
            // reads as 0.
            let pid = unsafe { info.si_pid() };
            return Ok(Some((ret, pid, info.si_code)));
        }
    }
    /// A signalfd delivering these signals (which must be blocked).
    pub(crate) fn signalfd(&self) -> io::Result<OwnedFd> {
        // SAFETY: valid sigset pointer; -1 asks for a new descriptor.
        let fd =
            check(unsafe { libc::signalfd(-1, &self.0, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        // SAFETY: signalfd returned a new descriptor that nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Reads one pending signal number from a signalfd, if any.
pub(crate) fn read_signalfd(fd: &OwnedFd) -> io::Result<Option<u32>> {
    // SAFETY: signalfd_siginfo is plain data.
    let mut info = unsafe { std::mem::zeroed::<libc::signalfd_siginfo>() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: we read at most `size` bytes into `info`, which is exactly that large.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    Ok((n as usize == size).then_some(info.ssi_signo))
}

/// Resets every signal's disposition to the default. All of them: an ignored disposition
/// survives `execve`, and parents do ignore real-time signals too (a test harness was seen
/// passing on 32 and 33 ignored). The raw system call is used because glibc's wrappers refuse
/// the two signals it reserves for itself (32 and 33).
pub(crate) fn reset_signal_dispositions() {
    /// The kernel's `struct sigaction` for `rt_sigaction` (not glibc's).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `dfl` is a valid kernel sigaction for the duration of the call, the old-action
        // pointer is NULL and the size is the kernel's sigset size (8); SIG_DFL needs no
        // restorer. Failures (numbers this kernel lacks) are ignored.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
}

/// `kill(2)`.
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Resource usage of a reaped child.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) utime_us: u64,
    pub(crate) stime_us: u64,
    pub(crate) maxrss_kib: u64,
}

/// The pid of an exited child not yet collected, without collecting it (`waitid(P_ALL,
/// WEXITED | WNOHANG | WNOWAIT)`); `None` when there is none.
pub(crate) fn peek_exited_child() -> Option<libc::pid_t> {
    // SAFETY: siginfo_t is plain data that waitid fills in.
    let mut info = unsafe { std::mem::zeroed::<libc::siginfo_t>() };
    // SAFETY: the siginfo pointer is valid for the duration of the call; WNOWAIT leaves the
    // child as it is.
    let ret = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // SAFETY: si_pid is valid to read after waitid (0 when no child was ready).
    let pid = unsafe { info.si_pid() };
    (ret == 0 && pid > 0).then_some(pid)
}

/// `wait4(pid, flags)`: `Some((pid, status, usage))`, or `None` with `WNOHANG` and nothing ready.
pub(crate) fn wait4(
    pid: libc::pid_t,
    flags: libc::c_int,
) -> io::Result<Option<(libc::pid_t, libc::c_int, Usage)>> {
    let mut status = 0;
    // SAFETY: rusage is plain data filled in by the kernel.
    let mut ru = unsafe { std::mem::zeroed::<libc::rusage>() };
    loop {
        // SAFETY: both pointers are valid for the duration of the call.
        let ret = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if ret == 0 {
            return Ok(None);
        }
        let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        let usage = Usage {
            utime_us: tv(ru.ru_utime),
            stime_us: tv(ru.ru_stime),
            maxrss_kib: ru.ru_maxrss as u64,
        };
        return Ok(Some((ret, status, usage)));
    }
}

/// `poll(2)` on (fd, events) pairs; returns the revents of each. EINTR returns all zeros.
pub(crate) fn poll(fds: &[(RawFd, i16)], timeout_ms: i32) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // SAFETY: the pointer and length describe `pfds`, which outlives the call.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// `getrandom(2)` into `buf`.
pub(crate) fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` when another holder has it.
pub(crate) fn try_lock(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: plain integer arguments on a descriptor we own.
    let ret = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Opens the directory at `path` as an `O_PATH` descriptor (a place to `openat` from; no
/// permission to read it is needed), close-on-exec.
pub(crate) fn open_path_dir(path: &str) -> io::Result<OwnedFd> {
    open_dir(path, libc::O_PATH)
}

/// `open(path, O_DIRECTORY | O_CLOEXEC | flags)`.
fn open_dir(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `c` is a valid path string for the duration of the call.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
    // SAFETY: open returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Up to `max` entry names of the directory at `path` (not `.` and `..`), read from position
/// `start` (a `seekdir` cookie: on ext4's hashed directories, a point in hash order) in small
/// `getdents64` batches, so that a large directory costs only what is read; a position past
/// the end reads nothing. Returns the names and whether the end was reached.
pub(crate) fn dir_names_from(
    path: &str,
    start: i64,
    max: usize,
) -> io::Result<(Vec<String>, bool)> {
    let dir = open_dir(path, libc::O_RDONLY)?;
    // SAFETY: integer arguments on a descriptor we own.
    if start != 0 && unsafe { libc::lseek(dir.as_raw_fd(), start, libc::SEEK_SET) } < 0 {
        return Ok((Vec::new(), true));
    }
    let mut names = Vec::new();
    // About a hundred entries of Cove's names per call.
    let mut buf = vec![0u8; 4096];
    while names.len() < max {
        // SAFETY: `buf` is writable for its whole length for the duration of the call.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok((names, true));
        }
        let mut off = 0usize;
        // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[].
        while off + 19 <= n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if reclen == 0 || off + reclen > n as usize {
                break;
            }
            let name = &buf[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if name != b"." && name != b".." && names.len() < max {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
            off += reclen;
        }
    }
    Ok((names, false))
}

/// Opens `name` relative to the directory `dir` (`openat`), close-on-exec.
pub(crate) fn open_at(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid path string for the duration of the call; `dir` is a live
    // descriptor borrowed for it.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: openat returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings the loopback interface of the current network namespace up.
pub(crate) fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes integer arguments.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new descriptor that nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut req = unsafe { std::mem::zeroed::<libc::ifreq>() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the union member ifru_flags was just filled in by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, which is valid.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// Replaces the process image. Returns only on failure.
pub(crate) fn execve(path: &CStr, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: path, argv and envp are NUL-terminated strings in NULL-terminated arrays, all alive
    // for the call; on success the process image is replaced and nothing here runs again.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// `execveat(fd, "", argv, envp, AT_EMPTY_PATH)`: executes the program `fd` refers to. Only
/// returns on failure.
pub(crate) fn execve_fd(fd: RawFd, argv: &[CString], envp: &[CString]) -> io::Error {
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|a| a.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: as for `execve`; the empty path with AT_EMPTY_PATH names `fd` itself.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            fd,
            c"".as_ptr(),
            argv_ptrs.as_ptr(),
            envp_ptrs.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    io::Error::last_os_error()
}

/// A sealed, close-on-exec memory file holding `bytes`, executable with [`execve_fd`].
pub(crate) fn sealed_memfd(name: &CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create takes a NUL-terminated name and flags.
    let fd = check(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: memfd_create succeeded: the descriptor is open and ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    write_all(fd.as_raw_fd(), bytes)?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: F_ADD_SEALS takes an integer.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// Clears close-on-exec on `fd`, so that it survives an `execve`.
pub(crate) fn keep_on_exec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD takes an integer.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map(drop)
}

/// `_exit(2)`: ends the process without running destructors or flushing stdio buffers (the
/// right way out of a forked child).
pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: _exit never returns and touches no Rust state.
    unsafe { libc::_exit(code) }
}

/// Window size of a terminal.
pub(crate) fn get_winsize(fd: RawFd) -> io::Result<libc::winsize> {
    // SAFETY: winsize is plain data.
    let mut ws = unsafe { std::mem::zeroed::<libc::winsize>() };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid pointer.
    check(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) })?;
    Ok(ws)
}

/// Sets the window size of a terminal.
pub(crate) fn set_winsize(fd: RawFd, ws: &libc::winsize) -> io::Result<()> {
    // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, ws) }).map(drop)
}

/// Whether `fd` is a terminal.
pub(crate) fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty takes an integer and reads no memory of ours.
    unsafe { libc::isatty(fd) == 1 }
}

/// Terminal attributes.
pub(crate) struct Termios(libc::termios);

/// Reads the attributes of terminal `fd`.
pub(crate) fn tcgetattr(fd: RawFd) -> io::Result<Termios> {
    // SAFETY: termios is plain data.
    let mut t = unsafe { std::mem::zeroed::<libc::termios>() };
    // SAFETY: tcgetattr fills the valid pointer.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    Ok(Termios(t))
}

/// Restores saved attributes.
pub(crate) fn tcsetattr(fd: RawFd, t: &Termios) -> io::Result<()> {
    // SAFETY: valid termios pointer.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t.0) }).map(drop)
}

/// Puts terminal `fd` in raw mode.
pub(crate) fn make_raw(fd: RawFd, saved: &Termios) -> io::Result<()> {
    let mut t = saved.0;
    // SAFETY: cfmakeraw edits the valid termios value in place.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: valid termios pointer.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) }).map(drop)
}

/// Opens a new pseudo-terminal pair through the `ptmx` at `ptmx` (the sandbox's own devpts
/// instance, so that the terminal has a name inside the sandbox): (master, slave).
pub(crate) fn openpty_at(ptmx: &str) -> io::Result<(OwnedFd, OwnedFd)> {
    let c = cstr(ptmx)?;
    // SAFETY: valid path; open returns a new descriptor.
    let m =
        check(unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: `m` is a new descriptor nobody else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the valid pointer.
    check(unsafe { libc::ioctl(m, libc::TIOCSPTLCK, &unlock) })?;
    // TIOCGPTPEER opens the slave through the master, without a path lookup in /dev/pts.
    const TIOCGPTPEER: libc::c_ulong = 0x5441;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let s = check(unsafe {
        libc::ioctl(
            m,
            TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `s` is a new descriptor nobody else owns.
    Ok((master, unsafe { OwnedFd::from_raw_fd(s) }))
}

/// A duplicate of descriptor `fd` of process `pid` (`pidfd_open` + `pidfd_getfd`).
pub(crate) fn take_fd_of(pid: libc::pid_t, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; returns a new descriptor.
    let pidfd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })? as RawFd;
    // SAFETY: `pidfd` is a new descriptor nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: plain integer arguments; returns a new descriptor (close-on-exec).
    let got =
        check_long(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: pidfd_getfd returned a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(got as RawFd) })
}

/// A pidfd of process `pid` (a handle that never refers to another process, even once the pid
/// is recycled).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; returns a new descriptor.
    let pidfd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })? as RawFd;
    // SAFETY: `pidfd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// Whether the process of `pidfd` still runs (signal 0 through the pidfd).
pub(crate) fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: plain arguments; signal 0 only checks that the process exists.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    ret == 0
}

/// A new TCP socket (close-on-exec, non-blocking) of the calling thread's network namespace.
pub(crate) fn tcp_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; returns a new descriptor.
    let fd = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    })?;
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The calling thread's CLOCK_MONOTONIC time in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data.
    let mut ts = unsafe { std::mem::zeroed::<libc::timespec>() };
    // SAFETY: valid pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `read(2)` into `buf`, retrying on EINTR.
pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// One `write(2)` of (a prefix of) `buf`, retrying on EINTR: the bytes written.
pub(crate) fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Returns the heap's free memory to the kernel (`malloc_trim`): for the processes that stay
/// for a sandbox's whole life after a busy start (its supervisor and init), whose freed start-up
/// allocations would otherwise stay resident for as long as the sandbox lives.
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim takes an integer and only touches the allocator's own state.
    unsafe { libc::malloc_trim(0) };
}

/// Makes `fd` non-blocking.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL takes an integer.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// `write(2)` of all of `buf`, retrying on EINTR and short writes.
pub(crate) fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: the pointer and length describe `buf`, which outlives the call.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// `MOUNT_ATTR_RDONLY` for [`set_mount_attrs`].
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// `MOUNT_ATTR_NOSUID`.
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// `MOUNT_ATTR_NODEV`.
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
/// `MOUNT_ATTR_NOEXEC`.
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// `mount_setattr(2)` on the mount at `path` and, recursively, every mount below it: one call
/// makes a whole subtree read-only, where the old API needs a remount per mount.
pub(crate) fn set_mount_attrs(path: &str, set: u64) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let c = cstr(path)?;
    // SAFETY: `c` is a valid path string and `attr` a correctly laid out `struct mount_attr`
    // whose size is passed; both outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check_long(ret).map(drop)
}

/// `setns(2)`.
pub(crate) fn setns(fd: RawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integer arguments on a descriptor the caller owns.
    check(unsafe { libc::setns(fd, nstype) }).map(drop)
}

/// Whether `fd` refers to a network namespace (`NS_GET_NSTYPE`).
pub(crate) fn is_net_namespace(fd: &OwnedFd) -> bool {
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the namespace type or an error.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    ret == libc::CLONE_NEWNET
}

/// The filesystem type (`f_type`, e.g. `CGROUP2_SUPER_MAGIC`) and id (`f_fsid`, distinct per
/// superblock, so per cgroup hierarchy) of the filesystem holding `path`.
pub(crate) fn statfs_type(path: &str) -> io::Result<(i64, u64)> {
    let c = cstr(path)?;
    // SAFETY: statfs is plain data filled in by the kernel.
    let mut st = unsafe { std::mem::zeroed::<libc::statfs>() };
    // SAFETY: valid path string and output pointer for the duration of the call.
    check(unsafe { libc::statfs(c.as_ptr(), &mut st) })?;
    // SAFETY: fsid_t is two plain ints; reading them through a byte copy is sound.
    let fsid: [u32; 2] = unsafe { std::mem::transmute_copy(&st.f_fsid) };
    Ok((st.f_type as i64, (fsid[0] as u64) << 32 | fsid[1] as u64))
}

/// Whether `fd` is on a procfs (`fstatfs`'s `f_type` is `PROC_SUPER_MAGIC`).
pub(crate) fn is_procfs(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: statfs is plain data filled in by the kernel.
    let mut st = unsafe { std::mem::zeroed::<libc::statfs>() };
    // SAFETY: a live descriptor and a valid output pointer for the duration of the call.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st.f_type == libc::PROC_SUPER_MAGIC)
}

/// `mknod(2)` of a character device `major:minor` with `mode` permission bits.
pub(crate) fn mknod_char(path: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid path string; plain integer arguments.
    check(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, dev) }).map(drop)
}

/// Whether the filesystem holding `path` is mounted `nodev` (device nodes on it cannot be
/// opened).
pub(crate) fn is_nodev(path: &str) -> io::Result<bool> {
    let c = cstr(path)?;
    // SAFETY: statvfs is plain data filled in by the kernel.
    let mut st = unsafe { std::mem::zeroed::<libc::statvfs>() };
    // SAFETY: valid path string and output pointer for the duration of the call.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut st) })?;
    Ok(st.f_flag & libc::ST_NODEV != 0)
}

/// `setpgid(0, 0)`: this process leads a process group of its own.
pub(crate) fn own_process_group() -> io::Result<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setpgid(0, 0) }).map(drop)
}
