//! `--net egress`, end to end against the tests' own small internet (see `egress_support`):
//! the internet and DNS work; cloud metadata, the host and private ranges never do, and every
//! dropped packet is counted and logged (a few lines per second at most); allow and deny
//! lists; the API; nothing left after the sandbox, or after a crash once `cove gc` ran.

mod common;
mod egress_support;
mod server_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Run, require_root};
use egress_support::{DNS, HOST_PORT, Internet, OTHER, PROBE, WEB};

/// `cove run --net egress [extra] -- probe TARGETS`, with the fake internet's resolver: the
/// probe's findings and the run's report.
fn probe(extra: &[&str], targets: &[String]) -> (serde_json::Value, serde_json::Value, String) {
    let mut args = vec!["--net", "egress", "--json"];
    args.extend_from_slice(extra);
    args.extend(["--", "/usr/bin/python3", "-c", PROBE]);
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    args.extend_from_slice(&targets);
    let mut run = Run::new(&args);
    run.env.push(("COVE_EGRESS_DNS".into(), DNS.into()));
    let out = run.output();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let found: serde_json::Value = serde_json::from_str(out.stdout.lines().next().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
    assert!(egress_support::egress_leftovers(&run.id).is_empty());
    (found, out.report(), run.id)
}

#[test]
fn egress_reaches_the_internet_never_metadata_the_host_or_private_ranges() {
    require_root();
    let _net = Internet::start();
    let mut targets = vec![format!("web={WEB}:80"), "name=dns:web.test".to_string()];
    targets.extend(egress_support::blocked_targets());
    let (found, report, id) = probe(&[], &targets);
    assert_eq!(found["web"], format!("open internet {WEB}:80"), "{found}");
    assert_eq!(found["name"], WEB, "DNS through the gateway: {found}");
    for (name, _) in egress_support::BLOCKED {
        assert_eq!(found[name], "timeout", "{name} must be dropped: {found}");
    }
    assert_eq!(found["host_gateway"], "timeout", "{found}");
    assert_eq!(found["host_address"], "timeout", "{found}");
    // Each dropped connection was retried at least once by TCP in 1.5 s: counted, and logged
    // with the sandbox's link.
    let denied = report["egress_denied_packets"].as_u64().unwrap();
    assert!(denied >= 6, "{report}");
    assert!(egress_support::denied_log_lines(&id) >= 6);
    // Without egress, nothing but loopback.
    let out = common::run(&[
        "--",
        "/usr/bin/python3",
        "-c",
        PROBE,
        &format!("web={WEB}:80"),
    ]);
    assert!(out.stdout.contains("error"), "{}", out.stdout);
}

#[test]
fn denied_packets_are_all_counted_but_logged_a_few_per_second() {
    require_root();
    let _net = Internet::start();
    let flood = "import socket, time\nt = time.time()\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                 for _ in range(500):\n    s.sendto(b'x', ('192.168.77.10', 9))\nprint(time.time() - t)";
    let mut run = Run::new(&[
        "--net",
        "egress",
        "--json",
        "--",
        "/usr/bin/python3",
        "-c",
        flood,
    ]);
    run.env.push(("COVE_EGRESS_DNS".into(), DNS.into()));
    let started = Instant::now();
    let out = run.output();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.report()["egress_denied_packets"], 500, "{}", out.stdout);
    let lines = egress_support::denied_log_lines(&run.id);
    // 10 per second, and the limiter's burst of 5.
    let most = (10.0 * (elapsed + 1.0)) as usize + 5;
    assert!(
        lines >= 1 && lines <= most,
        "{lines} lines in {elapsed:.2} s"
    );
}

#[test]
fn allow_and_deny_lists_are_honoured_after_the_fixed_blocks() {
    require_root();
    let _net = Internet::start();
    let targets = [
        format!("web80={WEB}:80"),
        format!("web8080={WEB}:8080"),
        format!("other80={OTHER}:80"),
        "metadata=169.254.169.254:80".to_string(),
    ];
    let (found, report, _) = probe(&["--allow", &format!("{WEB}:80")], &targets);
    assert_eq!(found["web80"], format!("open internet {WEB}:80"), "{found}");
    assert_eq!(found["web8080"], "timeout", "{found}");
    assert_eq!(found["other80"], "timeout", "{found}");
    assert_eq!(found["metadata"], "timeout", "{found}");
    assert!(report["egress_denied_packets"].as_u64().unwrap() >= 3);

    let (found, _, _) = probe(
        &[
            "--deny",
            OTHER,
            "--allow",
            "203.0.113.0/24",
            "--allow",
            "0.0.0.0/0:8080",
        ],
        &targets,
    );
    assert_eq!(found["web80"], format!("open internet {WEB}:80"), "{found}");
    assert_eq!(
        found["web8080"],
        format!("open internet {WEB}:8080"),
        "{found}"
    );
    assert_eq!(found["other80"], "timeout", "deny before allow: {found}");
    assert_eq!(
        found["metadata"], "timeout",
        "0.0.0.0/0 never opens metadata: {found}"
    );

    // What cannot be: clear errors, nothing started.
    for (args, says) in [
        (
            vec!["--net", "egress", "--allow", "10.1.0.0/16"],
            "always blocked",
        ),
        (
            vec!["--net", "egress", "--allow", "169.254.169.254:80"],
            "metadata",
        ),
        (vec!["--allow", "203.0.113.0/24"], "need --net egress"),
        (
            vec!["--net", "egress", "--deny", "203.0.113.1/24"],
            "203.0.113.0/24",
        ),
        (vec!["--net", "wifi"], "egress"),
    ] {
        let mut a = args.clone();
        a.extend(["--", "true"]);
        let out = common::run(&a);
        assert_ne!(out.code, 0, "{args:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
}

#[test]
fn egress_through_the_api_and_nothing_left_after() {
    require_root();
    let _net = Internet::start();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let server = server_support::Server::start_with(data, &["--egress-dns", DNS]);
    let id = server.create(&[
        "--net",
        "egress",
        "--allow",
        "203.0.113.0/24:80",
        "--",
        "sleep",
        "300",
    ]);
    let v = server.inspect(&id);
    assert_eq!(v["spec"]["net"], "egress", "{v}");
    assert_eq!(v["spec"]["egress"]["allow"][0], "203.0.113.0/24:80");
    let out = server.cove(&[
        "exec",
        &id,
        "--",
        "/usr/bin/python3",
        "-c",
        PROBE,
        &format!("web={WEB}:80"),
        &format!("web8080={WEB}:8080"),
        "name=dns:web.test",
        &format!("host=10.88.0.1:{HOST_PORT}"),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let found: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(found["web"], format!("open internet {WEB}:80"), "{found}");
    assert_eq!(found["web8080"], "timeout", "{found}");
    assert_eq!(found["name"], WEB, "{found}");
    assert_eq!(found["host"], "timeout", "{found}");
    // Its traffic and its drops, live.
    let (code, stats) = server.curl(
        Some(&server.token),
        "GET",
        &format!("/v1/sandboxes/{id}/stats"),
        None,
    );
    assert_eq!(code, 200, "{stats}");
    let net = &stats["network"];
    assert!(net["tx_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(net["rx_bytes"].as_u64().unwrap() > 0, "{stats}");
    assert!(
        net["egress_denied_packets"].as_u64().unwrap() >= 2,
        "{stats}"
    );
    let (_, m) = server_support::scrape(&server, &server.token);
    let mine = serde_json::json!({ "id": id });
    assert!(
        server_support::sample(
            &m,
            "cove_sandbox_network_transmit_bytes_total",
            mine.clone()
        ) > 0.0
    );
    assert!(server_support::sample(&m, "cove_sandbox_egress_denied_packets", mine) >= 2.0);
    // Two more sandboxes with egress and no lists: one serves on its address, which it reaches
    // itself; the other cannot reach it.
    let b = server.create(&[
        "--net",
        "egress",
        "--",
        "/usr/bin/python3",
        "-m",
        "http.server",
        "8000",
    ]);
    let c = server.create(&["--net", "egress", "--", "sleep", "300"]);
    let out = server.cove(&[
        "exec", &b, "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
    ]);
    let addr = out
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address: {} {}", out.stdout, out.stderr))
        .to_string();
    assert!(addr.starts_with("10.88."), "{addr}");
    let probe_from = |who: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = server.cove(&[
                "exec",
                who,
                "--",
                "/usr/bin/python3",
                "-c",
                PROBE,
                &format!("b={addr}:8000"),
            ]);
            let found: serde_json::Value = serde_json::from_str(out.stdout.trim())
                .unwrap_or_else(|e| panic!("{e}: {} {}", out.stdout, out.stderr));
            // The server may still be starting (refused): ask again.
            if found["b"] != "refused" || Instant::now() > deadline {
                return found["b"].as_str().unwrap_or("").to_string();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(probe_from(&b).starts_with("open"), "it serves on {addr}");
    assert_eq!(probe_from(&c), "timeout", "another sandbox cannot reach it");
    for s in [&b, &c] {
        assert_eq!(server.cove(&["rm", "-f", s]).code, 0);
        common::assert_no_leaks(s);
    }
    assert!(std::path::Path::new(&format!("/sys/class/net/cv{id}")).exists());
    assert_eq!(
        egress_support::policy_leftovers(&id).len(),
        2,
        "its chain and map entry"
    );
    assert_eq!(server.cove(&["rm", "-f", &id]).code, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !egress_support::egress_leftovers(&id).is_empty()
        || !egress_support::counter_leftovers(&id).is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            egress_support::egress_leftovers(&id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    common::assert_no_leaks(&id);
}

#[test]
fn cove_gc_removes_the_egress_state_of_a_crashed_sandbox() {
    require_root();
    common::become_subreaper();
    let _net = Internet::start();
    let id = common::new_id();
    let mut child = Command::new(common::cove_bin())
        .args([
            "run",
            "--id",
            &id,
            "--net",
            "egress",
            "--allow",
            "203.0.113.0/24",
        ])
        .args(["--", "sleep", "300"])
        .env("COVE_EGRESS_DNS", DNS)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while egress_support::policy_leftovers(&id).len() < 2 {
        assert!(Instant::now() < deadline, "egress was not set up");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The supervisor dies without its teardown.
    common::signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    let _gc = common::gc_lock(false);
    let out = Command::new(common::cove_bin()).arg("gc").output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("sb_{id}")), "{said}");
    common::reap_orphans(&id);
    assert_eq!(
        egress_support::egress_leftovers(&id),
        Vec::<String>::new(),
        "{said}"
    );
    common::assert_no_leaks(&id);
}
