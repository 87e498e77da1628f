//! What a well-formed layer turns into: content, modes, owners, times, links, whiteouts, long
//! names, compression.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use super::{E, Scratch, UnpackError, UnpackOptions, UnpackStats, exists, lstat, tar};
use crate::sys;

/// The xattr `name` of `path` (a file or directory), if set.
pub(super) fn xattr(path: &Path, name: &CStr) -> Option<Vec<u8>> {
    let file = File::open(path).unwrap();
    sys::fgetxattr(file.as_fd(), name).unwrap()
}

fn mode(path: &Path) -> u32 {
    lstat(path).permissions().mode() & 0o7777
}

#[test]
fn files_directories_modes_and_mtimes() {
    let s = Scratch::new("basic");
    let archive = tar(&[
        E::dir("etc/").mode(0o750).mtime(1_000),
        E::file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .mode(0o644)
            .mtime(2_000),
        E::dir("usr/").mtime(3_000),
        E::dir("usr/bin/").mode(0o555).mtime(4_000),
        E::file("usr/bin/su", b"#!").mode(0o4755).mtime(5_000),
        E::file("usr/bin/wall", b"#!").mode(0o2755),
        E::dir("tmp/").mode(0o1777),
    ]);
    let stats = s.unpack(&archive).unwrap();
    assert_eq!(
        stats,
        UnpackStats {
            entries: 7,
            bytes: 30,
            whiteouts: 0,
            skipped_devices: 0
        }
    );
    assert_eq!(
        fs::read(s.at("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    assert_eq!(mode(&s.at("etc")), 0o750);
    assert_eq!(mode(&s.at("etc/passwd")), 0o644);
    assert_eq!(mode(&s.at("usr/bin")), 0o555);
    assert_eq!(mode(&s.at("usr/bin/su")), 0o4755);
    assert_eq!(mode(&s.at("usr/bin/wall")), 0o2755);
    assert_eq!(mode(&s.at("tmp")), 0o1777);
    // Directory mtimes survive the children created after them.
    assert_eq!(lstat(&s.at("etc")).mtime(), 1_000);
    assert_eq!(lstat(&s.at("usr")).mtime(), 3_000);
    assert_eq!(lstat(&s.at("usr/bin")).mtime(), 4_000);
    assert_eq!(lstat(&s.at("etc/passwd")).mtime(), 2_000);
    assert_eq!(lstat(&s.at("usr/bin/su")).mtime(), 5_000);
}

#[test]
fn missing_parents_and_the_root_belong_to_the_image_root() {
    let s = Scratch::new("implicit");
    let opts = UnpackOptions {
        id_shift: 100_000,
        ..Default::default()
    };
    s.unpack_with(&tar(&[E::file("a/b/c", b"x")]), &opts)
        .unwrap();
    for dir in [s.dest.clone(), s.at("a"), s.at("a/b")] {
        let m = lstat(&dir);
        assert!(m.is_dir());
        assert_eq!((m.uid(), m.gid()), (100_000, 100_000), "{}", dir.display());
        assert_eq!(mode(&dir), 0o755);
    }
}

#[test]
fn root_entry_sets_the_layer_directory() {
    let s = Scratch::new("root-entry");
    s.unpack(&tar(&[
        E::dir("./").mode(0o700).mtime(42),
        E::file("f", b""),
    ]))
    .unwrap();
    assert_eq!(mode(&s.dest), 0o700);
    assert_eq!(lstat(&s.dest).mtime(), 42);
}

#[test]
fn symlinks_are_stored_verbatim() {
    let s = Scratch::new("symlinks");
    let targets = [
        ("abs", "/etc/passwd"),
        ("rel", "../x/y"),
        ("up", "../../../../../etc/shadow"),
        ("dangling", "nowhere"),
    ];
    let entries: Vec<E> = targets
        .iter()
        .map(|(name, target)| E::symlink(name, target).mtime(7_000))
        .collect();
    s.unpack(&tar(&entries)).unwrap();
    for (name, target) in targets {
        let path = s.at(name);
        assert!(lstat(&path).file_type().is_symlink());
        assert_eq!(fs::read_link(&path).unwrap(), Path::new(target));
        assert_eq!(lstat(&path).mtime(), 7_000);
    }
}

#[test]
fn hardlinks_share_the_inode() {
    let s = Scratch::new("hardlinks");
    let archive = tar(&[
        E::dir("bin/"),
        E::file("bin/busybox", b"\x7fELF").mode(0o755),
        E::hardlink("bin/sh", "bin/busybox"),
        E::hardlink("/bin/ls", "/bin/busybox"),
        E::hardlink("bin/busybox", "bin/busybox"),
    ]);
    s.unpack(&archive).unwrap();
    let target = lstat(&s.at("bin/busybox"));
    assert_eq!(target.nlink(), 3);
    for link in ["bin/sh", "bin/ls"] {
        assert_eq!(lstat(&s.at(link)).ino(), target.ino());
    }
}

#[test]
fn whiteout_becomes_a_char_device() {
    let s = Scratch::new("whiteout");
    let archive = tar(&[
        E::dir("etc/"),
        E::file("etc/.wh.motd", b""),
        E::dir("etc/old/"),
        E::file("etc/old/f", b"x"),
        E::file("etc/.wh.old", b""),
        E::file("top", b""),
        E::file(".wh.top", b""),
        E::file("nodir/.wh.gone", b""),
    ]);
    let stats = s.unpack(&archive).unwrap();
    assert_eq!(stats.whiteouts, 4);
    for path in ["etc/motd", "etc/old", "top", "nodir/gone"] {
        let m = lstat(&s.at(path));
        assert!(m.file_type().is_char_device(), "{path}");
        assert_eq!(m.rdev(), 0, "{path}");
    }
    assert!(!exists(&s.at("etc/.wh.motd")));
    assert!(!exists(&s.at(".wh.top")));
}

#[test]
fn opaque_directory_gets_the_overlay_xattrs() {
    let s = Scratch::new("opaque");
    let archive = tar(&[
        E::dir("var/"),
        E::dir("var/lib/"),
        E::file("var/lib/.wh..wh..opq", b""),
        E::file("var/lib/new", b"x"),
        E::file("fresh/.wh..wh..opq", b""),
        E::file(".wh..wh.plnk/123.456", b"aufs"),
    ]);
    let stats = s.unpack(&archive).unwrap();
    assert_eq!(stats.whiteouts, 2);
    for dir in ["var/lib", "fresh"] {
        let dir = s.at(dir);
        assert_eq!(xattr(&dir, c"trusted.overlay.opaque"), Some(b"y".to_vec()));
        assert_eq!(xattr(&dir, c"user.overlay.opaque"), Some(b"y".to_vec()));
    }
    assert_eq!(xattr(&s.at("var"), c"trusted.overlay.opaque"), None);
    assert!(!exists(&s.at("var/lib/.wh..wh..opq")));
    assert!(!exists(&s.at(".wh..wh.plnk")));
    assert_eq!(fs::read(s.at("var/lib/new")).unwrap(), b"x");
}

#[test]
fn long_names_via_pax_and_gnu() {
    let s = Scratch::new("long");
    let deep = format!("{}/", ["d"; 60].join("/"));
    let pax_name = format!("{deep}{}", "p".repeat(120));
    let gnu_name = format!("{deep}{}", "g".repeat(120));
    let long_target = format!("/{}", "t".repeat(150));
    assert!(pax_name.len() > 100 && gnu_name.len() > 100);
    let archive = tar(&[
        E::dir(&deep),
        E::file(&pax_name, b"pax"),
        E::file(&gnu_name, b"gnu").gnu_long_names(),
        E::symlink("pax-link", &long_target),
        E::symlink("gnu-link", &long_target).gnu_long_names(),
        E::hardlink("hl", &pax_name),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at(&pax_name)).unwrap(), b"pax");
    assert_eq!(fs::read(s.at(&gnu_name)).unwrap(), b"gnu");
    for link in ["pax-link", "gnu-link"] {
        assert_eq!(fs::read_link(s.at(link)).unwrap(), Path::new(&long_target));
    }
    assert_eq!(fs::read(s.at("hl")).unwrap(), b"pax");
}

#[test]
fn pax_overrides_owner_and_mtime() {
    let s = Scratch::new("pax-fields");
    let archive = tar(&[E::file("f", b"")
        .owner(1, 1)
        .pax("uid", b"3000000")
        .pax("gid", b"3000001")
        .pax("mtime", b"1700000000.25")]);
    s.unpack(&archive).unwrap();
    let m = lstat(&s.at("f"));
    assert_eq!((m.uid(), m.gid()), (3_000_000, 3_000_001));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 250_000_000));
}

fn sample_layer() -> Vec<u8> {
    tar(&[
        E::dir("app/"),
        E::file("app/data", &b"compressible ".repeat(1000)),
        E::symlink("app/link", "data"),
    ])
}

fn assert_sample(s: &Scratch, stats: UnpackStats) {
    assert_eq!(stats.entries, 3);
    assert_eq!(stats.bytes, 13_000);
    assert_eq!(
        fs::read(s.at("app/data")).unwrap(),
        b"compressible ".repeat(1000)
    );
    assert_eq!(fs::read_link(s.at("app/link")).unwrap(), Path::new("data"));
}

#[test]
fn gzip_layer() {
    let s = Scratch::new("gzip");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_layer()).unwrap();
    let blob = gz.finish().unwrap();
    assert_eq!(
        super::super::Compression::sniff(&blob),
        super::super::Compression::Gzip
    );
    let stats = s.unpack(&blob).unwrap();
    assert_sample(&s, stats);
}

#[test]
fn zstd_layer() {
    use ruzstd::encoding::{CompressionLevel, compress_to_vec};
    let s = Scratch::new("zstd");
    let blob = compress_to_vec(&sample_layer()[..], CompressionLevel::Fastest);
    assert_eq!(
        super::super::Compression::sniff(&blob),
        super::super::Compression::Zstd
    );
    let stats = s.unpack(&blob).unwrap();
    assert_sample(&s, stats);
}

#[test]
fn corrupt_gzip_is_a_stream_error() {
    let s = Scratch::new("gzip-corrupt");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_layer()).unwrap();
    let mut blob = gz.finish().unwrap();
    let crc_at = blob.len() - 8;
    blob[crc_at] ^= 0xff; // break the CRC in the trailer
    assert!(matches!(s.unpack(&blob), Err(UnpackError::Stream { .. })));
}

#[test]
fn truncated_tar_is_an_error() {
    let s = Scratch::new("truncated");
    let archive = tar(&[E::file("big", &[7u8; 4096])]);
    let result = s.unpack(&archive[..1024]);
    assert!(
        matches!(result, Err(UnpackError::ReadData { ref entry, .. }) if entry == "big"),
        "{result:?}"
    );
}

#[test]
fn id_shift_applies_to_every_owner() {
    let s = Scratch::new("idshift");
    let shift = 1_500_000_000;
    let opts = UnpackOptions {
        id_shift: shift,
        ..Default::default()
    };
    let archive = tar(&[
        E::dir("home/").owner(0, 0),
        E::dir("home/user/").owner(1000, 1000).mode(0o700),
        E::file("home/user/f", b"x").owner(1000, 100),
        E::file("sbin/ping", b"").owner(0, 0).mode(0o4755),
        E::symlink("home/user/l", "f").owner(1000, 1000),
        E::fifo("home/user/pipe").owner(1000, 1000),
        E::file("home/.wh.gone", b"").owner(0, 0),
    ]);
    s.unpack_with(&archive, &opts).unwrap();
    let owner = |p: &str| {
        let m = lstat(&s.at(p));
        (m.uid(), m.gid())
    };
    assert_eq!(owner("home"), (shift, shift));
    assert_eq!(owner("home/user"), (shift + 1000, shift + 1000));
    assert_eq!(owner("home/user/f"), (shift + 1000, shift + 100));
    assert_eq!(owner("home/user/l"), (shift + 1000, shift + 1000));
    assert_eq!(owner("home/user/pipe"), (shift + 1000, shift + 1000));
    assert_eq!(owner("home/gone"), (shift, shift));
    assert_eq!(owner("sbin/ping"), (shift, shift));
    // The setuid bit survives the chown.
    assert_eq!(mode(&s.at("sbin/ping")), 0o4755);
}

#[test]
fn id_overflowing_32_bits_is_rejected() {
    let s = Scratch::new("idshift-overflow");
    let opts = UnpackOptions {
        id_shift: u32::MAX - 10,
        ..Default::default()
    };
    let result = s.unpack_with(&tar(&[E::file("f", b"").owner(1000, 0)]), &opts);
    assert!(
        matches!(result, Err(UnpackError::Invalid { .. })),
        "{result:?}"
    );
}

#[test]
fn devices_are_skipped_and_fifos_created() {
    let s = Scratch::new("devices");
    let archive = tar(&[
        E::dir("dev/"),
        E::char_dev("dev/null"),
        E::char_dev("dev/fake-whiteout"),
        E::block_dev("dev/sda"),
        E::fifo("dev/initctl").mode(0o600),
    ]);
    let stats = s.unpack(&archive).unwrap();
    assert_eq!(stats.skipped_devices, 3);
    assert_eq!(stats.entries, 5);
    for dev in ["dev/null", "dev/fake-whiteout", "dev/sda"] {
        assert!(!exists(&s.at(dev)), "{dev}");
    }
    let fifo = lstat(&s.at("dev/initctl"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn xattrs_are_filtered_and_capabilities_namespaced() {
    // VFS_CAP_REVISION_2 | effective, permitted = CAP_NET_RAW (bit 13), inheritable = 0.
    let mut caps_v2 = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        caps_v2.extend_from_slice(&word.to_le_bytes());
    }
    let shift = 200_000;
    let entry = || {
        E::file("ping", b"")
            .pax("SCHILY.xattr.user.mime", b"text/plain")
            .pax("SCHILY.xattr.security.capability", &caps_v2)
            .pax("SCHILY.xattr.trusted.evil", b"1")
            .pax("SCHILY.xattr.user.overlay.redirect", b"/etc")
            .pax("SCHILY.xattr.security.selinux", b"system_u:object_r:bin_t")
    };
    let s = Scratch::new("xattrs");
    let opts = UnpackOptions {
        id_shift: shift,
        preserve_xattrs: true,
    };
    s.unpack_with(&tar(&[entry()]), &opts).unwrap();
    let f = s.at("ping");
    assert_eq!(xattr(&f, c"user.mime"), Some(b"text/plain".to_vec()));
    assert_eq!(xattr(&f, c"trusted.evil"), None);
    assert_eq!(xattr(&f, c"user.overlay.redirect"), None);
    // v3: same flags and sets, plus the root id the capabilities are bound to.
    let mut caps_v3 = Vec::new();
    for word in [0x0300_0001u32, 1 << 13, 0, 0, 0, shift] {
        caps_v3.extend_from_slice(&word.to_le_bytes());
    }
    assert_eq!(xattr(&f, c"security.capability"), Some(caps_v3));

    let s = Scratch::new("xattrs-off");
    s.unpack(&tar(&[entry()])).unwrap();
    assert_eq!(xattr(&s.at("ping"), c"user.mime"), None);
    assert_eq!(xattr(&s.at("ping"), c"security.capability"), None);
}

#[test]
fn replacing_entries_within_a_layer() {
    let s = Scratch::new("replace");
    let archive = tar(&[
        E::dir("d/"),
        E::dir("d/sub/"),
        E::file("d/sub/f", b"x"),
        E::symlink("d/sub/l", "/"),
        E::dir("d/").mode(0o711), // a directory over a directory keeps its contents
        E::dir("tree/"),
        E::dir("tree/a/"),
        E::dir("tree/a/b/"),
        E::file("tree/a/b/f", b"x"),
        E::file("tree", b"now a file"), // a non-empty directory replaced by a file
        E::file("f", b"old"),
        E::file("f", b"new"),
    ]);
    s.unpack(&archive).unwrap();
    assert_eq!(fs::read(s.at("d/sub/f")).unwrap(), b"x");
    assert_eq!(mode(&s.at("d")), 0o711);
    assert_eq!(fs::read(s.at("tree")).unwrap(), b"now a file");
    assert_eq!(fs::read(s.at("f")).unwrap(), b"new");
}

#[test]
fn destination_must_be_empty() {
    let s = Scratch::new("not-empty");
    fs::write(s.at("leftover"), b"").unwrap();
    let result = s.unpack(&tar(&[E::file("f", b"")]));
    assert!(
        matches!(result, Err(UnpackError::DestNotEmpty { .. })),
        "{result:?}"
    );
}

#[test]
fn error_messages_name_the_entry_once() {
    let s = Scratch::new("messages");
    let err = s.unpack(&tar(&[E::file("../evil", b"")])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "entry \"../evil\" would escape the layer: the path has a `..` component (rejected \
         wherever it appears)"
    );
    let s = Scratch::new("messages-stream");
    let archive = tar(&[E::file("ok", b"")]);
    let mut garbage = archive[..512].to_vec(); // header only, then a broken second header
    garbage.extend_from_slice(&[b'x'; 512]);
    let err = s.unpack(&garbage).unwrap_err();
    assert!(matches!(err, UnpackError::Stream { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot read the layer stream after entry \"ok\""
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn hostile_mtimes_are_errors_not_panics() {
    for value in [
        &b"9223372036854775807.999999999"[..],
        b"-9223372036854775808.5",
        b"99999999999999999999",
        b"1.x",
    ] {
        let s = Scratch::new("mtime");
        let result = s.unpack(&tar(&[E::file("f", b"").pax("mtime", value)]));
        assert!(
            matches!(
                result,
                Ok(_) | Err(UnpackError::Invalid { .. } | UnpackError::Io { .. })
            ),
            "{result:?}"
        );
    }
}

/// In a user namespace `trusted.*` xattrs are refused with `EPERM`; the opaque marker must then
/// still be set as `user.overlay.opaque`, and whiteout devices (`0:0`) may still be created. The
/// test re-runs itself under `unshare --user --map-root-user`.
#[test]
fn whiteouts_in_a_user_namespace() {
    const INNER: &str = "COVE_IMAGE_TEST_IN_USERNS";
    const NAME: &str = "unpack::tests::layer::whiteouts_in_a_user_namespace";
    if std::env::var_os(INNER).is_none() {
        let out = std::process::Command::new("unshare")
            .args(["--user", "--map-root-user"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1"])
            .env(INNER, "1")
            .output()
            .expect("run unshare (util-linux)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "the user-namespace run failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let s = Scratch::new("userns");
    let archive = tar(&[
        E::dir("d/"),
        E::file("d/.wh..wh..opq", b""),
        E::file("d/.wh.gone", b""),
    ]);
    let stats = s.unpack(&archive).unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert_eq!(
        xattr(&s.at("d"), c"user.overlay.opaque"),
        Some(b"y".to_vec())
    );
    let gone = lstat(&s.at("d/gone"));
    assert!(gone.file_type().is_char_device());
    assert_eq!(gone.rdev(), 0);
}
