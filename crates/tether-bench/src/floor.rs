//! The floor of a heartbeat server's cost: raw TCP in the shape of
//! `shared/peers/raw-tcp-beats`. One connection per worker; the server
//! writes a 24-byte beat to every connection once per interval, spread
//! over the interval in 8 phases as a head does, and reads each worker's
//! 24-byte beat. No framing, HTTP/2 or protobuf: what is left is tokio and
//! the kernel, so whatever a head spends beyond this is Tether's own.
//!
//! The server is this bench's own executable run again with the hidden
//! `floor-server` subcommand, so that `/proc` shows its CPU and memory
//! alone; the workers are connections in the bench process, like the
//! simulated workers of the other scenarios.

use crate::procfs::{self, Pid};
use crate::report::Report;
use crate::stats::{missed_beats, Summary};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Bytes of one beat, each way: a head's `HeadBeat` is about this size.
const BEAT: usize = 24;

/// The server spreads its connections over this many phases of the
/// interval, as raw-tcp-beats does.
const PHASES: u32 = 8;

/// Connections the load opens at once.
const CONNECTS_IN_FLIGHT: usize = 64;

/// Bound on the server process starting and printing its address.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The first line the server prints on stdout: `listening ADDR`.
const LISTENING: &str = "listening ";

/// The `floor-server` subcommand: serves until its stdin closes (the
/// bench exited or dropped it). Binds `addr` (port 0 for any) and prints
/// the bound address first.
pub async fn serve(addr: SocketAddr, interval: Duration) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot bind {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("{LISTENING}{bound}");
    // The parent holds the other end of stdin: EOF means it is gone.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let start = tokio::time::Instant::now();
    let mut accepted: u32 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors, most likely: the load reports it as
                // workers that got no beat.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        accepted = accepted.wrapping_add(1);
        let phase = interval * (accepted % PHASES) / PHASES;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            tokio::spawn(async move {
                let mut buf = [0u8; BEAT];
                while r.read_exact(&mut buf).await.is_ok() {}
            });
            let mut tick = tokio::time::interval_at(start + phase, interval);
            let mut seq: u64 = 0;
            loop {
                tick.tick().await;
                seq += 1;
                let mut buf = [0u8; BEAT];
                buf[..8].copy_from_slice(&seq.to_le_bytes());
                if w.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The floor server process; killed when dropped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    pid: u32,
}

impl ServerProcess {
    /// Starts `tether-bench floor-server` and waits for its address.
    async fn start(interval: Duration) -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the bench's own executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg("floor-server")
            .arg("127.0.0.1:0")
            .arg(crate::scenarios::ms_flag(interval))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start the floor server: {e}"))?;
        let pid = child.id().ok_or("the floor server exited at once")?;
        let stdout = child.stdout.take().ok_or("no stdout of the floor server")?;
        let mut line = String::new();
        tokio::time::timeout(
            SERVER_START_TIMEOUT,
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .map_err(|_| format!("the floor server printed no address in {SERVER_START_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot read the floor server's address: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix(LISTENING)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("the floor server printed {line:?}, not its address"))?;
        Ok(Self { child, addr, pid })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// One finished connect of [`Load::connect`], with its worker's index.
fn joined(
    done: Option<Result<(usize, std::io::Result<TcpStream>), tokio::task::JoinError>>,
    n: usize,
) -> Result<(usize, TcpStream), String> {
    let (i, stream) = done
        .ok_or("no connect left")?
        .map_err(|e| format!("a floor worker's connect failed: {e}"))?;
    let stream = stream.map_err(|e| format!("floor worker {i} of {n} cannot connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok((i, stream))
}

/// What each simulated floor worker saw, shared with its reading task.
struct Beats {
    /// When the bench started: the clock of the fields below, in ns.
    base: Instant,
    /// Beats all workers received from the server.
    received: AtomicU64,
    /// Start of the measured window (ns since `base`); 0 before it.
    window_from: AtomicU64,
    /// Per worker: its last beat (ns since `base`, 0 for none).
    last: Vec<AtomicU64>,
    /// Per worker: its longest silence inside the window so far, in ns.
    longest: Vec<AtomicU64>,
}

impl Beats {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn beat(&self, worker: usize) {
        let now = self.now();
        self.received.fetch_add(1, Relaxed);
        let last = self.last[worker].swap(now, Relaxed);
        let from = self.window_from.load(Relaxed);
        if from > 0 && now > from {
            self.longest[worker].fetch_max(now - last.max(from), Relaxed);
        }
    }

    /// Each worker's longest silence between the window's start and now,
    /// counting the silence since its last beat.
    fn gaps(&self) -> Vec<Duration> {
        let now = self.now();
        let from = self.window_from.load(Relaxed);
        (0..self.last.len())
            .map(|i| {
                let tail = now - self.last[i].load(Relaxed).max(from).min(now);
                Duration::from_nanos(self.longest[i].load(Relaxed).max(tail))
            })
            .collect()
    }
}

/// The floor's workers: one connection each, beating in phases spread
/// evenly over the interval (as the attach loop's workers end up).
struct Load {
    beats: Arc<Beats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    async fn connect(addr: SocketAddr, n: usize, interval: Duration) -> Result<Self, String> {
        let beats = Arc::new(Beats {
            base: Instant::now(),
            received: AtomicU64::new(0),
            window_from: AtomicU64::new(0),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
            longest: (0..n).map(|_| AtomicU64::new(0)).collect(),
        });
        // A bounded number of connects in flight: one at a time takes
        // seconds at 10,000 on a busy machine, all at once overflows the
        // listen backlog.
        let mut streams = Vec::with_capacity(n);
        let mut connecting = tokio::task::JoinSet::new();
        for i in 0..n {
            if connecting.len() >= CONNECTS_IN_FLIGHT {
                streams.push(joined(connecting.join_next().await, n)?);
            }
            connecting.spawn(async move { (i, TcpStream::connect(addr).await) });
        }
        while let Some(done) = connecting.join_next().await {
            streams.push(joined(Some(done), n)?);
        }
        streams.sort_by_key(|(i, _)| *i);
        // Phases count from after the last connection, so that no worker
        // starts with a burst of the beats it missed while others connected.
        let start = tokio::time::Instant::now() + interval;
        let mut tasks = Vec::with_capacity(n);
        for (i, stream) in streams {
            let beats = beats.clone();
            let phase = interval.mul_f64(i as f64 / n as f64);
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let read = async {
                    let mut buf = [0u8; BEAT];
                    while r.read_exact(&mut buf).await.is_ok() {
                        beats.beat(i);
                    }
                };
                let write = async {
                    let mut tick = tokio::time::interval_at(start + phase, interval);
                    loop {
                        tick.tick().await;
                        if w.write_all(&[1u8; BEAT]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! {
                    _ = read => {}
                    _ = write => {}
                }
            }));
        }
        Ok(Self { beats, tasks })
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// How to run the floor: the same N, interval and window as the
/// scenario it is the floor of.
#[derive(Debug, Clone, Copy)]
pub struct FloorRun {
    pub workers: usize,
    pub interval: Duration,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What a server costs per worker: the unit of the ratios to the floor.
#[derive(Debug, Clone, Copy)]
pub struct PerWorker {
    /// Server CPU (user + system) per worker per second of the window.
    /// At a 1 s interval this is the cost of one beat each way.
    pub cpu_us_per_worker_second: f64,
    /// Resident memory the server grew by, per worker, against itself
    /// before any worker connected.
    pub rss_growth_kib_per_worker: f64,
}

impl PerWorker {
    /// From CPU samples around a window of `workers` workers and the RSS
    /// growth over the same workers.
    pub fn new(cpu: Duration, window: Duration, workers: usize, rss_growth_kib: u64) -> PerWorker {
        let worker_seconds = workers.max(1) as f64 * window.as_secs_f64().max(1e-9);
        PerWorker {
            cpu_us_per_worker_second: cpu.as_secs_f64() * 1e6 / worker_seconds,
            rss_growth_kib_per_worker: rss_growth_kib as f64 / workers.max(1) as f64,
        }
    }
}

/// The floor's measurements.
#[derive(Debug, Clone)]
pub struct FloorMeasured {
    pub connect_took: Duration,
    pub window: Duration,
    /// Server CPU (user + system) in the window, counted in clock ticks.
    pub cpu: Duration,
    pub cpu_percent: f64,
    pub sys_percent: f64,
    pub per_worker: PerWorker,
    pub rss_kib: u64,
    pub rss_kib_before: u64,
    pub beats_received: u64,
    pub beats_expected: u64,
    pub workers_missing_beats: usize,
    pub gaps: Summary,
}

/// Starts the floor server, connects the workers, waits two intervals and
/// the warm-up, measures the server over the window, and stops both.
pub async fn measure(run: FloorRun) -> Result<FloorMeasured, String> {
    // One descriptor per worker on each side; the server inherits it.
    let want = run.workers as u64 + 1000;
    if procfs::nofile_limit(Pid::Me).unwrap_or(0) < want {
        procfs::raise_own_nofile(want);
    }
    let server = ServerProcess::start(run.interval).await?;
    let pid = Pid::Of(server.pid);
    let rss_kib_before = procfs::status_kib(pid, "VmRSS").unwrap_or(0);
    let started = Instant::now();
    let load = match Load::connect(server.addr, run.workers, run.interval).await {
        Ok(load) => load,
        Err(e) => {
            server.stop().await;
            return Err(e);
        }
    };
    let connect_took = started.elapsed();
    // The first beats start one interval after the last connection.
    tokio::time::sleep(run.interval * 2 + run.warmup).await;

    let beats = &load.beats;
    let cpu0 = procfs::cpu(pid);
    let got0 = beats.received.load(Relaxed);
    beats.window_from.store(beats.now().max(1), Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(run.duration).await;
    let cpu1 = procfs::cpu(pid);
    let got1 = beats.received.load(Relaxed);
    let gaps = beats.gaps();
    let window = t0.elapsed();
    let rss_kib = procfs::status_kib(pid, "VmRSS").unwrap_or(0);
    load.stop();
    server.stop().await;

    let (Some(cpu0), Some(cpu1)) = (cpu0, cpu1) else {
        return Err("cannot read the floor server's CPU time from /proc".into());
    };
    let workers_missing_beats = gaps
        .iter()
        .filter(|g| missed_beats(**g, run.interval) > 0)
        .count();
    let beats_expected =
        (run.workers as f64 * window.as_secs_f64() / run.interval.as_secs_f64()).round() as u64;
    Ok(FloorMeasured {
        connect_took,
        window,
        cpu: procfs::cpu_between(cpu0, cpu1),
        cpu_percent: procfs::cpu_percent(cpu0, cpu1),
        sys_percent: procfs::sys_percent(cpu0, cpu1),
        per_worker: PerWorker::new(
            procfs::cpu_between(cpu0, cpu1),
            window,
            run.workers,
            rss_kib.saturating_sub(rss_kib_before),
        ),
        rss_kib,
        rss_kib_before,
        beats_received: got1 - got0,
        beats_expected,
        workers_missing_beats,
        gaps: Summary::new(gaps),
    })
}

impl FloorMeasured {
    /// The floor's rows: the `floor` scenario's table, and the `floor`
    /// object of `steady`'s JSON.
    pub fn add_to(&self, report: &mut Report) {
        report.metric_ms(
            "connect_all_ms",
            "workers connected after",
            Some(self.connect_took),
        );
        report.metric_ms("window_ms", "measured window", Some(self.window));
        report.metric(
            "cpu_percent",
            "server CPU (user+sys, % of one core)",
            self.cpu_percent,
            format!("{:.2} %", self.cpu_percent),
        );
        report.metric(
            "sys_cpu_percent",
            "  of which in the kernel (sys)",
            self.sys_percent,
            format!("{:.2} %", self.sys_percent),
        );
        let cpu = self.per_worker.cpu_us_per_worker_second;
        report.metric(
            "cpu_us_per_worker_second",
            "server CPU per worker-second",
            cpu,
            format!("{cpu:.1} µs"),
        );
        report.metric(
            "rss_kib",
            "server RSS",
            self.rss_kib,
            format!(
                "{:.1} MiB ({} KiB before workers)",
                self.rss_kib as f64 / 1024.0,
                self.rss_kib_before
            ),
        );
        report.result("rss_kib_without_workers", self.rss_kib_before);
        let rss = self.per_worker.rss_growth_kib_per_worker;
        report.metric(
            "rss_growth_kib_per_worker",
            "server RSS growth per worker",
            rss,
            format!("{rss:.2} KiB"),
        );
        report.metric_count(
            "beats_received",
            "beats the workers received in the window",
            self.beats_received,
        );
        report.metric_count(
            "beats_expected",
            "  expected (workers × window / interval)",
            self.beats_expected,
        );
        report.metric_count(
            "workers_missing_beats",
            "workers that missed a beat",
            self.workers_missing_beats as u64,
        );
        report.metric_ms(
            "max_gap_p99_ms",
            "longest beat gap in the window: p99",
            self.gaps.percentile(99.0),
        );
        report.metric_ms(
            "max_gap_ms",
            "longest beat gap in the window: max",
            self.gaps.max(),
        );
        report.detail("gap_histogram", self.gaps.histogram());
    }
}
