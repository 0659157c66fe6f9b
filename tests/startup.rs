//! Bad configuration stops a binary before it binds anything, with exit
//! code 2 and one line saying what is wrong, so an operator reads the
//! cause at the top of the output instead of a half-started process.

mod common;

use common::*;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;
use tether_testkit::localcluster::{free_port, run_to_exit, wait_serving, Reply};

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
            "--lease-ttl (1s) must be at least 2.5 x --heartbeat-interval (1s)",
        ),
        // Half a lease run down marks a head stale: 2 s with 1 s refreshes
        // would mark every healthy head stale just before each refresh.
        (
            &["--heartbeat-interval", "1s", "--lease-ttl", "2s"][..],
            "--lease-ttl (2s) must be at least 2.5 x --heartbeat-interval (1s)",
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

/// The address a head's lease advertises, as Redis holds it.
fn lease_addr(cluster: &tether_testkit::localcluster::Cluster, head: &str) -> Option<String> {
    match ok(cluster
        .redis()
        .command(&["HGET", &format!("{{tether}}:head:{head}"), "addr"]))
    {
        Reply::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        _ => None,
    }
}

/// A second `tether-head` under the id of a live head refuses to start:
/// exit 2, one line naming the id and the address that holds it, and the
/// first head's lease untouched. A head restarted under the same id right
/// after a crash, while the dead process's lease still runs, waits for
/// that lease to lapse and then serves.
#[tokio::test]
async fn a_second_head_under_a_live_heads_id_exits_2_and_a_restart_after_a_crash_serves() {
    let mut cluster = cluster();
    ok(cluster.spawn_head("head-0", HEAD_ARGS));
    let first = cluster.process("head-0").expect("a head").addr;
    ok(wait_serving(first, HEAD_SERVICE, START_TIMEOUT).await);

    let listen = format!("127.0.0.1:{}", ok(free_port()));
    let url = cluster.redis().url();
    let mut args = vec!["--id", "head-0", "--listen", &listen, "--redis-url", &url];
    args.extend_from_slice(HEAD_ARGS);
    let started = std::time::Instant::now();
    let out = ok(run_to_exit(
        &binaries().head,
        &args,
        Duration::from_secs(10),
    ));
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(
        out.status.code(),
        Some(2),
        "the second head-0 should exit 2; stderr:\n{stderr}"
    );
    assert!(
        errors.len() == 1 && errors[0].contains("head-0") && errors[0].contains(&first.to_string()),
        "expected one ERROR line naming head-0 and {first}; stderr:\n{stderr}"
    );
    assert_eq!(
        lease_addr(&cluster, "head-0").as_deref(),
        Some(first.to_string().as_str()),
        "the first head's lease was rewritten"
    );
    let health = tether_testkit::localcluster::health_check(first, HEAD_SERVICE).await;
    assert!(
        matches!(
            health,
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving)
        ),
        "the first head-0 is no longer ready: {health:?}"
    );
    eprintln!("a second head-0 exited 2 after {took:?}: {}", errors[0]);

    // A crash, and the orchestrator starts head-0 again at once: the dead
    // process's lease still runs, nobody refreshes it, so the new process
    // takes the id once it lapsed.
    drop(cluster.remove("head-0"));
    let crashed = std::time::Instant::now();
    ok(cluster.spawn_head("head-0", HEAD_ARGS));
    let second = cluster.process("head-0").expect("a head").addr;
    if let Err(e) = wait_serving(second, HEAD_SERVICE, START_TIMEOUT).await {
        let log = cluster.process("head-0").expect("a head").log_tail(20);
        panic!("head-0 restarted after a crash did not serve: {e}\nlog:\n{log}");
    }
    assert_eq!(
        lease_addr(&cluster, "head-0").as_deref(),
        Some(second.to_string().as_str()),
        "the restarted head-0 does not hold its lease"
    );
    eprintln!(
        "head-0 restarted at once after a crash served {:?} after the crash",
        crashed.elapsed()
    );
}
