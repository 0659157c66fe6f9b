//! The registry on the two replicated Redis topologies, with real
//! processes: Redis Cluster (three masters; `--redis-url` is a
//! comma-separated list of nodes) and Sentinel (a master, a replica and a
//! sentinel; `--redis-url redis+sentinel://HOST:PORT/mymaster`).
//!
//! On Cluster every key lands on the one node that owns the `{tether}`
//! slot, membership events cross the cluster bus, and a crashed head's
//! workers move as they do on a single server. Under Sentinel a master
//! failover, whether the master crashes or is demoted on purpose, moves no
//! worker and loses no assignment the heads hold.
//!
//! `localcluster::Cluster` is built around one plain `redis-server` and
//! always passes that server's URL (clap refuses a second `--redis-url`),
//! so this file starts its Redis processes, heads and workers itself; it
//! reuses the harness's ports and probes and `common`'s cluster view.

mod common;

use common::{
    assigned_key, assignment_epoch, binaries, ok, settle, Member, View, HEAD_SERVICE, WORKER_ARGS,
};
use std::fs::File;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether::pb::{ClusterEvent, EventKind, WatchEventsRequest, WorkerStatus};
use tether_testkit::localcluster::{
    self, free_port, head_client, wait_serving, wait_until, Probe, Reply, REDIS_MISSING,
    SPAWN_TIMEOUT,
};
use tokio::sync::mpsc;
use tonic_health::pb::health_check_response::ServingStatus;

/// Head timings: beats every 200 ms, a silent peer is gone after 800 ms,
/// a crashed head leaves the registry after 1 s.
const HEAD_TIMINGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "800ms",
    "--lease-ttl",
    "1s",
    "--shutdown-timeout",
    "2s",
];

/// The name Sentinel monitors the master under.
const MASTER_NAME: &str = "mymaster";

/// Bound on a process starting or a cluster settling: a debug build on a
/// loaded two-core machine can be slow.
const START_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------

/// One test's working directory: Redis data and configuration, and every
/// process's log. Removed at the end, kept (and its path printed) when
/// the test fails, because the logs are the evidence.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(label: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tether-topologies-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        Self { dir }
    }

    /// A subdirectory, created.
    fn sub(&self, name: &str) -> PathBuf {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("redis_topologies: logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A process this file started, with its stdout and stderr in one log
/// file. Killed with SIGKILL and reaped when dropped, so nothing outlives
/// the test.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args` in `dir`, logging to `dir/NAME.log`.
    /// `TETHER_*` variables of this process are not passed on, so the
    /// caller's environment cannot change a child's configuration.
    fn start(name: &str, program: &Path, args: &[String], dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("creating {log:?}: {e}"));
        let err = out.try_clone().expect("duplicating a file handle");
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TETHER_") {
                command.env_remove(key);
            }
        }
        let child = command
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Self {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The last `n` lines of its log.
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as in a crash, and reap.
    fn kill(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one command to the Redis on `port` over a fresh connection and
/// reads the reply (the harness's blocking `redis` crate client), for
/// looking at what Tether wrote on each node.
fn redis_command(port: u16, args: &[&str]) -> Result<Reply, String> {
    localcluster::redis_command(port, args).map_err(|e| e.to_string())
}

/// A `redis-server` (plain, cluster node or sentinel) this file started.
struct RedisNode {
    port: u16,
    proc: Proc,
}

impl RedisNode {
    /// Starts `redis-server ARGS` on `port` in its own directory under
    /// `scratch` and waits until it answers PING.
    fn start(scratch: &Scratch, name: &str, port: u16, args: Vec<String>) -> Self {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("{REDIS_MISSING}");
        }
        let dir = scratch.sub(name);
        let mut proc = Proc::start(name, Path::new("redis-server"), &args, &dir);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(redis_command(port, &["PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
            if proc.has_exited() || Instant::now() >= deadline {
                panic!(
                    "{name} did not answer PING on port {port}; its log ends with:\n{}",
                    proc.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, proc }
    }

    /// A data node without persistence, with `extra` settings.
    fn data(scratch: &Scratch, name: &str, extra: &[&str]) -> Self {
        let port = ok(free_port());
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start(scratch, name, port, args)
    }

    /// A sentinel monitoring the master on `master_port`, quick to act:
    /// the master counts as down after 1 s of silence.
    fn sentinel(scratch: &Scratch, name: &str, master_port: u16) -> Self {
        let port = ok(free_port());
        let dir = scratch.sub(name);
        // Sentinel rewrites its configuration file: it must be writable.
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 3000\n",
            dir = dir.display()
        );
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("writing {conf:?}: {e}"));
        let args = vec![conf.display().to_string(), "--sentinel".to_owned()];
        Self::start(scratch, name, port, args)
    }

    /// One command; a failed connection is an error.
    fn try_cmd(&self, args: &[&str]) -> Result<Reply, String> {
        redis_command(self.port, args)
    }

    /// One command; panics if the connection fails.
    fn cmd(&self, args: &[&str]) -> Reply {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("{} {args:?}: {e}", self.proc.name))
    }

    /// One command whose reply is a string (status or bulk).
    fn text(&self, args: &[&str]) -> String {
        text_of(&self.cmd(args))
    }

    /// How many clients subscribe to `channel` here (`PUBSUB NUMSUB`).
    fn subscribers(&self, channel: &str) -> Option<i64> {
        match self.cmd(&["PUBSUB", "NUMSUB", channel]) {
            Reply::Array(Some(r)) => match r.get(1) {
                Some(Reply::Integer(n)) => Some(*n),
                _ => None,
            },
            _ => None,
        }
    }

    /// One command whose reply is an integer.
    fn int(&self, args: &[&str]) -> i64 {
        match self.cmd(args) {
            Reply::Integer(n) => n,
            other => panic!("{} {args:?} answered {other:?}", self.proc.name),
        }
    }
}

/// A status or bulk reply as text; anything else in its debug form.
fn text_of(reply: &Reply) -> String {
    match reply {
        Reply::Simple(s) => s.clone(),
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

/// A `tether-head` or `tether-worker` this file started.
struct Tether {
    member: Member,
    proc: Proc,
}

/// Starts a head or worker with `--id`, `--listen` on a free port,
/// `--redis-url url` and `extra`, and waits until it accepts connections.
/// A port taken between the pick and the bind is picked again.
fn spawn_tether(scratch: &Scratch, program: &Path, id: &str, url: &str, extra: &[&str]) -> Tether {
    let dir = scratch.sub("tether");
    for _attempt in 0..5 {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ok(free_port())));
        let mut args: Vec<String> = vec![
            "--id".into(),
            id.into(),
            "--listen".into(),
            addr.to_string(),
            "--redis-url".into(),
            url.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::start(id, program, &args, &dir);
        let deadline = Instant::now() + SPAWN_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Tether {
                    member: Member {
                        id: id.to_owned(),
                        addr,
                    },
                    proc,
                };
            }
            if proc.has_exited() {
                let tail = proc.log_tail(20);
                if tail.contains("Address already in use") {
                    break;
                }
                panic!("{id} exited instead of listening on {addr}; its log ends with:\n{tail}");
            }
            if Instant::now() >= deadline {
                panic!(
                    "{id} did not listen on {addr} within {SPAWN_TIMEOUT:?}; its log ends with:\n{}",
                    proc.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("{id}: every port tried was taken");
}

/// Starts `n` heads `head-0`... on `url` and waits until each is ready.
async fn start_heads(scratch: &Scratch, url: &str, n: usize, extra: &[&str]) -> Vec<Tether> {
    let mut args = HEAD_TIMINGS.to_vec();
    args.extend_from_slice(extra);
    let heads: Vec<Tether> = (0..n)
        .map(|i| spawn_tether(scratch, &binaries().head, &format!("head-{i}"), url, &args))
        .collect();
    for h in &heads {
        if let Err(e) = wait_serving(h.member.addr, HEAD_SERVICE, START_TIMEOUT).await {
            panic!("{e}\nlog of {}:\n{}", h.member.id, h.proc.log_tail(30));
        }
    }
    heads
}

/// Starts a worker on `url`.
fn start_worker(scratch: &Scratch, url: &str, id: &str) -> Tether {
    spawn_tether(scratch, &binaries().worker, id, url, WORKER_ARGS)
}

fn members(processes: &[Tether]) -> Vec<Member> {
    processes.iter().map(|p| p.member.clone()).collect()
}

/// The last lines of every given process's log, for failure messages.
fn logs(processes: &[&Tether]) -> String {
    processes
        .iter()
        .map(|p| format!("--- {} ---\n{}\n", p.member.id, p.proc.log_tail(15)))
        .collect()
}

// ---------------------------------------------------------------------
// Membership events
// ---------------------------------------------------------------------

/// The events one head streams from `WatchEvents`, read on a task of
/// their own so none is missed while the test does something else.
struct Watcher {
    rx: mpsc::UnboundedReceiver<ClusterEvent>,
    seen: Vec<ClusterEvent>,
}

impl Watcher {
    /// Opens `WatchEvents` on the head at `addr`. Once this returns the
    /// head has subscribed the watcher: every later event reaches it.
    async fn open(addr: SocketAddr) -> Self {
        let mut client = head_client(addr);
        let call = client.watch_events(WatchEventsRequest {});
        let mut stream = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .unwrap_or_else(|_| panic!("WatchEvents at {addr}: no answer within 5s"))
            .unwrap_or_else(|e| panic!("WatchEvents at {addr}: {e}"))
            .into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Self {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` until `done` holds for the events seen so far.
    async fn wait_for(
        &mut self,
        timeout: Duration,
        done: impl Fn(&[ClusterEvent]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.seen) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(event)) => self.seen.push(event),
                Ok(None) | Err(_) => return done(&self.seen),
            }
        }
    }

    /// The events seen, one a line.
    fn describe(&self) -> String {
        self.seen
            .iter()
            .map(|e| {
                let kind = EventKind::try_from(e.kind).unwrap_or(EventKind::Unspecified);
                format!(
                    "  {kind:?} head={} worker={} epoch={} previous={} detail={}\n",
                    e.head_id, e.worker_id, e.epoch, e.previous_head_id, e.detail
                )
            })
            .collect()
    }
}

// ---------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------

/// Three cluster masters, created with `redis-cli --cluster create`, each
/// node on its own bus port (the default, port + 10000, may be taken).
fn start_redis_cluster(scratch: &Scratch) -> Vec<RedisNode> {
    let nodes: Vec<RedisNode> = (0..3)
        .map(|i| {
            let bus = ok(free_port()).to_string();
            RedisNode::data(
                scratch,
                &format!("node-{i}"),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus,
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
        })
        .collect();
    let mut create = Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for n in &nodes {
        create.arg(format!("127.0.0.1:{}", n.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("running redis-cli: {e}; install it with `sudo apt-get install -y redis-tools`")
        });
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        loop {
            let info = n.text(&["CLUSTER", "INFO"]);
            if info.contains("cluster_state:ok") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} is not cluster_state:ok after 10s:\n{info}",
                n.proc.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nodes
}

/// The port of the master that serves `slot`, from `CLUSTER SLOTS`.
fn slot_owner(node: &RedisNode, slot: i64) -> u16 {
    let reply = node.cmd(&["CLUSTER", "SLOTS"]);
    if let Reply::Array(Some(ranges)) = &reply {
        for range in ranges {
            if let Reply::Array(Some(items)) = range {
                if let [Reply::Integer(first), Reply::Integer(last), Reply::Array(Some(master)), ..] =
                    items.as_slice()
                {
                    if (*first..=*last).contains(&slot) {
                        if let Some(Reply::Integer(port)) = master.get(1) {
                            return *port as u16;
                        }
                    }
                }
            }
        }
    }
    panic!("no master for slot {slot} in CLUSTER SLOTS: {reply:?}");
}

/// Each node's DBSIZE, as `(port, keys)`.
fn dbsizes(nodes: &[RedisNode]) -> Vec<(u16, i64)> {
    nodes.iter().map(|n| (n.port, n.int(&["DBSIZE"]))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_keeps_keys_on_one_node_carries_events_and_moves_a_dead_heads_workers() {
    let scratch = Scratch::new("cluster");
    let nodes = start_redis_cluster(&scratch);
    let slot = nodes[0].int(&["CLUSTER", "KEYSLOT", "{tether}"]);
    let owner = slot_owner(&nodes[0], slot);
    // A node that does not own the slot comes first in the URL: the heads
    // hold their event subscription there, while PUBLISH goes to the
    // owner, so an event that arrives has crossed the cluster bus.
    let mut order: Vec<u16> = nodes.iter().map(|n| n.port).collect();
    order.sort_by_key(|p| *p == owner);
    let url = order
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");

    let mut heads = start_heads(&scratch, &url, 2, &[]).await;
    let workers: Vec<Tether> = (0..6)
        .map(|i| start_worker(&scratch, &url, &format!("worker-{i:02}")))
        .collect();
    let mut probe = Probe::new();
    let before = settle(
        &mut probe,
        &members(&heads),
        &members(&workers),
        START_TIMEOUT,
    )
    .await;

    // Every key of the namespace sits on the node that owns its slot.
    let sizes = dbsizes(&nodes);
    let holding: Vec<u16> = sizes
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        holding,
        vec![owner],
        "DBSIZE per node (port, keys): {sizes:?}; slot {slot} of {{tether}} belongs to {owner}"
    );
    let on_owner = nodes
        .iter()
        .find(|n| n.port == owner)
        .expect("the owner is one of the nodes");
    for w in &workers {
        let status = before.status(&w.member.id).expect("settled");
        let key = assigned_key(&status.head_id);
        let value = on_owner.text(&["HGET", &key, &w.member.id]);
        assert_eq!(
            assignment_epoch(value.as_bytes()),
            Some(status.epoch),
            "{} in {key} on the owner: {value:?}; the worker says {status:?}",
            w.member.id
        );
    }

    // The head with more workers crashes.
    let (victim, survivor) = {
        let n0 = before.workers_of("head-0").len();
        let n1 = before.workers_of("head-1").len();
        if n0 >= n1 {
            (0, 1)
        } else {
            (1, 0)
        }
    };
    let victim_id = heads[victim].member.id.clone();
    let survivor_id = heads[survivor].member.id.clone();
    let moving = before.workers_of(&victim_id);
    assert!(!moving.is_empty(), "{victim_id} holds no worker:\n{before}");
    let mut watcher = Watcher::open(heads[survivor].member.addr).await;

    heads[victim].proc.kill();
    let killed = Instant::now();
    let mut last = String::new();
    let moved = wait_until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        async || {
            let mut all = true;
            last.clear();
            for w in workers.iter().filter(|w| moving.contains(&w.member.id)) {
                let old = before.status(&w.member.id).expect("settled");
                let now = probe.worker_status(w.member.addr).await;
                let done = now
                    .as_ref()
                    .is_ok_and(|s| s.attached && s.head_id == survivor_id && s.epoch > old.epoch);
                all &= done;
                last.push_str(&format!(
                    "  {}: before epoch {} now {now:?}\n",
                    w.member.id, old.epoch
                ));
            }
            all
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        moved,
        "{victim_id}'s workers were not all on {survivor_id} under a higher epoch within 2s of the crash:\n{last}{}",
        logs(&workers.iter().collect::<Vec<_>>())
    );
    eprintln!(
        "redis cluster: {} workers of the crashed head re-attached in {took:?}",
        moving.len()
    );
    let survivors = vec![heads[survivor].member.clone()];
    let after = settle(
        &mut probe,
        &survivors,
        &members(&workers),
        Duration::from_secs(5),
    )
    .await;

    // Every move came back through Redis pub/sub as an event.
    let expected: Vec<(String, u64)> = moving
        .iter()
        .map(|w| (w.clone(), after.status(w).expect("settled").epoch))
        .collect();
    let heard = watcher
        .wait_for(Duration::from_secs(5), |seen| {
            expected.iter().all(|(w, epoch)| {
                seen.iter().any(|e| {
                    e.kind == EventKind::WorkerMoved as i32
                        && e.worker_id == *w
                        && e.epoch == *epoch
                        && e.head_id == survivor_id
                        && e.previous_head_id == victim_id
                })
            })
        })
        .await;
    assert!(
        heard,
        "WatchEvents on {survivor_id} should report every move {expected:?} from {victim_id}; it delivered:\n{}",
        watcher.describe()
    );

    // Still one node.
    let sizes = dbsizes(&nodes);
    let holding: Vec<u16> = sizes
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(
        holding,
        vec![owner],
        "DBSIZE per node after the failover: {sizes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_events_flow_while_the_first_listed_node_is_down() {
    // Several nodes are listed so that any one of them may be down: here
    // the first one never answers. The registry works through the others;
    // membership events must too.
    let scratch = Scratch::new("cluster-seed");
    let nodes = start_redis_cluster(&scratch);
    let dead = ok(free_port());
    let url = std::iter::once(dead)
        .chain(nodes.iter().map(|n| n.port))
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let heads = start_heads(&scratch, &url, 1, &[]).await;
    let mut workers = vec![start_worker(&scratch, &url, "worker-00")];
    let mut probe = Probe::new();
    settle(
        &mut probe,
        &members(&heads),
        &members(&workers),
        START_TIMEOUT,
    )
    .await;

    let mut watcher = Watcher::open(heads[0].member.addr).await;
    workers.push(start_worker(&scratch, &url, "worker-01"));
    let view = settle(
        &mut probe,
        &members(&heads),
        &members(&workers),
        START_TIMEOUT,
    )
    .await;
    let epoch = view.status("worker-01").expect("settled").epoch;
    let heard = watcher
        .wait_for(Duration::from_secs(5), |seen| {
            seen.iter().any(|e| {
                e.kind == EventKind::WorkerAttached as i32
                    && e.worker_id == "worker-01"
                    && e.epoch == epoch
            })
        })
        .await;
    let channel = "{tether}:events";
    let subscribers: Vec<(u16, Option<i64>)> = nodes
        .iter()
        .map(|n| (n.port, n.subscribers(channel)))
        .collect();
    assert!(
        heard,
        "with 127.0.0.1:{dead} (down) listed first, WatchEvents on head-0 did not report worker-01 attaching at epoch {epoch}; it delivered:\n{}PUBSUB NUMSUB {channel} per node (port, count): {subscribers:?}",
        watcher.describe()
    );
}

// ---------------------------------------------------------------------
// Sentinel
// ---------------------------------------------------------------------

/// How the master goes away.
#[derive(Debug, Clone, Copy)]
enum Failover {
    /// SIGKILL: the master crashes; Sentinel notices after 1 s and
    /// promotes the replica. Heads cannot reach Redis meanwhile.
    Crash,
    /// `SENTINEL FAILOVER`: the replica is promoted and the old master,
    /// still running, is turned into a replica of it.
    Demote,
}

/// A master, a replica of it, and one sentinel watching them.
struct SentinelSet {
    master: RedisNode,
    replica: RedisNode,
    sentinel: RedisNode,
}

impl SentinelSet {
    fn start(scratch: &Scratch) -> Self {
        let master = RedisNode::data(scratch, "master", &[]);
        let replica = RedisNode::data(
            scratch,
            "replica",
            &["--replicaof", "127.0.0.1", &master.port.to_string()],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = replica.text(&["INFO", "replication"]);
            if info.contains("master_link_status:up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not sync within 10s:\n{info}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let sentinel = RedisNode::sentinel(scratch, "sentinel", master.port);
        // Sentinel must know the replica before it can promote it.
        loop {
            let replicas = sentinel.cmd(&["SENTINEL", "REPLICAS", MASTER_NAME]);
            if matches!(&replicas, Reply::Array(Some(r)) if !r.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel found no replica within 10s: {replicas:?}\n{}",
                sentinel.proc.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            master,
            replica,
            sentinel,
        }
    }

    fn url(&self) -> String {
        format!(
            "redis+sentinel://127.0.0.1:{}/{MASTER_NAME}",
            self.sentinel.port
        )
    }

    /// The master's port as the sentinel reports it.
    fn master_port(&self) -> Option<u16> {
        match self
            .sentinel
            .cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME])
        {
            Reply::Array(Some(addr)) => addr.get(1).and_then(|p| text_of(p).parse().ok()),
            _ => None,
        }
    }

    /// True once the sentinel names the replica as master and the replica
    /// agrees.
    fn promoted(&self) -> bool {
        self.master_port() == Some(self.replica.port)
            && matches!(self.replica.try_cmd(&["ROLE"]),
                Ok(Reply::Array(Some(r))) if r.first().map(text_of).as_deref() == Some("master"))
    }
}

/// What `node` records for `worker`, against what the worker says: empty
/// when the assignment hash names the worker's head and epoch and the
/// head's worker set holds it.
fn assignment_problem(node: &RedisNode, worker: &str, status: &WorkerStatus) -> Option<String> {
    let key = assigned_key(&status.head_id);
    let value = match node.try_cmd(&["HGET", &key, worker]) {
        Ok(Reply::Bulk(Some(v))) => v,
        other => return Some(format!("{worker}: HGET {key} answered {other:?}")),
    };
    if assignment_epoch(&value) != Some(status.epoch) {
        return Some(format!(
            "{worker}: {key} holds {:?}, the worker says epoch {}",
            String::from_utf8_lossy(&value),
            status.epoch
        ));
    }
    None
}

/// Everything that keeps `node` from being the registry the cluster works
/// in: a head not SERVING, a head's lease missing on `node`, a worker
/// whose assignment `node` does not record where the worker is.
async fn registry_problems(
    probe: &mut Probe,
    node: &RedisNode,
    heads: &[Tether],
    workers: &[Tether],
    view: &View,
) -> Vec<String> {
    let mut problems = Vec::new();
    for h in heads {
        let id = &h.member.id;
        let ready = probe.health(h.member.addr, HEAD_SERVICE).await;
        if !matches!(ready, Ok(ServingStatus::Serving)) {
            problems.push(format!("{id} readiness {ready:?}"));
        }
        let lease = format!("{{tether}}:head:{id}");
        let ttl = node.try_cmd(&["PTTL", &lease]);
        if !matches!(ttl, Ok(Reply::Integer(ms)) if ms > 0) {
            problems.push(format!("PTTL {lease} answered {ttl:?}"));
        }
    }
    for w in workers {
        match view.status(&w.member.id) {
            Some(status) => problems.extend(assignment_problem(node, &w.member.id, status)),
            None => problems.push(format!("{} did not answer Status", w.member.id)),
        }
    }
    problems
}

/// The worker's head, epoch, moves and attachment, unchanged from
/// `before`? Describes the change if not.
fn moved(worker: &str, before: &View, now: &View) -> Option<String> {
    let b = before.status(worker)?;
    match now.status(worker) {
        Some(n)
            if n.attached
                && n.head_id == b.head_id
                && n.epoch == b.epoch
                && n.reassignments == b.reassignments =>
        {
            None
        }
        Some(n) => Some(format!(
            "{worker}: before head={} epoch={} moves={}, now head={} epoch={} moves={} attached={}",
            b.head_id, b.epoch, b.reassignments, n.head_id, n.epoch, n.reassignments, n.attached
        )),
        None => Some(format!("{worker} did not answer Status")),
    }
}

/// What the old master says, if it still answers: its role and the TTL of
/// each head's lease there. Shows where the heads write.
fn old_master_view(set: &SentinelSet, heads: &[Tether]) -> String {
    let role = match set.master.try_cmd(&["ROLE"]) {
        Ok(Reply::Array(Some(r))) => r.first().map(text_of).unwrap_or_default(),
        Ok(other) => format!("{other:?}"),
        Err(e) => return format!("old master: {e}"),
    };
    let leases: Vec<String> = heads
        .iter()
        .map(|h| {
            let key = format!("{{tether}}:head:{}", h.member.id);
            format!("PTTL {key} = {:?}", set.master.try_cmd(&["PTTL", &key]))
        })
        .collect();
    format!(
        "old master (port {}): role {role}; {leases:?}",
        set.master.port
    )
}

/// Runs the Sentinel scenario with the given failover.
async fn sentinel_failover_keeps_every_assignment(how: Failover) {
    let scratch = Scratch::new(&format!("sentinel-{how:?}"));
    let mut set = SentinelSet::start(&scratch);
    let url = set.url();
    // Rebalancing is put off beyond the test: a worker that attached to
    // its second choice would otherwise be redirected after the default
    // 10 s cool-down, and this test must see no move at all.
    let heads = start_heads(&scratch, &url, 2, &["--rebalance-cooldown", "60s"]).await;
    let mut workers: Vec<Tether> = (0..4)
        .map(|i| start_worker(&scratch, &url, &format!("worker-{i:02}")))
        .collect();
    let mut probe = Probe::new();
    let before = settle(
        &mut probe,
        &members(&heads),
        &members(&workers),
        START_TIMEOUT,
    )
    .await;
    let problems = registry_problems(&mut probe, &set.master, &heads, &workers, &before).await;
    assert!(
        problems.is_empty(),
        "before the failover, on the master: {problems:?}\n{before}"
    );

    // A head subscribes to events only while someone watches it.
    let [watcher, _other] = [
        Watcher::open(heads[0].member.addr).await,
        Watcher::open(heads[1].member.addr).await,
    ];

    match how {
        Failover::Crash => set.master.proc.kill(),
        Failover::Demote => {
            // The sentinel may not have heard from the replica recently
            // enough yet (NOGOODSLAVE): ask again for a while.
            let mut answer = String::new();
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(10) {
                // The redis crate returns the refusal as an error, not
                // as a reply: both mean "ask again".
                answer = match set.sentinel.try_cmd(&["SENTINEL", "FAILOVER", MASTER_NAME]) {
                    Ok(reply) => text_of(&reply),
                    Err(e) => e,
                };
                if !answer.contains("NOGOODSLAVE") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert_eq!(answer, "OK", "SENTINEL FAILOVER");
        }
    }
    let started = Instant::now();
    let all = || heads.iter().chain(&workers).collect::<Vec<_>>();

    // No worker moves, from the failover to the end of the hold below. The
    // replica must be promoted within 20 s; within 5 s (five lease TTLs)
    // of that, the heads must be SERVING with their leases and every
    // worker's assignment on the new master; and that must then hold for
    // 3 s, so a registry that only looks right until the replicated TTLs
    // run out does not pass.
    let hold = Duration::from_secs(3);
    let mut promoted_after = None;
    let mut recovered_after: Option<Duration> = None;
    loop {
        let view = View::take(&mut probe, &members(&heads), &members(&workers)).await;
        let moves: Vec<String> = workers
            .iter()
            .filter_map(|w| moved(&w.member.id, &before, &view))
            .collect();
        assert!(
            moves.is_empty(),
            "{how:?} failover, {:?} in: workers moved: {moves:?}\n{view}\n{}",
            started.elapsed(),
            logs(&all())
        );
        if promoted_after.is_none() && set.promoted() {
            promoted_after = Some(started.elapsed());
        }
        let Some(promoted) = promoted_after else {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{how:?}: the sentinel did not promote the replica within 20s; it names port {:?}\n{}",
                set.master_port(),
                set.sentinel.proc.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let problems = registry_problems(&mut probe, &set.replica, &heads, &workers, &view).await;
        // Right after the promotion the new master still holds what it
        // replicated, with TTLs running out; the heads find the new master
        // within a master check (250 ms) and a lease interval. Only count
        // the registry as recovered once a whole lease TTL has passed since
        // the promotion, so what is seen then was written there by the
        // heads. In between, a lease may lapse briefly: no worker moves
        // (checked above) and the heads reclaim their workers.
        match recovered_after {
            None if problems.is_empty() && started.elapsed() > promoted + Duration::from_secs(1) => {
                recovered_after = Some(started.elapsed())
            }
            None => assert!(
                started.elapsed() < promoted + Duration::from_secs(5),
                "{how:?}: replica promoted after {promoted:?}, but 5s later the new master is not the registry the heads work in: {problems:?}\n{}\n{}",
                old_master_view(&set, &heads),
                logs(&heads.iter().collect::<Vec<_>>())
            ),
            Some(recovered) => {
                assert!(
                    problems.is_empty(),
                    "{how:?}: replica promoted after {promoted:?}, the new master held everything after {recovered:?}, but at {:?}: {problems:?}\n{}\n{}",
                    started.elapsed(),
                    old_master_view(&set, &heads),
                    logs(&heads.iter().collect::<Vec<_>>())
                );
                if started.elapsed() > recovered + hold {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "sentinel {how:?}: replica promoted after {:?}; heads SERVING with every lease and assignment on the new master after {:?}, and still {hold:?} later",
        promoted_after.unwrap_or_default(),
        recovered_after.unwrap_or_default(),
    );

    // Events flow again: both heads, watched, subscribe on the new master.
    let channel = "{tether}:events";
    let mut subscribers = None;
    let resubscribed = wait_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        async || {
            subscribers = set.replica.subscribers(channel);
            subscribers == Some(2)
        },
    )
    .await;
    assert!(
        resubscribed,
        "{how:?}: PUBSUB NUMSUB {channel} on the new master: {subscribers:?} (want both heads)\n{}\n{}",
        old_master_view(&set, &heads),
        logs(&heads.iter().collect::<Vec<_>>())
    );

    // A worker started after the failover finds a head through the
    // sentinel, attaches, and its attachment is announced (to the watcher
    // opened before the failover).
    let mut watcher = watcher;
    workers.push(start_worker(&scratch, &url, "worker-new"));
    let after = settle(
        &mut probe,
        &members(&heads),
        &members(&workers),
        Duration::from_secs(5),
    )
    .await;
    let new = after.status("worker-new").expect("settled");
    if let Some(p) = assignment_problem(&set.replica, "worker-new", new) {
        panic!("{how:?}: on the new master: {p}\n{after}");
    }
    let heard = watcher
        .wait_for(Duration::from_secs(5), |seen| {
            seen.iter().any(|e| {
                e.kind == EventKind::WorkerAttached as i32
                    && e.worker_id == "worker-new"
                    && e.epoch == new.epoch
            })
        })
        .await;
    assert!(
        heard,
        "{how:?}: WatchEvents on head-0 did not report worker-new attaching at epoch {}; it delivered:\n{}",
        new.epoch,
        watcher.describe()
    );
    let moves: Vec<String> = workers
        .iter()
        .filter_map(|w| moved(&w.member.id, &before, &after))
        .collect();
    assert!(moves.is_empty(), "{how:?}: at the end: {moves:?}\n{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_crash_moves_no_worker_and_loses_no_assignment() {
    sentinel_failover_keeps_every_assignment(Failover::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_planned_failover_moves_no_worker_and_loses_no_assignment() {
    sentinel_failover_keeps_every_assignment(Failover::Demote).await;
}

/// The sentinel's count of connections it accepted so far.
fn connections_received(node: &RedisNode) -> u64 {
    let info = node.text(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total_connections_received in INFO stats:\n{info}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_asks_sentinel_on_one_long_lived_connection() {
    let scratch = Scratch::new("sentinel-connections");
    let set = SentinelSet::start(&scratch);
    let registry = tether::registry::Registry::new(&set.url(), "tether").expect("registry");
    // The first call connects: to the sentinel it then keeps, and once
    // more to find the master for the shared data connection.
    registry
        .ping()
        .await
        .expect("the registry reaches the master");
    let before = connections_received(&set.sentinel);
    // Calls for 2 s: the registry checks the master at most every 250 ms,
    // so about eight times.
    let until = Instant::now() + Duration::from_secs(2);
    let mut calls = 0;
    while Instant::now() < until {
        registry
            .ping()
            .await
            .expect("the registry reaches the master");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // This read is one connection; before, each check opened one (8).
    let opened = connections_received(&set.sentinel) - before;
    assert!(
        opened <= 2,
        "{opened} connections to the sentinel during {calls} registry calls over 2 s (one long-lived one expected)"
    );
}
