//! A local cluster of real processes: a `redis-server` on a free port, and
//! `tether-head` and `tether-worker` binaries on free ports, each writing
//! its logs to a file.
//!
//! It exists so that the integration tests, the demo and the benchmark all
//! exercise Tether the way it runs in production, over real sockets and
//! with real signals (SIGKILL for a crash, SIGSTOP for a hung machine,
//! SIGTERM for a clean exit), instead of against in-process fakes. It lives
//! in the library rather than in `tests/` so that examples and binaries can
//! use it too.
//!
//! Everything it starts is stopped when its owner is dropped: processes are
//! killed with SIGKILL (which also ends a SIGSTOPped one) and reaped, so no
//! stray process outlives a test. When the owner is dropped during a panic,
//! the log directory is kept and its path printed, so a failing test leaves
//! its evidence behind.
//!
//! Signals go through the `kill` command rather than `libc`, to keep the
//! crate free of a dependency that only this module would need.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether::pb::head_service_client::HeadServiceClient;
use tether::pb::worker_service_client::WorkerServiceClient;
use tether::pb::{ListWorkersResponse, StatusRequest, WorkerStatus};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The exact advice given when `redis-server` cannot be found: it names
/// the commands that fix the problem.
pub const REDIS_MISSING: &str = "redis-server is not on PATH; run `make test` (it installs it) or `sudo apt-get install -y redis-server`";

/// Bound on every gRPC call the helpers make. Generous, because a debug
/// build on a busy two-core machine can be slow; a SIGSTOPped peer hits it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on reading every page of one head's `ListWorkers`: a few pages
/// of thousands of workers on a loaded machine.
pub const LISTING_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a spawned head or worker may take to accept connections.
/// Generous for the same reason as [`RPC_TIMEOUT`].
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a freshly started `redis-server` may take to answer PING.
const REDIS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the harness could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// `redis-server` is not installed; the message says how to fix it.
    #[error("{REDIS_MISSING}")]
    RedisMissing,
    /// The head or worker binary was not found.
    #[error("{0}")]
    BinaryMissing(String),
    /// A file, socket or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A process exited when it should have kept running.
    #[error("{0}")]
    Exited(String),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// A gRPC call failed.
    #[error("{what} at {addr}: {code:?}: {message}")]
    Rpc {
        /// Which call.
        what: &'static str,
        /// Whom it was made to.
        addr: SocketAddr,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// A caller asked for something the harness cannot do (an id used
    /// twice, a signal to a process that already exited, ...).
    #[error("{0}")]
    Usage(String),
    /// Redis answered with something the raw client could not read.
    #[error("unexpected Redis reply: {0}")]
    Redis(String),
}

/// A result of a harness call.
pub type Result<T> = std::result::Result<T, HarnessError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A port on 127.0.0.1 that was free a moment ago, for a child to bind.
///
/// It is taken below the kernel's ephemeral range: the outgoing
/// connections of the cluster itself (workers dialing heads and Redis,
/// probes) take their local ports from that range, and one of them could
/// grab a port between this pick and the child's bind. Each process starts
/// at its own offset and walks the range, checking every candidate with a
/// bind, so tests running side by side rarely meet. When nothing below the
/// range is usable, the kernel picks (bind to port 0).
pub fn free_port() -> Result<u16> {
    static NEXT: AtomicU64 = AtomicU64::new(u64::MAX);
    let (low, high) = pick_range();
    if high > low {
        let span = u64::from(high - low);
        let _ = NEXT.compare_exchange(u64::MAX, seed(), Ordering::Relaxed, Ordering::Relaxed);
        for _ in 0..256 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = low + (n % span) as u16;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_err("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading a bound address"))?
        .port();
    Ok(port)
}

/// Ports to pick from: from 10000 up to the start of the ephemeral range.
fn pick_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u16>().ok())
        })
        // Linux's default when the file cannot be read.
        .unwrap_or(32768);
    (10_000, ephemeral_low)
}

/// A starting offset that differs between processes and runs.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    u64::from(std::process::id()).wrapping_mul(7919) ^ u64::from(nanos)
}

/// A fresh directory under the system temp dir, unique in this process
/// and across processes (it holds the pid).
fn temp_dir(label: &str) -> Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("tether-{label}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Removes `dir`, unless the thread is panicking: then the logs are what
/// the person reading the failure needs, so they stay and the path is
/// printed.
fn clean_up_dir(dir: &Path) {
    if std::thread::panicking() {
        eprintln!("localcluster: logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Finds an executable called `name` in one of the `PATH` directories.
fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The last `n` lines of a file, or a note saying why it could not be read.
fn tail_of(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Sends `signal` to `pid` with the `kill` command; for processes the
/// harness did not start itself (say `tetherctl watch`).
pub fn send_signal(pid: u32, signal: Signal) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{}", signal.name()))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(io_err("running the `kill` command"))?;
    if status.success() {
        Ok(())
    } else {
        Err(HarnessError::Usage(format!(
            "`kill -{} {pid}` failed: {status}",
            signal.name()
        )))
    }
}

/// Whether process `pid` holds a socket listening on `addr` (an IPv4
/// address), or `None` where `/proc` cannot tell.
fn owns_listener(pid: u32, addr: SocketAddr) -> Option<bool> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    // /proc/net/tcp writes the IPv4 address as a little-endian hex word
    // and the port as big-endian hex; state 0A is LISTEN.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let sockets: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A");
            listening
                .then(|| fields.get(9).map(|inode| format!("socket:[{inode}]")))
                .flatten()
        })
        .collect();
    if sockets.is_empty() {
        return Some(false);
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
    }))
}

/// Waits up to `timeout` for `child` to exit; returns its status if it did.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Kills a child with SIGKILL and reaps it. SIGKILL also ends a process
/// that is stopped by SIGSTOP, so nothing is left behind either way.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A signal the harness can send to a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL: a crash; the process gets no chance to clean up.
    Kill,
    /// SIGTERM: the orchestrator asks for a clean exit.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
    /// SIGSTOP: a hung machine; sockets stay open but nothing answers.
    Stop,
    /// SIGCONT: the hung machine wakes up.
    Cont,
}

impl Signal {
    /// The name the `kill` command takes.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Kill => "KILL",
            Signal::Term => "TERM",
            Signal::Int => "INT",
            Signal::Stop => "STOP",
            Signal::Cont => "CONT",
        }
    }
}

/// A `redis-server` on 127.0.0.1, without persistence, in its own temp
/// directory. It may be stopped and started again on the same port, to
/// play a Redis outage; it is killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// The `redis-server` executable found on PATH.
    program: PathBuf,
    /// Fixed for the server's life, so that clients configured with
    /// [`RedisServer::url`] find it again after a restart.
    port: u16,
    /// Working directory and log file; removed on drop.
    dir: PathBuf,
    /// `None` while the server is stopped.
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    /// Fails with [`HarnessError::RedisMissing`] when `redis-server` is not
    /// on PATH.
    pub fn start() -> Result<Self> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::start_on(free_port()?) {
                // Another process took the port after it was picked.
                Err(HarnessError::Exited(log))
                    if attempt < 5 && log.contains("Address already in use") => {}
                other => return other,
            }
        }
    }

    /// Starts a server on `port` and waits until it answers PING.
    pub fn start_on(port: u16) -> Result<Self> {
        let mut server = Self::stopped_on(port)?;
        server.restart()?;
        Ok(server)
    }

    /// A server that is not running yet, on a port that is free now: for
    /// processes that must start before Redis. [`RedisServer::restart`]
    /// starts it.
    pub fn stopped() -> Result<Self> {
        Self::stopped_on(free_port()?)
    }

    /// A server that is not running yet, on `port`.
    pub fn stopped_on(port: u16) -> Result<Self> {
        let program = find_on_path("redis-server").ok_or(HarnessError::RedisMissing)?;
        Ok(Self {
            program,
            port,
            dir: temp_dir("redis")?,
            child: None,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL to give to `--redis-url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// Kills the server at once (SIGKILL), as in a crash. Its data is lost:
    /// it runs without persistence. Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the server again on the same port (killing it first if it
    /// runs) and waits until it answers PING.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let log_path = self.dir.join("redis.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("opening {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let child = Command::new(&self.program)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_err(format!("starting {}", self.program.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + REDIS_START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            // The answer must come from this server, not from another one
            // that held the port first.
            let pid = self.child.as_ref().map_or(0, Child::id);
            if owns_listener(pid, addr).unwrap_or(true) && self.ping() {
                return Ok(());
            }
            if !self.is_running() {
                self.child = None;
                return Err(HarnessError::Exited(format!(
                    "redis-server on port {} exited at start; its log ends with:\n{}",
                    self.port,
                    tail_of(&log_path, 20)
                )));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(HarnessError::Timeout(format!(
                    "redis-server on port {} did not answer PING within {REDIS_START_TIMEOUT:?}; its log ends with:\n{}",
                    self.port,
                    tail_of(&log_path, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True if something on the port answers `PING` with `+PONG`.
    pub fn ping(&self) -> bool {
        matches!(self.command(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG")
    }

    /// Sends one command over a fresh connection and reads the reply, so
    /// that tests can look at the keys Tether wrote (see [`redis_command`]).
    pub fn command(&self, args: &[&str]) -> Result<Reply> {
        redis_command(self.port, args)
    }
}

/// Sends one command to the Redis on 127.0.0.1:`port` over a fresh
/// blocking connection (the `redis` crate's) and returns its reply. An
/// error reply is `Ok(Reply::Error(..))`, as Redis sent it; only a failed
/// connection is an `Err`.
pub fn redis_command(port: u16, args: &[&str]) -> Result<Reply> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let what = || format!("talking to Redis at {addr}");
    // No `CLIENT SETINFO` on connect: tests count the commands Redis ran.
    let info = redis::IntoConnectionInfo::into_connection_info(format!("redis://{addr}/"))
        .map_err(|e| HarnessError::Redis(e.to_string()))?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let info = info.set_redis_settings(settings);
    let client = redis::Client::open(info).map_err(|e| HarnessError::Redis(e.to_string()))?;
    let io = |e: redis::RedisError| HarnessError::Io {
        what: what(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(io)?;
    conn.set_read_timeout(Some(RPC_TIMEOUT)).map_err(io)?;
    let mut cmd = redis::cmd(args.first().copied().unwrap_or("PING"));
    for a in args.iter().skip(1) {
        cmd.arg(*a);
    }
    match cmd.query::<redis::Value>(&mut conn) {
        Ok(value) => Ok(Reply::from(value)),
        Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => {
            Ok(Reply::Error(match (e.code(), e.detail()) {
                (Some(code), Some(detail)) => format!("{code} {detail}"),
                (Some(code), None) => code.to_owned(),
                _ => e.to_string(),
            }))
        }
        Err(e) => Err(io(e)),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        clean_up_dir(&self.dir);
    }
}

/// A Redis reply, as read by [`RedisServer::command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`-style status.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$n` bulk string; `None` for a nil reply.
    Bulk(Option<Vec<u8>>),
    /// `*n` array; `None` for a nil array.
    Array(Option<Vec<Reply>>),
}

impl From<redis::Value> for Reply {
    fn from(value: redis::Value) -> Self {
        use redis::Value;
        match value {
            Value::Nil => Reply::Bulk(None),
            Value::Int(n) => Reply::Integer(n),
            Value::BulkString(b) => Reply::Bulk(Some(b)),
            Value::Array(items) | Value::Set(items) => {
                Reply::Array(Some(items.into_iter().map(Reply::from).collect()))
            }
            Value::Map(pairs) => Reply::Array(Some(
                pairs
                    .into_iter()
                    .flat_map(|(k, v)| [Reply::from(k), Reply::from(v)])
                    .collect(),
            )),
            Value::SimpleString(s) => Reply::Simple(s),
            Value::Okay => Reply::Simple("OK".to_owned()),
            Value::ServerError(e) => Reply::Error(format!("{e:?}")),
            other => Reply::Bulk(Some(format!("{other:?}").into_bytes())),
        }
    }
}

/// Where the `tether-head` and `tether-worker` executables are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `tether-head` executable.
    pub head: PathBuf,
    /// The `tether-worker` executable.
    pub worker: PathBuf,
}

impl Binaries {
    /// The given paths; integration tests pass
    /// `env!("CARGO_BIN_EXE_tether-head")` and
    /// `env!("CARGO_BIN_EXE_tether-worker")`.
    pub fn new(head: impl Into<PathBuf>, worker: impl Into<PathBuf>) -> Self {
        Self {
            head: head.into(),
            worker: worker.into(),
        }
    }

    /// The binaries next to the running executable, or one directory up:
    /// an example runs from `target/<profile>/examples/`, a binary from
    /// `target/<profile>/`, and the services sit in `target/<profile>/`.
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe().map_err(io_err("finding the current executable"))?;
        let dir = exe.parent();
        let candidates = [dir, dir.and_then(Path::parent)];
        for dir in candidates.into_iter().flatten() {
            let head = dir.join("tether-head");
            let worker = dir.join("tether-worker");
            if head.is_file() && worker.is_file() {
                return Ok(Self { head, worker });
            }
        }
        Err(HarnessError::BinaryMissing(format!(
            "tether-head and tether-worker are not next to {} nor one directory up; build them with `cargo build --bins` (with --release for a release build)",
            exe.display()
        )))
    }

    /// The executable of `role`.
    pub fn of(&self, role: Role) -> &Path {
        match role {
            Role::Head => &self.head,
            Role::Worker => &self.worker,
        }
    }
}

/// Which service a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `tether-head`.
    Head,
    /// `tether-worker`.
    Worker,
}

/// One spawned head or worker. Killed with SIGKILL and reaped on drop.
#[derive(Debug)]
pub struct Process {
    /// The `--id` it was given.
    pub id: String,
    /// Head or worker.
    pub role: Role,
    /// The `--listen` address it was given (and advertises).
    pub addr: SocketAddr,
    /// Its stdout and stderr, interleaved.
    log: PathBuf,
    child: Child,
    /// Set once the exit status was collected: from then on the pid may
    /// belong to another process, so no signal may be sent to it.
    exited: Option<ExitStatus>,
}

impl Process {
    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file holding its stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        tail_of(&self.log, n)
    }

    /// Its exit status, if it exited (collecting it if needed).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Sends `signal`. Fails if the process already exited, rather than
    /// risk signalling whatever process reused its pid.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if let Some(status) = self.exit_status() {
            return Err(HarnessError::Usage(format!(
                "{} already exited ({status}); not sending SIG{}",
                self.id,
                signal.name()
            )));
        }
        send_signal(self.pid(), signal)
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(Signal::Kill)
    }

    /// SIGSTOP: the process hangs with its sockets open.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(Signal::Stop)
    }

    /// SIGCONT: a stopped process resumes.
    pub fn cont(&mut self) -> Result<()> {
        self.signal(Signal::Cont)
    }

    /// SIGTERM: a clean exit.
    pub fn terminate(&mut self) -> Result<()> {
        self.signal(Signal::Term)
    }

    /// Waits up to `timeout` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_child(&mut self.child, timeout);
        }
        self.exited
    }

    /// Waits until the process listens on its address. Fails early, with
    /// its log, if it exits instead.
    ///
    /// On Linux the listening socket must be the process's own (checked in
    /// `/proc`): another process that took the port first would accept
    /// connections too, and the caller would talk to a stranger. Elsewhere
    /// an accepted connection is taken as proof.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let listening = match owns_listener(self.pid(), self.addr) {
                Some(own) => own,
                None => TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok(),
            };
            if listening {
                return Ok(());
            }
            if let Some(status) = self.exit_status() {
                return Err(HarnessError::Exited(format!(
                    "{} exited ({status}) instead of listening on {}; its log ends with:\n{}",
                    self.id,
                    self.addr,
                    self.log_tail(20)
                )));
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout(format!(
                    "{} did not listen on {} within {timeout:?}; its log ends with:\n{}",
                    self.id,
                    self.addr,
                    self.log_tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited.is_none() {
            kill_and_reap(&mut self.child);
        }
    }
}

/// A Redis server and the heads and workers spawned against it, with one
/// directory for their logs. Dropping it kills every process, then Redis.
#[derive(Debug)]
pub struct Cluster {
    binaries: Binaries,
    /// In spawn order; ids are unique.
    processes: Vec<Process>,
    redis: RedisServer,
    /// Holds one log file per process; removed on drop unless panicking.
    dir: PathBuf,
}

impl Cluster {
    /// A cluster with a fresh Redis on a free port.
    pub fn start(binaries: Binaries) -> Result<Self> {
        Self::with_redis(binaries, RedisServer::start()?)
    }

    /// A cluster around `redis`, which may be stopped (see
    /// [`RedisServer::stopped`]) to start processes before Redis.
    pub fn with_redis(binaries: Binaries, redis: RedisServer) -> Result<Self> {
        Ok(Self {
            binaries,
            processes: Vec::new(),
            redis,
            dir: temp_dir("cluster")?,
        })
    }

    /// The Redis server.
    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    /// The Redis server, to kill or restart it.
    pub fn redis_mut(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    /// The directory holding the processes' logs.
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// Spawns a `tether-head`; see [`Cluster::spawn`].
    pub fn spawn_head(&mut self, id: &str, extra_args: &[&str]) -> Result<&Process> {
        self.spawn(Role::Head, id, extra_args)
    }

    /// Spawns a `tether-worker`; see [`Cluster::spawn`].
    pub fn spawn_worker(&mut self, id: &str, extra_args: &[&str]) -> Result<&Process> {
        self.spawn(Role::Worker, id, extra_args)
    }

    /// Spawns a head or worker with `--id id`, `--listen 127.0.0.1:PORT`
    /// on a free port, `--redis-url` of this cluster's Redis (not for a
    /// worker whose `extra_args` hold `--heads`), then
    /// `extra_args` (timings, for example), and waits until it accepts
    /// connections, so its address is final when this returns.
    ///
    /// If the port was taken between the pick and the child's bind, the
    /// child is started again on another port. A child that exits for any
    /// other reason, or does not listen within [`SPAWN_TIMEOUT`], is an
    /// error that quotes its log.
    ///
    /// `TETHER_*` variables of this process are not passed on, so that the
    /// caller's environment cannot change a child's configuration.
    pub fn spawn(&mut self, role: Role, id: &str, extra_args: &[&str]) -> Result<&Process> {
        self.spawn_all(role, &[id], extra_args)?;
        Ok(self.processes.last().expect("just spawned"))
    }

    /// [`Cluster::spawn`] for many ids at once: starts every child first,
    /// then waits for each, so that their start-ups overlap (two hundred
    /// workers start in seconds rather than minutes on a loaded machine).
    /// On an error the children not yet waited for are killed.
    pub fn spawn_all(&mut self, role: Role, ids: &[&str], extra_args: &[&str]) -> Result<()> {
        let mut started = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            if self.process(id).is_some() || ids[..i].contains(id) {
                return Err(HarnessError::Usage(format!(
                    "a process with id {id:?} already exists"
                )));
            }
            // The id is used in the file name: keep it to safe characters.
            let safe: String = id
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let log = self
                .dir
                .join(format!("{}-{safe}.log", self.processes.len() + i));
            started.push((self.start_process(role, id, extra_args, &log)?, log));
        }
        for (mut process, log) in started {
            let mut attempt = 1;
            loop {
                match process.wait_listening(SPAWN_TIMEOUT) {
                    Ok(()) => {
                        self.processes.push(process);
                        break;
                    }
                    Err(HarnessError::Exited(_))
                        if attempt < 5
                            && process.log_tail(5).contains("Address already in use") =>
                    {
                        attempt += 1;
                        let id = process.id.clone();
                        process = self.start_process(role, &id, extra_args, &log)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Starts one child on a fresh port, logging to `log` (truncated).
    fn start_process(
        &self,
        role: Role,
        id: &str,
        extra_args: &[&str],
        log: &Path,
    ) -> Result<Process> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let out = File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let program = self.binaries.of(role);
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TETHER_") {
                command.env_remove(key);
            }
        }
        command
            .args(["--id", id])
            .args(["--listen", &addr.to_string()]);
        // A worker told where the heads are gets no Redis address, as in
        // a deployment that keeps Redis to the heads.
        if !(role == Role::Worker && extra_args.contains(&"--heads")) {
            command.args(["--redis-url", &self.redis.url()]);
        }
        let child = command
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io_err(format!("starting {}", program.display())))?;
        Ok(Process {
            id: id.to_owned(),
            role,
            addr,
            log: log.to_owned(),
            child,
            exited: None,
        })
    }

    /// The process with `id`.
    pub fn process(&self, id: &str) -> Option<&Process> {
        self.processes.iter().find(|p| p.id == id)
    }

    /// The process with `id`, to signal it.
    pub fn process_mut(&mut self, id: &str) -> Option<&mut Process> {
        self.processes.iter_mut().find(|p| p.id == id)
    }

    /// Every head, in spawn order.
    pub fn heads(&self) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(|p| p.role == Role::Head)
    }

    /// Every worker, in spawn order.
    pub fn workers(&self) -> impl Iterator<Item = &Process> {
        self.processes.iter().filter(|p| p.role == Role::Worker)
    }

    /// Takes the process with `id` out of the cluster; dropping it kills it.
    pub fn remove(&mut self, id: &str) -> Option<Process> {
        let index = self.processes.iter().position(|p| p.id == id)?;
        Some(self.processes.remove(index))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Processes first, so that none of them logs a Redis outage that
        // only the teardown caused.
        self.processes.clear();
        self.redis.kill();
        clean_up_dir(&self.dir);
    }
}

/// Runs `program` with `args` to its end, for commands expected to exit
/// on their own (bad configuration, `--help`). Kills it and fails if it
/// is still running after `timeout`.
pub fn run_to_exit(program: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("starting {}", program.display())))?;
    // Pipes are drained on their own threads so that a chatty child never
    // blocks on a full pipe while we wait for it.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        kill_and_reap(&mut child);
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(HarnessError::Timeout(format!(
            "{} {args:?} was still running after {timeout:?}; stderr:\n{}",
            program.display(),
            String::from_utf8_lossy(&stderr)
        ))),
    }
}

/// A channel to `addr` that connects on first use and reconnects after a
/// failure, so one channel serves a process across its outages.
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from(
        format!("http://{addr}")
            .parse::<tonic::transport::Uri>()
            .expect("a socket address makes a valid URI"),
    )
    .connect_timeout(Duration::from_secs(1))
    .tcp_nodelay(true)
    .connect_lazy()
}

/// A `HeadService` client for the head at `addr`. Calls made with it carry
/// no timeout of their own: wrap them in `tokio::time::timeout`.
pub fn head_client(addr: SocketAddr) -> HeadServiceClient<Channel> {
    HeadServiceClient::new(channel(addr))
}

/// A `WorkerService` client for the worker at `addr`.
pub fn worker_client(addr: SocketAddr) -> WorkerServiceClient<Channel> {
    WorkerServiceClient::new(channel(addr))
}

/// Runs one call under [`RPC_TIMEOUT`] and turns its failure into a
/// [`HarnessError::Rpc`] naming the call and the peer.
async fn bounded<T>(
    what: &'static str,
    addr: SocketAddr,
    call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    bounded_by(what, addr, RPC_TIMEOUT, call).await
}

/// [`bounded`] with another bound, for calls made of several RPCs.
async fn bounded_by<T>(
    what: &'static str,
    addr: SocketAddr,
    bound: Duration,
    call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(bound, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(HarnessError::Rpc {
            what,
            addr,
            code: status.code(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(HarnessError::Rpc {
            what,
            addr,
            code: tonic::Code::DeadlineExceeded,
            message: format!("no answer within {bound:?}"),
        }),
    }
}

/// Asks processes how they are, reusing one channel per address: polling
/// thirty workers every few milliseconds must not open a connection per
/// poll, or the probing would load the machine it measures.
#[derive(Debug, Default)]
pub struct Probe {
    channels: HashMap<SocketAddr, Channel>,
}

impl Probe {
    /// A probe with no channel open yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn channel(&mut self, addr: SocketAddr) -> Channel {
        self.channels
            .entry(addr)
            .or_insert_with(|| channel(addr))
            .clone()
    }

    /// `WorkerService.Status` of the worker at `addr`.
    pub async fn worker_status(&mut self, addr: SocketAddr) -> Result<WorkerStatus> {
        let mut client = WorkerServiceClient::new(self.channel(addr));
        bounded("Status", addr, client.status(StatusRequest {})).await
    }

    /// `HeadService.ListWorkers` of the head at `addr`: every page, joined
    /// into one answer; each page under [`RPC_TIMEOUT`], all of them under
    /// [`LISTING_TIMEOUT`].
    pub async fn list_workers(&mut self, addr: SocketAddr) -> Result<ListWorkersResponse> {
        let mut client = HeadServiceClient::new(self.channel(addr));
        let all = async move {
            let page = |message| {
                let mut request = tonic::Request::new(message);
                request.set_timeout(RPC_TIMEOUT);
                request
            };
            tether::listing::list_all(&mut client, page)
                .await
                .map(tonic::Response::new)
        };
        bounded_by("ListWorkers", addr, LISTING_TIMEOUT, all).await
    }

    /// The health of `service` (`""` for the whole server) at `addr`.
    pub async fn health(&mut self, addr: SocketAddr, service: &str) -> Result<ServingStatus> {
        let mut client = HealthClient::new(self.channel(addr));
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        let answer = bounded("Health.Check", addr, client.check(request)).await?;
        Ok(ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown))
    }
}

/// `WorkerService.Status` of the worker at `addr`, over a new connection.
pub async fn worker_status(addr: SocketAddr) -> Result<WorkerStatus> {
    Probe::new().worker_status(addr).await
}

/// `HeadService.ListWorkers` of the head at `addr`, over a new connection.
pub async fn list_workers(addr: SocketAddr) -> Result<ListWorkersResponse> {
    Probe::new().list_workers(addr).await
}

/// The health of `service` (`""` for the whole server) at `addr`, over a
/// new connection.
pub async fn health_check(addr: SocketAddr, service: &str) -> Result<ServingStatus> {
    Probe::new().health(addr, service).await
}

/// Polls `check` every `poll` until it returns true or `timeout` passes.
/// Returns whether it became true; the caller describes what it saw.
pub async fn wait_until(
    timeout: Duration,
    poll: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Waits until `service` at `addr` reports SERVING. The error says what
/// it reported last.
pub async fn wait_serving(addr: SocketAddr, service: &str, timeout: Duration) -> Result<()> {
    let mut probe = Probe::new();
    let mut last = String::from("nothing yet");
    let serving = wait_until(timeout, Duration::from_millis(20), async || {
        match probe.health(addr, service).await {
            Ok(ServingStatus::Serving) => true,
            Ok(other) => {
                last = format!("{other:?}");
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    })
    .await;
    if serving {
        Ok(())
    } else {
        Err(HarnessError::Timeout(format!(
            "{service:?} at {addr} was not SERVING within {timeout:?}; last answer: {last}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_answer_as_redis_replied() {
        let redis = RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            redis.command(&["SET", "k", "abc"]).unwrap(),
            Reply::Simple("OK".into())
        );
        assert_eq!(
            redis.command(&["MGET", "k", "missing"]).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"abc".to_vec())),
                Reply::Bulk(None)
            ]))
        );
        assert_eq!(redis.command(&["DEL", "k"]).unwrap(), Reply::Integer(1));
        match redis.command(&["NO-SUCH-COMMAND"]).unwrap() {
            Reply::Error(e) => assert!(e.starts_with("ERR "), "{e}"),
            other => panic!("an unknown command answered {other:?}"),
        }
        assert!(redis.ping());
    }

    #[test]
    fn missing_redis_names_the_fix() {
        assert_eq!(
            HarnessError::RedisMissing.to_string(),
            "redis-server is not on PATH; run `make test` (it installs it) or `sudo apt-get install -y redis-server`"
        );
    }

    #[test]
    fn listeners_are_attributed_to_their_owner() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        if let Some(own) = owns_listener(std::process::id(), addr) {
            assert!(own, "this process listens on {addr}");
            // pid 1 is never this test.
            assert_ne!(owns_listener(1, addr), Some(true));
        }
        drop(listener);
        assert_ne!(owns_listener(std::process::id(), addr), Some(true));
    }

    #[test]
    fn tails_keep_the_last_lines() {
        let dir = temp_dir("tail-test").unwrap();
        let path = dir.join("log");
        std::fs::write(&path, "a\nb\nc\n").unwrap();
        assert_eq!(tail_of(&path, 2), "b\nc");
        assert_eq!(tail_of(&path, 10), "a\nb\nc");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
