//! `cove run` as a user meets it: stdio, exit codes, options, and clear errors.

mod common;

use common::{Run, require_root, run};

#[test]
fn stdout_stderr_and_stdin_stream_through() {
    require_root();
    let mut r = Run::new(&["--", "sh", "-c", "cat; echo to-stderr >&2"]);
    r.stdin = Some(b"hello from stdin\n".to_vec());
    let out = r.output();
    assert_eq!(out.code, 0);
    assert_eq!(out.stdout, "hello from stdin\n");
    assert_eq!(out.stderr, "to-stderr\n");
}

#[test]
fn exit_codes_are_the_commands() {
    require_root();
    assert_eq!(run(&["--", "sh", "-c", "exit 42"]).code, 42);
    assert_eq!(run(&["--", "true"]).code, 0);
    // Killed by signal N: 128 + N.
    let out = run(&["--json", "--", "sh", "-c", "kill -SEGV $$"]);
    assert_eq!(out.code, 139);
    let r = out.report();
    assert_eq!(r["signal"], 11);
    assert_eq!(r["reason"], "exited");
}

#[test]
fn a_missing_command_is_127_with_a_message() {
    require_root();
    let out = run(&["--", "no-such-command-xyz"]);
    assert_eq!(out.code, 127);
    assert!(out.stderr.contains("no-such-command-xyz"), "{}", out.stderr);
    let out = run(&["--", "/etc/passwd"]);
    assert_eq!(out.code, 126, "{}", out.stderr);
}

#[test]
fn a_mistyped_option_is_125_not_a_commands_code() {
    // A command may exit 2 itself (the usual code of a usage error): Cove's own usage errors
    // must not look like its command's.
    let out = run(&["--memroy", "1G", "--", "sh", "-c", "exit 2"]);
    assert_eq!(out.code, 125, "{}", out.stderr);
    assert!(out.stderr.contains("'--memory'"), "{}", out.stderr);
    let out = run(&["--help"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("--memory"), "{}", out.stdout);
}

#[test]
fn cove_failures_are_125_with_one_line() {
    require_root();
    for (args, needle) in [
        (vec!["--memory", "1k", "--", "true"], "at least 4M"),
        (vec!["--memory", "lots", "--", "true"], "is not a size"),
        (vec!["--timeout", "10", "--", "true"], "is not a duration"),
        (vec!["--cpus", "0", "--", "true"], "CPU count"),
        (
            vec!["--image", "/nonexistent-rootfs", "--", "true"],
            "/nonexistent-rootfs",
        ),
        (
            vec!["-v", "/nonexistent-src:/x", "--", "true"],
            "/nonexistent-src",
        ),
        (vec!["-v", "/tmp:relative", "--", "true"], "absolute"),
        (vec!["--user", "99999999", "--", "true"], "UID"),
        (vec!["--net", "host", "--", "true"], "none"),
        (vec!["-w", "/no/such/dir", "--", "true"], "/no/such/dir"),
        (vec!["--hostname", "bad host", "--", "true"], "hostname"),
        (vec!["-e", "=x", "--", "true"], "environment"),
    ] {
        let out = run(&args);
        assert_eq!(out.code, 125, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.trim().lines().count() <= 3,
            "{args:?}: {}",
            out.stderr
        );
    }
}

#[test]
fn environment_is_explicit() {
    require_root();
    let dir = std::env::temp_dir().join(format!("cove-envfile-{}", common::new_id()));
    std::fs::write(&dir, "# comment\nFROM_FILE=yes\n\nOVERRIDE=file\n").unwrap();
    let envfile = dir.display().to_string();
    let mut r = Run::new(&[
        "--env-file",
        &envfile,
        "-e",
        "OVERRIDE=flag",
        "-e",
        "PASSED",
        "--",
        "sh",
        "-c",
        "echo $FROM_FILE $OVERRIDE $PASSED ${HOST_ONLY:-unset}",
    ]);
    r.env.push(("PASSED".into(), "through".into()));
    r.env.push(("HOST_ONLY".into(), "leak".into()));
    let out = r.output();
    std::fs::remove_file(&dir).unwrap();
    assert_eq!(
        out.stdout.trim(),
        "yes flag through unset",
        "{}",
        out.stderr
    );
}

#[test]
fn workdir_hostname_and_user() {
    require_root();
    let out = run(&[
        "-w",
        "/tmp",
        "--hostname",
        "box",
        "--user",
        "1000:1000",
        "--",
        "sh",
        "-c",
        "pwd; hostname; id -u; id -g; echo $HOME; touch $HOME/f && echo home-writable",
    ]);
    assert_eq!(
        out.stdout, "/tmp\nbox\n1000\n1000\n/home/user\nhome-writable\n",
        "{}",
        out.stderr
    );
}

#[test]
fn volumes_are_read_only_unless_rw() {
    require_root();
    let dir = std::env::temp_dir().join(format!("cove-vol-{}", common::new_id()));
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("in"), "from host\n").unwrap();
    // Root inside is uid 1500000000 outside: a writable volume must be writable by it.
    std::os::unix::fs::chown(&dir, Some(1_500_000_000), Some(1_500_000_000)).unwrap();
    let ro = format!("{}:/data", dir.display());
    let rw = format!("{}:/data:rw", dir.display());
    let out = run(&[
        "-v",
        &ro,
        "--",
        "sh",
        "-c",
        "cat /data/in; echo x > /data/out || echo denied",
    ]);
    assert_eq!(out.stdout, "from host\ndenied\n", "{}", out.stderr);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
    let out = run(&["-v", &rw, "--", "sh", "-c", "echo written > /data/out"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        std::fs::read_to_string(dir.join("out")).unwrap(),
        "written\n"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_writable_layer_is_private_and_discarded() {
    require_root();
    let out = run(&[
        "--",
        "sh",
        "-c",
        "echo secret > /tmp/mark; echo x > /root/y; cat /tmp/mark",
    ]);
    assert_eq!(out.stdout, "secret\n", "{}", out.stderr);
    let out = run(&["--", "sh", "-c", "cat /tmp/mark 2>/dev/null || echo gone"]);
    assert_eq!(out.stdout, "gone\n");
}

#[test]
fn json_report_has_every_field() {
    require_root();
    let out = run(&["--json", "--", "sh", "-c", "echo hi"]);
    assert_eq!(out.code, 0);
    let r = out.report();
    for key in [
        "id",
        "exit_code",
        "signal",
        "reason",
        "wall_time_ms",
        "cpu_time_ms",
        "peak_memory_bytes",
    ] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    assert_eq!(r["reason"], "exited");
    assert!(r["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(out.stdout.lines().next(), Some("hi"));
}

#[test]
fn help_teaches() {
    let out = std::process::Command::new(common::cove_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--memory",
        "--timeout",
        "Examples:",
        "--image",
        "SRC:DST[:ro|rw]",
        "125",
    ] {
        assert!(text.contains(needle), "help lacks {needle}");
    }
}

#[test]
fn python_runs_on_the_host_image() {
    require_root();
    let out = run(&[
        "--",
        "python3",
        "-c",
        "import os; print(os.getpid(), os.getuid())",
    ]);
    assert_eq!(out.stdout, "2 0\n", "{}", out.stderr);
}

#[test]
fn the_command_starts_with_default_signal_dispositions() {
    require_root();
    // cove itself ignores SIGPIPE (the Rust runtime does); the command must not inherit that.
    let out = run(&["--", "grep", "SigIgn", "/proc/self/status"]);
    assert_eq!(
        out.stdout.split_whitespace().nth(1),
        Some("0000000000000000"),
        "{}",
        out.stdout
    );
}
