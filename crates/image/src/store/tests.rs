//! Store tests, run as root against real directories (layers are unpacked with shifted owners).

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::{Arc, Barrier, mpsc};
use std::time::Duration;

use super::*;
use crate::test_images::{E, TempDir, gzip, layer, names, tar};

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

/// Stores `layers` and a config and manifest made of `tag`, and saves a record for `tag`.
fn record(store: &Store, tag: &str, layers: &[Digest]) -> ImageRecord {
    let manifest = store
        .put_blob(format!("manifest {tag}").as_bytes(), None)
        .unwrap();
    let config = store
        .put_blob(format!("config {tag}").as_bytes(), None)
        .unwrap();
    let image = ImageRecord {
        reference: reference(tag),
        manifest_digest: manifest,
        config_digest: config,
        layers: layers.to_vec(),
        config: RunConfig {
            cmd: vec!["sh".into()],
            ..RunConfig::default()
        },
    };
    store.save_image(&image).unwrap();
    image
}

#[test]
fn blobs_are_verified_and_stored_once() {
    let dir = TempDir::new("blob-once");
    let store = dir.store();
    let digest = store.put_blob(&b"hello"[..], None).unwrap();
    assert_eq!(digest, Digest::of(b"hello"));
    let path = store.blob_path(&digest);
    assert_eq!(fs::read(&path).unwrap(), b"hello");
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);

    // Again, with and without the expected digest: same blob, same file, nothing new.
    assert_eq!(
        store.put_blob(&b"hello"[..], Some(&digest)).unwrap(),
        digest
    );
    assert_eq!(store.put_blob(&b"hello"[..], None).unwrap(), digest);
    assert_eq!(fs::metadata(&path).unwrap().ino(), meta.ino());
    assert_eq!(names(&store.blobs), [digest.hex()]);
    assert!(store.has_blob(&digest));
    assert_eq!(store.blob_size(&digest).unwrap(), 5);
    store.verify_blob(&digest).unwrap();
}

#[test]
fn a_blob_that_does_not_match_is_not_stored() {
    let dir = TempDir::new("blob-mismatch");
    let store = dir.store();
    let good = Digest::of(b"good");
    let err = store.put_blob(&b"evil"[..], Some(&good)).unwrap_err();
    let StoreError::DigestMismatch { expected, actual } = &err else {
        panic!("{err:?}");
    };
    assert_eq!((*expected, *actual), (good, Digest::of(b"evil")));
    let message = err.to_string();
    assert!(message.contains(&good.to_string()), "{message}");
    assert!(
        message.contains(&Digest::of(b"evil").to_string()),
        "{message}"
    );
    assert_eq!(
        names(&store.blobs),
        Vec::<String>::new(),
        "nothing half-stored"
    );

    // Claiming a stored digest for other content fails too, and leaves the stored blob alone.
    store.put_blob(&b"good"[..], None).unwrap();
    assert!(matches!(
        store.put_blob(&b"evil"[..], Some(&good)),
        Err(StoreError::DigestMismatch { .. })
    ));
    assert_eq!(fs::read(store.blob_path(&good)).unwrap(), b"good");
    assert_eq!(names(&store.blobs), [good.hex()]);
}

#[test]
fn verify_blob_finds_corruption() {
    let dir = TempDir::new("blob-verify");
    let store = dir.store();
    let digest = store.put_blob(&b"content"[..], None).unwrap();
    let path = store.blob_path(&digest);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, b"rotten").unwrap();
    match store.verify_blob(&digest) {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            assert_eq!((expected, actual), (digest, Digest::of(b"rotten")))
        }
        other => panic!("{other:?}"),
    }
    let absent = Digest::of(b"absent");
    assert!(matches!(
        store.verify_blob(&absent),
        Err(StoreError::MissingBlob { digest }) if digest == absent
    ));
}

#[test]
fn layers_are_unpacked_once_with_shifted_owners() {
    let dir = TempDir::new("layer-once");
    let store = dir.store();
    let blob = gzip(&tar(&[
        E::dir("etc/"),
        E::file("etc/motd", b"hi\n").owner(0, 0),
        E::file("home/user/notes", b"x").owner(1000, 100),
    ]));
    let digest = store.put_blob(&blob[..], None).unwrap();
    let path = store.layer_dir(&digest).unwrap();
    assert_eq!(path, store.root().join("layers").join(digest.hex()));
    assert_eq!(fs::read(path.join("etc/motd")).unwrap(), b"hi\n");
    let motd = fs::metadata(path.join("etc/motd")).unwrap();
    assert_eq!((motd.uid(), motd.gid()), (SANDBOX_ID_BASE, SANDBOX_ID_BASE));
    let notes = fs::metadata(path.join("home/user/notes")).unwrap();
    assert_eq!(
        (notes.uid(), notes.gid()),
        (SANDBOX_ID_BASE + 1000, SANDBOX_ID_BASE + 100)
    );

    assert_eq!(store.layer_dir(&digest).unwrap(), path);
    assert_eq!(
        fs::metadata(path.join("etc/motd")).unwrap().ino(),
        motd.ino()
    );
    assert_eq!(names(&store.layers), [digest.hex()]);
}

#[test]
fn concurrent_unpacks_of_one_layer_agree() {
    let dir = TempDir::new("layer-race");
    let root = dir.join("store");
    for round in 0..4 {
        let files: Vec<E> = (0..300)
            .map(|i| {
                E::file(
                    &format!("d{}/f{i}", i % 7),
                    format!("{round}-{i}").as_bytes(),
                )
            })
            .collect();
        let digest = dir.store().put_blob(&tar(&files)[..], None).unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let (barrier, root) = (Arc::clone(&barrier), root.clone());
                    // Each thread opens its own store, as two processes would.
                    s.spawn(move || {
                        let store = Store::open(root, SANDBOX_ID_BASE).unwrap();
                        barrier.wait();
                        store.layer_dir(&digest)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let paths: Vec<PathBuf> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(paths[0], paths[1]);
        assert_eq!(
            fs::read(paths[0].join("d1/f1")).unwrap(),
            format!("{round}-1").as_bytes()
        );
        let layers = names(&root.join("layers"));
        assert_eq!(
            layers.len(),
            round + 1,
            "one directory per layer, no leftovers: {layers:?}"
        );
        assert!(
            layers.iter().all(|n| !n.starts_with(TMP_PREFIX)),
            "{layers:?}"
        );
    }
}

#[test]
fn a_hostile_layer_is_rejected_and_leaves_nothing() {
    let dir = TempDir::new("layer-hostile");
    let store = dir.store();
    let blob = tar(&[E::file("ok", b"fine"), E::file("../evil", b"x")]);
    let digest = store.put_blob(&blob[..], None).unwrap();
    match store.layer_dir(&digest) {
        Err(StoreError::Unpack {
            digest: d,
            source: UnpackError::Escape { entry, .. },
        }) => assert_eq!((d, entry.as_str()), (digest, "../evil")),
        other => panic!("{other:?}"),
    }
    assert_eq!(names(&store.layers), Vec::<String>::new());
    assert!(!dir.join("store/evil").exists() && !dir.join("evil").exists());
}

#[test]
fn a_blob_corrupted_on_disk_is_not_unpacked() {
    let dir = TempDir::new("layer-corrupt");
    let store = dir.store();
    let digest = store.put_blob(&layer(&[("a", "1")])[..], None).unwrap();
    let path = store.blob_path(&digest);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&path, layer(&[("a", "2")])).unwrap();
    assert!(matches!(
        store.layer_dir(&digest),
        Err(StoreError::DigestMismatch { expected, .. }) if expected == digest
    ));
    assert_eq!(names(&store.layers), Vec::<String>::new());
}

#[test]
fn records_round_trip_and_a_missing_one_says_how_to_import() {
    let dir = TempDir::new("records");
    let store = dir.store();
    let base = store.put_blob(&layer(&[("a", "1")])[..], None).unwrap();
    let image = record(&store, "busybox", &[base]);
    assert_eq!(
        store
            .image(&reference("docker.io/library/busybox:latest"))
            .unwrap(),
        image
    );
    assert_eq!(
        names(&store.images),
        ["docker.io%2Flibrary%2Fbusybox%3Alatest.json"]
    );
    let other = record(&store, "host:5000/team/app:v1", &[base]);
    assert_eq!(store.images().unwrap(), [image.clone(), other]);

    let missing = reference("busybox:1.36");
    let err = store.image(&missing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no such image: busybox:1.36; pull it with `cove image pull` or import it with `cove image import`"
    );
    assert_eq!(store.remove_image(&reference("busybox")).unwrap(), image);
    assert!(matches!(
        store.image(&reference("busybox")),
        Err(StoreError::NoSuchImage { .. })
    ));
    assert!(matches!(
        store.remove_image(&reference("busybox")),
        Err(StoreError::NoSuchImage { .. })
    ));

    // A record may only name stored blobs.
    let absent = Digest::of(b"absent");
    let dangling = ImageRecord {
        layers: vec![absent],
        ..image
    };
    assert!(matches!(
        store.save_image(&dangling),
        Err(StoreError::MissingBlob { digest }) if digest == absent
    ));
}

#[test]
fn reopening_with_another_id_shift_is_refused() {
    let dir = TempDir::new("id-shift");
    dir.store();
    Store::open(dir.join("store"), SANDBOX_ID_BASE).unwrap();
    let err = Store::open(dir.join("store"), 0).unwrap_err();
    assert!(
        matches!(err, StoreError::IdShift { stored, requested: 0, .. } if stored == SANDBOX_ID_BASE),
        "{err:?}"
    );
}

#[test]
fn prune_removes_exactly_what_no_record_names() {
    let dir = TempDir::new("prune");
    let store = dir.store();
    let shared_tar = layer(&[("bin/sh", "shell"), ("etc/os-release", "test")]);
    let own_tar = tar(&[
        E::file("app/big", &[7u8; 10_000]),
        E::hardlink("app/big-again", "app/big"),
        E::symlink("app/link", "big"),
    ]);
    let shared = store.put_blob(&shared_tar[..], None).unwrap();
    let own = store.put_blob(&own_tar[..], None).unwrap();
    let keep = record(&store, "keep", &[shared]);
    let dropped = record(&store, "drop", &[shared, own]);
    let keep_dirs = store.resolve_layers(&keep).unwrap();
    store.resolve_layers(&dropped).unwrap();
    let unreferenced = store.put_blob(&b"stray"[..], None).unwrap();
    let stale = store.blobs.join(".tmp-4000000-0");
    fs::write(&stale, b"interrupted").unwrap();

    // Nothing to do while both images are recorded, except the stray blob and the leftover.
    let report = store.prune().unwrap();
    assert_eq!(
        report,
        PruneReport {
            blobs_removed: 1,
            layers_removed: 0,
            temp_removed: 1,
            bytes_freed: 5 + 11,
            layers_in_use: 0,
        }
    );
    assert!(!store.has_blob(&unreferenced));

    store.remove_image(&reference("drop")).unwrap();
    let report = store.prune().unwrap();
    let blob_bytes = own_tar.len() + "manifest drop".len() + "config drop".len();
    assert_eq!(
        report,
        PruneReport {
            blobs_removed: 3,
            layers_removed: 1,
            temp_removed: 0,
            // The layer's one file (hardlinked twice) counts once; the symlink not at all.
            bytes_freed: (blob_bytes + 10_000) as u64,
            layers_in_use: 0,
        }
    );
    let mut expected = vec![
        shared.hex(),
        keep.manifest_digest.hex(),
        keep.config_digest.hex(),
    ];
    expected.sort();
    assert_eq!(names(&store.blobs), expected);
    assert_eq!(names(&store.layers), [shared.hex()]);
    assert_eq!(store.resolve_layers(&keep).unwrap(), keep_dirs);
    assert_eq!(store.prune().unwrap(), PruneReport::default());
}

#[test]
fn prune_keeps_a_layer_a_sandbox_pins_until_it_is_unpinned() {
    let dir = TempDir::new("prune-pinned");
    let store = dir.store();
    let tar = layer(&[("bin/sh", "shell")]);
    let digest = store.put_blob(&tar[..], None).unwrap();
    let image = record(&store, "pinned", &[digest]);
    let pinned = store.pin_layers(&image).unwrap();
    assert_eq!(pinned.dirs, [store.layers.join(digest.hex())]);
    store.remove_image(&reference("pinned")).unwrap();

    let report = store.prune().unwrap();
    assert_eq!((report.layers_removed, report.layers_in_use), (0, 1));
    assert!(
        pinned.dirs[0].join("bin/sh").exists(),
        "prune removed a pinned layer"
    );

    drop(pinned);
    let report = store.prune().unwrap();
    assert_eq!((report.layers_removed, report.layers_in_use), (1, 0));
    assert!(!store.has_layer(&digest));
}

#[test]
fn two_sandboxes_pin_the_same_layer() {
    let dir = TempDir::new("pin-twice");
    let store = dir.store();
    let digest = store.put_blob(&layer(&[("a", "b")])[..], None).unwrap();
    let image = record(&store, "twice", &[digest]);
    let first = store.pin_layers(&image).unwrap();
    let second = store.pin_layers(&image).unwrap();
    store.remove_image(&reference("twice")).unwrap();
    drop(first);
    assert_eq!(store.prune().unwrap().layers_in_use, 1);
    drop(second);
    assert_eq!(store.prune().unwrap().layers_removed, 1);
}

#[test]
fn prune_waits_for_a_hold() {
    let dir = TempDir::new("prune-hold");
    let store = dir.store();
    let hold = store.hold().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| done_tx.send(store.prune().unwrap()).unwrap());
        assert!(
            done_rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "prune ran while the store was held"
        );
        drop(hold);
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    });
}
