//! The conformance suite every backend of [`Kv`] must pass. Each check is generic over the
//! backend; today they run against the embedded store (a real redb file in a fresh directory).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cove_store::{Embedded, Event, Expect, Kv, LeaseId, StoreError};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let mut b = [0u8; 8];
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        b.copy_from_slice(&uuid.as_bytes()[..8]);
        let dir =
            std::env::temp_dir().join(format!("cove-store-{name}-{}", String::from_utf8_lossy(&b)));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("state.redb")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn embedded(dir: &Dir) -> Embedded {
    Embedded::open(&dir.db()).await.unwrap()
}

/// Waits for the next event, failing the test after 10 s.
async fn next(w: &mut cove_store::Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("no event within 10 s")
        .unwrap()
}

async fn revisions_count_every_write<K: Kv>(kv: &K) {
    assert_eq!(kv.revision().await.unwrap(), 0);
    assert_eq!(kv.get("/a").await.unwrap(), None);
    let r1 = kv
        .put("/a", b"1".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r2 = kv
        .put("/b", b"2".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r3 = kv
        .put("/a", b"3".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!((r1, r2, r3), (1, 2, 3));
    let a = kv.get("/a").await.unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.lease
        ),
        (&b"3"[..], 1, 3, None)
    );
    assert_eq!(kv.delete("/a", Expect::Any).await.unwrap(), Some(4));
    assert_eq!(
        kv.delete("/a", Expect::Any).await.unwrap(),
        None,
        "nothing left"
    );
    assert_eq!(
        kv.revision().await.unwrap(),
        4,
        "a no-op delete is no revision"
    );
    let r5 = kv
        .put("/a", b"again".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let a = kv.get("/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (r5, r5), "recreated");
}

async fn writes_compare_and_swap<K: Kv>(kv: &K) {
    let r = kv
        .put("/k", b"v1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let err = kv
        .put("/k", b"x".to_vec(), Expect::Absent, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { current: Some(c), .. } if *c == r),
        "{err}"
    );
    let r2 = kv
        .put("/k", b"v2".to_vec(), Expect::Revision(r), None)
        .await
        .unwrap();
    let err = kv
        .put("/k", b"stale".to_vec(), Expect::Revision(r), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(kv.get("/k").await.unwrap().unwrap().value, b"v2");
    let err = kv.delete("/k", Expect::Revision(r)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(
        kv.delete("/k", Expect::Revision(r2))
            .await
            .unwrap()
            .is_some()
    );
    let err = kv
        .put("/k", b"x".to_vec(), Expect::Revision(r2), None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { current: None, .. }),
        "{err}"
    );
    let err = kv.delete("/none", Expect::Revision(1)).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(kv.delete("/none", Expect::Absent).await.unwrap(), None);
}

async fn listing_is_by_prefix_in_order_and_paginated<K: Kv>(kv: &K) {
    for k in ["/s/c", "/s/a", "/t/a", "/s/b", "/s", "/r/z", "/s/d"] {
        kv.put(k, k.as_bytes().to_vec(), Expect::Any, None)
            .await
            .unwrap();
    }
    let keys = |p: &cove_store::Page| p.entries.iter().map(|e| e.key.clone()).collect::<Vec<_>>();
    let page = kv.list("/s/", None, 100).await.unwrap();
    assert_eq!(keys(&page), ["/s/a", "/s/b", "/s/c", "/s/d"]);
    assert!(!page.more);
    assert_eq!(page.revision, kv.revision().await.unwrap());
    let first = kv.list("/s/", None, 2).await.unwrap();
    assert_eq!(keys(&first), ["/s/a", "/s/b"]);
    assert!(first.more);
    let second = kv.list("/s/", Some("/s/b"), 2).await.unwrap();
    assert_eq!(keys(&second), ["/s/c", "/s/d"]);
    assert!(!second.more);
    assert!(
        kv.list("/nothing/", None, 10)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
}

async fn watches_replay_then_follow_in_order<K: Kv>(kv: &K) {
    let r1 = kv
        .put("/w/a", b"1".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    kv.put("/other", b"x".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r3 = kv
        .put("/w/b", b"2".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    // From before the first change: the past is replayed, other prefixes left out.
    let mut w = kv.watch("/w/", 0).await.unwrap();
    assert!(matches!(next(&mut w).await, Event::Put(e) if e.mod_revision == r1));
    assert!(matches!(next(&mut w).await, Event::Put(e) if e.mod_revision == r3));
    // Then the future.
    let r4 = kv.delete("/w/a", Expect::Any).await.unwrap().unwrap();
    kv.put("/other", b"y".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    let r6 = kv
        .put("/w/c", b"3".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    assert_eq!(
        next(&mut w).await,
        Event::Delete {
            key: "/w/a".into(),
            revision: r4
        }
    );
    assert!(matches!(next(&mut w).await, Event::Put(e) if e.key == "/w/c" && e.mod_revision == r6));
    // From the middle: only what came after.
    let mut w = kv.watch("/w/", r3).await.unwrap();
    assert_eq!(next(&mut w).await.revision(), r4);
    assert_eq!(next(&mut w).await.revision(), r6);
}

async fn a_slow_watcher_misses_nothing<K: Kv>(kv: &K) {
    let mut w = kv.watch("/slow/", 0).await.unwrap();
    // More changes than the live channel holds, none read meanwhile.
    let n = 1500;
    for i in 0..n {
        kv.put(
            &format!("/slow/{}", i % 7),
            i.to_string().into_bytes(),
            Expect::Any,
            None,
        )
        .await
        .unwrap();
    }
    let mut last = 0;
    for i in 0..n {
        let e = next(&mut w).await;
        assert!(e.revision() > last, "out of order at {i}");
        last = e.revision();
        match e {
            Event::Put(entry) => assert_eq!(entry.value, i.to_string().into_bytes()),
            other => panic!("{other:?}"),
        }
    }
}

async fn racing_writers_lose_no_update<K: Kv + 'static>(kv: Arc<K>) {
    kv.put("/counter", b"0".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let e = kv.get("/counter").await.unwrap().unwrap();
                    let n: u64 = String::from_utf8(e.value).unwrap().parse().unwrap();
                    match kv
                        .put(
                            "/counter",
                            (n + 1).to_string().into_bytes(),
                            Expect::Revision(e.mod_revision),
                            None,
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let e = kv.get("/counter").await.unwrap().unwrap();
    assert_eq!(e.value, b"80");
}

async fn concurrent_writes_get_distinct_revisions_in_order<K: Kv + 'static>(kv: Arc<K>) {
    let mut w = kv.watch("/many/", 0).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let kv = kv.clone();
            tokio::spawn(async move {
                kv.put(&format!("/many/{i}"), vec![i as u8], Expect::Absent, None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for t in tasks {
        revisions.push(t.await.unwrap());
    }
    revisions.sort();
    assert_eq!(revisions, (1..=64).collect::<Vec<u64>>());
    for expected in 1..=64 {
        let e = next(&mut w).await;
        assert_eq!(e.revision(), expected);
        let Event::Put(entry) = e else { panic!() };
        assert_eq!(entry.key, format!("/many/{}", entry.value[0]));
    }
    assert_eq!(
        kv.list("/many/", None, 100).await.unwrap().entries.len(),
        64
    );
}

async fn leases_keep_keys_alive_and_take_them_away<K: Kv>(kv: &K) {
    let err = kv
        .put("/node/x", b"".to_vec(), Expect::Any, Some(LeaseId(999_999)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoLease(_)), "{err}");

    let lease = kv.grant(Duration::from_millis(600)).await.unwrap();
    kv.put("/node/a", b"up".to_vec(), Expect::Any, Some(lease))
        .await
        .unwrap();
    kv.put("/node/b", b"up".to_vec(), Expect::Any, Some(lease))
        .await
        .unwrap();
    let after = kv.revision().await.unwrap();
    let mut w = kv.watch("/node/", after).await.unwrap();
    // Kept alive past several TTLs...
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        kv.keep_alive(lease).await.unwrap();
    }
    assert!(
        kv.get("/node/a").await.unwrap().is_some(),
        "expired while kept alive"
    );
    // ...then left to expire: both keys go, at one revision.
    let e1 = next(&mut w).await;
    let e2 = next(&mut w).await;
    assert!(matches!(e1, Event::Delete { .. }) && matches!(e2, Event::Delete { .. }));
    assert_eq!(e1.revision(), e2.revision());
    assert!(kv.get("/node/a").await.unwrap().is_none());
    assert!(matches!(
        kv.keep_alive(lease).await.unwrap_err(),
        StoreError::NoLease(_)
    ));

    // Revoked: at once. A key moved to no lease survives it.
    let lease = kv.grant(Duration::from_secs(60)).await.unwrap();
    kv.put("/node/c", b"".to_vec(), Expect::Any, Some(lease))
        .await
        .unwrap();
    kv.put("/node/d", b"".to_vec(), Expect::Any, Some(lease))
        .await
        .unwrap();
    kv.put("/node/d", b"kept".to_vec(), Expect::Any, None)
        .await
        .unwrap();
    kv.revoke(lease).await.unwrap();
    assert!(kv.get("/node/c").await.unwrap().is_none());
    assert_eq!(kv.get("/node/d").await.unwrap().unwrap().value, b"kept");
    // A lease with no keys is revoked without a revision.
    let empty = kv.grant(Duration::from_secs(60)).await.unwrap();
    let before = kv.revision().await.unwrap();
    kv.revoke(empty).await.unwrap();
    assert_eq!(kv.revision().await.unwrap(), before);
}

async fn bad_keys_and_values_are_refused<K: Kv>(kv: &K) {
    let err = kv.put("", vec![], Expect::Any, None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid { what: "key", .. }),
        "{err}"
    );
    let long = "k".repeat(cove_store::MAX_KEY + 1);
    assert!(kv.get(&long).await.is_err());
    let big = vec![0u8; cove_store::MAX_VALUE + 1];
    let err = kv.put("/big", big, Expect::Any, None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid { what: "value", .. }),
        "{err}"
    );
    assert_eq!(kv.revision().await.unwrap(), 0);
}

/// A volatile write is a write like any other for every reader: revision, compare-and-swap,
/// watches; only its durability differs.
async fn volatile_writes_behave_like_writes<K: Kv>(kv: &K) {
    let r1 = kv
        .put("/v", b"1".to_vec(), Expect::Absent, None)
        .await
        .unwrap();
    let mut w = kv.watch("/v", r1).await.unwrap();
    let err = kv
        .put_volatile("/v", b"x".to_vec(), Expect::Revision(r1 + 7))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let r2 = kv
        .put_volatile("/v", b"2".to_vec(), Expect::Revision(r1))
        .await
        .unwrap();
    assert_eq!(r2, r1 + 1);
    assert_eq!(kv.get("/v").await.unwrap().unwrap().value, b"2");
    match next(&mut w).await {
        Event::Put(e) => assert_eq!((e.value.as_slice(), e.mod_revision), (&b"2"[..], r2)),
        e => panic!("{e:?}"),
    }
    assert!(kv.put_volatile("", vec![], Expect::Any).await.is_err());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let dir = Dir::new(stringify!($name));
            super::$name(&embedded(&dir).await).await;
        }
    )*};
}

mod embedded {
    use super::*;

    conformance!(
        revisions_count_every_write,
        writes_compare_and_swap,
        listing_is_by_prefix_in_order_and_paginated,
        watches_replay_then_follow_in_order,
        a_slow_watcher_misses_nothing,
        leases_keep_keys_alive_and_take_them_away,
        bad_keys_and_values_are_refused,
        volatile_writes_behave_like_writes,
    );

    /// A volatile write reaches the disk with the next durable one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn volatile_writes_are_kept_by_the_next_durable_write() {
        let dir = Dir::new("volatile");
        {
            let kv = embedded(&dir).await;
            kv.put_volatile("/v", b"1".to_vec(), Expect::Any)
                .await
                .unwrap();
            kv.put("/d", b"2".to_vec(), Expect::Any, None)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kv = embedded(&dir).await;
        assert_eq!(kv.get("/v").await.unwrap().unwrap().value, b"1");
        assert_eq!(kv.revision().await.unwrap(), 2);
    }

    /// The writer of `a_crash_keeps_volatile_writes_only_once_synced`, run in a child copy of
    /// this test binary: it writes as `COVE_STORE_CRASH` says, then aborts (no destructor runs,
    /// as in a `kill -9`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_writer() {
        let Ok(how) = std::env::var("COVE_STORE_CRASH") else {
            return;
        };
        let db = PathBuf::from(std::env::var("COVE_STORE_CRASH_DB").unwrap());
        let kv = Embedded::open(&db).await.unwrap();
        kv.put("/durable", b"d".to_vec(), Expect::Any, None)
            .await
            .unwrap();
        kv.put_volatile("/volatile", b"v".to_vec(), Expect::Any)
            .await
            .unwrap();
        if how == "sync" {
            kv.sync().await.unwrap();
        }
        std::process::abort();
    }

    /// A volatile write is lost in a crash unless `sync` came after it; `sync` with nothing
    /// volatile before it writes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_keeps_volatile_writes_only_once_synced() {
        for (how, kept) in [("sync", true), ("none", false)] {
            let dir = Dir::new("crash");
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "embedded::crash_writer", "--nocapture"])
                .env("COVE_STORE_CRASH", how)
                .env("COVE_STORE_CRASH_DB", dir.db())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!status.success(), "the writer was to abort");
            let kv = embedded(&dir).await;
            assert_eq!(kv.get("/durable").await.unwrap().unwrap().value, b"d");
            assert_eq!(kv.get("/volatile").await.unwrap().is_some(), kept, "{how}");
            assert_eq!(kv.revision().await.unwrap(), if kept { 2 } else { 1 });
            // Everything durable: nothing to commit, the revision stays.
            kv.sync().await.unwrap();
            assert_eq!(kv.revision().await.unwrap(), if kept { 2 } else { 1 });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_get_distinct_revisions_in_order() {
        let dir = Dir::new("concurrent");
        super::concurrent_writes_get_distinct_revisions_in_order(Arc::new(embedded(&dir).await))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writers_lose_no_update() {
        let dir = Dir::new("race");
        super::racing_writers_lose_no_update(Arc::new(embedded(&dir).await)).await;
    }

    /// What a restart keeps: entries, the revision, the log for watches, leases (with a fresh
    /// TTL).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_survives_a_reopen() {
        let dir = Dir::new("reopen");
        let (r2, lease) = {
            let kv = embedded(&dir).await;
            kv.put("/a", b"1".to_vec(), Expect::Any, None)
                .await
                .unwrap();
            let lease = kv.grant(Duration::from_secs(1)).await.unwrap();
            let r2 = kv
                .put("/leased", b"2".to_vec(), Expect::Any, Some(lease))
                .await
                .unwrap();
            (r2, lease)
        };
        // The expiry task holds only a weak handle: the file is free once the store is dropped.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kv = embedded(&dir).await;
        assert_eq!(kv.revision().await.unwrap(), r2);
        assert_eq!(kv.get("/a").await.unwrap().unwrap().value, b"1");
        let mut w = kv.watch("/", 0).await.unwrap();
        assert_eq!(next(&mut w).await.key(), "/a");
        assert_eq!(next(&mut w).await.key(), "/leased");
        kv.keep_alive(lease).await.unwrap();
        let r3 = kv
            .put("/b", b"3".to_vec(), Expect::Any, None)
            .await
            .unwrap();
        assert_eq!(r3, r2 + 1);
        assert_eq!(next(&mut w).await.key(), "/b");
        // Not kept alive any more: the leased key goes.
        let e = next(&mut w).await;
        assert_eq!(
            e,
            Event::Delete {
                key: "/leased".into(),
                revision: r3 + 1
            }
        );
    }
}
