//! seccomp(2) and prctl(2) wrappers used to install a compiled filter.
//!
//! Both run in a forked child right before `execve`, so they do nothing but the system call:
//! no allocation, no locks, and errors are plain `errno` values (`io::Error`'s OS variant does
//! not allocate).

use std::io;

use libc::c_ulong;

/// Sets `no_new_privs` on the calling thread: from now on `execve` never grants privileges
/// (setuid bits and file capabilities are ignored). It is inherited, survives `execve`, cannot
/// be cleared, and is what lets an unprivileged process attach a seccomp filter.
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    let (on, unused): (c_ulong, c_ulong) = (1, 0);
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only (the unused arguments must be 0): no memory
    // is shared with the kernel. Arguments are passed as `unsigned long`, the width glibc's
    // variadic prctl reads.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, on, unused, unused, unused) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches `filter` to the calling thread with `seccomp(SECCOMP_SET_MODE_FILTER, 0, ..)`.
///
/// Flags are 0: the filter applies to this thread (and what it forks or executes), which is
/// all a single-threaded child about to `execve` has.
pub(crate) fn set_filter(filter: &[libc::sock_filter]) -> io::Result<()> {
    let len =
        u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads through this pointer; `*mut` is how the C struct spells it.
        filter: filter.as_ptr().cast_mut(),
    };
    let (op, flags) = (
        c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
        c_ulong::from(0u8),
    );
    // SAFETY: `prog` lives on this stack frame and points at `filter`, which is borrowed for the
    // whole call and holds exactly `len` instructions. The kernel copies the program before
    // returning and keeps no reference to either.
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, op, flags, &raw const prog) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Helpers for the filter's tests: fork a throwaway child, make raw system calls in it, and
/// (on x86_64) enter the kernel through the i386 ABI.
#[cfg(test)]
pub(crate) mod testing {
    use std::io;

    use libc::{c_int, c_long};

    /// How a forked child ended.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Exit {
        /// `_exit(code)`.
        Code(i32),
        /// Killed by this signal.
        Signal(i32),
    }

    /// Exit code of a child whose closure panicked (the panic must not unwind into a copy of
    /// the test harness).
    pub(crate) const CHILD_PANICKED: u8 = 125;

    /// Forks, runs `child` in the child and returns how it ended; `child`'s return value is the
    /// exit code. The child first detaches from the controlling terminal (`setsid`) and turns
    /// core dumps off, so nothing a probe does can reach the user's tty or litter the disk.
    ///
    /// # Safety
    ///
    /// The test harness is multithreaded, so `child` runs in a copy of a process whose other
    /// threads vanished mid-flight: it must be async-signal-safe (no allocation, no locks, no
    /// printing) and must not panic, like `std::os::unix::process::CommandExt::pre_exec`.
    pub(crate) unsafe fn fork_and_wait(child: impl FnOnce() -> u8) -> io::Result<Exit> {
        // SAFETY: fork has no memory-safety preconditions of its own; what the child may do
        // afterwards is this function's documented contract, passed on to the caller.
        let pid = unsafe { libc::fork() };
        if pid == -1 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let _exit_on_unwind = ExitOnDrop;
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: setsid and setrlimit are async-signal-safe; `no_core` is a valid rlimit
            // on this stack frame, only read by the kernel.
            unsafe {
                libc::setsid();
                libc::setrlimit(libc::RLIMIT_CORE, &raw const no_core);
            }
            let code = child();
            // SAFETY: _exit is async-signal-safe and does not return; skipping destructors and
            // atexit handlers is exactly right for a forked copy of the harness.
            unsafe { libc::_exit(code.into()) }
        }
        wait(pid)
    }

    /// Ends the child if its closure unwinds, instead of returning into the harness's copy.
    struct ExitOnDrop;

    impl Drop for ExitOnDrop {
        fn drop(&mut self) {
            // SAFETY: as in fork_and_wait: async-signal-safe, does not return.
            unsafe { libc::_exit(CHILD_PANICKED.into()) }
        }
    }

    fn wait(pid: libc::pid_t) -> io::Result<Exit> {
        let mut status: c_int = 0;
        loop {
            // SAFETY: `status` is a valid, writable c_int for the duration of the call.
            let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
            if rc == pid {
                break;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
        if libc::WIFEXITED(status) {
            Ok(Exit::Code(libc::WEXITSTATUS(status)))
        } else {
            Ok(Exit::Signal(libc::WTERMSIG(status)))
        }
    }

    /// Makes system call `nr` with six raw arguments; `Err(errno)` if it failed.
    ///
    /// # Safety
    ///
    /// The call must not break this process's memory: pass null or invalid pointers (the
    /// kernel answers EFAULT) or pointers to live data of the right shape, and run it only in a
    /// throwaway child.
    pub(crate) unsafe fn syscall6(nr: c_long, args: [u64; 6]) -> Result<c_long, i32> {
        let [a, b, c, d, e, f] = args.map(|arg| arg as c_long);
        // SAFETY: forwarded to the caller (see above); libc::syscall passes six longs through.
        let rc = unsafe { libc::syscall(nr, a, b, c, d, e, f) };
        if rc == -1 {
            Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
        } else {
            Ok(rc)
        }
    }

    /// i386 `getpid` (number 20) through `int 0x80`: the compat entry a 64-bit process can use
    /// to reach the i386 system call table. Returns the kernel's raw result.
    ///
    /// # Safety
    ///
    /// Only in a throwaway child: without IA-32 emulation the instruction faults (SIGSEGV),
    /// and under Cove's filter it kills the process (SIGSYS).
    #[cfg(target_arch = "x86_64")]
    pub(crate) unsafe fn i386_getpid() -> i32 {
        let mut eax: u32 = 20;
        // SAFETY: int 0x80 with eax=20 is the i386 getpid, which takes no pointers. The kernel
        // preserves every register but eax except r8-r11 on old kernels, declared clobbered.
        unsafe {
            core::arch::asm!(
                "int 0x80",
                inout("eax") eax,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack),
            );
        }
        eax.cast_signed()
    }
}
