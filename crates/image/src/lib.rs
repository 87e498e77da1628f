//! Cove's OCI image support: everything between an image file on disk and the directories an
//! overlayfs root is stacked from.
//!
//! - [`unpack`]: the layer unpacker, the security-critical core that turns one untrusted layer
//!   blob into a directory overlayfs can stack.
//! - [`store`]: the content-addressed image store: verified blobs, layers unpacked once (with
//!   the unpacker) and shared between images, one record per tagged image, prune.
//! - [`import`](mod@import): OCI image layouts (directory or tar) and `docker save` archives into the store.
//! - [`reference`](mod@reference) and [`digest`]: the names of images and of content, parsed once.
//!
//! - [`pull`](mod@pull) and [`registry`]: images from an OCI distribution registry into the
//!   same store, verified, resumable, each blob downloaded once.
//!
//! Every `unsafe` block lives in `sys`; the rest of the
//! crate denies it.

pub mod digest;
pub mod import;
mod oci;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod store;
#[allow(unsafe_code)]
mod sys;
#[cfg(test)]
mod test_images;
pub mod tls;
pub mod unpack;

pub use digest::{Digest, DigestError, Hasher};
pub use import::{ImportError, import};
pub use pull::{LayerState, NoProgress, PullError, PullEvent, PullProgress, pull};
pub use reference::{Reference, ReferenceError};
pub use registry::{Credentials, RegistryError, RegistryOptions};
pub use store::{
    DEFAULT_ROOT, Hold, ImageRecord, PinnedLayers, PruneReport, RunConfig, SANDBOX_ID_BASE, Store,
    StoreError,
};
pub use unpack::{Compression, UnpackError, UnpackOptions, UnpackStats, unpack_layer};
