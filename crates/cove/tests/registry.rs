//! `cove image pull` against a real registry (Debian's `docker-registry` on loopback), with
//! images the tests build from Debian's static busybox and push with skopeo. Each test has its
//! own registry and its own image store.

mod common;
mod registry_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{Out, Run, require_root};
use registry_support::{
    Comp, LayerSpec, Registry, Scratch, Setup, Throttle, build_layout, hex_digest, random_bytes,
};

/// An image store of its own, and `cove` commands that use it.
struct Store {
    dir: Scratch,
}

impl Store {
    fn new() -> Store {
        Store {
            dir: Scratch::new("store"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(common::cove_bin());
        c.args(args)
            .env("COVE_IMAGE_STORE", &self.dir.0)
            .env("DOCKER_CONFIG", self.dir.join("no-docker-config"))
            .env_remove("COVE_REGISTRY_CREDS");
        c
    }

    fn cove(&self, args: &[&str]) -> Out {
        Out::from(self.command(args).output().unwrap())
    }

    fn pull(&self, reference: &str) -> Out {
        self.cove(&["image", "pull", reference])
    }

    /// `cove run --pull never --image REF -- CMD…` with the usual leak checks.
    fn run(&self, args: &[&str]) -> Out {
        let mut run = Run::new(args);
        run.env
            .push(("COVE_IMAGE_STORE".into(), self.dir.0.display().to_string()));
        run.env.push((
            "DOCKER_CONFIG".into(),
            self.dir.join("no-docker-config").display().to_string(),
        ));
        run.output()
    }

    fn blobs(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    fn names(&self, dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Files being written or left by interrupted writes.
    fn temp_files(&self) -> Vec<String> {
        let mut all = self.names(&self.blobs());
        all.extend(self.names(&self.dir.join("layers")));
        all.into_iter().filter(|n| n.starts_with(".tmp-")).collect()
    }
}

fn busybox_layer(extra: &[(&str, &str)]) -> LayerSpec {
    LayerSpec {
        busybox: true,
        files: extra
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect(),
        ..Default::default()
    }
}

/// A three-layer image (gzip, zstd, plain tar) with a whiteout, a symlink, Cmd and Env,
/// pushed as `name`. Returns the layer digests.
fn push_app(registry: &Registry, name: &str) -> Vec<String> {
    let layout = Scratch::new("layout");
    let layers = [
        busybox_layer(&[("etc/motd", "base\n"), ("etc/removed", "x")]),
        LayerSpec {
            files: vec![
                ("etc/motd".into(), b"top\n".to_vec()),
                ("app/data".into(), b"data\n".to_vec()),
            ],
            whiteouts: vec!["etc/removed".into()],
            comp: Some(Comp::Zstd),
            ..Default::default()
        },
        LayerSpec {
            symlinks: vec![("app/link".into(), "data".into())],
            comp: Some(Comp::None),
            ..Default::default()
        },
    ];
    let digests = build_layout(
        &layout.0,
        &layers,
        &[
            "/bin/sh",
            "-c",
            "cat /etc/motd; test -e /etc/removed || echo gone; cat /app/link; echo $GREETING",
        ],
        &["GREETING=hi", "PATH=/bin"],
        &[],
    );
    registry.push(&layout.0, name, false);
    digests
}

const APP_OUTPUT: &str = "top\ngone\ndata\nhi\n";

#[test]
fn pull_run_pull_again_and_pull_by_digest() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layers = push_app(&registry, "test/app:v1");
    push_app(&registry, "test/other:v1");
    let store = Store::new();
    let reference = format!("{}/test/app:v1", registry.host());

    let out = store.pull(&reference);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with(&format!("pulled {reference} (sha256:")),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains(", 3 layers, "), "{}", out.stderr);
    for (i, hex) in layers.iter().enumerate() {
        let line = format!("layer {}/3 {}: unpacked", i + 1, &hex[..12]);
        assert!(out.stderr.contains(&line), "no {line:?} in {}", out.stderr);
    }
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);

    // Again: nothing is downloaded.
    let out = store.pull(&reference);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stderr.matches("already present").count(),
        3,
        "{}",
        out.stderr
    );
    for hex in &layers {
        assert_eq!(
            registry.blob_gets(hex),
            1,
            "layer {hex} fetched more than once"
        );
    }

    // By digest: the same image, under its digest.
    let inspect = store.cove(&["image", "inspect", &reference]);
    let record: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let digest = record["manifest_digest"].as_str().unwrap();
    let by_digest = format!("{}/test/app@{digest}", registry.host());
    let out = store.pull(&by_digest);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = store.run(&["--pull", "never", "--image", &by_digest]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);
    // A digest the registry does not have.
    let wrong = format!("{}/test/app@sha256:{}", registry.host(), "0".repeat(64));
    let out = store.pull(&wrong);
    assert_eq!(out.code, 125);
    assert!(
        out.stderr.contains("manifest not found in") && out.stderr.contains("MANIFEST_UNKNOWN"),
        "{}",
        out.stderr
    );

    // `cove run` pulls an image it does not have yet, and shares the layers it has.
    let other = format!("{}/test/other:v1", registry.host());
    let out = store.run(&["--image", &other]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);
    assert!(
        out.stderr.contains("test/other:v1: manifest"),
        "{}",
        out.stderr
    );
    let ls = store.cove(&["image", "ls"]);
    assert!(ls.stdout.contains("test/other:v1"), "{}", ls.stdout);
    assert_eq!(store.temp_files(), Vec::<String>::new());
}

#[test]
fn a_terminal_gets_a_progress_bar_per_layer() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layers = push_app(&registry, "test/app:v1");
    let store = Store::new();
    let reference = format!("{}/test/app:v1", registry.host());
    // `script` runs the pull on a pseudo-terminal and copies what it draws to stdout.
    let line = format!("{} image pull {reference}", common::cove_bin().display());
    let out = Out::from(
        Command::new("script")
            .args(["-qefc", &line, "/dev/null"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("TERM", "xterm")
            .env("COVE_IMAGE_STORE", &store.dir.0)
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{}", out.stdout);
    for hex in &layers {
        assert!(
            out.stdout.contains(&hex[..12]),
            "no bar for {hex}: {}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("done"), "{}", out.stdout);
    assert!(
        !out.stdout.contains("layer 1/3"),
        "plain lines on a terminal: {}",
        out.stdout
    );
}

#[test]
fn an_index_resolves_to_this_platform_or_says_what_it_has() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layout = Scratch::new("layout");
    build_layout(
        &layout.0,
        &[busybox_layer(&[])],
        &["/bin/echo", "multi"],
        &[],
        &["linux/arm64", "linux/amd64"],
    );
    registry.push(&layout.0, "test/multi:v1", true);
    let arm = Scratch::new("layout");
    build_layout(
        &arm.0,
        &[busybox_layer(&[])],
        &["/bin/echo"],
        &[],
        &["linux/arm64", "linux/s390x"],
    );
    registry.push(&arm.0, "test/arm:v1", true);

    let store = Store::new();
    let out = store.pull(&format!("{}/test/multi:v1", registry.host()));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = store.run(&[
        "--pull",
        "never",
        "--image",
        &format!("{}/test/multi:v1", registry.host()),
    ]);
    assert_eq!(out.stdout, "multi\n", "{}", out.stderr);

    let out = store.pull(&format!("{}/test/arm:v1", registry.host()));
    assert_eq!(out.code, 125);
    assert!(
        out.stderr
            .contains("has no image for linux/amd64; found: linux/arm64, linux/s390x"),
        "{}",
        out.stderr
    );
    let ls = store.cove(&["image", "ls"]);
    assert!(!ls.stdout.contains("test/arm"), "{}", ls.stdout);
}

#[test]
fn a_blob_the_registry_corrupted_is_refused_and_nothing_is_kept() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layers = push_app(&registry, "test/app:v1");
    // Flip one byte of the middle layer where the registry stores it.
    let file = registry.blob_file(&layers[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let store = Store::new();
    let out = store.pull(&format!("{}/test/app:v1", registry.host()));
    assert_eq!(out.code, 125, "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!(
            "layer 2 (sha256:{}) has digest sha256:",
            layers[1]
        )),
        "{}",
        out.stderr
    );
    assert!(
        !store.blobs().join(&layers[1]).exists(),
        "the corrupt blob was kept"
    );
    assert!(
        !store
            .blobs()
            .join(format!(".tmp-pull-{}", layers[1]))
            .exists(),
        "the corrupt download was kept"
    );
    // Other layers' downloads, cut short by the failure, are kept only if there is something
    // to resume.
    for name in store.temp_files() {
        assert!(name.starts_with(".tmp-pull-"), "{name}");
        let len = std::fs::metadata(store.blobs().join(&name)).unwrap().len();
        assert!(len > 0, "{name} is empty");
    }
    let ls = store.cove(&["image", "ls", "--json"]);
    assert_eq!(ls.stdout, "");
    // What the failed pull did keep (verified blobs, for the next attempt) prune removes.
    let out = store.cove(&["image", "prune"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(store.names(&store.blobs()), Vec::<String>::new());
    assert_eq!(store.names(&store.dir.join("layers")), Vec::<String>::new());
    assert_eq!(store.names(&store.dir.join("images")), Vec::<String>::new());
}

#[test]
fn a_blob_damaged_in_the_store_is_fetched_again() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layers = push_app(&registry, "test/app:v1");
    let store = Store::new();
    let reference = format!("{}/test/app:v1", registry.host());
    assert_eq!(store.pull(&reference).code, 0);

    // Same size, other content; and its unpacked directory gone, so it must be used again.
    let blob = store.blobs().join(&layers[0]);
    let len = std::fs::metadata(&blob).unwrap().len() as usize;
    std::fs::write(&blob, vec![0u8; len]).unwrap();
    std::fs::remove_dir_all(store.dir.join("layers").join(&layers[0])).unwrap();
    // A truncated config, too.
    let inspect = store.cove(&["image", "inspect", &reference]);
    let record: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    let config = record["config_digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    std::fs::write(store.blobs().join(config), b"{").unwrap();

    let out = store.pull(&reference);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        registry.blob_gets(&layers[0]),
        2,
        "the damaged layer was not fetched again"
    );
    assert_eq!(hex_digest(&std::fs::read(&blob).unwrap()), layers[0]);
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);
}

/// A big layer of random bytes (so compression cannot shrink it) over busybox.
fn push_big(registry: &Registry, name: &str, size: usize) -> (String, String) {
    let layout = Scratch::new("layout");
    let data = random_bytes(size);
    let sum = hex_digest(&data);
    let layers = build_layout(
        &layout.0,
        &[
            busybox_layer(&[]),
            LayerSpec {
                files: vec![("big".into(), data)],
                comp: Some(Comp::None),
                ..Default::default()
            },
        ],
        &["/bin/sha256sum", "/big"],
        &[],
        &[],
    );
    registry.push(&layout.0, name, false);
    (layers[1].clone(), sum)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_pull_resumes_where_it_stopped() {
    require_root();
    const SIZE: usize = 24 << 20;
    let registry = Registry::start(Setup::default());
    let (big, sum) = push_big(&registry, "test/big:v1", SIZE);
    let slow = Throttle::start(registry.port, 4 << 20);
    let store = Store::new();
    let partial = store.blobs().join(format!(".tmp-pull-{big}"));

    let mut child = store
        .command(&["image", "pull", &format!("{}/test/big:v1", slow.host())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("2 MiB of the big layer", Duration::from_secs(60), || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() >= 2 << 20)
    });
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0 && kept < SIZE as u64, "{kept}");

    // Straight from the registry this time; the partial file is found by the blob's digest.
    let reference = format!("{}/test/big:v1", registry.host());
    let out = store.pull(&reference);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stderr.contains("(resumed at "), "{}", out.stderr);
    assert!(!partial.exists());
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, format!("{sum}  /big\n"), "{}", out.stderr);
    // What the killed process was in the middle of writing (an unpack, say) prune removes.
    assert_eq!(store.cove(&["image", "prune"]).code, 0);
    assert_eq!(store.temp_files(), Vec::<String>::new());
}

#[test]
fn two_pulls_at_once_download_each_blob_once() {
    require_root();
    const SIZE: usize = 8 << 20;
    let registry = Registry::start(Setup::default());
    let (_, sum) = push_big(&registry, "test/big:v1", SIZE);
    let slow = Throttle::start(registry.port, 8 << 20);
    let store = Store::new();
    let reference = format!("{}/test/big:v1", slow.host());

    let children: Vec<_> = (0..2)
        .map(|_| {
            store
                .command(&["image", "pull", &reference])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Out> = children
        .into_iter()
        .map(|c| Out::from(c.wait_with_output().unwrap()))
        .collect();
    for out in &outs {
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    let sent = slow.bytes.load(Ordering::Relaxed);
    assert!(
        sent < (SIZE as u64) * 3 / 2,
        "{sent} bytes went through for one {SIZE}-byte layer:\n{}\n{}",
        outs[0].stderr,
        outs[1].stderr
    );
    assert!(
        outs.iter()
            .any(|o| o.stderr.contains("waiting for another pull")),
        "{}\n{}",
        outs[0].stderr,
        outs[1].stderr
    );
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, format!("{sum}  /big\n"), "{}", out.stderr);
}

fn check_auth(registry: &Registry) {
    push_app(registry, "test/private:v1");
    let reference = format!("{}/test/private:v1", registry.host());
    let store = Store::new();

    let out = store.pull(&reference);
    assert_eq!(out.code, 125);
    assert!(
        out.stderr.contains("refused access to test/private") && out.stderr.contains("--creds"),
        "{}",
        out.stderr
    );
    let out = store.cove(&["image", "pull", "--creds", "tester:wrong", &reference]);
    assert_eq!(out.code, 125);
    assert!(
        out.stderr.contains("check the credentials"),
        "{}",
        out.stderr
    );

    let creds = registry.creds.as_deref().unwrap();
    let out = store.cove(&["image", "pull", "--creds", creds, &reference]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);

    // From the environment, and from what `docker login` stores.
    let out = Out::from(
        store
            .command(&["image", "pull", &reference])
            .env("COVE_REGISTRY_CREDS", creds)
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let docker = Scratch::new("docker-config");
    let auth = base64_encode(creds);
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let out = Out::from(
        store
            .command(&["image", "pull", &reference])
            .env("DOCKER_CONFIG", &docker.0)
            .output()
            .unwrap(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn basic_auth() {
    require_root();
    check_auth(&Registry::start(Setup {
        basic: Some(("tester", "s3cret")),
        ..Default::default()
    }));
}

#[test]
fn token_auth() {
    require_root();
    check_auth(&Registry::start(Setup {
        token: Some(("tester", "s3cret")),
        ..Default::default()
    }));
}

#[test]
fn tls_with_a_custom_ca() {
    require_root();
    let registry = Registry::start(Setup {
        tls: true,
        ..Default::default()
    });
    push_app(&registry, "test/app:v1");
    // `localhost`, not 127.0.0.1: the certificate names both, and this is the usual spelling.
    let reference = format!("localhost:{}/test/app:v1", registry.port);
    let store = Store::new();

    let out = store.pull(&reference);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("certificate"), "{}", out.stderr);
    let ca = registry.ca.as_ref().unwrap().display().to_string();
    let out = store.cove(&["image", "pull", "--ca", &ca, &reference]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = store.run(&["--pull", "never", "--image", &reference]);
    assert_eq!(out.stdout, APP_OUTPUT, "{}", out.stderr);

    let out = store.cove(&["image", "pull", "--ca", "/nonexistent/ca.pem", &reference]);
    assert_eq!(out.code, 125);
    assert!(
        out.stderr
            .contains("cannot use CA file /nonexistent/ca.pem"),
        "{}",
        out.stderr
    );
    let out = store.cove(&["image", "pull", "--ca", "/etc/hostname", &reference]);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("no PEM certificate"), "{}", out.stderr);
}

#[test]
fn prune_keeps_the_layers_of_a_running_sandbox() {
    require_root();
    let registry = Registry::start(Setup::default());
    let layers = push_app(&registry, "test/app:v1");
    let store = Store::new();
    let reference = format!("{}/test/app:v1", registry.host());
    assert_eq!(store.pull(&reference).code, 0);

    let mut run = Run::new(&[
        "--pull",
        "never",
        "--image",
        &reference,
        "--",
        "/bin/sh",
        "-c",
        "echo ready; read x; cat /etc/motd /app/link",
    ]);
    run.env
        .push(("COVE_IMAGE_STORE".into(), store.dir.0.display().to_string()));
    let mut child = run
        .command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");

    assert_eq!(store.cove(&["image", "rm", &reference]).code, 0);
    let out = store.cove(&["image", "prune"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("kept 3 unpacked layers"),
        "{}",
        out.stdout
    );
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(rest, "top\ndata\n");
    common::assert_no_leaks(&run.id);

    let out = store.cove(&["image", "prune"]);
    assert!(out.stdout.contains("3 unpacked layers"), "{}", out.stdout);
    for hex in &layers {
        assert!(!store.dir.join("layers").join(hex).exists());
    }
}

#[test]
fn bad_references_and_unreachable_registries_are_clear_errors() {
    require_root();
    let store = Store::new();
    let out = store.pull("Not A Reference");
    assert_eq!(out.code, 125);
    assert!(
        out.stderr.contains("invalid image reference"),
        "{}",
        out.stderr
    );

    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = store.cove(&[
        "image",
        "pull",
        "--insecure",
        &format!("127.0.0.1:{port}/x:v1"),
    ]);
    assert_eq!(out.code, 125);
    assert!(
        out.stderr
            .contains(&format!("cannot fetch manifest from 127.0.0.1:{port}"))
            && out.stderr.contains("Connection refused"),
        "{}",
        out.stderr
    );

    let registry = Registry::start(Setup::default());
    let out = store.pull(&format!("{}/test/none:v1", registry.host()));
    assert_eq!(out.code, 125);
    assert!(
        out.stderr.contains("manifest not found in"),
        "{}",
        out.stderr
    );
    let out = store.cove(&["image", "pull", "--creds", "nocolon", "x"]);
    assert_eq!(out.code, 125);
    assert!(out.stderr.contains("USER:PASSWORD"), "{}", out.stderr);
    assert_eq!(store.temp_files(), Vec::<String>::new());
}
