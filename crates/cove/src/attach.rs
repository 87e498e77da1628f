//! `cove exec`'s side of an exec stream (`/v1/sandboxes/{id}/exec/stream`): this terminal or
//! these pipes on one end, the command in the sandbox on the other.

use std::io::Write;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::{self, Message, handshake::client::Request};

/// Puts the terminal on stdin in raw mode until dropped.
struct RawMode(Option<rustix::termios::Termios>);

impl RawMode {
    fn new() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = rustix::termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        match rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw) {
            Ok(()) => RawMode(Some(saved)),
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// This terminal's size (rows, columns), if stdout or stdin is one.
fn window_size() -> Option<(u16, u16)> {
    let try_fd = |fd: &dyn std::os::fd::AsFd| {
        rustix::termios::tcgetwinsize(fd)
            .ok()
            .filter(|w| w.ws_row > 0 && w.ws_col > 0)
            .map(|w| (w.ws_row, w.ws_col))
    };
    try_fd(&std::io::stdout()).or_else(|| try_fd(&std::io::stdin()))
}

/// Runs the exec described by `start` over the stream at `req`; returns its exit code.
pub fn exec(
    req: &Request,
    rt: &tokio::runtime::Runtime,
    mut start: serde_json::Value,
    interactive: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    if tty && let Some((rows, cols)) = window_size() {
        start["rows"] = rows.into();
        start["cols"] = cols.into();
    }
    rt.block_on(run(req.clone(), start, interactive, tty))
}

fn control(v: serde_json::Value) -> Message {
    Message::Text(v.to_string().into())
}

async fn run(
    req: Request,
    start: serde_json::Value,
    interactive: bool,
    tty: bool,
) -> anyhow::Result<i32> {
    let server = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (mut ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(c) => c,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().as_deref().unwrap_or_default();
            return Err(crate::client::Refused::new(status, body).into());
        }
        Err(e @ tungstenite::Error::Io(_)) => {
            return Err(crate::client::unreachable(&server, &e));
        }
        Err(e) => {
            return Err(e).with_context(|| format!("connect to the Cove server at {server}"));
        }
    };
    ws.send(control(start)).await.context("send the command")?;
    // Raw mode only once the server has the command: a failure above leaves the terminal as
    // it was.
    let _raw = (tty && interactive && rustix::termios::isatty(std::io::stdin())).then(RawMode::new);
    // Stdin is read by a thread of its own: a blocking read that never returns must not hold
    // this process's exit.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    if interactive {
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match std::io::Read::read(&mut stdin, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(in_tx);
    }
    let mut stdin_open = true;
    let mut winch = signal(SignalKind::window_change()).context("watch the window size")?;
    let mut int = signal(SignalKind::interrupt()).context("catch SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("catch SIGTERM")?;
    let mut hup = signal(SignalKind::hangup()).context("catch SIGHUP")?;
    let send_signal = |name: &str| control(serde_json::json!({"type": "signal", "signal": name}));
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let data = &b[1..];
                    if b[0] == 2 {
                        let mut err = std::io::stderr().lock();
                        let _ = err.write_all(data);
                        let _ = err.flush();
                    } else {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(data);
                        let _ = out.flush();
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    match v["type"].as_str() {
                        Some("exit") => {
                            if v["timed_out"] == true {
                                eprintln!("cove: the command was killed at its timeout");
                            }
                            let _ = ws.close(None).await;
                            return Ok(v["exit_code"].as_i64().unwrap_or(125) as i32);
                        }
                        Some("error") => {
                            let msg = v["message"].as_str().unwrap_or("the exec failed");
                            // An error about one message (a bad signal name) is not the end.
                            if v["code"] == "bad_request" && !msg.starts_with("bad command") && !msg.starts_with("no command") {
                                eprintln!("cove: {msg}");
                            } else {
                                bail!("{msg}");
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None => bail!("the server closed the stream before the command ended"),
                Some(Err(e)) => return Err(e).context("the stream broke"),
                Some(Ok(_)) => {}
            },
            data = in_rx.recv(), if stdin_open => {
                let msg = match data {
                    Some(bytes) => Message::Binary(bytes.into()),
                    None => {
                        stdin_open = false;
                        control(serde_json::json!({"type": "stdin_close"}))
                    }
                };
                ws.send(msg).await.context("send input")?;
            }
            _ = winch.recv(), if tty => {
                if let Some((rows, cols)) = window_size() {
                    let _ = ws.send(control(serde_json::json!({"type": "resize", "rows": rows, "cols": cols}))).await;
                }
            }
            _ = int.recv() => { let _ = ws.send(send_signal("INT")).await; }
            _ = term.recv() => { let _ = ws.send(send_signal("TERM")).await; }
            _ = hup.recv() => { let _ = ws.send(send_signal("HUP")).await; }
        }
    }
}
