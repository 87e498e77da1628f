//! The edge proxy of `cove serve`, end to end: a real HTTP server inside a real sandbox,
//! reached through the proxy by curl (HTTP/1.1, HTTP/2, TLS) and a WebSocket client, by host,
//! headers and path; private sandboxes, signed URLs, tenants; and the proxy's own answers.

mod common;
mod server_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::require_root;
use server_support::{Server, sample, scrape};
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

const UPSTREAM: &str = include_str!("proxy_support/upstream.py");
const PORT: &str = "8000";

/// A sandbox of `token`'s tenant running the test server on port 8000, once it answers.
fn upstream(server: &Server, token: &str, extra: &[&str]) -> String {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["--", "/usr/bin/python3", "-c", UPSTREAM, PORT]);
    let id = server.create_as(token, &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = server.cove_as(
            token,
            &[
                "exec",
                &id,
                "--",
                "/usr/bin/python3",
                "-c",
                "import socket; socket.create_connection(('127.0.0.1', 8000)).close()",
            ],
        );
        if out.code == 0 {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not come up: {}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One curl exchange.
struct Reply {
    code: u16,
    version: String,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.code, self.body))
    }
}

/// curl with `args` (the URL among them); the status, HTTP version, headers and body.
fn curl(args: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args([
            "-s",
            "-D",
            "/dev/stderr",
            "-w",
            "\n%{http_code} %{http_version}",
            "--max-time",
            "30",
        ])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, last) = text.rsplit_once('\n').unwrap();
    let (code, version) = last.split_once(' ').unwrap();
    Reply {
        code: code.parse().unwrap(),
        version: version.to_string(),
        headers: String::from_utf8_lossy(&out.stderr).to_lowercase(),
        body: body.to_string(),
    }
}

fn host(id: &str, port: &str) -> String {
    format!("{port}-{id}.cove.localhost")
}

fn token_of(server: &Server, tenant_token: &str, id: &str) -> String {
    let out = server.cove_as(tenant_token, &["url", "--access-token", id, PORT]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.trim().to_string()
}

#[test]
fn proxy_reaches_a_sandbox_port_by_host_header_and_path() {
    require_root();
    let server = Server::start();
    let id = upstream(&server, &server.token, &[]);
    let cert = server.data.join("proxy-tls/cove.localhost.crt");
    let https = &server.proxy_https;
    let http = &server.proxy_http;

    // The signed URL, over TLS, verified against the self-signed certificate, in HTTP/2.
    let out = server.cove(&["url", &id, PORT]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let url = out.stdout.trim().to_string();
    let port = https.rsplit_once(':').unwrap().1;
    assert!(
        url.starts_with(&format!(
            "https://{}:{port}/?cove_expires=",
            host(&id, PORT)
        )),
        "{url}"
    );
    let connect_to = format!("::{https}");
    let r = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "--connect-to",
        &connect_to,
        "--http2",
        &url,
    ]);
    assert_eq!(
        (r.code, r.version.as_str()),
        (200, "2"),
        "{} {}",
        r.headers,
        r.body
    );
    let seen = r.json();
    assert_eq!(seen["path"], "/", "the signature is not forwarded: {seen}");
    assert_eq!(
        seen["headers"]["host"],
        format!("{}:{port}", host(&id, PORT))
    );
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");
    let cookie = r
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a signed URL leaves a cookie")
        .to_string();
    assert!(
        cookie.contains("httponly") && cookie.contains("secure"),
        "{cookie}"
    );
    // The cookie alone opens the sandbox afterwards, and is not forwarded to it.
    let value = cookie.split(';').next().unwrap().trim().to_string();
    let plain = format!("https://{}:{port}/info?x=1", host(&id, PORT));
    let with_cookie = format!("{value}; theme=dark");
    let r = curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "--connect-to",
        &connect_to,
        "-b",
        &with_cookie,
        &plain,
    ]);
    assert_eq!(r.code, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["cookie"], "theme=dark");
    assert_eq!(r.json()["path"], "/info?x=1");

    // The access token in a header, over cleartext HTTP/1.1, by host; twice on one connection.
    let token = token_of(&server, &server.token, &id);
    let token_header = format!("Cove-Access-Token: {token}");
    let host_header = format!("Host: {}", host(&id, PORT));
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
            "-H",
            &token_header,
            "-H",
            &host_header,
        ])
        .arg(format!("http://{http}/a"))
        .arg(format!("http://{http}/b"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 1\n200 0\n",
        "kept alive"
    );
    let r = curl(&[
        "-H",
        &token_header,
        "-H",
        &host_header,
        &format!("http://{http}/info"),
    ]);
    let seen = r.json();
    assert!(seen["headers"].get("cove-access-token").is_none(), "{seen}");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "http");

    // The headers form, and HTTP/2 in cleartext (prior knowledge).
    let r = curl(&[
        "--http2-prior-knowledge",
        "-H",
        &token_header,
        "-H",
        &format!("Cove-Sandbox-Id: {id}"),
        "-H",
        &format!("Cove-Sandbox-Port: {PORT}"),
        &format!("http://{http}/info"),
    ]);
    assert_eq!((r.code, r.version.as_str()), (200, "2"), "{}", r.body);
    let seen = r.json();
    assert!(seen["headers"].get("cove-sandbox-id").is_none(), "{seen}");
    assert!(
        seen["headers"]["host"].is_string(),
        "a Host for HTTP/1.1 upstream: {seen}"
    );

    // The path form: the prefix goes; without its slash, a redirect.
    let base = format!("http://{http}/proxy/{id}/{PORT}");
    let r = curl(&["-H", &token_header, &format!("{base}/deep/path?q=1&r=2")]);
    assert_eq!(r.json()["path"], "/deep/path?q=1&r=2");
    let r = curl(&["-H", &token_header, &base]);
    assert_eq!(r.code, 308);
    assert!(
        r.headers
            .contains(&format!("location: /proxy/{id}/{PORT}/")),
        "{}",
        r.headers
    );

    // A large body both ways, streamed.
    let big = std::env::temp_dir().join(format!("cove-proxy-big-{id}"));
    let data: Vec<u8> = (0..24 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    std::fs::write(&big, &data).unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "--fail",
            "-H",
            &token_header,
            "-H",
            "Content-Type: application/octet-stream",
        ])
        .arg("--data-binary")
        .arg(format!("@{}", big.display()))
        .arg(format!("{base}/echo"))
        .output()
        .unwrap();
    std::fs::remove_file(&big).unwrap();
    assert!(out.status.success());
    assert!(
        out.stdout == data,
        "{} bytes back of {}",
        out.stdout.len(),
        data.len()
    );

    // A streamed answer: its first part arrives while the server still holds the rest back.
    let mut stream = Command::new("curl")
        .args(["-s", "-N", "-H", &token_header])
        .arg(format!("{base}/stream"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(stream.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line, "first\n");
    let out = server.cove(&["exec", &id, "--", "touch", "/tmp/go"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line, "second\n");
    assert!(stream.wait().unwrap().success());

    // A WebSocket through the path form: text and binary messages echo.
    let ws_url = format!("ws://{http}/proxy/{id}/{PORT}/ws");
    let mut req = ws_url.into_client_request().unwrap();
    req.headers_mut()
        .insert("cove-access-token", token.parse().unwrap());
    let (mut ws, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through the proxy")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello through the proxy"));
    let blob: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(blob));
    ws.close(None).unwrap();

    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}

#[test]
fn private_sandboxes_need_their_own_credentials() {
    require_root();
    let server = Server::start();
    let other = server.new_tenant("other");
    let id = upstream(&server, &server.token, &[]);
    let theirs = upstream(&server, &other, &[]);
    let public = upstream(&server, &other, &["--public"]);
    let http = &server.proxy_http;
    let at = |id: &str| format!("http://{http}/proxy/{id}/{PORT}/info");
    let with =
        |token: &str, id: &str| curl(&["-H", &format!("Cove-Access-Token: {token}"), &at(id)]);

    // Nothing: 401, saying what would do.
    let r = curl(&[&at(&id)]);
    assert_eq!(r.code, 401);
    assert_eq!(r.json()["error"]["code"], "access_denied");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cove url"),
        "{}",
        r.body
    );
    // Its own token opens it; another sandbox's (another tenant's) does not.
    assert_eq!(with(&token_of(&server, &server.token, &id), &id).code, 200);
    let their_token = token_of(&server, &other, &theirs);
    assert_eq!(with(&their_token, &theirs).code, 200);
    assert_eq!(
        with(&their_token, &id).code,
        401,
        "a tenant's token for another's sandbox"
    );
    assert_eq!(with("0".repeat(64).as_str(), &id).code, 401);
    assert_eq!(with("not-hex", &id).code, 401);
    // Another tenant cannot even ask for its URL or token.
    let out = server.cove_as(&other, &["url", &id, PORT]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("404"), "{}", out.stderr);

    // Signed URLs: bound to their sandbox and port, and to their expiry.
    let signed = |id: &str, port: &str, expires: &str| {
        let out = server.cove(&["url", "--expires", expires, id, port]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let url = out.stdout.trim().to_string();
        url.split_once('?').unwrap().1.to_string()
    };
    let q = signed(&id, PORT, "1h");
    assert_eq!(curl(&[&format!("{}?{q}", at(&id))]).code, 200);
    let other_port = signed(&id, "8001", "1h");
    assert_eq!(
        curl(&[&format!("{}?{other_port}", at(&id))]).code,
        401,
        "signed for another port"
    );
    let tampered = q.replace("cove_expires=", "cove_expires=9");
    assert_eq!(
        curl(&[&format!("{}?{tampered}", at(&id))]).code,
        401,
        "moved expiry"
    );
    let short = signed(&id, PORT, "1s");
    std::thread::sleep(Duration::from_millis(2100));
    let r = curl(&[&format!("{}?{short}", at(&id))]);
    assert_eq!(r.code, 401, "expired: {}", r.body);

    // A public sandbox needs nothing, and `cove url` gives its plain URL.
    assert_eq!(curl(&[&at(&public)]).code, 200);
    let out = server.cove_as(&other, &["url", &public, PORT]);
    assert!(!out.stdout.contains("cove_sig"), "{}", out.stdout);
    assert_eq!(server.inspect_as(&other, &public)["public"], true);

    for (t, s) in [(&server.token, &id), (&other, &theirs), (&other, &public)] {
        server.cove_as(t, &["rm", "-f", s]);
        common::assert_no_leaks(s);
    }
}

#[test]
fn the_proxy_explains_what_it_cannot_reach() {
    require_root();
    let data = std::env::temp_dir().join(format!("cove-serve-{}", common::new_id()));
    let server = Server::start_with(data, &["--proxy-upstream-timeout", "1s"]);
    let id = upstream(&server, &server.token, &["--public"]);
    let sockets = server.sockets();
    let http = &server.proxy_http;
    let get = |path: &str| curl(&[&format!("http://{http}{path}")]);
    let code = |r: &Reply| {
        (
            r.code,
            r.json()["error"]["code"].as_str().unwrap_or("").to_string(),
        )
    };

    assert_eq!(code(&get("/")), (404, "no_route".into()));
    assert_eq!(
        code(&get("/proxy/0123456789ab/80/")),
        (404, "sandbox_not_found".into())
    );
    assert_eq!(code(&get("/proxy/nope/80/")), (400, "bad_route".into()));
    assert_eq!(
        code(&get(&format!("/proxy/{id}/99999/"))),
        (400, "bad_route".into())
    );
    let r = curl(&["-H", "Host: 80.cove.localhost", &format!("http://{http}/")]);
    assert_eq!(code(&r), (400, "bad_route".into()));
    let r = get(&format!("/proxy/{id}/8001/"));
    assert_eq!(code(&r), (502, "nothing_listening".into()));
    assert!(r.body.contains("port 8001"), "{}", r.body);
    let r = get(&format!("/proxy/{id}/{PORT}/slow"));
    assert_eq!(code(&r), (504, "upstream_timeout".into()));

    // Paused: 503 until resumed; ended: 410.
    assert_eq!(server.cove(&["pause", &id]).code, 0);
    let r = get(&format!("/proxy/{id}/{PORT}/info"));
    assert_eq!(code(&r), (503, "paused".into()));
    assert!(r.headers.contains("retry-after: 1"), "{}", r.headers);
    assert_eq!(server.cove(&["resume", &id]).code, 0);
    assert_eq!(get(&format!("/proxy/{id}/{PORT}/info")).code, 200);
    // Seen from inside the sandbox's network namespace (its init's view): the proxy keeps a
    // connection to the port open.
    // The last line of the sandbox directory's lock names its init.
    let lock =
        std::fs::read_to_string(server.data.join("sandboxes").join(&id).join("lock")).unwrap();
    let init = lock.lines().last().unwrap().trim().to_string();
    let tcp = std::fs::read_to_string(format!("/proc/{init}/net/tcp")).unwrap();
    let port = format!(":{:04X}", PORT.parse::<u16>().unwrap());
    assert!(
        tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&port) && f[3] == "01"
        }),
        "a connection to the sandbox is kept alive: {tcp}"
    );
    assert_eq!(server.cove(&["stop", &id]).code, 0);
    server.wait_for_state(&id, "exited");
    assert_eq!(
        code(&get(&format!("/proxy/{id}/{PORT}/info"))),
        (410, "sandbox_ended".into())
    );

    // The connections the proxy kept to the sandbox closed with it (each one would hold its
    // network namespace).
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.sockets() > sockets {
        assert!(
            Instant::now() < deadline,
            "{} sockets, {sockets} before",
            server.sockets()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every request was counted, by status class.
    let (_, m) = scrape(&server, &server.token);
    let n = |class: &str| {
        sample(
            &m,
            "cove_proxy_requests_total",
            serde_json::json!({"status": class}),
        )
    };
    assert_eq!((n("2xx"), n("3xx")), (1.0, 0.0));
    assert_eq!(n("4xx"), 6.0, "{m:?}");
    assert_eq!(n("5xx"), 3.0);
    assert!(
        sample(
            &m,
            "cove_proxy_request_duration_seconds_count",
            serde_json::json!({"status": "2xx"})
        ) >= 1.0
    );

    server.cove(&["rm", "-f", &id]);
    common::assert_no_leaks(&id);
}
