//! A real `cove serve` for the end-to-end tests: on loopback, with its own data directory,
//! driven by the `cove` client commands and by curl for raw HTTP.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, Out};

/// A running `cove serve`, stopped (SIGKILL) and its data removed on drop. Sandboxes the test
/// left running are force-removed first.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    /// The edge proxy's cleartext and TLS addresses (`127.0.0.1:PORT`).
    pub proxy_http: String,
    pub proxy_https: String,
    pub data: PathBuf,
    pub token: String,
    /// Everything the server wrote on stderr so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    pub fn start() -> Server {
        common::become_subreaper();
        let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
        Server::start_in(data)
    }

    pub fn start_in(data: PathBuf) -> Server {
        Server::start_with(data, &[])
    }

    /// A server on `data` with more flags. Its background reaper is off unless `extra` sets
    /// `--reap-interval`: a reaper pass is `cove gc`, which tests of the reaper and of `cove
    /// gc` must be able to attribute (see `common::gc_lock`).
    pub fn start_with(data: PathBuf, extra: &[&str]) -> Server {
        common::become_subreaper();
        let reaper: &[&str] = if extra.contains(&"--reap-interval") {
            &[]
        } else {
            &["--reap-interval", "0s"]
        };
        let mut child = Command::new(common::cove_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--proxy-listen",
                "127.0.0.1:0",
                "--proxy-tls-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&data)
            .args(reaper)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut url = None;
        let (mut proxy_http, mut proxy_https) = (String::new(), String::new());
        let mut seen = String::new();
        for _ in 0..10 {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen.push_str(&line);
            if let Some(a) = line.trim().strip_prefix("cove: proxy on http://") {
                proxy_http = a.to_string();
            }
            if let Some(a) = line.trim().strip_prefix("cove: proxy on https://") {
                proxy_https = a.to_string();
            }
            if let Some(u) = line.trim().strip_prefix("cove: listening on ") {
                url = Some(u.to_string());
                break;
            }
        }
        let url = url.unwrap_or_else(|| panic!("the server did not start: {seen}"));
        // Keep draining its stderr so that it never blocks on a full pipe; what it says shows
        // with a failing test's output, and in `log()`.
        let log = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                eprint!("server: {line}");
                kept.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let token = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            child: Some(child),
            url,
            proxy_http,
            proxy_https,
            data,
            token,
            log,
        }
    }

    /// What the server has written on stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `cove ARGS` against this server with `token`.
    pub fn cove_as(&self, token: &str, args: &[&str]) -> Out {
        Out::from(
            Command::new(common::cove_bin())
                .args(args)
                .env("COVE_URL", &self.url)
                .env("COVE_TOKEN", token)
                .output()
                .unwrap(),
        )
    }

    /// Creates a tenant (`body`: the JSON of `POST /v1/tenants`) and returns its token.
    pub fn tenant(&self, body: &str) -> String {
        let (code, v) = self.curl(Some(&self.token), "POST", "/v1/tenants", Some(body));
        assert_eq!(code, 201, "{v}");
        v["token"].as_str().unwrap().to_string()
    }

    pub fn cove(&self, args: &[&str]) -> Out {
        self.cove_as(&self.token, args)
    }

    /// curl: (status, body).
    pub fn curl(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .arg(format!("{}{path}", self.url));
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
            cmd.stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(b) = body {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        let json =
            serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_string()));
        (code.parse().unwrap(), json)
    }

    /// A new tenant `name` with the default quotas (made with the admin token); its token.
    pub fn new_tenant(&self, name: &str) -> String {
        let body = serde_json::json!({ "name": name }).to_string();
        let (code, t) = self.curl(Some(&self.token), "POST", "/v1/tenants", Some(&body));
        assert_eq!(code, 201, "{t}");
        t["token"].as_str().unwrap().to_string()
    }

    pub fn inspect_as(&self, token: &str, id: &str) -> serde_json::Value {
        let out = self.cove_as(token, &["inspect", id]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    pub fn inspect(&self, id: &str) -> serde_json::Value {
        let out = self.cove(&["inspect", id]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    pub fn wait_for_state(&self, id: &str, state: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.inspect(id);
            if v["state"] == state {
                return v;
            }
            assert!(Instant::now() < deadline, "{id} never became {state}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn create(&self, args: &[&str]) -> String {
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        let out = self.cove(&all);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let id = out.stdout.trim().to_string();
        assert_eq!(id.len(), 12, "{}", out.stdout);
        id
    }

    /// `cove create ARGS` as the tenant of `token`; the new id.
    pub fn create_as(&self, token: &str, args: &[&str]) -> String {
        let mut all = vec!["create"];
        all.extend_from_slice(args);
        let out = self.cove_as(token, &all);
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout.trim().to_string()
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    /// How many sockets the server holds open.
    pub fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count()
    }

    /// Sends SIGTERM and waits for the server to exit; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("the server runs");
        common::signal(c.id() as i32, libc::SIGTERM);
        c.wait().unwrap()
    }

    /// Waits up to `limit` for the server to exit on its own: its exit status, or `None` if it
    /// still runs. Exited, it leaves its data directory to the next server started on it.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server killed by the test hands its data directory to the one restarted on it.
        let owned = self.child.is_some();
        if owned {
            let out = self.cove(&["ls", "--json"]);
            for line in out.stdout.lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(line)
                    && let Some(id) = v["id"].as_str()
                {
                    self.cove(&["rm", "-f", id]);
                }
            }
        }
        // Stopped as a user stops it: its warm sandboxes go with it (killed, it would leave
        // them to its next start).
        if let Some(mut c) = self.child.take() {
            common::signal(c.id() as i32, libc::SIGTERM);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if owned {
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }
}

/// `/metrics` as a real Prometheus parser (the OpenMetrics one of Debian's
/// python3-prometheus-client) reads it: sample name → [(labels, value)].
pub fn scrape(
    server: &Server,
    token: &str,
) -> (
    u16,
    std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>>,
) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {token}"),
        ])
        .arg(format!("{}/metrics", server.url))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    let code: u16 = code.parse().unwrap();
    if code != 200 {
        return (code, Default::default());
    }
    let mut parser = Command::new("/usr/bin/python3")
        .args(["-c", "import json, sys\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\nout = {}\nfor fam in parse(sys.stdin.read()):\n    for s in fam.samples:\n        out.setdefault(s.name, []).append([s.labels, s.value])\nprint(json.dumps(out))"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let parsed = parser.wait_with_output().unwrap();
    assert!(
        parsed.status.success(),
        "not valid OpenMetrics: {}\n{body}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    (code, serde_json::from_slice(&parsed.stdout).unwrap())
}

pub fn sample(
    m: &std::collections::BTreeMap<String, Vec<(serde_json::Value, f64)>>,
    name: &str,
    labels: serde_json::Value,
) -> f64 {
    m.get(name)
        .and_then(|s| {
            s.iter()
                .find(|(l, _)| labels.as_object().unwrap().iter().all(|(k, v)| l[k] == *v))
        })
        .map_or(0.0, |(_, v)| *v)
}
