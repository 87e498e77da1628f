//! A sandbox's logs: `GET /v1/sandboxes/{id}/logs`, whole, tailed or followed.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use cove_store::Kv;
use cove_types::sandbox::record_key as key;
use serde::Deserialize;

use crate::{Api, ApiError, caller, load, parse};

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogsQuery {
    /// `stdout`, `stderr`, or `all` (the default: both, in the order they are read).
    stream: Option<String>,
    /// Only the last N lines of each stream.
    tail: Option<usize>,
    /// Keep the response open and send new output until the sandbox ends.
    #[serde(default)]
    follow: bool,
    /// Only output written since then: a duration ago (`10m`, `90s`) or a time in
    /// milliseconds since the Unix epoch. Precise to the agent's poll interval (200 ms),
    /// erring towards more output.
    since: Option<String>,
}

/// `since` as milliseconds since the epoch.
fn since_ms(s: &str) -> Result<u64, ApiError> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| ApiError::bad(format!("since {s:?}: too large")));
    }
    let d: cove_types::Duration = s.parse().map_err(|_| {
        ApiError::bad(format!(
            "since {s:?}: a duration ago (10m, 90s) or milliseconds since the Unix epoch"
        ))
    })?;
    Ok(cove_types::sandbox::now_ms().saturating_sub(d.as_std().as_millis() as u64))
}

/// Where output written since `t` starts in `log` (per its time index, see the agent's
/// `index_log`), and whether what rotation kept (`.old`) may be that recent too.
async fn since_offset(log: &std::path::Path, t: u64) -> (u64, bool) {
    let mut idx = log.as_os_str().to_owned();
    idx.push(".idx");
    let text = tokio::fs::read_to_string(&idx).await.unwrap_or_default();
    let entries: Vec<(u64, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.split(' ').map(|n| n.parse::<u64>().ok());
            Some((it.next()??, it.next()??, it.next()??))
        })
        .collect();
    match entries.iter().find(|(at, _, _)| *at > t) {
        Some((_, from, _)) => (*from, *from == 0),
        // Nothing indexed after `t`: only what the last poll has not seen yet.
        None => (
            entries.last().map_or(0, |(_, _, to)| *to),
            entries.is_empty(),
        ),
    }
}

/// What `path` holds past `*off`, moving `*off` to its end. A log found shorter than `*off`
/// was rotated (emptied): it is read from its start again.
async fn read_from(path: &std::path::Path, off: &mut u64) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await.ok()?;
    let len = file.metadata().await.ok()?.len();
    if len < *off {
        *off = 0;
    }
    if len == *off {
        return None;
    }
    file.seek(std::io::SeekFrom::Start(*off)).await.ok()?;
    let mut out = Vec::new();
    file.take(len - *off).read_to_end(&mut out).await.ok()?;
    *off += out.len() as u64;
    Some(out)
}

/// How often a followed log is checked for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// The last `n` lines of `bytes`.
fn tail_lines(bytes: &[u8], n: usize) -> &[u8] {
    let mut end = bytes.len();
    if bytes.last() == Some(&b'\n') {
        end -= 1;
    }
    let mut count = 0;
    for i in (0..end).rev() {
        if bytes[i] == b'\n' {
            count += 1;
            if count == n {
                return &bytes[i + 1..];
            }
        }
    }
    bytes
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), LogsQuery), responses((status = 200, description = "The main command's output as text; chunked while followed. With a WebSocket upgrade, binary messages instead, then a close", body = String, content_type = "text/plain"), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn logs_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let names: &[&str] = match q.stream.as_deref().unwrap_or("all") {
        "all" => &["stdout.log", "stderr.log"],
        "stdout" => &["stdout.log"],
        "stderr" => &["stderr.log"],
        other => {
            return Err(ApiError::bad(format!(
                "stream {other:?}: use stdout, stderr or all"
            )));
        }
    };
    let since = q.since.as_deref().map(since_ms).transpose()?;
    let (record, _) = load(&api, &who, &id).await?;
    let dir = api.sandboxes_dir.join(record.id.as_str());
    let paths: Vec<std::path::PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    // What is there now (tailed), and where each stream stands.
    let mut first = Vec::new();
    let mut offsets = Vec::new();
    for p in &paths {
        // What rotation kept of older output comes first (see the agent's `rotate_log`).
        let mut old = p.as_os_str().to_owned();
        old.push(".old");
        let (start, with_old) = match since {
            Some(t) => since_offset(p, t).await,
            None => (0, true),
        };
        let mut bytes = if with_old {
            tokio::fs::read(&old).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let current = tokio::fs::read(p).await.unwrap_or_default();
        let current_len = current.len() as u64;
        bytes.extend_from_slice(current.get(start as usize..).unwrap_or_default());
        let shown = match q.tail {
            Some(n) => tail_lines(&bytes, n),
            None => &bytes[..],
        };
        first.extend_from_slice(shown);
        offsets.push(current_len);
    }
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    let follow = q.follow && !record.state.is_final();
    if !follow && ws.is_err() {
        return Ok((text_plain, first).into_response());
    }
    let first_copy = if follow { Vec::new() } else { first.clone() };
    let key = key(&record.id);
    let store = api.store.clone();
    struct Follow {
        paths: Vec<std::path::PathBuf>,
        offsets: Vec<u64>,
        first: Option<Vec<u8>>,
        ended: bool,
    }
    let state = Follow {
        paths,
        offsets,
        first: Some(first),
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut s| {
        let store = store.clone();
        let key = key.clone();
        async move {
            if let Some(first) = s.first.take() {
                return Some((Ok::<_, std::io::Error>(Bytes::from(first)), s));
            }
            loop {
                if s.ended {
                    return None;
                }
                let mut chunk = Vec::new();
                for (p, off) in s.paths.iter().zip(s.offsets.iter_mut()) {
                    if let Some(new) = read_from(p, off).await {
                        chunk.extend(new);
                    }
                }
                // After the sandbox has ended, one last read picks up what it wrote last.
                let ended = match store.get(&key).await {
                    Ok(Some(e)) => parse(&e.value).map_or(true, |r| r.state.is_final()),
                    _ => true,
                };
                if ended {
                    s.ended = true;
                }
                if !chunk.is_empty() {
                    return Some((Ok(Bytes::from(chunk)), s));
                }
                if !s.ended {
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        }
    });
    let stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>> =
        if follow {
            Box::pin(stream)
        } else {
            Box::pin(futures_util::stream::iter(s_first(first_copy)))
        };
    Ok(match ws {
        // Each chunk a binary message, then a close once the sandbox has ended.
        Ok(ws) => ws
            .protocols([crate::WS_PROTOCOL])
            .on_upgrade(move |mut socket| async move {
                use futures_util::StreamExt as _;
                let mut stream = stream;
                while let Some(Ok(chunk)) = stream.next().await {
                    if socket.send(Message::Binary(chunk)).await.is_err() {
                        return;
                    }
                }
                let _ = socket.send(Message::Close(None)).await;
            }),
        Err(_) => (text_plain, axum::body::Body::from_stream(stream)).into_response(),
    })
}

fn s_first(first: Vec<u8>) -> Option<std::io::Result<Bytes>> {
    (!first.is_empty()).then(|| Ok(Bytes::from(first)))
}
