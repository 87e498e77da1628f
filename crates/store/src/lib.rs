//! Cove's state store: the desired state and recorded status of everything, as versioned
//! keys, with the few operations a level-triggered control plane needs:
//!
//! - **Revisions.** Every write bumps one store-wide revision; each entry carries the revision
//!   that created it and the one that last changed it.
//! - **Compare-and-swap.** Every write states what it expects ([`Expect`]): anything, no entry,
//!   or the entry at a given modification revision. Two writers racing for one key cannot both
//!   win; the loser gets [`StoreError::Conflict`] with the current revision and re-reads.
//! - **Prefix listing** in key order, paginated, with the revision it was read at.
//! - **Watches** of a prefix from a revision: every change after it, in order, none skipped,
//!   across restarts of the store. Changes too old to replay (the log keeps the last
//!   [`LOG_KEEP`]) give [`StoreError::Compacted`], and the watcher lists again.
//! - **Leases**: a key written with a lease is deleted when the lease expires or is revoked
//!   (how a node's liveness is recorded).
//!
//! [`Embedded`] keeps all of this in one redb file, for `cove serve` on one machine. A cluster
//! backend (etcd) will implement the same [`Kv`] trait, and the conformance suite in
//! `tests/conformance.rs` is written against the trait so that both must pass it.

mod embedded;

pub use embedded::Embedded;

use std::future::Future;
use std::time::Duration;

/// A store-wide, strictly increasing version number. 0 means "before the first write".
pub type Revision = u64;

/// A lease: keys attached to it live as long as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 1024;
/// Largest value accepted, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;
/// How many changes the log keeps for watches to resume from.
pub const LOG_KEEP: u64 = 100_000;

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (a deleted and recreated key starts again).
    pub create_revision: Revision,
    /// The revision of the last change to the key.
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A change, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or changed; the entry as it is now.
    Put(Entry),
    /// The key was deleted (by a delete, or by its lease ending) at `revision`.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: Revision,
    },
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(e) => e.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }

    /// The key changed.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(e) => &e.key,
            Event::Delete { key, .. } => key,
        }
    }
}

/// What a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Anything: write unconditionally.
    Any,
    /// No entry for the key.
    Absent,
    /// The entry last changed at this revision.
    Revision(Revision),
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Entries in key order.
    pub entries: Vec<Entry>,
    /// The store's revision when the page was read.
    pub revision: Revision,
    /// Whether entries after these exist (list again after the last key).
    pub more: bool,
}

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The entry is not what the write expected.
    #[error("conflict on {key}: expected {expected:?}, the entry is at revision {current:?}")]
    Conflict {
        /// The key.
        key: String,
        /// What the write expected.
        expected: Expect,
        /// The entry's modification revision, `None` when there is no entry.
        current: Option<Revision>,
    },
    /// A watch asked for changes the log no longer has.
    #[error("revision {requested} is compacted; the oldest change kept is at {oldest}")]
    Compacted {
        /// The revision the watch wanted to start after.
        requested: Revision,
        /// The oldest revision still in the log.
        oldest: Revision,
    },
    /// The lease does not exist (expired, revoked, or never granted).
    #[error("lease {0:?} does not exist")]
    NoLease(LeaseId),
    /// A key or value outside the limits.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// "key" or "value".
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The backend failed (disk, corruption).
    #[error("state store: {0}")]
    Backend(String),
    /// The backend's storage failed (an I/O error, such as a failed `fsync`): the store
    /// refuses every operation from then on, until it is opened again.
    #[error("state store: {0} (unusable until it is reopened: restart the server)")]
    Failed(String),
    /// The store was closed.
    #[error("the state store is closed")]
    Closed,
}

/// The operations every backend provides. Methods are `async` because the cluster backend
/// talks over the network; the embedded one runs its disk work off the async threads.
pub trait Kv: Send + Sync {
    /// The entry for `key`, if any.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;

    /// Up to `limit` entries whose keys start with `prefix` and come after `after` (exclusive),
    /// in key order.
    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Writes `value` under `key` if the entry is as `expect` says, attached to `lease` if
    /// given; returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Like [`Kv::put`] without a lease, for state that can be recomputed: the write may be
    /// lost in a crash until a later durable write (the embedded backend skips its `fsync`).
    /// A backend without the distinction makes it durable.
    fn put_volatile(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send {
        self.put(key, value, expect, None)
    }

    /// Makes every write acknowledged so far durable ([`Kv::put_volatile`]'s included): what
    /// another party is told of a volatile write after this returns survives a crash. A
    /// backend without the distinction has nothing to do.
    fn sync(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// Deletes `key` if the entry is as `expect` says; returns the revision of the deletion, or
    /// `None` when there was nothing to delete (and `expect` allowed that).
    fn delete(
        &self,
        key: &str,
        expect: Expect,
    ) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send;

    /// Every change to keys starting with `prefix` after revision `after`, in order.
    fn watch(
        &self,
        prefix: &str,
        after: Revision,
    ) -> impl Future<Output = Result<Watch, StoreError>> + Send;

    /// A new lease that expires `ttl` after its last keep-alive.
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Extends `lease` by its TTL from now.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends `lease` now, deleting its keys.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The current revision.
    fn revision(&self) -> impl Future<Output = Result<Revision, StoreError>> + Send;
}

/// A stream of [`Event`]s for one prefix.
pub struct Watch {
    inner: embedded::WatchInner,
}

impl Watch {
    /// The next change, waiting for one. An error ends the watch (start again from the last
    /// revision seen, or list again after [`StoreError::Compacted`]).
    pub async fn next(&mut self) -> Result<Event, StoreError> {
        self.inner.next().await
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason: &str| {
        Err(StoreError::Invalid {
            what: "key",
            reason: reason.to_string(),
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY {
        return bad(&format!("longer than {MAX_KEY} bytes"));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE {
        return Err(StoreError::Invalid {
            what: "value",
            reason: format!("larger than {MAX_VALUE} bytes"),
        });
    }
    Ok(())
}
