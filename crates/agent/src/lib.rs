//! The node agent: makes the sandboxes on this node what their records say, and records what
//! happened to them.
//!
//! Level-triggered: on start, on every change to a record (a store watch), when an event says
//! so, and periodically, a record is compared with what exists on the host, and the difference
//! repaired. The periodic work is bounded so that thousands of idle sandboxes cost next to
//! nothing: every [`POLL`], the sandboxes being started or stopped and those past their
//! deadline are checked, plus the next [`CHECKS_PER_POLL`] of the others in turn (so each is
//! checked every poll while there are few, and every `n / CHECKS_PER_POLL` polls beyond); an
//! init that exits is noticed at once (a pidfd per running sandbox, which the loop waits on);
//! and every [`SWEEP`] the whole store is listed again, for anything a watch could have missed.
//!
//! - A record wanted `running` and still `pending` is started: its directory
//!   (`<data>/sandboxes/<id>/`) is made, and a **supervisor** is started for it — `cove
//!   supervise DIR`, the spec on its stdin, a single-threaded process forked by the server's
//!   spawner ([`Spawning`]: forking from this multi-threaded process would be unsafe, and
//!   starting the binary anew costs more than its work). The supervisor starts the
//!   sandbox with the jail, its stdout and stderr going to `stdout.log` and `stderr.log`, and
//!   exits once the command runs: the sandbox is then *detached*, with no host process of its
//!   own. Its init holds `lock` (flock) for the sandbox's whole life, the last line of `lock`
//!   names it, and it writes how the command ended to `status`. Nothing ties it to the agent:
//!   a restart of `cove serve`, even `kill -9`, leaves it running. A start that fails leaves
//!   `report.json`.
//! - A record whose id is a member of the warm pool (a create took it, see [`warm`]) is not
//!   started: the agent claims that member, built and waiting, for the record's spec itself.
//! - A sandbox whose `lock` is free has ended: with `status`, the agent finishes it (the
//!   jail's teardown, in a blocking task) and writes `report.json`; the record gets the reason,
//!   exit code and report. One that ended without either is recorded `lost`.
//! - A record wanted `stopped` gets its init signalled (SIGTERM, which init passes on to the
//!   command); after 10 s its whole cgroup is killed. It ends with reason `killed`; one marked
//!   `remove` is deleted with its directory once it has ended. The limits the kernel does not
//!   end a sandbox for (its first OOM kill, its first refused fork, its CPU-time budget) are
//!   checked at each of its periodic checks.
//!
//! Every record update is a compare-and-swap on the record's revision: the API and the agent
//! can both write a record, and neither overwrites the other's change.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cove_store::{Embedded, Event, Expect, Kv, StoreError};
use cove_types::{
    Desired, EndReason, RunReport, SandboxId, SandboxRecord, SandboxState, sandbox::now_ms,
};

pub mod warm;
pub use warm::WarmPool;

/// How often the agent's periodic checks run.
pub const POLL: Duration = Duration::from_millis(200);
/// How many running sandboxes each poll checks, in turn (besides those being started or
/// stopped, past their deadline, or whose init exited).
pub const CHECKS_PER_POLL: usize = 64;
/// How often the whole store is listed again.
pub const SWEEP: Duration = Duration::from_secs(60);

/// What the loop keeps of a sandbox that has not ended.
struct Tracked {
    /// When its time is up.
    deadline_ms: Option<u64>,
    /// Checked at every poll: being started, or stopped.
    every_poll: bool,
    /// The task waiting for its init to exit.
    exit_watch: Option<tokio::task::AbortHandle>,
    /// Its init has exited (it is not watched again while it is finished).
    exited: bool,
    /// It runs (not paused): its limits apply.
    running: bool,
    /// Its CPU-time budget.
    cpu_time: Option<cove_types::Duration>,
}

impl Tracked {
    /// Its init is known to live: its exit watch has not fired.
    fn alive(&self) -> bool {
        self.exit_watch.is_some() && !self.exited
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(watch) = &self.exit_watch {
            watch.abort();
        }
    }
}

use cove_types::sandbox::{RECORDS_PREFIX as PREFIX, record_key as key};

/// A failed agent operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record could not be parsed.
    #[error("record {key} is corrupt: {source}")]
    Record {
        /// Its key.
        key: String,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A host operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Parses a stored record.
fn parse(key: &str, value: &[u8]) -> Result<SandboxRecord, AgentError> {
    serde_json::from_slice(value).map_err(|source| AgentError::Record {
        key: key.to_string(),
        source,
    })
}

/// The node agent.
pub struct Agent {
    store: Embedded,
    /// `<data>/sandboxes`.
    root: PathBuf,
    /// Supervisors started for this agent, until they exit (forgotten at every poll; the
    /// spawner collects them).
    children: HashMap<SandboxId, Supervisor>,
    /// Sandboxes already sent SIGTERM, and when.
    signalled: HashMap<SandboxId, Instant>,
    /// Sandboxes killed after the stop grace.
    escalated: HashSet<SandboxId>,
    /// Detached sandboxes being finished (their teardown runs in a blocking task, which says
    /// so on `finished_tx` when `report.json` is written).
    finishing: HashSet<SandboxId>,
    finished_tx: tokio::sync::mpsc::UnboundedSender<SandboxId>,
    finished_rx: Option<tokio::sync::mpsc::UnboundedReceiver<SandboxId>>,
    /// Each running sandbox's logs' last indexed sizes (see [`index_log`]).
    log_sizes: HashMap<PathBuf, u64>,
    /// Supervisors report here when their sandbox's command runs.
    started_tx: tokio::sync::mpsc::UnboundedSender<SandboxId>,
    started_rx: Option<tokio::sync::mpsc::UnboundedReceiver<SandboxId>>,
    /// The sandboxes that have not ended.
    active: HashMap<SandboxId, Tracked>,
    /// The order in which they take their turn at the periodic checks.
    rotation: VecDeque<SandboxId>,
    /// Exit watches report here when a sandbox's init exits.
    exited_tx: tokio::sync::mpsc::UnboundedSender<SandboxId>,
    exited_rx: Option<tokio::sync::mpsc::UnboundedReceiver<SandboxId>>,
    /// The warm pools, if any (see [`warm`]).
    pool: warm::Pool,
    /// Warm supervisors' hand-overs arrive here (`None`: one ended without).
    warm_tx: tokio::sync::mpsc::UnboundedSender<(SandboxId, Option<warm::Handed>)>,
    warm_rx: Option<tokio::sync::mpsc::UnboundedReceiver<(SandboxId, Option<warm::Handed>)>>,
    /// How claims resolve stored images (see [`Agent::with_resolver`]).
    resolver: Option<warm::Resolver>,
    /// The spawner that forks supervisors.
    spawning: std::sync::Arc<Spawning>,
}

impl Agent {
    /// An agent keeping sandbox directories under `root`, starting supervisors with `cove`.
    pub fn new(store: Embedded, root: PathBuf, cove: PathBuf) -> Result<Agent, AgentError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("create", &root))?;
        spread_subdirectories(&root);
        let (started_tx, started_rx) = tokio::sync::mpsc::unbounded_channel();
        let (finished_tx, finished_rx) = tokio::sync::mpsc::unbounded_channel();
        let (exited_tx, exited_rx) = tokio::sync::mpsc::unbounded_channel();
        let (warm_tx, warm_rx) = tokio::sync::mpsc::unbounded_channel();
        let spawning = Spawning::new(cove, root.clone());
        Ok(Agent {
            store,
            root,
            children: HashMap::new(),
            signalled: HashMap::new(),
            escalated: HashSet::new(),
            finishing: HashSet::new(),
            finished_tx,
            finished_rx: Some(finished_rx),
            log_sizes: HashMap::new(),
            started_tx,
            started_rx: Some(started_rx),
            active: HashMap::new(),
            rotation: VecDeque::new(),
            exited_tx,
            exited_rx: Some(exited_rx),
            pool: warm::Pool::default(),
            warm_tx,
            warm_rx: Some(warm_rx),
            resolver: None,
            spawning,
        })
    }

    /// Gives supervisors `key=value` in their environment.
    pub fn with_env(self, key: &str, value: &str) -> Agent {
        self.spawning.add_env(key, value);
        self
    }

    /// The spawner this agent's supervisors are forked by, for the server's other processes
    /// (exec helpers).
    pub fn spawning(&self) -> std::sync::Arc<Spawning> {
        self.spawning.clone()
    }

    /// The directory of sandbox `id`.
    pub fn dir(&self, id: &SandboxId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// Converges forever (until the store fails).
    pub async fn run(mut self) -> Result<(), AgentError> {
        let (revision, recorded) = self.sweep_seeing().await?;
        self.remove_unrecorded(recorded).await;
        let mut watch = self.store.watch(PREFIX, revision).await?;
        let mut tick = tokio::time::interval(POLL);
        let mut started = self.started_rx.take().expect("run is called once");
        let mut finished = self.finished_rx.take().expect("run is called once");
        let mut exited = self.exited_rx.take().expect("run is called once");
        let mut warmed = self.warm_rx.take().expect("run is called once");
        self.refill();
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                Some((id, handed)) = warmed.recv() => self.member_ready(id, handed),
                // Its record is marked running by the task that heard it (see `spawn_supervisor`
                // and the warm pool's `claim`); a failed claim ends here too.
                Some(id) = started.recv() => self.started(&id),
                // A detached sandbox's report is written: record its end now.
                Some(id) = finished.recv() => {
                    self.finishing.remove(&id);
                    self.reconverge(&id).await?;
                }
                // Its init exited: finish it now.
                Some(id) = exited.recv() => {
                    if let Some(t) = self.active.get_mut(&id) {
                        t.exit_watch = None;
                        t.exited = true;
                    }
                    self.reconverge(&id).await?;
                }
                event = watch.next() => {
                    match event {
                        Ok(Event::Put(entry)) => {
                            let record = parse(&entry.key, &entry.value)?;
                            self.converge(record, entry.mod_revision).await?;
                        }
                        Ok(Event::Delete { .. }) => {}
                        // Fell out of the log's window: list everything again.
                        Err(StoreError::Compacted { .. }) => {
                            let revision = self.sweep().await?;
                            watch = self.store.watch(PREFIX, revision).await?;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                _ = tick.tick() => {
                    self.spawning.tend();
                    // Inits of ended sandboxes that `finish` did not get to collect, and
                    // sandbox processes orphaned to this server (one system call when there
                    // are none).
                    cove_jail::state::collect_sandbox_orphans();
                    if last_sweep.elapsed() >= SWEEP {
                        self.sweep().await?;
                        last_sweep = Instant::now();
                    } else {
                        self.poll().await?;
                    }
                    self.tend_members();
                    self.refill();
                }
            }
        }
    }

    /// Removes the sandboxes a crash left without a record. A create records its sandbox
    /// without waiting for the disk and the sandbox starts meanwhile: the client hears of it
    /// once the record is durable, and a crash in between loses the record but not the
    /// sandbox. Called with the ids of the first sweep, before this agent has any warm
    /// sandbox: every directory it has made then belongs to one of those records. The last
    /// warm sandboxes of the server before, which end by themselves, may be among the removed.
    async fn remove_unrecorded(&self, recorded: HashSet<SandboxId>) {
        let root = self.root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let unrecorded: Vec<SandboxId> = fs::read_dir(&root)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|id| !recorded.contains(id))
                .collect();
            for id in &unrecorded {
                let dir = root.join(id.as_str());
                // Its supervisor too, if it is still starting it (or, warm, waiting): whoever
                // holds the lock, by the pid it wrote there (checked to hold it still). The
                // lock is free once both are gone.
                for _ in 0..200 {
                    kill_sandbox(id);
                    if let Some(pid) = init_pid(&dir).and_then(rustix::process::Pid::from_raw)
                        && supervisor_alive(&dir)
                    {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                    }
                    if !supervisor_alive(&dir) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if supervisor_alive(&dir) {
                    tracing::warn!(sandbox = %id, "a sandbox without a record still holds its lock after 2 s: left to the next start");
                    continue;
                }
                tear_down(id, &dir, true);
                tracing::warn!(sandbox = %id, "removed a sandbox without a record (a crash cut its create short)");
            }
        })
        .await;
    }

    /// The periodic checks (see the module's documentation).
    async fn poll(&mut self) -> Result<(), AgentError> {
        // Supervisors exit once their sandbox runs (the spawner collects them): forgotten here,
        // or each pidfd would be kept until its sandbox's next full check (never, for a watched
        // one). Without its entry, a sandbox's state is read from its directory (its lock,
        // `status`, the report).
        self.children.retain(|_, s| !s.exited());
        let now = now_ms();
        let mut due: Vec<SandboxId> = self
            .active
            .iter()
            .filter(|(_, t)| t.every_poll || t.deadline_ms.is_some_and(|d| now >= d))
            .map(|(id, _)| *id)
            .collect();
        let turns = CHECKS_PER_POLL.min(self.rotation.len());
        for _ in 0..turns {
            let Some(id) = self.rotation.pop_front() else {
                break;
            };
            // Ended ones leave the rotation here.
            let Some(tracked) = self.active.get(&id) else {
                continue;
            };
            self.rotation.push_back(id);
            if due.contains(&id) {
                continue;
            }
            if tracked.alive() {
                // Nothing the record says is needed: its logs and limits.
                let (running, cpu_time) = (tracked.running, tracked.cpu_time);
                self.tend_logs(&id);
                if running {
                    self.check_limits(&id, cpu_time);
                }
            } else {
                due.push(id);
            }
        }
        for id in due {
            self.reconverge(&id).await?;
        }
        Ok(())
    }

    /// Converges the stored record of `id`, if there is one.
    async fn reconverge(&mut self, id: &SandboxId) -> Result<(), AgentError> {
        match self.store.get(&key(id)).await? {
            Some(entry) => {
                let record = parse(&entry.key, &entry.value)?;
                self.converge(record, entry.mod_revision).await
            }
            None => {
                self.active.remove(id);
                Ok(())
            }
        }
    }

    /// Keeps what the loop needs to know of `record`; starts waiting for its init to exit once
    /// it runs.
    fn track(&mut self, record: &SandboxRecord) {
        let id = record.id;
        if record.state.is_final() {
            self.active.remove(&id);
            return;
        }
        let every_poll =
            record.state == SandboxState::Pending || record.desired == Desired::Stopped;
        let tracked = self.active.entry(id).or_insert_with(|| {
            self.rotation.push_back(id);
            Tracked {
                deadline_ms: None,
                every_poll,
                exit_watch: None,
                exited: false,
                running: false,
                cpu_time: None,
            }
        });
        tracked.deadline_ms = record.deadline_ms;
        tracked.every_poll = every_poll;
        tracked.running = record.state == SandboxState::Running;
        tracked.cpu_time = record.spec.limits.cpu_time;
        if tracked.exit_watch.is_none()
            && !tracked.exited
            && matches!(record.state, SandboxState::Running | SandboxState::Paused)
        {
            let dir = self.root.join(id.as_str());
            tracked.exit_watch = watch_exit(&id, &dir, self.exited_tx.clone());
        }
    }

    /// Converges every record; returns the revision the listing was read at.
    pub async fn sweep(&mut self) -> Result<u64, AgentError> {
        Ok(self.sweep_seeing().await?.0)
    }

    /// [`Agent::sweep`], with the ids of the records it converged.
    async fn sweep_seeing(&mut self) -> Result<(u64, HashSet<SandboxId>), AgentError> {
        let mut after: Option<String> = None;
        let mut revision = 0;
        let mut seen = HashSet::new();
        loop {
            let page = self.store.list(PREFIX, after.as_deref(), 500).await?;
            revision = revision.max(page.revision);
            for entry in &page.entries {
                let record = parse(&entry.key, &entry.value)?;
                seen.insert(record.id);
                self.converge(record, entry.mod_revision).await?;
            }
            // Tracked ones that are no longer stored leave at their next turn.
            if !page.more {
                return Ok((revision, seen));
            }
            after = page.entries.last().map(|e| e.key.clone());
        }
    }

    /// Makes one sandbox what its record says.
    async fn converge(&mut self, record: SandboxRecord, rev: u64) -> Result<(), AgentError> {
        let id = record.id;
        self.track(&record);
        // Its time is up: stopped, for that reason (the watch brings the record back).
        if !record.state.is_final()
            && record.desired != Desired::Stopped
            && record.deadline_ms.is_some_and(|d| now_ms() >= d)
        {
            let mut record = record;
            record.desired = Desired::Stopped;
            record.stop_reason = Some(EndReason::Timeout);
            self.update(&record, rev).await?;
            return Ok(());
        }
        let dir = self.dir(&id);
        // Nothing started it yet: no supervisor of ours, none alive from before a restart, no
        // report of one that already ended, and no sandbox it left detached.
        if record.state == SandboxState::Pending && self.is_member(&id) {
            // A create took this warm sandbox for the record.
            if record.desired == Desired::Running {
                return self.claim(record, rev).await;
            }
            self.drop_member(&id);
            return self
                .end(rev, record, EndReason::Killed, None, None, None)
                .await;
        }
        let untouched = record.state == SandboxState::Pending
            && !self.children.contains_key(&id)
            && !supervisor_alive(&dir)
            && !dir.join("report.json").exists()
            && !dir.join("status").exists();
        match (record.desired, record.state) {
            (_, SandboxState::Exited) => {
                self.children.remove(&id);
                self.signalled.remove(&id);
                self.escalated.remove(&id);
                if record.remove {
                    self.remove(&record, rev).await?;
                }
                Ok(())
            }
            (Desired::Running, SandboxState::Pending) if untouched => self.start(record, rev).await,
            (Desired::Stopped, SandboxState::Pending) if untouched => {
                self.end(rev, record, EndReason::Killed, None, None, None)
                    .await
            }
            _ => {
                // Pause and resume: the cgroup freezer, then the state that says so (the watch
                // brings the new record back here).
                let frozen = match (record.desired, record.state) {
                    (Desired::Paused, SandboxState::Running) => Some(true),
                    (Desired::Running | Desired::Stopped, SandboxState::Paused) => Some(false),
                    _ => None,
                };
                if let Some(freeze) = frozen {
                    return self.set_frozen(record, rev, freeze).await;
                }
                if record.desired == Desired::Stopped {
                    match self.signalled.get(&id) {
                        None => self.signal(&id),
                        Some(at)
                            if at.elapsed() >= cove_jail::run::DETACHED_STOP_GRACE
                                && self.escalated.insert(id) =>
                        {
                            tokio::task::spawn_blocking(move || kill_sandbox(&id));
                        }
                        Some(_) => {}
                    }
                }
                self.check(record, rev).await
            }
        }
    }

    /// Freezes or thaws a sandbox's cgroup and records it. A stop thaws first: frozen
    /// processes cannot act on a signal, not even die of SIGKILL.
    async fn set_frozen(
        &mut self,
        mut record: SandboxRecord,
        rev: u64,
        freeze: bool,
    ) -> Result<(), AgentError> {
        let cgroup = cove_jail::state::cgroup_name(&record.id);
        let done = cove_jail::cgroup::Hierarchy::detect().and_then(|h| {
            let cg = h.open(&cgroup);
            if freeze { cg.freeze() } else { cg.thaw() }
        });
        if let Err(e) = done {
            // Gone already (it ended): the next check records how.
            tracing::warn!(
                sandbox = %record.id,
                tenant = %record.tenant,
                error = %e,
                "cannot {} the sandbox",
                if freeze { "pause" } else { "resume" }
            );
            return self.check(record, rev).await;
        }
        record.state = if freeze {
            SandboxState::Paused
        } else {
            SandboxState::Running
        };
        self.update(&record, rev).await?;
        Ok(())
    }

    /// Starts the supervisor of a pending sandbox. No store write here: the record stays
    /// `pending` until the supervisor reports the command running (one write per start, not
    /// two); until then the supervisor itself (ours, or alive behind its lock after a restart)
    /// is what says the sandbox is being started.
    async fn start(&mut self, record: SandboxRecord, rev: u64) -> Result<(), AgentError> {
        let id = record.id;
        match self.spawn(&record) {
            Ok(child) => {
                // `Running` once the supervisor says the command runs (see `mark_running`).
                self.children.insert(id, child);
                Ok(())
            }
            Err(e) => {
                let message = format!("cannot start its supervisor: {e}");
                self.end(
                    rev,
                    record,
                    EndReason::StartFailure,
                    Some(message),
                    None,
                    None,
                )
                .await
            }
        }
    }

    /// Makes the sandbox's directory and starts `cove supervise DIR`, its spec on its stdin
    /// (no file: on this project's hosts every file made and removed per sandbox costs every
    /// later one, see `supervise`).
    fn spawn(&self, record: &SandboxRecord) -> Result<Supervisor, AgentError> {
        let dir = self.dir(&record.id);
        let (spec_r, spec_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| io_err("create a pipe for", &dir)(e.into()))?;
        let supervisor = self.spawn_supervisor(&record.id, None, spec_r)?;
        send_spec(spec_w, record);
        Ok(supervisor)
    }

    /// Makes the directory of sandbox `id` and starts its supervisor with `stdin` (a pipe for
    /// the spec, or warm, for the template `warm` (JSON), the socket it hands the sandbox over
    /// on: see [`warm`]), forked by the spawner ([`cove_jail::spawner`]). It says `started` on
    /// its stdout, which goes to `started_tx`.
    fn spawn_supervisor(
        &self,
        id: &SandboxId,
        warm: Option<&str>,
        stdin: std::os::fd::OwnedFd,
    ) -> Result<Supervisor, AgentError> {
        use std::os::fd::AsFd;
        let dir = self.dir(id);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err("create", &dir))?;
        let stderr_path = dir.join("stderr.log");
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&stderr_path)
            .map_err(io_err("create", &stderr_path))?;
        // A pipe on which it says `started`; it puts `stdout.log` in its place itself.
        let (out_r, out_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| io_err("create a pipe for", &dir)(e.into()))?;
        let dir_arg = dir.to_string_lossy();
        let mut args = vec!["supervise"];
        if let Some(template) = warm {
            args.extend(["--warm", template]);
        }
        args.push(&dir_arg);
        let pidfd = self
            .spawning
            .spawn(&args, [stdin.as_fd(), out_w.as_fd(), stderr.as_fd()], None)
            .map_err(io_err("start a supervisor for", &dir))?;
        drop(out_w);
        let (started, id) = (self.started_tx.clone(), *id);
        let store = self.store.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let Ok(out) = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r) else {
                return;
            };
            let mut line = String::new();
            let said = tokio::io::BufReader::new(out).read_line(&mut line).await;
            // Marked running here, not on the agent's loop: the create waiting for it is
            // answered a hand-off sooner, and the write, which waits for a group commit,
            // holds no other sandbox up.
            if said.is_ok_and(|n| n > 0) && line == "started\n" {
                mark_running(store, id).await;
                let _ = started.send(id);
            }
        });
        Ok(Supervisor(pidfd))
    }

    /// SIGTERM to the supervisor of `id`, once.
    fn signal(&mut self, id: &SandboxId) {
        // Not signalled yet if its pid is not known yet (a supervisor writes it right after
        // taking its lock): the next pass tries again.
        if let Some(pid) = self.supervisor_pid(id)
            && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
        {
            // Gone meanwhile is fine: the next check records how it ended.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            self.signalled.insert(*id, Instant::now());
        }
    }

    /// The pid of the supervisor of `id`, if it still runs.
    fn supervisor_pid(&self, id: &SandboxId) -> Option<u32> {
        let dir = self.dir(id);
        let pid = u32::try_from(init_pid(&dir)?).ok()?;
        // Pids are reused: it must still be our supervisor, holding the sandbox's lock.
        supervisor_alive(&dir).then_some(pid)
    }

    /// Rotates and indexes the logs of sandbox `id` (one `stat` per log for both).
    fn tend_logs(&mut self, id: &SandboxId) {
        let dir = self.dir(id);
        for log in ["stdout.log", "stderr.log"] {
            let log = dir.join(log);
            let Ok(size) = fs::metadata(&log).map(|m| m.len()) else {
                continue;
            };
            let size = if size > LOG_MAX && rotate_log(&log) {
                self.log_sizes.remove(&log);
                0
            } else {
                size
            };
            index_log(&log, size, now_ms(), &mut self.log_sizes);
        }
    }

    /// Records the end of a running sandbox if it has ended; while it lives, tends its logs
    /// and checks its limits.
    async fn check(&mut self, record: SandboxRecord, rev: u64) -> Result<(), AgentError> {
        let id = record.id;
        self.tend_logs(&id);
        if self.active.get(&id).is_some_and(Tracked::alive) {
            if record.state == SandboxState::Running {
                self.check_limits(&id, record.spec.limits.cpu_time);
            }
            return Ok(());
        }
        let dir = self.dir(&id);
        let report_path = dir.join("report.json");
        if let Ok(bytes) = fs::read(&report_path) {
            let report: Option<RunReport> = serde_json::from_slice(&bytes).ok();
            return match report {
                Some(r) => {
                    let reason = EndReason::from(r.reason);
                    let (code, message) = (r.exit_code, r.message.clone());
                    self.end(rev, record, reason, message, Some(code), Some(r))
                        .await
                }
                None => {
                    self.end(
                        rev,
                        record,
                        EndReason::Lost,
                        Some("its report is unreadable".into()),
                        None,
                        None,
                    )
                    .await
                }
            };
        }
        // While our supervisor starts it, it is not gone; once the supervisor has exited (or
        // after a restart), the lock says whether the sandbox lives.
        // A claimed warm sandbox is being started by the agent itself.
        let starting = if self.is_claiming(&id) {
            Some(true)
        } else {
            self.children.get(&id).map(|s| !s.exited())
        };
        let (gone, adopted) = match starting {
            Some(true) => (false, false),
            Some(false) => {
                self.children.remove(&id);
                (!supervisor_alive(&dir), false)
            }
            None => (!supervisor_alive(&dir), true),
        };
        if gone && dir.join("status").exists() {
            self.finish(&record, &dir);
            return Ok(());
        }
        if !gone && record.state == SandboxState::Running {
            self.check_limits(&id, record.spec.limits.cpu_time);
        }
        if gone && !report_path.exists() {
            let message = "its supervisor ended without a report".to_string();
            tracing::warn!(
                sandbox = %id,
                tenant = %record.tenant,
                "{message}: recorded as lost (its cgroup, if any, goes with the next reaper pass)"
            );
            return self
                .end(rev, record, EndReason::Lost, Some(message), None, None)
                .await;
        }
        // Started by an agent that died before recording it: it runs, so say so.
        if !gone && adopted && record.state == SandboxState::Pending {
            let mut record = record;
            record.state = SandboxState::Running;
            record.started_at_ms.get_or_insert_with(now_ms);
            self.update(&record, rev).await?;
        }
        Ok(())
    }

    /// Kills a running sandbox that hit a limit: a limit ends the sandbox, as under `cove run`;
    /// the report says which (from the cgroup's counters).
    fn check_limits(&mut self, id: &SandboxId, cpu_time: Option<cove_types::Duration>) {
        if !self.escalated.contains(id) && limit_hit(id, cpu_time) {
            let id = *id;
            tokio::task::spawn_blocking(move || kill_sandbox(&id));
            self.escalated.insert(id);
        }
    }

    /// Tears down a detached sandbox whose init has exited and writes its `report.json`, in a
    /// blocking task (cgroup removal and nftables transactions take milliseconds); the agent
    /// is told on `finished_tx`.
    fn finish(&mut self, record: &SandboxRecord, dir: &Path) {
        if !self.finishing.insert(record.id) {
            return;
        }
        let id = record.id;
        let spec = record.spec.clone();
        let dir = dir.to_path_buf();
        let started = record.started_at_ms.unwrap_or(record.created_at_ms);
        // Stopped only if it was signalled: one that ended on its own first says so.
        let stop = self
            .signalled
            .contains_key(&id)
            .then(|| cove_jail::run::StopInfo {
                signal: rustix::process::Signal::TERM.as_raw(),
                escalated: self.escalated.contains(&id),
            });
        let tx = self.finished_tx.clone();
        tokio::task::spawn_blocking(move || {
            reap_init(&id, &dir);
            let wall = now_ms().saturating_sub(started) as f64;
            let report =
                cove_jail::run::finish_detached(&id, &spec, &dir.join("status"), wall, stop, None);
            let tmp = dir.join("report.json.tmp");
            let written = serde_json::to_vec_pretty(&report)
                .map_err(io::Error::other)
                .and_then(|bytes| fs::write(&tmp, bytes))
                .and_then(|()| fs::rename(&tmp, dir.join("report.json")));
            if let Err(e) = written {
                tracing::error!(sandbox = %id, error = %e, "cannot write the sandbox's report");
            }
            let _ = tx.send(id);
        });
    }

    /// Records that a sandbox ended.
    async fn end(
        &mut self,
        rev: u64,
        mut record: SandboxRecord,
        reason: EndReason,
        message: Option<String>,
        exit_code: Option<i32>,
        report: Option<RunReport>,
    ) -> Result<(), AgentError> {
        // Stopped on request: the jail reports `killed` too; keep what it said otherwise.
        // Stopped by the control plane: its reason.
        let (reason, message) = match (reason, record.stop_reason) {
            (EndReason::Killed, Some(EndReason::Timeout)) => {
                let limit = record
                    .spec
                    .limits
                    .timeout
                    .map_or_else(String::new, |t| format!(" {t}"));
                (
                    EndReason::Timeout,
                    Some(format!("killed: timeout{limit} reached")),
                )
            }
            (EndReason::Killed, Some(EndReason::IdleLimit)) => {
                let hard = record
                    .idle
                    .map_or_else(String::new, |p| format!(" for {}", p.hard));
                (
                    EndReason::IdleLimit,
                    Some(format!("stopped: unused{hard} (its idle limit)")),
                )
            }
            (EndReason::Killed, Some(EndReason::ServerShutdown)) => (
                EndReason::ServerShutdown,
                Some("stopped: the server shut down (its on_shutdown policy is stop)".into()),
            ),
            (EndReason::Killed, Some(r)) => (r, message),
            _ => (reason, message),
        };
        record.state = SandboxState::Exited;
        record.reason = Some(reason);
        record.message = message;
        record.exit_code = exit_code;
        record.report = report;
        record.ended_at_ms = Some(now_ms());
        self.children.remove(&record.id);
        self.signalled.remove(&record.id);
        let dir = self.dir(&record.id);
        self.log_sizes
            .retain(|log, _| log.parent() != Some(dir.as_path()));
        if record.spec.net == cove_types::NetMode::Egress {
            // Its drop counters, which the supervisor leaves (removing them takes
            // milliseconds of nftables transactions): off the agent's loop.
            let id = record.id;
            tokio::task::spawn_blocking(move || cove_jail::egress::forget_counters(&id));
        }
        if let Some(new_rev) = self.update(&record, rev).await?
            && record.remove
        {
            self.remove(&record, new_rev).await?;
        }
        Ok(())
    }

    /// Deletes an ended sandbox's record and directory.
    async fn remove(&mut self, record: &SandboxRecord, rev: u64) -> Result<(), AgentError> {
        match self
            .store
            .delete(&key(&record.id), Expect::Revision(rev))
            .await
        {
            Ok(_) => {
                let dir = self.dir(&record.id);
                let _ = fs::remove_dir_all(&dir);
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `record` if its stored revision is still `rev`; `None` if it changed meanwhile
    /// (the watch brings the new version, which is converged then).
    async fn update(&self, record: &SandboxRecord, rev: u64) -> Result<Option<u64>, AgentError> {
        let value = serde_json::to_vec(record).expect("a record serialises");
        match self
            .store
            .put(&key(&record.id), value, Expect::Revision(rev), None)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The server's spawner ([`cove_jail::spawner`]), shared by the agent (supervisors) and the
/// API (exec helpers): `cove spawner DIR`, started with the first process and again whenever
/// it is found gone.
pub struct Spawning {
    /// The `cove` binary.
    cove: PathBuf,
    /// The sandboxes' directory (the spawner's argument).
    root: PathBuf,
    /// More environment for what it forks (over the server's own `PATH`, image store and
    /// resolver).
    env: std::sync::Mutex<Vec<(String, String)>>,
    current: std::sync::Mutex<Option<(cove_jail::spawner::Spawner, std::process::Child)>>,
}

impl Spawning {
    /// A spawner for `cove` (the binary), serving the sandboxes under `root`; started when
    /// first needed.
    pub fn new(cove: PathBuf, root: PathBuf) -> std::sync::Arc<Spawning> {
        std::sync::Arc::new(Spawning {
            cove,
            root,
            env: Default::default(),
            current: Default::default(),
        })
    }

    /// Adds `key=value` to the environment of what it forks (from the next start of the
    /// spawner on).
    pub fn add_env(&self, key: &str, value: &str) {
        let mut env = self.env.lock().unwrap_or_else(|e| e.into_inner());
        env.push((key.into(), value.into()));
    }

    /// Starts `cove ARGS` through the spawner with `stdio` (and `exit`: see
    /// [`cove_jail::spawner::Spawner::spawn`]); its pidfd. A spawner found gone (it died, or
    /// was never started) is started anew, once per call.
    pub fn spawn(
        &self,
        args: &[&str],
        stdio: [std::os::fd::BorrowedFd<'_>; 3],
        exit: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> io::Result<std::os::fd::OwnedFd> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, _)) = current.as_ref() {
            match s.spawn(args, stdio, exit) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe
                            | io::ErrorKind::UnexpectedEof
                            | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    tracing::warn!(error = %e, "the spawner is gone: starting another");
                }
                done => return done,
            }
        }
        if let Some((_, mut old)) = current.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let started = self.start()?;
        let pidfd = started.0.spawn(args, stdio, exit);
        *current = Some(started);
        pidfd
    }

    /// Collects the spawner if it has exited (the next start starts another): its zombie
    /// would stand first among this process's exited children, where
    /// `collect_sandbox_orphans` stops.
    pub fn tend(&self) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, child)) = current.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(%status, "the spawner is gone: another starts with the next sandbox");
            *current = None;
        }
    }

    /// Starts `cove spawner`, with the environment every process it forks gets: nothing of
    /// the server's but `PATH`, its image store and its sandboxes' resolver, and
    /// [`Spawning::add_env`]'s.
    fn start(&self) -> io::Result<(cove_jail::spawner::Spawner, std::process::Child)> {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = cove_jail::spawner::Spawner::socket_pair()?;
        let mut cmd = std::process::Command::new(&self.cove);
        // Its arguments are every forked process's too: the sandboxes' directory says whose
        // they are.
        cmd.arg("spawner")
            .arg(&self.root)
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            // Its own process group: a Ctrl-C meant for `cove serve` is not meant for it (it
            // exits when the server's end of its socket closes).
            .process_group(0);
        for var in ["COVE_IMAGE_STORE", "COVE_EGRESS_DNS"] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let env = self.env.lock().unwrap_or_else(|e| e.into_inner()).clone();
        cmd.envs(env);
        let child = cmd.spawn()?;
        Ok((cove_jail::spawner::Spawner::new(ours), child))
    }
}

impl Drop for Agent {
    /// The warm sandboxes end with the agent (the server is exiting): each is removed whole
    /// before the process exits. Should it be killed instead, each one's child reads the end
    /// of its claim pipe and exits, and the next start removes what is left of it (a
    /// directory without a record).
    fn drop(&mut self) {
        self.remove_members();
    }
}

/// A sandbox's log grows to this size before it is rotated.
pub const LOG_MAX: u64 = 32 << 20;
/// How much of the newest output a rotation keeps (in `<log>.old`).
pub const LOG_KEEP: u64 = 4 << 20;

/// Rotates `log` if it has grown past [`LOG_MAX`]: its last [`LOG_KEEP`] bytes go to
/// `<log>.old` and the log is emptied (its writers append, so they carry on at the new end).
/// Checked at each of the sandbox's periodic checks and once more when it has ended, so the
/// bound is soft while it runs (it can write for one interval past it) and hard once it has
/// ended: the log and `.old` then hold at most LOG_MAX + 2 x LOG_KEEP. Output written during
/// the copy is kept too, up to LOG_KEEP of it; only what lands in the microseconds between the
/// last look at the log's size and its truncation, or beyond that, can be lost.
pub fn rotate_log(log: &Path) -> bool {
    // A `stat` per log per poll; the file is opened only when it is due.
    if fs::metadata(log).map_or(true, |m| m.len() <= LOG_MAX) {
        return false;
    }
    let Ok(mut file) = OpenOptions::new().read(true).write(true).open(log) else {
        return false;
    };
    let size = |f: &File| f.metadata().map_or(0, |m| m.len());
    let len = size(&file);
    let mut tail = Vec::with_capacity(LOG_KEEP as usize);
    if len <= LOG_MAX || !read_range(&mut file, len - LOG_KEEP, len, &mut tail) {
        return false;
    }
    // Output written meanwhile (the copy takes milliseconds) joins the kept part, until the
    // log stops growing between two looks: only what lands between the last look and the
    // truncation, microseconds apart, can be lost (or more, from a writer that outruns the
    // copy: a few rounds at most, so it is bounded, not lossless).
    let mut end = len;
    for _ in 0..4 {
        let now = size(&file);
        if now <= end || now - end > LOG_KEEP || !read_range(&mut file, end, now, &mut tail) {
            break;
        }
        end = now;
    }
    // Never more than LOG_KEEP of it, starting at a line boundary when there is one.
    let from = tail.len().saturating_sub(LOG_KEEP as usize);
    let start = from
        + tail[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
    let mut old = log.as_os_str().to_owned();
    old.push(".old");
    if fs::write(&old, &tail[start..]).is_err() {
        return false;
    }
    // Written while `.old` was: appended to it too, again until the log stops growing between
    // two looks (a writer that has just ended, as one printing its last line, loses nothing),
    // and up to LOG_KEEP more in all, so that a log and what its rotation kept stay within
    // LOG_MAX + 2 x LOG_KEEP.
    let mut room = LOG_KEEP;
    let mut appended = OpenOptions::new().append(true).open(&old).ok();
    for _ in 0..4 {
        let now = size(&file);
        let Some(f) = appended.as_mut() else { break };
        if now <= end || room == 0 {
            break;
        }
        let from = end.max(now.saturating_sub(room));
        let mut more = Vec::new();
        if !read_range(&mut file, from, now, &mut more)
            || std::io::Write::write_all(f, &more).is_err()
        {
            break;
        }
        room -= now - from;
        end = now;
    }
    let _ = file.set_len(0);
    // The index's offsets were into the output now gone.
    let _ = fs::remove_file(index_path(log));
    true
}

/// Appends bytes `from..to` of `file` to `buf`; whether it could (nothing to read is `true`).
fn read_range(file: &mut File, from: u64, to: u64, buf: &mut Vec<u8>) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    to <= from
        || (file.seek(SeekFrom::Start(from)).is_ok()
            && file.take(to - from).read_to_end(buf).is_ok())
}

/// The time index of `log`: lines `<ms since the epoch> <from> <to>`, appended at each poll
/// in which the log grew: the bytes `from..to` were written in the poll interval that ended
/// then. "Output since T" starts at `from` of the first entry after T (to within a poll
/// interval, erring towards more output).
pub fn index_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".idx");
    PathBuf::from(p)
}

/// Largest a log's index grows before every other entry is dropped.
const INDEX_MAX: u64 = 256 << 10;

/// Records `size`, the size of `log` now, at `now_ms` in its index if the log grew since the
/// last entry. `known` holds each log's last indexed size, so that a quiet log costs nothing;
/// the index itself is read only for a log not seen since this agent started.
pub fn index_log(log: &Path, size: u64, now_ms: u64, known: &mut HashMap<PathBuf, u64>) {
    let idx = index_path(log);
    let last = match known.get(log) {
        Some(&s) => Some(s),
        None => last_indexed(&idx),
    };
    if last == Some(size) || (last.is_none() && size == 0) {
        known.insert(log.to_path_buf(), size);
        return;
    }
    known.insert(log.to_path_buf(), size);
    if last.is_some_and(|l| l > size) {
        // Emptied by someone else than the rotation: start again.
        let _ = fs::write(&idx, format!("{now_ms} 0 {size}\n"));
        return;
    }
    let line = format!("{now_ms} {} {size}\n", last.unwrap_or(0));
    let idx_len = fs::metadata(&idx).map_or(0, |m| m.len());
    if idx_len + line.len() as u64 > INDEX_MAX {
        // Coarser, still ordered: every other entry, then this one.
        let text = fs::read_to_string(&idx).unwrap_or_default();
        let thinned: String = text
            .lines()
            .step_by(2)
            .map(|l| format!("{l}\n"))
            .chain(std::iter::once(line))
            .collect();
        let _ = fs::write(&idx, thinned);
        return;
    }
    if let Ok(mut f) = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&idx)
    {
        let _ = io::Write::write_all(&mut f, line.as_bytes());
    }
}

/// The log size of an index's last entry (its last line's last number).
fn last_indexed(idx: &Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(idx).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(128))).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines().last()?.rsplit(' ').next()?.parse().ok()
}

/// Removes what is left on the host of sandbox `id`, whose processes are gone and whose end
/// nobody records: its cgroup and lock file, as for any ended sandbox (the reaper's pass
/// removes anything else, such as egress rules), and with `dir_too`, its directory `dir`.
fn tear_down(id: &SandboxId, dir: &Path, dir_too: bool) {
    cove_jail::run::finish_detached(
        id,
        &cove_types::Spec::new(Vec::new()),
        &dir.join("status"),
        0.0,
        None,
        None,
    );
    if dir_too {
        let _ = fs::remove_dir_all(dir);
    }
}

/// Kills every process of sandbox `id` (its cgroup), now.
fn kill_sandbox(id: &SandboxId) {
    let Some(hierarchy) = hierarchy() else {
        return;
    };
    let cg = hierarchy.open(&cove_jail::state::cgroup_name(id));
    // A frozen process cannot die: thaw first (a no-op when it is not frozen).
    let _ = cg.thaw();
    let mut kill = |pid: i32| {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    };
    if let Err(e) = cg.kill_all(&mut kill) {
        tracing::warn!(sandbox = %id, error = %e, "cannot kill the sandbox");
    }
}

/// Whether sandbox `id` has hit a limit that ends it: a process killed for memory, a fork
/// refused by the pids limit, or (with one) its CPU-time budget spent. Two or three cgroup
/// file reads.
fn limit_hit(id: &SandboxId, cpu_time: Option<cove_types::Duration>) -> bool {
    let Some(hierarchy) = hierarchy() else {
        return false;
    };
    let cg = hierarchy.open(&cove_jail::state::cgroup_name(id));
    if cg
        .limit_events()
        .is_ok_and(|(oom, pids)| oom > 0 || pids > 0)
    {
        return true;
    }
    cpu_time.is_some_and(|budget| {
        cg.cpu_usage_ns()
            .is_ok_and(|ns| Duration::from_nanos(ns) >= budget.as_std())
    })
}

/// The host's cgroup hierarchy, detected once.
fn hierarchy() -> Option<&'static cove_jail::cgroup::Hierarchy> {
    cove_jail::cgroup::Hierarchy::detected()
}

/// Marks `dir` as the top of a hierarchy for ext4's inode allocator (`FS_TOPDIR_FL`, `chattr
/// +T`), which then spreads its subdirectories over the file system's block groups instead of
/// packing them into `dir`'s; a sandbox's files go into its directory's group. Where the file
/// system has no journal (this project's hosts), the allocator skips every inode freed in the
/// last minute or more and looks at each one first: in one group, the files of all the
/// sandboxes removed meanwhile. Measured here in rounds of 200 creates and 200 removals at 50
/// clients: 151, 128, 108 and 105 sandboxes a second in four rounds without the mark, 125, 137,
/// 137 and 147 with it. Elsewhere (another file system, or no permission) this does nothing.
fn spread_subdirectories(dir: &Path) {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    let Ok(d) = File::open(dir) else {
        return;
    };
    if let Ok(flags) = ioctl_getflags(&d)
        && !flags.contains(IFlags::TOPDIR)
    {
        let _ = ioctl_setflags(&d, flags | IFlags::TOPDIR);
    }
}

/// The pid on the last whole line of a sandbox directory's `lock`: its supervisor's while it
/// starts, its init's once it runs (see `supervise`). A sandbox started by an earlier version
/// of Cove, still running after an upgrade, has it in the file `pid`.
fn init_pid(dir: &Path) -> Option<i32> {
    let last_line = |text: String| -> Option<i32> {
        let whole = &text[..text.rfind('\n')?];
        whole.rsplit('\n').next()?.trim().parse().ok()
    };
    fs::read_to_string(dir.join("lock"))
        .ok()
        .and_then(last_line)
        .or_else(|| {
            fs::read_to_string(dir.join("pid"))
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

/// Whether process `pid` exists and is named for sandbox `id` (as its init names itself).
fn is_init_of(pid: i32, id: &SandboxId) -> bool {
    let name: String = format!("cove-{id}").chars().take(15).collect();
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.contains(&format!("({name}) ")))
}

/// Collects the exit of a detached sandbox's init if it is this process's child (it is, when
/// this server started it: the server is the reaper of its supervisors' orphans). Only the
/// process named for the sandbox is collected, and only while it exists (so its pid cannot
/// have been reused). Its lock is released while it exits, a moment before it is a zombie:
/// the wait allows for that moment (up to a second).
fn reap_init(id: &SandboxId, dir: &Path) {
    let Some(raw) = init_pid(dir) else {
        return;
    };
    let Some(pid) = rustix::process::Pid::from_raw(raw) else {
        return;
    };
    for _ in 0..100 {
        if !is_init_of(raw, id) {
            return;
        }
        match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
            // Not exited yet: it is on its way out.
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            // Collected, or not our child (the host's init collects it).
            _ => return,
        }
    }
}

/// Waits, in a task, for the init of sandbox `id` to exit, then sends `id` on `tx`. `None` when
/// it cannot be watched (its pid not written yet, gone already, no descriptor left): its
/// periodic checks notice its end then.
fn watch_exit(
    id: &SandboxId,
    dir: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<SandboxId>,
) -> Option<tokio::task::AbortHandle> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let raw = init_pid(dir)?;
    let pidfd = pidfd_open(Pid::from_raw(raw)?, PidfdFlags::NONBLOCK).ok()?;
    // The pid was the init's when written; now that the descriptor holds the process, check
    // that it still is (a recycled pid would be a stranger's). An exited init that is still a
    // zombie holds its pid and name: its descriptor is readable at once.
    if !is_init_of(raw, id) {
        return None;
    }
    let pidfd = readable(pidfd)?;
    let id = *id;
    let task = tokio::spawn(async move {
        if pidfd.readable().await.is_ok() {
            let _ = tx.send(id);
        }
    });
    Some(task.abort_handle())
}

/// `fd` registered with the runtime, for readability.
#[allow(unsafe_code)]
fn readable(fd: std::os::fd::OwnedFd) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the `AsyncFd` owns the descriptor for its whole life (it closes it when dropped,
    // after deregistering it), and an `OwnedFd` always names the same descriptor.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE).ok()
    }
}

/// Whether a supervisor holds the sandbox directory's lock.
pub fn supervisor_alive(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join("lock")) else {
        return false;
    };
    matches!(
        file.try_lock_shared(),
        Err(std::fs::TryLockError::WouldBlock)
    )
}

/// Writes `record`'s spec to a supervisor's stdin and closes it, off the loop. The timeout is
/// the agent's to enforce (at `deadline_ms`, which may move), not the jail's. A supervisor
/// that dies first breaks the pipe: its end is found by `check`.
fn send_spec(stdin: std::os::fd::OwnedFd, record: &SandboxRecord) {
    let mut spec = record.spec.clone();
    spec.limits.timeout = None;
    let spec = serde_json::to_vec(&spec).expect("a spec serialises");
    // At once, almost always whole: the pipe is fresh and holds 64 KiB (a task to write it
    // would put a hand-off on a create's way). What does not fit goes in a task.
    let _ = rustix::io::ioctl_fionbio(&stdin, true);
    let sent = rustix::io::write(&stdin, &spec).unwrap_or(0);
    if sent == spec.len() {
        return;
    }
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        if let Ok(mut pipe) = tokio::net::unix::pipe::Sender::from_owned_fd(stdin) {
            let _ = pipe.write_all(&spec[sent..]).await;
        }
    });
}

/// A supervisor this agent started (forked by its spawner, which collects it), until it
/// exits: a pidfd of it.
pub(crate) struct Supervisor(std::os::fd::OwnedFd);

impl Supervisor {
    /// Whether it has exited.
    fn exited(&self) -> bool {
        cove_jail::spawner::exited(&self.0)
    }
}

/// Records that the command of `id` runs (unless its record moved on meanwhile).
async fn mark_running(store: Embedded, id: SandboxId) {
    for _ in 0..10 {
        let Ok(Some(entry)) = store.get(&key(&id)).await else {
            return;
        };
        let Ok(mut record) = parse(&entry.key, &entry.value) else {
            return;
        };
        if record.state != SandboxState::Pending {
            return;
        }
        record.state = SandboxState::Running;
        record.started_at_ms = Some(now_ms());
        let value = serde_json::to_vec(&record).expect("a record serialises");
        // Not worth an `fsync`: lost in a crash, it is recomputed by the next agent (a
        // supervisor alive makes a pending sandbox running; see `check`).
        match store
            .put_volatile(&key(&id), value, Expect::Revision(entry.mod_revision))
            .await
        {
            Err(StoreError::Conflict { .. }) => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandboxes_directory_spreads_its_subdirectories_on_ext4() {
        let dir = std::env::temp_dir().join(format!("cove-agent-topdir-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let flags = || rustix::fs::ioctl_getflags(File::open(&dir).unwrap());
        const EXT_SUPER_MAGIC: i64 = 0xEF53;
        if rustix::fs::statfs(&dir).unwrap().f_type as i64 != EXT_SUPER_MAGIC {
            // Only ext2/3/4 know the flag.
            eprintln!("skipped: {} is not on ext4", dir.display());
            fs::remove_dir(&dir).unwrap();
            return;
        }
        assert!(!flags().unwrap().contains(rustix::fs::IFlags::TOPDIR));
        spread_subdirectories(&dir);
        let marked = flags().unwrap().contains(rustix::fs::IFlags::TOPDIR);
        fs::remove_dir(&dir).unwrap();
        assert!(marked, "the directory is marked as the top of a hierarchy");
    }
}
