//! `tetherctl` against real clusters: `status` at thousands of workers on
//! one head (which needs `ListWorkers` in pages), and `watch` across the
//! death of the head it watches.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether::pb::{ListWorkersRequest, WorkerInfo};
use tether_testkit::localcluster::{
    head_client, run_to_exit, send_signal, wait_until, Probe, Signal,
};

const TETHERCTL: &str = env!("CARGO_BIN_EXE_tetherctl");

/// Workers on the one head of the paging test: well above the ~1,800
/// whose `ListWorkers` used to fit in 64 KiB. `TETHER_CTL_FLEET=20000`
/// runs it at the size the benchmarks hold (needs an open-file limit
/// above twice that: the fleet and the head share this machine).
fn fleet_size() -> usize {
    std::env::var("TETHER_CTL_FLEET")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000)
}

/// Runs `tetherctl --redis-url URL ARGS` to its end; its exit status must
/// be success. Returns its stdout.
fn tetherctl(redis_url: &str, args: &[&str]) -> String {
    let mut all = vec!["--redis-url", redis_url, "--timeout", "10s"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = ok(run_to_exit(
        Path::new(TETHERCTL),
        &all,
        Duration::from_secs(60),
    ));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tetherctl {args:?} failed ({}) after {:?}; stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("tetherctl {args:?}: {:?}", started.elapsed());
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_list_workers_page_through_5000_workers_on_one_head() {
    let size = fleet_size();
    // 45 s for 5,000 on a loaded machine; more for a larger fleet.
    let attach_within = Duration::from_secs(45 * size.div_ceil(5000) as u64);
    let mut cluster = cluster();
    // The dashboard's data at this size too (issue 15: summaries, workers
    // in bounded pages).
    let metrics = format!(
        "127.0.0.1:{}",
        ok(tether_testkit::localcluster::free_port())
    );
    // Slow beats: 5,000 streams of a debug build on a shared machine.
    let head = ok(cluster.spawn_head(
        "head-0",
        &[
            "--heartbeat-interval",
            "2s",
            "--heartbeat-timeout",
            "10s",
            "--lease-ttl",
            "5s",
            "--metrics-listen",
            &metrics,
        ],
    ))
    .addr;
    ok(tether_testkit::localcluster::wait_serving(head, HEAD_SERVICE, START_TIMEOUT).await);
    let url = cluster.redis().url();
    let started = Instant::now();
    // Up to 5,000: the library's attach loop, one connection each. Above
    // that, streams share connections (`MuxFleet`): the machine's
    // open-file limit (20,000 here) cannot hold one per worker on both
    // sides.
    enum Either {
        Own(Fleet),
        Shared(MuxFleet),
    }
    let fleet = if size <= 5000 {
        Either::Own(Fleet::start(&url, size))
    } else {
        Either::Shared(MuxFleet::start(head, size))
    };
    let attached = || match &fleet {
        Either::Own(f) => f.attached(),
        Either::Shared(f) => f.attached(),
    };
    let all_attached = wait_until(attach_within, Duration::from_millis(100), async || {
        attached() == size
    })
    .await;
    assert!(
        all_attached,
        "only {} of {size} workers attached within {attach_within:?}",
        attached()
    );
    eprintln!("{size} workers attached in {:?}", started.elapsed());

    // A client that predates paging: no page_size, no token. It gets the
    // first page of the default size, not OUT_OF_RANGE.
    let mut client = head_client(head);
    let first = client
        .list_workers(ListWorkersRequest::default())
        .await
        .unwrap_or_else(|s| panic!("ListWorkers without paging fields: {s:?}"))
        .into_inner();
    assert_eq!(first.workers.len(), 500, "the default page size is 500");
    assert_eq!(first.workers[0].worker_id, "w-00000");
    assert_eq!(first.next_page_token, first.workers[499].worker_id);

    // Paging with too large a page size: pages of at most 1,000, every
    // worker exactly once, in id order.
    let mut ids: Vec<String> = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_workers(ListWorkersRequest {
                page_size: 100_000,
                page_token: token.clone(),
            })
            .await
            .unwrap_or_else(|s| panic!("ListWorkers page {pages} after {token:?}: {s:?}"))
            .into_inner();
        pages += 1;
        assert!(
            page.workers.len() <= 1000,
            "a page of {}",
            page.workers.len()
        );
        ids.extend(
            page.workers
                .iter()
                .map(|w: &WorkerInfo| w.worker_id.clone()),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..size).map(|i| format!("w-{i:05}")).collect();
    assert!(
        ids == expected,
        "{pages} pages listed {} ids: {:?}...",
        ids.len(),
        &ids[..ids.len().min(5)]
    );
    assert_eq!(pages, size.div_ceil(1000));
    let refused = client
        .list_workers(ListWorkersRequest {
            page_size: 0,
            page_token: "x".repeat(200),
        })
        .await
        .expect_err("a 200-byte token is no worker id");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // The harness reads every page too.
    let listed = ok(Probe::new().list_workers(head).await);
    assert_eq!(listed.workers.len(), size);

    // `status` summarises: one line per head with its stream count and
    // beat ages, no line per worker.
    let status = tetherctl(&url, &["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("head-0 "))
        .unwrap_or_else(|| panic!("no line for head-0:\n{status}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[4], size.to_string(), "STREAMS of {line:?}");
    assert!(fields[5].ends_with('s'), "beat age p50 in {line:?}");
    assert!(
        status.lines().count() < 20 && status.contains("tetherctl status --workers HEAD"),
        "status should summarise {size} workers:\n{status}"
    );
    // `status --workers head-0` lists every one of them.
    let workers = tetherctl(&url, &["status", "--workers", "head-0"]);
    let listed: Vec<&str> = workers
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .strip_prefix("w-")
                .map(|_| l.split_whitespace().next().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        listed.len(),
        size,
        "worker lines of status --workers:\n{}",
        &workers[..workers.len().min(2000)]
    );
    assert!(workers.contains(&format!("head-0: {size} workers")));

    // The dashboard's JSON stays small: the heads summary, and workers in
    // pages of at most 500 whatever is asked.
    let started = Instant::now();
    let (cluster_json, cluster_bytes) = http_json(&metrics, "/api/cluster").await;
    let cluster_took = started.elapsed();
    let heads = cluster_json["heads"].as_array().expect("heads");
    assert_eq!(heads.len(), 1, "{cluster_json}");
    assert_eq!(
        heads[0]["load"].as_u64(),
        Some(size as u64),
        "{cluster_json}"
    );
    let started = Instant::now();
    let (page, page_bytes) = http_json(&metrics, "/api/workers?head=head-0&limit=100000").await;
    let page_took = started.elapsed();
    let listed = page["workers"].as_array().expect("workers").len();
    assert_eq!(listed, 500.min(size), "a dashboard page of {listed}");
    assert_eq!(
        page["next"].as_str().is_some_and(|n| !n.is_empty()),
        size > 500
    );
    eprintln!(
        "dashboard at {size} workers: /api/cluster {cluster_bytes} bytes in {cluster_took:?}; a page of {listed} workers {page_bytes} bytes in {page_took:?}"
    );
    drop(fleet);
}

/// `GET path` on the HTTP server at `addr`; the body as JSON, and its size.
async fn http_json(addr: &str, path: &str) -> (serde_json::Value, usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no full answer within 30 s"))
        .expect("answer read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    let value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body:.200}"));
    (value, body.len())
}

/// `n` workers `w-00000`... attached to the head at `addr` by hand
/// (`Reassign`, then a `Heartbeat` stream that beats every 2 s), 50
/// streams to a connection. Only for sizes where one connection per
/// worker would pass the open-file limit; the attach loop itself is
/// tested elsewhere. Stops when dropped.
struct MuxFleet {
    attached: Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl MuxFleet {
    fn start(addr: std::net::SocketAddr, n: usize) -> MuxFleet {
        use std::sync::atomic::Ordering;
        use tether::pb::{ReassignReason, ReassignRequest, WorkerBeat};
        let attached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(n);
        let mut client = head_client(addr);
        // At most 64 attaching at once, as a fleet that starts over time
        // would: 20,000 `Reassign`s at one instant only measure Redis's
        // queue.
        let attaching = Arc::new(tokio::sync::Semaphore::new(64));
        for i in 0..n {
            if i % 50 == 0 {
                client = head_client(addr);
            }
            let mut client = client.clone();
            let attached = attached.clone();
            let attaching = attaching.clone();
            tasks.push(tokio::spawn(async move {
                let Ok(permit) = attaching.acquire_owned().await else {
                    return;
                };
                let worker_id = format!("w-{i:05}");
                let answer = loop {
                    let request = ReassignRequest {
                        worker_id: worker_id.clone(),
                        reason: ReassignReason::Startup as i32,
                        instance: format!("mux-{i}"),
                        ..ReassignRequest::default()
                    };
                    match client.reassign(request).await {
                        Ok(a) => break a.into_inner(),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                let beat = |sequence| WorkerBeat {
                    worker_id: worker_id.clone(),
                    epoch: answer.epoch,
                    sequence,
                    load: None,
                    stream_secret: answer.stream_secret.clone(),
                    reassign: None,
                };
                let _ = tx.try_send(beat(0));
                let Ok(response) = client
                    .heartbeat(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                else {
                    return;
                };
                let mut inbound = response.into_inner();
                if !matches!(inbound.message().await, Ok(Some(_))) {
                    return;
                }
                attached.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                let mut sequence = 0;
                let mut ticks = tokio::time::interval(Duration::from_secs(2));
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {
                            sequence += 1;
                            let _ = tx.try_send(beat(sequence));
                        }
                        m = inbound.message() => if !matches!(m, Ok(Some(_))) { break },
                    }
                }
                attached.fetch_sub(1, Ordering::Relaxed);
            }));
        }
        MuxFleet { attached, tasks }
    }

    fn attached(&self) -> usize {
        self.attached.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for MuxFleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `tetherctl watch` running in the background; its output lines are
/// collected as they come. Killed when dropped.
struct Watcher {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Watcher {
    fn start(redis_url: &str) -> Watcher {
        let mut child = Command::new(TETHERCTL)
            .args(["--redis-url", redis_url, "watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tetherctl starts");
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Watcher {
            child,
            stdout,
            stderr,
        }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout().join("\n"),
            self.stderr().join("\n")
        )
    }

    /// Waits until some line (stdout or stderr) contains `text`; returns
    /// it.
    async fn wait_line(&mut self, text: &str, timeout: Duration) -> String {
        let mut found = None;
        wait_until(timeout, Duration::from_millis(20), async || {
            found = (self.stdout().into_iter())
                .chain(self.stderr())
                .find(|l| l.contains(text));
            found.is_some()
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "tetherctl watch printed no {text:?} within {timeout:?} (exit: {:?}); {}",
                self.child.try_wait(),
                self.output()
            )
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_the_failover_of_the_head_it_watches() {
    let mut cluster = start_cluster(3, 9).await;
    let mut watcher = Watcher::start(&cluster.redis().url());
    let line = watcher
        .wait_line("watching the cluster's events through head ", START_TIMEOUT)
        .await;
    let watched = line
        .split("through head ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a head id")
        .to_owned();
    // Give its standby stream (announced on stderr) time to open, so
    // that no event is lost. A watch without one goes on regardless.
    wait_until(START_TIMEOUT, Duration::from_millis(20), async || {
        watcher
            .stderr()
            .iter()
            .any(|l| l.contains("standby stream open"))
    })
    .await;
    let heads: Vec<Member> = cluster.heads().map(Member::from).collect();
    let workers: Vec<Member> = cluster.workers().map(Member::from).collect();
    let view = View::take(&mut Probe::new(), &heads, &workers).await;
    let moving = view.workers_of(&watched);
    assert!(!moving.is_empty(), "no worker on {watched}:\n{view}");

    let before = watcher.stdout().len();
    let killed_at = Instant::now();
    ok(cluster
        .process_mut(&watched)
        .expect("the watched head")
        .kill());
    let mut missing = moving.clone();
    let all_seen = wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        async || {
            let after = watcher.stdout().split_off(before);
            missing.retain(|w| {
                let moved = format!("worker {w} moved {watched} -> ");
                let attached = format!("worker {w} attached to ");
                !after.iter().any(|l| {
                    l.contains(&moved)
                        || (l.contains(&attached)
                            && !l.contains(&format!("attached to {watched} ")))
                })
            });
            missing.is_empty()
        },
    )
    .await;
    assert!(
        all_seen,
        "after SIGKILL of {watched}, tetherctl watch showed no move of {missing:?} within 20 s (exit: {:?}); {}",
        watcher.child.try_wait(),
        watcher.output()
    );
    eprintln!(
        "the moves of {} workers of {watched} showed {:?} after its SIGKILL; tetherctl watch {}",
        moving.len(),
        killed_at.elapsed(),
        watcher.output()
    );
    assert!(
        watcher.child.try_wait().expect("try_wait").is_none(),
        "tetherctl watch exited; {}",
        watcher.output()
    );
    // It goes on until Ctrl-C, and then exits 0.
    ok(send_signal(watcher.child.id(), Signal::Int));
    let mut exit = None;
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            exit = watcher.child.try_wait().expect("try_wait");
            exit.is_some()
        },
    )
    .await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "tetherctl watch after SIGINT: {exit:?}; {}",
        watcher.output()
    );
}

/// The first run of exactly 13 digits in `text`: a raw Unix millisecond
/// time, which people cannot read. (Epochs have 16.)
fn unix_ms_in(text: &str) -> Option<&str> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|run| run.len() == 13)
}

/// Whether `text` holds a UTC RFC 3339 date to the millisecond, such as
/// `2025-01-02T12:03:04.512Z`.
fn has_date(text: &str) -> bool {
    text.split_whitespace().any(|word| {
        let b = word.as_bytes();
        b.len() == 24
            && b[4] == b'-'
            && b[7] == b'-'
            && b[10] == b'T'
            && b[13] == b':'
            && b[16] == b':'
            && b[19] == b'.'
            && b[23] == b'Z'
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tetherctl_prints_dates_and_ages_not_unix_milliseconds() {
    let cluster = start_cluster(1, 2).await;
    let url = cluster.redis().url();
    let mut watcher = Watcher::start(&url);
    watcher
        .wait_line("watching the cluster's events through head ", START_TIMEOUT)
        .await;

    for args in [&["status"][..], &["status", "--workers", "head-0"]] {
        let out = tetherctl(&url, args);
        assert!(unix_ms_in(&out).is_none(), "tetherctl {args:?}:\n{out}");
        assert!(
            has_date(&out),
            "no attach date in tetherctl {args:?}:\n{out}"
        );
        let worker = out
            .lines()
            .find(|l| l.trim_start().starts_with("worker-00 "))
            .unwrap_or_else(|| panic!("no line for worker-00 in {args:?}:\n{out}"));
        assert!(worker.ends_with(" ago"), "last beat of {worker:?}");
        let head = out
            .lines()
            .find(|l| l.starts_with("head-0 "))
            .unwrap_or_else(|| panic!("no line for head-0:\n{out}"));
        let p50 = head.split_whitespace().nth(5).unwrap_or("");
        assert!(
            p50.ends_with("ms") || p50.ends_with('s'),
            "beat age p50 {p50:?} of {head:?}"
        );
    }

    let drained = tetherctl(&url, &["drain", "head-0"]);
    assert!(
        unix_ms_in(&drained).is_none(),
        "tetherctl drain:\n{drained}"
    );
    assert!(
        drained.contains("at the latest at ") && has_date(&drained),
        "tetherctl drain:\n{drained}"
    );

    let line = watcher
        .wait_line("head head-0 is draining", START_TIMEOUT)
        .await;
    assert!(has_date(&line), "watch line {line:?}");
    let out = watcher.stdout().join("\n");
    assert!(unix_ms_in(&out).is_none(), "tetherctl watch:\n{out}");
    assert!(
        watcher.stdout().iter().all(|l| has_date(l)),
        "every watch line starts with its date:\n{out}"
    );
}

#[test]
fn tetherctl_names_a_missing_head_id_and_log_format_values() {
    let out = ok(run_to_exit(
        Path::new(TETHERCTL),
        &["drain"],
        Duration::from_secs(20),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HEAD_ID"), "tetherctl drain: {stderr}");

    let head = env!("CARGO_BIN_EXE_tether-head");
    let out = ok(run_to_exit(
        Path::new(head),
        &["--log-format", "xml"],
        Duration::from_secs(20),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("text") && stderr.contains("json"),
        "tether-head --log-format xml: {stderr}"
    );
    let out = ok(run_to_exit(
        Path::new(head),
        &["-h"],
        Duration::from_secs(20),
    ));
    let help = String::from_utf8_lossy(&out.stdout);
    let entry: String = help
        .lines()
        .skip_while(|l| !l.contains("--log-format"))
        .take(2)
        .collect();
    assert!(
        entry.contains("possible values: text, json"),
        "tether-head -h: {entry:?}"
    );
}
