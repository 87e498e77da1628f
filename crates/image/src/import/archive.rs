//! The one pass over an image archive: every regular file into the store under the digest of its
//! content, the metadata files into memory, links into a table. The archive is a stream; nothing
//! is ever created on disk at a path an entry names.
//!
//! Names are normalised (`./x` and `x` are the same file; a `..` component is refused), and
//! symlinks and hardlinks are resolved lexically, inside the archive's own name space, when a
//! manifest names a file: old `docker save` writes a layer shared by two images once and links
//! the second `<id>/layer.tar` to the first (`../<id>/layer.tar`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::{ImportError, MAX_JSON, store_err};
use crate::digest::Digest;
use crate::store::{Added, Store};

/// Metadata files kept in memory rather than stored as blobs.
const OCI_LAYOUT: &str = "oci-layout";
const INDEX: &str = "index.json";
const MANIFEST: &str = "manifest.json";
/// Docker's legacy tag file: neither needed nor worth storing.
const REPOSITORIES: &str = "repositories";
/// Most links followed when resolving a name (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// A regular file of the archive, in the store.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stored {
    pub(super) digest: Digest,
    pub(super) size: u64,
}

/// What the pass found.
#[derive(Debug, Default)]
pub(super) struct Contents {
    files: HashMap<String, Stored>,
    links: HashMap<String, String>,
    pub(super) oci_layout: Option<Vec<u8>>,
    pub(super) index: Option<Vec<u8>>,
    pub(super) manifest: Option<Vec<u8>>,
}

impl Contents {
    /// The digests of every regular file in the archive.
    pub(super) fn digests(&self) -> HashSet<Digest> {
        self.files.values().map(|s| s.digest).collect()
    }

    /// The regular file `name` refers to, following links; `None` if there is none.
    pub(super) fn lookup(&self, name: &str) -> Option<Stored> {
        let mut name = clean(name).ok()?;
        for _ in 0..=MAX_LINKS {
            if let Some(stored) = self.files.get(&name) {
                return Some(*stored);
            }
            name = self.links.get(&name)?.clone();
        }
        None
    }
}

/// Reads the archive at `path` (plain, gzip or zstd) into `store`.
pub(super) fn read(store: &Store, path: &Path, added: &mut Added) -> Result<Contents, ImportError> {
    let archive_err = |last_entry: Option<&str>| {
        let last_entry = last_entry.map(str::to_string);
        move |source| ImportError::Archive {
            path: path.to_path_buf(),
            last_entry,
            source,
        }
    };
    let name_err = |entry: &[u8], reason| ImportError::EntryName {
        path: path.to_path_buf(),
        entry: String::from_utf8_lossy(entry).into_owned(),
        reason,
    };
    let file = File::open(path).map_err(|source| ImportError::Io {
        op: "open",
        path: path.to_path_buf(),
        source,
    })?;
    let stream = crate::unpack::decompress(BufReader::new(file)).map_err(archive_err(None))?;
    let mut archive = tar::Archive::new(stream);
    let mut contents = Contents::default();
    let mut last: Option<String> = None;
    for entry in archive.entries().map_err(archive_err(None))? {
        let mut entry = entry.map_err(archive_err(last.as_deref()))?;
        let raw = entry.path_bytes().into_owned();
        let name = std::str::from_utf8(&raw)
            .map_err(|_| name_err(&raw, "is not UTF-8"))
            .and_then(|n| clean(n).map_err(|reason| name_err(&raw, reason)))?;
        let kind = entry.header().entry_type();
        if kind.is_file() {
            let meta = match name.as_str() {
                OCI_LAYOUT => Some(&mut contents.oci_layout),
                INDEX => Some(&mut contents.index),
                MANIFEST => Some(&mut contents.manifest),
                REPOSITORIES => None,
                _ => {
                    let expected = name
                        .strip_prefix("blobs/sha256/")
                        .and_then(|hex| Digest::from_hex(hex).ok());
                    let size = entry.size();
                    let digest = store
                        .put_blob_tracked(&mut entry, expected.as_ref(), added)
                        .map_err(store_err(format!("cannot store archive entry {name:?}")))?;
                    contents.files.insert(name.clone(), Stored { digest, size });
                    contents.links.remove(&name);
                    None
                }
            };
            if let Some(slot) = meta {
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(MAX_JSON + 1)
                    .read_to_end(&mut bytes)
                    .map_err(archive_err(last.as_deref()))?;
                if bytes.len() as u64 > MAX_JSON {
                    return Err(ImportError::NotAnImage {
                        path: path.to_path_buf(),
                        reason: format!("its {name} is larger than {MAX_JSON} bytes"),
                    });
                }
                *slot = Some(bytes);
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| name_err(&raw, "is a link without a target"))?;
            let target = std::str::from_utf8(&target)
                .map_err(|_| name_err(&raw, "is a link to a name that is not UTF-8"))?;
            let target = if kind.is_symlink() {
                // Relative to the link's directory, as the kernel would read it.
                let dir = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                resolve_relative(dir, target)
                    .ok_or_else(|| name_err(&raw, "is a link pointing outside the archive"))?
            } else {
                // Hardlink targets are archive names.
                clean(target).map_err(|reason| name_err(&raw, reason))?
            };
            contents.files.remove(&name);
            contents.links.insert(name.clone(), target);
        }
        // Directories, devices, FIFOs and extension headers carry nothing an image needs.
        last = Some(name);
    }
    Ok(contents)
}

/// An archive member name without `.` and empty components or a leading `/`; `..` is refused
/// (no image archive needs it, and it would let two names mean one file).
fn clean(name: &str) -> Result<String, &'static str> {
    let mut out = Vec::new();
    for component in name.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err("has a `..` component"),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        return Err("is empty");
    }
    Ok(out.join("/"))
}

/// `target` read relative to the directory `dir` (an absolute target from the archive root);
/// `None` if `..` climbs above the root.
fn resolve_relative(dir: &str, target: &str) -> Option<String> {
    let mut out: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        dir.split('/').filter(|c| !c.is_empty()).collect()
    };
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_link_targets() {
        assert_eq!(clean("./blobs//sha256/ab").unwrap(), "blobs/sha256/ab");
        assert_eq!(clean("/manifest.json").unwrap(), "manifest.json");
        assert!(clean("a/../b").is_err());
        assert!(clean("./").is_err());
        assert_eq!(
            resolve_relative("id2", "../id1/layer.tar").unwrap(),
            "id1/layer.tar"
        );
        assert_eq!(resolve_relative("a/b", "./c").unwrap(), "a/b/c");
        assert_eq!(resolve_relative("a", "/x/y").unwrap(), "x/y");
        assert_eq!(resolve_relative("", "../x"), None);
    }

    #[test]
    fn lookup_follows_links_but_not_forever() {
        let stored = Stored {
            digest: Digest::of(b"x"),
            size: 1,
        };
        let mut contents = Contents::default();
        contents.files.insert("id1/layer.tar".into(), stored);
        contents
            .links
            .insert("id2/layer.tar".into(), "id1/layer.tar".into());
        contents.links.insert("loop/a".into(), "loop/b".into());
        contents.links.insert("loop/b".into(), "loop/a".into());
        assert_eq!(
            contents.lookup("./id2/layer.tar").unwrap().digest,
            stored.digest
        );
        assert!(contents.lookup("loop/a").is_none());
        assert!(contents.lookup("nothing").is_none());
        assert!(contents.lookup("../id1/layer.tar").is_none());
    }
}
