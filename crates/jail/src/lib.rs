//! Cove's isolation runtime: the containment pipeline that turns a [`cove_types::Spec`] into a
//! running, contained process tree, and everything it needs from the kernel.
//!
//! This crate is synchronous on purpose: namespaces, `fork` and seccomp do not mix with an
//! async runtime's threads. Every `unsafe` block lives in `sys`; the rest of the crate denies it.
//!
//! - [`run`]: the supervisor (`cove run`): prepare, clone, supervise, report, clean up.
//! - `init`: the sandbox side: namespaces, root filesystem, pid 1, the command's last steps.
//! - [`cgroup`], [`seccomp`], `rootfs`, [`state`]: one kernel concern each.

pub mod cgroup;
pub mod egress;
pub mod exec;
mod init;
pub mod netns;
mod pty;
mod rootfs;
pub mod run;
pub mod seccomp;
pub mod spawner;
pub mod state;

pub use init::install_resident_init;
#[allow(unsafe_code)]
mod sys;
