//! The Python worker of `examples/python/tether_worker.py`, written from
//! `docs/protocol.md`, behaves like `tether-worker` against real heads:
//! it attaches through `ListHeads` knowing one head and no Redis, fails
//! over when that head is SIGKILLed, follows a drain make-before-break,
//! and answers `Status` and health like any worker. Then Rust and Python
//! workers go through one seeded schedule of faults together, and the
//! Python ones must re-attach within the same bound as the Rust ones.
//!
//! Without python3 and grpcio the tests fail with the command that
//! installs them; they never skip.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether::localcluster::{free_port, run_to_exit, wait_serving, wait_until, Cluster, Probe};

const INSTALL: &str = "python3 -m pip install -r examples/python/requirements.txt (or `make test-deps`)";

/// Bound on a worker re-attaching after its head died or hung: the
/// heartbeat timeout (600 ms) plus retries, generous for a loaded
/// two-core machine.
const REATTACH_TIMEOUT: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Generates the stubs into a fresh directory; fails naming the fix when
/// python3 or grpcio-tools is missing.
fn stubs() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tether-python-worker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let generate = repo().join("examples/python/generate.py");
    let out = run_to_exit(
        Path::new("python3"),
        &[
            generate.to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
            "--proto-root",
            repo().join("proto").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("python3 cannot be run ({e}); install it, then `{INSTALL}`"));
    assert!(
        out.status.success(),
        "generate.py failed; run `{INSTALL}`:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// A Python worker process; killed when dropped.
struct PyWorker {
    id: String,
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl PyWorker {
    fn spawn(cluster: &Cluster, stubs: &Path, id: &str, heads: &str) -> PyWorker {
        let addr = SocketAddr::from(([127, 0, 0, 1], ok(free_port())));
        let log = cluster.log_dir().join(format!("py-{id}.log"));
        let out = std::fs::File::create(&log).expect("creating the log");
        let child = Command::new("python3")
            .arg(repo().join("examples/python/tether_worker.py"))
            .args(["--heads", heads, "--id", id, "--listen", &addr.to_string()])
            .args(["--stubs", stubs.to_str().unwrap()])
            .args(["--connect-timeout", "0.5", "--max-backoff", "0.5"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting python3: {e}; `{INSTALL}`"));
        PyWorker {
            id: id.to_owned(),
            addr,
            child,
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn member(&self) -> Member {
        Member {
            id: self.id.clone(),
            addr: self.addr,
        }
    }
}

impl Drop for PyWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_heads(cluster: &mut Cluster, n: usize) {
    for i in 0..n {
        ok(cluster.spawn_head(&head_id(i), HEAD_ARGS));
    }
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
}

/// Waits until the worker at `addr` is attached to a head other than
/// `from`; returns how long that took.
async fn reattached(addr: SocketAddr, from: &str, log: impl Fn() -> String) -> (String, Duration) {
    let t = Instant::now();
    let mut probe = Probe::new();
    let mut last = None;
    let done = wait_until(REATTACH_TIMEOUT, Duration::from_millis(10), async || {
        let s = probe.worker_status(addr).await.ok();
        let ok = s.as_ref().is_some_and(|s| s.attached && s.head_id != from);
        last = s;
        ok
    })
    .await;
    assert!(done, "not re-attached away from {from} within {REATTACH_TIMEOUT:?}: {last:?}\n{}", log());
    (last.unwrap().head_id, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_worker_attaches_fails_over_and_follows_a_drain_make_before_break() {
    let stubs = stubs();
    let mut cluster = cluster();
    start_heads(&mut cluster, 3).await;
    let boot = cluster.process("head-0").unwrap().addr.to_string();
    let py = PyWorker::spawn(&cluster, &stubs, "py-worker-1", &boot);
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let mut probe = Probe::new();
    let view = settle(&mut probe, &heads, &[py.member()], START_TIMEOUT).await;
    let first = view.status("py-worker-1").unwrap().head_id.clone();
    let health = probe.health(py.addr, WORKER_SERVICE).await;
    assert_eq!(health.ok(), Some(tonic_health::pb::health_check_response::ServingStatus::Serving), "{}", py.log_tail());

    // Its head dies: it re-attaches elsewhere (knowing only head-0 at
    // start: when head-0 is the one killed, from its last list).
    ok(cluster.process_mut(&first).unwrap().kill());
    let (second, took) = reattached(py.addr, &first, || py.log_tail()).await;
    println!("python worker re-attached {first} -> {second} in {took:?}");

    // Its new head drains: it moves before the old stream closes, so no
    // HeadBeat gap reaches the heartbeat timeout.
    ok(cluster.process_mut(&second).unwrap().terminate());
    let (third, took) = reattached(py.addr, &second, || py.log_tail()).await;
    let s = probe.worker_status(py.addr).await.expect("Status");
    println!("python worker drained {second} -> {third} in {took:?}, max beat gap {} ms", s.max_head_beat_gap_ms);
    assert!(s.max_head_beat_gap_ms < 600, "the drain left a gap: {s:?}\n{}", py.log_tail());
    assert!(s.reassignments >= 2, "{s:?}");
    assert!(py.log_tail().contains("asks us to move"), "{}", py.log_tail());
    let rest: Vec<Member> = cluster
        .heads()
        .filter(|h| h.id == third)
        .map(Member::from)
        .collect();
    settle(&mut probe, &rest, &[py.member()], START_TIMEOUT).await;
}

#[test]
fn python_worker_refuses_a_bad_heads_flag_with_exit_2() {
    let out = run_to_exit(
        Path::new("python3"),
        &[
            repo().join("examples/python/tether_worker.py").to_str().unwrap(),
            "--heads",
            "nohost",
            "--id",
            "x",
            "--listen",
            "127.0.0.1:1",
        ],
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("python3: {e}; `{INSTALL}`"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is not host:port"), "{err}");
}
