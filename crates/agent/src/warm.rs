//! The warm pool: sandboxes started before anyone asked for them, so that a create only has to
//! hand one its command.
//!
//! A cold start spends about 10 ms of CPU building a sandbox (namespaces, root filesystem,
//! cgroup, the supervisor's own start) before the command runs. A warm sandbox has done all of
//! that: its supervisor (`cove supervise --warm TEMPLATE DIR`) built it from the pool's
//! *template* spec and waits, its child waiting in the sandbox's cgroup. A create whose spec
//! fits the template ([`cove_jail::run::fits_warm`]: the template's image, `host` or a stored
//! one; no binds; network `none`; the template's disk and user; no hostname or terminal of its
//! own) takes a ready one's
//! id ([`WarmPool::take`]) and records the sandbox under it; when the agent sees that record it
//! writes the spec to the supervisor's stdin, which sets the cgroup's limits and sends the child
//! the command, environment, working directory and rlimits. From there on it is an ordinary
//! sandbox.
//!
//! The pool is kept at its size, but only while no create is taking or claiming a member:
//! building one costs as much CPU as a cold start, and during a burst of creates it would
//! compete with the claims it is meant to make fast (measured here, a burst of 200 creates at 50
//! clients from a pool of 200 spent most of its CPU rebuilding the pool meanwhile). So a burst
//! drains the pool at the claims' own speed, later creates start cold, and the pool is refilled
//! once the creates pause, a few members at a time ([`MAX_WARMING`]), built at a lower
//! priority than anything someone waits for. A member that
//! fails before it is ready is logged and removed, and the next attempt waits, longer after
//! each failure in a row. A member taken but never recorded (the create failed without giving it
//! back) is dropped after [`TAKEN_TIMEOUT`]. Dropping a member closes its supervisor's stdin:
//! it removes the sandbox and its directory itself, which is also what happens to every member
//! when the server exits, however it exits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cove_types::{SandboxId, SandboxRecord, Spec};

use crate::{Agent, AgentError};

/// At most this many members are being started at once.
pub const MAX_WARMING: usize = 2;
/// A member taken for a create that has not been recorded this long is dropped.
pub const TAKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// A claim that has not said `started` this long no longer holds the refill back (its end is
/// the ordinary checks' to find).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the next start after a member failed, doubled for each failure in a row
/// up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// The pool's shared side: which members are ready, for the API to take.
pub struct WarmPool {
    size: usize,
    template: Spec,
    state: Mutex<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Ready members, the most recently ready last.
    ready: Vec<SandboxId>,
    /// Members taken for a create, and when.
    taken: HashMap<SandboxId, Instant>,
}

impl WarmPool {
    /// A pool of `size` sandboxes built for `template` (its command is never run).
    pub fn new(size: usize, template: Spec) -> Arc<WarmPool> {
        Arc::new(WarmPool {
            size,
            template,
            state: Mutex::new(Shared::default()),
        })
    }

    /// How many members the pool keeps.
    pub fn size(&self) -> usize {
        self.size
    }

    /// What its members are built for.
    pub fn template(&self) -> &Spec {
        &self.template
    }

    /// The id of a ready member that can run `spec`, reserved for it: the caller records the
    /// sandbox under this id (the agent then hands the member its spec), or gives it back.
    pub fn take(&self, spec: &Spec) -> Option<SandboxId> {
        if !cove_jail::run::fits_warm(&self.template, spec) {
            return None;
        }
        let mut state = self.lock();
        let id = state.ready.pop()?;
        state.taken.insert(id, Instant::now());
        Some(id)
    }

    /// Returns a member taken for a create that did not record it.
    pub fn give_back(&self, id: SandboxId) {
        let mut state = self.lock();
        if state.taken.remove(&id).is_some() {
            state.ready.push(id);
        }
    }

    /// How many members are ready now.
    pub fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic elsewhere while holding it leaves plain lists behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `id`, ready or taken.
    fn forget(&self, id: &SandboxId) {
        let mut state = self.lock();
        state.ready.retain(|r| r != id);
        state.taken.remove(id);
    }
}

/// A member, on the agent's side.
pub(crate) struct Member {
    child: tokio::process::Child,
    /// Where its spec goes; closing it unclaimed removes the member.
    stdin: tokio::process::ChildStdin,
    /// It said `warm`.
    ready: bool,
    /// The pool it belongs to (an index into [`Pool::slots`]).
    pool: usize,
}

/// One pool, on the agent's side.
struct Slot {
    shared: Arc<WarmPool>,
    /// Its template, as `cove supervise --warm` takes it.
    template: String,
    /// Its members that failed before they were ready, in a row, and when the next may start.
    failures: u32,
    retry_at: Option<Instant>,
}

/// What the agent keeps for its pools.
#[derive(Default)]
pub(crate) struct Pool {
    slots: Vec<Slot>,
    members: HashMap<SandboxId, Member>,
    /// Members handed their spec that have not said `started` yet, and since when.
    claiming: HashMap<SandboxId, Instant>,
}

impl Agent {
    /// Keeps `pool` filled; creates take its members (see [`warm`](crate::warm)). One agent may
    /// keep several, one per template.
    pub fn with_pool(mut self, pool: Arc<WarmPool>) -> Agent {
        let template = serde_json::to_string(&pool.template).expect("a spec serialises");
        self.pool.slots.push(Slot {
            shared: pool,
            template,
            failures: 0,
            retry_at: None,
        });
        self
    }

    /// Whether `id` is a member of a pool.
    pub(crate) fn is_member(&self, id: &SandboxId) -> bool {
        self.pool.members.contains_key(id)
    }

    /// A member said `warm`: creates may take it, and the next one may start.
    pub(crate) fn member_ready(&mut self, id: SandboxId) {
        if let Some(m) = self.pool.members.get_mut(&id) {
            m.ready = true;
            let slot = &mut self.pool.slots[m.pool];
            slot.failures = 0;
            slot.shared.lock().ready.push(id);
            self.refill();
        }
    }

    /// Forgets member `id` in the pools' shared lists.
    fn forget(&self, id: &SandboxId) {
        for slot in &self.pool.slots {
            slot.shared.forget(id);
        }
    }

    /// Drops the members that died or were taken and never recorded: at every poll, not at
    /// every refill (a test of each member's supervisor, for every member that gets ready,
    /// would cost a pool of n members n^2 system calls each time it fills).
    pub(crate) fn tend_members(&mut self) {
        if self.pool.slots.is_empty() {
            return;
        }
        let now = Instant::now();
        let stale: Vec<SandboxId> = self
            .pool
            .slots
            .iter()
            .flat_map(|s| {
                s.shared
                    .lock()
                    .taken
                    .iter()
                    .filter(|(_, at)| now.duration_since(**at) >= TAKEN_TIMEOUT)
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            })
            .collect();
        for id in stale {
            tracing::warn!(sandbox = %id, "a warm sandbox taken for a create was never recorded: dropped");
            self.drop_member(&id);
        }
        let mut ended = Vec::new();
        for (id, m) in &mut self.pool.members {
            if let Ok(Some(status)) = m.child.try_wait() {
                ended.push((*id, m.ready, m.pool, status));
            }
        }
        for (id, ready, pool, status) in ended {
            self.pool.members.remove(&id);
            self.forget(&id);
            let dir = self.dir(&id);
            let why = std::fs::read(dir.join("report.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<cove_types::RunReport>(&b).ok())
                .and_then(|r| r.message)
                .unwrap_or_else(|| format!("its supervisor exited ({status})"));
            let _ = std::fs::remove_dir_all(&dir);
            tracing::warn!(sandbox = %id, error = %why, "a warm sandbox failed");
            if !ready {
                let slot = &mut self.pool.slots[pool];
                slot.failures += 1;
                let wait = FIRST_RETRY
                    .saturating_mul(1 << slot.failures.min(16))
                    .min(MAX_RETRY);
                slot.retry_at = Some(now + wait);
            }
        }
    }

    /// Starts members until every pool is full (at most [`MAX_WARMING`] starting at once).
    pub(crate) fn refill(&mut self) {
        if self.pool.slots.is_empty() {
            return;
        }
        let now = Instant::now();
        // A claim whose supervisor has exited is over, whether or not it said `started` (a
        // claim can fail: its record ends with the supervisor's report).
        let children = &mut self.children;
        self.pool.claiming.retain(|id, at| {
            now.duration_since(*at) < CLAIM_TIMEOUT
                && children
                    .get_mut(id)
                    .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        });
        // Creates under way: the pools wait for them (see the module's documentation).
        let taken = self
            .pool
            .slots
            .iter()
            .any(|s| !s.shared.lock().taken.is_empty());
        if taken || !self.pool.claiming.is_empty() {
            return;
        }
        for pool in 0..self.pool.slots.len() {
            if !self.fill(pool, now) {
                return;
            }
        }
    }

    /// Starts members of pool `pool` until it is full or [`MAX_WARMING`] are starting; false
    /// once that many are.
    fn fill(&mut self, pool: usize, now: Instant) -> bool {
        if self.pool.slots[pool].retry_at.is_some_and(|at| now < at) {
            return true;
        }
        loop {
            let starting = self.pool.members.values().filter(|m| !m.ready).count();
            if starting >= MAX_WARMING {
                return false;
            }
            let members = self
                .pool
                .members
                .values()
                .filter(|m| m.pool == pool)
                .count();
            let slot = &self.pool.slots[pool];
            if members >= slot.shared.size {
                return true;
            }
            let Ok(id) = cove_jail::run::new_id() else {
                return false;
            };
            match self.spawn_supervisor(&id, Some(&slot.template)) {
                Ok(mut child) => {
                    let Some(stdin) = child.stdin.take() else {
                        return false;
                    };
                    let member = Member {
                        child,
                        stdin,
                        ready: false,
                        pool,
                    };
                    self.pool.members.insert(id, member);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a warm sandbox");
                    let _ = std::fs::remove_dir_all(self.dir(&id));
                    let slot = &mut self.pool.slots[pool];
                    slot.failures += 1;
                    slot.retry_at = Some(now + MAX_RETRY.min(FIRST_RETRY * 8));
                    return true;
                }
            }
        }
    }

    /// Drops member `id` (never recorded, or its record stopped before it ran): its
    /// supervisor, its stdin closed, removes the sandbox and its directory.
    pub(crate) fn drop_member(&mut self, id: &SandboxId) {
        self.forget(id);
        // Its supervisor is collected as an ordinary child once it exits.
        if let Some(m) = self.pool.members.remove(id) {
            self.children.insert(*id, m.child);
        }
    }

    /// Hands member `record.id` the record's spec. A member that died meanwhile is replaced
    /// by a cold start.
    pub(crate) async fn claim(
        &mut self,
        record: SandboxRecord,
        rev: u64,
    ) -> Result<(), AgentError> {
        let id = record.id;
        self.forget(&id);
        let Some(mut member) = self.pool.members.remove(&id) else {
            return self.start(record, rev).await;
        };
        if !matches!(member.child.try_wait(), Ok(None)) {
            let _ = std::fs::remove_dir_all(self.dir(&id));
            return self.start(record, rev).await;
        }
        crate::send_spec(member.stdin, &record);
        self.children.insert(id, member.child);
        self.pool.claiming.insert(id, Instant::now());
        Ok(())
    }

    /// A sandbox's command runs: if it was a claim, the pools may refill (once no other claim
    /// is under way).
    pub(crate) fn started(&mut self, id: &SandboxId) {
        if self.pool.claiming.remove(id).is_some() {
            self.refill();
        }
    }
}
