//! Idle limits of `cove serve`, with limits of seconds: the warning comes before the hard
//! action, use of each kind (exec, a streaming exec's input, the file API, requests through
//! the edge proxy) keeps a sandbox alive, the stop records `idle_limit`, and the pause action
//! pauses until a resume, which counts as use.

mod common;
mod server_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::require_root;
use server_support::Server;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// `cove events --id ID` from the start, its lines on a channel.
fn events(server: &Server, id: &str) -> (Child, mpsc::Receiver<serde_json::Value>) {
    let mut child = Command::new(common::cove_bin())
        .args(["events", "--id", id, "--since", "0"])
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    (child, rx)
}

/// The next event of type `kind`, skipping others; panics after `within`.
fn next_of(
    rx: &mpsc::Receiver<serde_json::Value>,
    kind: &str,
    within: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no {kind} event within {within:?}"));
        if v["type"] == kind {
            return v;
        }
    }
}

#[test]
fn an_unused_sandbox_is_warned_then_stopped() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--idle", "3s", "--idle-warn", "1s", "--", "sleep", "300"]);
    let (mut child, rx) = events(&server, &id);
    let warning = next_of(&rx, "idle_warning", Duration::from_secs(10));
    assert_eq!(warning["idle_action"], "stop", "{warning}");
    let at = warning["at_ms"].as_u64().unwrap();
    assert_eq!(
        warning["idle_action_at_ms"].as_u64().unwrap(),
        at + 2000,
        "{warning}"
    );
    let exited = next_of(&rx, "exited", Duration::from_secs(10));
    assert_eq!(exited["reason"], "idle_limit", "{exited}");
    assert!(
        exited["at_ms"].as_u64().unwrap() >= at,
        "the warning came first"
    );
    let v = server.inspect(&id);
    assert_eq!(v["reason"], "idle_limit");
    assert!(
        v["message"].as_str().unwrap().contains("unused for 3s"),
        "{v}"
    );
    let (_, m) = server_support::scrape(&server, &server.token);
    let count = |name: &str, labels| server_support::sample(&m, name, labels);
    assert_eq!(
        count("cove_idle_warnings_total", serde_json::json!({})),
        1.0
    );
    assert_eq!(
        count(
            "cove_idle_actions_total",
            serde_json::json!({"action": "stop"})
        ),
        1.0
    );
    let _ = child.kill();
    let _ = child.wait();
    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}

#[test]
fn use_of_every_kind_keeps_a_sandbox_alive() {
    require_root();
    let server = Server::start();
    // A server inside, for the proxy; public, so requests need no token.
    let id = server.create(&[
        "--public",
        "--idle",
        "3s",
        "--idle-warn",
        "2s",
        "--",
        "/usr/bin/python3",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
    ]);
    let (mut child, rx) = events(&server, &id);
    let proxied = format!("http://{}/proxy/{id}/8000/", server.proxy_http);
    let files = format!("/v1/sandboxes/{id}/files/stat?path=/tmp");
    // A streaming exec, fed a line at a time.
    let url = format!(
        "{}/v1/sandboxes/{id}/exec/stream",
        server.url.replacen("http://", "ws://", 1)
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", server.token).parse().unwrap(),
    );
    let (mut ws, _) = tungstenite::connect(req).unwrap();
    ws.send(Message::text(r#"{"cmd":["cat"]}"#)).unwrap();
    let ws = std::cell::RefCell::new(ws);
    let kinds: [(&str, &dyn Fn() -> bool); 4] = [
        ("exec", &|| {
            server.cove(&["exec", &id, "--", "true"]).code == 0
        }),
        ("files", &|| {
            server.curl(Some(&server.token), "GET", &files, None).0 == 200
        }),
        ("proxy", &|| {
            Command::new("curl")
                .args(["-sf", "-o", "/dev/null", &proxied])
                .status()
                .is_ok_and(|s| s.success())
        }),
        ("stream", &|| {
            let mut ws = ws.borrow_mut();
            ws.send(Message::binary(b"x\n".to_vec())).is_ok() && ws.read().is_ok()
        }),
    ];
    for (kind, use_it) in kinds {
        // Longer than the hard limit, used more often than the soft one.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            assert!(use_it(), "{kind}");
            std::thread::sleep(Duration::from_millis(600));
        }
        assert_eq!(
            server.inspect(&id)["state"],
            "running",
            "{kind} kept it alive"
        );
    }
    // Every event so far: none was an idle warning.
    while let Ok(v) = rx.try_recv() {
        assert_ne!(v["type"], "idle_warning", "{v}");
    }
    let mut ws = ws.into_inner();
    ws.close(None).ok();
    drop(ws);
    let exited = next_of(&rx, "exited", Duration::from_secs(15));
    assert_eq!(exited["reason"], "idle_limit", "{exited}");
    let _ = child.kill();
    let _ = child.wait();
    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}

#[test]
fn cpu_use_counts_as_use_only_when_the_policy_says_so() {
    require_root();
    let server = Server::start();
    // Six seconds of a busy CPU, then nothing.
    let busy = [
        "--",
        "sh",
        "-c",
        "timeout 6 sh -c 'while :; do :; done'; sleep 300",
    ];
    let mut args = vec!["--idle", "2s", "--idle-cpu", "30%"];
    args.extend(busy);
    let counted = server.create(&args);
    let mut args = vec!["--idle", "2s"];
    args.extend(busy);
    let ignored = server.create(&args);
    let started = Instant::now();
    let (mut child, rx) = events(&server, &ignored);
    let exited = next_of(&rx, "exited", Duration::from_secs(10));
    assert_eq!(exited["reason"], "idle_limit", "{exited}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "stopped while busy: CPU use does not count by default"
    );
    let _ = child.kill();
    let _ = child.wait();
    let (mut child, rx) = events(&server, &counted);
    let exited = next_of(&rx, "exited", Duration::from_secs(20));
    assert_eq!(exited["reason"], "idle_limit", "{exited}");
    let v = server.inspect(&counted);
    let lived = v["ended_at_ms"].as_u64().unwrap() - v["started_at_ms"].as_u64().unwrap();
    assert!(
        lived >= 7000,
        "busy for 6 s, then idle for 2 s: lived {lived} ms"
    );
    let _ = child.kill();
    let _ = child.wait();
    for id in [&counted, &ignored] {
        server.cove(&["rm", "-f", id]);
        common::assert_no_leaks(id);
    }
}

#[test]
fn the_pause_action_pauses_and_resuming_counts_as_use() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--idle",
        "2s",
        "--idle-action",
        "pause",
        "--",
        "sleep",
        "300",
    ]);
    let (mut child, rx) = events(&server, &id);
    next_of(&rx, "paused", Duration::from_secs(10));
    let v = server.inspect(&id);
    assert_eq!(
        (v["state"].as_str(), v["reason"].as_str()),
        (Some("paused"), None),
        "{v}"
    );
    assert_eq!(server.cove(&["resume", &id]).code, 0);
    let resumed = Instant::now();
    next_of(&rx, "paused", Duration::from_secs(10));
    assert!(
        resumed.elapsed() >= Duration::from_millis(1500),
        "idle counted from the resume"
    );
    let _ = child.kill();
    let _ = child.wait();
    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}

#[test]
fn impossible_idle_limits_are_refused() {
    require_root();
    let server = Server::start();
    for (args, says) in [
        (
            vec!["--idle", "10s", "--idle-warn", "10s"],
            "shorter than hard",
        ),
        (vec!["--idle", "0s"], "hard must be positive"),
        (
            vec!["--idle", "1m", "--idle-cpu", "0%"],
            "between 1% and 6400%",
        ),
    ] {
        let mut all = vec!["create"];
        all.extend(args.iter().copied());
        all.extend(["--", "true"]);
        let out = server.cove(&all);
        assert_ne!(out.code, 0, "{args:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/sandboxes",
        Some(r#"{"cmd":["true"],"idle":{"hard":"1m","action":"explode"}}"#),
    );
    assert_eq!(code, 400, "{v}");
    let (code, v) = server.curl(
        Some(&server.token),
        "POST",
        "/v1/sandboxes",
        Some(r#"{"cmd":["true"],"idle":{"hard":"1m","cpu_percent":0}}"#),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v.to_string().contains("cpu_percent 0"), "{v}");
}
