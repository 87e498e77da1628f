//! The warm pool: sandboxes started before anyone asked for them, so that a create only has to
//! hand one its command.
//!
//! A cold start spends about 10 ms of CPU building a sandbox (namespaces, root filesystem,
//! cgroup, the supervisor's own start) before the command runs. A warm sandbox has done all of
//! that: its supervisor (`cove supervise --warm TEMPLATE DIR`) built it from the pool's
//! *template* spec, handed it over to the agent once its child waited in the sandbox's cgroup
//! ([`cove_jail::run::WarmSandbox`], down a socket), and exited. A ready member is that one
//! waiting process, and two descriptors in the agent: the pipe its command will come on, and
//! its status pipe. A create whose spec fits the template ([`cove_jail::run::fits_warm`]: the
//! template's image, `host` or a stored one; no binds; network `none`; the template's disk and
//! user; no hostname or terminal of its own) takes a ready one's id ([`WarmPool::take`]) and
//! records the sandbox under it; when the agent sees that record it claims the sandbox itself
//! ([`cove_jail::run::claim_warm`]: the spec's limits into the cgroup, the command,
//! environment, working directory and rlimits down the pipe) and reads on the status pipe that
//! the command runs. From there on it is an ordinary sandbox. No process starts or wakes on a
//! claim's way but the sandbox's own. The supervisor used to wait with its member and take the
//! claim itself; measured here against that (bursts of 200 creates at 50 clients from a pool of
//! 200, interleaved runs), the machine's CPU per create went from 3.65-3.95 to 2.95-3.40 ms and
//! the creates per second from 470-516 to 554-627, and a waiting member's processes from 713
//! to 493 KiB (proportional set size, page tables and kernel stacks).
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
//! back) is dropped after [`TAKEN_TIMEOUT`]; one that dies while it waits is noticed at the
//! next poll and replaced. Dropping a member closes its claim pipe: its child exits, and the
//! agent removes the sandbox and its directory. When the server exits, it removes every member
//! so before it does; killed, it leaves them to its next start, which removes every directory
//! without a record (their processes are gone already: each child reads the end of its claim
//! pipe when the server dies).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cove_jail::run::WarmSandbox;
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
    /// sandbox under this id (the agent then claims the member for it), or gives it back.
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
    /// The sandbox, once its supervisor has handed it over: ready.
    handed: Option<Handed>,
    /// The pool it belongs to (an index into [`Pool::slots`]).
    pool: usize,
}

/// A warm sandbox, handed over by its supervisor.
pub(crate) struct Handed {
    sandbox: WarmSandbox,
    /// The image layers it was built on (see [`note`]).
    layers: Option<Vec<PathBuf>>,
}

/// The note a warm sandbox's supervisor hands it over with ([`WarmSandbox::hand_over`]): the
/// image layers it was built on, if its image is a stored one (JSON). A claim resolves the
/// image's name again; on other layers (the name was pulled or imported again meanwhile) the
/// member is not used.
pub fn note(layers: Option<&Vec<PathBuf>>) -> Vec<u8> {
    serde_json::to_vec(&layers).expect("paths serialise")
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
    /// Claimed members whose command has not been found running yet (or failed), and since
    /// when.
    claiming: HashMap<SandboxId, Instant>,
}

/// Resolves the image of a spec to claim a member for, as a cold start would: its
/// configuration applied to the spec, and the layers it names, if it is a stored one.
pub type Resolver = Arc<dyn Fn(&mut Spec) -> Result<Option<Vec<PathBuf>>, String> + Send + Sync>;

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

    /// How a claim resolves a stored image's name (without it, only `host` pools claim; a
    /// member of an image's pool is then replaced by a cold start).
    pub fn with_resolver(mut self, resolve: Resolver) -> Agent {
        self.resolver = Some(resolve);
        self
    }

    /// Whether `id` is a member of a pool.
    pub(crate) fn is_member(&self, id: &SandboxId) -> bool {
        self.pool.members.contains_key(id)
    }

    /// Whether member `id` was claimed and has not been found running yet.
    pub(crate) fn is_claiming(&self, id: &SandboxId) -> bool {
        self.pool.claiming.contains_key(id)
    }

    /// The supervisor of member `id` handed its sandbox over (`Some`), or ended without
    /// (`None`): ready, or failed.
    pub(crate) fn member_ready(&mut self, id: SandboxId, handed: Option<Handed>) {
        let Some(m) = self.pool.members.get_mut(&id) else {
            // Dropped while it started.
            if let Some(h) = handed {
                self.remove_member_sandbox(id, h);
            }
            return;
        };
        match handed {
            Some(h) => {
                m.handed = Some(h);
                let slot = &mut self.pool.slots[m.pool];
                slot.failures = 0;
                slot.shared.lock().ready.push(id);
                self.refill();
            }
            None => {
                let pool = m.pool;
                self.pool.members.remove(&id);
                let dir = self.dir(&id);
                let why = std::fs::read(dir.join("report.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<cove_types::RunReport>(&b).ok())
                    .and_then(|r| r.message)
                    .unwrap_or_else(|| "its supervisor ended without handing it over".into());
                tracing::warn!(sandbox = %id, error = %why, "a warm sandbox failed");
                // Its supervisor and child are gone (the socket's end says both: the child has
                // a copy of it). A supervisor that failed removed the rest itself; one that was
                // killed left it.
                tokio::task::spawn_blocking(move || crate::tear_down(&id, &dir, true));
                let slot = &mut self.pool.slots[pool];
                slot.failures += 1;
                let wait = FIRST_RETRY
                    .saturating_mul(1 << slot.failures.min(16))
                    .min(MAX_RETRY);
                slot.retry_at = Some(Instant::now() + wait);
            }
        }
    }

    /// Forgets member `id` in the pools' shared lists.
    fn forget(&self, id: &SandboxId) {
        for slot in &self.pool.slots {
            slot.shared.forget(id);
        }
    }

    /// Drops the members that died or were taken and never recorded: at every poll, not at
    /// every refill (a test of each member, for every member that gets ready, would cost a
    /// pool of n members n^2 system calls each time it fills).
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
        // A waiting member's status pipe says nothing until it is claimed: readable, its
        // child failed or was killed. All of them in one `poll`.
        let waiting: Vec<(SandboxId, &WarmSandbox)> = self
            .pool
            .members
            .iter()
            .filter_map(|(id, m)| Some((*id, &m.handed.as_ref()?.sandbox)))
            .collect();
        let dead: Vec<SandboxId> = {
            let sandboxes: Vec<&WarmSandbox> = waiting.iter().map(|(_, s)| *s).collect();
            let live = waiting_now(&sandboxes);
            waiting
                .iter()
                .zip(live)
                .filter(|(_, waits)| !waits)
                .map(|((id, _), _)| *id)
                .collect()
        };
        for id in dead {
            tracing::warn!(sandbox = %id, "a warm sandbox ended before it was claimed");
            self.drop_member(&id);
        }
    }

    /// Starts members until every pool is full (at most [`MAX_WARMING`] starting at once).
    pub(crate) fn refill(&mut self) {
        if self.pool.slots.is_empty() {
            return;
        }
        let now = Instant::now();
        // A claim is over when its command runs or fails (see `started`); one that says
        // neither for this long no longer holds the pools up.
        self.pool
            .claiming
            .retain(|_, at| now.duration_since(*at) < CLAIM_TIMEOUT);
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
            let starting = self
                .pool
                .members
                .values()
                .filter(|m| m.handed.is_none())
                .count();
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
            match self.spawn_member(&id, pool) {
                Ok(()) => {
                    let member = Member { handed: None, pool };
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

    /// Starts the supervisor of member `id` of pool `pool`, its stdin a socket on which it
    /// hands the sandbox over, and a task that waits for that (to `warm_tx`).
    fn spawn_member(&self, id: &SandboxId, pool: usize) -> Result<(), AgentError> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};
        let io = |e: rustix::io::Errno| AgentError::Io {
            op: "create a socket for",
            path: self.dir(id),
            source: e.into(),
        };
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(io)?;
        // The runtime waits on ours; theirs is the supervisor's stdin, which blocks.
        rustix::io::ioctl_fionbio(&ours, true).map_err(io)?;
        let template = self.pool.slots[pool].template.clone();
        // Its supervisor is not watched: its hand-over, or the socket's end, says how it went.
        self.spawn_supervisor(id, Some(&template), theirs)?;
        let (tx, id) = (self.warm_tx.clone(), *id);
        tokio::spawn(async move {
            let handed = take_over(ours).await;
            let _ = tx.send((id, handed));
        });
        Ok(())
    }

    /// Drops member `id` (never recorded, or its record stopped before it ran, or dead):
    /// its sandbox ends and is removed.
    pub(crate) fn drop_member(&mut self, id: &SandboxId) {
        self.forget(id);
        let Some(m) = self.pool.members.remove(id) else {
            return;
        };
        // Still starting: its hand-over finds no member and removes the sandbox then.
        if let Some(h) = m.handed {
            self.remove_member_sandbox(*id, h);
        }
    }

    /// Ends a member's sandbox (its claim pipe closed) and removes it, its directory with it,
    /// in a blocking task.
    fn remove_member_sandbox(&self, id: SandboxId, handed: Handed) -> tokio::task::JoinHandle<()> {
        let dir = self.dir(&id);
        let status = handed.sandbox.status;
        drop(handed.sandbox.claim);
        tokio::task::spawn_blocking(move || remove_warm(&id, &dir, &status, None))
    }

    /// Hands member `record.id` the record's spec: claims its sandbox (see
    /// [`cove_jail::run::claim_warm`]) and waits, in a task, for its command to run. A member
    /// that died meanwhile is replaced by a cold start.
    pub(crate) async fn claim(
        &mut self,
        record: SandboxRecord,
        rev: u64,
    ) -> Result<(), AgentError> {
        let id = record.id;
        self.forget(&id);
        let member = self.pool.members.remove(&id);
        let Some((handed, pool)) = member.and_then(|m| Some((m.handed?, m.pool))) else {
            return self.start(record, rev).await;
        };
        if !waits(&handed.sandbox) {
            return self.start_cold_instead(handed, record, rev).await;
        }
        // The timeout is the agent's to enforce (at `deadline_ms`), as for a cold start.
        let mut spec = record.spec.clone();
        spec.limits.timeout = None;
        // The image's configuration applies as at a cold start. A member built on layers its
        // image's name no longer names (pulled or imported again since), or whose name no
        // longer resolves here, is not used: the sandbox starts cold, which pulls if need be.
        if let Err(why) = self.resolve_claim(&mut spec, handed.layers.as_ref()) {
            tracing::info!(sandbox = %id, reason = %why, "a warm sandbox no longer fits its image: started cold instead");
            return self.start_cold_instead(handed, record, rev).await;
        }
        let template = self.pool.slots[pool].shared.template.clone();
        let dir = self.dir(&id);
        let WarmSandbox {
            init,
            claim,
            status,
        } = handed.sandbox;
        // What `exec` reads to run commands as the main one runs: written into the empty file
        // the supervisor made, not truncated first (on ext4 a truncation to zero makes the
        // next close flush the file to disk).
        let resolved = dir.join("resolved.json");
        let claimed = serde_json::to_vec_pretty(&spec)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                use std::io::Write;
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&resolved)
                    .and_then(|mut f| f.write_all(&json))
                    .map_err(|e| format!("write {}: {e}", resolved.display()))
            })
            .and_then(|()| {
                cove_jail::run::claim_warm(&id, &template, &spec, init, claim)
                    .map_err(|e| cove_types::error_chain(&e))
            })
            // Where the agent finds how it ends, as `supervise` leaves a started sandbox: in
            // place at once, not when the command is heard running, so that a server killed
            // in between leaves a sandbox the next one adopts and finishes like any other.
            .and_then(|()| {
                std::fs::rename(dir.join("status.new"), dir.join("status"))
                    .map_err(|e| format!("put the status file in place: {e}"))
            });
        self.pool.claiming.insert(id, Instant::now());
        let (store, started, finished) = (
            self.store.clone(),
            self.started_tx.clone(),
            self.finished_tx.clone(),
        );
        tokio::spawn(async move {
            let outcome = match claimed {
                Ok(()) => claim_outcome(&status).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => crate::mark_running(store, id).await,
                Err(why) => {
                    let _ = tokio::task::spawn_blocking(move || {
                        remove_warm(&id, &dir, &status, Some(why));
                    })
                    .await;
                    let _ = finished.send(id);
                }
            }
            let _ = started.send(id);
        });
        Ok(())
    }

    /// Applies the image's configuration to a claim's spec and checks its layers are those
    /// the member was built on.
    fn resolve_claim(&self, spec: &mut Spec, layers: Option<&Vec<PathBuf>>) -> Result<(), String> {
        let resolved = match &self.resolver {
            Some(resolve) => resolve(spec)?,
            None if matches!(spec.image, cove_types::Image::Ref(_)) => {
                return Err("no image store to resolve the image".into());
            }
            None => None,
        };
        if resolved.as_ref() != layers {
            return Err(
                "the image's name names another image than the one the warm sandbox \
                        was built on (pulled or imported again since)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Removes a member that cannot take its claim, then starts its record cold (under the
    /// same id: the removal comes first).
    async fn start_cold_instead(
        &mut self,
        handed: Handed,
        record: SandboxRecord,
        rev: u64,
    ) -> Result<(), AgentError> {
        let _ = self.remove_member_sandbox(record.id, handed).await;
        self.start(record, rev).await
    }

    /// A sandbox's command runs, or a claim failed: if it was a claim, the pools may refill
    /// (once no other claim is under way).
    pub(crate) fn started(&mut self, id: &SandboxId) {
        if self.pool.claiming.remove(id).is_some() {
            self.refill();
        }
    }

    /// Ends and removes every member's sandbox, and waits for that: the server is exiting.
    /// Every claim pipe is closed first, so that the sandboxes end together.
    pub(crate) fn remove_members(&mut self) {
        let members: Vec<(SandboxId, Handed)> = self
            .pool
            .members
            .drain()
            .filter_map(|(id, m)| Some((id, m.handed?)))
            .collect();
        let waiting: Vec<(SandboxId, OwnedFd)> = members
            .into_iter()
            .map(|(id, h)| (id, h.sandbox.status))
            .collect();
        for (id, status) in waiting {
            remove_warm(&id, &self.dir(&id), &status, None);
        }
    }
}

/// Whether a handed-over member still waits for its claim: its status pipe says nothing until
/// then (readable or hung up, its child has failed or was killed).
fn waits(sandbox: &WarmSandbox) -> bool {
    waiting_now(&[sandbox]) == [true]
}

/// [`waits`] of each of `sandboxes`, in one `poll(2)` (all false if it fails).
fn waiting_now(sandboxes: &[&WarmSandbox]) -> Vec<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds: Vec<PollFd<'_>> = sandboxes
        .iter()
        .map(|s| PollFd::new(&s.status, PollFlags::IN))
        .collect();
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    if sandboxes.is_empty() || poll(&mut fds, Some(&zero)).is_err() {
        return vec![false; sandboxes.len()];
    }
    fds.iter().map(|f| f.revents().is_empty()).collect()
}

/// Waits for a member's supervisor to hand its sandbox over on `sock` (non-blocking); `None`
/// if it ended without (or sent something else: logged).
async fn take_over(sock: OwnedFd) -> Option<Handed> {
    let sock = crate::readable(sock)?;
    let taken = loop {
        let Ok(mut ready) = sock.readable().await else {
            return None;
        };
        match ready.try_io(|fd| WarmSandbox::take_over(fd.as_raw_fd())) {
            Ok(taken) => break taken,
            Err(_would_block) => continue,
        }
    };
    match taken {
        Ok(Some((sandbox, note))) => match serde_json::from_slice(&note) {
            Ok(layers) => Some(Handed { sandbox, layers }),
            Err(e) => {
                tracing::warn!(error = %e, "a warm sandbox came with a malformed note");
                drop(sandbox.claim);
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take a warm sandbox over");
            None
        }
    }
}

/// Reads a claimed member's status pipe until its command runs (`Ok`) or it says why it
/// cannot (`Err`).
async fn claim_outcome(status: &OwnedFd) -> Result<(), String> {
    use tokio::io::AsyncBufReadExt;
    let pipe = status
        .try_clone()
        .and_then(|fd| {
            rustix::io::ioctl_fionbio(&fd, true)?;
            tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        })
        .map_err(|e| format!("read the sandbox's status: {e}"))?;
    let mut lines = tokio::io::BufReader::new(pipe).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => match cove_jail::run::claim_status(&line) {
                Some(outcome) => return outcome,
                None => continue,
            },
            Ok(None) | Err(_) => {
                return Err("start the command: the sandbox ended before its command ran".into());
            }
        }
    }
}

/// Removes warm sandbox `id` whose claim pipe is closed (never claimed, or its claim failed):
/// waits for its init to exit (its status pipe hangs up then; its cgroup is killed if that
/// takes over a second), collects it, and removes its cgroup and state; then its directory,
/// or, with `failed`, writes there the report of a start that failed (its record ends with it).
fn remove_warm(id: &SandboxId, dir: &Path, status: &OwnedFd, failed: Option<String>) {
    if !hangs_up(status, Instant::now() + Duration::from_secs(1)) {
        crate::kill_sandbox(id);
    }
    crate::reap_init(id, dir);
    crate::tear_down(id, dir, failed.is_none());
    let Some(why) = failed else {
        return;
    };
    let report = cove_types::RunReport {
        id: id.to_string(),
        exit_code: EXIT_FAILED_START,
        signal: None,
        reason: cove_types::Reason::Error,
        message: Some(why),
        wall_time_ms: 0.0,
        cpu_time_ms: 0.0,
        peak_memory_bytes: 0,
        egress_denied_packets: None,
    };
    let tmp = dir.join("report.json.tmp");
    let written = serde_json::to_vec_pretty(&report)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, dir.join("report.json")));
    if let Err(e) = written {
        tracing::error!(sandbox = %id, error = %e, "cannot write the sandbox's report");
    }
}

/// The exit code a start that failed reports, as `cove supervise` and `cove run` do.
const EXIT_FAILED_START: i32 = 125;

/// Whether the writers of pipe `fd` have all gone by `deadline` (what they write meanwhile
/// is read and dropped).
fn hangs_up(fd: &OwnedFd, deadline: Instant) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let _ = rustix::io::ioctl_fionbio(fd, true);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        if poll(&mut fds, Some(&timeout)).is_err() {
            return false;
        }
        let mut sink = [0u8; 512];
        match rustix::io::read(fd, &mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => {}
            Err(_) => return false,
        }
    }
}
