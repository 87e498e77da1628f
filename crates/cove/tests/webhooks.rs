//! Webhooks of `cove serve`: signed, retried with backoff, in order, never holding up the
//! sandbox; registered, listed and removed per tenant; internal addresses refused unless
//! the server allows them. The receiver is a real HTTP server on loopback.

mod common;
mod server_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::require_root;
use server_support::Server;

const SECRET: &str = "a-secret-for-this-test-only";

/// A receiver that answers 500 to its first `fail` requests and 200 after, checking each
/// signature: its port, and one JSON line per request.
fn receiver(fail: u32) -> (Child, u16, mpsc::Receiver<serde_json::Value>) {
    let script = format!(
        r#"
import hashlib, hmac, json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
seen = [0]
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        sig = dict(p.split("=", 1) for p in self.headers["Cove-Signature"].split(","))
        want = hmac.new(b"{SECRET}", sig["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        seen[0] += 1
        status = 500 if seen[0] <= {fail} else 200
        print(json.dumps({{"n": seen[0], "status": status, "event": self.headers["Cove-Event"],
            "delivery": self.headers["Cove-Delivery"], "signed": hmac.compare_digest(want, sig["v1"]),
            "body": json.loads(body)}}), flush=True)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()
s = HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#
    );
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port = line.trim().parse().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&l).unwrap()).is_err() {
                return;
            }
        }
    });
    (child, port, rx)
}

#[test]
fn events_are_signed_retried_in_order_and_never_hold_up_the_sandbox() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let server = Server::start_with(data, &["--webhooks-allow-private"]);
    let (mut child, port, rx) = receiver(2);
    let body = serde_json::json!({
        "url": format!("http://127.0.0.1:{port}/hook"),
        "types": ["running", "exited"],
        "secret": SECRET,
    })
    .to_string();
    let (code, hook) = server.curl(Some(&server.token), "POST", "/v1/webhooks", Some(&body));
    assert_eq!(code, 201, "{hook}");
    assert_eq!(hook["secret"], SECRET);
    let (_, list) = server.curl(Some(&server.token), "GET", "/v1/webhooks", None);
    assert_eq!(list["webhooks"][0]["id"], hook["id"]);
    assert!(
        list["webhooks"][0].get("secret").is_none(),
        "shown once: {list}"
    );

    let started = Instant::now();
    let id = server.create(&["--", "true"]);
    assert_eq!(server.cove(&["wait", &id]).code, 0);
    // The sandbox ended while its first event was still being refused.
    let ended = started.elapsed();
    let mut got = Vec::new();
    while got.len() < 4 {
        got.push(
            rx.recv_timeout(Duration::from_secs(20))
                .expect("a delivery"),
        );
    }
    assert!(got.iter().all(|g| g["signed"] == true), "{got:?}");
    let summary: Vec<(u64, &str, &str)> = got
        .iter()
        .map(|g| {
            (
                g["status"].as_u64().unwrap(),
                g["event"].as_str().unwrap(),
                g["body"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (500, "running", "running"),
            (500, "running", "running"),
            (200, "running", "running"),
            (200, "exited", "exited")
        ],
        "retried, then the next one in order"
    );
    assert_eq!(
        got[0]["delivery"], got[2]["delivery"],
        "the same delivery id on each retry"
    );
    assert_eq!(got[3]["body"]["id"], id.as_str());
    assert_eq!(got[3]["body"]["reason"], "exited");
    // Two retries waited 1 s and 2 s: the sandbox had ended long before.
    assert!(
        started.elapsed() >= ended + Duration::from_secs(2),
        "{ended:?}"
    );

    let path = format!("/v1/webhooks/{}", hook["id"].as_str().unwrap());
    assert_eq!(
        server.curl(Some(&server.token), "DELETE", &path, None).0,
        204
    );
    assert_eq!(
        server.curl(Some(&server.token), "DELETE", &path, None).0,
        404
    );
    let _ = child.kill();
    let _ = child.wait();
    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}

#[test]
fn webhooks_are_per_tenant_and_internal_addresses_are_refused() {
    require_root();
    let server = Server::start();
    let post = |token: &str, body: serde_json::Value| {
        server.curl(Some(token), "POST", "/v1/webhooks", Some(&body.to_string()))
    };
    for url in [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "http://[::1]/",
        "http://10.0.0.1/",
    ] {
        let (code, v) = post(&server.token, serde_json::json!({ "url": url }));
        assert_eq!(code, 400, "{url}: {v}");
    }
    for (body, says) in [
        (serde_json::json!({"url": "ftp://example.com/"}), "http"),
        (
            serde_json::json!({"url": "https://example.com/", "types": ["nope"]}),
            "event type",
        ),
        (
            serde_json::json!({"url": "https://example.com/", "secret": "short"}),
            "secret",
        ),
    ] {
        let (code, v) = post(&server.token, body);
        assert_eq!(code, 400);
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{v}"
        );
    }
    let (code, mine) = post(
        &server.token,
        serde_json::json!({"url": "https://example.com/hook"}),
    );
    assert_eq!(code, 201, "{mine}");
    assert!(
        mine["secret"].as_str().unwrap().len() >= 16,
        "a secret is made"
    );
    let other = server.new_tenant("other");
    let (_, theirs) = server.curl(Some(&other), "GET", "/v1/webhooks", None);
    assert_eq!(theirs["webhooks"], serde_json::json!([]), "{theirs}");
    let path = format!("/v1/webhooks/{}", mine["id"].as_str().unwrap());
    assert_eq!(server.curl(Some(&other), "DELETE", &path, None).0, 404);
    assert_eq!(
        server.curl(Some(&server.token), "DELETE", &path, None).0,
        204
    );
}
