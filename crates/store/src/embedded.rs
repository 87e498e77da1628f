//! The embedded backend: one redb file.
//!
//! ```text
//! kv          key -> create_rev u64 | mod_rev u64 | lease u64 (0: none) | value
//! log         revision -> an encoded Event (the last LOG_KEEP changes)
//! lease_keys  "<lease hex>/<key>" -> ()       (which keys a lease deletes)
//! leases      lease -> ttl in ms
//! meta        "revision", "next_lease" -> u64
//! ```
//!
//! - Every write is one redb transaction, committed before it is acknowledged and before
//!   watchers hear of it; durably (fsync) unless it is volatile (`put_volatile`), which
//!   `sync` or the next durable write makes durable. Writes are serialised by a mutex held
//!   from the start of the transaction to the broadcast of its events, so watchers see
//!   revisions in order.
//! - Watches replay the log after their start revision, then follow a broadcast channel; a
//!   watcher that falls behind the channel replays the log again from where it was, so it
//!   never skips a change.
//! - Lease deadlines live in memory; on open, every stored lease gets its full TTL again (the
//!   holder has that long to keep it alive after a restart). A task expires leases every
//!   [`EXPIRY_TICK`]; the store must be opened inside a tokio runtime.
//! - Writes, listings and replays run on tokio's blocking threads, never on the async ones. A
//!   single key's read runs on the caller's thread: a few pages from redb's cache or the page
//!   cache, cheaper than the hand-off to a blocking thread and back (measured here with a
//!   release build, `GET /v1/sandboxes/{id}`, two reads, back to back: 277 -> 157 us).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::broadcast;

use crate::{
    Entry, Event, Expect, Kv, LOG_KEEP, LeaseId, Page, Revision, StoreError, Watch, check_key,
    check_value,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const LEASE_KEYS: TableDefinition<&str, ()> = TableDefinition::new("lease_keys");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How often leases are checked for expiry.
pub const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Events a watcher may fall behind before it replays from the log.
const CHANNEL: usize = 1024;

/// One write of a group commit, and where its result goes.
type Op = Box<
    dyn FnOnce(&WriteTransaction, Revision) -> Result<(Vec<Event>, Box<dyn Any + Send>), StoreError>
        + Send,
>;
type Slot = Arc<Mutex<Option<Result<Box<dyn Any + Send>, StoreError>>>>;

/// The embedded store. Cheap to clone (one shared handle).
#[derive(Clone)]
pub struct Embedded {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Held from the start of a write transaction to the broadcast of its events.
    writer: Mutex<()>,
    /// Writes waiting for the next group commit (and whether each must be durable).
    pending: Mutex<Vec<(Op, Slot, bool)>>,
    leases: Mutex<HashMap<LeaseId, (Duration, Instant)>>,
    /// Each committed revision's events, together.
    events: broadcast::Sender<Arc<[Event]>>,
    /// Whether a commit without `fsync` has happened since the last one with it (changed under
    /// the writer lock).
    unsynced: AtomicBool,
    /// The first I/O error of the file (see [`StoreError::Failed`]), for [`Embedded::failed`].
    failed: std::sync::OnceLock<String>,
    failed_notify: tokio::sync::Notify,
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        // After an I/O error (a failed `fsync`, say) redb refuses every operation until the
        // file is opened again.
        redb::Error::Io(e) => StoreError::Failed(format!("I/O error on its file: {e}")),
        redb::Error::PreviousIo => StoreError::Failed("an earlier I/O error on its file".into()),
        e => StoreError::Backend(e.to_string()),
    }
}

/// `e` again, for another write of the batch it failed.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Failed(m) => StoreError::Failed(m.clone()),
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}

impl Embedded {
    /// Opens (creating if needed) the store in the file `path`. Must be called inside a tokio
    /// runtime: it starts the lease expiry task.
    pub async fn open(path: &Path) -> Result<Embedded, StoreError> {
        let path = path.to_path_buf();
        let inner = tokio::task::spawn_blocking(move || Inner::open(&path))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))??;
        let inner = Arc::new(inner);
        tokio::spawn(expire_leases(Arc::downgrade(&inner)));
        Ok(Embedded { inner })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    /// Waits until the store has failed (its file's first I/O error: every operation fails
    /// from then on, until it is opened again) and returns why. The server stops on it, for
    /// its supervisor to start it again.
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.inner.failed_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(why) = self.inner.failed.get() {
                return why.clone();
            }
            notified.await;
        }
    }
}

/// Expires leases until the store is dropped.
async fn expire_leases(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<LeaseId> = inner
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            continue;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for lease in expired {
                // A keep-alive may have come in meanwhile: check again under the lock.
                let still_expired = inner
                    .leases
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&lease)
                    .is_some_and(|(_, d)| *d <= Instant::now());
                if still_expired {
                    let _ = inner.revoke(lease);
                }
            }
        })
        .await;
    }
}

fn encode_entry(
    create: Revision,
    modified: Revision,
    lease: Option<LeaseId>,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + value.len());
    out.extend_from_slice(&create.to_le_bytes());
    out.extend_from_slice(&modified.to_le_bytes());
    out.extend_from_slice(&lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_entry(key: &str, bytes: &[u8]) -> Result<Entry, StoreError> {
    if bytes.len() < 24 {
        return Err(StoreError::Backend(format!("entry {key} is damaged")));
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(Entry {
        key: key.to_string(),
        create_revision: word(0),
        mod_revision: word(1),
        lease: Some(word(2)).filter(|&l| l != 0).map(LeaseId),
        value: bytes[24..].to_vec(),
    })
}

/// Log records: `P` + entry encoding + key, or `D` + revision + key.
fn encode_event(event: &Event) -> Vec<u8> {
    match event {
        Event::Put(e) => {
            let mut out = vec![b'P'];
            out.extend_from_slice(&(e.key.len() as u32).to_le_bytes());
            out.extend_from_slice(e.key.as_bytes());
            out.extend(encode_entry(
                e.create_revision,
                e.mod_revision,
                e.lease,
                &e.value,
            ));
            out
        }
        Event::Delete { key, revision } => {
            let mut out = vec![b'D'];
            out.extend_from_slice(&(key.len() as u32).to_le_bytes());
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(&revision.to_le_bytes());
            out
        }
    }
}

fn decode_event(bytes: &[u8]) -> Result<Event, StoreError> {
    let damaged = || StoreError::Backend("a log record is damaged".into());
    let (&kind, rest) = bytes.split_first().ok_or_else(damaged)?;
    let len = u32::from_le_bytes(
        rest.get(..4)
            .ok_or_else(damaged)?
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    let key =
        std::str::from_utf8(rest.get(4..4 + len).ok_or_else(damaged)?).map_err(|_| damaged())?;
    let tail = &rest[4 + len..];
    match kind {
        b'P' => Ok(Event::Put(decode_entry(key, tail)?)),
        b'D' => Ok(Event::Delete {
            key: key.to_string(),
            revision: u64::from_le_bytes(
                tail.get(..8)
                    .ok_or_else(damaged)?
                    .try_into()
                    .expect("8 bytes"),
            ),
        }),
        _ => Err(damaged()),
    }
}

fn lease_key(lease: LeaseId, key: &str) -> String {
    format!("{:016x}/{key}", lease.0)
}

impl Inner {
    fn open(path: &Path) -> Result<Inner, StoreError> {
        let db = Database::create(path).map_err(backend)?;
        let txn = db.begin_write().map_err(backend)?;
        let mut leases = HashMap::new();
        {
            // Create every table, so that readers never find one missing.
            txn.open_table(KV).map_err(backend)?;
            txn.open_table(LOG).map_err(backend)?;
            txn.open_table(LEASE_KEYS).map_err(backend)?;
            txn.open_table(META).map_err(backend)?;
            let table = txn.open_table(LEASES).map_err(backend)?;
            let now = Instant::now();
            for row in table.iter().map_err(backend)? {
                let (id, ttl) = row.map_err(backend)?;
                let ttl = Duration::from_millis(ttl.value());
                leases.insert(LeaseId(id.value()), (ttl, now + ttl));
            }
        }
        txn.commit().map_err(backend)?;
        let (events, _) = broadcast::channel(CHANNEL);
        Ok(Inner {
            db,
            writer: Mutex::new(()),
            pending: Mutex::new(Vec::new()),
            leases: Mutex::new(leases),
            events,
            unsynced: AtomicBool::new(false),
            failed: std::sync::OnceLock::new(),
            failed_notify: tokio::sync::Notify::new(),
        })
    }

    /// Runs `f` in a write transaction at the next revision; commits and broadcasts the events
    /// it returns (none: nothing is written and the revision does not move).
    ///
    /// **Group commit**: writes that arrive while another commit is in progress wait for the
    /// writer lock together, and the first to get it applies all of them in one transaction,
    /// each at its own revision, with one `fsync` for the lot. A write that fails its own check
    /// (a conflict) changes nothing and fails alone; a failure of the disk fails the batch.
    ///
    /// A batch of only non-`durable` writes commits without `fsync`; it reaches the disk with
    /// the next durable commit (or is lost in a crash before that).
    fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&WriteTransaction, Revision) -> Result<(Vec<Event>, T), StoreError>
        + Send
        + 'static,
    ) -> Result<T, StoreError> {
        let slot: Slot = Arc::new(Mutex::new(None));
        let op: Op = Box::new(move |txn, rev| {
            f(txn, rev).map(|(events, out)| (events, Box::new(out) as Box<dyn Any + Send>))
        });
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((op, slot.clone(), durable));
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if slot.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            let batch =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            self.commit_batch(batch);
        }
        let result = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the batch that held this write answered it");
        result.map(|out| *out.downcast::<T>().expect("the write's own type"))
    }

    /// Applies `batch` in one transaction; the caller holds the writer lock.
    fn commit_batch(&self, batch: Vec<(Op, Slot, bool)>) {
        let answer = |slot: &Slot, r: Result<Box<dyn Any + Send>, StoreError>| {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        };
        let fail_all = |batch: &[Slot], e: &StoreError| {
            // Every write goes through here (leases' expiry too): the first I/O error is
            // recorded for `Embedded::failed` whoever asked for the write.
            if let StoreError::Failed(why) = e
                && self.failed.set(why.clone()).is_ok()
            {
                self.failed_notify.notify_waiters();
            }
            for slot in batch {
                answer(slot, Err(again(e)));
            }
        };
        let slots: Vec<Slot> = batch.iter().map(|(_, s, _)| s.clone()).collect();
        let durable = batch.iter().any(|(_, _, d)| *d);
        let mut txn = match self.db.begin_write() {
            Ok(t) => t,
            Err(e) => return fail_all(&slots, &backend(e)),
        };
        if !durable && let Err(e) = txn.set_durability(redb::Durability::None) {
            return fail_all(&slots, &StoreError::Backend(e.to_string()));
        }
        let current = match txn.open_table(META).map_err(backend).and_then(|m| {
            m.get("revision")
                .map_err(backend)
                .map(|v| v.map_or(0, |v| v.value()))
        }) {
            Ok(c) => c,
            Err(e) => return fail_all(&slots, &e),
        };
        let mut revision = current;
        let mut results = Vec::with_capacity(batch.len());
        let mut committed: Vec<Vec<Event>> = Vec::new();
        for (op, _, _) in batch {
            match op(&txn, revision + 1) {
                Ok((events, out)) => {
                    if !events.is_empty() {
                        revision += 1;
                        if let Err(e) = self.log(&txn, revision, &events) {
                            return fail_all(&slots, &e);
                        }
                        committed.push(events);
                    }
                    results.push(Ok(out));
                }
                // Checks fail before anything is written: only this write fails.
                Err(
                    e @ (StoreError::Conflict { .. }
                    | StoreError::NoLease(_)
                    | StoreError::Invalid { .. }),
                ) => results.push(Err(e)),
                Err(e) => return fail_all(&slots, &e),
            }
        }
        // A durable batch that changes nothing still commits if an earlier commit skipped its
        // `fsync` (`Kv::sync`): committing with `fsync` makes that one durable too.
        let flush = durable && self.unsynced.load(Ordering::Relaxed);
        let finished = if revision == current && !flush {
            txn.abort().map_err(backend)
        } else {
            txn.open_table(META)
                .map_err(backend)
                .and_then(|mut m| m.insert("revision", revision).map_err(backend).map(drop))
                .and_then(|()| txn.commit().map_err(backend))
        };
        if let Err(e) = finished {
            return fail_all(&slots, &e);
        }
        if revision != current || flush {
            self.unsynced.store(!durable, Ordering::Relaxed);
        }
        for events in committed {
            // No receivers is fine.
            let _ = self.events.send(events.into());
        }
        for (slot, r) in slots.iter().zip(results) {
            answer(slot, r);
        }
    }

    /// Records one revision's events in the log (and forgets the oldest beyond `LOG_KEEP`).
    fn log(
        &self,
        txn: &WriteTransaction,
        revision: Revision,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut log = txn.open_table(LOG).map_err(backend)?;
        // One revision may hold several events (a lease taking many keys with it); the log is
        // keyed by revision, so they are stored as consecutive sub-records.
        let mut record = Vec::new();
        for e in events {
            let encoded = encode_event(e);
            record.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            record.extend(encoded);
        }
        log.insert(revision, record.as_slice()).map_err(backend)?;
        if revision > LOG_KEEP {
            log.remove(revision - LOG_KEEP).map_err(backend)?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let table = txn.open_table(KV).map_err(backend)?;
        match table.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode_entry(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let meta = txn.open_table(META).map_err(backend)?;
        Ok(meta
            .get("revision")
            .map_err(backend)?
            .map_or(0, |v| v.value()))
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let revision = txn
            .open_table(META)
            .map_err(backend)?
            .get("revision")
            .map_err(backend)?
            .map_or(0, |v| v.value());
        let table = txn.open_table(KV).map_err(backend)?;
        let start = match after {
            Some(a) if a >= prefix => a,
            _ => prefix,
        };
        let mut entries = Vec::new();
        let mut more = false;
        for row in table.range(start..).map_err(backend)? {
            let (k, v) = row.map_err(backend)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if after == Some(key) {
                continue;
            }
            if entries.len() == limit {
                more = true;
                break;
            }
            entries.push(decode_entry(key, v.value())?);
        }
        Ok(Page {
            entries,
            revision,
            more,
        })
    }

    fn current(txn: &WriteTransaction, key: &str) -> Result<Option<Entry>, StoreError> {
        let table = txn.open_table(KV).map_err(backend)?;
        let got = table.get(key).map_err(backend)?;
        got.map(|v| decode_entry(key, v.value())).transpose()
    }

    fn check(key: &str, expect: Expect, current: &Option<Entry>) -> Result<(), StoreError> {
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Revision(r) => current.as_ref().is_some_and(|e| e.mod_revision == r),
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::Conflict {
                key: key.to_string(),
                expected: expect,
                current: current.as_ref().map(|e| e.mod_revision),
            })
        }
    }

    fn put(
        &self,
        key: &str,
        value: &[u8],
        expect: Expect,
        lease: Option<LeaseId>,
        durable: bool,
    ) -> Result<Revision, StoreError> {
        if let Some(l) = lease
            && !self
                .leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&l)
        {
            return Err(StoreError::NoLease(l));
        }
        let (key, value) = (key.to_string(), value.to_vec());
        self.write(durable, move |txn, revision| {
            let key = key.as_str();
            let current = Self::current(txn, key)?;
            Self::check(key, expect, &current)?;
            let create = current.as_ref().map_or(revision, |e| e.create_revision);
            let mut lease_keys = txn.open_table(LEASE_KEYS).map_err(backend)?;
            if let Some(old) = current.as_ref().and_then(|e| e.lease) {
                lease_keys
                    .remove(lease_key(old, key).as_str())
                    .map_err(backend)?;
            }
            if let Some(l) = lease {
                lease_keys
                    .insert(lease_key(l, key).as_str(), ())
                    .map_err(backend)?;
            }
            txn.open_table(KV)
                .map_err(backend)?
                .insert(
                    key,
                    encode_entry(create, revision, lease, &value).as_slice(),
                )
                .map_err(backend)?;
            let entry = Entry {
                key: key.to_string(),
                value,
                create_revision: create,
                mod_revision: revision,
                lease,
            };
            Ok((vec![Event::Put(entry)], revision))
        })
    }

    fn delete(&self, key: &str, expect: Expect) -> Result<Option<Revision>, StoreError> {
        let key = key.to_string();
        self.write(true, move |txn, revision| {
            let key = key.as_str();
            let current = Self::current(txn, key)?;
            Self::check(key, expect, &current)?;
            let Some(current) = current else {
                return Ok((Vec::new(), None));
            };
            Self::remove(txn, &current)?;
            Ok((
                vec![Event::Delete {
                    key: key.to_string(),
                    revision,
                }],
                Some(revision),
            ))
        })
    }

    fn remove(txn: &WriteTransaction, entry: &Entry) -> Result<(), StoreError> {
        txn.open_table(KV)
            .map_err(backend)?
            .remove(entry.key.as_str())
            .map_err(backend)?;
        if let Some(l) = entry.lease {
            txn.open_table(LEASE_KEYS)
                .map_err(backend)?
                .remove(lease_key(l, &entry.key).as_str())
                .map_err(backend)?;
        }
        Ok(())
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(backend)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(backend)?;
            let id = meta
                .get("next_lease")
                .map_err(backend)?
                .map_or(1, |v| v.value());
            meta.insert("next_lease", id + 1).map_err(backend)?;
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            txn.open_table(LEASES)
                .map_err(backend)?
                .insert(id, ms)
                .map_err(backend)?;
            LeaseId(id)
        };
        txn.commit().map_err(backend)?;
        self.leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (ttl, Instant::now() + ttl));
        Ok(id)
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let (ttl, deadline) = leases.get_mut(&lease).ok_or(StoreError::NoLease(lease))?;
        *deadline = Instant::now() + *ttl;
        Ok(())
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        if self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lease)
            .is_none()
        {
            return Err(StoreError::NoLease(lease));
        }
        self.write(true, move |txn, revision| {
            let prefix = format!("{:016x}/", lease.0);
            let keys: Vec<String> = {
                let table = txn.open_table(LEASE_KEYS).map_err(backend)?;
                let mut keys = Vec::new();
                for row in table.range(prefix.as_str()..).map_err(backend)? {
                    let (k, _) = row.map_err(backend)?;
                    match k.value().strip_prefix(&prefix) {
                        Some(key) => keys.push(key.to_string()),
                        None => break,
                    }
                }
                keys
            };
            let mut events = Vec::new();
            for key in keys {
                if let Some(entry) = Self::current(txn, &key)? {
                    Self::remove(txn, &entry)?;
                    events.push(Event::Delete { key, revision });
                }
            }
            txn.open_table(LEASES)
                .map_err(backend)?
                .remove(lease.0)
                .map_err(backend)?;
            // A lease without keys still has to be forgotten on disk: commit through a
            // no-op event-free path.
            if events.is_empty() {
                return Ok((Vec::new(), true));
            }
            Ok((events, false))
        })
        .and_then(|no_keys| {
            if no_keys {
                self.forget_lease(lease)
            } else {
                Ok(())
            }
        })
    }

    /// Removes a lease with no keys from disk (no revision: nothing a watcher can see changed).
    fn forget_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(backend)?;
        txn.open_table(LEASES)
            .map_err(backend)?
            .remove(lease.0)
            .map_err(backend)?;
        txn.commit().map_err(backend)
    }

    /// The changes after `after` for `prefix`, from the log, and the revision they go up to;
    /// `Compacted` if they are gone.
    fn replay(&self, prefix: &str, after: Revision) -> Result<(Vec<Event>, Revision), StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let log = txn.open_table(LOG).map_err(backend)?;
        let current = txn
            .open_table(META)
            .map_err(backend)?
            .get("revision")
            .map_err(backend)?
            .map_or(0, |v| v.value());
        if after >= current {
            return Ok((Vec::new(), after));
        }
        let oldest = log
            .first()
            .map_err(backend)?
            .map_or(current + 1, |(k, _)| k.value());
        if after + 1 < oldest {
            return Err(StoreError::Compacted {
                requested: after,
                oldest,
            });
        }
        let mut out = Vec::new();
        for row in log.range(after + 1..).map_err(backend)? {
            let (_, v) = row.map_err(backend)?;
            let mut record = v.value();
            while !record.is_empty() {
                let len = u32::from_le_bytes(
                    record
                        .get(..4)
                        .ok_or_else(|| StoreError::Backend("a log record is damaged".into()))?
                        .try_into()
                        .expect("4 bytes"),
                ) as usize;
                let body = record
                    .get(4..4 + len)
                    .ok_or_else(|| StoreError::Backend("a log record is damaged".into()))?;
                let event = decode_event(body)?;
                if event.key().starts_with(prefix) {
                    out.push(event);
                }
                record = &record[4 + len..];
            }
        }
        Ok((out, current))
    }
}

pub(crate) struct WatchInner {
    store: Embedded,
    prefix: String,
    /// Every change up to this revision has been queued (or filtered out).
    last: Revision,
    rx: broadcast::Receiver<Arc<[Event]>>,
    backlog: VecDeque<Event>,
}

impl WatchInner {
    pub(crate) async fn next(&mut self) -> Result<Event, StoreError> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                return Ok(e);
            }
            match self.rx.recv().await {
                Ok(batch) => {
                    let Some(revision) = batch.first().map(Event::revision) else {
                        continue;
                    };
                    if revision <= self.last {
                        continue; // replayed already
                    }
                    self.last = revision;
                    let prefix = &self.prefix;
                    self.backlog.extend(
                        batch
                            .iter()
                            .filter(|e| e.key().starts_with(prefix))
                            .cloned(),
                    );
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (prefix, after) = (self.prefix.clone(), self.last);
                    let (events, upto) = self
                        .store
                        .blocking(move |i| i.replay(&prefix, after))
                        .await?;
                    self.backlog.extend(events);
                    self.last = upto;
                }
                Err(broadcast::error::RecvError::Closed) => return Err(StoreError::Closed),
            }
        }
    }
}

impl Kv for Embedded {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        check_key(key)?;
        // On the caller's thread (see the module's documentation).
        self.inner.get(key)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let (prefix, after) = (prefix.to_string(), after.map(str::to_string));
        self.blocking(move |i| i.list(&prefix, after.as_deref(), limit))
            .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let key = key.to_string();
        self.blocking(move |i| i.put(&key, &value, expect, lease, true))
            .await
    }

    async fn put_volatile(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Revision, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let key = key.to_string();
        self.blocking(move |i| i.put(&key, &value, expect, None, false))
            .await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // Nothing to wait for when every commit so far had its `fsync`.
        if !self.inner.unsynced.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.blocking(|i| i.write(true, |_, _| Ok((Vec::new(), ()))))
            .await
    }

    async fn delete(&self, key: &str, expect: Expect) -> Result<Option<Revision>, StoreError> {
        check_key(key)?;
        let key = key.to_string();
        self.blocking(move |i| i.delete(&key, expect)).await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Watch, StoreError> {
        // Subscribe first, then replay: a change committed in between is in both, and the
        // revision check drops the second copy.
        let rx = self.inner.events.subscribe();
        let p = prefix.to_string();
        let (backlog, upto) = self.blocking(move |i| i.replay(&p, after)).await?;
        Ok(Watch {
            inner: WatchInner {
                store: self.clone(),
                prefix: prefix.to_string(),
                last: upto,
                rx,
                backlog: backlog.into(),
            },
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        self.blocking(move |i| i.grant(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.keep_alive(lease)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |i| i.revoke(lease)).await
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|i| i.revision()).await
    }
}
