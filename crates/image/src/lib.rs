//! Cove's OCI image support. So far: the layer unpacker ([`unpack`]), the security-critical core
//! that turns one untrusted layer blob into a directory overlayfs can stack. Import (OCI layout,
//! docker-archive), registry pulls and the content-addressed layer store build on it.
//!
//! Every `unsafe` block lives in `sys`; the rest of the crate denies it.

#[allow(unsafe_code)]
mod sys;
pub mod unpack;

pub use unpack::{Compression, UnpackError, UnpackOptions, UnpackStats, unpack_layer};
