//! `cove serve` end to end: a real server on loopback with its own data directory, driven by
//! the `cove` client commands and by curl for raw HTTP; real sandboxes behind it.

mod common;
mod server_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::require_root;
use server_support::{Server, sample, scrape};

/// The `/proc/<pid>/stat` lines of the processes whose parent is `ppid`.
fn children_of(ppid: u32) -> Vec<String> {
    let ppid = ppid.to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // After the parenthesised name: state, then the parent's pid.
            let rest: Vec<&str> = stat
                .rsplit_once(')')
                .map_or("", |r| r.1)
                .split_whitespace()
                .collect();
            rest.get(1) == Some(&ppid.as_str())
        })
        .collect()
}

/// The pid of the server's spawner (`cove spawner`, which forks its supervisors).
fn spawner_of(server: &Server) -> Option<u32> {
    children_of(server.pid()).iter().find_map(|stat| {
        let pid: u32 = stat.split(' ').next()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline
            .split(|&b| b == 0)
            .any(|a| a == b"spawner")
            .then_some(pid)
    })
}

/// The `/proc/<pid>/stat` lines of the server's children, and its spawner's, that are
/// zombies.
fn zombie_children(server: &Server) -> Vec<String> {
    let zombie = |stat: &String| stat.rsplit_once(") ").is_some_and(|r| r.1.starts_with('Z'));
    let mut all = children_of(server.pid());
    all.extend(spawner_of(server).map(children_of).unwrap_or_default());
    all.into_iter().filter(zombie).collect()
}

#[test]
fn supervisors_are_collected_once_their_sandboxes_run() {
    require_root();
    let server = Server::start();
    let ids: Vec<String> = (0..4)
        .map(|_| server.create(&["--", "sleep", "1000"]))
        .collect();
    // Forked by the server's spawner (not started by the server itself). Killed, it is
    // replaced at the next start, which goes on as before.
    let spawner = spawner_of(&server).expect("the server has a spawner");
    common::signal(spawner as i32, libc::SIGKILL);
    let after = server.create(&["--", "sleep", "1000"]);
    let replaced = spawner_of(&server).expect("the server has a spawner again");
    assert_ne!(replaced, spawner);
    assert!(
        server.log().contains("the spawner is gone"),
        "{}",
        server.log()
    );
    let ids: Vec<String> = ids.into_iter().chain([after]).collect();
    // Each supervisor exits once its sandbox runs; the agent collects it at its next poll
    // (every 200 ms), none may be left a zombie.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !zombie_children(&server).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(zombie_children(&server), Vec::<String>::new());
    for id in &ids {
        assert_eq!(server.cove(&["rm", "-f", id]).code, 0);
    }
}

#[test]
fn create_wait_inspect_list_and_remove() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--label",
        "user_id=42",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    let other = server.create(&["--label", "user_id=43", "--", "true"]);

    let out = server.cove(&["wait", &id]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (3, "3\n"),
        "{}",
        out.stderr
    );
    // What holds tokens and specs (environment values may be secrets) is root's alone.
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin-token", "state.redb", "sandboxes"] {
        let mode = std::fs::metadata(server.data.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is open to others: {mode:o}");
    }
    let v = server.inspect(&id);
    assert_eq!(v["state"], "exited");
    assert_eq!(v["reason"], "exited");
    assert_eq!(v["exit_code"], 3);
    assert_eq!(v["labels"]["user_id"], "42");
    assert!(v["report"]["wall_time_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v.get("tenant").is_none(),
        "internal fields are not shown: {v}"
    );
    let dir = server.data.join("sandboxes").join(&id);
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "hi\n"
    );
    assert!(
        std::fs::read_to_string(dir.join("stderr.log"))
            .unwrap()
            .contains("oops")
    );

    assert_eq!(server.cove(&["wait", &other]).code, 0);
    let ls = server.cove(&["ls"]);
    assert!(
        ls.stdout.contains(&id) && ls.stdout.contains(&other),
        "{}",
        ls.stdout
    );
    assert!(ls.stdout.contains("exited (3)"), "{}", ls.stdout);
    let ls = server.cove(&["ls", "--label", "user_id=42", "--json"]);
    assert_eq!(ls.stdout.lines().count(), 1, "{}", ls.stdout);
    assert!(ls.stdout.contains(&id));

    let out = server.cove(&["rm", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cove(&["inspect", &id]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(&format!("no sandbox {id}")),
        "{}",
        out.stderr
    );
    assert!(!dir.exists(), "the sandbox's files outlived it");
    common::assert_no_leaks(&id);
}

#[test]
fn stop_and_force_remove_running_sandboxes() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "300"]);
    server.wait_for_state(&id, "running");
    let out = server.cove(&["rm", &id]);
    assert_eq!(out.code, 125);
    // In the CLI's words, not the API's (`force=true`).
    assert!(
        out.stderr.contains("is running: stop it first (cove stop")
            && out.stderr.contains(&format!("cove rm -f {id}")),
        "{}",
        out.stderr
    );

    // An id that fails does not keep the next from being stopped (as `docker stop a b`).
    let out = server.cove(&["stop", "abcdefabcdef", &id]);
    assert_eq!(out.code, 125, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{id}\n"), "{}", out.stderr);
    assert!(
        out.stderr.contains("no sandbox abcdefabcdef"),
        "{}",
        out.stderr
    );
    let out = server.cove(&["wait", &id]);
    assert_eq!(out.stdout, "143\n", "{}", out.stderr);
    let v = server.inspect(&id);
    assert_eq!(v["reason"], "killed", "{v}");
    common::reap_orphans(&id);
    common::assert_no_leaks(&id);

    let id2 = server.create(&["--", "sleep", "300"]);
    server.wait_for_state(&id2, "running");
    let out = server.cove(&["rm", "-f", &id2]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_ne!(server.cove(&["inspect", &id2]).code, 0);
    common::reap_orphans(&id2);
    common::assert_no_leaks(&id2);
}

#[test]
fn a_tenant_never_sees_another_tenants_sandboxes() {
    require_root();
    let server = Server::start();
    let (code, a) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"alice"}"#),
    );
    assert_eq!(code, 201, "{a}");
    let (_, b) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"bob"}"#),
    );
    let (alice, bob) = (a["token"].as_str().unwrap(), b["token"].as_str().unwrap());

    let out = server.cove_as(alice, &["create", "--", "sleep", "300"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let id = out.stdout.trim().to_string();
    for args in [
        vec!["inspect", &id],
        vec!["stop", &id],
        vec!["rm", "-f", &id],
        vec!["wait", &id],
    ] {
        let out = server.cove_as(bob, &args);
        assert_ne!(out.code, 0, "{args:?}");
        assert!(
            out.stderr.contains(&format!("no sandbox {id}")),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert_eq!(server.cove_as(bob, &["ls", "--json"]).stdout, "");
    assert!(server.cove_as(alice, &["ls"]).stdout.contains(&id));
    // The admin is a tenant of its own, too.
    assert!(!server.cove(&["ls"]).stdout.contains(&id));
    let (code, v) = server.curl(
        Some(bob),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"mallory"}"#),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    assert_eq!(server.cove_as(alice, &["rm", "-f", &id]).code, 0);
    common::reap_orphans(&id);
}

#[test]
fn bad_requests_get_a_clear_4xx_never_a_5xx() {
    require_root();
    let server = Server::start();
    let t = Some(server.token.as_str());
    // (token, method, path, body, expected status, expected error code)
    type Case<'a> = (
        Option<&'a str>,
        &'a str,
        String,
        Option<String>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            None,
            "GET",
            "/v1/sandboxes".into(),
            None,
            401,
            "unauthorized",
        ),
        (
            Some("nope"),
            "GET",
            "/v1/sandboxes".into(),
            None,
            401,
            "unauthorized",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some("{not json".into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":["true"],"bogus":1}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":[]}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":["true"],"limits":{"memory":"1"}}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":["true"],"limits":{"cpus_millis":99999999}}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":["true"],"image":"/etc"}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(r#"{"cmd":["true"],"labels":{"bad key":"x"}}"#.into()),
            400,
            "bad_request",
        ),
        (
            t,
            "POST",
            "/v1/sandboxes".into(),
            Some(format!(r#"{{"cmd":["{}"]}}"#, "x".repeat(2 << 20))),
            413,
            "payload_too_large",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes/NOT-AN-ID".into(),
            None,
            400,
            "bad_request",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes/0123456789ab".into(),
            None,
            404,
            "not_found",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes?state=dancing".into(),
            None,
            400,
            "bad_request",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes?label=novalue".into(),
            None,
            400,
            "bad_request",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes?limit=0".into(),
            None,
            400,
            "bad_request",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes?colour=red".into(),
            None,
            400,
            "bad_request",
        ),
        (
            t,
            "GET",
            "/v1/sandboxes/0123456789ab/wait?timeout=1h".into(),
            None,
            400,
            "bad_request",
        ),
        (t, "GET", "/v1/nothing".into(), None, 404, "not_found"),
        (
            t,
            "PUT",
            "/v1/sandboxes".into(),
            None,
            405,
            "method_not_allowed",
        ),
        (
            t,
            "POST",
            "/v1/tenants".into(),
            Some(r#"{"name":"../x"}"#.into()),
            400,
            "bad_request",
        ),
    ];
    for (token, method, path, body, status, code) in cases {
        let (got, v) = server.curl(token, method, &path, body.as_deref());
        let shown: String = path.chars().take(60).collect();
        assert_eq!(got, status, "{method} {shown}: {v}");
        assert_eq!(v["error"]["code"], code, "{method} {shown}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(
            !message.is_empty()
                && !message.contains("/var/lib")
                && !message.contains(server.data.to_str().unwrap()),
            "{message}"
        );
    }
    let (code, _) = server.curl(None, "GET", "/healthz", None);
    assert_eq!(code, 200);
    let (code, _) = server.curl(None, "GET", "/readyz", None);
    assert_eq!(code, 200);
}

/// A create records its sandbox without waiting for the disk, and the sandbox starts
/// meanwhile; a crash in between leaves a running sandbox whose record is lost. The next start
/// removes it whole, and keeps the others.
#[test]
fn a_sandbox_whose_record_a_crash_lost_is_removed_at_the_next_start() {
    require_root();
    let mut server = Server::start();
    // One from the warm pool, one started cold (another user fits no warm sandbox).
    let lost = [
        server.create(&["--", "sleep", "600"]),
        server.create(&["-u", "1000", "--", "sleep", "600"]),
    ];
    let kept = server.create(&["--", "sleep", "600"]);
    let data = server.data.clone();
    server.kill9();
    // What the crash leaves when the records had not reached the disk: the sandboxes without
    // them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use cove_store::Kv;
        let kv = cove_store::Embedded::open(&data.join("state.redb"))
            .await
            .unwrap();
        for id in &lost {
            let key = cove_types::sandbox::record_key(&id.parse().unwrap());
            kv.delete(&key, cove_store::Expect::Any).await.unwrap();
        }
    });
    drop(runtime);
    let restarted = Server::start_in(data.clone());
    for id in &lost {
        let dir = data.join("sandboxes").join(id);
        let deadline = Instant::now() + Duration::from_secs(10);
        while dir.exists() {
            assert!(
                Instant::now() < deadline,
                "{id} was not removed\n{}",
                restarted.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            restarted
                .log()
                .contains("removed a sandbox without a record"),
            "{}",
            restarted.log()
        );
        let (code, _) = restarted.curl(
            Some(&restarted.token),
            "GET",
            &format!("/v1/sandboxes/{id}"),
            None,
        );
        assert_eq!(code, 404);
        common::reap_orphans(id);
        common::assert_no_leaks(id);
    }
    assert_eq!(restarted.inspect(&kept)["state"], "running");
    assert_eq!(restarted.cove(&["rm", "-f", &kept]).code, 0);
    common::reap_orphans(&kept);
    common::assert_no_leaks(&kept);
    drop(server);
}

#[test]
fn sandboxes_outlive_a_killed_server_and_are_adopted() {
    require_root();
    let mut server = Server::start();
    let long = server.create(&["--", "sleep", "300"]);
    let short = server.create(&["--", "sh", "-c", "sleep 2; exit 7"]);
    server.wait_for_state(&long, "running");
    server.wait_for_state(&short, "running");
    let data = server.data.clone();

    server.kill9();
    // The short one ends while no server runs.
    std::thread::sleep(Duration::from_secs(3));
    let comm: String = format!("cove-{long}").chars().take(15).collect();
    let alive = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm));
    assert!(alive, "the sandbox died with the server");

    let restarted = Server::start_in(data);
    let v = restarted.wait_for_state(&short, "exited");
    assert_eq!(
        (v["reason"].as_str(), v["exit_code"].as_i64()),
        (Some("exited"), Some(7)),
        "{v}"
    );
    assert_eq!(restarted.inspect(&long)["state"], "running");
    // Still under control: it can be stopped and removed.
    let out = restarted.cove(&["rm", "-f", &long]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    common::reap_orphans(&long);
    common::reap_orphans(&short);
    common::assert_no_leaks(&long);
    common::assert_no_leaks(&short);
    drop(server);
}

#[test]
fn exec_runs_contained_commands_in_a_running_sandbox() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--memory",
        "64M",
        "-e",
        "FROM_SANDBOX=yes",
        "--",
        "sleep",
        "300",
    ]);
    server.wait_for_state(&id, "running");

    let out = server.cove(&[
        "exec",
        "-e",
        "X=1",
        "-w",
        "/tmp",
        &id,
        "--",
        "sh",
        "-c",
        "echo $FROM_SANDBOX $X; pwd; echo err >&2; exit 3",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "yes 1\n/tmp\n", "err\n")
    );
    // Contained like the main command: root inside, no capabilities, no_new_privs, seccomp,
    // its pid namespace, its cgroup (the root of its cgroup namespace).
    let out = server.cove(&["exec", &id, "--", "sh", "-c", "id -u; grep -E '^(Cap(Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status; cat /proc/1/comm; cut -d: -f3 /proc/self/cgroup | sort -u"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let expected = format!(
        "0\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\ncove-{}\n/\n",
        &id[..10]
    );
    assert_eq!(out.stdout, expected);
    let out = server.cove(&["exec", &id, "--", "no-such-command"]);
    assert_eq!(out.code, 127);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    // A timeout kills the command and everything it started.
    let out = server.cove(&[
        "exec",
        "--timeout",
        "1s",
        &id,
        "--",
        "sh",
        "-c",
        "sleep 100 & sleep 101",
    ]);
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert!(
        out.stderr.contains("killed at its timeout"),
        "{}",
        out.stderr
    );
    let out = server.cove(&["exec", &id, "--", "ps", "-o", "comm="]);
    assert_eq!(
        out.stdout,
        format!("cove-{}\nsleep\nps\n", &id[..10]),
        "{}",
        out.stderr
    );

    // Not in a sandbox that has ended, nor in another tenant's.
    let (_, bob) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"bob"}"#),
    );
    let out = server.cove_as(bob["token"].as_str().unwrap(), &["exec", &id, "--", "true"]);
    assert!(
        out.stderr.contains(&format!("no sandbox {id}")),
        "{}",
        out.stderr
    );
    // The sandbox's memory limit holds for it: going over ends the sandbox, as for `cove run`.
    let out = server.cove(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "x=$(head -c 150000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    assert_ne!(
        out.stdout, "survived\n",
        "the memory limit did not apply: {}",
        out.stderr
    );
    server.cove(&["wait", &id]);
    assert_eq!(server.inspect(&id)["reason"], "memory_limit");
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(r#"{"cmd":["true"]}"#),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (409, Some("not_running")),
        "{v}"
    );
    common::reap_orphans(&id);
    common::assert_no_leaks(&id);
}

#[test]
fn logs_are_kept_tailed_and_followed() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do echo out$i; done; echo err >&2",
    ]);
    server.cove(&["wait", &id]);
    let out = server.cove(&["logs", &id]);
    assert_eq!(
        out.stdout, "out1\nout2\nout3\nout4\nout5\nerr\n",
        "{}",
        out.stderr
    );
    let out = server.cove(&["logs", "--tail", "2", "--stream", "stdout", &id]);
    assert_eq!(out.stdout, "out4\nout5\n");
    let out = server.cove(&["logs", "--stream", "stderr", &id]);
    assert_eq!(out.stdout, "err\n");
    let out = server.cove(&["logs", "--stream", "bogus", &id]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("use stdout, stderr or all"),
        "{}",
        out.stderr
    );

    // Following: output arrives while the sandbox runs, and the stream ends with it.
    let id = server.create(&[
        "--",
        "sh",
        "-c",
        "echo first; sleep 1; echo second; sleep 1; echo third",
    ]);
    server.wait_for_state(&id, "running");
    let started = Instant::now();
    let mut follow = Command::new(common::cove_bin())
        .args(["logs", "-f", &id])
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "not streamed as it came"
    );
    assert_eq!(lines.next().unwrap().unwrap(), "third");
    assert!(lines.next().is_none());
    assert!(follow.wait().unwrap().success());
}

#[test]
fn create_answers_once_the_sandbox_runs_or_says_why_it_could_not() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "300"]);
    let v = server.inspect(&id);
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["started_at_ms"].as_u64().unwrap() >= v["created_at_ms"].as_u64().unwrap());

    // An image no registry has: the start fails, and create says so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let image = format!("127.0.0.1:{port}/nothing:v1");
    let out = server.cove(&["create", "--image", &image, "--", "true"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("failed to start") && out.stderr.contains("Connection refused"),
        "{}",
        out.stderr
    );
    let ls = server.cove(&["ls", "--json", "--state", "exited"]);
    let failed: serde_json::Value =
        serde_json::from_str(ls.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(failed["reason"], "start_failure", "{failed}");
    assert_eq!(server.cove(&["rm", "-f", &id]).code, 0);
    common::reap_orphans(&id);
}

/// The issue's restart drill: 50 sandboxes running, the server killed (-9) while 50 more are
/// being created, a restart; then every sandbox the API ever acknowledged or recorded is either
/// running and tracked or ended with a reason, and removing them all leaves nothing behind.
#[test]
fn a_server_killed_mid_burst_loses_nothing_and_leaks_nothing() {
    require_root();
    let mut server = Server::start();
    let mut acked: Vec<String> = (0..50)
        .map(|_| server.create(&["--", "sleep", "600"]))
        .collect();
    // 50 more from 10 clients at once; the server dies while they are in flight.
    let (url, token) = (server.url.clone(), server.token.clone());
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let (url, token) = (url.clone(), token.clone());
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for _ in 0..5 {
                    let out = Command::new(common::cove_bin())
                        .args(["create", "--", "sleep", "600"])
                        .env("COVE_URL", &url)
                        .env("COVE_TOKEN", &token)
                        .output()
                        .unwrap();
                    if out.status.success() {
                        ids.push(String::from_utf8(out.stdout).unwrap().trim().to_string());
                    }
                }
                ids
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    server.kill9();
    for c in clients {
        acked.extend(c.join().unwrap());
    }
    let data = server.data.clone();
    let restarted = Server::start_in(data);

    // Every acknowledged sandbox is known, and everything known settles.
    let ls = restarted.cove(&["ls", "--json"]);
    let known: Vec<serde_json::Value> = ls
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let known_ids: Vec<&str> = known.iter().map(|v| v["id"].as_str().unwrap()).collect();
    for id in &acked {
        assert!(
            known_ids.contains(&id.as_str()),
            "acknowledged sandbox {id} is lost"
        );
    }
    assert!(known.len() >= 50, "{}", known.len());
    for id in &known_ids {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = restarted.inspect(id);
            match v["state"].as_str().unwrap() {
                "running" => {
                    let comm: String = format!("cove-{id}").chars().take(15).collect();
                    let alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
                        std::fs::read_to_string(e.path().join("comm"))
                            .is_ok_and(|c| c.trim() == comm)
                    });
                    assert!(alive, "{id} is recorded running but is not: {v}");
                    break;
                }
                "exited" => {
                    assert!(v["reason"].is_string(), "{id} ended without a reason: {v}");
                    break;
                }
                _ => {
                    assert!(Instant::now() < deadline, "{id} never settled: {v}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    for id in &known_ids {
        let out = restarted.cove(&["rm", "-f", id]);
        assert_eq!(out.code, 0, "{id}: {}", out.stderr);
    }
    assert_eq!(restarted.cove(&["ls", "--json"]).stdout, "");
    for id in &known_ids {
        common::reap_orphans(id);
        common::assert_no_leaks(id);
    }
    // Nor is anything unknown left: a create the crash cut short between starting its sandbox
    // and its record reaching the disk left a sandbox without a record, which the restart
    // removed. What remains is the restarted server's own warm sandboxes.
    let sandboxes = restarted.data.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let members = warm_members(&restarted);
        let strays: Vec<String> = std::fs::read_dir(&sandboxes)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|d| {
                !known_ids.contains(&d.as_str()) && !members.iter().any(|m| d.starts_with(m))
            })
            .collect();
        if strays.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left without a record: {strays:?}\n{}",
            restarted.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
}

/// The id prefixes (the ten characters a process name holds) of `server`'s waiting warm
/// sandboxes: their one process, named for the sandbox, is the server's child once its
/// supervisor has handed it over and exited (the server is the subreaper of its supervisors'
/// orphans). A sandbox of the server killed before, left running, is not: its parent is gone.
fn warm_members(server: &Server) -> Vec<String> {
    let ppid = server.pid().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let parent = rest.split(' ').nth(1)?;
            (parent == ppid)
                .then(|| name.strip_prefix("cove-").map(str::to_string))
                .flatten()
        })
        .collect()
}

#[test]
fn tenants_are_held_to_their_quotas() {
    require_root();
    let server = Server::start();
    let small = server
        .tenant(r#"{"name":"small","quotas":{"sandboxes":2,"memory":"1G","cpus_millis":1500}}"#);
    let create = |args: &[&str]| {
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        server.cove_as(&small, &all)
    };
    let a = create(&["--memory", "256M", "--cpus", "0.5", "--", "sleep", "300"]);
    assert_eq!(a.code, 0, "{}", a.stderr);
    // Over the memory quota: 256M + 1G > 1G.
    let out = create(&["--memory", "1G", "--cpus", "0.5", "--", "sleep", "300"]);
    assert!(
        out.stderr.contains("quota 1G") && out.stderr.contains("HTTP 429"),
        "{}",
        out.stderr
    );
    // Over the CPU quota: 0.5 + 1.5 > 1.5.
    let out = create(&["--memory", "256M", "--cpus", "1.5", "--", "sleep", "300"]);
    assert!(
        out.stderr.contains("quota 1.5") && out.stderr.contains("HTTP 429"),
        "{}",
        out.stderr
    );
    let b = create(&["--memory", "256M", "--cpus", "0.5", "--", "sleep", "300"]);
    assert_eq!(b.code, 0, "{}", b.stderr);
    // Over the sandbox count.
    let out = create(&["--memory", "64M", "--cpus", "0.1", "--", "sleep", "300"]);
    assert!(
        out.stderr.contains("2 sandboxes already, quota 2"),
        "{}",
        out.stderr
    );
    // An ended sandbox counts for nothing.
    let a = a.stdout.trim().to_string();
    assert_eq!(server.cove_as(&small, &["stop", &a]).code, 0);
    server.cove_as(&small, &["wait", &a]);
    let c = create(&["--memory", "64M", "--cpus", "0.1", "--", "sleep", "300"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    // The same name twice is a conflict, not a second tenant.
    let (code, _) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"small"}"#),
    );
    assert_eq!(code, 409);
    for id in [a, b.stdout.trim().to_string(), c.stdout.trim().to_string()] {
        server.cove_as(&small, &["rm", "-f", &id]);
        common::reap_orphans(&id);
    }
}

/// Creates of one tenant at once: the quota holds exactly, whichever way each check is answered
/// (the server's in-memory holdings, or the store).
#[test]
fn concurrent_creates_never_exceed_a_tenants_quota() {
    require_root();
    let server = Server::start();
    let token = server
        .tenant(r#"{"name":"three","quotas":{"sandboxes":3,"memory":"1G","cpus_millis":1000}}"#);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (url, token) = (server.url.clone(), token.clone());
            std::thread::spawn(move || {
                Command::new(common::cove_bin())
                    .args([
                        "create", "--memory", "16M", "--cpus", "0.1", "--", "sleep", "300",
                    ])
                    .env("COVE_URL", &url)
                    .env("COVE_TOKEN", &token)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let outs: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let made: Vec<String> = outs
        .iter()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .collect();
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("3 sandboxes already, quota 3"), "{err}");
    }
    assert_eq!(made.len(), 3, "{made:?}");
    for id in &made {
        server.cove_as(&token, &["rm", "-f", id]);
        common::reap_orphans(id);
    }
}

#[test]
fn pause_freezes_and_resume_thaws() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--",
        "sh",
        "-c",
        "while true; do echo tick; sleep 0.05; done",
    ]);
    let ticks = || server.cove(&["logs", &id]).stdout.lines().count();
    std::thread::sleep(Duration::from_millis(300));
    assert!(ticks() > 0);

    let out = server.cove(&["pause", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(server.inspect(&id)["state"], "paused");
    let frozen_at = ticks();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ticks(), frozen_at, "a paused sandbox kept running");
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(r#"{"cmd":["true"]}"#),
    );
    assert_eq!(code, 409, "{v}");
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        &format!("/v1/sandboxes/{id}/pause"),
        None,
    );
    assert_eq!(
        (code, v["state"].as_str()),
        (200, Some("paused")),
        "pausing twice is fine: {v}"
    );

    let out = server.cove(&["resume", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(server.inspect(&id)["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    assert!(ticks() > frozen_at, "a resumed sandbox did not run again");
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        &format!("/v1/sandboxes/{id}/resume"),
        None,
    );
    assert_eq!((code, v["state"].as_str()), (200, Some("running")), "{v}");

    // A paused sandbox can be removed (it is thawed to be stopped).
    assert_eq!(server.cove(&["pause", &id]).code, 0);
    let out = server.cove(&["rm", "-f", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stderr.contains("still stopping"), "{}", out.stderr);
    common::reap_orphans(&id);
    common::assert_no_leaks(&id);
}

/// The processes (pid and parent pid) whose command line is exactly `args`.
fn processes_running(args: &[&str]) -> Vec<(u32, u32)> {
    let want: Vec<u8> = args
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            (std::fs::read(e.path().join("cmdline")).ok()? == want).then_some(())?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

#[test]
fn an_exec_orphaned_to_the_server_does_not_hold_its_sandbox() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "300"]);
    server.wait_for_state(&id, "running");
    // An exec whose helper dies before its command (as when the sandbox's cgroup is killed with
    // the helper in it): the command dies with it (its parent-death signal), and its new parent
    // is the server, its helper's subreaper. The sandbox's pid namespace cannot end until the
    // server collects it.
    let mut exec = Command::new(common::cove_bin())
        .args(["exec", &id, "--", "sleep", "1001"])
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let command = loop {
        if let Some(&(pid, helper)) = processes_running(&["sleep", "1001"]).first()
            && helper != server.pid()
        {
            break (pid, helper);
        }
        assert!(Instant::now() < deadline, "the exec did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let killed = Command::new("kill")
        .args(["-9", &command.1.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = exec.wait();
    let collected = || !std::path::Path::new(&format!("/proc/{}", command.0)).exists();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !collected() {
        assert!(
            Instant::now() < deadline,
            "the server did not collect the orphaned command"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let out = server.cove(&["stop", &id]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.inspect(&id)["ended_at_ms"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the sandbox did not end: its orphan was not collected\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.cove(&["rm", &id]);
    common::reap_orphans(&id);
    common::assert_no_leaks(&id);
}

#[test]
fn a_chatty_sandbox_cannot_fill_the_disk_with_logs() {
    require_root();
    let server = Server::start();
    // 200 MiB of output in lines, at whatever speed the machine writes.
    let id = server.create(&[
        "--",
        "sh",
        "-c",
        "yes 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde | head -c 209715200; echo last-line",
    ]);
    server.cove(&["wait", &id]);
    let dir = server.data.join("sandboxes").join(&id);
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let kept = size("stdout.log") + size("stdout.log.old");
    // Rotation is checked at every poll of the agent (so a sandbox may run past the bound for
    // one interval), and once more when it has ended: then at most 32 MiB, and what rotation
    // kept: 4 MiB, and up to 4 MiB more written while it copied.
    assert!(
        kept <= 40 << 20,
        "{kept} bytes of log kept for 200 MiB written"
    );
    let out = server.cove(&["logs", "--tail", "1", "--stream", "stdout", &id]);
    assert_eq!(out.stdout, "last-line\n", "{}", out.stderr);
    server.cove(&["rm", &id]);
}

#[test]
fn timeouts_can_be_moved_and_hold_across_a_restart() {
    require_root();
    let mut server = Server::start();
    // Extended before it runs out: it outlives the first deadline, then ends at the new one
    // with reason `timeout`.
    let id = server.create(&["--timeout", "2s", "--", "sleep", "1000"]);
    let out = server.cove(&["timeout", &id, "5s"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v = server.inspect(&id);
    let deadline = v["deadline_ms"].as_u64().unwrap();
    assert!(
        deadline >= v["created_at_ms"].as_u64().unwrap() + 4000,
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(server.inspect(&id)["state"], "running");
    let v = server.wait_for_state(&id, "exited");
    assert_eq!(v["reason"], "timeout", "{v}");
    assert_eq!(v["message"], "killed: timeout 5s reached", "{v}");
    assert!(v["ended_at_ms"].as_u64().unwrap() >= deadline, "{v}");
    // Shortened: it ends early.
    let short = server.create(&["--timeout", "1h", "--", "sleep", "1000"]);
    assert_eq!(server.cove(&["timeout", &short, "1s"]).code, 0);
    assert_eq!(server.wait_for_state(&short, "exited")["reason"], "timeout");
    // Bad input, and sandboxes that have ended.
    for (body, want) in [
        (r#"{"timeout":"0s"}"#, 400),
        (r#"{"timeout":"31d"}"#, 400),
        (r#"{"timeout":"soon"}"#, 400),
        (r#"{"ttl":"1m"}"#, 400),
        (r#"{"timeout":"1m"}"#, 409),
    ] {
        let (code, v) = server.curl(
            Some(&server.token),
            "POST",
            &format!("/v1/sandboxes/{id}/timeout"),
            Some(body),
        );
        assert_eq!(code, want, "{body}: {v}");
    }
    // A deadline that passes while the server is down is enforced when it is back.
    let late = server.create(&["--timeout", "2s", "--", "sleep", "1000"]);
    let data = server.data.clone();
    server.kill9();
    std::thread::sleep(Duration::from_secs(3));
    let restarted = Server::start_in(data);
    let v = restarted.wait_for_state(&late, "exited");
    assert_eq!(v["reason"], "timeout", "{v}");
    drop(server);
    for id in [&id, &short, &late] {
        restarted.cove(&["rm", "-f", id]);
        common::reap_orphans(id);
        common::assert_no_leaks(id);
    }
}

#[test]
fn a_configuration_file_sets_defaults_and_flags_override_it() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("config.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:1\"\ndomain = \"sandbox.test\"\n\
         [limits]\nmemory = \"128M\"\ntimeout = \"1h\"\n[quotas]\nsandboxes = 9\n",
    )
    .unwrap();
    // The flag's listen address and quota win over the file's.
    let server = Server::start_with(
        data.clone(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--quota-sandboxes",
            "2",
        ],
    );
    let (code, v) = server.curl(Some(&server.token), "GET", "/v1/info", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["domain"], "sandbox.test");
    let tenant = &server.new_tenant("cfg");
    let id = server.create_as(tenant, &["--", "sleep", "100"]);
    let v = server.inspect_as(tenant, &id);
    assert_eq!(v["spec"]["limits"]["memory"], "128M", "{v}");
    assert_eq!(v["spec"]["limits"]["timeout"], "1h", "{v}");
    assert!(v["deadline_ms"].as_u64().is_some(), "{v}");
    // A field given keeps the other defaults.
    let id2 = server.create_as(tenant, &["--pids", "64", "--", "sleep", "100"]);
    let v = server.inspect_as(tenant, &id2);
    assert_eq!(
        (
            v["spec"]["limits"]["memory"].as_str(),
            v["spec"]["limits"]["pids"].as_u64()
        ),
        (Some("128M"), Some(64)),
        "{v}"
    );
    let out = server.cove_as(tenant, &["create", "--", "true"]);
    assert!(out.stderr.contains("quota 2"), "{}", out.stderr);
    for id in [&id, &id2] {
        server.cove_as(tenant, &["rm", "-f", id]);
    }
    // Mistakes in the file are named, with their line.
    std::fs::write(&config, "[limits]\nmemroy = \"1G\"\n").unwrap();
    let out = Command::new(common::cove_bin())
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125));
    assert!(err.contains("line 2") && err.contains("memroy"), "{err}");
}

#[test]
fn a_tenant_maximum_lifetime_bounds_every_timeout() {
    require_root();
    let server = Server::start();
    let (code, t) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"short","quotas":{"max_timeout":"2s"}}"#),
    );
    assert_eq!(code, 201, "{t}");
    assert_eq!(t["quotas"]["max_timeout"], "2s");
    let tenant = t["token"].as_str().unwrap();
    // No timeout given: the maximum is its timeout.
    let id = server.create_as(tenant, &["--", "sleep", "1000"]);
    let v = server.inspect_as(tenant, &id);
    assert_eq!(v["spec"]["limits"]["timeout"], "2s", "{v}");
    // Longer than the maximum, at creation or later: over quota.
    let out = server.cove_as(tenant, &["create", "--timeout", "1h", "--", "true"]);
    assert!(
        out.stderr.contains("timeout 1h is over its maximum 2s") && out.stderr.contains("429"),
        "{}",
        out.stderr
    );
    let out = server.cove_as(tenant, &["timeout", &id, "1m"]);
    assert!(out.stderr.contains("over its maximum"), "{}", out.stderr);
    assert_eq!(server.cove_as(tenant, &["timeout", &id, "1s"]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = server.inspect_as(tenant, &id);
        if v["state"] == "exited" {
            assert_eq!(v["reason"], "timeout", "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server.cove_as(tenant, &["rm", "-f", &id]);
    common::reap_orphans(&id);
    common::assert_no_leaks(&id);
}

#[test]
fn metrics_count_sandboxes_their_starts_ends_and_api_requests() {
    require_root();
    let server = Server::start();
    let tenant = &server.new_tenant("m");
    // Only the admin reads them.
    assert_eq!(scrape(&server, tenant).0, 403);
    let (_, before) = scrape(&server, &server.token);
    assert_eq!(
        sample(&before, "cove_sandbox_starts_total", serde_json::json!({})),
        0.0
    );
    let done = server.create_as(tenant, &["--", "sh", "-c", "exit 3"]);
    assert_eq!(server.cove_as(tenant, &["wait", &done]).code, 3);
    let running = server.create_as(tenant, &["--", "sleep", "100"]);
    server.cove_as(tenant, &["inspect", "000000000000"]);
    let (code, m) = scrape(&server, &server.token);
    assert_eq!(code, 200);
    assert_eq!(
        sample(
            &m,
            "cove_sandboxes",
            serde_json::json!({"state": "running"})
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "cove_sandboxes", serde_json::json!({"state": "exited"})),
        1.0
    );
    assert_eq!(
        sample(&m, "cove_sandbox_starts_total", serde_json::json!({})),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_sandbox_start_seconds_count",
            serde_json::json!({})
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_sandbox_ends_total",
            serde_json::json!({"reason": "exited"})
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_api_requests_total",
            serde_json::json!({"route": "/v1/sandboxes", "method": "POST", "status": "2xx"})
        ),
        2.0
    );
    // A 404 is counted by its route's template, never by the id asked for.
    assert_eq!(
        sample(
            &m,
            "cove_api_requests_total",
            serde_json::json!({"route": "/v1/sandboxes/{id}", "method": "GET", "status": "4xx"})
        ),
        1.0
    );
    assert!(
        m["cove_api_requests_total"]
            .iter()
            .all(|(l, _)| !l["route"].as_str().unwrap().contains("0000"))
    );
    // The node: what it has, and what the one running sandbox was given (default limits).
    assert!(
        sample(
            &m,
            "cove_node_capacity",
            serde_json::json!({"resource": "memory_bytes"})
        ) > 1e9
    );
    assert!(
        sample(
            &m,
            "cove_node_capacity",
            serde_json::json!({"resource": "cpus"})
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_node_allocated",
            serde_json::json!({"resource": "memory_bytes"})
        ),
        512.0 * 1024.0 * 1024.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_node_allocated",
            serde_json::json!({"resource": "cpus"})
        ),
        1.0
    );
    // Its own series while it runs, by id and user_id.
    let labelled = server.create_as(tenant, &["--label", "user_id=42", "--", "sleep", "100"]);
    let (_, m) = scrape(&server, &server.token);
    let mine = serde_json::json!({"id": labelled, "user_id": "42"});
    assert!(
        sample(&m, "cove_sandbox_memory_bytes", mine.clone()) > 0.0,
        "{m:?}"
    );
    assert!(sample(&m, "cove_sandbox_pids", mine.clone()) >= 1.0);
    assert!(
        m["cove_sandbox_cpu_seconds_total"]
            .iter()
            .any(|(l, _)| l == &mine)
    );
    assert!(
        m["cove_sandbox_pids"]
            .iter()
            .any(|(l, _)| l["id"] == running.as_str() && l["user_id"] == "")
    );
    assert_eq!(server.cove_as(tenant, &["rm", "-f", &labelled]).code, 0);
    // Ends by reason, as they happen; a removed sandbox's series are gone.
    assert_eq!(server.cove_as(tenant, &["rm", "-f", &running]).code, 0);
    let (_, m) = scrape(&server, &server.token);
    for name in [
        "cove_sandbox_memory_bytes",
        "cove_sandbox_pids",
        "cove_sandbox_cpu_seconds_total",
    ] {
        assert!(
            m.get(name).is_none_or(|s| s.is_empty()),
            "{name}: {:?}",
            m.get(name)
        );
    }
    assert_eq!(
        sample(
            &m,
            "cove_sandbox_ends_total",
            serde_json::json!({"reason": "killed"})
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "cove_sandboxes",
            serde_json::json!({"state": "running"})
        ),
        0.0
    );
    server.cove_as(tenant, &["rm", "-f", &done]);
}

#[test]
fn stats_show_a_running_sandboxs_usage_against_its_limits() {
    require_root();
    let server = Server::start();
    // 40 MiB in a tmpfs file counts against its memory.
    let id = server.create(&[
        "--memory",
        "128M",
        "--pids",
        "32",
        "--",
        "sh",
        "-c",
        "head -c 41943040 /dev/zero > /tmp/fill; exec sleep 1000",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let out = server.cove(&["stats", "--json", &id]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        if v["memory_bytes"].as_u64().unwrap() >= 40 << 20 {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["state"], "running");
    assert_eq!(v["limits"]["memory_bytes"], 128 << 20);
    assert_eq!(v["limits"]["pids"], 32);
    // Its init and `sleep`.
    assert_eq!(v["pids"], 2, "{v}");
    assert!(v["cpu_seconds"].as_f64().unwrap() > 0.0, "{v}");
    let out = server.cove(&["stats", &id]);
    assert!(
        out.stdout.contains("running") && out.stdout.contains("128.0"),
        "{}",
        out.stdout
    );
    // Another tenant's is not there; an ended one has none.
    let (_, t) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/tenants",
        Some(r#"{"name":"s"}"#),
    );
    let (code, _) = server.curl(
        t["token"].as_str(),
        "GET",
        &format!("/v1/sandboxes/{id}/stats"),
        None,
    );
    assert_eq!(code, 404);
    assert_eq!(server.cove(&["stop", &id]).code, 0);
    server.wait_for_state(&id, "exited");
    let out = server.cove(&["stats", &id]);
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
    server.cove(&["rm", &id]);
}

#[test]
fn ended_sandboxes_go_after_the_retention_and_running_ones_stay() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let server = Server::start_with(data, &["--retention", "2s"]);
    let ended = server.create(&["--", "true"]);
    let running = server.create(&["--", "sleep", "100"]);
    assert_eq!(server.cove(&["wait", &ended]).code, 0);
    // Still there right after its end, with its logs.
    assert_eq!(server.cove(&["inspect", &ended]).code, 0);
    let dir = server.data.join("sandboxes").join(&ended);
    assert!(dir.exists());
    let deadline = Instant::now() + Duration::from_secs(15);
    while server.cove(&["inspect", &ended]).code == 0 {
        assert!(Instant::now() < deadline, "the ended sandbox was kept");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!dir.exists(), "its files went with its record");
    assert_eq!(server.inspect(&running)["state"], "running");
    server.cove(&["rm", "-f", &running]);
    common::assert_no_leaks(&ended);
    common::assert_no_leaks(&running);
}

#[test]
fn json_logs_carry_request_ids_tenants_and_sandboxes() {
    require_root();
    common::become_subreaper();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let mut child = Command::new(common::cove_bin())
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args([
            "--proxy-listen",
            "127.0.0.1:0",
            "--proxy-tls-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if tx.send(v).is_err() {
                return;
            }
        }
    });
    let next = |what: &dyn Fn(&serde_json::Value) -> bool| loop {
        let v = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a log line");
        if what(&v) {
            return v;
        }
    };
    let listening = next(&|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("listening on "))
    });
    let url = listening["message"].as_str().unwrap()["listening on ".len()..].to_string();
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-d",
            r#"{"cmd":["true"]}"#,
        ])
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .args(["-H", "X-Request-Id: req-42"])
        .arg(format!("{url}/v1/sandboxes"))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(headers.contains("x-request-id: req-42"), "{headers}");
    let request = next(&|v| v["message"] == "request" && v["request_id"] == "req-42");
    assert_eq!(
        (
            &request["method"],
            &request["route"],
            &request["status"],
            &request["tenant"]
        ),
        (
            &serde_json::json!("POST"),
            &serde_json::json!("/v1/sandboxes"),
            &serde_json::json!(201),
            &serde_json::json!("admin")
        ),
        "{request}"
    );
    let exited = next(&|v| v["message"] == "sandbox exited");
    assert_eq!(
        (&exited["tenant"], &exited["reason"]),
        (&serde_json::json!("admin"), &serde_json::json!("exited")),
        "{exited}"
    );
    let id = exited["sandbox"].as_str().unwrap().to_string();
    // Its request lines name it too.
    Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
        ])
        .arg(format!("{url}/v1/sandboxes/{id}"))
        .status()
        .unwrap();
    let get = next(&|v| v["message"] == "request" && v["method"] == "GET");
    assert_eq!(get["sandbox"], id.as_str(), "{get}");
    assert!(
        get["request_id"].as_str().unwrap().len() >= 12,
        "a request id is made: {get}"
    );
    let _ = child.kill();
    let _ = child.wait();
    let _gc = common::gc_lock(false);
    Command::new(common::cove_bin()).arg("gc").output().unwrap();
    let _ = std::fs::remove_dir_all(&data);
    common::assert_no_leaks(&id);
}

#[test]
fn limits_end_a_detached_sandbox_with_their_reason() {
    require_root();
    let server = Server::start();
    // No supervisor watches a server's sandbox once it runs: the agent does, at its poll.
    let forks = server.create(&[
        "--pids",
        "8",
        "--",
        "sh",
        "-c",
        "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 100 & done; wait",
    ]);
    // Two busy processes, each under the per-process CPU rlimit when the sandbox's total
    // passes the budget.
    let spins = server.create(&[
        "--cpu-time",
        "2s",
        "--cpus",
        "2",
        "--",
        "sh",
        "-c",
        "(while :; do :; done) & (while :; do :; done) & wait",
    ]);
    for (id, reason, says) in [
        (&forks, "pids_limit", "pids limit 8 reached"),
        (&spins, "cpu_time_limit", "CPU-time limit 2s exceeded"),
    ] {
        let v = server.wait_for_state(id, "exited");
        assert_eq!(v["reason"], reason, "{v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{v}");
        server.cove(&["rm", "-f", id]);
        common::assert_no_leaks(id);
    }
}

#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    require_root();
    let server = Server::start();
    let out = Command::new(common::cove_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-proxy",
            "--data-dir",
        ])
        .arg(&server.data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another cove serve uses"), "{stderr}");
}

/// A disk that fails under the state store: every `fdatasync` of the server fails with EIO
/// from some point on (`strace`'s fault injection, attached to the running server). The store
/// is unusable from its first failure until it is reopened, so the server stops on its own,
/// with an error that says why (for systemd to restart it). The create under way is answered
/// 503 (its own write is the one that fails here: this store syncs even a write that does not
/// ask it to, at times), and the next start on the same data loses nothing: the sandbox whose
/// record was durable runs on, adopted, and no other appeared. When the failure comes after a
/// create's record was written, the answer names the sandbox, which the next start adopts or
/// removes; `strace` counts calls per thread, so that case cannot be aimed at from here.
#[test]
fn a_failing_disk_under_the_store_stops_the_server_and_loses_nothing() {
    require_root();
    let mut server = Server::start();
    let data = server.data.clone();
    // Whatever fails below, no sandbox of this server outlives the test (a server that
    // stopped cannot remove them).
    let _reap = ReapSandboxesOf(data.clone());
    let before = server.create(&["--", "sleep", "600"]);
    let pid = server.pid();
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync"])
        .args(["-e", "inject=fdatasync:error=EIO", "-p", &pid.to_string()])
        .spawn()
        .unwrap();
    // Every thread of the server traced (new ones are followed from their start).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let untraced = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("status"))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.starts_with("TracerPid:") && l.ends_with("\t0"))
            })
            .count();
        if untraced == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "strace did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, body) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/sandboxes",
        Some(r#"{"cmd":["sleep","600"]}"#),
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    // Answered 503 either way; the new sandbox's id when it may exist.
    assert_eq!(code, 503, "{body}\n{}", server.log());
    let created = if message.contains("GET /v1/sandboxes/") {
        message
            .split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 12)
            .map(str::to_string)
    } else {
        assert_eq!(message, "the state store failed; try again");
        None
    };

    let status = server.wait_exit(Duration::from_secs(30));
    let log = server.log();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("I/O error") && log.contains("restart the server"),
        "{log}"
    );
    let _ = strace.wait();

    let restarted = Server::start_in(data);
    restarted.wait_for_state(&before, "running");
    if let Some(created) = &created {
        let (code, record) = restarted.curl(
            Some(&restarted.token),
            "GET",
            &format!("/v1/sandboxes/{created}"),
            None,
        );
        match code {
            200 => {
                let state = record["state"].as_str().unwrap_or_default();
                assert!(["running", "exited"].contains(&state), "{record}");
            }
            404 => {
                // Its record never reached the disk: the start removes it whole.
                let dir = restarted.data.join("sandboxes").join(created);
                let deadline = Instant::now() + Duration::from_secs(10);
                while dir.exists() {
                    assert!(Instant::now() < deadline, "{}", restarted.log());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            other => panic!("{other}: {record}"),
        }
    } else {
        // Nothing was created: the only sandbox is the one from before.
        let listed = restarted.cove(&["ls", "--json"]).stdout;
        assert_eq!(listed.lines().count(), 1, "{listed}");
    }
    for id in std::iter::once(&before).chain(&created) {
        restarted.cove(&["rm", "-f", id]);
        common::reap_orphans(id);
        common::assert_no_leaks(id);
    }
}

/// On drop, kills what is left of the sandboxes whose directories are under a server's data
/// directory (their inits, found by name) and reaps them, as `cove gc` does.
struct ReapSandboxesOf(std::path::PathBuf);

impl Drop for ReapSandboxesOf {
    fn drop(&mut self) {
        let ids: Vec<String> = std::fs::read_dir(self.0.join("sandboxes"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.len() == 12)
                    .collect()
            })
            .unwrap_or_default();
        if ids.is_empty() {
            return;
        }
        for id in &ids {
            common::kill_init(id);
        }
        for id in &ids {
            common::reap_orphans(id);
        }
        let _gc = common::gc_lock(false);
        let _ = Command::new(common::cove_bin()).arg("gc").output();
    }
}

/// A supervisor says `started` only once the agent can find the running sandbox from its
/// directory: its init's pid on the lock's last line (the agent watches the init's exit by it at
/// once) and its `status` file in place. The supervisor runs under `strace`, every `write(2)` of
/// its held up 100 ms before it returns: whatever it does after it says `started` happens well
/// after the test has looked (the lock's pid and the rename are other system calls).
#[test]
fn a_supervisor_says_started_once_its_sandbox_can_be_found() {
    require_root();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let id = format!("{:012x}", nanos & 0xffff_ffff_ffff);
    // The supervisor's orphaned init is this test's to collect once it is killed.
    common::become_subreaper();
    let data = std::env::temp_dir().join(format!("cove-supervise-{id}"));
    let dir = data.join("sandboxes").join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let mut supervisor = Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "-e", "trace=write"])
        .args(["-e", "inject=write:delay_exit=100000"])
        .arg(common::cove_bin())
        .arg("supervise")
        .arg(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = supervisor.stdin.take().unwrap();
        stdin.write_all(br#"{"cmd":["sleep","300"]}"#).unwrap();
    }
    let mut said = String::new();
    BufReader::new(supervisor.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    // Read at once, before anything else can happen.
    let lock = std::fs::read_to_string(dir.join("lock")).unwrap();
    let status = dir.join("status").exists();
    let last = lock.lines().last().unwrap_or_default().to_string();
    let comm = std::fs::read_to_string(format!("/proc/{last}/comm")).unwrap_or_default();
    // Whatever was seen, the sandbox goes: its init killed (by name), the supervisor and the
    // init collected, and what is left reaped as any ended sandbox whose owner is gone.
    common::kill_init(&id);
    let _ = supervisor.wait();
    common::reap_orphans(&id);
    let _gc = common::gc_lock(false);
    let gc = Command::new(common::cove_bin()).arg("gc").output().unwrap();
    assert!(gc.status.success(), "{gc:?}");
    common::assert_no_leaks(&id);
    let _ = std::fs::remove_dir_all(&data);
    assert_eq!(said, "started\n");
    assert!(status, "no status file when it said started");
    assert!(
        comm.starts_with(&format!("cove-{}", &id[..10])),
        "the lock's last line is not the init's pid: {lock:?} ({comm:?})"
    );
}
