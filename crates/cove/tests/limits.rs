//! Each limit ends (or contains) a real sandbox, with the right reason in `--json` and a plain
//! sentence on stderr.

mod common;

use common::{require_root, run};

fn report(args: &[&str]) -> (serde_json::Value, common::Out) {
    require_root();
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run(&all);
    (out.report(), out)
}

#[test]
fn memory_limit_kills_with_reason_memory_limit() {
    let (r, out) = report(&[
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "x = bytearray(256 * 1024 * 1024); print('survived')",
    ]);
    assert_eq!(r["reason"], "memory_limit", "{}", out.stderr);
    assert_eq!(r["exit_code"], 137);
    assert_eq!(r["signal"], 9);
    assert!(!out.stdout.contains("survived"));
    assert!(
        out.stderr
            .contains("cove: killed: memory limit 64M exceeded"),
        "{}",
        out.stderr
    );
    assert!(r["peak_memory_bytes"].as_u64().unwrap() <= 64 << 20);
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let (r, out) = report(&[
        "--pids",
        "16",
        "--timeout",
        "20s",
        "--",
        "sh",
        "-c",
        "for i in $(seq 1 100); do sleep 30 & done; wait",
    ]);
    assert_eq!(r["reason"], "pids_limit", "{}", out.stderr);
    assert!(
        out.stderr.contains("pids limit 16 reached"),
        "{}",
        out.stderr
    );
}

#[test]
fn timeout_kills_with_reason_timeout() {
    let (r, out) = report(&["--timeout", "500ms", "--", "sleep", "30"]);
    assert_eq!(r["reason"], "timeout");
    assert_eq!(r["exit_code"], 137);
    assert!(
        out.stderr.contains("cove: killed: timeout 500ms reached"),
        "{}",
        out.stderr
    );
    let wall = r["wall_time_ms"].as_f64().unwrap();
    assert!((500.0..20_000.0).contains(&wall), "wall time {wall}");
}

#[test]
fn cpu_time_limit_counts_every_process() {
    // Two busy processes: the sandbox-wide budget runs out after about half the wall time.
    let (r, out) = report(&[
        "--cpu-time",
        "1s",
        "--cpus",
        "2",
        "--timeout",
        "30s",
        "--",
        "sh",
        "-c",
        "(while :; do :; done) & while :; do :; done",
    ]);
    assert_eq!(r["reason"], "cpu_time_limit", "{}", out.stderr);
    assert!(
        out.stderr.contains("CPU-time limit 1s exceeded"),
        "{}",
        out.stderr
    );
    assert!(r["cpu_time_ms"].as_f64().unwrap() >= 1000.0);
}

#[test]
fn cpu_quota_throttles() {
    // At a quarter of a CPU, one second of CPU work takes about four seconds of wall time.
    let (r, out) = report(&[
        "--cpus",
        "0.25",
        "--cpu-time",
        "1s",
        "--timeout",
        "30s",
        "--",
        "sh",
        "-c",
        "while :; do :; done",
    ]);
    assert_eq!(r["reason"], "cpu_time_limit", "{}", out.stderr);
    assert!(r["wall_time_ms"].as_f64().unwrap() > 3000.0, "{r}");
}

#[test]
fn disk_limit_caps_the_writable_layer() {
    require_root();
    let out = run(&[
        "--disk",
        "8M",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/big bs=1M count=32 2>&1; echo dd=$?",
    ]);
    assert!(
        out.stdout.contains("No space left on device"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("dd=1"), "{}", out.stdout);
}

#[test]
fn fsize_limit_stops_large_files() {
    let (r, _) = report(&[
        "--fsize",
        "1M",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/tmp/big",
        "bs=1M",
        "count=4",
    ]);
    // SIGXFSZ ends dd.
    assert_eq!(r["signal"], 25);
    assert_eq!(r["exit_code"], 153);
}

#[test]
fn nofile_limit_applies() {
    require_root();
    let out = run(&["--nofile", "64", "--", "sh", "-c", "ulimit -n"]);
    assert_eq!(out.stdout.trim(), "64");
}

#[test]
fn limits_are_visible_in_the_cgroup_while_running() {
    require_root();
    common::become_subreaper();
    let run = common::Run::new(&["--memory", "96M", "--pids", "33", "--", "sleep", "5"]);
    let mut child = run.command().spawn().unwrap();
    // A `cove run` sandbox's cgroup is `cove-<id>`, at the root of each hierarchy.
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(format!("cove-{}", run.id));
    let v2 = std::path::Path::new("/sys/fs/cgroup").join(format!("cove-{}", run.id));
    let mut seen = false;
    // The cgroup exists a moment before its limits are written: a value still at the
    // kernel's default means "not yet".
    let set = |v: &str| !v.trim().starts_with("9223372036854") && v.trim() != "max";
    for _ in 0..200 {
        let pids = format!("/sys/fs/cgroup/pids/cove-{}/pids.max", run.id);
        // Memory is written first, pids last.
        if let Ok(v) = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
            && let Ok(p) = std::fs::read_to_string(&pids)
            && set(&v)
            && set(&p)
        {
            assert_eq!(v.trim(), (96u64 << 20).to_string());
            assert_eq!(p.trim(), "33");
            seen = true;
            break;
        }
        if let Ok(v) = std::fs::read_to_string(v2.join("memory.max"))
            && set(&v)
        {
            assert_eq!(v.trim(), (96u64 << 20).to_string());
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    common::reap_orphans(&run.id);
    assert!(seen, "the sandbox's cgroup never appeared");
    // `cove run` was SIGKILLed: the next reaper pass must leave nothing.
    let _gc = common::gc_lock(false);
    let gc = std::process::Command::new(common::cove_bin())
        .arg("gc")
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    common::assert_no_leaks(&run.id);
}
