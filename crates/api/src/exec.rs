//! Running commands in sandboxes: `POST /v1/sandboxes/{id}/exec` collects a command's output;
//! `GET /v1/sandboxes/{id}/exec/stream` is a WebSocket carrying stdin, stdout, stderr, window
//! sizes, signals and the exit code, with an optional terminal (see docs/api.md).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use cove_types::{SandboxId, SandboxRecord, SandboxState, frame};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{Api, ApiError, body, caller, load};

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Environment on top of the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the sandbox's).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Longest the command may run (default 60s, at most 1h; a stream has none by default);
    /// it is killed then.
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "60s")]
    pub timeout: Option<cove_types::Duration>,
}

/// What an exec produced.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecOutput {
    /// The command's exit code (128+N after signal N; 127 not found, 126 not executable).
    pub exit_code: i32,
    /// Its standard output (lossy UTF-8), at most [`MAX_EXEC_OUTPUT`] bytes.
    pub stdout: String,
    /// Its standard error, likewise.
    pub stderr: String,
    /// Whether output beyond the limit was dropped.
    pub truncated: bool,
    /// Whether the timeout killed it.
    pub timed_out: bool,
}

/// Most output kept per stream of an exec.
pub const MAX_EXEC_OUTPUT: usize = 10 << 20;
/// Longest an exec may run.
pub const MAX_EXEC_TIMEOUT: Duration = Duration::from_secs(3600);
/// An exec's timeout when the request names none.
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a job could not run.
#[derive(Debug)]
pub enum ExecError {
    /// The sandbox is not running (any more).
    NotRunning,
    /// Something on the host failed (logged by the server, not shown to the tenant).
    Internal(String),
}

/// An operation of the file API (see `files`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOp {
    /// Metadata of one path.
    Stat,
    /// A directory's entries.
    List,
    /// A file's bytes, or a tar of a directory.
    Read,
    /// The input into a file.
    Write,
    /// A tar on the input extracted into a directory.
    Untar,
    /// A directory and its parents.
    Mkdir,
    /// A file, or a directory with everything in it.
    Remove,
}

impl FileOp {
    /// Its name on the helper's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FileOp::Stat => "stat",
            FileOp::List => "list",
            FileOp::Read => "read",
            FileOp::Write => "write",
            FileOp::Untar => "untar",
            FileOp::Mkdir => "mkdir",
            FileOp::Remove => "remove",
        }
    }

    /// Whether it reads an input.
    pub fn takes_input(self) -> bool {
        matches!(self, FileOp::Write | FileOp::Untar)
    }
}

impl std::str::FromStr for FileOp {
    type Err = String;

    fn from_str(s: &str) -> Result<FileOp, String> {
        [
            FileOp::Stat,
            FileOp::List,
            FileOp::Read,
            FileOp::Write,
            FileOp::Untar,
            FileOp::Mkdir,
            FileOp::Remove,
        ]
        .into_iter()
        .find(|op| op.as_str() == s)
        .ok_or_else(|| format!("unknown file operation {s:?}"))
    }
}

/// Work done inside a running sandbox.
#[derive(Debug, Clone)]
pub enum Job {
    /// A command; `stream: Some(tty)` makes its stdin a control stream of
    /// [`cove_types::frame`]s (with a terminal if `tty`), `None` gives it no input.
    Exec {
        /// The command.
        req: ExecRequest,
        /// Streaming, and with a terminal or not.
        stream: Option<bool>,
    },
    /// A file operation, with the sandbox's permissions.
    Files {
        /// Which.
        op: FileOp,
        /// On what (absolute, in the sandbox).
        path: String,
        /// Permission bits of what it creates.
        mode: Option<u32>,
    },
}

/// A running job: its input, its output, and its end.
pub struct Session {
    /// The job's input (frames for a stream, bytes for a file write; a sink otherwise).
    /// Dropping it ends a stream's command.
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// Its standard output.
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// Its standard error.
    pub stderr: Box<dyn AsyncRead + Send + Unpin>,
    /// Ends the job now (its command's whole process group).
    pub stop: Box<dyn Fn() + Send + Sync>,
    /// Its exit code, once it has ended.
    pub done: std::pin::Pin<Box<dyn std::future::Future<Output = Result<i32, ExecError>> + Send>>,
}

/// Starts jobs inside sandboxes. The binary provides it (a helper process per job); the API
/// only knows the shape.
pub trait Executor: Send + Sync + 'static {
    /// Starts `job` in the running sandbox `id`.
    fn start(&self, id: SandboxId, job: Job) -> Result<Session, ExecError>;
}

fn check(req: &ExecRequest) -> Result<(), ApiError> {
    if req.cmd.is_empty() || req.cmd[0].is_empty() {
        return Err(ApiError::bad("cmd must name a command"));
    }
    if req.cmd.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::bad("cmd contains a NUL byte"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(ApiError::bad(format!(
                "env {k:?}: names are non-empty, without '=' or NUL"
            )));
        }
    }
    if let Some(w) = &req.workdir
        && !w.starts_with('/')
    {
        return Err(ApiError::bad("workdir must be an absolute path"));
    }
    if req.timeout.is_some_and(|t| t.as_std() > MAX_EXEC_TIMEOUT) {
        return Err(ApiError::bad("timeout is at most 1h"));
    }
    Ok(())
}

pub(crate) fn not_running(id: &str, state: Option<SandboxState>) -> ApiError {
    let message = match state {
        Some(s) => format!("sandbox {id} is {}, not running", s.as_str()),
        None => format!("sandbox {id} is not running"),
    };
    ApiError::new(StatusCode::CONFLICT, "not_running", message)
}

/// The caller's sandbox `id`, which must be running.
pub(crate) async fn running(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
) -> Result<SandboxRecord, ApiError> {
    let who = caller(&api.store, headers).await?;
    let (record, _) = load(api, &who, id).await?;
    if record.state != SandboxState::Running {
        return Err(not_running(id, Some(record.state)));
    }
    // Every exec and file operation starts here: use, for the idle limits.
    api.activity.touch(record.id);
    Ok(record)
}

/// The tenant's view of a failed job start or end.
pub(crate) fn job_failure(id: &str, e: ExecError) -> ApiError {
    match e {
        ExecError::NotRunning => not_running(id, None),
        ExecError::Internal(detail) => {
            tracing::error!(sandbox = %id, error = %detail, "a job in the sandbox failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the command could not be started",
            )
        }
    }
}

/// Reads all of `r`, keeping at most [`MAX_EXEC_OUTPUT`] bytes: (kept, whether any was
/// dropped).
async fn collect(r: &mut (dyn AsyncRead + Send + Unpin)) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_EXEC_OUTPUT.saturating_sub(kept.len());
                truncated |= n > room;
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
    (kept, truncated)
}

/// How long a stopped job has to end before its helper is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), request_body = ExecRequest, responses((status = 200, description = "Success", body = ExecOutput), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn exec_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ExecRequest = body(raw)?;
    let record = running(&api, &headers, &id).await?;
    check(&req)?;
    let timeout = req.timeout.map_or(DEFAULT_EXEC_TIMEOUT, |t| t.as_std());
    let mut s = api
        .executor
        .start(record.id, Job::Exec { req, stream: None })
        .map_err(|e| job_failure(&id, e))?;
    let work = async {
        let ((o, ot), (e, et), status) = tokio::join!(
            collect(&mut *s.stdout),
            collect(&mut *s.stderr),
            &mut s.done
        );
        (o, ot || et, e, status)
    };
    let (stdout, truncated, stderr, status, timed_out) =
        match tokio::time::timeout(timeout, work).await {
            Ok((o, t, e, status)) => (o, t, e, status, false),
            Err(_) => {
                (s.stop)();
                // Past the grace the answer goes out; the helper still ends the command.
                let status = tokio::time::timeout(STOP_GRACE, &mut s.done)
                    .await
                    .unwrap_or(Ok(137));
                (Vec::new(), false, Vec::new(), status, true)
            }
        };
    let status = status.map_err(|e| job_failure(&id, e))?;
    Ok(Json(ExecOutput {
        exit_code: if timed_out { 137 } else { status },
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        truncated,
        timed_out,
    })
    .into_response())
}

/// The first message of an exec stream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamRequest {
    cmd: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    timeout: Option<cove_types::Duration>,
    /// Give the command a terminal.
    #[serde(default)]
    tty: bool,
    /// The terminal's size (default 24 × 80).
    #[serde(default)]
    rows: Option<u16>,
    #[serde(default)]
    cols: Option<u16>,
}

/// A client's message after the first.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Control {
    /// Input as text (binary messages carry input as bytes).
    Stdin { data: String },
    /// The end of the input.
    StdinClose,
    /// The terminal's new size.
    Resize { rows: u16, cols: u16 },
    /// A signal for the command's process group, by name (`INT`, `SIGTERM`) or number.
    Signal { signal: String },
}

/// Channel bytes of output messages.
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
/// How long output is still relayed after the command ended (what its background processes
/// may still write does not hold the stream open).
const DRAIN: Duration = Duration::from_millis(200);

#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec", description = "A WebSocket: the first message is the command (`cmd`, `env`, `workdir`, `timeout`, `tty`, `rows`, `cols`); then binary messages are stdin, and text messages `stdin`, `stdin_close`, `resize`, `signal`. The server sends binary stdout (first byte 1) and stderr (2), then an `exit` message with `exit_code`. See docs/api.md.", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 101, description = "Switching to the WebSocket protocol"), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn exec_stream(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let record = running(&api, &headers, &id).await?;
    let ws = ws.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            format!("this endpoint is a WebSocket: {}", e.body_text()),
        )
    })?;
    Ok(ws
        .protocols([crate::WS_PROTOCOL])
        .max_message_size(2 * frame::MAX)
        .on_upgrade(move |socket| async move {
            let mut socket = socket;
            if let Err(e) = stream(&api, &id, record.id, &mut socket).await {
                let _ = send_json(&mut socket, &error_message(&e)).await;
            }
            close(socket).await;
        }))
}

/// The closing handshake: what the client still sends is read until its close (a socket
/// closed with unread input is reset, and the reset can destroy the last messages before the
/// client reads them).
async fn close(mut socket: WebSocket) {
    if socket.send(Message::Close(None)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

fn error_message(e: &ApiError) -> serde_json::Value {
    serde_json::json!({"type": "error", "code": e.code, "message": e.message})
}

async fn send_json(socket: &mut WebSocket, v: &serde_json::Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(v.to_string().into())).await
}

/// Waits for the stream's first message: the command.
async fn first_request(socket: &mut WebSocket) -> Result<StreamRequest, ApiError> {
    let wait = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let text = match wait {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(Message::Binary(b)))) => String::from_utf8(b.to_vec())
            .map_err(|_| ApiError::bad("the first message must be the command, as JSON"))?
            .into(),
        Err(_) => return Err(ApiError::bad("no command within 30s")),
        _ => {
            return Err(ApiError::bad(
                "the first message must be the command, as JSON",
            ));
        }
    };
    serde_json::from_str(text.as_str()).map_err(|e| ApiError::bad(format!("bad command: {e}")))
}

async fn stream(
    api: &Api,
    id: &str,
    sandbox: SandboxId,
    socket: &mut WebSocket,
) -> Result<(), ApiError> {
    let start = first_request(socket).await?;
    let req = ExecRequest {
        cmd: start.cmd,
        env: start.env,
        workdir: start.workdir,
        timeout: start.timeout,
    };
    check(&req)?;
    let deadline = req
        .timeout
        .map(|t| tokio::time::Instant::now() + t.as_std());
    let tty = start.tty;
    let mut s = api
        .executor
        .start(
            sandbox,
            Job::Exec {
                req,
                stream: Some(tty),
            },
        )
        .map_err(|e| job_failure(id, e))?;
    // The input goes through a task of its own, so that a command that does not read its
    // input never holds up its output.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(256);
    let mut stdin = std::mem::replace(&mut s.stdin, Box::new(tokio::io::sink()));
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if stdin.write_all(&f).await.is_err() {
                break;
            }
        }
        // Dropping the input: the helper kills the command if it still runs.
    });
    if tty {
        let _ = tx
            .send(frame::resize(
                start.rows.unwrap_or(24),
                start.cols.unwrap_or(80),
            ))
            .await;
    }
    let mut tx = Some(tx);
    let (mut out_buf, mut err_buf) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
    let (mut out_open, mut err_open, mut client) = (true, true, true);
    let mut exit: Option<Result<i32, ExecError>> = None;
    let mut drain_until = None;
    let mut timed_out = false;
    let far = tokio::time::Instant::now() + Duration::from_secs(365 * 86400);
    loop {
        if exit.is_some() && !out_open && !err_open {
            break;
        }
        // Each message either way is use.
        api.activity.touch(sandbox);
        tokio::select! {
            r = &mut s.done, if exit.is_none() => {
                exit = Some(r);
                drain_until = Some(tokio::time::Instant::now() + DRAIN);
            }
            n = s.stdout.read(&mut out_buf), if out_open => {
                out_open = relay(socket, &mut client, STDOUT, n, &out_buf).await;
            }
            n = s.stderr.read(&mut err_buf), if err_open => {
                err_open = relay(socket, &mut client, STDERR, n, &err_buf).await;
            }
            msg = socket.recv(), if client && exit.is_none() => {
                match msg {
                    Some(Ok(Message::Binary(b))) => send_input(&tx, &b).await,
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(c) => {
                            if let Err(e) = control(&mut tx, c).await {
                                let _ = send_json(socket, &error_message(&e)).await;
                            }
                        }
                        Err(e) => {
                            let e = ApiError::bad(format!("bad message: {e}"));
                            let _ = send_json(socket, &error_message(&e)).await;
                        }
                    },
                    // The client is gone: its command ends with it.
                    Some(Err(_)) | None | Some(Ok(Message::Close(_))) => {
                        client = false;
                        tx = None;
                        (s.stop)();
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && !timed_out && exit.is_none() => {
                timed_out = true;
                (s.stop)();
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => break,
        }
    }
    drop(tx);
    writer.abort();
    let code = exit
        .expect("the loop ends after the exit")
        .map_err(|e| job_failure(id, e))?;
    if client {
        let _ = send_json(
            socket,
            &serde_json::json!({"type": "exit", "exit_code": code, "timed_out": timed_out}),
        )
        .await;
    }
    Ok(())
}

/// Sends one read of output to the client; returns whether the output is still open.
async fn relay(
    socket: &mut WebSocket,
    client: &mut bool,
    channel: u8,
    n: std::io::Result<usize>,
    buf: &[u8],
) -> bool {
    match n {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            if *client {
                let mut msg = Vec::with_capacity(n + 1);
                msg.push(channel);
                msg.extend_from_slice(&buf[..n]);
                if socket.send(Message::Binary(msg.into())).await.is_err() {
                    *client = false;
                }
            }
            true
        }
    }
}

async fn send_input(tx: &Option<tokio::sync::mpsc::Sender<Vec<u8>>>, data: &[u8]) {
    if let Some(tx) = tx {
        for chunk in data.chunks(frame::MAX) {
            let _ = tx.send(frame::encode(frame::DATA, chunk)).await;
        }
    }
}

async fn control(
    tx: &mut Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    c: Control,
) -> Result<(), ApiError> {
    match c {
        Control::Stdin { data } => send_input(tx, data.as_bytes()).await,
        Control::StdinClose => {
            if let Some(t) = tx {
                let _ = t.send(frame::encode(frame::CLOSE, &[])).await;
            }
        }
        Control::Resize { rows, cols } => {
            if rows == 0 || cols == 0 {
                return Err(ApiError::bad("rows and cols must be positive"));
            }
            if let Some(t) = tx {
                let _ = t.send(frame::resize(rows, cols)).await;
            }
        }
        Control::Signal { signal } => {
            let n = frame::signal_number(&signal).ok_or_else(|| {
                let names: Vec<&str> = frame::SIGNALS.iter().map(|(n, _)| *n).collect();
                ApiError::bad(format!(
                    "signal {signal:?}: use one of {}",
                    names.join(", ")
                ))
            })?;
            if let Some(t) = tx {
                let _ = t.send(frame::encode(frame::SIGNAL, &[n])).await;
            }
        }
    }
    Ok(())
}
