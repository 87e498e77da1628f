//! Import tests: OCI layouts (directory and archive) and docker-save archives built in the test,
//! imported into a store in a temp directory, run as root.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::json;

use super::*;
use crate::oci::host_platform;
use crate::store::PruneReport;
use crate::test_images::{
    Blob, E, Layout, OCI_MANIFEST, TempDir, TestImage, annotated, chain, docker_save, for_platform,
    gzip, layer, names, tar,
};
use crate::unpack::UnpackError;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

fn host_arch() -> &'static str {
    host_platform().1
}

/// An architecture that is not this host's.
fn other_arch(n: usize) -> &'static str {
    ["arm64", "s390x", "ppc64le", "riscv64"]
        .into_iter()
        .filter(|a| *a != host_arch())
        .nth(n)
        .unwrap()
}

fn base_layer() -> Vec<u8> {
    layer(&[("bin/sh", "#!shell"), ("etc/os-release", "ID=test\n")])
}

/// A two-layer image for this host, layers gzipped.
fn app_image() -> TestImage {
    TestImage::new(
        host_arch(),
        &[base_layer(), layer(&[("srv/app", "app v1")])],
        true,
    )
}

fn write_file(dir: &TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// Nothing of a failed import is left: no record, no blob, no layer, no temporary file.
#[track_caller]
fn assert_store_empty(store: &Store) {
    let root = store.root();
    assert_eq!(names(&root.join("images")), Vec::<String>::new());
    assert_eq!(names(&root.join("blobs/sha256")), Vec::<String>::new());
    assert_eq!(names(&root.join("layers")), Vec::<String>::new());
}

#[test]
fn imports_an_oci_layout_directory() {
    let dir = TempDir::new("oci-dir");
    let store = dir.store();
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(annotated(desc, REF_NAME, "example.com/team/app:1.0"));
    layout.write_dir(&dir.join("layout"));

    let records = import(&store, &dir.join("layout"), None).unwrap();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.reference, reference("example.com/team/app:1.0"));
    assert_eq!(record.manifest_digest, image.manifest.digest);
    assert_eq!(record.config_digest, image.config.digest);
    assert_eq!(record.layers, image.layer_digests());
    assert_eq!(
        record.config,
        RunConfig {
            entrypoint: vec!["/bin/entry".into()],
            cmd: vec!["serve".into(), "--port".into(), "80".into()],
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                "GREETING=hello world".into()
            ],
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            exposed_ports: vec!["53/udp".into(), "80/tcp".into()],
        }
    );
    assert_eq!(store.image(&record.reference).unwrap(), *record);

    // Layers were unpacked during the import, bottom first.
    assert_eq!(names(&store.root().join("layers")).len(), 2);
    let dirs = store.resolve_layers(record).unwrap();
    assert_eq!(fs::read(dirs[0].join("bin/sh")).unwrap(), b"#!shell");
    assert_eq!(fs::read(dirs[1].join("srv/app")).unwrap(), b"app v1");
    // Exactly the image's blobs were stored.
    let mut expected = vec![image.manifest.digest.hex(), image.config.digest.hex()];
    expected.extend(image.layers.iter().map(|l| l.digest.hex()));
    expected.sort();
    assert_eq!(names(&store.root().join("blobs/sha256")), expected);
}

#[test]
fn imports_an_oci_layout_archive_plain_or_compressed() {
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(annotated(desc, REF_NAME, "app:1.0"));
    let archive = layout.tar();
    for (name, bytes) in [("plain", archive.clone()), ("gzipped", gzip(&archive))] {
        let dir = TempDir::new(&format!("oci-tar-{name}"));
        let store = dir.store();
        let path = write_file(&dir, "image.tar", &bytes);
        let records = import(&store, &path, None).unwrap();
        assert_eq!(records.len(), 1, "{name}");
        assert_eq!(records[0].reference, reference("app:1.0"));
        assert_eq!(records[0].manifest_digest, image.manifest.digest);
        assert_eq!(records[0].layers, image.layer_digests());
        assert_eq!(records[0].config.working_dir.as_deref(), Some("/srv"));
        let dirs = store.resolve_layers(&records[0]).unwrap();
        assert_eq!(fs::read(dirs[1].join("srv/app")).unwrap(), b"app v1");
        // The layout's oci-layout and index.json were not stored as blobs.
        assert_eq!(names(&store.root().join("blobs/sha256")).len(), 4, "{name}");
    }
}

#[test]
fn imports_a_docker_save_archive_with_shared_layers() {
    let dir = TempDir::new("docker-save");
    let store = dir.store();
    let busybox = TestImage::new(host_arch(), &[base_layer(), layer(&[("a", "1")])], false);
    let app = TestImage::with_config(
        host_arch(),
        &[base_layer(), layer(&[("b", "2")])],
        false,
        json!({"Cmd": ["/b"], "Env": null}),
    );
    let archive = docker_save(&[
        (&busybox, &["busybox:latest", "busybox:1.36"]),
        (&app, &["app:v1"]),
    ]);
    let path = write_file(&dir, "save.tar", &archive);

    let records = import(&store, &path, Some("ignored:tag")).unwrap();
    let refs: Vec<String> = records.iter().map(|r| r.reference.to_string()).collect();
    assert_eq!(refs, ["busybox:latest", "busybox:1.36", "app:v1"]);
    assert_eq!(records[0].config_digest, busybox.config.digest);
    assert_eq!(records[0].layers, busybox.layer_digests());
    assert_eq!(records[0].manifest_digest, records[1].manifest_digest);
    assert_eq!(records[2].layers, app.layer_digests());
    assert_eq!(records[2].config.cmd, ["/b"]);
    assert_eq!(records[2].config.env, Vec::<String>::new());

    // The manifest import wrote names the config and the layers as plain tars.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(store.blob_path(&records[2].manifest_digest)).unwrap())
            .unwrap();
    assert_eq!(manifest["config"]["digest"], app.config.digest.to_string());
    assert_eq!(
        manifest["layers"][1]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar"
    );

    // The base layer is stored and unpacked once, and both images stack the same directory.
    let busybox_dirs = store.resolve_layers(&records[0]).unwrap();
    let app_dirs = store.resolve_layers(&records[2]).unwrap();
    assert_eq!(busybox_dirs[0], app_dirs[0]);
    assert_eq!(names(&store.root().join("layers")).len(), 3);
    // Two configs, three layers, two manifests; the legacy `json` and `VERSION` files went.
    assert_eq!(names(&store.root().join("blobs/sha256")).len(), 7);
}

#[test]
fn reimporting_changes_nothing() {
    let dir = TempDir::new("reimport");
    let store = dir.store();
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(annotated(desc, REF_NAME, "app:1"));
    let path = write_file(&dir, "image.tar", &layout.tar());
    let first = import(&store, &path, None).unwrap();
    let layer_dir = store.layer_dir(&first[0].layers[0]).unwrap();
    let inode = fs::metadata(layer_dir.join("bin/sh")).unwrap().ino();
    let blobs = names(&store.root().join("blobs/sha256"));
    assert_eq!(import(&store, &path, None).unwrap(), first);
    assert_eq!(names(&store.root().join("blobs/sha256")), blobs);
    assert_eq!(fs::metadata(layer_dir.join("bin/sh")).unwrap().ino(), inode);
}

#[test]
fn an_index_with_several_platforms_gives_the_hosts() {
    let dir = TempDir::new("platforms");
    let store = dir.store();
    let host = TestImage::new(host_arch(), &[layer(&[("arch", host_arch())])], true);
    let other = |n| TestImage::new(other_arch(n), &[layer(&[("arch", other_arch(n))])], true);
    let (first, second) = (other(0), other(1));
    let mut layout = Layout::default();
    // The other platforms' blobs are not in the layout at all: they must not be fetched.
    let first_desc = for_platform(
        first.manifest.descriptor(OCI_MANIFEST),
        "linux",
        other_arch(0),
    );
    let host_desc = for_platform(layout.add_image(&host), "linux", host_arch());
    let second_desc = for_platform(
        second.manifest.descriptor(OCI_MANIFEST),
        "linux",
        other_arch(1),
    );
    // index -> [other, index -> [host, other]]
    let nested = layout.add_index(vec![host_desc, second_desc.clone()]);
    let top = layout.add_index(vec![first_desc.clone(), nested]);
    layout.list(annotated(top, REF_NAME, "multi:1"));
    layout.write_dir(&dir.join("layout"));

    let records = import(&store, &dir.join("layout"), None).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].manifest_digest, host.manifest.digest);
    let dirs = store.resolve_layers(&records[0]).unwrap();
    assert_eq!(
        fs::read_to_string(dirs[0].join("arch")).unwrap(),
        host_arch()
    );

    // Without a manifest for this host, the error lists what there is.
    let mut layout = Layout::default();
    let only_others = layout.add_index(vec![first_desc, second_desc]);
    layout.list(annotated(only_others, REF_NAME, "foreign:1"));
    layout.write_dir(&dir.join("foreign"));
    let err = import(&store, &dir.join("foreign"), None).unwrap_err();
    let message = chain(&err);
    assert!(matches!(err, ImportError::Platform { .. }), "{message}");
    assert!(
        message.contains(&format!("linux/{}", host_arch()))
            && message.contains(&format!("linux/{}, linux/{}", other_arch(0), other_arch(1))),
        "{message}"
    );
}

#[test]
fn index_entries_without_platform_are_told_apart_by_their_configs() {
    // Several top-level entries with one name and no platform field, as some tools write a
    // multi-platform image into a layout.
    let dir = TempDir::new("platform-config");
    let store = dir.store();
    let foreign = TestImage::new(other_arch(0), &[layer(&[("arch", "foreign")])], false);
    let host = TestImage::new(host_arch(), &[layer(&[("arch", "host")])], false);
    let mut layout = Layout::default();
    for image in [&foreign, &host] {
        let desc = layout.add_image(image);
        layout.list(annotated(desc, REF_NAME, "both:1"));
    }
    let path = write_file(&dir, "image.tar", &layout.tar());
    let records = import(&store, &path, None).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].manifest_digest, host.manifest.digest);
    // The foreign image's blobs, stored by the archive pass, were dropped again.
    assert!(!store.has_blob(&foreign.layers[0].digest));
    assert!(!store.has_blob(&foreign.manifest.digest));
}

#[test]
fn images_the_source_does_not_name_need_a_tag() {
    let dir = TempDir::new("untagged");
    let store = dir.store();
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(desc.clone());
    layout.write_dir(&dir.join("bare"));
    let err = import(&store, &dir.join("bare"), None).unwrap_err();
    assert!(matches!(err, ImportError::NoName { .. }), "{err:?}");
    assert!(err.to_string().contains("--tag"), "{err}");
    assert_store_empty(&store);

    // A ref.name that is only a tag names no repository either.
    let mut layout = Layout::default();
    layout.add_image(&image);
    layout.list(annotated(desc, REF_NAME, "1.36"));
    layout.write_dir(&dir.join("tag-only"));
    let err = import(&store, &dir.join("tag-only"), None).unwrap_err();
    assert!(err.to_string().contains("tagged only \"1.36\""), "{err}");

    let records = import(&store, &dir.join("tag-only"), Some("mine/app:dev")).unwrap();
    assert_eq!(records[0].reference, reference("docker.io/mine/app:dev"));

    // The containerd name annotation wins over a bare ref.name.
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    let desc = annotated(desc, REF_NAME, "2.0");
    layout.list(annotated(
        desc,
        "io.containerd.image.name",
        "quay.io/x/y:2.0",
    ));
    layout.write_dir(&dir.join("containerd"));
    let records = import(&store, &dir.join("containerd"), None).unwrap();
    assert_eq!(records[0].reference, reference("quay.io/x/y:2.0"));

    // A docker-save image saved by id has no RepoTags.
    let path = write_file(&dir, "save.tar", &docker_save(&[(&image, &[])]));
    assert!(matches!(
        import(&store, &path, None),
        Err(ImportError::NoName { .. })
    ));
    let records = import(&store, &path, Some("saved:byid")).unwrap();
    assert_eq!(records[0].reference, reference("saved:byid"));

    assert!(matches!(
        import(&store, &path, Some("Bad:Tag!")),
        Err(ImportError::Tag { .. })
    ));
}

#[test]
fn a_digest_reference_must_name_the_manifest() {
    let dir = TempDir::new("digest-ref");
    let store = dir.store();
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(desc);
    layout.write_dir(&dir.join("layout"));
    let wrong = format!("app@{}", image.config.digest);
    assert!(matches!(
        import(&store, &dir.join("layout"), Some(&wrong)),
        Err(ImportError::Digest { .. })
    ));
    let right = format!("app@{}", image.manifest.digest);
    let records = import(&store, &dir.join("layout"), Some(&right)).unwrap();
    assert_eq!(store.image(&reference(&right)).unwrap(), records[0]);
}

#[test]
fn a_blob_that_does_not_match_its_digest_fails_the_import_and_leaves_nothing() {
    let image = app_image();
    let mut layout = Layout::default();
    let desc = layout.add_image(&image);
    layout.list(annotated(desc, REF_NAME, "app:1"));
    let forged = gzip(&layer(&[("srv/app", "trojan")]));
    layout.corrupt(&image.layers[1].digest, &forged);
    let (expected, actual) = (image.layers[1].digest, Digest::of(&forged));

    let dir = TempDir::new("mismatch");
    layout.write_dir(&dir.join("layout"));
    let tar_path = write_file(&dir, "image.tar", &layout.tar());
    for (n, path) in [dir.join("layout"), tar_path].into_iter().enumerate() {
        let store = Store::open(dir.join(&format!("store-{n}")), 0).unwrap();
        let err = import(&store, &path, None).unwrap_err();
        let message = chain(&err);
        assert!(
            message.contains(&expected.to_string()) && message.contains(&actual.to_string()),
            "{message}"
        );
        match &err {
            ImportError::Store { source, .. } => assert!(
                matches!(**source, StoreError::DigestMismatch { .. }),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(store.images().unwrap().is_empty());
        assert_store_empty(&store);
    }
}

#[test]
fn a_size_that_does_not_match_its_descriptor_is_rejected() {
    let dir = TempDir::new("size");
    let store = dir.store();
    let image = app_image();
    let mut layout = Layout::default();
    layout.add_image(&image);
    let mut desc = image.manifest.descriptor(OCI_MANIFEST);
    desc["size"] = json!(1);
    layout.list(annotated(desc, REF_NAME, "app:1"));
    layout.write_dir(&dir.join("layout"));
    let err = import(&store, &dir.join("layout"), None).unwrap_err();
    assert!(
        matches!(err, ImportError::Size { expected: 1, .. }),
        "{err:?}"
    );
    assert_store_empty(&store);
}

#[test]
fn a_hostile_layer_fails_the_import_with_the_unpackers_error() {
    let dir = TempDir::new("hostile");
    let store = dir.store();
    let evil = tar(&[
        E::symlink("escape", "/"),
        E::file("fine", b"ok"),
        E::file("../../etc/cove-pwned", b"x"),
    ]);
    let image = TestImage::new(host_arch(), &[base_layer(), evil], false);
    let path = write_file(&dir, "save.tar", &docker_save(&[(&image, &["evil:1"])]));
    let err = import(&store, &path, None).unwrap_err();
    let ImportError::Store { context, source } = &err else {
        panic!("{err:?}");
    };
    assert!(context.contains("layer 2 of evil:1"), "{context}");
    match &**source {
        StoreError::Unpack {
            digest,
            source: UnpackError::Escape { entry, .. },
        } => {
            assert_eq!(*digest, image.layers[1].digest);
            assert_eq!(entry, "../../etc/cove-pwned");
        }
        other => panic!("{other:?}"),
    }
    assert!(!Path::new("/etc/cove-pwned").exists());
    assert_store_empty(&store);
}

#[test]
fn a_docker_layer_must_match_its_diff_id() {
    let dir = TempDir::new("diff-id");
    let store = dir.store();
    let mut image = TestImage::new(host_arch(), &[layer(&[("a", "promised")])], false);
    image.layers[0] = Blob::new(layer(&[("a", "delivered")]));
    let path = write_file(&dir, "save.tar", &docker_save(&[(&image, &["swap:1"])]));
    let err = import(&store, &path, None).unwrap_err();
    assert!(matches!(err, ImportError::Digest { .. }), "{err:?}");
    assert!(err.to_string().contains("layer 1 of swap:1"), "{err}");
    assert_store_empty(&store);
}

#[test]
fn archive_entry_names_are_checked_not_followed() {
    let dir = TempDir::new("entry-names");
    let store = dir.store();
    let archive = tar(&[E::file("../outside", b"x"), E::file("manifest.json", b"[]")]);
    let path = write_file(&dir, "bad.tar", &archive);
    match import(&store, &path, None) {
        Err(ImportError::EntryName { entry, .. }) => assert_eq!(entry, "../outside"),
        other => panic!("{other:?}"),
    }
    assert!(!dir.path.parent().unwrap().join("outside").exists());
    assert_store_empty(&store);

    // A manifest.json naming a layer through a link that climbs out of the archive.
    let image = app_image();
    let mut entries = vec![
        E::file("config.json", &image.config.bytes),
        E::symlink("l/layer.tar", "../../../etc/passwd"),
    ];
    let manifest =
        json!([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["l/layer.tar"]}]);
    entries.push(E::file("manifest.json", manifest.to_string().as_bytes()));
    let path = write_file(&dir, "link.tar", &tar(&entries));
    assert!(matches!(
        import(&store, &path, None),
        Err(ImportError::EntryName { .. })
    ));
    assert_store_empty(&store);

    let path = write_file(&dir, "empty.tar", &tar(&[E::file("hello", b"x")]));
    assert!(matches!(
        import(&store, &path, None),
        Err(ImportError::NotAnImage { .. })
    ));
    fs::create_dir(dir.join("plain-dir")).unwrap();
    assert!(matches!(
        import(&store, &dir.join("plain-dir"), None),
        Err(ImportError::NotAnImage { .. })
    ));
}

#[test]
fn remove_and_prune_free_exactly_the_unreferenced() {
    let dir = TempDir::new("import-prune");
    let store = dir.store();
    let shared = base_layer();
    let busybox = TestImage::new(host_arch(), &[shared.clone(), layer(&[("a", "1")])], false);
    let app = TestImage::new(host_arch(), &[shared, layer(&[("b", "22")])], false);
    let archive = docker_save(&[(&busybox, &["busybox:1.36"]), (&app, &["app:v1"])]);
    let records = import(&store, &write_file(&dir, "save.tar", &archive), None).unwrap();
    let app_record = &records[1];
    let own_layer = app_record.layers[1];

    store.remove_image(&reference("app:v1")).unwrap();
    let manifest_len = fs::metadata(store.blob_path(&app_record.manifest_digest))
        .unwrap()
        .len();
    let report = store.prune().unwrap();
    assert_eq!(
        report,
        PruneReport {
            blobs_removed: 3, // manifest, config, own layer
            layers_removed: 1,
            temp_removed: 0,
            bytes_freed: manifest_len
                + app.config.bytes.len() as u64
                + app.layers[1].bytes.len() as u64
                + 2, // the unpacked layer's one file, "22"
            layers_in_use: 0,
        }
    );
    assert!(!store.has_blob(&own_layer) && !store.has_blob(&app_record.config_digest));
    assert!(!store.root().join("layers").join(own_layer.hex()).exists());
    // The other image still has everything, the shared layer included.
    let busybox_dirs = store.resolve_layers(&records[0]).unwrap();
    assert_eq!(
        fs::read(busybox_dirs[0].join("bin/sh")).unwrap(),
        b"#!shell"
    );
    for digest in [records[0].manifest_digest, records[0].config_digest]
        .iter()
        .chain(&records[0].layers)
    {
        store.verify_blob(digest).unwrap();
    }

    store.remove_image(&reference("busybox:1.36")).unwrap();
    let report = store.prune().unwrap();
    assert_eq!((report.blobs_removed, report.layers_removed), (4, 2));
    assert_store_empty(&store);
}
