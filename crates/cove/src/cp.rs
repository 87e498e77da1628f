//! `cove cp`: files and directories between this machine and a sandbox, through the file API
//! (`/v1/sandboxes/{id}/files`). Directories travel as tar streams; nothing is held in memory
//! whole.
//!
//! What comes out of a sandbox is untrusted: a directory is extracted here entry by entry,
//! only regular files, directories and symbolic links, each kept inside the destination (the
//! tar crate's `unpack_in`), with set-id and sticky bits dropped.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::client::Client;

/// One side of a copy.
#[derive(Debug, PartialEq)]
enum Side {
    /// A path on this machine.
    Local(PathBuf),
    /// Stdin or stdout (`-`).
    Stdio,
    /// A path in a sandbox.
    Remote { id: String, path: String },
}

fn side(s: &str) -> Side {
    if s == "-" {
        return Side::Stdio;
    }
    match s.split_once(':') {
        Some((id, path)) if id.parse::<cove_types::SandboxId>().is_ok() => Side::Remote {
            id: id.to_string(),
            path: path.to_string(),
        },
        _ => Side::Local(PathBuf::from(s)),
    }
}

/// The last component of a sandbox path.
fn base_name(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("")
}

fn join_remote(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn query_path(path: &str) -> String {
    let mut out = String::new();
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The API's error message from a failed response.
async fn failure(resp: reqwest::Response) -> anyhow::Error {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap_or_default();
    crate::client::Refused::new(status, &bytes).into()
}

/// Copies `src` to `dst`.
pub fn cp(c: &Client, src: &str, dst: &str) -> anyhow::Result<()> {
    match (side(src), side(dst)) {
        (Side::Remote { .. }, Side::Remote { .. }) => {
            bail!("both sides are in sandboxes: copy through this machine")
        }
        (Side::Remote { id, path }, to) => {
            check_path(&path)?;
            c.runtime.block_on(download(c, &id, &path, to))
        }
        (from, Side::Remote { id, path }) => {
            check_path(&path)?;
            c.runtime.block_on(upload(c, from, &id, &path))
        }
        _ => bail!("one side must be in a sandbox: ID:/PATH (see cove cp --help)"),
    }
}

fn check_path(path: &str) -> anyhow::Result<()> {
    if !path.starts_with('/') {
        bail!("{path:?}: the path in the sandbox must be absolute");
    }
    Ok(())
}

impl Client {
    fn files_url(&self, id: &str, what: &str, path: &str) -> String {
        format!(
            "{}/v1/sandboxes/{id}/files{what}?path={}",
            self.base,
            query_path(path)
        )
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .header("authorization", format!("Bearer {}", self.token))
            .send()
            .await
            .map_err(|e| crate::client::request_failed(&self.base, e))?;
        if resp.status().is_client_error() || resp.status().is_server_error() {
            return Err(failure(resp).await);
        }
        Ok(resp)
    }

    /// Whether `path` is a directory in the sandbox (`None`: it does not exist).
    async fn remote_is_dir(&self, id: &str, path: &str) -> anyhow::Result<Option<bool>> {
        let resp = self
            .http
            .get(self.files_url(id, "/stat", path))
            .header("authorization", format!("Bearer {}", self.token))
            .send()
            .await
            .map_err(|e| crate::client::request_failed(&self.base, e))?;
        match resp.status().as_u16() {
            404 => {
                let err = failure(resp).await;
                // The sandbox itself missing is an error; the path missing is an answer.
                if err.to_string().starts_with("no sandbox") {
                    return Err(err);
                }
                Ok(None)
            }
            s if s >= 400 => Err(failure(resp).await),
            _ => {
                let bytes = resp.bytes().await.context("read the server's answer")?;
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).context("read the server's answer")?;
                Ok(Some(v["type"] == "dir"))
            }
        }
    }
}

async fn upload(c: &Client, from: Side, id: &str, path: &str) -> anyhow::Result<()> {
    let remote_dir = c.remote_is_dir(id, path).await?;
    let (target, body, mode, tar) = match from {
        Side::Stdio => {
            // A tar on stdin, extracted into the directory.
            let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
            let file = tokio::fs::File::from_std(std::fs::File::from(stdin));
            (path.to_string(), reqwest::Body::from(file), None, true)
        }
        Side::Local(local) => {
            let meta = std::fs::metadata(&local)
                .with_context(|| format!("{}: cannot read it", local.display()))?;
            let name = local
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let target = if remote_dir == Some(true) && !name.is_empty() {
                join_remote(path, &name)
            } else {
                path.to_string()
            };
            if meta.is_dir() {
                (target, tar_of(&local)?, None, true)
            } else if meta.is_file() {
                let file = tokio::fs::File::open(&local)
                    .await
                    .with_context(|| format!("open {}", local.display()))?;
                let mode = meta.permissions().mode() & 0o777;
                (target, reqwest::Body::from(file), Some(mode), false)
            } else {
                bail!(
                    "{}: only files and directories can be copied",
                    local.display()
                );
            }
        }
        Side::Remote { .. } => unreachable!("handled by cp"),
    };
    let mut url = c.files_url(id, "", &target);
    if let Some(m) = mode {
        url.push_str(&format!("&mode={m:o}"));
    }
    let content_type = if tar {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    c.send(
        c.http
            .put(url)
            .header("content-type", content_type)
            .body(body),
    )
    .await?;
    Ok(())
}

/// A tar stream of the contents of `dir`, written by a thread as it is sent.
fn tar_of(dir: &Path) -> anyhow::Result<reqwest::Body> {
    let (reader, writer) = std::io::pipe().context("create a pipe")?;
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let mut builder = tar::Builder::new(writer);
        builder.follow_symlinks(false);
        if let Err(e) = builder
            .append_dir_all(".", &dir)
            .and_then(|()| builder.finish())
        {
            // The server sees a truncated archive and refuses it; this says why.
            eprintln!("cove: reading {}: {e}", dir.display());
        }
    });
    let file = tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(reader)));
    Ok(reqwest::Body::from(file))
}

async fn download(c: &Client, id: &str, path: &str, to: Side) -> anyhow::Result<()> {
    let mut resp = c.send(c.http.get(c.files_url(id, "", path))).await?;
    let is_dir = resp
        .headers()
        .get("cove-file-type")
        .is_some_and(|v| v == "dir");
    let name = base_name(path);
    let mut sink: Box<dyn Write + Send> = match &to {
        Side::Stdio => Box::new(std::io::stdout()),
        Side::Local(local) => {
            let target = if local.is_dir() && !name.is_empty() {
                local.join(name)
            } else {
                local.clone()
            };
            if is_dir {
                std::fs::create_dir_all(&target)
                    .with_context(|| format!("create {}", target.display()))?;
                extractor(target)?
            } else {
                Box::new(
                    std::fs::File::create(&target)
                        .with_context(|| format!("create {}", target.display()))?,
                )
            }
        }
        Side::Remote { .. } => unreachable!("handled by cp"),
    };
    while let Some(chunk) = resp
        .chunk()
        .await
        .context("the download broke off (the sandbox may have ended)")?
    {
        sink.write_all(&chunk).context("write the copy")?;
    }
    sink.flush().context("write the copy")?;
    drop(sink);
    Ok(())
}

/// A writer that extracts the tar written to it into `dir` (see the module's notes); dropping
/// it waits for the extraction and reports its failure.
fn extractor(dir: PathBuf) -> anyhow::Result<Box<dyn Write + Send>> {
    let (reader, writer) = std::io::pipe().context("create a pipe")?;
    let handle = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().context("read the archive")? {
            let mut entry = entry.context("read the archive")?;
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
                continue;
            }
            let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
            entry.set_preserve_permissions(false);
            let name = entry
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            entry
                .unpack_in(&dir)
                .with_context(|| format!("extract {name}"))?;
            if !kind.is_symlink()
                && let Ok(p) = entry.path()
            {
                let _ =
                    std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(mode));
            }
        }
        Ok(())
    });
    Ok(Box::new(Extract {
        writer: Some(writer),
        handle: Some(handle),
    }))
}

struct Extract {
    writer: Option<std::io::PipeWriter>,
    handle: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Write for Extract {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.as_mut().expect("open until drop").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        // The end of the stream: the extraction finishes and says how it went.
        self.writer = None;
        if let Some(h) = self.handle.take() {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(std::io::Error::other(crate::chain(&e))),
                Err(_) => return Err(std::io::Error::other("the extraction failed")),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides() {
        assert_eq!(side("-"), Side::Stdio);
        assert_eq!(side("./a:b"), Side::Local("./a:b".into()));
        assert_eq!(
            side("0123456789ab:/tmp/x"),
            Side::Remote {
                id: "0123456789ab".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(base_name("/tmp/dir/"), "dir");
        assert_eq!(base_name("/"), "");
        assert_eq!(query_path("/a b/ü&x"), "/a%20b/%C3%BC%26x");
    }

    /// A tar entry with a raw name (the tar crate refuses to write `..` itself).
    fn entry(
        out: &mut Vec<u8>,
        name: &[u8],
        kind: tar::EntryType,
        mode: u32,
        link: &[u8],
        data: &[u8],
    ) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn a_hostile_archive_stays_inside_the_destination() {
        let base = std::env::temp_dir().join(format!("cove-cp-test-{}", std::process::id()));
        let (dest, outside) = (base.join("dest"), base.join("outside"));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let mut tar = Vec::new();
        entry(
            &mut tar,
            b"../escaped",
            tar::EntryType::Regular,
            0o644,
            b"",
            b"x",
        );
        entry(
            &mut tar,
            b"suid",
            tar::EntryType::Regular,
            0o4755,
            b"",
            b"#!/bin/sh\n",
        );
        entry(&mut tar, b"dev", tar::EntryType::Char, 0o666, b"", b"");
        entry(
            &mut tar,
            b"link",
            tar::EntryType::Symlink,
            0o777,
            outside.to_str().unwrap().as_bytes(),
            b"",
        );
        entry(
            &mut tar,
            b"link/pwned",
            tar::EntryType::Regular,
            0o644,
            b"",
            b"x",
        );
        tar.extend_from_slice(&[0u8; 1024]);
        let mut w = extractor(dest.clone()).unwrap();
        w.write_all(&tar).unwrap();
        // Refusing the entry through the link is as good as skipping it.
        let _ = w.flush();
        drop(w);
        assert!(!base.join("escaped").exists());
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "wrote through the link"
        );
        assert!(!dest.join("dev").exists(), "a device node was made");
        let mode = std::fs::metadata(dest.join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
