//! The real pieces the registry tests pull from: Debian's `docker-registry` (the CNCF
//! distribution registry) started on loopback, images built here from Debian's static busybox and
//! pushed with `skopeo`, a throttling TCP relay (to interrupt a pull half-way or make two pulls
//! overlap), and a token service that signs JWTs the registry verifies. Nothing is downloaded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cove-{what}-{}", crate::common::new_id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How the registry is set up.
#[derive(Default)]
pub struct Setup {
    /// Serve HTTPS with a certificate for 127.0.0.1 from a fresh CA.
    pub tls: bool,
    /// Require HTTP basic auth with this user and password (htpasswd, bcrypt).
    pub basic: Option<(&'static str, &'static str)>,
    /// Require bearer tokens from a token service that knows this user and password.
    pub token: Option<(&'static str, &'static str)>,
}

/// A running `docker-registry`, killed and removed on drop.
pub struct Registry {
    pub port: u16,
    pub dir: Scratch,
    child: Child,
    /// The CA certificate (PEM) when serving TLS.
    pub ca: Option<PathBuf>,
    /// Credentials that work, when auth is on.
    pub creds: Option<String>,
    _token: Option<TokenService>,
}

impl Registry {
    pub fn start(setup: Setup) -> Registry {
        let dir = Scratch::new("registry");
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        );
        let mut ca = None;
        if setup.tls {
            let (ca_pem, cert, key) = tls_files(&dir);
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            );
            ca = Some(ca_pem);
        }
        let mut creds = None;
        if let Some((user, pass)) = setup.basic {
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let file = dir.join("htpasswd");
            std::fs::write(&file, line.trim()).unwrap();
            config += &format!(
                "auth:\n  htpasswd:\n    realm: cove-test\n    path: {}\n",
                file.display()
            );
            creds = Some(format!("{user}:{pass}"));
        }
        let token = setup.token.map(|(user, pass)| {
            let service = TokenService::start(&dir, user, pass);
            config += &format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: cove-test\n    \
                 issuer: cove-test-issuer\n    rootcertbundle: {}\n",
                service.port,
                service.cert.display()
            );
            creds = Some(format!("{user}:{pass}"));
            service
        });
        let config_path = dir.join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("log.err")).unwrap())
            .spawn()
            .expect("docker-registry is needed (scripts/deps.sh test installs it)");
        wait_for_port(port, "docker-registry", &dir.join("log.err"));
        Registry {
            port,
            dir,
            child,
            ca,
            creds,
            _token: token,
        }
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Pushes the image tagged `v1` in the OCI layout `layout` as `name` (`repo:tag`), with
    /// skopeo; `all` pushes every platform of an index.
    pub fn push(&self, layout: &Path, name: &str, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "--insecure-policy",
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ]);
        if all {
            cmd.arg("--all");
        }
        if let Some(c) = &self.creds {
            cmd.args(["--dest-creds", c]);
        }
        cmd.arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}/{name}", self.host()));
        run(&mut cmd);
    }

    /// Where the registry keeps the blob `hex` on disk.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.dir.join(&format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }

    /// How many successful GETs of the blob `hex` the registry served (from its access log).
    pub fn blob_gets(&self, hex: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.join("log.err")).unwrap_or_default()
            + &std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let blob = format!("blobs/sha256:{hex}");
        log.lines()
            .filter(|l| l.contains("GET /v2/") && l.contains(&blob))
            .filter(|l| l.contains("\" 200 ") || l.contains("\" 206 "))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem).
fn tls_files(dir: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca, key, csr, cert, ext) = (
        dir.join("ca.key"),
        dir.join("ca.pem"),
        dir.join("key.pem"),
        dir.join("cert.csr"),
        dir.join("cert.pem"),
        dir.join("ext.cnf"),
    );
    let p = |p: &PathBuf| p.display().to_string();
    self_signed("/CN=cove test CA", &ca_key, &ca);
    run(Command::new("openssl").args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p(&key),
        "-out",
        &p(&csr),
    ]));
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&ca),
        "-CAkey",
        &p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p(&ext),
        "-out",
        &p(&cert),
    ]));
    (ca, cert, key)
}

/// A fresh RSA key and a self-signed certificate for `subject`, valid for two days.
fn self_signed(subject: &str, key: &Path, cert: &Path) {
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(subject)
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert));
}

/// A token service for the registry's `token` auth: checks basic credentials and answers a JWT
/// (RS256, signed with openssl, its certificate in the `x5c` header) granting what was asked.
struct TokenService {
    port: u16,
    cert: PathBuf,
    stop: Arc<AtomicBool>,
}

impl TokenService {
    fn start(dir: &Scratch, user: &str, pass: &str) -> TokenService {
        let key = dir.join("token.key");
        let cert = dir.join("token.pem");
        self_signed("/CN=cove test token signer", &key, &cert);
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let x5c = base64::engine::general_purpose::STANDARD.encode(&der);
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        answer_token(stream, &expected, &x5c, &key);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        TokenService { port, cert, stop }
    }
}

impl Drop for TokenService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer_token(stream: TcpStream, expected_auth: &str, x5c: &str, key: &Path) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorized = value.trim() == expected_auth;
        }
    }
    let query = request_line
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.split_once('?'))
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    let mut access = Vec::new();
    for pair in query.split('&') {
        if let Some(scope) = pair.strip_prefix("scope=") {
            let scope = percent_decode(scope);
            let parts: Vec<&str> = scope.split(':').collect();
            if parts.len() == 3 {
                access.push(serde_json::json!({
                    "type": parts[0], "name": parts[1],
                    "actions": parts[2].split(',').collect::<Vec<_>>(),
                }));
            }
        }
    }
    let mut stream = stream;
    if !authorized {
        let body = r#"{"details":"bad credentials"}"#;
        let _ = write!(
            stream,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": "cove-test-issuer", "sub": "tester", "aud": "cove-test",
        "exp": now + 600, "nbf": now - 10, "iat": now, "jti": crate::common::new_id(),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut sign = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sign.stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let mut signature = Vec::new();
    sign.stdout
        .take()
        .unwrap()
        .read_to_end(&mut signature)
        .unwrap();
    sign.wait().unwrap();
    let token = format!("{signing_input}.{}", b64(&signature));
    let body = serde_json::json!({"token": token, "expires_in": 600}).to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.shutdown(Shutdown::Write);
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A TCP relay to the registry that sends responses at most `rate` bytes per second and counts
/// them, so a test can interrupt a pull half-way or make two pulls overlap.
pub struct Throttle {
    pub port: u16,
    /// Bytes sent from the registry to clients so far.
    pub bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Throttle {
    pub fn start(upstream: u16, rate: u64) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (bytes2, stop2) = (bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                let (bytes, stop) = (bytes2.clone(), stop2.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    let per_chunk = Duration::from_secs_f64(buf.len() as f64 / rate as f64);
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        std::thread::sleep(per_chunk.mul_f64(n as f64 / buf.len() as f64));
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                    let _ = s_read.shutdown(Shutdown::Both);
                });
            }
        });
        Throttle { port, bytes, stop }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

/// One layer: files (path, content), symlinks (path, target), whiteouts (paths deleted from
/// the layers below).
#[derive(Default, Clone)]
pub struct LayerSpec {
    pub files: Vec<(String, Vec<u8>)>,
    pub symlinks: Vec<(String, String)>,
    pub whiteouts: Vec<String>,
    pub busybox: bool,
    pub comp: Option<Comp>,
}

/// Applets linked to busybox in a busybox layer.
pub const APPLETS: &[&str] = &[
    "sh",
    "cat",
    "echo",
    "ls",
    "sleep",
    "sha256sum",
    "head",
    "test",
    "wc",
    "id",
];

/// Builds an OCI layout in `dir` holding one image tagged `v1` (or, with `platforms`, an index
/// of one image per `os/arch`, all sharing the layers); returns the layer digests (hex).
pub fn build_layout(
    dir: &Path,
    layers: &[LayerSpec],
    cmd: &[&str],
    env: &[&str],
    platforms: &[&str],
) -> Vec<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, u64) {
        let hex = hex_digest(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        (hex, bytes.len() as u64)
    };
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut hexes = Vec::new();
    for (i, spec) in layers.iter().enumerate() {
        let stage = dir.join(format!("stage-{i}"));
        std::fs::create_dir_all(&stage).unwrap();
        if spec.busybox {
            std::fs::create_dir_all(stage.join("bin")).unwrap();
            let busybox = ["/bin/busybox", "/usr/bin/busybox"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .expect("busybox-static is needed (scripts/deps.sh test installs it)");
            std::fs::copy(busybox, stage.join("bin/busybox")).unwrap();
            for a in APPLETS {
                std::os::unix::fs::symlink("busybox", stage.join("bin").join(a)).unwrap();
            }
        }
        for (path, content) in &spec.files {
            let p = stage.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        for (path, target) in &spec.symlinks {
            let p = stage.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(target, p).unwrap();
        }
        for path in &spec.whiteouts {
            let p = Path::new(path);
            let wh = stage
                .join(p.parent().unwrap_or(Path::new("")))
                .join(format!(".wh.{}", p.file_name().unwrap().to_str().unwrap()));
            std::fs::create_dir_all(wh.parent().unwrap()).unwrap();
            std::fs::write(wh, b"").unwrap();
        }
        let tar = Command::new("tar")
            .args([
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "--sort=name",
                "-C",
            ])
            .arg(&stage)
            .args(["-cf", "-", "."])
            .output()
            .unwrap();
        assert!(tar.status.success());
        std::fs::remove_dir_all(&stage).unwrap();
        let tar = tar.stdout;
        diff_ids.push(format!("sha256:{}", hex_digest(&tar)));
        let (blob, media_type) = match spec.comp.unwrap_or(Comp::Gzip) {
            Comp::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Comp::Gzip => (
                filter("gzip", &["-n", "-1"], &tar),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            Comp::Zstd => (
                filter("zstd", &["-q", "-1"], &tar),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let (hex, size) = put(&blob);
        hexes.push(hex.clone());
        layer_descs.push(serde_json::json!({
            "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size
        }));
    }
    let platforms: Vec<&str> = if platforms.is_empty() {
        vec!["linux/amd64"]
    } else {
        platforms.to_vec()
    };
    let mut manifests = Vec::new();
    for platform in &platforms {
        let (os, arch) = platform.split_once('/').unwrap();
        let config = serde_json::json!({
            "architecture": arch, "os": os,
            "config": {"Cmd": cmd, "Env": env},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        });
        let (cfg_hex, cfg_size) = put(config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": format!("sha256:{cfg_hex}"), "size": cfg_size},
            "layers": layer_descs,
        });
        let (m_hex, m_size) = put(manifest.to_string().as_bytes());
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{m_hex}"), "size": m_size,
            "platform": {"os": os, "architecture": arch},
        }));
    }
    let top = if manifests.len() == 1 && platforms == ["linux/amd64"] {
        let mut m = manifests.pop().unwrap();
        m.as_object_mut().unwrap().remove("platform");
        m
    } else {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let (i_hex, i_size) = put(index.to_string().as_bytes());
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{i_hex}"), "size": i_size,
        })
    };
    let mut top = top;
    top.as_object_mut().unwrap().insert(
        "annotations".into(),
        serde_json::json!({"org.opencontainers.image.ref.name": "v1"}),
    );
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    hexes
}

fn filter(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// sha256 of `bytes` in hex, with sha256sum.
pub fn hex_digest(bytes: &[u8]) -> String {
    filter("sha256sum", &[], bytes)[..64]
        .iter()
        .map(|&b| b as char)
        .collect()
}

/// `n` bytes that do not compress (for layers whose size matters).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut out = vec![0u8; n];
    f.read_exact(&mut out).unwrap();
    out
}
