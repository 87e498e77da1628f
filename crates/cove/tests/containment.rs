//! Each containment step, proven from inside a real sandbox by `cove-probe`.

mod common;

use std::collections::HashMap;
use std::os::unix::net::UnixListener;

use common::{Run, probe_bin, require_root};

const EPERM: &str = "1";
const ENOSYS: &str = "38";

fn probe(extra_args: &[&str], cove_args: &[&str]) -> HashMap<String, String> {
    require_root();
    let bind = format!("{}:/probe", probe_bin().display());
    let mut args: Vec<&str> = vec!["-v", &bind];
    args.extend_from_slice(cove_args);
    args.push("--");
    args.push("/probe");
    args.extend_from_slice(extra_args);
    let mut run = Run::new(&args);
    run.env.push(("COVE_TEST_SECRET".into(), "hunter2".into()));
    let out = run.output();
    assert_eq!(out.code, 0, "probe failed: {}{}", out.stdout, out.stderr);
    out.facts()
}

fn host_ns(kind: &str) -> String {
    std::fs::read_link(format!("/proc/self/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn every_namespace_is_new() {
    let f = probe(&[], &[]);
    for ns in ["user", "pid", "mnt", "net", "uts", "ipc", "cgroup"] {
        let inside = &f[&format!("ns_{ns}")];
        assert_ne!(inside, &host_ns(ns), "{ns} namespace is the host's");
        assert!(inside.starts_with(ns), "{ns}: {inside}");
    }
}

#[test]
fn root_inside_is_an_unprivileged_id_range_outside() {
    let f = probe(&[], &[]);
    assert_eq!(f["uid"], "0");
    assert_eq!(f["uid_map"], "0 1500000000 65536");
    assert_eq!(f["gid_map"], "0 1500000000 65536");
}

#[test]
fn the_sandbox_sees_only_its_own_processes() {
    let f = probe(&[], &[]);
    // The probe is the command: pid 2 under the sandbox's init (pid 1).
    assert_eq!(f["pid"], "2");
    assert_eq!(f["ppid"], "1");
    assert_eq!(f["visible_pids"], "2");
    assert_eq!(f["errno_ptrace_init"], EPERM, "init must not be ptraceable");
}

#[test]
fn no_capabilities_no_new_privs_and_seccomp_filtering() {
    let f = probe(&[], &[]);
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(f[key], "0000000000000000", "{key}");
    }
    assert_eq!(f["NoNewPrivs"], "1");
    assert_eq!(f["Seccomp"], "2");
}

#[test]
fn dangerous_system_calls_are_denied() {
    let f = probe(&[], &[]);
    for call in [
        "mount",
        "unshare_user",
        "unshare_net",
        "unshare_mnt",
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "kexec_load",
        "init_module",
        "reboot",
        "swapon",
        "syslog",
        "acct",
        "settimeofday",
        "open_by_handle_at",
        "pivot_root",
        "setns",
        "chroot",
        "sethostname",
    ] {
        let errno = &f[&format!("errno_{call}")];
        assert!(
            errno == EPERM || errno == ENOSYS,
            "{call} returned errno {errno}, expected EPERM or ENOSYS"
        );
    }
}

#[test]
fn proc_leaks_are_masked_and_proc_sys_is_read_only() {
    let f = probe(&[], &[]);
    // Masked (reads as /dev/null) or absent (this kernel hides kcore from a user namespace's
    // procfs): either way no kernel memory.
    for file in ["kcore_len", "kallsyms_len"] {
        assert!(f[file] == "0" || f[file] == "err", "{file}: {}", f[file]);
    }
    // /dev/null is char device 1:3 (rdev 259).
    assert!(
        f["sysrq_write"] == "opened rdev=259" || f["sysrq_write"].starts_with("errno="),
        "sysrq-trigger: {}",
        f["sysrq_write"]
    );
    assert!(
        ["30", "13", "1"].contains(&f["proc_sys_write"].as_str()),
        "/proc/sys writable: {}",
        f["proc_sys_write"]
    );
}

#[test]
fn dev_is_minimal() {
    // Both ways of building /dev: Cove's read-only template, and a tmpfs of binds.
    for extra in [&[][..], &["--dev-tmpfs"][..]] {
        let f = probe(&[], extra);
        assert_eq!(
            f["dev"], "fd,full,null,ptmx,pts,random,shm,stderr,stdin,stdout,tty,urandom,zero",
            "{extra:?}"
        );
        let out = Run::new(&[
            extra,
            &[
                "--",
                "sh",
                "-c",
                "echo x > /dev/null && head -c 8 /dev/urandom | wc -c && echo y > /dev/shm/f && cat /dev/shm/f",
            ],
        ]
        .concat())
        .output();
        assert_eq!(out.stdout, "8\ny\n", "{extra:?}: {}", out.stderr);
    }
}

#[test]
fn one_tmpfs_holds_every_writable_path() {
    require_root();
    // `/`, `/etc`, `/dev/shm` and the masks of `/proc` directories are binds of the one
    // writable layer (a superblock each would cost kernel memory), so `/dev/shm` counts
    // against `--disk`, and nothing else of the layer is in view.
    let out = Run::new(&[
        "--disk",
        "8M",
        "--",
        "sh",
        "-c",
        "grep -c ' - tmpfs ' /proc/self/mountinfo; \
         grep ' - tmpfs ' /proc/self/mountinfo | cut -d' ' -f3 | sort -u | wc -l; \
         echo $(ls /); \
         head -c 6M /dev/zero > /tmp/a; head -c 6M /dev/zero > /dev/shm/b; echo shm=$?",
    ])
    .output();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}{}", out.stdout, out.stderr);
    // `/`, `/etc`, `/dev/shm` and two masked directories of this kernel's `/proc`.
    assert!(lines[0].parse::<u32>().unwrap() >= 4, "{}", out.stdout);
    assert_eq!(
        lines[1], "1",
        "more than one tmpfs superblock: {}",
        out.stdout
    );
    let root: Vec<&str> = lines[2].split(' ').collect();
    for name in ["etc", "proc", "dev", "tmp", "usr"] {
        assert!(root.contains(&name), "{name} missing from /: {}", lines[2]);
    }
    for name in ["empty", "shm"] {
        assert!(
            !root.contains(&name),
            "the layer's {name} is in view: {}",
            lines[2]
        );
    }
    assert_eq!(lines[3], "shm=1", "/dev/shm is not within --disk");
    assert!(out.stderr.contains("No space left"), "{}", out.stderr);
}

#[test]
fn network_is_loopback_only_and_hostname_is_private() {
    let f = probe(&[], &["--hostname", "sandbox-test"]);
    assert_eq!(f["net_ifaces"], "lo");
    assert_eq!(f["hostname"], "sandbox-test");
}

#[test]
fn the_cgroup_namespace_hides_the_host_hierarchy() {
    let f = probe(&[], &[]);
    // Every line reads "N:controllers:/" inside a cgroup namespace rooted at the sandbox.
    for entry in f["cgroup"].split(' ') {
        assert!(entry.ends_with(":/"), "cgroup path visible: {entry}");
    }
}

#[test]
fn host_environment_and_descriptors_are_not_inherited() {
    let f = probe(&[], &[]);
    assert!(
        !f["env_keys"].contains("COVE_TEST_SECRET"),
        "{}",
        f["env_keys"]
    );
    assert_eq!(f["env_keys"], "HOME,HOSTNAME,PATH");
    assert_eq!(
        f["fd_count"], "3",
        "only stdin, stdout and stderr may be open"
    );
}

#[test]
fn host_files_and_abstract_sockets_are_unreachable() {
    require_root();
    let name = format!("cove-test-{}", common::new_id());
    // An abstract socket on the host: reachable from the host, not from the sandbox.
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let _listener = UnixListener::bind_addr(&addr).unwrap();
    let arg = format!("abstract={name}");
    let f = probe(
        &[
            &arg,
            "path=/etc/shadow",
            "path=/run/cove",
            "path=/root",
            "path=/var/lib",
            "path=/usr/bin/env",
        ],
        &[],
    );
    assert_eq!(
        f[&format!("abstract_{name}")],
        "111",
        "host abstract socket reachable (want ECONNREFUSED)"
    );
    assert_eq!(f["exists_/etc/shadow"], "false");
    assert_eq!(f["exists_/run/cove"], "false");
    assert_eq!(f["exists_/var/lib"], "false");
    // /root is the sandbox's own (empty) home, the host's /usr is there read-only.
    assert_eq!(f["exists_/root"], "true");
    assert_eq!(f["exists_/usr/bin/env"], "true");
}

#[test]
fn the_sandbox_cannot_signal_host_processes() {
    require_root();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid = sleeper.id().to_string();
    let out = Run::new(&["--", "sh", "-c", &format!("kill -9 {pid}; echo rc=$?")]).output();
    assert!(out.stdout.contains("rc=1"), "{}{}", out.stdout, out.stderr);
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the host process was killed"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn the_host_keyring_is_out_of_reach() {
    let f = probe(&[], &[]);
    assert_eq!(f["errno_keyctl"], EPERM);
    assert_eq!(f["errno_add_key"], EPERM);
}

#[test]
fn the_sandbox_may_listen_on_low_ports_but_not_reconfigure_its_network() {
    require_root();
    let out = Run::new(&[
        "--",
        "python3",
        "-c",
        "import socket, fcntl, struct\n\
s = socket.socket(); s.bind(('127.0.0.1', 80)); s.listen(); print('listening on 80')\n\
c = socket.create_connection(('127.0.0.1', 80)); print('connected')\n\
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP); print('icmp echo')\n\
ifr = struct.pack('16sh', b'lo', 0)\n\
try:\n    fcntl.ioctl(socket.socket(), 0x8914, ifr)\n    print('lo reconfigured')\n\
except PermissionError:\n    print('lo: EPERM')\n",
    ])
    .output();
    assert_eq!(
        out.stdout, "listening on 80\nconnected\nicmp echo\nlo: EPERM\n",
        "{}",
        out.stderr
    );
}
