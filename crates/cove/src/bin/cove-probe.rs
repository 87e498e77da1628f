//! `cove-probe`: a test helper run *inside* a sandbox to report what the sandbox can see and do,
//! one `key=value` line per fact. The integration tests bind it in, run it, and assert on the
//! facts; the containment is proven from the inside, not inferred from the setup code.
//!
//! Usage: `cove-probe [abstract=NAME] [path=/host/path ...]`
//! - `abstract=NAME`: also try to connect to the abstract unix socket `@NAME`.
//! - `path=P`: also report whether path `P` exists.

#![allow(unsafe_code)]

use std::fs;
use std::io;

fn errno_of(ret: libc::c_long) -> String {
    if ret < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .map_or("?".into(), |e| e.to_string())
    } else {
        "0".into()
    }
}

fn line(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

/// A raw syscall with up to four integer arguments; returns its errno as text ("0" on success).
fn sys(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> String {
    // SAFETY: the calls made through this helper take integer arguments or NULL pointers only
    // (every call site passes zeros or small constants), so the kernel reads no memory of ours
    // beyond what it validates itself.
    errno_of(unsafe { libc::syscall(nr, a, b, c, d) })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SAFETY: getpid/getppid/getuid/getgid have no preconditions.
    let (pid, ppid, uid, gid) = unsafe {
        (
            libc::getpid(),
            libc::getppid(),
            libc::getuid(),
            libc::getgid(),
        )
    };
    line("pid", pid);
    line("ppid", ppid);
    line("uid", uid);
    line("gid", gid);
    for file in ["uid_map", "gid_map", "cgroup"] {
        let text = fs::read_to_string(format!("/proc/self/{file}")).unwrap_or_default();
        line(file, text.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for key in [
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
    ] {
        let v = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .unwrap_or("")
            .trim();
        line(key, v);
    }
    for ns in ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"] {
        let v = fs::read_link(format!("/proc/self/ns/{ns}"))
            .map_or("?".into(), |p| p.display().to_string());
        line(&format!("ns_{ns}"), v);
    }
    let pids = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .chars()
                        .all(|c| c.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0);
    line("visible_pids", pids);
    let mut fds: Vec<String> = fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    // One of them is the directory being listed.
    line("fd_count", fds.len().saturating_sub(1));
    let mut env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    env.sort();
    line("env_keys", env.join(","));
    line(
        "hostname",
        fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim(),
    );
    let mut dev: Vec<String> = fs::read_dir("/dev")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    dev.sort();
    line("dev", dev.join(","));
    let ifaces: Vec<String> = fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|s| s.trim().to_string()))
        .collect();
    line("net_ifaces", ifaces.join(","));
    line(
        "kcore_len",
        fs::read("/proc/kcore").map_or("err".into(), |b| b.len().to_string()),
    );
    line(
        "kallsyms_len",
        fs::read("/proc/kallsyms").map_or("err".into(), |b| b.len().to_string()),
    );
    for file in ["slabinfo", "vmallocinfo", "kpageflags"] {
        line(
            &format!("{file}_read"),
            match fs::read(format!("/proc/{file}")) {
                Ok(b) => format!("read {} bytes", b.len()),
                Err(e) => format!("errno={}", e.raw_os_error().unwrap_or(0)),
            },
        );
    }
    line(
        "sysrq_write",
        match fs::OpenOptions::new()
            .write(true)
            .open("/proc/sysrq-trigger")
        {
            Ok(_) => {
                let meta = fs::metadata("/proc/sysrq-trigger").ok();
                use std::os::unix::fs::MetadataExt;
                // Masked means it is /dev/null (char device 1:3).
                format!("opened rdev={}", meta.map_or(0, |m| m.rdev()))
            }
            Err(e) => format!("errno={}", e.raw_os_error().unwrap_or(0)),
        },
    );
    line(
        "proc_sys_write",
        match fs::write("/proc/sys/kernel/hostname", "x") {
            Ok(()) => "ok".to_string(),
            Err(e) => e.raw_os_error().unwrap_or(0).to_string(),
        },
    );
    line("errno_mount", mount_errno());
    line(
        "errno_unshare_user",
        sys(libc::SYS_unshare, libc::CLONE_NEWUSER as usize, 0, 0, 0),
    );
    line(
        "errno_unshare_net",
        sys(libc::SYS_unshare, libc::CLONE_NEWNET as usize, 0, 0, 0),
    );
    line(
        "errno_unshare_mnt",
        sys(libc::SYS_unshare, libc::CLONE_NEWNS as usize, 0, 0, 0),
    );
    line(
        "errno_keyctl",
        sys(
            libc::SYS_keyctl,
            0, /* GET_KEYRING_ID */
            (-3i64) as usize,
            0,
            0,
        ),
    );
    line("errno_add_key", sys(libc::SYS_add_key, 0, 0, 0, 0));
    line("errno_bpf", sys(libc::SYS_bpf, 0, 0, 0, 0));
    line(
        "errno_perf_event_open",
        sys(libc::SYS_perf_event_open, 0, 0, 0, 0),
    );
    line("errno_userfaultfd", sys(libc::SYS_userfaultfd, 0, 0, 0, 0));
    line(
        "errno_io_uring_setup",
        sys(libc::SYS_io_uring_setup, 1, 0, 0, 0),
    );
    line("errno_kexec_load", sys(libc::SYS_kexec_load, 0, 0, 0, 0));
    line("errno_init_module", sys(libc::SYS_init_module, 0, 0, 0, 0));
    line("errno_reboot", sys(libc::SYS_reboot, 0, 0, 0, 0));
    line("errno_swapon", sys(libc::SYS_swapon, 0, 0, 0, 0));
    line("errno_syslog", sys(libc::SYS_syslog, 3, 0, 0, 0));
    line("errno_acct", sys(libc::SYS_acct, 0, 0, 0, 0));
    line(
        "errno_settimeofday",
        sys(libc::SYS_settimeofday, 0, 0, 0, 0),
    );
    line(
        "errno_open_by_handle_at",
        sys(libc::SYS_open_by_handle_at, 0, 0, 0, 0),
    );
    line("errno_pivot_root", sys(libc::SYS_pivot_root, 0, 0, 0, 0));
    line("errno_setns", sys(libc::SYS_setns, 0, 0, 0, 0));
    line("errno_chroot", chroot_errno());
    line(
        "errno_ptrace_init",
        sys(libc::SYS_ptrace, libc::PTRACE_ATTACH as usize, 1, 0, 0),
    );
    line("errno_sethostname", sys(libc::SYS_sethostname, 0, 0, 0, 0));
    for a in &args {
        if let Some(name) = a.strip_prefix("abstract=") {
            line(&format!("abstract_{name}"), connect_abstract(name));
        } else if let Some(p) = a.strip_prefix("path=") {
            line(&format!("exists_{p}"), std::path::Path::new(p).exists());
        }
    }
}

fn mount_errno() -> String {
    let src = c"none";
    let dst = c"/tmp";
    let fstype = c"tmpfs";
    // SAFETY: all pointers are NUL-terminated literals; data is NULL.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    errno_of(ret as libc::c_long)
}

fn chroot_errno() -> String {
    let p = c"/tmp";
    // SAFETY: NUL-terminated literal path.
    errno_of(unsafe { libc::chroot(p.as_ptr()) } as libc::c_long)
}

/// Connects to the abstract socket `@name`; "ok" or the errno.
fn connect_abstract(name: &str) -> String {
    // SAFETY: socket takes integer arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return errno_of(-1);
    }
    // SAFETY: sockaddr_un is plain data.
    let mut addr = unsafe { std::mem::zeroed::<libc::sockaddr_un>() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = name.as_bytes();
    let n = bytes.len().min(addr.sun_path.len() - 1);
    for (i, b) in bytes[..n].iter().enumerate() {
        // sun_path[0] stays 0: the abstract namespace.
        addr.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + n) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let ret = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
    let out = if ret == 0 {
        "ok".to_string()
    } else {
        errno_of(-1)
    };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    out
}
