//! What `cove serve` removes on its own and how it ends: the background reaper removes stale
//! host objects planted beside a live sandbox (and not the live sandbox's), reports them in
//! its logs and metrics; `--on-shutdown stop` stops every sandbox with reason
//! `server_shutdown` and refuses new ones meanwhile.

mod common;
mod server_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::require_root;
use server_support::{Server, sample, scrape};

/// Makes cgroup `name` (`cove/<id>` of a server, `cove-<id>` of `cove run`) in every
/// controller and puts `pid` in it; its directories.
fn plant_cgroup(name: &str, pid: u32) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let dirs: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.join(name)]
    } else {
        ["memory", "pids", "cpu", "freezer"]
            .iter()
            .map(|c| root.join(c))
            .filter(|c| c.exists())
            .map(|c| c.join(name))
            .collect()
    };
    assert!(!dirs.is_empty());
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    dirs
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().unwrap().success();
    assert!(ok, "ip {args:?}");
}

#[test]
fn the_reaper_removes_planted_stale_objects_and_never_a_live_sandbox() {
    require_root();
    // No `cove gc` of another test takes what is planted here.
    let _gc = common::gc_lock(true);
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let server = Server::start_with(data.clone(), &["--reap-interval", "1s"]);
    // A live sandbox with every kind of object: lock file, cgroup, veth.
    let live = server.create(&["--net", "egress", "--", "sleep", "300"]);
    server.wait_for_state(&live, "running");

    // Stale cgroups with a process in each: a server sandbox's and a `cove run` one's.
    let (cg_id, veth_id, dir_id) = (common::new_id(), common::new_id(), common::new_id());
    let run_id = common::new_id();
    let orphan = || {
        Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut orphans = [orphan(), orphan()];
    let mut cgroups = plant_cgroup(&format!("cove/{cg_id}"), orphans[0].id());
    cgroups.extend(plant_cgroup(&format!("cove-{run_id}"), orphans[1].id()));
    // A veth named for a sandbox that does not exist.
    let veth = format!("cv{veth_id}");
    ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        &format!("cx{veth_id}"),
    ]);
    // A sandbox directory whose record is gone.
    let dir = data.join("sandboxes").join(&dir_id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("stdout.log"), "left behind\n").unwrap();

    let deadline = Instant::now() + Duration::from_secs(15);
    let gone = || {
        cgroups.iter().all(|d| !d.exists())
            && !Path::new(&format!("/sys/class/net/{veth}")).exists()
            && !dir.exists()
    };
    while !gone() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(gone(), "the reaper left planted objects:\n{}", server.log());
    for orphan in &mut orphans {
        let status = orphan.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the stale cgroup's process was killed"
        );
    }

    // It said so, in its logs and its metrics. A pass logs what it removed once it is over,
    // after its last removal: the lines may come a moment after the objects went.
    let objects = [
        format!("cove/{cg_id} (killed 1 processes)"),
        format!("cove-{run_id} (killed 1 processes)"),
        format!("veth {veth}"),
        format!("{dir_id} (no record)"),
    ];
    let said = |log: &str, object: &str| {
        log.lines()
            .any(|l| l.contains("reaper removed a stale object") && l.contains(object))
    };
    let mut log = server.log();
    while !objects.iter().all(|o| said(&log, o)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        log = server.log();
    }
    for object in &objects {
        assert!(said(&log, object), "no log line for {object}:\n{log}");
    }
    // The counters move right after the lines are written.
    let removed = |m: &std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>>,
                   object: &str| {
        sample(
            m,
            "cove_reaper_removed_total",
            serde_json::json!({ "object": object }),
        )
    };
    let kinds = ["process", "cgroup", "veth", "sandbox_dir"];
    let (_, mut m) = scrape(&server, &server.token);
    while kinds.iter().any(|k| removed(&m, k) < 1.0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        m = scrape(&server, &server.token).1;
    }
    assert!(sample(&m, "cove_reaper_runs_total", serde_json::json!({})) >= 1.0);
    for object in kinds {
        let n = removed(&m, object);
        assert!(n >= 1.0, "{object}: {n}");
    }

    // The live sandbox kept everything.
    assert_eq!(server.inspect(&live)["state"], "running");
    let out = server.cove(&["exec", &live, "--", "echo", "alive"]);
    assert_eq!(out.stdout, "alive\n", "{}", out.stderr);
    assert!(Path::new(&format!("/sys/class/net/cv{live}")).exists());
    assert!(Path::new(&format!("/run/cove/{live}")).exists());
    assert!(
        !log.lines()
            .any(|l| l.contains("reaper") && l.contains(&live)),
        "the reaper touched the live sandbox:\n{log}"
    );
    server.cove(&["rm", "-f", &live]);
    common::assert_no_leaks(&live);
    for id in [&cg_id, &run_id, &veth_id, &dir_id] {
        common::assert_no_leaks(id);
    }
}

#[test]
fn on_shutdown_stop_ends_every_sandbox_with_its_reason() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let mut server = Server::start_with(data.clone(), &["--on-shutdown", "stop"]);
    let quick = server.create(&["--", "sleep", "300"]);
    // Ignores SIGTERM: ends only when the supervisor's stop grace (10 s) runs out.
    let stubborn = server.create(&["--", "sh", "-c", "trap '' TERM; sleep 300"]);
    let paused = server.create(&["--", "sleep", "300"]);
    for id in [&quick, &stubborn, &paused] {
        server.wait_for_state(id, "running");
    }
    assert_eq!(server.cove(&["pause", &paused]).code, 0);
    server.wait_for_state(&paused, "paused");

    let (api, token) = (server.url.clone(), server.token.clone());
    let terminated = std::thread::spawn(move || {
        let status = server.terminate();
        (server, status)
    });
    // While it drains: not ready, and no new sandbox.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = None;
    while refused.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let ready = curl_status(&format!("{api}/readyz"), None, None);
        if ready == 503 {
            let create = curl_status(
                &format!("{api}/v1/sandboxes"),
                Some(&token),
                Some(r#"{"cmd":["true"]}"#),
            );
            refused = Some((ready, create));
        }
    }
    assert_eq!(refused, Some((503, 503)), "not draining");
    let (mut server, status) = terminated.join().unwrap();
    assert!(status.success(), "{status:?}");
    for id in [&quick, &stubborn, &paused] {
        common::reap_orphans(id);
        common::assert_no_leaks(id);
    }
    // The records say why, to the next server.
    drop(std::mem::replace(&mut server, Server::start_in(data)));
    for id in [&quick, &stubborn, &paused] {
        let v = server.inspect(id);
        assert_eq!(
            (v["state"].as_str(), v["reason"].as_str()),
            (Some("exited"), Some("server_shutdown")),
            "{v}"
        );
        assert!(
            v["message"].as_str().unwrap().contains("server shut down"),
            "{v}"
        );
    }
}

fn curl_status(url: &str, token: Option<&str>, body: Option<&str>) -> u16 {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
    if let Some(t) = token {
        c.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    if let Some(b) = body {
        c.args([
            "-H",
            "Content-Type: application/json",
            "-X",
            "POST",
            "-d",
            b,
        ]);
    }
    let out = c.arg(url).output().unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}
