//! Bad configuration stops a binary before it binds anything, with exit
//! code 2 and one line saying what is wrong, so an operator reads the
//! cause at the top of the output instead of a half-started process.

mod common;

use common::*;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;
use tether::localcluster::run_to_exit;

/// The hint clap adds under its own errors; allowed next to the one line.
const CLAP_HINT: &str = "For more information, try '--help'.";

/// Runs `program` with `args` while this test holds the `--listen` port:
/// a binary that bound before validating would fail on the port (exit 1,
/// "cannot listen") instead of reporting the configuration.
fn assert_rejected(program: &Path, args: &[&str], words: &str) {
    let held = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let listen = held.local_addr().expect("bound").to_string();
    let mut all = vec!["--listen", listen.as_str(), "--id", "config-test"];
    all.extend_from_slice(args);
    let out = ok(run_to_exit(program, &all, Duration::from_secs(10)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    let what = format!(
        "{name} {args:?}: exit {:?}, stderr:\n{stderr}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(2), "{what}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let (first, rest) = lines
        .split_first()
        .unwrap_or_else(|| panic!("no error line; {what}"));
    assert!(
        first.contains(words),
        "the first line should name the problem ({words:?}); {what}"
    );
    assert!(
        rest.iter().all(|l| *l == CLAP_HINT),
        "more than one line of error; {what}"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}\nstdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn head_rejects_bad_configuration_before_binding() {
    let head = binaries().head;
    for (args, words) in [
        (
            &["--redis-url", "http://127.0.0.1:6379"][..],
            "invalid Redis URL",
        ),
        (&["--redis-url", "not a url"][..], "invalid Redis URL"),
        (&["--heartbeat-interval", "5"][..], "no unit"),
        (&["--heartbeat-timeout", "3 s"][..], "--heartbeat-timeout"),
        (
            &["--heartbeat-interval", "1s", "--heartbeat-timeout", "1s"][..],
            "--heartbeat-timeout (1s) must be larger than --heartbeat-interval (1s)",
        ),
        (
            &["--heartbeat-interval", "1s", "--heartbeat-timeout", "500ms"][..],
            "must be larger than --heartbeat-interval",
        ),
        (
            &["--heartbeat-interval", "1s", "--lease-ttl", "1s"][..],
            "--lease-ttl (1s) must be larger than --heartbeat-interval (1s)",
        ),
        (&["--heartbeat-interval", "0s"][..], "--heartbeat-interval"),
    ] {
        assert_rejected(&head, args, words);
    }
}

#[test]
fn worker_rejects_bad_configuration_before_binding() {
    let worker = binaries().worker;
    for (args, words) in [
        (
            &["--redis-url", "http://127.0.0.1:6379"][..],
            "invalid Redis URL",
        ),
        (&["--connect-timeout", "5"][..], "no unit"),
        (&["--connect-timeout", "0s"][..], "--connect-timeout"),
        (&["--max-backoff", "10ms"][..], "--max-backoff"),
    ] {
        assert_rejected(&worker, args, words);
    }
}

#[test]
fn redis_passwords_never_reach_the_error() {
    let head = binaries().head;
    let out = ok(run_to_exit(
        &head,
        &[
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            "http://user:s3cret@host:1",
        ],
        Duration::from_secs(10),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(!stderr.contains("s3cret"), "the password leaked:\n{stderr}");
}
