//! The egress tests' own small internet: a network namespace they create, reached from the host
//! through a veth (203.0.113.0/24, a documentation range), serving HTTP and DNS, and holding
//! the addresses sandboxes must never reach (a "metadata service" on 169.254.169.254, private
//! and shared ranges). Those are routed to it only for packets from the sandboxes' subnet (a
//! routing rule of its own), so the host's own routes are never changed. Nothing leaves the
//! machine. One test at a time holds it (a lock), since its addresses are fixed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

pub const NETNS: &str = "covetest-inet";
const LINK: &str = "covetest0";
const TABLE: &str = "1088";
/// Addresses the policy always blocks, each served by the fake internet.
pub const BLOCKED: &[(&str, &str)] = &[
    ("metadata", "169.254.169.254"),
    ("rfc1918", "192.168.77.10"),
    ("cgnat", "100.64.7.10"),
    ("private172", "172.16.7.10"),
];
pub const WEB: &str = "203.0.113.10";
pub const OTHER: &str = "203.0.113.11";
pub const DNS: &str = "203.0.113.53";
/// The host's own address on the link to the fake internet.
pub const HOST: &str = "203.0.113.1";
/// A port a host service listens on (on every host address).
pub const HOST_PORT: u16 = 9999;

pub const PROBE: &str = include_str!("probe.py");

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {}", args.join(" "));
}

fn teardown() {
    ip(&["netns", "del", NETNS]);
    ip(&["link", "del", LINK]);
    while ip(&["rule", "del", "pref", TABLE]) {}
    ip(&["route", "flush", "table", TABLE]);
}

pub struct Internet {
    servers: Vec<Child>,
    _lock: std::fs::File,
}

fn wait_ready(child: &mut Child) {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "a fake internet server did not start");
}

impl Internet {
    pub fn start() -> Internet {
        let lock = std::fs::File::create("/run/cove-test-egress.lock").unwrap();
        lock.lock().unwrap();
        teardown();
        must(&["netns", "add", NETNS]);
        must(&[
            "link", "add", LINK, "type", "veth", "peer", "name", "eth0", "netns", NETNS,
        ]);
        must(&["addr", "add", &format!("{HOST}/24"), "dev", LINK]);
        must(&["link", "set", LINK, "up"]);
        for a in [WEB, OTHER, DNS] {
            must(&[
                "-n",
                NETNS,
                "addr",
                "add",
                &format!("{a}/24"),
                "dev",
                "eth0",
            ]);
        }
        for (_, a) in BLOCKED {
            must(&[
                "-n",
                NETNS,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "eth0",
            ]);
        }
        must(&["-n", NETNS, "link", "set", "lo", "up"]);
        must(&["-n", NETNS, "link", "set", "eth0", "up"]);
        must(&["-n", NETNS, "route", "add", "default", "via", HOST]);
        must(&[
            "rule",
            "add",
            "from",
            "10.88.0.0/16",
            "lookup",
            TABLE,
            "pref",
            TABLE,
        ]);
        for (_, a) in BLOCKED {
            must(&[
                "route",
                "add",
                &format!("{a}/32"),
                "via",
                WEB,
                "table",
                TABLE,
            ]);
        }
        let mut servers = Vec::new();
        let mut inet = Command::new("ip")
            .args(["netns", "exec", NETNS, "/usr/bin/python3", "-c"])
            .arg(include_str!("internet.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_ready(&mut inet);
        servers.push(inet);
        let mut host = Command::new("/usr/bin/python3")
            .args([
                "-c",
                &format!(
                    "import socket\ns = socket.socket()\n\
                     s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                     s.bind(('0.0.0.0', {HOST_PORT}))\ns.listen(16)\nprint('ready', flush=True)\n\
                     while True:\n    c, _ = s.accept()\n    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nthe host\\n')\n    c.close()\n"
                ),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        wait_ready(&mut host);
        servers.push(host);
        Internet {
            servers,
            _lock: lock,
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        teardown();
    }
}

/// The probe's targets for every always-blocked destination and the host's own addresses.
pub fn blocked_targets() -> Vec<String> {
    let mut t: Vec<String> = BLOCKED.iter().map(|(n, a)| format!("{n}={a}:80")).collect();
    t.push(format!("host_gateway=10.88.0.1:{HOST_PORT}"));
    t.push(format!("host_address={HOST}:{HOST_PORT}"));
    t
}

/// Kernel log lines of denied egress packets of the link `cv<id>`.
pub fn denied_log_lines(id: &str) -> usize {
    let out = Command::new("dmesg").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("cove egress denied: ") && l.contains(&format!("IN=cv{id} ")))
        .count()
}

/// The egress objects of sandbox `id` still on the host: its link `cv<id>` (which the kernel
/// removes with the sandbox's network namespace, asynchronously: given a few seconds), and its
/// nftables chain `sb_<id>` with its map entry. (Its drop counters expire on their own.)
pub fn egress_leftovers(id: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/sys/class/net/cv{id}")).exists()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut left = Vec::new();
    if ip(&["link", "show", &format!("cv{id}")]) {
        left.push(format!("link cv{id}"));
    }
    left.extend(policy_leftovers(id));
    left
}

/// Lines of the egress table that mention `what`.
fn table_lines(what: &str) -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "cove"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(what))
        .map(|l| l.trim().to_string())
        .collect()
}

/// Sandbox `id`'s drop counter and log limiter, if still in their sets.
pub fn counter_leftovers(id: &str) -> Vec<String> {
    table_lines(&format!("\"cv{id}\""))
}

/// The nftables chain `sb_<id>` and its map entry, if still there.
pub fn policy_leftovers(id: &str) -> Vec<String> {
    table_lines(&format!("sb_{id}"))
}
