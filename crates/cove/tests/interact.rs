//! Reaching into running sandboxes of `cove serve`: streaming exec over its WebSocket (the
//! `cove exec` client and the raw protocol), terminals, signals, the file API and `cove cp`,
//! and the events stream. Real server, real sandboxes, real clients (curl, `script` for a
//! terminal, a WebSocket client).

mod common;
mod server_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::require_root;
use server_support::Server;
use tokio_tungstenite::tungstenite::{
    self, Message, WebSocket, client::IntoClientRequest, stream::MaybeTlsStream,
};

type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// A WebSocket to `path` of `server` with `token`; the HTTP status when it is refused.
fn ws(server: &Server, token: &str, path: &str) -> Result<Socket, u16> {
    let url = format!("{}{path}", server.url.replacen("http://", "ws://", 1));
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match tungstenite::connect(req) {
        Ok((mut s, _)) => {
            if let MaybeTlsStream::Plain(t) = s.get_mut() {
                t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            }
            Ok(s)
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

fn send_json(s: &mut Socket, v: serde_json::Value) {
    s.send(Message::Text(v.to_string().into())).unwrap();
}

/// What an exec stream delivered until its end.
#[derive(Default, Debug)]
struct Streamed {
    stdout: String,
    stderr: String,
    exit: Option<serde_json::Value>,
    errors: Vec<serde_json::Value>,
}

/// Reads messages into `got` until `until` holds for it or the stream ends.
fn read_until(s: &mut Socket, got: &mut Streamed, until: impl Fn(&Streamed) -> bool) {
    while !until(got) {
        match s.read() {
            Ok(Message::Binary(b)) => {
                let text = String::from_utf8_lossy(&b[1..]).into_owned();
                if b[0] == 2 {
                    got.stderr.push_str(&text);
                } else {
                    got.stdout.push_str(&text);
                }
            }
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "exit" {
                    got.exit = Some(v);
                } else {
                    got.errors.push(v);
                }
            }
            Ok(Message::Close(_)) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn exit_code(got: &Streamed) -> i64 {
    got.exit
        .as_ref()
        .unwrap_or_else(|| panic!("no exit: {got:?}"))["exit_code"]
        .as_i64()
        .unwrap()
}

/// `cove ARGS` with `input` on its stdin.
fn cove_with_input(server: &Server, args: &[&str], input: &[u8]) -> common::Out {
    let mut child = Command::new(common::cove_bin())
        .args(args)
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    common::Out::from(out)
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

/// Whether a process whose command line contains `needle` runs in sandbox `id`.
fn runs_in(server: &Server, id: &str, needle: &str) -> bool {
    let out = server.cove(&["exec", id, "--", "ps", "-eo", "args"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.lines().any(|l| l.contains(needle))
}

#[test]
fn exec_streams_stdio_exit_codes_and_signals() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "1000"]);

    let out = server.cove(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 4",
    ]);
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (4, "out\n", "err\n")
    );
    // Input: 8 MiB through the command, intact.
    let data = random_bytes(8 << 20);
    let out = cove_with_input(&server, &["exec", "-i", &id, "--", "sha256sum"], &data);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(&out.stdout[..64], sha256(&data));
    // Without -i the command's input is empty (it does not wait for the client's).
    let out = cove_with_input(&server, &["exec", &id, "--", "cat"], b"not sent");
    assert_eq!((out.code, out.stdout.as_str()), (0, ""), "{}", out.stderr);
    let out = server.cove(&["exec", &id, "--", "no-such-command"]);
    assert_eq!(out.code, 127, "{}", out.stderr);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    let out = server.cove(&["exec", "--timeout", "1s", &id, "--", "sleep", "30"]);
    assert_eq!(out.code, 137, "{}", out.stderr);
    assert!(out.stderr.contains("timeout"), "{}", out.stderr);
    assert!(
        !runs_in(&server, &id, "sleep 30"),
        "the timed-out command lives on"
    );

    // Ctrl-C at the client reaches the command.
    let mut child = Command::new(common::cove_bin())
        .args(["exec", &id, "--", "sh", "-c"])
        .arg("trap 'echo got INT; exit 9' INT; echo ready; while :; do sleep 0.1; done")
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 64];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = stdout.read(&mut b).unwrap();
        assert!(n > 0, "no ready");
        seen.extend_from_slice(&b[..n]);
    }
    common::signal(child.id() as i32, libc::SIGINT);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(9), "{rest}");
    assert!(rest.contains("got INT"), "{rest}");

    // Many at once.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let (url, token, id) = (server.url.clone(), server.token.clone(), id.clone());
            std::thread::spawn(move || {
                let out = Command::new(common::cove_bin())
                    .args([
                        "exec",
                        &id,
                        "--",
                        "sh",
                        "-c",
                        &format!("echo {i}; exit {i}"),
                    ])
                    .env("COVE_URL", url)
                    .env("COVE_TOKEN", token)
                    .output()
                    .unwrap();
                (i, out)
            })
        })
        .collect();
    for h in handles {
        let (i, out) = h.join().unwrap();
        assert_eq!(out.status.code(), Some(i), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{i}\n"));
    }
}

#[test]
fn exec_stream_protocol_terminal_resize_signals_and_errors() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "1000"]);
    let path = format!("/v1/sandboxes/{id}/exec/stream");

    // A terminal of the sandbox's own, sized as asked and resized on request.
    let mut s = ws(&server, &server.token, &path).unwrap();
    send_json(
        &mut s,
        serde_json::json!({"cmd": ["sh"], "tty": true, "rows": 40, "cols": 120}),
    );
    s.send(Message::Binary(b"tty; stty size\n".to_vec().into()))
        .unwrap();
    let mut got = Streamed::default();
    read_until(&mut s, &mut got, |g| g.stdout.contains("40 120"));
    assert!(got.stdout.contains("/dev/pts/"), "{got:?}");
    send_json(
        &mut s,
        serde_json::json!({"type": "resize", "rows": 50, "cols": 132}),
    );
    send_json(
        &mut s,
        serde_json::json!({"type": "stdin", "data": "stty size; exit 5\n"}),
    );
    read_until(&mut s, &mut got, |g| g.exit.is_some());
    assert!(got.stdout.contains("50 132"), "{got:?}");
    assert_eq!(exit_code(&got), 5);

    // Signals by name go to the command; a bad one is refused and the stream goes on.
    let mut s = ws(&server, &server.token, &path).unwrap();
    send_json(&mut s, serde_json::json!({"cmd": ["sleep", "100"]}));
    send_json(
        &mut s,
        serde_json::json!({"type": "signal", "signal": "SEGV"}),
    );
    send_json(&mut s, serde_json::json!({"type": "bogus"}));
    send_json(
        &mut s,
        serde_json::json!({"type": "signal", "signal": "INT"}),
    );
    let mut got = Streamed::default();
    read_until(&mut s, &mut got, |g| g.exit.is_some());
    assert_eq!(exit_code(&got), 130, "{got:?}");
    assert_eq!(got.errors.len(), 2, "{got:?}");
    assert!(got.errors[0]["message"].as_str().unwrap().contains("INT"));

    // The end of input ends a reader; stdout and stderr stay apart.
    let mut s = ws(&server, &server.token, &path).unwrap();
    send_json(
        &mut s,
        serde_json::json!({"cmd": ["sh", "-c", "cat; echo done >&2"]}),
    );
    s.send(Message::Binary(b"abc".to_vec().into())).unwrap();
    send_json(&mut s, serde_json::json!({"type": "stdin_close"}));
    let mut got = Streamed::default();
    read_until(&mut s, &mut got, |g| g.exit.is_some());
    assert_eq!(
        (got.stdout.as_str(), got.stderr.as_str()),
        ("abc", "done\n")
    );
    assert_eq!(exit_code(&got), 0);

    // A client that goes away takes its command with it.
    let mut s = ws(&server, &server.token, &path).unwrap();
    send_json(&mut s, serde_json::json!({"cmd": ["sleep", "1234"]}));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runs_in(&server, &id, "sleep 1234") {
        assert!(Instant::now() < deadline, "the command never started");
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while runs_in(&server, &id, "sleep 1234") {
        assert!(Instant::now() < deadline, "the command outlived its client");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Bad first messages.
    for (first, want) in [
        (r#"{"cmd": []}"#, "cmd must name a command"),
        (r#"{"cmd": ["true"], "shell": 1}"#, "unknown field"),
        ("not json", "bad command"),
    ] {
        let mut s = ws(&server, &server.token, &path).unwrap();
        s.send(Message::Text(first.into())).unwrap();
        let mut got = Streamed::default();
        read_until(&mut s, &mut got, |g| !g.errors.is_empty());
        let msg = got.errors[0]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{first}: {got:?}");
    }

    // A browser cannot set headers: the token rides as a subprotocol, and the server picks
    // Cove's own.
    let url = format!("{}{path}", server.url.replacen("http://", "ws://", 1));
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("cove.v1, cove.bearer.{}", server.token)
            .parse()
            .unwrap(),
    );
    let (mut s, resp) = tungstenite::connect(req).unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "cove.v1");
    send_json(
        &mut s,
        serde_json::json!({"cmd": ["echo", "from a browser"]}),
    );
    let mut got = Streamed::default();
    read_until(&mut s, &mut got, |g| g.exit.is_some());
    assert_eq!(got.stdout, "from a browser\n");
    let mut req = url.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "cove.v1, cove.bearer.wrong".parse().unwrap(),
    );
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 401),
        other => panic!("{:?}", other.map(|_| ())),
    }

    // Refused before the upgrade: another tenant's sandbox, no token, a plain GET.
    let other = &server.new_tenant("mallory");
    assert_eq!(ws(&server, other, &path).err(), Some(404));
    assert_eq!(ws(&server, "wrong", &path).err(), Some(401));
    let (code, v) = server.curl(Some(&server.token), "GET", &path, None);
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["code"], "websocket_required");

    // Not running: 409, and the CLI says so.
    assert_eq!(server.cove(&["stop", &id]).code, 0);
    server.wait_for_state(&id, "exited");
    assert_eq!(ws(&server, &server.token, &path).err(), Some(409));
    let out = server.cove(&["exec", &id, "--", "true"]);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("not running"), "{}", out.stderr);
}

#[test]
fn exec_it_gives_the_client_terminal_a_real_terminal() {
    require_root();
    let server = Server::start();
    let id = server.create(&["--", "sleep", "1000"]);
    let cove = common::cove_bin();
    // `script` gives `cove exec -it` a terminal, as a user's shell would.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty rows 30 cols 100; {} exec -it {id} -- sh -c 'tty; stty size; exit 3'",
            cove.display()
        ))
        .arg("/dev/null")
        .env("COVE_URL", &server.url)
        .env("COVE_TOKEN", &server.token)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("30 100"), "{text}");
    assert_eq!(out.status.code(), Some(3), "{text}");
}

/// A directory tree to copy: nested files with modes, an empty directory, a symlink.
fn make_tree(root: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    std::fs::write(root.join("a/b/data.bin"), random_bytes(300_000)).unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::symlink("a/b/data.bin", root.join("link")).unwrap();
}

#[test]
fn files_and_cp_round_trip_with_the_sandboxs_permissions() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--user",
        "1000:1000",
        "--memory",
        "1G",
        "--disk",
        "512M",
        "--",
        "sleep",
        "1000",
    ]);
    let work = std::env::temp_dir().join(format!("cove-cp-{}", common::new_id()));
    std::fs::create_dir_all(&work).unwrap();

    // A large file up and down, intact.
    let big = random_bytes(64 << 20);
    std::fs::write(work.join("big"), &big).unwrap();
    let target = format!("{id}:/tmp/");
    let out = server.cove(&["cp", work.join("big").to_str().unwrap(), &target]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cove(&["exec", &id, "--", "sha256sum", "/tmp/big"]);
    assert_eq!(&out.stdout[..64], sha256(&big));
    std::fs::create_dir(work.join("down")).unwrap();
    let out = server.cove(&[
        "cp",
        &format!("{id}:/tmp/big"),
        work.join("down").to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        sha256(&std::fs::read(work.join("down/big")).unwrap()),
        sha256(&big)
    );

    // A tree up (into an existing directory: under its own name) and down again.
    make_tree(&work.join("tree"));
    let out = server.cove(&[
        "cp",
        work.join("tree").to_str().unwrap(),
        &format!("{id}:/tmp"),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cove(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "cd /tmp/tree && ls -ln run.sh && readlink link && sha256sum a/b/data.bin && ls -d empty",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    // Created as the sandbox's user, with the modes the files had.
    assert!(
        out.stdout.contains("-rwxr-x--- 1 1000 1000"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("a/b/data.bin\n"), "{}", out.stdout);
    let local_sum = sha256(&std::fs::read(work.join("tree/a/b/data.bin")).unwrap());
    assert!(out.stdout.contains(&local_sum), "{}", out.stdout);
    let back = work.join("back");
    let out = server.cove(&["cp", &format!("{id}:/tmp/tree"), back.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let diff = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(work.join("tree"))
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        diff.status.success(),
        "{}",
        String::from_utf8_lossy(&diff.stdout)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(back.join("run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o750);
    // A tar on stdin, extracted into a directory.
    let tar = Command::new("tar")
        .arg("-C")
        .arg(work.join("tree"))
        .args(["-cf", "-", "run.sh"])
        .output()
        .unwrap()
        .stdout;
    let out = cove_with_input(&server, &["cp", "-", &format!("{id}:/tmp/fromtar")], &tar);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        server
            .cove(&["exec", &id, "--", "/tmp/fromtar/run.sh"])
            .stdout,
        "hi\n"
    );

    // The raw API: stat, list, mkdir, remove.
    let q = |p: &str| format!("/v1/sandboxes/{id}/files{p}");
    let tok = Some(server.token.as_str());
    let (code, v) = server.curl(tok, "GET", &q("/stat?path=/tmp/tree/run.sh"), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        (
            v["type"].as_str(),
            v["mode"].as_str(),
            v["size"].as_u64(),
            v["uid"].as_u64()
        ),
        (Some("file"), Some("0750"), Some(18), Some(1000))
    );
    // The entry is what the OpenAPI document (docs/openapi.json, served too) says it is.
    let (code, doc) = server.curl(None, "GET", "/openapi.json", None);
    assert_eq!(code, 200);
    let documented: Vec<&String> = doc["components"]["schemas"]["FileEntry"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "link_target")
        .collect();
    let shown: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(shown, documented);
    let committed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json"),
    )
    .unwrap();
    assert_eq!(
        doc,
        serde_json::from_str::<serde_json::Value>(&committed).unwrap()
    );
    let (code, v) = server.curl(tok, "GET", &q("/list?path=/tmp/tree"), None);
    assert_eq!(code, 200, "{v}");
    let names: Vec<&str> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "empty", "link", "run.sh"]);
    assert_eq!(v["entries"][2]["link_target"], "a/b/data.bin");
    let (code, v) = server.curl(tok, "POST", &q("/mkdir?path=/tmp/x/y/z&mode=700"), None);
    assert_eq!((code, v["mode"].as_str()), (201, Some("0700")), "{v}");
    let (code, _) = server.curl(tok, "DELETE", &q("?path=/tmp/x"), None);
    assert_eq!(code, 204);
    let (code, v) = server.curl(tok, "GET", &q("/stat?path=/tmp/x"), None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );

    // The sandbox's permissions, not the server's; clear errors; no host paths or errnos.
    for (method, path, status, code) in [
        // Root of the sandbox belongs to its root, not to user 1000.
        ("POST", "/mkdir?path=/forbidden", 403, "permission_denied"),
        // Init's environment: readable by the host's root, not by the sandbox's user.
        ("GET", "?path=/proc/1/environ", 403, "permission_denied"),
        ("POST", "/mkdir?path=/usr/new", 403, "permission_denied"),
        ("GET", "?path=/no/such/file", 404, "not_found"),
        ("GET", "/list?path=/tmp/tree/run.sh", 409, "not_a_directory"),
        ("GET", "/stat?path=relative", 400, "bad_request"),
        ("GET", "/stat", 400, "bad_request"),
        ("POST", "/mkdir?path=/tmp/q&mode=999", 400, "bad_request"),
    ] {
        let (got, v) = server.curl(tok, method, &q(path), None);
        assert_eq!(
            (got, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {v}"
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains("os error")
                && !msg.contains("/var/lib/cove")
                && !msg.contains(&server.data.display().to_string()),
            "{msg}"
        );
    }
    // Another tenant's sandbox does not exist for it.
    let (_, t) = server.curl(tok, "POST", "/v1/tenants", Some(r#"{"name":"eve"}"#));
    let eve = t["token"].as_str().unwrap();
    let (code, _) = server.curl(Some(eve), "GET", &q("/stat?path=/tmp"), None);
    assert_eq!(code, 404);
    let out = server.cove_as(
        eve,
        &["cp", &format!("{id}:/tmp/big"), work.to_str().unwrap()],
    );
    assert!(
        out.stderr.contains(&format!("no sandbox {id}")),
        "{}",
        out.stderr
    );

    assert_eq!(server.cove(&["rm", "-f", &id]).code, 0);
    common::assert_no_leaks(&id);
    std::fs::remove_dir_all(&work).unwrap();
}

/// Reads newline-delimited JSON events from a `curl -N` of `/v1/events` until `n` arrived.
fn events(
    server: &Server,
    token: &str,
    query: &str,
    n: usize,
) -> std::sync::mpsc::Receiver<Vec<serde_json::Value>> {
    let mut child = Command::new("curl")
        .args(["-sN", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}/v1/events{query}", server.url))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut got = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                got.push(v);
            }
            if got.len() == n {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = tx.send(got);
    });
    // The stream is set up before anything happens.
    std::thread::sleep(Duration::from_millis(300));
    rx
}

fn types(events: &[serde_json::Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

#[test]
fn events_follow_the_lifecycle_filtered_and_replayable() {
    require_root();
    let server = Server::start();
    let other = server.new_tenant("other");
    let all = events(&server, &server.token, "", 7);
    let exits = events(&server, &server.token, "?type=exited&label=user_id=42", 1);
    let theirs = events(&server, &other, "", 1);
    let mut ws_events = ws(&server, &server.token, "/v1/events?type=created").unwrap();

    let id = server.create(&["--label", "user_id=42", "--", "sleep", "1000"]);
    assert_eq!(server.cove(&["pause", &id]).code, 0);
    assert_eq!(server.cove(&["resume", &id]).code, 0);
    assert_eq!(server.cove(&["rm", "-f", &id]).code, 0);

    let got = all.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(
        types(&got),
        [
            "created", "running", "paused", "resumed", "stopping", "exited", "removed"
        ],
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|e| e["id"] == id.as_str() && e["labels"]["user_id"] == "42")
    );
    assert_eq!(got[5]["reason"], "killed");
    let live_times: Vec<u64> = got.iter().map(|e| e["at_ms"].as_u64().unwrap()).collect();
    let got = exits.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(types(&got), ["exited"]);
    match ws_events.read().unwrap() {
        Message::Text(t) => {
            let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
            assert_eq!(
                (v["type"].as_str(), v["id"].as_str()),
                (Some("created"), Some(id.as_str()))
            );
        }
        m => panic!("{m:?}"),
    }
    // Another tenant saw nothing: its stream only has its own sandbox.
    let mine = server.create_as(&other, &["--", "true"]);
    let got = theirs.recv_timeout(Duration::from_secs(30)).unwrap();
    assert_eq!(got[0]["id"], mine.as_str(), "{got:?}");

    // Replay from a revision: the same history again.
    let first = all_revision(&server);
    let replay = events(&server, &server.token, &format!("?since=0&id={id}"), 7);
    let got = replay.recv_timeout(Duration::from_secs(30)).unwrap();
    // A replay tells when things happened, not when they were replayed.
    for i in [0, 1, 5] {
        assert_eq!(
            got[i]["at_ms"].as_u64().unwrap(),
            live_times[i],
            "{:?}",
            got[i]
        );
    }
    assert_eq!(
        types(&got),
        [
            "created", "running", "paused", "resumed", "stopping", "exited", "removed"
        ],
        "{got:?}"
    );
    assert!(first > 0);

    for bad in ["?type=nope", "?id=xyz", "?since=abc", "?color=red"] {
        let (code, v) = server.curl(
            Some(&server.token),
            "GET",
            &format!("/v1/events{bad}"),
            None,
        );
        assert_eq!(code, 400, "{bad}: {v}");
    }
}

/// The store revision the events carry now (a fresh sandbox's creation).
fn all_revision(server: &Server) -> u64 {
    let rx = events(server, &server.token, "?type=created", 1);
    server.create(&["--", "true"]);
    rx.recv_timeout(Duration::from_secs(30)).unwrap()[0]["revision"]
        .as_u64()
        .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn logs_since_a_time_and_over_a_websocket() {
    require_root();
    let server = Server::start();
    let id = server.create(&[
        "--",
        "sh",
        "-c",
        "echo early; sleep 3; echo late; exec sleep 1000",
    ]);
    let logs_until = |want: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = server.cove(&["logs", &id]);
            if out.stdout.contains(want) {
                return;
            }
            assert!(Instant::now() < deadline, "no {want}: {}", out.stdout);
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    logs_until("early");
    // Well inside the quiet gap: past the poll that indexed `early`, before `late`.
    std::thread::sleep(Duration::from_millis(1000));
    let mid = now_ms();
    logs_until("late");
    let out = server.cove(&["logs", "--since", &mid.to_string(), &id]);
    assert_eq!(out.stdout, "late\n", "{}", out.stderr);
    let out = server.cove(&["logs", "--since", "1h", &id]);
    assert_eq!(out.stdout, "early\nlate\n");
    let out = server.cove(&["logs", "--since", "yesterday", &id]);
    assert!(out.stderr.contains("a duration ago"), "{}", out.stderr);

    // Over a WebSocket: what is there, then what comes, then a close when it ends.
    let mut s = ws(
        &server,
        &server.token,
        &format!("/v1/sandboxes/{id}/logs?follow=true"),
    )
    .unwrap();
    let mut got = String::new();
    while !got.contains("late") {
        match s.read().unwrap() {
            Message::Binary(b) => got.push_str(&String::from_utf8_lossy(&b)),
            m => panic!("{m:?}"),
        }
    }
    assert_eq!(got, "early\nlate\n");
    assert_eq!(server.cove(&["stop", &id]).code, 0);
    loop {
        match s.read() {
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(Message::Binary(_)) => {}
            Ok(m) => panic!("{m:?}"),
        }
    }
}

#[test]
fn a_client_that_cannot_reach_the_server_says_so_once() {
    // A port nothing listens on: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Never written: the copy fails before it reads anything.
    let into = std::env::temp_dir().join("cove-unreachable-server-copy");
    for args in [
        vec!["ls"],
        vec!["exec", "abcdefabcdef", "--", "true"],
        vec!["cp", "abcdefabcdef:/etc/hostname", into.to_str().unwrap()],
    ] {
        let out = Command::new(common::cove_bin())
            .args(&args)
            .env("COVE_URL", format!("http://127.0.0.1:{port}"))
            .env("COVE_TOKEN", "x")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.contains("cannot reach the Cove server") && stderr.contains("COVE_URL"),
            "{args:?}: {stderr}"
        );
        assert_eq!(
            stderr.matches("refused").count(),
            1,
            "said once: {args:?}: {stderr}"
        );
    }
}
