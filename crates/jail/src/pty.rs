//! Terminal relay for `cove run -t`: our terminal in raw mode on one side, the sandbox's pseudo-
//! terminal master on the other. Keystrokes (Ctrl-C included) travel as bytes, so the sandbox's
//! own line discipline turns them into signals for its foreground process group; window-size
//! changes follow `SIGWINCH`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys::{self, Termios};

const STDIN: RawFd = 0;
const STDOUT: RawFd = 1;
/// End-of-transmission: what the terminal sends for Ctrl-D, used when our stdin ends.
const EOT: u8 = 0x04;

/// Copies bytes between our stdio and the pty master.
pub(crate) struct Relay {
    master: OwnedFd,
    master_open: bool,
    stdin_open: bool,
    saved: Option<Termios>,
}

impl Relay {
    /// Takes the master; puts our terminal (if stdin is one) in raw mode until drop.
    pub(crate) fn new(master: OwnedFd) -> io::Result<Relay> {
        let saved = if sys::isatty(STDIN) {
            let saved = sys::tcgetattr(STDIN)?;
            sys::make_raw(STDIN, &saved)?;
            Some(saved)
        } else {
            None
        };
        let relay = Relay {
            master,
            master_open: true,
            stdin_open: true,
            saved,
        };
        relay.resize();
        Ok(relay)
    }

    /// Copies our window size to the sandbox's terminal.
    pub(crate) fn resize(&self) {
        for fd in [STDIN, STDOUT] {
            if let Ok(ws) = sys::get_winsize(fd) {
                let _ = sys::set_winsize(self.master.as_raw_fd(), &ws);
                return;
            }
        }
    }

    /// Descriptors to poll, in the order [`Relay::pump`] expects their events.
    pub(crate) fn poll_fds(&self) -> Vec<(RawFd, i16)> {
        let m = if self.master_open {
            self.master.as_raw_fd()
        } else {
            -1
        };
        let i = if self.stdin_open { STDIN } else { -1 };
        vec![(m, libc::POLLIN), (i, libc::POLLIN)]
    }

    /// Moves whatever is ready.
    pub(crate) fn pump(&mut self, revents: &[i16]) {
        let mut buf = [0u8; 16384];
        if revents.first().is_some_and(|&r| r != 0) {
            self.copy_from_master(&mut buf);
        }
        if revents.get(1).is_some_and(|&r| r != 0) {
            match sys::read(STDIN, &mut buf) {
                Ok(0) | Err(_) => {
                    self.stdin_open = false;
                    let _ = sys::write_all(self.master.as_raw_fd(), &[EOT]);
                }
                Ok(n) => {
                    let _ = sys::write_all(self.master.as_raw_fd(), &buf[..n]);
                }
            }
        }
    }

    fn copy_from_master(&mut self, buf: &mut [u8]) -> bool {
        match sys::read(self.master.as_raw_fd(), buf) {
            // EIO: every slave descriptor is closed; the sandbox is gone.
            Ok(0) | Err(_) => {
                self.master_open = false;
                false
            }
            Ok(n) => {
                let _ = sys::write_all(STDOUT, &buf[..n]);
                true
            }
        }
    }

    /// Copies the output still buffered in the pty after the sandbox ended.
    pub(crate) fn drain(&mut self) {
        let mut buf = [0u8; 16384];
        while self.master_open {
            match sys::poll(&[(self.master.as_raw_fd(), libc::POLLIN)], 20) {
                Ok(r) if r[0] != 0 => {
                    if !self.copy_from_master(&mut buf) {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = sys::tcsetattr(STDIN, saved);
        }
    }
}
