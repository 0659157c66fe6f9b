//! The real processes under test: one `redis-server` and the
//! `tether-head`s, started through [`tether_testkit::localcluster`] from the
//! release binaries next to the bench, and the signals that play crashes,
//! hangs and scale-downs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether_testkit::localcluster::{self, Binaries, Cluster, Reply, Signal};

/// The readiness entry of a head in health: SERVING once it holds its lease.
const HEAD_SERVICE: &str = "tether.v1.HeadService";

/// Bound on a head starting and registering.
const HEAD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// Redis, the heads, and the flags every head gets.
pub struct Rig {
    cluster: Cluster,
    head_args: Vec<String>,
    heads: Vec<String>,
    /// Applied to each head after it starts, when the bench raised its own
    /// open-file limit above the machine's: heads keep the machine's.
    head_nofile: Option<u64>,
}

impl Rig {
    /// Starts Redis; heads come with [`Rig::add_heads`].
    pub fn start(head_args: Vec<String>, head_nofile: Option<u64>) -> Result<Self, String> {
        let binaries = Binaries::beside_current_exe().map_err(|e| e.to_string())?;
        let cluster = Cluster::start(binaries).map_err(|e| e.to_string())?;
        Ok(Self {
            cluster,
            head_args,
            heads: Vec::new(),
            head_nofile,
        })
    }

    /// The URL of the Redis.
    pub fn redis_url(&self) -> String {
        self.cluster.redis().url()
    }

    /// The head ids, in start order.
    pub fn head_ids(&self) -> &[String] {
        &self.heads
    }

    /// Starts `n` more heads (`head-1`, `head-2`, ...) and waits until each
    /// is registered (readiness SERVING). Returns their ids.
    pub async fn add_heads(&mut self, n: usize) -> Result<Vec<String>, String> {
        let args: Vec<&str> = self.head_args.iter().map(String::as_str).collect();
        let mut new = Vec::new();
        for _ in 0..n {
            let id = format!("head-{}", self.heads.len() + 1);
            let pid = self
                .cluster
                .spawn_head(&id, &args)
                .map_err(|e| e.to_string())?
                .pid();
            if let Some(limit) = self.head_nofile {
                crate::procfs::set_nofile_of(pid, limit)
                    .map_err(|e| format!("cannot set the open-file limit of {id}: {e}"))?;
            }
            self.heads.push(id.clone());
            new.push(id);
        }
        for id in &new {
            let addr = self.addr(id);
            let process = self.cluster.process_mut(id).expect("just spawned");
            tokio::task::block_in_place(|| process.wait_listening(HEAD_START_TIMEOUT))
                .map_err(|e| e.to_string())?;
            localcluster::wait_serving(addr, HEAD_SERVICE, HEAD_START_TIMEOUT)
                .await
                .map_err(|e| format!("{id}: {e}"))?;
        }
        Ok(new)
    }

    /// The address of head `id`.
    pub fn addr(&self, id: &str) -> SocketAddr {
        self.cluster.process(id).expect("a known head").addr
    }

    /// The OS pid of head `id`.
    pub fn pid(&self, id: &str) -> u32 {
        self.cluster.process(id).expect("a known head").pid()
    }

    /// Sends `signal` to head `id` with kill(2) (not the harness's `kill`
    /// command, whose start-up would blur the start of the measurement).
    /// Returns the instant just before the signal went out, the start of
    /// every measured move, and how long the call took.
    pub fn signal(&mut self, id: &str, signal: Signal) -> Result<(Instant, Duration), String> {
        if self.exited(id) {
            return Err(format!("{id} already exited; not signalling it"));
        }
        let number = match signal {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Int => libc::SIGINT,
            Signal::Stop => libc::SIGSTOP,
            Signal::Cont => libc::SIGCONT,
        };
        let pid = self.pid(id) as libc::pid_t;
        let before = Instant::now();
        // SAFETY: kill(2) on our own child, which has not been reaped (it
        // has not exited), so the pid is still its.
        let rc = unsafe { libc::kill(pid, number) };
        let took = before.elapsed();
        if rc != 0 {
            return Err(format!(
                "kill({pid}, {}) failed: {}",
                signal.name(),
                std::io::Error::last_os_error()
            ));
        }
        Ok((before, took))
    }

    /// True once head `id` exited.
    pub fn exited(&mut self, id: &str) -> bool {
        self.cluster
            .process_mut(id)
            .is_some_and(|p| p.exit_status().is_some())
    }

    /// Whether head `id`'s log holds `needle`.
    pub fn log_contains(&self, id: &str, needle: &str) -> bool {
        let path = self.cluster.process(id).expect("a known head").log_path();
        std::fs::read_to_string(path).is_ok_and(|log| log.contains(needle))
    }

    /// The last `n` lines of head `id`'s log.
    pub fn log_tail(&self, id: &str, n: usize) -> String {
        self.cluster.process(id).expect("a known head").log_tail(n)
    }

    /// Runs `INFO section` and returns its `key:value` lines.
    fn info(&self, section: &str) -> Result<Vec<(String, String)>, String> {
        let reply = self
            .cluster
            .redis()
            .command(&["INFO", section])
            .map_err(|e| e.to_string())?;
        let Reply::Bulk(Some(bytes)) = reply else {
            return Err(format!("INFO {section} answered {reply:?}"));
        };
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }

    /// Calls per command since Redis started (`INFO commandstats`).
    /// Commands run inside Lua scripts count too, under their own names,
    /// next to `evalsha` for the script call itself.
    pub fn commandstats(&self) -> Result<BTreeMap<String, u64>, String> {
        let mut calls = BTreeMap::new();
        for (key, value) in self.info("commandstats")? {
            let Some(name) = key.strip_prefix("cmdstat_") else {
                continue;
            };
            let n = value
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), n);
        }
        Ok(calls)
    }

    /// CPU time Redis used so far (`INFO cpu`, user + system).
    pub fn redis_cpu(&self) -> Option<Duration> {
        let info = self.info("cpu").ok()?;
        let get = |k: &str| -> Option<f64> {
            info.iter()
                .find(|(key, _)| key == k)
                .and_then(|(_, v)| v.parse().ok())
        };
        Some(Duration::from_secs_f64(
            get("used_cpu_user")? + get("used_cpu_sys")?,
        ))
    }
}

/// The calls made between two `commandstats` readings, leaving out
/// `info` (the bench's own readings). `ping` and `unwatch` stay: the
/// connection pool sends them before every use of a pooled connection.
pub fn calls_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(name, n)| {
            (
                name.clone(),
                n - before.get(name).copied().unwrap_or(0).min(*n),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}
