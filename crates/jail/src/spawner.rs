//! A fork server for the processes a server starts for each sandbox (its supervisors, and a
//! helper for each exec and file operation): one small single-threaded process, started once,
//! forks every one of them from itself, instead of the server starting the `cove` binary anew
//! each time.
//!
//! Starting the binary costs more than its code: measured here, `cove --version` takes 1.2 ms
//! of CPU, of which glibc's start-up (reading the CPU's features and cache layout with
//! `cpuid`, which exits to the hypervisor on a virtual machine: about 10 µs each here, dozens
//! of them) about 0.5 ms, 188 page faults and the binary's relocation most of the rest; and
//! the server's `posix_spawn` copies its descriptor table, one pidfd per running sandbox
//! among it, for the `execve` to close again. A fork of the spawner, whose pages the child
//! shares and whose descriptors are few, starts where `main` would have begun.
//!
//! The protocol, on a `SOCK_SEQPACKET` socket (the spawner's stdin): a request is one
//! message, the process's arguments each ended by a NUL, with three descriptors, its stdin,
//! stdout and stderr, and optionally a fourth, the write end of a pipe for its exit: the
//! spawner, which reaps what it forks, writes the wait status there (decimal, one line) and
//! closes it. The reply is one message with a pidfd of the new process (readable once it has
//! exited). The new process runs in a process
//! group of its own, with the spawner's environment, its signal mask cleared. The spawner
//! exits when the socket's other end is closed.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::sys::{self, SigSet};

/// The most bytes of arguments one request carries.
pub const MAX_REQUEST: usize = 64 << 10;

/// The name (`comm`) of every process the spawner forks (not hexadecimal after `cove-`: no
/// sandbox's init, named `cove-<id>`, can have it). A forked process whose spawner died
/// first is the server's child then (the subreaper of its supervisors' orphans), and the
/// server collects it by this name ([`crate::state::collect_sandbox_orphans`]): it is no
/// child the server started and waits for itself.
pub const SPAWNED_NAME: &str = "cove-spawned";

/// Serves requests on `sock` until its other end is closed: for each, forks a process that
/// runs `run` with the request's arguments (and exits with what it returns). Must be called
/// in a single-threaded process (it forks).
pub fn serve(sock: OwnedFd, run: &dyn Fn(Vec<String>) -> i32) -> io::Result<()> {
    let chld = SigSet::of(&[libc::SIGCHLD]);
    let old_mask = chld.block()?;
    let sigfd = chld.signalfd()?;
    let mut buf = vec![0u8; MAX_REQUEST];
    // Where the exits of the processes that have a status pipe go.
    let mut exits: std::collections::HashMap<libc::pid_t, OwnedFd> = Default::default();
    loop {
        let ready = sys::poll(
            &[
                (sock.as_raw_fd(), libc::POLLIN),
                (sigfd.as_raw_fd(), libc::POLLIN),
            ],
            -1,
        )?;
        if ready[1] != 0 {
            while sys::read_signalfd(&sigfd)?.is_some() {}
            // Every child that has exited (their pidfds say so to whoever holds them).
            while let Ok(Some((pid, status, _))) = sys::wait4(-1, libc::WNOHANG) {
                if let Some(pipe) = exits.remove(&pid) {
                    // Nobody reading any more is fine.
                    let _ = sys::write_all(pipe.as_raw_fd(), format!("{status}\n").as_bytes());
                }
            }
        }
        if ready[0] == 0 {
            continue;
        }
        let (n, fds) = match sys::recv_data_and_fds(sock.as_raw_fd(), &mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let args: Vec<String> = buf[..n]
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut fds = fds;
        let exit_pipe = if fds.len() == 4 { fds.pop() } else { None };
        if fds.len() != 3 || args.is_empty() {
            // Nothing to start: the reply carries no descriptor.
            sys::send_data_and_fds(sock.as_raw_fd(), b"!", &[])?;
            continue;
        }
        let pid = sys::fork()?;
        if pid == 0 {
            // Whatever happens, the child exits here: a panic unwinding out of `run` would
            // carry on with this loop, a second spawner.
            let mut close = vec![&sock, &sigfd];
            close.extend(exit_pipe.as_ref());
            close.extend(exits.values());
            let code = child(&fds, &close, &old_mask)
                .ok()
                .and_then(|()| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(args))).ok()
                })
                .unwrap_or(125);
            std::process::exit(code);
        }
        drop(fds);
        if let Some(pipe) = exit_pipe {
            exits.insert(pid, pipe);
        }
        // The child cannot have been reaped yet: only this loop reaps.
        match sys::pidfd_open(pid) {
            Ok(pidfd) => sys::send_data_and_fds(sock.as_raw_fd(), b"p", &[pidfd.as_raw_fd()])?,
            Err(_) => {
                // Nobody could watch it: it does not get to run (it is reaped as any).
                let _ = sys::kill(pid, libc::SIGKILL);
                sys::send_data_and_fds(sock.as_raw_fd(), b"!", &[])?;
            }
        }
    }
}

/// The forked child's set-up: its own process group, `stdio` as its stdin, stdout and stderr,
/// none of the spawner's descriptors (`close`), and the mask it had before the spawner's.
fn child(stdio: &[OwnedFd], close: &[&OwnedFd], mask: &SigSet) -> io::Result<()> {
    sys::set_name(SPAWNED_NAME)?;
    sys::own_process_group()?;
    for (to, from) in stdio.iter().enumerate() {
        sys::dup2(from.as_raw_fd(), to as RawFd)?;
    }
    for fd in stdio
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain(close.iter().map(|f| f.as_raw_fd()))
    {
        if fd > 2 {
            sys::close(fd)?;
        }
    }
    mask.set_mask()
}

/// The server's side of a spawner.
pub struct Spawner {
    sock: Mutex<OwnedFd>,
}

impl Spawner {
    /// A spawner on `sock`, whose other end a spawner process serves ([`serve`]).
    pub fn new(sock: OwnedFd) -> Spawner {
        Spawner {
            sock: Mutex::new(sock),
        }
    }

    /// A socket pair for a spawner: this side's end, and the one the spawner serves.
    pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
        sys::socketpair()
    }

    /// Starts a process running `args` with `stdio` as its stdin, stdout and stderr; a pidfd
    /// of it. With `exit`, the write end of a pipe, its wait status is written there once it
    /// has exited (see the module's documentation). An error of kind `BrokenPipe` or
    /// `UnexpectedEof`: the spawner is gone.
    pub fn spawn(
        &self,
        args: &[&str],
        stdio: [BorrowedFd<'_>; 3],
        exit: Option<BorrowedFd<'_>>,
    ) -> io::Result<OwnedFd> {
        let mut request = Vec::new();
        for a in args {
            if a.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an argument holds a NUL",
                ));
            }
            request.extend_from_slice(a.as_bytes());
            request.push(0);
        }
        if request.is_empty() || request.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no arguments, or too many",
            ));
        }
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let fds: Vec<RawFd> = stdio
            .iter()
            .chain(exit.as_ref())
            .map(|f| f.as_fd().as_raw_fd())
            .collect();
        sys::send_data_and_fds(sock.as_raw_fd(), &request, &fds)?;
        let mut reply = [0u8; 1];
        let (_, mut got) = sys::recv_data_and_fds(sock.as_raw_fd(), &mut reply)?;
        match (reply, got.pop()) {
            ([b'p'], Some(pidfd)) => Ok(pidfd),
            _ => Err(io::Error::other("the spawner could not start the process")),
        }
    }
}

/// Whether the process of `pidfd` has exited (its pidfd is readable then).
pub fn exited(pidfd: &OwnedFd) -> bool {
    sys::poll(&[(pidfd.as_raw_fd(), libc::POLLIN)], 0).is_ok_and(|r| r[0] != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_process_gets_its_arguments_and_descriptors_and_is_reaped() {
        let (ours, theirs) = Spawner::socket_pair().unwrap();
        // The spawner is a process of its own, single-threaded as it must be (a fork of this
        // test's thread): in a thread of the test, the kernel could give SIGCHLD to another
        // thread, and the spawner would never hear of its children's ends.
        let server = sys::fork().unwrap();
        if server == 0 {
            drop(ours);
            let served = serve(theirs, &|args| {
                let line = format!("{}\n", args.join(" "));
                let _ = sys::write_all(1, line.as_bytes());
                7
            });
            sys::exit(if served.is_ok() { 0 } else { 1 });
        }
        drop(theirs);
        let spawner = Spawner::new(ours);
        let (out_r, out_w) = sys::pipe().unwrap();
        let (in_r, _in_w) = sys::pipe().unwrap();
        let (exit_r, exit_w) = sys::pipe().unwrap();
        let pidfd = spawner
            .spawn(
                &["supervise", "a b", "c"],
                [in_r.as_fd(), out_w.as_fd(), out_w.as_fd()],
                Some(exit_w.as_fd()),
            )
            .unwrap();
        drop((out_w, exit_w));
        let mut said = Vec::new();
        let mut b = [0u8; 64];
        loop {
            let n = sys::read(out_r.as_raw_fd(), &mut b).unwrap();
            if n == 0 {
                break;
            }
            said.extend_from_slice(&b[..n]);
        }
        assert_eq!(said, b"supervise a b c\n");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exited(&pidfd) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(exited(&pidfd));
        // Its wait status, once reaped: exited with 7.
        let mut status = Vec::new();
        loop {
            let n = sys::read(exit_r.as_raw_fd(), &mut b).unwrap();
            if n == 0 {
                break;
            }
            status.extend_from_slice(&b[..n]);
        }
        assert_eq!(status, format!("{}\n", 7 << 8).into_bytes());
        // Refused before anything is sent.
        let stdio = [in_r.as_fd(), in_r.as_fd(), in_r.as_fd()];
        assert!(spawner.spawn(&["x\0y"], stdio, None).is_err());
        // The spawner exits when its socket's other end closes.
        drop(spawner);
        let (_, status, _) = sys::wait4(server, 0).unwrap().unwrap();
        assert_eq!(status, 0);
    }
}
