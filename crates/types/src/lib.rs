//! Cove's shared vocabulary: sandbox ids, human sizes and durations, the sandbox spec, and the
//! reasons a sandbox ends. No I/O happens here.
//!
//! Values are parsed once, at the edge (CLI flags, config files, API bodies), into newtypes that
//! cannot hold an invalid value; the rest of Cove never re-validates them.

#![forbid(unsafe_code)]

/// Serialises a type as its `Display` text and deserialises it through `FromStr`: one parser
/// for flags, files and API bodies.
macro_rules! serde_via_str {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod egress;
pub mod frame;
mod id;
mod reason;
pub mod sandbox;
mod spec;
mod units;

pub use id::{IdError, SandboxId};
pub use reason::{Reason, RunReport};
pub use sandbox::{Desired, EndReason, SandboxRecord, SandboxState};
pub use spec::{
    BindMount, DEFAULT_CPUS_MILLIS, DEFAULT_DISK, DEFAULT_MEMORY, DEFAULT_PIDS, EnvVar, Image,
    Limits, MAX_INNER_ID, NetMode, Spec, SpecError, User, parse_cpus,
};
pub use units::{Duration, ParseError, Size};

/// An error and its causes on one line (`cause: its cause: ...`), for logs and API messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
