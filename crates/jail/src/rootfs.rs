//! The sandbox's filesystem, built inside its fresh mount namespace (and user namespace), then
//! entered with `pivot_root` and the host's tree detached.
//!
//! Layout: a size-capped tmpfs is the sandbox's only writable storage (`--disk`). For the `host`
//! image its `root` directory is the root, holding `/etc` (generated, plus a short allow-list of
//! host files that toolchains need, read-only), `/tmp`, `/home`, `/root`, with the host's `/usr`,
//! `/bin`, `/sbin`, `/lib*` bound read-only. For a directory image, the tmpfs carries an overlayfs
//! upper layer over the read-only image. Beside the root, the same tmpfs holds `/dev/shm` and the
//! empty directory that masks `/proc` directories. `/proc` is a new procfs for the sandbox's pid
//! namespace with the leaky files masked; `/dev` is a read-only bind of a template of the safe
//! host devices (or a small tmpfs with them bound in).
//!
//! Rejected: binding the whole host `/etc` (leaks host configuration the sandbox was never
//! given) and creating device nodes with `mknod` (impossible in a user namespace; binds of the
//! host nodes are what bubblewrap does too).

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cove_types::BindMount;

use crate::sys;

/// A failed filesystem step, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct RootfsError {
    op: &'static str,
    path: String,
    #[source]
    source: io::Error,
}

fn err(op: &'static str, path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.as_ref().display().to_string();
    move |source| RootfsError { op, path, source }
}

/// The root filesystem, resolved by the supervisor.
#[derive(Debug, Clone)]
pub(crate) enum RootImage {
    /// The host's `/usr`, `/bin`, `/sbin`, `/lib*`, read-only.
    Host,
    /// Read-only layer directories, bottom first (a directory image is one layer), stacked
    /// with overlayfs under the sandbox's writable layer.
    Layers(Vec<PathBuf>),
}

/// What the child needs to build the root; resolved by the supervisor before the clone.
#[derive(Debug, Clone)]
pub(crate) struct RootPlan {
    /// Host directory to mount the sandbox root on (in the child's mount namespace only).
    pub staging: PathBuf,
    pub image: RootImage,
    pub disk_bytes: u64,
    pub binds: Vec<BindMount>,
    pub hostname: String,
    /// A host directory holding the sandbox's `/dev` (see [`dev_template`]); `None` builds
    /// `/dev` from binds on a tmpfs.
    pub dev_template: Option<PathBuf>,
    /// Inner uid/gid of the command, for `/etc/passwd` and its home directory.
    pub uid: u32,
    pub gid: u32,
    /// `/etc/resolv.conf`, when the sandbox has a resolver (egress); otherwise the `host`
    /// image's is empty and an image keeps its own.
    pub resolv_conf: Option<String>,
}

/// Host directories the `host` image exposes read-only (those that exist).
const HOST_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host `/etc` entries toolchains need: the dynamic linker cache (without it every program
/// start searches the library path), Debian alternatives (`/usr/bin/awk` and friends point
/// through `/etc/alternatives`), TLS roots, the time zone, and the protocol and service tables.
const HOST_ETC: &[&str] = &[
    "alternatives",
    "ca-certificates",
    "ld.so.cache",
    "localtime",
    "os-release",
    "protocols",
    "services",
    "ssl",
];

/// `/proc` files that leak host information or offer host-wide knobs, and that the sandbox
/// could otherwise open: hidden behind `/dev/null` (files) or a read-only bind of an empty
/// directory (directories, [`PROC_MASKED_DIRS`]). Files the kernel makes readable by global
/// root only (`kpagecount`, `kpageflags`, `kpagecgroup`, `vmallocinfo`, `slabinfo`, mode 0400)
/// need no mask: root inside is an unprivileged uid outside. `kcore` and `sysrq-trigger` are
/// masked all the same, as the first files anyone checks.
const PROC_MASKED: &[&str] = &[
    "kcore",
    "kallsyms",
    "keys",
    "key-users",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "sysrq-trigger",
    "config.gz",
    "acpi",
    "asound",
    "scsi",
    "driver",
    "dynamic_debug",
];

/// The entries of [`PROC_MASKED`] that are directories (hidden by an empty directory).
const PROC_MASKED_DIRS: &[&str] = &["acpi", "asound", "scsi", "driver", "dynamic_debug"];

/// `/proc` subtrees made read-only. Only `sys` holds files a process may write to
/// (`/proc/bus`, `/proc/fs` and `/proc/irq` writable entries are global root's only).
const PROC_READONLY: &[&str] = &["sys"];

/// The device nodes of a sandbox's `/dev`: name, major, minor (all mode 0666).
const DEVICE_NODES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symbolic links of a sandbox's `/dev`.
const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// The `/dev` template under `dir` (`dir/dev`), built on first use by host root: the device
/// nodes of [`DEVICE_NODES`], the links of [`DEV_LINKS`], and empty `pts` and `shm` for the
/// sandbox's own mounts. A sandbox then gets its `/dev` as one read-only bind of it, instead of
/// a tmpfs with six binds and five links (about 0.2 ms of every start). `None` when `dir` sits
/// on a `nodev` filesystem (the nodes could not be opened) or cannot be written; the caller
/// then builds `/dev` the long way.
pub(crate) fn dev_template(dir: &Path) -> Option<PathBuf> {
    let t = dir.join("dev");
    if fs::symlink_metadata(t.join("urandom")).is_ok() {
        return Some(t);
    }
    build_dev_template(dir, &t).ok()
}

fn build_dev_template(dir: &Path, t: &Path) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    if sys::is_nodev(s(dir))? {
        return Err(io::Error::other("nodev"));
    }
    // Built aside and renamed into place, so that a concurrent start sees all or nothing.
    let tmp = dir.join(format!("dev.new-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::DirBuilder::new().mode(0o755).create(&tmp)?;
    let built = (|| {
        for (name, major, minor) in DEVICE_NODES {
            let p = tmp.join(name);
            sys::mknod_char(s(&p), 0o666, *major, *minor)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o666))?;
        }
        fs::DirBuilder::new().mode(0o755).create(tmp.join("pts"))?;
        fs::DirBuilder::new().mode(0o755).create(tmp.join("shm"))?;
        for (name, target) in DEV_LINKS {
            symlink(target, tmp.join(name))?;
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        match fs::rename(&tmp, t) {
            // Another start finished first: use its template.
            Err(_) if t.join("urandom").exists() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            r => r,
        }
    })();
    if built.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    built.map(|()| t.to_path_buf())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

fn bind(src: &Path, dst: &Path, readonly: bool, recursive: bool) -> Result<(), RootfsError> {
    let rec = if recursive { libc::MS_REC } else { 0 };
    sys::mount(Some(s(src)), s(dst), None, libc::MS_BIND | rec, None).map_err(err("bind", dst))?;
    if readonly {
        make_readonly(dst)?;
    }
    Ok(())
}

/// Mounts a tmpfs (source name `cove`, so that it is recognisable in mountinfo) on `dst`.
fn tmpfs(dst: &Path, flags: libc::c_ulong, opts: &str) -> io::Result<()> {
    sys::mount(Some("cove"), s(dst), Some("tmpfs"), flags, Some(opts))
}

/// Makes the mount at `dst` and every mount below it read-only, `nosuid` and `nodev` in one
/// call (flags the kernel locked on host mounts, like `noexec`, are kept as they are).
fn make_readonly(dst: &Path) -> Result<(), RootfsError> {
    sys::set_mount_attrs(s(dst), READONLY).map_err(err("make read-only", dst))
}

/// What [`make_readonly`] sets: read-only, `nosuid`, `nodev`.
const READONLY: u64 = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;

fn mkdir(p: &Path, mode: u32) -> Result<(), RootfsError> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        // The umask may have removed bits (e.g. the sticky /tmp).
        Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(err("chmod", p)),
        // An image's own directory (e.g. its /proc) is used as it is.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err("mkdir", p)(e)),
    }
}

fn write(p: &Path, content: &str) -> Result<(), RootfsError> {
    fs::write(p, content).map_err(err("write", p))
}

/// Builds the whole sandbox root and enters it. Runs in the child, as root of the new user
/// namespace, inside the new mount namespace. As soon as the sandbox's procfs is mounted,
/// `net_sysctls` gets its `/proc/sys/net/ipv4` directory (`O_PATH`, opened before `/proc/sys`
/// is made read-only), for the supervisor to configure the network namespace through (see
/// `netns::write_sysctls`) while the rest is built.
pub(crate) fn enter(
    plan: &RootPlan,
    net_sysctls: impl FnOnce(OwnedFd) -> io::Result<()>,
) -> Result<(), RootfsError> {
    // Nothing we mount may propagate back to the host, and nothing the host mounts later may
    // appear in the sandbox.
    sys::mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(err("make private", "/"))?;
    let staging = &plan.staging;
    let tmpfs_opts = format!("size={},mode=0755", plan.disk_bytes);
    tmpfs(staging, libc::MS_NOSUID | libc::MS_NODEV, &tmpfs_opts)
        .map_err(err("mount writable layer on", staging))?;
    let root = match &plan.image {
        RootImage::Host => {
            // A directory of the writable layer, made a mount point (pivot_root needs one) by
            // a bind onto itself: the layer's other directories stay out of the sandbox's view.
            let root = staging.join("root");
            mkdir(&root, 0o755)?;
            bind(&root, &root, false, false)?;
            host_image(&root, plan)?;
            root
        }
        RootImage::Layers(layers) => {
            let root = overlay_image(staging, layers)?;
            if let Some(conf) = &plan.resolv_conf {
                // In the writable layer; an image's own (often a symlink into /run) goes.
                let etc = root.join("etc");
                mkdir(&etc, 0o755)?;
                let path = etc.join("resolv.conf");
                let _ = fs::remove_file(&path);
                write(&path, conf)?;
            }
            root
        }
    };
    // Beside the root in the writable layer: an empty directory for the masks of `/proc`, and
    // the sandbox's `/dev/shm`. Binds of the one tmpfs, not a tmpfs each: every superblock
    // costs kernel memory, and every memory cgroup on the host pays a little more for each
    // superblock that exists (docs/jail.md, "Superblocks").
    let empty = staging.join("empty");
    mkdir(&empty, 0o555)?;
    let shm = staging.join("shm");
    mkdir(&shm, 0o1777)?;
    let ipv4 = mount_proc(&root, &empty)?;
    net_sysctls(ipv4).map_err(err("hand over", "/proc/sys/net/ipv4"))?;
    mount_dev(&root, plan.dev_template.as_deref(), &shm)?;
    for b in &plan.binds {
        user_bind(&root, b)?;
    }
    pivot(&root)
}

fn host_image(root: &Path, plan: &RootPlan) -> Result<(), RootfsError> {
    for d in HOST_DIRS {
        let host = Path::new("/").join(d);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        let dst = root.join(d);
        if meta.file_type().is_symlink() {
            // Merged-/usr systems: /bin -> usr/bin and friends; keep the same shape.
            let target = fs::read_link(&host).map_err(err("readlink", &host))?;
            symlink(&target, &dst).map_err(err("symlink", &dst))?;
        } else if meta.is_dir() {
            mkdir(&dst, 0o755)?;
            bind(&host, &dst, true, true)?;
        }
    }
    for (d, mode) in [
        ("tmp", 0o1777),
        ("var", 0o755),
        ("var/tmp", 0o1777),
        ("home", 0o755),
        ("root", 0o700),
        ("run", 0o755),
        ("mnt", 0o755),
        ("opt", 0o755),
        ("srv", 0o755),
    ] {
        mkdir(&root.join(d), mode)?;
    }
    // `/etc` is a directory of the root made its own mount by a bind onto itself, so that it can
    // be read-only while the root stays writable.
    let etc = root.join("etc");
    mkdir(&etc, 0o755)?;
    bind(&etc, &etc, false, false)?;
    let user_line = if plan.uid != 0 {
        let home = root.join("home/user");
        mkdir(&home, 0o755)?;
        std::os::unix::fs::chown(&home, Some(plan.uid), Some(plan.gid))
            .map_err(err("chown", &home))?;
        format!("user:x:{}:{}:user:/home/user:/bin/sh\n", plan.uid, plan.gid)
    } else {
        String::new()
    };
    write(
        &etc.join("passwd"),
        &format!(
            "root:x:0:0:root:/root:/bin/sh\n{user_line}nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    let group_line = if plan.gid != 0 && plan.gid != 65534 {
        format!("user:x:{}:\n", plan.gid)
    } else {
        String::new()
    };
    write(
        &etc.join("group"),
        &format!("root:x:0:\n{group_line}nogroup:x:65534:\n"),
    )?;
    write(&etc.join("hostname"), &format!("{}\n", plan.hostname))?;
    write(
        &etc.join("hosts"),
        &format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
            plan.hostname
        ),
    )?;
    write(
        &etc.join("resolv.conf"),
        plan.resolv_conf.as_deref().unwrap_or(""),
    )?;
    write(
        &etc.join("nsswitch.conf"),
        "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    )?;
    for name in HOST_ETC {
        let host = Path::new("/etc").join(name);
        let Ok(meta) = fs::metadata(&host) else {
            continue;
        };
        let dst = etc.join(name);
        if meta.is_dir() {
            mkdir(&dst, 0o755)?;
        } else {
            write(&dst, "")?;
        }
        bind(&host, &dst, false, false)?;
    }
    // The generated files and the host entries become read-only (and `noexec`) together.
    sys::set_mount_attrs(s(&etc), READONLY | sys::MOUNT_ATTR_NOEXEC)
        .map_err(err("make read-only", &etc))
}

/// Overlayfs over `layers` (bottom first). `userxattr`: mounted inside the sandbox's user
/// namespace, overlayfs can only use `user.overlay.*` attributes (for opaque directories and
/// its own copy-up bookkeeping); the image unpacker writes both forms.
fn overlay_image(staging: &Path, layers: &[PathBuf]) -> Result<PathBuf, RootfsError> {
    let upper = staging.join("upper");
    let work = staging.join("work");
    let merged = staging.join("root");
    for d in [&upper, &work, &merged] {
        mkdir(d, 0o755)?;
    }
    // overlayfs lists lower layers top first.
    let lowers: Vec<&str> = layers.iter().rev().map(|l| s(l)).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},userxattr",
        lowers.join(":"),
        s(&upper),
        s(&work)
    );
    sys::mount(
        Some("cove"),
        s(&merged),
        Some("overlay"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&opts),
    )
    .map_err(err("mount overlay on", &merged))?;
    for (d, mode) in [("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)] {
        let p = merged.join(d);
        if fs::symlink_metadata(&p).is_err() {
            mkdir(&p, mode)?;
        }
    }
    Ok(merged)
}

fn mount_proc(root: &Path, empty: &Path) -> Result<OwnedFd, RootfsError> {
    let proc = root.join("proc");
    mkdir(&proc, 0o555)?;
    sys::mount(
        Some("proc"),
        s(&proc),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )
    .map_err(err("mount proc on", &proc))?;
    let ipv4 = proc.join("sys/net/ipv4");
    let net_sysctls = sys::open_path_dir(s(&ipv4)).map_err(err("open", &ipv4))?;
    // The first directory gets a read-only bind of `empty`; the others a bind of that first
    // mask, which carries its read-only flag along (one attribute change, not one each).
    let mut first: Option<PathBuf> = None;
    for name in PROC_MASKED {
        let p = proc.join(name);
        let masked = match &first {
            _ if !PROC_MASKED_DIRS.contains(name) => {
                sys::mount(Some("/dev/null"), s(&p), None, libc::MS_BIND, None)
            }
            Some(f) => sys::mount(Some(s(f)), s(&p), None, libc::MS_BIND, None),
            None => sys::mount(Some(s(empty)), s(&p), None, libc::MS_BIND, None).and_then(|()| {
                first = Some(p.clone());
                sys::set_mount_attrs(s(&p), READONLY | sys::MOUNT_ATTR_NOEXEC)
            }),
        };
        match masked {
            // Not every kernel has every file.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r.map_err(err("mask", &p))?,
        }
    }
    for name in PROC_READONLY {
        let p = proc.join(name);
        if p.exists() {
            bind(&p, &p, true, true)?;
        }
    }
    Ok(net_sysctls)
}

fn mount_dev(root: &Path, template: Option<&Path>, shm: &Path) -> Result<(), RootfsError> {
    let dev = root.join("dev");
    mkdir(&dev, 0o755)?;
    match template {
        // The template's nodes are the host's device numbers on a host filesystem (not a
        // user-namespace mount, which could not open device nodes).
        Some(t) => {
            bind(t, &dev, false, false)?;
            // Read-only and nosuid, but not nodev: these nodes are the point.
            sys::set_mount_attrs(s(&dev), sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID)
                .map_err(err("make read-only", &dev))?;
        }
        None => dev_on_tmpfs(&dev)?,
    }
    let pts = dev.join("pts");
    sys::mount(
        Some("devpts"),
        s(&pts),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(err("mount devpts on", &pts))?;
    // Shared memory lives in the writable layer, within `--disk`.
    bind(shm, &dev.join("shm"), false, false)
}

/// `/dev` without a template: a small tmpfs with the host's nodes bound onto empty files.
fn dev_on_tmpfs(dev: &Path) -> Result<(), RootfsError> {
    tmpfs(dev, libc::MS_NOSUID | libc::MS_NOEXEC, "size=64k,mode=0755")
        .map_err(err("mount /dev on", dev))?;
    for (name, _, _) in DEVICE_NODES {
        let d = dev.join(name);
        write(&d, "")?;
        bind(&Path::new("/dev").join(name), &d, false, false)?;
    }
    mkdir(&dev.join("pts"), 0o755)?;
    mkdir(&dev.join("shm"), 0o1777)?;
    for (name, target) in DEV_LINKS {
        let p = dev.join(name);
        symlink(target, &p).map_err(err("symlink", &p))?;
    }
    Ok(())
}

/// Creates the mount point of a user bind inside the new root without following any symlink
/// (a hostile image could otherwise point a target outside the root), then binds.
fn user_bind(root: &Path, b: &BindMount) -> Result<(), RootfsError> {
    let src_meta = fs::metadata(&b.source).map_err(err("bind source", &b.source))?;
    let mut cur = root.to_path_buf();
    let comps: Vec<_> = b.target.components().skip(1).collect();
    for (i, c) in comps.iter().enumerate() {
        cur.push(c);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(err("bind target passes through a symlink at", &cur)(
                    io::Error::from_raw_os_error(libc::ELOOP),
                ));
            }
            Ok(_) => {}
            Err(_) if last && !src_meta.is_dir() => write(&cur, "")?,
            Err(_) => mkdir(&cur, 0o755)?,
        }
    }
    bind(&b.source, &cur, !b.writable, true)
}

fn pivot(root: &Path) -> Result<(), RootfsError> {
    std::env::set_current_dir(root).map_err(err("chdir", root))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then
    // removes the host's tree from the namespace without needing a directory for it.
    sys::pivot_root(".", ".").map_err(err("pivot_root into", root))?;
    sys::umount2(".", libc::MNT_DETACH).map_err(err("detach old root", "/"))?;
    std::env::set_current_dir("/").map_err(err("chdir", "/"))
}
