//! `cove run -t`: the command gets a terminal; the window size and Ctrl-C pass through.
//!
//! The test plays the user's terminal: it opens a pseudo-terminal of its own, runs `cove` on the
//! slave side, and types into / reads from the master side.

#![allow(unsafe_code)]

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, assert_no_leaks, require_root};

/// A (master, slave) pair with the given window size.
fn terminal(rows: u16, cols: u16) -> (File, OwnedFd) {
    let mut master = 0;
    let mut slave = 0;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the valid pointers and reads `ws`.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: openpty succeeded; both descriptors are new and owned by nobody else.
    unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn spawn_on(slave: &OwnedFd, run: &Run) -> std::process::Child {
    let stdio = || Stdio::from(slave.try_clone().unwrap());
    let mut c: Command = run.command();
    c.stdin(stdio()).stdout(stdio()).stderr(stdio());
    c.spawn().unwrap()
}

/// Reads from the master until `needle` shows up or the time runs out.
fn read_until(master: &mut File, needle: &str, within: Duration) -> String {
    let fd = std::os::fd::AsRawFd::as_raw_fd(master);
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !seen.contains(needle) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    seen
}

#[test]
fn the_command_gets_a_terminal_of_the_callers_size() {
    require_root();
    let (mut master, slave) = terminal(40, 100);
    let run = Run::new(&[
        "-t",
        "--",
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo both-ttys; tty; stty size",
    ]);
    let mut child = spawn_on(&slave, &run);
    drop(slave);
    let seen = read_until(&mut master, "40 100", Duration::from_secs(20));
    let status = child.wait().unwrap();
    assert!(seen.contains("both-ttys"), "{seen:?}");
    // The terminal lives on the sandbox's own devpts: it has a name there.
    assert!(seen.contains("/dev/pts/0"), "{seen:?}");
    assert!(seen.contains("40 100"), "{seen:?}");
    assert!(status.success());
    assert_no_leaks(&run.id);
}

#[test]
fn ctrl_c_reaches_the_foreground_command() {
    require_root();
    let (mut master, slave) = terminal(24, 80);
    let run = Run::new(&[
        "-t",
        "--",
        "sh",
        "-c",
        "echo ready; sleep 30; echo sleep-ended-$?",
    ]);
    let mut child = spawn_on(&slave, &run);
    drop(slave);
    let seen = read_until(&mut master, "ready", Duration::from_secs(20));
    assert!(seen.contains("ready"), "{seen:?}");
    std::thread::sleep(Duration::from_millis(200));
    master.write_all(&[0x03]).unwrap();
    let rest = read_until(&mut master, "sleep-ended", Duration::from_secs(20));
    let status = child.wait().unwrap();
    // The terminal's SIGINT went to the whole foreground group: sh dies with sleep.
    assert!(!status.success(), "{rest:?}");
    assert!(!rest.contains("sleep-ended-0"), "{rest:?}");
    assert_no_leaks(&run.id);
}

#[test]
fn input_typed_at_the_terminal_reaches_the_command() {
    require_root();
    let (mut master, slave) = terminal(24, 80);
    let run = Run::new(&["-it", "--", "sh", "-c", "read line; echo got:$line"]);
    let mut child = spawn_on(&slave, &run);
    drop(slave);
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"typed words\r").unwrap();
    let seen = read_until(&mut master, "got:typed words", Duration::from_secs(20));
    child.wait().unwrap();
    assert!(seen.contains("got:typed words"), "{seen:?}");
    assert_no_leaks(&run.id);
}
