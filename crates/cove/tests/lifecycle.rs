//! How a sandbox ends when the user stops it, and what is left when `cove run` itself dies.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    Run, assert_no_leaks, become_subreaper, cove_bin, gc_lock, reap_orphans, require_root,
};

fn signal(pid: u32, sig: i32) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits until the sandbox's cgroup exists, i.e. the sandbox is running.
fn wait_running(id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let v1 = format!("/sys/fs/cgroup/pids/cove-{id}/cgroup.procs");
        let v2 = format!("/sys/fs/cgroup/cove-{id}/cgroup.procs");
        for f in [v1, v2] {
            if std::fs::read_to_string(&f).is_ok_and(|s| s.lines().count() >= 2) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("sandbox {id} did not start");
}

/// Runs `cmd`, waits until it prints `ready` (so that its signal handlers are in place), sends
/// `sig` to `cove run`, and returns the exit code, the JSON report and everything printed.
fn stop_with(sig: i32, cmd: &[&str]) -> (i32, serde_json::Value, String) {
    use std::io::{BufRead, BufReader, Read};
    require_root();
    let mut args = vec!["--json", "--"];
    args.extend_from_slice(cmd);
    let run = Run::new(&args);
    let mut child = run
        .command()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    while !seen.ends_with("ready\n") {
        assert!(
            stdout.read_line(&mut seen).unwrap() > 0,
            "no 'ready': {seen:?}"
        );
    }
    signal(child.id(), sig);
    stdout.read_to_string(&mut seen).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_no_leaks(&run.id);
    let report = serde_json::from_str(seen.lines().last().unwrap()).unwrap();
    (status.code().unwrap(), report, stderr + &seen)
}

#[test]
fn ctrl_c_stops_the_command_with_reason_killed() {
    let (code, r, out) = stop_with(libc::SIGINT, &["sh", "-c", "echo ready; exec sleep 30"]);
    assert_eq!(code, 130, "{out}");
    assert_eq!(r["reason"], "killed");
    assert_eq!(r["signal"], 2);
    assert!(out.contains("stopped by SIGINT"), "{out}");
}

#[test]
fn sigterm_is_forwarded_and_the_command_may_exit_cleanly() {
    let (code, r, out) = stop_with(
        libc::SIGTERM,
        &[
            "sh",
            "-c",
            "trap 'echo cleaned-up; exit 3' TERM; echo ready; sleep 30 & wait",
        ],
    );
    assert_eq!(code, 3, "{out}");
    assert_eq!(r["reason"], "killed");
    assert!(out.contains("cleaned-up"), "{out}");
}

#[test]
fn background_processes_die_with_the_command() {
    require_root();
    let out = Run::new(&["--", "sh", "-c", "sleep 1000 & sleep 1000 & echo started"]).output();
    assert_eq!(out.stdout, "started\n");
    // Run::output already asserted that no process of the sandbox is left.
}

#[test]
fn a_killed_supervisor_leaves_nothing_after_gc() {
    require_root();
    become_subreaper();
    let run = Run::new(&["--", "sh", "-c", "sleep 1000 & sleep 1000"]);
    let mut child = run.command().spawn().unwrap();
    wait_running(&run.id);
    child.kill().unwrap();
    child.wait().unwrap();
    reap_orphans(&run.id);
    // The sandbox's init dies with its supervisor (parent-death signal), taking every process
    // of its pid namespace with it; the cgroup and lock file wait for the reaper.
    let _gc = gc_lock(false);
    let out = Command::new(cove_bin())
        .args(["gc", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["failed"].as_array().unwrap().is_empty(), "{report}");
    // Another test's reaper pass may have won the race; either way nothing may remain.
    assert_no_leaks(&run.id);
}

#[test]
fn the_next_run_reaps_what_a_killed_supervisor_left() {
    require_root();
    become_subreaper();
    let victim = Run::new(&["--", "sleep", "1000"]);
    let mut child = victim.command().spawn().unwrap();
    wait_running(&victim.id);
    child.kill().unwrap();
    child.wait().unwrap();
    reap_orphans(&victim.id);
    let out = Run::new(&["--", "true"]).output();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_no_leaks(&victim.id);
}

#[test]
fn gc_never_touches_a_live_sandbox() {
    require_root();
    let run = Run::new(&["--", "sh", "-c", "sleep 2; echo alive"]);
    let child = run.command().stdout(Stdio::piped()).spawn().unwrap();
    wait_running(&run.id);
    let _gc = gc_lock(false);
    let gc = Command::new(cove_bin())
        .args(["gc", "--json"])
        .output()
        .unwrap();
    assert!(gc.status.success());
    assert!(
        !String::from_utf8_lossy(&gc.stdout).contains(&run.id),
        "gc removed a live sandbox"
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    assert_no_leaks(&run.id);
}

#[test]
fn many_sandboxes_in_parallel_are_independent() {
    require_root();
    let runs: Vec<Run> = (0..8)
        .map(|i| {
            Run::new(&[
                "--",
                "sh",
                "-c",
                &format!("echo {i} > /tmp/n; sleep 0.2; cat /tmp/n"),
            ])
        })
        .collect();
    let children: Vec<_> = runs
        .iter()
        .map(|r| r.command().stdout(Stdio::piped()).spawn().unwrap())
        .collect();
    for (i, (child, run)) in children.into_iter().zip(&runs).enumerate() {
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), i.to_string());
        assert_no_leaks(&run.id);
    }
}

#[test]
fn the_resident_init_is_a_few_pages_and_reaps_orphans() {
    require_root();
    // An orphan (its parent subshell exits at once) is reparented to init, which must reap it
    // when it ends: no zombie may remain.
    let run = Run::new(&[
        "--",
        "sh",
        "-c",
        "(sleep 0.1 &); sleep 0.6; cat /proc/1/comm; \
         grep -E 'VmRSS|RssAnon|VmStk|VmPTE' /proc/1/status; cat /proc/[0-9]*/stat",
    ]);
    let out = run.output();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut lines = out.stdout.lines();
    let comm = lines.next().unwrap();
    let expected: String = format!("cove-{}", run.id).chars().take(15).collect();
    assert_eq!(comm, expected, "pid 1 is not the resident init");
    // `/proc/1/status` lists them in this order (its maps are not readable: init is not
    // dumpable).
    let mut kib = |name: &str| -> u64 {
        let line = lines.next().unwrap();
        assert!(line.starts_with(name), "{line}");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (rss, anon, stack, pte) = (kib("VmRSS"), kib("RssAnon"), kib("VmStk"), kib("VmPTE"));
    assert!(rss <= 64, "the resident init holds {rss} KiB");
    // One writable page of its own, and its image alone mapped (no kernel stack, no vDSO):
    // one page-table chain.
    assert!(
        anon <= 4,
        "the resident init has {anon} KiB of its own pages"
    );
    assert_eq!(stack, 0, "the resident init kept the kernel's stack");
    assert!(pte <= 16, "the resident init's page tables take {pte} KiB");
    for stat in lines {
        assert!(!stat.contains(") Z "), "a zombie was left: {stat}");
    }
}

#[test]
fn init_leaves_the_cgroup_so_that_it_is_removed_while_init_exits() {
    require_root();
    let v1 = cove_jail::cgroup::Hierarchy::detect()
        .expect("detect the cgroup hierarchy")
        .version()
        == cove_jail::cgroup::Version::V1;
    // The first init (a command that ends at once) and the resident init (one that outlives
    // the first init's 20 ms) both leave the cgroup before they exit, on v1, and the
    // supervisor removes it then (`uncgrouped` in the timing line).
    for cmd in [&["true"][..], &["sleep", "0.1"]] {
        let out = Run::new(&[&["--timing", "--"][..], cmd].concat()).output();
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(
            out.stderr.contains(" uncgrouped="),
            v1,
            "{cmd:?}: {}",
            out.stderr
        );
    }
    // An orphan of the command keeps the cgroup until init's exit kills it: the cgroup is then
    // removed after that exit, as on v2, and nothing is left (`Run::output` checks).
    let started = Instant::now();
    let out = Run::new(&["--timing", "--", "sh", "-c", "sleep 30 & exit 0"]).output();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stderr.contains(" uncgrouped="), "{}", out.stderr);
    assert!(started.elapsed() < Duration::from_secs(10));
}
