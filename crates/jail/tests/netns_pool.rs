//! The network-namespace pool against the real kernel: fill, claim, drain.

use std::path::PathBuf;

use cove_jail::netns;

fn state_root() -> PathBuf {
    let pid = std::process::id();
    std::env::temp_dir().join(format!("cove-netns-test-{pid}"))
}

fn mounts_under(dir: &std::path::Path) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.display().to_string();
    info.lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&d)))
        .count()
}

#[test]
fn the_pool_fills_hands_out_distinct_namespaces_and_drains() {
    let root = state_root();
    std::fs::create_dir_all(&root).unwrap();
    let own = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let added = netns::refill(&root).unwrap();
    assert_eq!(added, netns::POOL_TARGET);
    assert_eq!(mounts_under(&netns::pool_dir(&root)), netns::POOL_TARGET);
    // A full pool is left alone.
    assert_eq!(netns::refill(&root).unwrap(), 0);

    let first = netns::take_or_create(&root).unwrap();
    let a = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let second = netns::take_or_create(&root).unwrap();
    let b = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(a, own);
    assert_ne!(a, b, "two claims returned the same namespace");
    assert_eq!(
        mounts_under(&netns::pool_dir(&root)),
        0,
        "claimed entries stay mounted"
    );
    // Empty pool: created on the spot, configured the same way (loopback up, so that
    // 127.0.0.1 is an address of this namespace; the sysctls are written later, through the
    // sandbox's own procfs: the containment tests bind port 80 from inside).
    let third = netns::take_or_create(&root).unwrap();
    let c = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    assert_ne!(c, b);
    std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback is down");
    drop((first, second, third));

    netns::refill(&root).unwrap();
    assert_eq!(netns::drain(&root), netns::POOL_TARGET);
    assert_eq!(mounts_under(&root), 0);
    std::fs::remove_dir_all(&root).unwrap();
}
