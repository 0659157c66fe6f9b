//! The two embedding examples work as their docs say, against a real
//! `redis-server` and a real `tether-head`: `examples/embed_head.rs` serves
//! its own service and a head on one port, and workers attach to it;
//! `examples/embed_worker.rs` prints when its head changes, also when that
//! head is killed, and closes its stream when told to stop.
//!
//! The examples are built by `cargo test` (not by `cargo test --test
//! embed_examples` alone: then run `cargo build --examples` first).

mod common;

use common::{cluster, ok, HEAD_ARGS, HEAD_SERVICE, START_TIMEOUT};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{free_port, send_signal, wait_serving, worker_status, Signal};

/// target/<profile>/examples/NAME, next to the binaries of this run.
fn example(name: &str) -> PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_tether-head"))
        .with_file_name("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples` (or `cargo test`, which builds them)",
        path.display()
    );
    path
}

/// A running example whose stdout lines arrive on a channel; killed when
/// dropped.
struct Example {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Example {
    fn start(name: &str, args: &[&str]) -> Example {
        let mut child = Command::new(example(name))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Example {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`; returns it.
    fn expect_line(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {text:?} within {within:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn terminate_and_wait(&mut self, within: Duration) -> std::process::ExitStatus {
        ok(send_signal(self.child.id(), Signal::Term));
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_head_serves_its_own_service_and_workers_and_embedded_worker_reports_moves() {
    let mut cluster = cluster();
    let redis_url = cluster.redis().url();
    ok(cluster.spawn_head("head-0", HEAD_ARGS));
    let head0 = cluster.process("head-0").expect("head-0").addr;
    ok(wait_serving(head0, HEAD_SERVICE, START_TIMEOUT).await);

    // The embedded head: Tether's head and the program's own service on
    // one port.
    let addr = SocketAddr::from(([127, 0, 0, 1], ok(free_port())));
    let listen = addr.to_string();
    let mut app = Example::start(
        "embed_head",
        &[
            "--redis-url",
            &redis_url,
            "--listen",
            &listen,
            "--id",
            "app-head",
        ],
    );
    app.expect_line("app-head serving on", START_TIMEOUT);
    ok(wait_serving(addr, HEAD_SERVICE, START_TIMEOUT).await);
    let own = ok(worker_status(addr).await);
    assert_eq!(
        own.worker_id, "embed-head-app",
        "the program's own service answered {own:?}"
    );

    // The embedded worker, bootstrapped from head-0 only: it learns both
    // heads from ListHeads and attaches to one of them.
    let mut worker = Example::start(
        "embed_worker",
        &["--heads", &head0.to_string(), "--id", "w-embed"],
    );
    let line = worker.expect_line("attached to", START_TIMEOUT);
    let first = if line.contains("app-head") {
        "app-head"
    } else {
        "head-0"
    };

    // Its head goes away: SIGKILL for head-0, a drain for the embedded
    // head. Either way the worker reports the move to the other one.
    let other = if first == "app-head" {
        let status = app.terminate_and_wait(Duration::from_secs(20));
        assert!(
            status.success(),
            "embed_head exited with {status} after SIGTERM"
        );
        app.expect_line("app-head stopped", Duration::from_secs(5));
        "head-0"
    } else {
        ok(cluster.process_mut("head-0").expect("head-0").kill());
        "app-head"
    };
    let moved = worker.expect_line(&format!("to {other}"), Duration::from_secs(10));
    assert!(
        moved.contains("moved from") || moved.contains("attached to"),
        "unexpected line {moved:?}; all: {:?}",
        worker.seen
    );

    let status = worker.terminate_and_wait(Duration::from_secs(10));
    assert!(status.success(), "embed_worker exited with {status}");
    worker.expect_line("w-embed stopped", Duration::from_secs(5));
}
