//! The worker side as a library component: "keep me attached to a live
//! head, and tell me when my head changes", for a Rust program that does
//! its own work. `tether-worker` is built on it: a [`Worker`] plus an
//! operator-facing `WorkerService` that reads
//! [`WorkerHandle::status_reader`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tether::worker::Worker;
//!
//! let worker = Worker::builder("worker-1")
//!     .heads(["10.0.0.5:7070", "10.0.0.6:7070"])
//!     .spawn()?;
//! let mut attachment = worker.attachment();
//! while attachment.changed().await.is_ok() {
//!     let now = attachment.borrow_and_update().clone();
//!     println!("attached: {} to {:?} (epoch {})", now.attached, now.head_id, now.epoch);
//!     # break;
//! }
//! worker.shutdown().await;
//! # Ok(())
//! # }
//! ```

use crate::attach::{self, AttachConfig, Snapshot};
use crate::discovery::{Discovery, Source};
use crate::registry::Registry;
use crate::security::ClientSecurity;
use crate::shutdown::{self, ShutdownTrigger};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where the worker is attached, as its [`WorkerHandle::attachment`]
/// reports it. Changes when the worker attaches, loses its head or moves;
/// not on every beat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attachment {
    /// True from the first beat of a head until the stream is lost.
    pub attached: bool,
    /// The head's id (the last one, while not attached); empty before the
    /// first attachment.
    pub head_id: String,
    /// The head's address, as it advertises it.
    pub head_addr: String,
    /// The assignment's epoch: higher after every move.
    pub epoch: u64,
    /// How many times the worker attached to a head since it started.
    pub reassignments: u64,
    /// When the current attachment began (its first beat), in Unix
    /// milliseconds; 0 while not attached.
    pub attached_since_ms: i64,
}

impl From<&Snapshot> for Attachment {
    fn from(s: &Snapshot) -> Self {
        Self {
            attached: s.attached,
            head_id: s.head_id.clone(),
            head_addr: s.head_addr.clone(),
            epoch: s.epoch,
            reassignments: s.reassignments,
            attached_since_ms: if s.attached { s.attached_since_ms } else { 0 },
        }
    }
}

/// The worker's state at one instant: its [`Attachment`] and the beat
/// timing that changes on every beat (so it is read on demand, not
/// watched). What an operator's status page shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Where the worker is attached.
    pub attachment: Attachment,
    /// When the last beat of a head arrived; `None` before the first.
    pub last_head_beat: Option<Instant>,
    /// The longest gap between two beats of a head since the worker last
    /// went from unattached to attached (a move does not reset it).
    pub max_head_beat_gap: Duration,
}

/// Reads a running worker's [`WorkerStatus`]; cheap to clone into a
/// service. Reads go on working after the worker stopped (they then show
/// its last state).
#[derive(Debug, Clone)]
pub struct StatusReader(watch::Receiver<Snapshot>);

impl StatusReader {
    /// The worker's state now.
    pub fn status(&self) -> WorkerStatus {
        let s = self.0.borrow();
        WorkerStatus {
            attachment: Attachment::from(&*s),
            last_head_beat: s.last_head_beat,
            max_head_beat_gap: s.max_beat_gap,
        }
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Neither heads nor a registry to learn the heads from.
    #[error("a worker needs heads (`heads`) or a registry (`registry`) to find heads")]
    NoHeads,
    /// A setting breaks a rule; the message names it.
    #[error("invalid worker settings: {0}")]
    Settings(#[from] crate::config::ConfigError),
    /// The connect timeout or the largest backoff is zero.
    #[error("invalid worker settings: connect timeout and max backoff must be above zero")]
    ZeroDuration,
}

/// Builds and starts a worker; see [`Worker::builder`].
#[must_use]
pub struct WorkerBuilder {
    id: String,
    advertise: String,
    heads: Vec<String>,
    registry: Option<Registry>,
    connect_timeout: Duration,
    max_backoff: Duration,
    security: ClientSecurity,
}

/// Entry point of the worker API.
pub struct Worker;

impl Worker {
    /// Starts building a worker with the id `id` (unique in the cluster;
    /// letters, digits, `-`, `_`, `.`, at most 128 bytes).
    pub fn builder(id: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            id: id.into(),
            advertise: String::new(),
            heads: Vec::new(),
            registry: None,
            connect_timeout: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
            security: ClientSecurity::default(),
        }
    }
}

impl WorkerBuilder {
    /// Bootstrap addresses (host:port) of heads: the worker asks any of
    /// them for the live heads (`ListHeads`). Needs no Redis.
    pub fn heads<S: Into<String>>(mut self, heads: impl IntoIterator<Item = S>) -> Self {
        self.heads = heads.into_iter().map(Into::into).collect();
        self
    }

    /// Read the live heads from the registry too (after the heads, or
    /// alone when no head is given).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The address the worker reports to heads (shown in listings).
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = addr.into();
        self
    }

    /// Bound on dialing a head and on each call (default 2 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait between two rounds when no head takes the worker
    /// (default 5 s).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// TLS to heads and the bearer token (default: none).
    pub fn security(mut self, security: ClientSecurity) -> Self {
        self.security = security;
        self
    }

    /// Checks the settings and starts the attach loop on the current tokio
    /// runtime.
    pub fn spawn(self) -> Result<WorkerHandle, WorkerError> {
        crate::config::validate_id("worker id", &self.id)?;
        for h in &self.heads {
            crate::config::parse_head_addr(h)?;
        }
        if self.connect_timeout.is_zero() || self.max_backoff.is_zero() {
            return Err(WorkerError::ZeroDuration);
        }
        let mut sources = Vec::new();
        if !self.heads.is_empty() {
            sources.push(Source::Heads(self.heads));
        }
        if let Some(r) = self.registry {
            sources.push(Source::Registry(r));
        }
        if sources.is_empty() {
            return Err(WorkerError::NoHeads);
        }
        let (trigger, stop) = shutdown::channel();
        let (snapshot_tx, mut snapshot_rx) = watch::channel(Snapshot::default());
        let status = StatusReader(snapshot_rx.clone());
        let (attachment_tx, attachment_rx) = watch::channel(Attachment::default());
        let attach = tokio::spawn(attach::run(
            AttachConfig {
                worker_id: self.id,
                worker_addr: self.advertise,
                connect_timeout: self.connect_timeout,
                backoff_base: Duration::from_millis(100),
                backoff_max: self.max_backoff,
                security: self.security,
            },
            Discovery::new(sources),
            snapshot_tx,
            stop,
        ));
        // Ends when the attach loop drops its sender.
        let forward = tokio::spawn(async move {
            while snapshot_rx.changed().await.is_ok() {
                let now = Attachment::from(&*snapshot_rx.borrow_and_update());
                attachment_tx.send_if_modified(|a| {
                    let changed = *a != now;
                    *a = now;
                    changed
                });
            }
        });
        Ok(WorkerHandle {
            attachment: attachment_rx,
            status,
            trigger,
            tasks: [attach, forward],
        })
    }
}

/// A running worker. Dropping it stops the worker too, without waiting;
/// [`WorkerHandle::shutdown`] waits until its stream is closed.
pub struct WorkerHandle {
    attachment: watch::Receiver<Attachment>,
    /// The attach loop's snapshots, read on demand.
    status: StatusReader,
    trigger: ShutdownTrigger,
    /// The attach loop and the task that turns its snapshots into
    /// attachments.
    tasks: [JoinHandle<()>; 2],
}

impl WorkerHandle {
    /// Where the worker is attached, now and at every change.
    pub fn attachment(&self) -> watch::Receiver<Attachment> {
        self.attachment.clone()
    }

    /// Reads the worker's state on demand, including the beat timing that
    /// [`WorkerHandle::attachment`] does not announce.
    pub fn status_reader(&self) -> StatusReader {
        self.status.clone()
    }

    /// Stops the worker: its stream closes (the head releases the
    /// assignment) and the attach loop ends. Waits for both tasks.
    pub async fn shutdown(self) {
        self.trigger.trigger();
        let WorkerHandle { tasks, .. } = self;
        for t in tasks {
            let _ = t.await;
        }
    }
}
