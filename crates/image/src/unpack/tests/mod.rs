//! Tests for the layer unpacker, run as root against the real filesystem.
//!
//! Archives are written byte by byte by [`tar`] below rather than with `tar::Builder`, because the
//! builder refuses exactly the hostile names (`../x`, `/x`) these tests need. Each test unpacks
//! into `<scratch>/layer` next to a sentinel file `<scratch>/sentinel`; [`Scratch::assert_contained`]
//! checks that the scratch directory still holds only those two and that the sentinel is intact.

mod archive;
mod escape;
mod layer;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{UnpackError, UnpackOptions, UnpackStats, unpack_layer};

pub(crate) use archive::{E, tar};

const SENTINEL: &[u8] = b"sentinel: must never change\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique name for this process and test, usable anywhere (also at `/`).
fn unique(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("cove-image-test-{}-{n}-{tag}", std::process::id())
}

/// A scratch directory holding the empty layer directory and a sentinel file, removed on drop.
struct Scratch {
    dir: PathBuf,
    dest: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(unique(tag));
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("sentinel"), SENTINEL).unwrap();
        let dest = dir.join("layer");
        fs::create_dir(&dest).unwrap();
        Scratch { dir, dest }
    }

    fn unpack(&self, archive: &[u8]) -> Result<UnpackStats, UnpackError> {
        self.unpack_with(archive, &UnpackOptions::default())
    }

    fn unpack_with(
        &self,
        archive: &[u8],
        opts: &UnpackOptions,
    ) -> Result<UnpackStats, UnpackError> {
        unpack_layer(archive, &self.dest, opts)
    }

    /// A path inside the layer.
    fn at(&self, rel: &str) -> PathBuf {
        self.dest.join(rel)
    }

    /// Nothing appeared next to the layer directory and the sentinel and the scratch directory
    /// itself are unchanged.
    fn assert_contained(&self) {
        let mut names: Vec<_> = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["layer", "sentinel"], "something escaped the layer");
        let sentinel = self.dir.join("sentinel");
        let meta = fs::symlink_metadata(&sentinel).unwrap();
        assert!(meta.is_file(), "sentinel replaced");
        assert_eq!(fs::read(&sentinel).unwrap(), SENTINEL, "sentinel modified");
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o644,
            "sentinel chmodded"
        );
        let dir_meta = fs::symlink_metadata(&self.dir).unwrap();
        assert_eq!(
            dir_meta.permissions().mode() & 0o7777,
            0o755,
            "scratch dir chmodded"
        );
        assert!(
            fs::symlink_metadata(&self.dest).unwrap().is_dir(),
            "layer dir replaced"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // std's remove_dir_all does not follow symlinks.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The escape reason, or a panic naming what came back instead.
#[track_caller]
fn escape_reason(result: Result<UnpackStats, UnpackError>, entry: &str) -> String {
    match result {
        Err(UnpackError::Escape { entry: e, reason }) => {
            assert_eq!(e, entry, "escape reported for the wrong entry");
            reason
        }
        other => panic!("expected an escape error for {entry:?}, got {other:?}"),
    }
}

/// `lstat` of a path, panicking with the path on failure.
#[track_caller]
fn lstat(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}
