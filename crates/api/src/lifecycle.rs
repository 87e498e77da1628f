//! The lifecycle policies the control plane applies to records: idle limits (what happens to
//! a sandbox nobody uses) and retention (how long an ended sandbox's record and logs stay).
//!
//! Use is recorded in memory ([`Activity`]) by what a person or a program does with a sandbox:
//! requests through the edge proxy, execs (and every message of a streaming exec, both ways),
//! file operations, resuming it; and, for a policy with `cpu_percent`, the sandbox's own CPU
//! use over the last half second when it reaches that share of a CPU. [`watch`] checks the
//! running sandboxes that have a policy twice a second (it knows which from a store watch, so
//! the many without one cost it nothing): past the soft limit it records `idle_warned_at_ms`, which the events stream
//! reports as `idle_warning` (with when the hard limit acts); use clears it; past the hard
//! limit it stops the sandbox (reason `idle_limit`) or pauses it.
//!
//! After a server restart nothing is known of earlier use: idle time counts from the start.
//!
//! An ended sandbox whose end is older than the server's retention is marked for removal; the
//! agent then deletes its files and its record (as `DELETE` does).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cove_store::{Event, Kv};
use cove_types::sandbox::{IdleAction, RECORDS_PREFIX, now_ms, record_key};
use cove_types::{Desired, EndReason, SandboxId, SandboxRecord, SandboxState};

use crate::{Api, Caller, all_records, parse, update_record};

/// When each sandbox was last used, in milliseconds since the Unix epoch.
#[derive(Debug, Default)]
pub struct Activity(std::sync::Mutex<HashMap<SandboxId, u64>>);

impl Activity {
    /// Sandbox `id` is being used now.
    pub fn touch(&self, id: SandboxId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, now_ms());
    }

    fn last(&self, id: &SandboxId) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    /// Keeps only the sandboxes in `live`.
    fn retain(&self, live: &HashSet<SandboxId>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id));
    }
}

/// How often the policies are checked.
const TICK: Duration = Duration::from_millis(500);

/// The last CPU reading of each sandbox whose policy counts CPU use.
#[derive(Debug, Default)]
struct CpuSamples(HashMap<SandboxId, (u64, f64)>);

impl CpuSamples {
    /// Records `cpu` seconds used by `id` at `now` (ms); whether its use since the previous
    /// reading reached `percent` of one CPU.
    fn busy(&mut self, id: SandboxId, now: u64, cpu: f64, percent: u32) -> bool {
        let before = self.0.insert(id, (now, cpu));
        let Some((then, used)) = before else {
            return false;
        };
        let wall = now.saturating_sub(then) as f64 / 1000.0;
        wall > 0.0 && (cpu - used) / wall * 100.0 >= f64::from(percent)
    }
}

/// What a sandbox's idleness calls for now.
#[derive(Debug, PartialEq, Eq)]
enum Due {
    Nothing,
    Warn,
    /// Used again since the warning.
    Unwarn,
    Act(IdleAction),
}

/// What is due for `r`, last used at `last` (ms), at `now`.
fn due(r: &SandboxRecord, last: u64, now: u64) -> Due {
    let Some(policy) = r.idle else {
        return Due::Nothing;
    };
    if r.state != SandboxState::Running || r.desired != Desired::Running {
        return Due::Nothing;
    }
    let idle = Duration::from_millis(now.saturating_sub(last));
    if idle >= policy.hard.as_std() {
        return Due::Act(policy.action);
    }
    match (policy.soft, r.idle_warned_at_ms) {
        (Some(soft), None) if idle >= soft.as_std() => Due::Warn,
        (_, Some(warned)) if last > warned => Due::Unwarn,
        _ => Due::Nothing,
    }
}

/// Whether `r` has ended longer than `retention` before `now` and is not yet to be removed.
fn expired(r: &SandboxRecord, retention: Duration, now: u64) -> bool {
    r.state.is_final()
        && !r.remove
        && r.ended_at_ms
            .is_some_and(|end| now.saturating_sub(end) >= retention.as_millis() as u64)
}

/// What the policies need to know of the records, kept up to date from a store watch.
#[derive(Debug, Default)]
struct Index {
    /// The sandboxes that have not ended.
    live: HashSet<SandboxId>,
    /// Those of them with an idle policy.
    idle: HashSet<SandboxId>,
    /// Ended sandboxes not yet marked for removal, and when they ended.
    ended: HashMap<SandboxId, Option<u64>>,
}

impl Index {
    fn put(&mut self, r: &SandboxRecord) {
        let id = r.id;
        if r.state.is_final() {
            self.live.remove(&id);
            self.idle.remove(&id);
            if r.remove {
                self.ended.remove(&id);
            } else {
                self.ended.insert(id, r.ended_at_ms);
            }
        } else {
            self.live.insert(id);
            if r.idle.is_some() {
                self.idle.insert(id);
            } else {
                self.idle.remove(&id);
            }
            self.ended.remove(&id);
        }
    }

    fn delete(&mut self, key: &str) {
        if let Some(id) = key
            .strip_prefix(RECORDS_PREFIX)
            .and_then(|id| id.parse::<SandboxId>().ok())
        {
            self.live.remove(&id);
            self.idle.remove(&id);
            self.ended.remove(&id);
        }
    }
}

/// Applies the lifecycle policies, forever (a store error is retried at the next tick).
pub async fn watch(api: Api) {
    let started = now_ms();
    let mut cpu = CpuSamples::default();
    loop {
        // The index is built from a listing, then kept by a watch from the listing's revision;
        // built again whenever the watch fails (it fell out of the store's window).
        let Ok((revision, records)) = all_records(&api.store).await else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        let mut index = Index::default();
        for (_, r) in &records {
            index.put(r);
        }
        drop(records);
        let Ok(mut changes) = api.store.watch(RECORDS_PREFIX, revision).await else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = changes.next() => match event {
                    Ok(Event::Put(entry)) => {
                        if let Ok(r) = parse(&entry.value) {
                            index.put(&r);
                        }
                    }
                    Ok(Event::Delete { key, .. }) => index.delete(&key),
                    Err(_) => break,
                },
                _ = tick.tick() => apply(&api, &index, &mut cpu, started).await,
            }
        }
    }
}

/// The stored record of `id`, if there is one.
async fn record(api: &Api, id: &SandboxId) -> Option<SandboxRecord> {
    let entry = api.store.get(&record_key(id)).await.ok()??;
    parse(&entry.value).ok()
}

/// One tick of the policies.
async fn apply(api: &Api, index: &Index, cpu: &mut CpuSamples, started: u64) {
    if let Some(retention) = api.retention {
        let now = now_ms();
        let past: Vec<SandboxId> = index
            .ended
            .iter()
            .filter(|(_, end)| {
                end.is_some_and(|end| now.saturating_sub(end) >= retention.as_millis() as u64)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in past {
            let Some(r) = record(api, &id).await else {
                continue;
            };
            let who = Caller::owner_of(&r);
            let _ = update_record(api, &who, r.id.as_str(), |cur| {
                let due = expired(cur, retention, now_ms());
                if due {
                    cur.remove = true;
                }
                Ok(due)
            })
            .await;
        }
    }
    for id in &index.idle {
        let Some(r) = record(api, id).await else {
            continue;
        };
        if !r.state.is_final() {
            idle_check(api, r, cpu, started).await;
        }
    }
    api.activity.retain(&index.live);
    cpu.0.retain(|id, _| index.idle.contains(id));
}

/// Warns, stops or pauses sandbox `r` as its idle policy says.
async fn idle_check(api: &Api, r: SandboxRecord, cpu: &mut CpuSamples, started: u64) {
    if let Some(percent) = r.idle.and_then(|p| p.cpu_percent)
        && r.state == SandboxState::Running
        && let Some(used) = api.usage.cpu_seconds(r.id)
        && cpu.busy(r.id, now_ms(), used, percent)
    {
        api.activity.touch(r.id);
    }
    let last = api
        .activity
        .last(&r.id)
        .unwrap_or(0)
        .max(r.started_at_ms.unwrap_or(r.created_at_ms))
        .max(started);
    let now = now_ms();
    let todo = due(&r, last, now);
    if todo == Due::Nothing {
        return;
    }
    let who = Caller::owner_of(&r);
    // Applied only if it still holds for the record as it is when written.
    let mut acted = None;
    let done = update_record(api, &who, r.id.as_str(), |cur| {
        acted = None;
        let last = last.max(api.activity.last(&cur.id).unwrap_or(0));
        Ok(match due(cur, last, now_ms()) {
            Due::Nothing => false,
            Due::Warn => {
                cur.idle_warned_at_ms = Some(now);
                true
            }
            Due::Unwarn => {
                cur.idle_warned_at_ms = None;
                true
            }
            Due::Act(IdleAction::Stop) => {
                cur.desired = Desired::Stopped;
                cur.stop_reason = Some(EndReason::IdleLimit);
                acted = Some("stop");
                true
            }
            Due::Act(IdleAction::Pause) => {
                cur.desired = Desired::Paused;
                cur.idle_warned_at_ms = None;
                acted = Some("pause");
                true
            }
        })
    })
    .await;
    if let (Ok((_, Some(_))), Some(action)) = (done, acted) {
        api.metrics.idle_action(action);
        tracing::info!(
            sandbox = %r.id,
            tenant = %r.tenant,
            action,
            "idle hard limit reached"
        );
    }
}

/// Stops every sandbox that has not ended, with reason `server_shutdown`, and waits up to
/// `grace` for them to end. Returns how many had not ended by then.
pub async fn stop_all(api: &Api, grace: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + grace;
    let Ok((_, records)) = all_records(&api.store).await else {
        return 0;
    };
    let mut stopping = 0;
    for (_, r) in records.into_iter().filter(|(_, r)| !r.state.is_final()) {
        let who = Caller::owner_of(&r);
        let done = update_record(api, &who, r.id.as_str(), |cur| {
            if cur.state.is_final() || cur.desired == Desired::Stopped {
                return Ok(false);
            }
            cur.desired = Desired::Stopped;
            cur.stop_reason = Some(EndReason::ServerShutdown);
            Ok(true)
        })
        .await;
        if let Ok((_, Some(_))) = done {
            stopping += 1;
        }
    }
    tracing::info!(
        sandboxes = stopping,
        "stopping every sandbox before the server exits"
    );
    loop {
        let left = match all_records(&api.store).await {
            Ok((_, records)) => records.iter().filter(|(_, r)| !r.state.is_final()).count(),
            Err(_) => 0,
        };
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_types::sandbox::IdlePolicy;

    fn record(idle: Option<IdlePolicy>) -> SandboxRecord {
        let mut r: SandboxRecord = serde_json::from_value(serde_json::json!({
            "schema": 1, "id": "0123456789ab", "tenant": "t",
            "spec": cove_types::Spec::new(vec!["true".into()]),
            "labels": {}, "metadata": {}, "desired": "running", "state": "running",
            "reason": null, "message": null, "exit_code": null, "created_at_ms": 0,
            "started_at_ms": 0, "ended_at_ms": null, "report": null,
        }))
        .unwrap();
        r.idle = idle;
        r
    }

    #[test]
    fn the_index_follows_records_through_their_life() {
        let policy = IdlePolicy {
            soft: None,
            hard: "30s".parse().unwrap(),
            action: IdleAction::Stop,
            cpu_percent: None,
        };
        let mut index = Index::default();
        let plain = record(None);
        index.put(&plain);
        assert!(index.live.contains(&plain.id) && index.idle.is_empty());
        let mut r = record(Some(policy));
        index.put(&r);
        assert!(index.idle.contains(&r.id));
        r.state = SandboxState::Exited;
        r.ended_at_ms = Some(5);
        index.put(&r);
        assert!(index.live.is_empty() && index.idle.is_empty());
        assert_eq!(index.ended.get(&r.id), Some(&Some(5)));
        r.remove = true;
        index.put(&r);
        assert!(index.ended.is_empty());
        r.remove = false;
        index.put(&r);
        index.delete(&record_key(&r.id));
        index.delete("/cove/sandboxes/not-an-id");
        assert!(index.ended.is_empty());
    }

    #[test]
    fn soft_then_hard_and_use_clears_the_warning() {
        let policy = IdlePolicy {
            soft: Some("10s".parse().unwrap()),
            hard: "30s".parse().unwrap(),
            action: IdleAction::Stop,
            cpu_percent: None,
        };
        let mut r = record(Some(policy));
        assert_eq!(due(&r, 0, 9_999), Due::Nothing);
        assert_eq!(due(&r, 0, 10_000), Due::Warn);
        r.idle_warned_at_ms = Some(10_000);
        assert_eq!(due(&r, 0, 20_000), Due::Nothing, "warned once");
        assert_eq!(due(&r, 15_000, 20_000), Due::Unwarn, "used since");
        assert_eq!(due(&r, 0, 30_000), Due::Act(IdleAction::Stop));
        // Only a running sandbox that should run is acted on.
        r.desired = Desired::Stopped;
        assert_eq!(due(&r, 0, 60_000), Due::Nothing);
        r.desired = Desired::Running;
        r.state = SandboxState::Paused;
        assert_eq!(due(&r, 0, 60_000), Due::Nothing);
        assert_eq!(due(&record(None), 0, u64::MAX), Due::Nothing);
    }

    #[test]
    fn cpu_use_counts_from_the_second_reading_at_the_threshold() {
        let id: SandboxId = "0123456789ab".parse().unwrap();
        let mut s = CpuSamples::default();
        assert!(!s.busy(id, 1000, 5.0, 10), "nothing to compare with yet");
        // 0.0625 s of CPU in 0.5 s: 12.5 %.
        assert!(s.busy(id, 1500, 5.0625, 10));
        assert!(!s.busy(id, 2000, 5.1, 10), "7.5 %");
        assert!(s.busy(id, 2500, 6.1, 150), "two CPUs busy: 200 %");
        assert!(!s.busy(id, 2500, 7.0, 1), "no time passed");
    }

    #[test]
    fn only_ended_records_past_retention_expire() {
        let day = Duration::from_secs(86400);
        let mut r = record(None);
        assert!(!expired(&r, day, u64::MAX), "running");
        r.state = SandboxState::Exited;
        r.ended_at_ms = Some(1000);
        assert!(!expired(&r, day, 1000 + 86_399_999));
        assert!(expired(&r, day, 1000 + 86_400_000));
        r.remove = true;
        assert!(!expired(&r, day, u64::MAX), "already being removed");
    }
}
