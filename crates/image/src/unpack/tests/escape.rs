//! One test per escape technique: each asserts the specific outcome (an error naming the entry,
//! or where a clamped path landed) and that nothing outside the layer was created or changed.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::{E, Scratch, UnpackError, escape_reason, exists, lstat, tar, unique};

#[test]
fn dotdot_path_is_rejected() {
    let s = Scratch::new("dotdot");
    let reason = escape_reason(s.unpack(&tar(&[E::file("../evil", b"x")])), "../evil");
    assert!(reason.contains("`..`"), "{reason}");
    s.assert_contained();
}

#[test]
fn dotdot_in_the_middle_is_rejected() {
    let s = Scratch::new("dotdot-mid");
    let archive = tar(&[E::dir("a/"), E::file("a/../../evil", b"x")]);
    escape_reason(s.unpack(&archive), "a/../../evil");
    s.assert_contained();
}

#[test]
fn absolute_path_lands_inside() {
    let s = Scratch::new("absolute");
    let name = unique("abs");
    s.unpack(&tar(&[E::file(&format!("/{name}"), b"inside")]))
        .unwrap();
    assert_eq!(fs::read(s.at(&name)).unwrap(), b"inside");
    assert!(!exists(&Path::new("/").join(&name)));
    s.assert_contained();
}

#[test]
fn symlink_to_root_is_clamped() {
    let s = Scratch::new("link-root");
    let name = unique("root");
    let archive = tar(&[
        E::symlink("link", "/"),
        E::file(&format!("link/{name}"), b"clamped"),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at(&name)).unwrap(), b"clamped");
    assert!(
        !exists(&Path::new("/").join(&name)),
        "wrote to the host's /"
    );
    assert_eq!(fs::read_link(s.at("link")).unwrap(), Path::new("/"));
    s.assert_contained();
}

#[test]
fn symlink_climbing_out_is_clamped() {
    let s = Scratch::new("link-up");
    let archive = tar(&[
        E::symlink("link", "../.."),
        E::file("link/evil", b"clamped"),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at("evil")).unwrap(), b"clamped");
    s.assert_contained();
}

#[test]
fn symlink_chain_is_clamped() {
    let s = Scratch::new("link-chain");
    let archive = tar(&[
        E::symlink("a", "b"),
        E::symlink("b", ".."),
        E::file("a/evil", b"clamped"),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at("evil")).unwrap(), b"clamped");
    s.assert_contained();
}

#[test]
fn symlink_to_the_host_path_of_the_scratch_dir_stays_inside() {
    let s = Scratch::new("link-abs-host");
    let host = s.dir.to_str().unwrap().to_owned();
    let archive = tar(&[E::symlink("link", &host), E::file("link/evil", b"x")]);
    // In root, `link` points at `dest/<host path>`, which does not exist.
    match s.unpack(&archive) {
        Err(UnpackError::Invalid { entry, reason }) => {
            assert_eq!(entry, "link/evil");
            assert!(reason.contains("dangling symlink"), "{reason}");
        }
        other => panic!("expected a dangling-symlink error, got {other:?}"),
    }
    s.assert_contained();
}

#[test]
fn symlink_into_proc_is_not_followed_on_the_host() {
    let s = Scratch::new("link-proc");
    let archive = tar(&[E::symlink("p", "/proc/self/cwd"), E::file("p/evil", b"x")]);
    assert!(matches!(
        s.unpack(&archive),
        Err(UnpackError::Invalid { ref entry, .. }) if entry == "p/evil"
    ));
    assert!(!exists(Path::new("evil")), "wrote to the process's cwd");
    s.assert_contained();
}

#[test]
fn hardlink_to_host_file_is_rejected() {
    let s = Scratch::new("hl-passwd");
    let archive = tar(&[E::hardlink("pw", "/etc/passwd")]);
    let reason = escape_reason(s.unpack(&archive), "pw");
    assert!(
        reason.contains("not a regular file unpacked earlier"),
        "{reason}"
    );
    assert!(!exists(&s.at("pw")));
    s.assert_contained();
}

#[test]
fn hardlink_climbing_out_is_rejected() {
    let s = Scratch::new("hl-up");
    let archive = tar(&[E::hardlink("s", "../sentinel")]);
    let reason = escape_reason(s.unpack(&archive), "s");
    assert!(reason.contains("`..`"), "{reason}");
    assert!(!exists(&s.at("s")));
    s.assert_contained();
    assert_eq!(lstat(&s.dir.join("sentinel")).nlink(), 1);
}

#[test]
fn hardlink_through_symlink_is_rejected() {
    let s = Scratch::new("hl-through-link");
    // Resolved naively, `up/sentinel` is the sentinel next to the layer directory.
    let archive = tar(&[E::symlink("up", ".."), E::hardlink("h", "up/sentinel")]);
    let reason = escape_reason(s.unpack(&archive), "h");
    assert!(reason.contains("passes through a symlink"), "{reason}");
    assert_eq!(lstat(&s.dir.join("sentinel")).nlink(), 1);
    s.assert_contained();

    // Also when the symlink points at a real file inside the layer.
    let s = Scratch::new("hl-through-inner-link");
    let archive = tar(&[
        E::dir("real/"),
        E::file("real/f", b"data"),
        E::symlink("via", "real"),
        E::hardlink("h", "via/f"),
    ]);
    let reason = escape_reason(s.unpack(&archive), "h");
    assert!(reason.contains("passes through a symlink"), "{reason}");
    s.assert_contained();
}

#[test]
fn hardlink_to_symlink_or_directory_is_rejected() {
    let s = Scratch::new("hl-to-link");
    let archive = tar(&[E::symlink("s", "/etc/passwd"), E::hardlink("h", "s")]);
    escape_reason(s.unpack(&archive), "h");
    s.assert_contained();

    let s = Scratch::new("hl-to-dir");
    let archive = tar(&[E::dir("d/"), E::hardlink("h", "d")]);
    escape_reason(s.unpack(&archive), "h");
    s.assert_contained();
}

#[test]
fn directory_replaced_by_symlink_then_written_through() {
    let s = Scratch::new("dir-to-link");
    let archive = tar(&[
        E::dir("d/").mode(0o777),
        E::file("d/x", b"x"),
        E::symlink("d", ".."),
        E::file("d/evil", b"clamped"),
    ]);
    s.unpack(&archive).unwrap();
    assert!(lstat(&s.at("d")).file_type().is_symlink());
    assert_eq!(fs::read(s.at("evil")).unwrap(), b"clamped");
    // The deferred chmod of `d` (0777) must not land on what the symlink points at.
    assert_eq!(lstat(&s.dest).permissions().mode() & 0o7777, 0o755);
    s.assert_contained();
}

#[test]
fn nested_directory_under_replaced_parent_stays_inside() {
    let s = Scratch::new("parent-to-link");
    let archive = tar(&[
        E::dir("a/"),
        E::dir("a/b/"),
        E::symlink("a", "../../.."),
        E::file("a/b/c", b"clamped"),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at("b/c")).unwrap(), b"clamped");
    s.assert_contained();
}

#[test]
fn file_then_directory_of_the_same_name() {
    let s = Scratch::new("file-then-dir");
    let archive = tar(&[
        E::file("x", b"file"),
        E::dir("x/"),
        E::file("x/y", b"inner"),
    ]);
    s.unpack(&archive).unwrap();
    assert!(lstat(&s.at("x")).is_dir());
    assert_eq!(fs::read(s.at("x/y")).unwrap(), b"inner");
    s.assert_contained();
}

#[test]
fn existing_symlink_at_the_final_name_is_replaced_not_followed() {
    let s = Scratch::new("final-link");
    let archive = tar(&[
        E::symlink("f", "../sentinel"),
        E::file("f", b"overwrite?"),
        E::symlink("d", ".."),
        E::dir("d/").mode(0o700),
        E::symlink("p", "../sentinel"),
        E::fifo("p"),
        E::symlink("w", "../sentinel"),
        E::file(".wh.w", b""),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at("f")).unwrap(), b"overwrite?");
    assert!(lstat(&s.at("d")).is_dir());
    assert_eq!(lstat(&s.at("d")).permissions().mode() & 0o7777, 0o700);
    assert!(lstat(&s.at("p")).file_type().is_fifo());
    assert!(lstat(&s.at("w")).file_type().is_char_device());
    s.assert_contained();
}

#[test]
fn whiteout_through_symlink_stays_inside() {
    let s = Scratch::new("wh-link");
    let archive = tar(&[E::symlink("link", ".."), E::file("link/.wh.sentinel", b"")]);
    s.unpack(&archive).unwrap();
    // Clamped: the whiteout is created at the layer root.
    let wh = lstat(&s.at("sentinel"));
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    s.assert_contained();
}

#[test]
fn opaque_marker_through_symlink_stays_inside() {
    let s = Scratch::new("opq-link");
    let archive = tar(&[E::symlink("link", ".."), E::file("link/.wh..wh..opq", b"")]);
    s.unpack(&archive).unwrap();
    assert_eq!(
        super::layer::xattr(&s.dest, c"user.overlay.opaque"),
        Some(b"y".to_vec())
    );
    assert_eq!(super::layer::xattr(&s.dir, c"user.overlay.opaque"), None);
    assert_eq!(super::layer::xattr(&s.dir, c"trusted.overlay.opaque"), None);
    s.assert_contained();
}

#[test]
fn whiteout_of_the_parent_is_rejected() {
    let s = Scratch::new("wh-dotdot");
    let archive = tar(&[E::file(".wh..", b"")]);
    assert!(matches!(
        s.unpack(&archive),
        Err(UnpackError::Invalid { .. })
    ));
    s.assert_contained();
}

#[test]
fn root_entry_that_is_not_a_directory_is_rejected() {
    let s = Scratch::new("root-file");
    let archive = tar(&[E::file("./", b"")]);
    // A regular file named `./` is an old-style directory entry, which is fine...
    s.unpack(&archive).unwrap();
    // ...but a symlink standing for the root is not.
    let s = Scratch::new("root-link");
    let archive = tar(&[E::symlink("/", "..")]);
    assert!(matches!(
        s.unpack(&archive),
        Err(UnpackError::Invalid { .. })
    ));
    s.assert_contained();
}
