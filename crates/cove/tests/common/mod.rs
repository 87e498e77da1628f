//! Shared helpers for the end-to-end tests: run the real `cove` binary like a user, parse what
//! it prints, and prove afterwards that the sandbox left nothing on the host.

#![allow(dead_code)]
#![allow(unsafe_code)]

pub mod images;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `cove` binary under test.
pub fn cove_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cove"))
}

/// The probe binary, built beside `cove`.
pub fn probe_bin() -> PathBuf {
    cove_bin().with_file_name("cove-probe")
}

/// A fresh random sandbox id, so that tests running in parallel can check their own leaks.
pub fn new_id() -> String {
    let mut b = [0u8; 6];
    let f = std::fs::read("/proc/sys/kernel/random/uuid").unwrap();
    for (i, c) in f
        .iter()
        .filter(|c| c.is_ascii_hexdigit())
        .take(12)
        .enumerate()
    {
        b[i / 2] = (b[i / 2] << 4) | (*c as char).to_digit(16).unwrap() as u8;
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One `cove run` invocation, with its own id and a leak check when dropped.
pub struct Run {
    pub id: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
}

impl Run {
    pub fn new(args: &[&str]) -> Run {
        Run {
            id: new_id(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            stdin: None,
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(cove_bin());
        c.arg("run").arg("--id").arg(&self.id).args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs to completion and checks that nothing of the sandbox is left.
    pub fn output(&self) -> Out {
        let mut c = self.command();
        c.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn cove");
        if let Some(input) = &self.stdin {
            use std::io::Write;
            let mut s = child.stdin.take().unwrap();
            s.write_all(input).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_no_leaks(&self.id);
        Out::from(out)
    }
}

/// What a run printed.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Out {
    fn from(o: Output) -> Out {
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Out {
    /// The `--json` report (last line of stdout).
    pub fn report(&self) -> serde_json::Value {
        let last = self
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no output; stderr: {}", self.stderr));
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("{e}: {last:?}; stderr: {}", self.stderr))
    }

    /// `key=value` lines as a map (probe output).
    pub fn facts(&self) -> HashMap<String, String> {
        self.stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Runs `cove run [args] -- cmd...` and returns its output.
pub fn run(args: &[&str]) -> Out {
    Run::new(args).output()
}

/// Every host object a sandbox creates carries its id; none may remain after `cove run` exits.
pub fn assert_no_leaks(id: &str) {
    // A sandbox's egress link goes with its network namespace, which the kernel tears down
    // asynchronously after its last process: give it a moment.
    let link = format!("/sys/class/net/cv{id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Path::new(&link).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut leaks = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            for candidate in [
                e.path().join("cove").join(id),
                e.path().join(format!("cove-{id}")),
                e.path().join(id),
            ] {
                if candidate.exists() {
                    leaks.push(candidate.display().to_string());
                }
            }
        }
    }
    for p in [
        format!("/run/cove/{id}"),
        format!("/run/cove/.new-{id}"),
        format!("/sys/class/net/cv{id}"),
    ] {
        if Path::new(&p).exists() {
            leaks.push(p);
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    leaks.extend(
        mounts
            .lines()
            .filter(|l| l.contains(id))
            .map(str::to_string),
    );
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm"))
            && comm.trim() == format!("cove-{id}").chars().take(15).collect::<String>()
        {
            // Its state and parent say who should have collected or killed it.
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
            leaks.push(format!(
                "process {} {} (state and parent: {})",
                e.file_name().to_string_lossy(),
                comm.trim(),
                after.split(' ').take(2).collect::<Vec<_>>().join(" ")
            ));
        }
    }
    assert!(leaks.is_empty(), "sandbox {id} leaked: {leaks:#?}");
}

/// Sends `sig` to process `pid` (one the test started).
pub fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill takes plain integers.
    let ret = unsafe { libc::kill(pid, sig) };
    assert_eq!(ret, 0, "kill({pid}, {sig})");
}

/// Makes this test process the reaper of its orphans. A test that kills `cove run` orphans the
/// sandbox's init; its exit must be collected by someone, and the host's pid 1 is not always a
/// reaping init (in containers and some VMs it is not).
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer argument.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(ret, 0);
}

/// Kills the init of sandbox `id` (found by its name, `cove-<id>` cut to 15 bytes), which
/// takes the whole sandbox down with it.
pub fn kill_init(id: &str) {
    let name: String = format!("cove-{id}").chars().take(15).collect();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok());
        if let Some(pid) = pid
            && std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == name)
        {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// Collects every exited orphan (see [`become_subreaper`]), waiting up to 5 s for the
/// processes of sandbox `id` (named `cove-<id>`, or in its cgroup) to exit.
pub fn reap_orphans(id: &str) {
    let comm: String = format!("cove-{id}").chars().take(15).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // SAFETY: waitpid with a NULL status pointer and WNOHANG only reaps.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        // By name; for a child killed early in its setup (before init names itself), by its
        // cgroup; before it has even joined that (it still holds the supervisor's state lock,
        // so `cove gc` rightly leaves the sandbox alone), by the id on its command line.
        // (`cove/<id>` of a server, `cove-<id>` of `cove run`.)
        let in_cgroup = [format!("/cove/{id}\n"), format!("/cove-{id}\n")];
        let alive = std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm)
                || std::fs::read_to_string(e.path().join("cgroup"))
                    .is_ok_and(|c| in_cgroup.iter().any(|g| c.contains(g.as_str())))
                || std::fs::read(e.path().join("cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(id))
        });
        if !alive || std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A lock between the tests that reap (`cove gc`, shared) and the test of the server's
/// reaper (exclusive), which must know that what it planted was removed by the server.
pub fn gc_lock(exclusive: bool) -> std::fs::File {
    let lock = std::fs::File::create("/run/cove-test-gc.lock").unwrap();
    if exclusive {
        lock.lock().unwrap();
    } else {
        lock.lock_shared().unwrap();
    }
    lock
}

/// Whether we can run the privileged tests at all.
pub fn require_root() {
    // SAFETY-free check: root's uid from /proc.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace().nth(1) == Some("0"),
        "the integration tests start real sandboxes and must run as root"
    );
}
