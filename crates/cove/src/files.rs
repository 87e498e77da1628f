//! The file API's work inside a sandbox: run by `cove exec-in --files` in a process that has
//! joined the sandbox and taken a command's last containment steps (the sandbox's user, no
//! capabilities, its rlimits and seccomp filter), so every access is checked with the
//! sandbox's own permissions, never the server's.
//!
//! Output on stdout: `stat`, `list`, `write`, `untar` and `mkdir` print JSON; `read` prints a
//! header line (`file <size>` or `dir`) and then the file's bytes or a tar of the directory's
//! contents. A failure prints `<kind>\t<message>` on stderr and exits 1; the kinds are the
//! API's error codes (see [`ErrorKind`]), and messages hold the sandbox's paths, never an errno.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cove_api::FileOp;
use serde::Serialize;

/// One file's metadata, as the API shows it.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// Its name (the last component of its path).
    pub name: String,
    /// Its absolute path in the sandbox.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits, in octal.
    pub mode: String,
    /// Owner and group, as the sandbox numbers them.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// Last modification, in milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Where a symbolic link points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

fn entry(path: &Path, meta: &fs::Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    Entry {
        name: path
            .file_name()
            .map_or_else(|| "/".into(), |n| n.to_string_lossy().into_owned()),
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.len(),
        mode: format!("{:04o}", meta.mode() & 0o7777),
        uid: meta.uid(),
        gid: meta.gid(),
        modified_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        link_target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// A failure, in the API's words.
struct Failure {
    kind: &'static str,
    message: String,
}

/// The API error code of an I/O error and its plain-words description.
fn describe(e: &io::Error) -> (&'static str, &'static str) {
    use io::ErrorKind as K;
    match e.kind() {
        K::NotFound => ("not_found", "no such file or directory"),
        K::PermissionDenied => ("permission_denied", "permission denied"),
        K::ReadOnlyFilesystem => ("permission_denied", "read-only file system"),
        K::NotADirectory => ("not_a_directory", "not a directory"),
        K::IsADirectory => ("is_a_directory", "is a directory"),
        K::AlreadyExists => ("exists", "already exists"),
        K::DirectoryNotEmpty => ("exists", "directory not empty"),
        K::StorageFull | K::QuotaExceeded => ("no_space", "no space left in the sandbox"),
        K::FileTooLarge => ("too_large", "file too large for the sandbox's limits"),
        K::InvalidInput | K::InvalidFilename | K::InvalidData => ("invalid", "invalid input"),
        _ => ("io_error", "input/output error"),
    }
}

fn fail(path: &Path, e: &io::Error) -> Failure {
    let (kind, words) = describe(e);
    Failure {
        kind,
        message: format!("{}: {words}", path.display()),
    }
}

trait At<T> {
    fn at(self, path: &Path) -> Result<T, Failure>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, Failure> {
        self.map_err(|e| fail(path, &e))
    }
}

/// Runs `op` on `path` (absolute, checked by the server); returns the exit code.
pub fn run(op: FileOp, path: &Path, mode: Option<u32>) -> i32 {
    match dispatch(op, path, mode) {
        Ok(()) => 0,
        Err(f) => {
            let _ = writeln!(io::stderr(), "{}\t{}", f.kind, f.message.replace('\n', " "));
            1
        }
    }
}

fn print_json(value: &impl Serialize) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, value)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush())
        .at(Path::new("stdout"))
}

fn stat(path: &Path) -> Result<Entry, Failure> {
    Ok(entry(path, &fs::symlink_metadata(path).at(path)?))
}

fn dispatch(op: FileOp, path: &Path, mode: Option<u32>) -> Result<(), Failure> {
    match op {
        FileOp::Stat => print_json(&stat(path)?),
        FileOp::List => {
            let mut entries = Vec::new();
            for e in fs::read_dir(path).at(path)? {
                let e = e.at(path)?;
                let p = e.path();
                // An entry removed meanwhile is left out.
                if let Ok(meta) = fs::symlink_metadata(&p) {
                    entries.push(entry(&p, &meta));
                }
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            print_json(&entries)
        }
        FileOp::Read => read(path),
        FileOp::Write => {
            create_parent(path)?;
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode.unwrap_or(0o644));
            let mut file = opts.open(path).at(path)?;
            io::copy(&mut io::stdin().lock(), &mut file).at(path)?;
            file.sync_all().at(path)?;
            if let Some(m) = mode {
                // The umask may have narrowed the mode the file was created with.
                fs::set_permissions(path, fs::Permissions::from_mode(m)).at(path)?;
            }
            print_json(&stat(path)?)
        }
        FileOp::Untar => {
            fs::create_dir_all(path).at(path)?;
            let mut archive = tar::Archive::new(io::stdin().lock());
            archive.set_preserve_permissions(true);
            archive.set_preserve_mtime(true);
            archive.set_overwrite(true);
            archive.unpack(path).map_err(|e| untar_failure(path, &e))?;
            print_json(&stat(path)?)
        }
        FileOp::Mkdir => {
            fs::create_dir_all(path).at(path)?;
            if let Some(m) = mode {
                fs::set_permissions(path, fs::Permissions::from_mode(m)).at(path)?;
            }
            print_json(&stat(path)?)
        }
        FileOp::Remove => {
            let meta = fs::symlink_metadata(path).at(path)?;
            if meta.is_dir() {
                fs::remove_dir_all(path).at(path)?;
            } else {
                fs::remove_file(path).at(path)?;
            }
            print_json(&serde_json::json!({}))
        }
    }
}

/// The tar crate wraps the I/O error of the entry that failed in its own message, naming the
/// entry: the kind is kept, the entry named in the sandbox's terms.
fn untar_failure(dir: &Path, e: &io::Error) -> Failure {
    let (kind, words) = describe(e);
    let entry = e
        .to_string()
        .split_once("when unpacking ")
        .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_string));
    let kind = if kind == "io_error" { "invalid" } else { kind };
    Failure {
        kind,
        message: match entry {
            Some(entry) => format!("{}: unpacking {entry}: {words}", dir.display()),
            None => format!(
                "{}: the archive could not be unpacked ({words})",
                dir.display()
            ),
        },
    }
}

fn create_parent(path: &Path) -> Result<(), Failure> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).at(parent)?;
    }
    Ok(())
}

fn read(path: &Path) -> Result<(), Failure> {
    let meta = fs::metadata(path).at(path)?;
    let mut out = io::stdout().lock();
    let w = |r: io::Result<()>| r.at(Path::new("stdout"));
    if meta.is_dir() {
        // Listing the directory first turns an unreadable one into a clear error before any
        // byte of the archive is sent.
        fs::read_dir(path).at(path)?;
        w(out.write_all(b"dir\n"))?;
        let mut builder = tar::Builder::new(&mut out);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        append_dir(&mut builder, path, PathBuf::new())?;
        w(builder.finish())?;
    } else {
        let mut file = fs::File::open(path).at(path)?;
        let size = file.metadata().at(path)?.len();
        w(out.write_all(format!("file {size}\n").as_bytes()))?;
        // Exactly the announced size: a file that grows meanwhile is cut there.
        let copied = io::copy(&mut (&mut file).take(size), &mut out).at(path)?;
        if copied < size {
            return Err(Failure {
                kind: "io_error",
                message: format!("{}: the file shrank while it was read", path.display()),
            });
        }
    }
    w(out.flush())
}

/// Appends the entries of `dir` (named `prefix/...` in the archive), depth first.
fn append_dir<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    prefix: PathBuf,
) -> Result<(), Failure> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .at(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let inside = prefix.join(&name);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            builder.append_dir(&inside, &path).at(&path)?;
            append_dir(builder, &path, inside)?;
        } else if meta.is_file() || meta.file_type().is_symlink() {
            builder.append_path_with_name(&path, &inside).at(&path)?;
        }
        // Sockets, fifos and devices are not copied.
    }
    Ok(())
}
