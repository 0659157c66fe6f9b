//! The Python client in `examples/python` works against a real cluster:
//! its stubs generate from `proto/` with grpcio-tools, `list` and `status`
//! print what the Rust client sees, `watch --count N` prints live events
//! and exits, and `--token-file` carries the bearer token that a cluster
//! started with `--auth-token-file` requires.
//!
//! It proves that the proto file is usable from another language as
//! shipped, which the Rust tests (generated from the same file by
//! `build.rs`) cannot show. Without python3 and grpcio-tools the test fails
//! with the command that installs them; it never skips.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tether::pb::{ListWorkersRequest, ListWorkersResponse, StatusRequest, WorkerStatus};
use tether_testkit::localcluster::{
    head_client, run_to_exit, wait_serving, wait_until, worker_client, RPC_TIMEOUT,
};

/// The command that installs what the test needs.
const INSTALL: &str = "python3 -m pip install -r examples/python/requirements.txt";

/// What to do when the system Python refuses that (PEP 668: Debian 12 and
/// later).
const VENV_HINT: &str = "if pip answers externally-managed-environment, install into a \
    virtualenv and put its bin/ first on PATH: the test runs the `python3` it finds on PATH";

/// The shared secret of the test cluster (at least 16 printable bytes).
const TOKEN: &str = "python-client-test-secret-0123456789";

/// Bound on one run of the Python client: the interpreter and grpcio
/// start in well under a second, but a loaded CI machine can be slow.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(20);

/// Bound on an expected line from `watch`.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn client_script() -> PathBuf {
    repo().join("examples/python/tether_client.py")
}

/// Fails, naming the fix, unless python3 can import grpc and grpc_tools.
fn require_python() {
    let check = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, google.protobuf"])
        .stdin(Stdio::null())
        .output();
    match check {
        Err(e) => panic!(
            "python3 cannot be started ({e}); install it (`sudo apt-get install -y python3 python3-pip`), then run `{INSTALL}` ({VENV_HINT})"
        ),
        Ok(out) if !out.status.success() => panic!(
            "python3 cannot import grpcio and grpcio-tools; run `{INSTALL}` ({VENV_HINT})\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

/// A scratch directory for the stubs and the token file; removed at the
/// end unless the test failed, so that a failure leaves them to look at.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tether-python-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("python_client: scratch files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs `python3 args...` to its end.
fn python(args: &[&str]) -> Output {
    run_to_exit(Path::new("python3"), args, PYTHON_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a client command that must succeed; its stdout lines.
fn client(command: &str, target: SocketAddr, stubs: &Path, token_file: &Path) -> Vec<String> {
    let script = client_script();
    let target = target.to_string();
    let args = [
        script.to_str().expect("a UTF-8 path"),
        command,
        &target,
        "--stubs",
        stubs.to_str().expect("a UTF-8 path"),
        "--token-file",
        token_file.to_str().expect("a UTF-8 path"),
    ];
    let out = python(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`tether_client.py {command} {target}` failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// The `key=value` fields of one output line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Adds the bearer token, as every RPC but health requires here.
fn authorized<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {TOKEN}").parse().expect("ASCII");
    request.metadata_mut().insert("authorization", value);
    request
}

/// `ListWorkers` of the head at `addr`, through the Rust client.
async fn rust_listing(addr: SocketAddr) -> Result<ListWorkersResponse, String> {
    let mut client = head_client(addr);
    let call = client.list_workers(authorized(ListWorkersRequest::default()));
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

/// `Status` of the worker at `addr`, through the Rust client.
async fn rust_status(addr: SocketAddr) -> Result<WorkerStatus, String> {
    let mut client = worker_client(addr);
    let call = client.status(authorized(StatusRequest {}));
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

/// What every head and worker says, with the token.
async fn view(heads: &[Member], workers: &[Member]) -> View {
    let mut listings = BTreeMap::new();
    for h in heads {
        listings.insert(h.id.clone(), rust_listing(h.addr).await);
    }
    let mut statuses = BTreeMap::new();
    for w in workers {
        statuses.insert(w.id.clone(), rust_status(w.addr).await);
    }
    View { statuses, listings }
}

/// Waits until every worker is attached to exactly one head that agrees
/// on its epoch (see [`View::problems`]).
async fn settled(heads: &[Member], workers: &[Member]) -> View {
    let mut last = None;
    let done = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        let v = view(heads, workers).await;
        let ok = v.problems().is_empty();
        last = Some(v);
        ok
    })
    .await;
    let v = last.expect("checked at least once");
    assert!(
        done,
        "the cluster did not settle within {START_TIMEOUT:?}:\n{}\n{v}",
        v.problems().join("\n")
    );
    v
}

/// (worker, epoch, addr) of each worker a head lists, in its order.
type Listed = Vec<(String, u64, String)>;

fn listed_by_rust(l: &ListWorkersResponse) -> Listed {
    l.workers
        .iter()
        .map(|w| (w.worker_id.clone(), w.epoch, w.worker_addr.clone()))
        .collect()
}

/// Parses `list`: a `head=ID workers=N` line, then one line per worker.
fn listed_by_python(lines: &[String]) -> (String, usize, Listed) {
    let (first, rest) = lines
        .split_first()
        .unwrap_or_else(|| panic!("`list` printed nothing"));
    let head = fields(first);
    let workers = rest
        .iter()
        .map(|line| {
            let f = fields(line);
            let get = |k: &str| {
                f.get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
            };
            let epoch = get("epoch")
                .parse()
                .unwrap_or_else(|e| panic!("epoch in {line:?}: {e}"));
            (get("worker"), epoch, get("addr"))
        })
        .collect();
    let count = head.get("workers").and_then(|n| n.parse().ok());
    (
        head.get("head").cloned().unwrap_or_default(),
        count.unwrap_or_else(|| panic!("no workers=N in {first:?}")),
        workers,
    )
}

/// The fields of `status` that stay put while nothing moves.
fn stable_status(s: &WorkerStatus) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("worker".into(), s.worker_id.clone()),
        ("head".into(), s.head_id.clone()),
        ("head_addr".into(), s.head_addr.clone()),
        ("epoch".into(), s.epoch.to_string()),
        ("attached".into(), s.attached.to_string()),
        ("reassignments".into(), s.reassignments.to_string()),
    ])
}

/// A `watch` running in the background; its output arrives line by line
/// on `lines`. Killed on drop if still running.
struct Watcher {
    child: Child,
    lines: mpsc::Receiver<Line>,
    /// Every line seen so far, for failure messages.
    seen: Vec<String>,
}

enum Line {
    Out(String),
    Err(String),
}

impl Watcher {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting python3: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx_err = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(Line::Out(line));
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx_err.send(Line::Err(line));
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the next line that `want` accepts; panics with everything
    /// seen if none comes within [`WATCH_TIMEOUT`].
    fn expect(&mut self, what: &str, want: impl Fn(&Line) -> bool) -> String {
        let deadline = Instant::now() + WATCH_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let text = match &line {
                        Line::Out(t) => t.clone(),
                        Line::Err(t) => format!("stderr: {t}"),
                    };
                    self.seen.push(text.clone());
                    if want(&line) {
                        return text;
                    }
                }
                Err(_) => panic!(
                    "`watch` printed no {what} within {WATCH_TIMEOUT:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit on its own; its stdout lines, all.
    fn finish(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WATCH_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "`watch` did not exit within {WATCH_TIMEOUT:?} after its last expected event; it printed:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // The readers end at EOF, which follows the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.seen.push(match line {
                Line::Out(t) => t,
                Line::Err(t) => format!("stderr: {t}"),
            });
        }
        assert!(
            status.success(),
            "`watch` exited with {status}; it printed:\n{}",
            self.seen.join("\n")
        );
        self.seen
            .iter()
            .filter(|l| !l.starts_with("stderr: "))
            .cloned()
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_lists_reports_and_watches_a_token_protected_cluster() {
    require_python();
    let scratch = Scratch::new();

    // The stubs generate from proto/ as shipped.
    let stubs = scratch.0.join("stubs");
    let generate = repo().join("examples/python/generate.py");
    let out = python(&[
        generate.to_str().expect("a UTF-8 path"),
        "--out",
        stubs.to_str().expect("a UTF-8 path"),
        "--proto-root",
        repo().join("proto").to_str().expect("a UTF-8 path"),
    ]);
    assert!(
        out.status.success(),
        "generate.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["tether_pb2.py", "tether_pb2_grpc.py", "tether_pb2.pyi"] {
        let path = stubs.join("tether/v1").join(file);
        assert!(
            path.is_file(),
            "generate.py did not write {}",
            path.display()
        );
    }

    // Two heads and three workers, every RPC but health behind the token.
    let token_file = scratch.0.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("writing the token file");
    let token_arg = token_file.to_str().expect("a UTF-8 path");
    // A 2 s heartbeat timeout: the test compares listings taken moments
    // apart, and a loaded machine's scheduling stall past 600 ms would
    // move a worker between them.
    let head_args = head_args(&["--heartbeat-timeout", "2s", "--auth-token-file", token_arg]);
    let worker_args = [WORKER_ARGS, &["--auth-token-file", token_arg]].concat();
    let mut cluster = cluster();
    for i in 0..2 {
        ok(cluster.spawn_head(&head_id(i), &head_args));
    }
    for h in cluster.heads() {
        ok(wait_serving(h.addr, HEAD_SERVICE, START_TIMEOUT).await);
    }
    for i in 0..3 {
        ok(cluster.spawn_worker(&worker_id(i), &worker_args));
    }
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    settled(&heads, &workers).await;

    // `list` prints what ListWorkers answers the Rust client. Each head is
    // asked by Rust before and after Python; if the two Rust answers
    // differ, the cluster moved in between and the comparison is retried.
    let mut listed_total = 0;
    for h in &heads {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let before = rust_listing(h.addr).await.expect("ListWorkers");
            let lines = client("list", h.addr, &stubs, &token_file);
            let after = rust_listing(h.addr).await.expect("ListWorkers");
            if before != after && attempts < 3 {
                continue;
            }
            let (head, count, by_python) = listed_by_python(&lines);
            assert_eq!(
                (head.as_str(), count),
                (h.id.as_str(), after.workers.len()),
                "`list {}` header; it printed:\n{}",
                h.addr,
                lines.join("\n")
            );
            assert_eq!(
                by_python,
                listed_by_rust(&after),
                "`list {}` (left) against ListWorkers in Rust (right); it printed:\n{}",
                h.addr,
                lines.join("\n")
            );
            listed_total += by_python.len();
            break;
        }
    }
    assert_eq!(
        listed_total,
        workers.len(),
        "the heads' `list` together name every worker once"
    );

    // `status` prints what Status answers the Rust client.
    for w in &workers {
        let lines = client("status", w.addr, &stubs, &token_file);
        let rust = rust_status(w.addr).await.expect("Status");
        let [line] = lines.as_slice() else {
            panic!(
                "`status {}` should print one line, printed:\n{}",
                w.addr,
                lines.join("\n")
            );
        };
        let printed = fields(line);
        let shown: BTreeMap<String, String> = stable_status(&rust)
            .into_keys()
            .map(|k| (k.clone(), printed.get(&k).cloned().unwrap_or_default()))
            .collect();
        assert_eq!(
            shown,
            stable_status(&rust),
            "`status {}` (left) against Status in Rust (right); it printed {line:?}",
            w.addr
        );
    }

    // Without the token the head refuses, and the client says why.
    let out = python(&[
        client_script().to_str().expect("a UTF-8 path"),
        "list",
        &heads[0].addr.to_string(),
        "--stubs",
        stubs.to_str().expect("a UTF-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && stderr.contains("UNAUTHENTICATED"),
        "`list` without --token-file should exit 1 with UNAUTHENTICATED, got {} and:\n{stderr}",
        out.status
    );

    // `watch --count 3` through head-0 sees a new worker attach, then
    // head-1 drain on SIGTERM, and exits by itself after three events.
    let (watched, victim) = (&heads[0], &heads[1]);
    let script = client_script();
    let target = watched.addr.to_string();
    let mut watcher = Watcher::start(&[
        script.to_str().expect("a UTF-8 path"),
        "watch",
        &target,
        "--count",
        "3",
        "--stubs",
        stubs.to_str().expect("a UTF-8 path"),
        "--token-file",
        token_arg,
    ]);
    // Events are not replayed: wait until the head has the watch.
    watcher.expect(
        "`watching` notice on stderr",
        |l| matches!(l, Line::Err(t) if t.starts_with("watching")),
    );

    let newcomer = worker_id(3);
    ok(cluster.spawn_worker(&newcomer, &worker_args));
    let newcomer_addr = cluster.process(&newcomer).expect("spawned").addr;
    let attached = watcher.expect("worker_attached event", |l| matches!(l, Line::Out(_)));
    let event = fields(&attached);
    let mut status = None;
    let up = wait_until(START_TIMEOUT, Duration::from_millis(50), async || {
        status = rust_status(newcomer_addr).await.ok();
        status.as_ref().is_some_and(|s| s.attached)
    })
    .await;
    let status = status.filter(|_| up).expect("the new worker attaches");
    assert_eq!(
        (
            event.get("kind").map(String::as_str),
            event.get("worker").map(String::as_str),
            event.get("head").map(String::as_str),
            event.get("epoch").cloned(),
        ),
        (
            Some("worker_attached"),
            Some(newcomer.as_str()),
            Some(status.head_id.as_str()),
            Some(status.epoch.to_string()),
        ),
        "first event after {newcomer} started: {attached:?}; its status: {status:?}"
    );

    ok(cluster.process_mut(&victim.id).expect("a head").terminate());
    let lines = watcher.finish();
    eprintln!("`watch --count 3` printed:\n{}", lines.join("\n"));
    assert_eq!(
        lines.len(),
        3,
        "`watch --count 3` printed:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().map(|l| fields(l)).any(|f| {
            f.get("kind").map(String::as_str) == Some("head_draining")
                && f.get("head") == Some(&victim.id)
        }),
        "no head_draining event for {} after SIGTERM; `watch` printed:\n{}",
        victim.id,
        lines.join("\n")
    );
}
