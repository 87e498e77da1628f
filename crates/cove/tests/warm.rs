//! The warm pool of `cove serve`: sandboxes started ahead of creates, taken by those that fit,
//! replaced as they go, and removed with nothing left when the server goes.

mod common;
mod server_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::require_root;
use server_support::{Server, sample, scrape};

/// The sandbox directories under the server's data directory.
fn sandbox_dirs(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(data.join("sandboxes"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() == 12)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the pool has `n` members ready; their ids (the only sandbox directories
/// besides those in `besides`).
fn ready_members(server: &Server, n: f64, besides: &BTreeSet<String>) -> BTreeSet<String> {
    ready_in(server, "host", n, besides)
}

/// [`ready_members`] of the pool of `image`.
fn ready_in(server: &Server, image: &str, n: f64, besides: &BTreeSet<String>) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = scrape(server, &server.token);
        let ready = sample(
            &m,
            "cove_warm_pool_ready",
            serde_json::json!({ "image": image }),
        );
        if ready == n {
            return sandbox_dirs(&server.data)
                .difference(besides)
                .cloned()
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "the pool has {ready} ready, not {n}: {}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes named (`comm`) `name`, as `pid: name`.
fn processes_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim_end() == name)
                .then(|| format!("{}: {name}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Processes whose command line names `needle` (the server's spawner names its sandboxes'
/// directory, and so does every process it forks: supervisors, and warm sandboxes' children).
fn processes_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(needle)
                .then(|| format!("{}: {cmdline}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// The one process of a ready member (`pid: command line`): the sandbox's waiting child, once
/// its supervisor has handed it over and exited.
fn waiting_process(member: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let name: String = format!("cove-{member}").chars().take(15).collect();
        let mut procs = processes_named(&name);
        if procs.len() == 1 {
            return procs.remove(0);
        }
        assert!(Instant::now() < deadline, "{procs:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The nice value of process `pid` (the 19th field of its `stat`, counted after its name).
fn nice_of(pid: &str) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(16)?.parse().ok()
}

#[test]
fn a_warm_pool_serves_the_creates_that_fit_and_leaves_nothing_behind() {
    require_root();
    let server = Server::start_with(
        std::env::temp_dir().join(format!("cove-warm-{}", common::new_id())),
        &["--warm-pool", "2"],
    );
    let none = BTreeSet::new();
    let warm = ready_members(&server, 2.0, &none);
    assert_eq!(warm.len(), 2, "{warm:?}");
    // A ready member is one process, the sandbox's waiting child (its supervisor handed it
    // over and exits), and it yields the CPU to the work someone waits for.
    for member in &warm {
        let p = waiting_process(member);
        let pid = p.split(':').next().unwrap();
        assert_eq!(nice_of(pid), Some(10), "{p}");
    }

    // A create refused (over its tenant's quota) gives the member it took back.
    let small = server
        .tenant(r#"{"name":"small","quotas":{"sandboxes":5,"memory":"64M","cpus_millis":500}}"#);
    let out = server.cove_as(&small, &["create", "--", "sleep", "1000"]);
    assert!(out.stderr.contains("HTTP 429"), "{}", out.stderr);
    assert_eq!(ready_members(&server, 2.0, &none), warm);

    // A create that fits takes a member: its id is one of theirs, and it runs with its own
    // command, environment, working directory and limits, contained like any sandbox.
    let id = server.create(&[
        "-e",
        "GREETING=warm",
        "-w",
        "/tmp",
        "--memory",
        "64M",
        "--pids",
        "40",
        "--nofile",
        "77",
        "--",
        "sh",
        "-c",
        "echo $GREETING; pwd; hostname; id -u; ulimit -n; cut -d' ' -f19 /proc/self/stat; \
         grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; sleep 1000",
    ]);
    assert!(warm.contains(&id), "{id} is not one of {warm:?}");
    let v = server.wait_for_state(&id, "running");
    assert_eq!(v["state"], "running", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let logs = loop {
        let out = server.cove(&["logs", &id]);
        if out.stdout.contains("Seccomp") || Instant::now() > deadline {
            break out.stdout;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        logs,
        // Members are built at a lower priority; the claimed command runs at the ordinary one.
        format!(
            "warm\n/tmp\n{id}\n0\n77\n0\nCapEff:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n"
        ),
        "{}",
        server.log()
    );
    let memory = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/cove/{id}/memory.limit_in_bytes"
    ))
    .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/cove/{id}/memory.max")))
    .unwrap();
    assert_eq!(memory.trim(), (64u64 << 20).to_string());
    let pids = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/cove/{id}/pids.max"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/cove/{id}/pids.max")))
        .unwrap();
    assert_eq!(pids.trim(), "40");
    // Exec runs with the claimed spec's environment and working directory.
    let out = server.cove(&["exec", &id, "--", "sh", "-c", "echo $GREETING; pwd"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "warm\n/tmp\n"),
        "{}",
        out.stderr
    );

    // One that does not fit (another user: the root filesystem's /etc and home differ)
    // starts cold, and runs as it asked.
    let cold = server.create(&["-u", "1000", "--", "sh", "-c", "id -u; sleep 1000"]);
    assert!(!warm.contains(&cold), "{cold} came from the pool");
    server.wait_for_state(&cold, "running");

    // The member taken is replaced.
    let live: BTreeSet<String> = [id.clone(), cold.clone()].into();
    let refilled = ready_members(&server, 2.0, &live);
    assert_eq!(refilled.len(), 2, "{refilled:?}");
    assert_eq!(
        refilled.intersection(&warm).count(),
        1,
        "{refilled:?} {warm:?}"
    );
    let (_, m) = scrape(&server, &server.token);
    assert_eq!(
        sample(
            &m,
            "cove_warm_pool_taken_total",
            serde_json::json!({ "image": "host" })
        ),
        1.0
    );

    let members: Vec<&String> = warm.iter().chain(&refilled).collect();
    end_everything(server, &[&id, &cold], &members);
}

#[test]
fn a_member_that_dies_is_replaced_and_a_stopped_server_removes_its_members() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-warm-{}", common::new_id()));
    let mut server = Server::start_with(data.clone(), &["--warm-pool", "2"]);
    let none = BTreeSet::new();
    let warm = ready_members(&server, 2.0, &none);
    let victim = warm.iter().next().unwrap().clone();
    // Killed while it waits (its one process once its supervisor has handed it over): it is
    // removed whole, and another takes its place.
    let pid: i32 = waiting_process(&victim)
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    common::signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandbox_dirs(&data).contains(&victim) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !sandbox_dirs(&data).contains(&victim),
        "{victim} is still there: {}",
        server.log()
    );
    common::assert_no_leaks(&victim);
    let members = ready_members(&server, 2.0, &none);
    assert!(!members.contains(&victim), "{members:?}");
    assert!(
        server
            .log()
            .contains("a warm sandbox ended before it was claimed"),
        "{}",
        server.log()
    );

    // Stopped (SIGTERM), the server removes its members before it exits.
    assert!(server.terminate().success());
    assert_eq!(sandbox_dirs(&data), BTreeSet::new());
    assert_eq!(
        processes_naming(&data.to_string_lossy()),
        Vec::<String>::new()
    );
    for m in warm.iter().chain(&members) {
        common::assert_no_leaks(m);
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Removes the sandboxes `made` (ended like any other), then kills the server: its members
/// end (each one's child reads the end of its claim pipe), and the next start removes what is
/// left of them, directories included. Nothing of any of them (`members` are every member the
/// test saw) may remain.
fn end_everything(mut server: Server, made: &[&String], members: &[&String]) {
    for s in made {
        assert_eq!(server.cove(&["rm", "-f", s]).code, 0);
    }
    // `rm` answers once the record is gone; the agent removes the directory right after.
    let data = server.data.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while made.iter().any(|s| sandbox_dirs(&data).contains(*s)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_naming(&data.to_string_lossy()).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        processes_naming(&data.to_string_lossy()),
        Vec::<String>::new()
    );
    let mut next = Server::start_in(data.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sandbox_dirs(&data).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(next.terminate().success());
    assert_eq!(sandbox_dirs(&data), BTreeSet::new(), "{}", next.log());
    assert_eq!(
        processes_naming(&data.to_string_lossy()),
        Vec::<String>::new()
    );
    for s in members.iter().chain(made) {
        common::reap_orphans(s);
        common::assert_no_leaks(s);
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Imports the busybox image `img` as `name` (again: the name then moves to it).
fn import(img: &common::images::Rootfs, name: &str) {
    let layout = common::images::oci_layout(img, name);
    let out = std::process::Command::new(common::cove_bin())
        .args(["image", "import"])
        .arg(&layout)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&layout);
    assert!(out.status.success(), "{out:?}");
}

/// The whole output of sandbox `id` once it has ended.
fn output_of(server: &Server, id: &str) -> String {
    server.wait_for_state(id, "exited");
    server.cove(&["logs", id]).stdout
}

#[test]
fn a_stored_image_has_a_warm_pool_of_its_own() {
    require_root();
    let img = common::images::Rootfs::new();
    std::fs::create_dir_all(img.0.join("srv")).unwrap();
    let name = format!("cove-test/warm-{}:v1", common::new_id());
    import(&img, &name);
    let _image = Imported(name.clone());
    let pool = format!("{name}=1");
    let server = Server::start_with(
        std::env::temp_dir().join(format!("cove-warm-{}", common::new_id())),
        &["--warm-pool", "0", "--warm-image", &pool],
    );
    let warm = ready_in(&server, &name, 1.0, &BTreeSet::new());

    // The image's own command, environment and working directory, as a cold start gives them.
    let id = server.create(&["--image", &name]);
    assert!(warm.contains(&id), "{id} is not one of {warm:?}");
    assert_eq!(output_of(&server, &id), "from-cmd hello\n/srv\n");

    // Its replacement takes a command of its own, over the image's environment and directory.
    let refilled = ready_in(&server, &name, 1.0, &[id.clone()].into());
    let own = server.create(&[
        "--image",
        &name,
        "-e",
        "GREETING=hi",
        "--",
        "/bin/sh",
        "-c",
        "echo $GREETING; pwd; cat /etc/motd",
    ]);
    assert!(refilled.contains(&own), "{own} is not one of {refilled:?}");
    assert_eq!(output_of(&server, &own), "hi\n/srv\nimage file\n");

    // The name moves to another image (imported again): the member built on the old one is
    // not used; the create that took it starts cold, on the new image, and the pool goes on.
    let ended: BTreeSet<String> = [id.clone(), own.clone()].into();
    let stale = ready_in(&server, &name, 1.0, &ended);
    std::fs::write(img.0.join("etc/motd"), "another image\n").unwrap();
    import(&img, &name);
    let recold = server.create(&["--image", &name, "--", "cat", "/etc/motd"]);
    assert!(stale.contains(&recold), "{recold} did not take {stale:?}");
    assert_eq!(output_of(&server, &recold), "another image\n");
    assert!(
        server
            .log()
            .contains("no longer fits its image: started cold instead"),
        "{}",
        server.log()
    );
    let ended: BTreeSet<String> = [id.clone(), own.clone(), recold.clone()].into();
    let fresh = ready_in(&server, &name, 1.0, &ended);
    let moved = server.create(&["--image", &name, "--", "cat", "/etc/motd"]);
    assert!(fresh.contains(&moved), "{moved} is not one of {fresh:?}");
    assert_eq!(output_of(&server, &moved), "another image\n");
    let (_, m) = scrape(&server, &server.token);
    let taken = |image: &str| {
        sample(
            &m,
            "cove_warm_pool_taken_total",
            serde_json::json!({ "image": image }),
        )
    };
    // The member not used counts: the create took it.
    assert_eq!((taken(&name), taken("host")), (4.0, 0.0));

    // The host image has no pool on this server: its creates start cold.
    let cold = server.create(&["--", "true"]);
    assert!(!warm.contains(&cold) && !refilled.contains(&cold));

    let members: Vec<&String> = warm.iter().chain(&refilled).chain(&fresh).collect();
    end_everything(server, &[&id, &own, &recold, &moved, &cold], &members);
}

/// An image imported into the host's store for a test, removed when dropped: whether the test
/// passed or failed (a failed one left it in the store for good).
struct Imported(String);

impl Drop for Imported {
    fn drop(&mut self) {
        let rm = std::process::Command::new(common::cove_bin())
            .args(["image", "rm", &self.0])
            .output()
            .unwrap();
        // Not a second panic while the test's own unwinds.
        if !std::thread::panicking() {
            assert!(rm.status.success(), "{rm:?}");
        }
    }
}
