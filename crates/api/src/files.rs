//! The file API: `/v1/sandboxes/{id}/files` (download, upload, remove), `files/list`,
//! `files/stat` and `files/mkdir`. Each request runs inside the sandbox as its user, without
//! capabilities and under its seccomp filter and limits (see the binary's `files` module), so
//! a tenant can read or change exactly what its sandbox's processes could.

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::exec::{job_failure, running};
use crate::{Api, ApiError, FileOp, Job, Session};

/// Longest path accepted.
const MAX_PATH: usize = 4096;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    /// The path in the sandbox (absolute).
    path: String,
    /// Permission bits (octal, e.g. `755`) of a file uploaded or a directory made.
    #[serde(default)]
    mode: Option<String>,
}

struct Checked {
    path: String,
    mode: Option<u32>,
}

fn checked(query: Result<Query<FileQuery>, QueryRejection>) -> Result<Checked, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    if !q.path.starts_with('/') {
        return Err(ApiError::bad("path must be absolute"));
    }
    if q.path.contains('\0') || q.path.len() > MAX_PATH {
        return Err(ApiError::bad(
            "path must have no NUL and at most 4096 bytes",
        ));
    }
    let mode = q
        .mode
        .map(|m| {
            u32::from_str_radix(&m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| ApiError::bad(format!("mode {m:?}: octal permission bits")))
        })
        .transpose()?;
    Ok(Checked { path: q.path, mode })
}

/// The API error of a file operation that ended with `code`: what it reported
/// (`<code>\t<message>` on its stderr), or how it was killed.
fn failed(code: i32, stderr: &[u8]) -> ApiError {
    if stderr.is_empty() && code > 128 {
        return ApiError::new(
            StatusCode::CONFLICT,
            "interrupted",
            format!(
                "the file operation was killed (signal {}): the sandbox ended or reached a limit \
                 (files in its writable layer count against its memory)",
                code - 128
            ),
        );
    }
    reported(stderr)
}

/// The API error a file operation reported (`<code>\t<message>` on its stderr).
fn reported(stderr: &[u8]) -> ApiError {
    let text = String::from_utf8_lossy(stderr);
    let (code, message) = text.trim_end().split_once('\t').unwrap_or(("", ""));
    let (status, code) = match code {
        "not_found" => (StatusCode::NOT_FOUND, "not_found"),
        "permission_denied" => (StatusCode::FORBIDDEN, "permission_denied"),
        "not_a_directory" => (StatusCode::CONFLICT, "not_a_directory"),
        "is_a_directory" => (StatusCode::CONFLICT, "is_a_directory"),
        "exists" => (StatusCode::CONFLICT, "exists"),
        "no_space" => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
        "too_large" => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        "invalid" => (StatusCode::BAD_REQUEST, "invalid"),
        _ => {
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "io_error",
                if message.is_empty() {
                    "the file operation failed".to_string()
                } else {
                    message.to_string()
                },
            );
        }
    };
    ApiError::new(status, code, message)
}

async fn start(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    op: FileOp,
    c: Checked,
) -> Result<Session, ApiError> {
    let record = running(api, headers, id).await?;
    api.executor
        .start(
            record.id,
            Job::Files {
                op,
                path: c.path,
                mode: c.mode,
            },
        )
        .map_err(|e| job_failure(id, e))
}

/// Runs a file operation that answers JSON, feeding it `input`.
async fn json_op(
    api: &Api,
    headers: &HeaderMap,
    id: &str,
    op: FileOp,
    c: Checked,
    input: Option<Body>,
) -> Result<Bytes, ApiError> {
    let mut s = start(api, headers, id, op, c).await?;
    let mut stdin = std::mem::replace(&mut s.stdin, Box::new(tokio::io::sink()));
    let feed = async move {
        if let Some(body) = input {
            let mut chunks = body.into_data_stream();
            while let Some(chunk) = chunks.next().await {
                // A client that stops sending, or a helper that stopped reading (its error
                // says why): the input ends here.
                let Ok(chunk) = chunk else { return false };
                if stdin.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = stdin.shutdown().await;
        }
        true
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (complete, _, _, status) = tokio::join!(
        feed,
        s.stdout.read_to_end(&mut out),
        s.stderr.read_to_end(&mut err),
        &mut s.done
    );
    let code = status.map_err(|e| job_failure(id, e))?;
    if !complete && code == 0 {
        return Err(ApiError::bad("the upload was interrupted"));
    }
    if code != 0 {
        return Err(failed(code, &err));
    }
    Ok(Bytes::from(out))
}

fn json(status: StatusCode, bytes: Bytes) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response()
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox")), responses((status = 200, description = "Success", body = crate::openapi::FileEntry), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn stat(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    let out = json_op(&api, &headers, &id, FileOp::Stat, c, None).await?;
    Ok(json(StatusCode::OK, out))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox")), responses((status = 200, description = "Success", body = crate::openapi::FileList), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    let out = json_op(&api, &headers, &id, FileOp::List, c, None).await?;
    let entries: serde_json::Value =
        serde_json::from_slice(&out).map_err(|_| reported(b"io_error\tbad listing"))?;
    Ok(axum::Json(serde_json::json!({ "entries": entries })).into_response())
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox"), ("mode" = Option<String>, Query, description = "Permission bits in octal, e.g. 755")), responses((status = 201, description = "Created", body = crate::openapi::FileEntry), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn mkdir(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    let out = json_op(&api, &headers, &id, FileOp::Mkdir, c, None).await?;
    Ok(json(StatusCode::CREATED, out))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox")), responses((status = 204, description = "Removed (a directory with everything in it)"), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn remove(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    json_op(&api, &headers, &id, FileOp::Remove, c, None).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT`: the body becomes the file at `path`; with `Content-Type: application/x-tar` it is
/// extracted into the directory at `path` instead.
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox"), ("mode" = Option<String>, Query, description = "Permission bits in octal, e.g. 755")), request_body(description = "The file's bytes; with `Content-Type: application/x-tar`, an archive extracted into the directory `path`", content((Vec<u8> = "application/octet-stream"), (Vec<u8> = "application/x-tar"))), responses((status = 201, description = "Created", body = crate::openapi::FileEntry), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn upload(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    let is_tar = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-tar"));
    let op = if is_tar { FileOp::Untar } else { FileOp::Write };
    let out = json_op(&api, &headers, &id, op, c, Some(body)).await?;
    Ok(json(StatusCode::CREATED, out))
}

/// `GET`: a file's bytes (`application/octet-stream`, with its length), or a directory's
/// contents as a tar (`application/x-tar`). `Cove-File-Type` says which.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), ("path" = String, Query, description = "Absolute path in the sandbox")), responses((status = 200, description = "A file's bytes, or a tar of a directory's contents; `Cove-File-Type: file|dir`", content((Vec<u8> = "application/octet-stream"), (Vec<u8> = "application/x-tar"))), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn download(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = checked(query)?;
    let mut s = start(&api, &headers, &id, FileOp::Read, c).await?;
    let mut out = tokio::io::BufReader::new(std::mem::replace(
        &mut s.stdout,
        Box::new(tokio::io::empty()),
    ));
    let mut head = String::new();
    let _ = (&mut out).take(64).read_line(&mut head).await;
    let size = match head.trim_end().split_once(' ') {
        Some(("file", n)) => n.parse::<u64>().ok(),
        _ => None,
    };
    let (content_type, kind) = match (head.trim_end(), size) {
        ("dir", _) => ("application/x-tar", "dir"),
        (_, Some(_)) => ("application/octet-stream", "file"),
        _ => {
            // No header: the operation failed before sending anything.
            let mut err = Vec::new();
            let _ = s.stderr.read_to_end(&mut err).await;
            let code = (&mut s.done).await.map_err(|e| job_failure(&id, e))?;
            return Err(if code == 0 {
                reported(b"io_error\tthe file could not be read")
            } else {
                failed(code, &err)
            });
        }
    };
    struct Download {
        out: tokio::io::BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>,
        session: Session,
        done: bool,
    }
    let state = Download {
        out,
        session: s,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut d| async move {
        if d.done {
            return None;
        }
        let mut buf = vec![0u8; 256 * 1024];
        match d.out.read(&mut buf).await {
            Ok(0) | Err(_) => {
                d.done = true;
                // A failure part-way (the helper's exit code) breaks the transfer rather than
                // ending it as if it were complete.
                match (&mut d.session.done).await {
                    Ok(0) => None,
                    _ => Some((Err(std::io::Error::other("the read failed")), d)),
                }
            }
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), d))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert("cove-file-type", header::HeaderValue::from_static(kind));
    if let Some(n) = size {
        h.insert(header::CONTENT_LENGTH, n.into());
    }
    Ok(response)
}
