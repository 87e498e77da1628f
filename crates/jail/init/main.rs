//! The sandbox's resident init: what pid 1 runs once the command executes.
//!
//! The first init is the supervisor's forked child; it takes every containment step, forks the
//! command and confirms that it executes. It then replaces itself with this program, so that
//! what stays resident for the sandbox's whole life is a few pages instead of a copy of the
//! supervisor (see `docs/jail.md`). This program does what init does from then on: it reaps
//! every zombie of the pid namespace, passes the signals that come from outside the namespace
//! on to the command, and when the command ends, writes its wait status and resource usage to
//! the supervisor's status pipe, leaves the sandbox's cgroup when it was given the files for
//! that (then says `L`, so that the supervisor removes the cgroup while this process exits),
//! and exits.
//!
//! It is built by the jail's build script with no standard library and no C library (raw
//! system calls, x86_64 Linux), linked static and non-relocatable: nothing to load, nothing to
//! relocate, no heap. Its arguments are `cove-<id> <status fd> <command pid> <parent-death
//! signal> <leave fds>` (signal 0 for a detached sandbox, which outlives its supervisor; the
//! cgroup files to write `0` to before exiting, comma-separated, or `-`); its signal mask
//! (everything blocked), its credentials and its pending signals come from the first init.

#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

const SYS_WRITE: usize = 1;
const SYS_RT_SIGTIMEDWAIT: usize = 128;
const SYS_KILL: usize = 62;
const SYS_WAIT4: usize = 61;
const SYS_EXIT_GROUP: usize = 231;
const SYS_PRCTL: usize = 157;

const PR_SET_PDEATHSIG: usize = 1;
const PR_SET_DUMPABLE: usize = 4;
const PR_SET_NAME: usize = 15;

const SIGCHLD: i32 = 17;
const WNOHANG: usize = 1;
const EINTR: isize = -4;

/// Signals passed on to the command when they come from outside the pid namespace (the
/// same list as the first init's): INT, TERM, HUP, QUIT, USR1, USR2, CONT, TSTP.
const FORWARDED: [i32; 8] = [2, 15, 1, 3, 10, 12, 18, 20];

// Entry: `cove_init_start` reads the arguments on the kernel's stack; then the process moves to
// a stack inside its own image and unmaps everything above it (the kernel's stack, the vDSO and
// its data pages), so that its page tables cover one small range: a page-table chain fewer for
// every sandbox. Nothing here needs the vDSO: no clock reads, no signal handlers. The image is
// linked non-relocatable at 2 MiB (see build.rs), far below `UNMAP_FROM`.
global_asm!(
    ".globl _start",
    "_start:",
    "mov rdi, rsp",
    "and rsp, -16",
    "call cove_init_start",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "mov r12, rax",
    "mov r13, rdx",
    "mov eax, {munmap}",
    "mov rdi, {from}",
    "mov rsi, {len}",
    "syscall",
    "mov rdi, r12",
    "mov rsi, r13",
    "call cove_init_serve",
    "ud2",
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    munmap = const SYS_MUNMAP,
    from = const UNMAP_FROM,
    len = const UNMAP_TO - UNMAP_FROM,
);

const SYS_MUNMAP: usize = 11;
/// Unmapped at start, up to the top of a 47-bit address space: the kernel's stack and the
/// vDSO live there (a failure leaves them mapped, which only costs memory).
const UNMAP_FROM: usize = 1 << 30;
const UNMAP_TO: usize = 0x7fff_ffff_f000;
/// Twice the deepest frame chain (`cove_init_serve`, `report`, `Line::number`: under 1 KiB; no
/// recursion). Small enough to share the one writable page with the data (see build.rs).
const STACK_SIZE: usize = 2048;

/// The stack the init runs on once the kernel's is gone.
#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

#[unsafe(no_mangle)]
static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// The most cgroup files to leave by: one per cgroup v1 hierarchy Cove uses.
const MAX_LEAVE: usize = 8;

/// The files `report` leaves the cgroup by (set once, before `cove_init_serve` runs; the
/// process has one thread).
static mut LEAVE: [usize; MAX_LEAVE] = [0; MAX_LEAVE];
static mut LEAVE_N: usize = 0;

/// What `cove_init_start` hands to `cove_init_serve` (returned in rax:rdx).
#[repr(C)]
struct Args {
    status_fd: usize,
    command: usize,
}

/// # Safety
/// A raw system call: the caller passes arguments valid for `n`.
#[inline(always)]
unsafe fn syscall(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the `syscall` instruction with the kernel's x86_64 convention; rcx and r11 are
    // clobbered by it, memory is read or written only where the arguments point.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

fn exit(code: usize) -> ! {
    // SAFETY: exit_group takes an integer and does not return.
    unsafe { syscall(SYS_EXIT_GROUP, code, 0, 0, 0) };
    loop {}
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(125)
}

/// The precompiled `core` refers to an unwinding personality; with `panic=abort` nothing ever
/// unwinds, so it is never called.
#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

/// The memory functions the compiler may call; no C library provides them here.
#[unsafe(no_mangle)]
unsafe extern "C" fn memset(dst: *mut u8, byte: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract: `dst` is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") byte as u8,
             options(nostack));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract: `src` and `dst` are valid for `n` bytes, disjoint.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack));
    }
    dst
}

/// A decimal argument.
fn parse(s: *const u8) -> Option<usize> {
    let mut one = [0; 1];
    match parse_list(s, &mut one) {
        Some(1) => Some(one[0]),
        _ => None,
    }
}

/// A comma-separated list of decimal numbers into `out`, or `-` for none: how many.
fn parse_list(s: *const u8, out: &mut [usize]) -> Option<usize> {
    // SAFETY: a NUL-terminated argument string from the kernel (two bytes are there when the
    // first is not the NUL).
    if unsafe { *s == b'-' && *s.add(1) == 0 } {
        return Some(0);
    }
    let (mut n, mut count, mut digits) = (0usize, 0usize, 0usize);
    let mut i = 0;
    loop {
        // SAFETY: as above; the loop stops at the NUL.
        let c = unsafe { *s.add(i) };
        match c {
            0 | b',' if digits > 0 => {
                *out.get_mut(count)? = n;
                count += 1;
                if c == 0 {
                    return Some(count);
                }
                (n, digits) = (0, 0);
            }
            b'0'..=b'9' => {
                n = n.checked_mul(10)?.checked_add(usize::from(c - b'0'))?;
                digits += 1;
            }
            _ => return None,
        }
        i += 1;
    }
}

/// A line being built on the stack.
struct Line {
    buf: [u8; 96],
    len: usize,
}

impl Line {
    fn push(&mut self, b: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn number(&mut self, mut n: u64, negative: bool) {
        if negative {
            self.push(b'-');
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for &d in &digits[i..] {
            self.push(d);
        }
    }
}

/// `struct rusage` up to `ru_maxrss`, then the rest.
#[repr(C)]
struct Rusage {
    utime: [i64; 2],
    stime: [i64; 2],
    maxrss: i64,
    rest: [i64; 13],
}

fn micros(tv: [i64; 2]) -> u64 {
    (tv[0] as u64)
        .saturating_mul(1_000_000)
        .saturating_add(tv[1] as u64)
}

/// Writes `W <wait status> <utime us> <stime us> <maxrss KiB>`, leaves the cgroup (then
/// writes `L`) and exits.
fn report(status_fd: usize, wstatus: i32, usage: &Rusage) -> ! {
    let mut line = Line {
        buf: [0; 96],
        len: 0,
    };
    line.push(b'W');
    line.push(b' ');
    line.number(wstatus.unsigned_abs() as u64, wstatus < 0);
    line.push(b' ');
    line.number(micros(usage.utime), false);
    line.push(b' ');
    line.number(micros(usage.stime), false);
    line.push(b' ');
    line.number(usage.maxrss.max(0) as u64, false);
    line.push(b'\n');
    // SAFETY: writes `len` initialised bytes of the buffer; short writes of a pipe this
    // small do not happen.
    unsafe {
        syscall(
            SYS_WRITE,
            status_fd,
            line.buf.as_ptr() as usize,
            line.len,
            0,
        )
    };
    // SAFETY: set before serving began, read-only since; copied, not borrowed.
    let (leave, n) = unsafe { (LEAVE, LEAVE_N) };
    // SAFETY: one-byte writes from a static.
    let left = n > 0
        && leave[..n.min(MAX_LEAVE)]
            .iter()
            .all(|&fd| unsafe { syscall(SYS_WRITE, fd, b"0".as_ptr() as usize, 1, 0) } == 1);
    if left {
        // SAFETY: as above.
        unsafe { syscall(SYS_WRITE, status_fd, b"L\n".as_ptr() as usize, 2, 0) };
    }
    exit(0)
}

/// Reads the arguments and sets the process's attributes; runs on the kernel's stack.
#[unsafe(no_mangle)]
extern "C" fn cove_init_start(sp: *const usize) -> Args {
    // SAFETY: at process entry the stack holds argc, then argc argument pointers.
    let (argc, argv) = unsafe { (*sp, sp.add(1) as *const *const u8) };
    if argc != 5 {
        exit(125);
    }
    let mut leave = [0; MAX_LEAVE];
    // SAFETY: argc says these five pointers exist.
    let (name, status_fd, command, death, leave_n) = unsafe {
        (
            *argv,
            parse(*argv.add(1)),
            parse(*argv.add(2)),
            parse(*argv.add(3)),
            parse_list(*argv.add(4), &mut leave),
        )
    };
    let (Some(status_fd), Some(command), Some(death), Some(leave_n)) =
        (status_fd, command, death, leave_n)
    else {
        exit(125)
    };
    // SAFETY: the process's one thread, before anything reads them.
    unsafe {
        LEAVE = leave;
        LEAVE_N = leave_n;
    }
    // SAFETY: prctl with integer arguments, and PR_SET_NAME with a NUL-terminated string
    // (the kernel copies at most 16 bytes). An execve makes a process dumpable again and may
    // reset its parent-death signal: both are set again first (a detached sandbox has none).
    unsafe {
        syscall(SYS_PRCTL, PR_SET_DUMPABLE, 0, 0, 0);
        syscall(SYS_PRCTL, PR_SET_PDEATHSIG, death, 0, 0);
        syscall(SYS_PRCTL, PR_SET_NAME, name as usize, 0, 0);
    }
    Args { status_fd, command }
}

/// Reaps, forwards and reports, for the rest of the sandbox's life; runs on `STACK`.
#[unsafe(no_mangle)]
extern "C" fn cove_init_serve(status_fd: usize, command: usize) -> ! {
    let every: u64 = !0;
    loop {
        // siginfo_t: si_signo at 0, si_pid at 16.
        let mut info = [0i32; 32];
        // SAFETY: the set and the siginfo buffer (128 bytes) outlive the call.
        let sig = unsafe {
            syscall(
                SYS_RT_SIGTIMEDWAIT,
                &every as *const u64 as usize,
                info.as_mut_ptr() as usize,
                0,
                8,
            )
        };
        if sig == EINTR || sig < 0 {
            continue;
        }
        let (sig, sender) = (sig as i32, info[4]);
        if sig == SIGCHLD {
            loop {
                let mut wstatus: i32 = 0;
                let mut usage = Rusage {
                    utime: [0; 2],
                    stime: [0; 2],
                    maxrss: 0,
                    rest: [0; 13],
                };
                // SAFETY: the status and rusage buffers outlive the call.
                let reaped = unsafe {
                    syscall(
                        SYS_WAIT4,
                        usize::MAX, // -1: any child
                        &mut wstatus as *mut i32 as usize,
                        WNOHANG,
                        &mut usage as *mut Rusage as usize,
                    )
                };
                if reaped <= 0 {
                    break;
                }
                if reaped as usize == command {
                    report(status_fd, wstatus, &usage);
                }
            }
        } else if sender == 0 && FORWARDED.contains(&sig) {
            // SAFETY: kill takes integers.
            unsafe { syscall(SYS_KILL, command, sig as usize, 0, 0) };
        }
    }
}
