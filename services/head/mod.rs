//! The head as a library component, so that a Rust program can host
//! Tether's `HeadService` in its own process (and on its own tonic server),
//! and so that the head's logic can be tested in-process. `tether-head`
//! (`services/head/main.rs`) is this module plus flags and signals.
//!
//! A head is built once from validated [`HeadSettings`] and a registry
//! handle, then served on a listener the caller bound, until a shutdown
//! future completes (or a `Drain` call begins a drain):
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use tether::head::{Head, HeadSettings};
//! use tether::registry::Registry;
//!
//! let settings = HeadSettings::new("head-1").advertise("10.0.0.5:7070").validate()?;
//! let registry = Registry::new("redis://127.0.0.1:6379", "tether")?;
//! let head = Head::builder(settings).registry(registry).build()?;
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:7070").await?;
//! head.serve(listener, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! To serve your own gRPC services on the same port, extend the head's
//! router with [`Head::serve_with`] (see `examples/embed_head.rs`).
//!
//! # Layout (each file under `services/head/`)
//! - `run.rs`: wiring and the shutdown sequence.
//! - `service.rs`: `HeadService`: Reassign, Heartbeat, ListWorkers, Drain,
//!   WatchEvents, ListHeads.
//! - `heartbeat.rs`: one `Heartbeat` stream, served as its own response
//!   body, with one narrow `BeatContext` per head, shared by its streams.
//! - `attached.rs`: the table of open streams.
//! - `beat.rs`: the head's single beat timer.
//! - `lease.rs`: the lease loop: refresh, fencing, reclaim, readiness.
//! - `drain.rs`: scale-down: redirect every worker, wait for them to leave.
//! - `rebalance.rs`: scale-up and continuous balance.
//! - `heads_view.rs`: the cached live heads that `ListHeads` answers from.

pub(crate) mod attached;
pub(crate) mod beat;
pub(crate) mod dashboard;
pub(crate) mod drain;
pub(crate) mod heads_view;
pub(crate) mod heartbeat;
pub(crate) mod lease;
pub(crate) mod rebalance;
mod run;
pub(crate) mod service;

use crate::registry::Registry;
use crate::security::{ClientSecurity, ServerSecurity};
use crate::server::TetherRouter as Router;
use drain::Drain;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How a head behaves: its identity and timings. Build one with
/// [`HeadSettings::new`], adjust the fields, and check it with
/// [`HeadSettings::validate`], the one place where the cross-field rules
/// live (timeout above interval, lease TTL at least 2.5 intervals, ...).
/// The defaults are `tether-head`'s.
#[derive(Debug, Clone)]
pub struct HeadSettings {
    /// This head's id, unique in the cluster.
    pub id: String,
    /// Address workers should dial, as host:port; `None` for the bound
    /// address (127.0.0.1:PORT when bound to a wildcard).
    pub advertise: Option<String>,
    /// How often the head beats to each worker and refreshes its lease.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker counts as gone (and the head, for its
    /// workers). Must exceed the interval.
    pub heartbeat_timeout: Duration,
    /// Lifetime of the registry entry without a refresh.
    pub lease_ttl: Duration,
    /// How long a drain waits for the workers to move.
    pub drain_timeout: Duration,
    /// Bound on the last step of shutdown, after the drain.
    pub shutdown_timeout: Duration,
    /// ε of bounded-load placement, from 0.0 to 10.0.
    pub balance_slack: f64,
    /// Hard cap on adopted workers; 0 for none.
    pub capacity: u64,
    /// Workers per second the head may redirect for rebalancing.
    pub rebalance_rate: f64,
    /// A worker that attached more recently is not redirected to rebalance.
    pub rebalance_cooldown: Duration,
    /// Bound on open connections to the gRPC port.
    pub max_connections: usize,
    /// Connections idle this long are closed.
    pub idle_connection_timeout: Duration,
}

/// Settings that break a rule; the message names the setting. None is
/// retryable: the settings must change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// A rule shared with the flags: the id, the heartbeat timing, the
    /// lease TTL against the interval.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The advertised address is not host:port (or is over 256 bytes).
    #[error("--advertise {0:?} must be host:port")]
    Advertise(String),
    /// The balance slack is outside 0.0 to 10.0.
    #[error("balance slack {0} is not a number from 0.0 to 10.0")]
    BalanceSlack(f64),
    /// The rebalance rate is not above 0 (or is absurdly large).
    #[error("rebalance rate {0} is not a rate above 0 (workers per second)")]
    RebalanceRate(f64),
    /// No connection at all would be allowed.
    #[error("max connections must be at least 1")]
    MaxConnections,
}

impl HeadSettings {
    /// `tether-head`'s defaults under the id `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            advertise: None,
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(3),
            lease_ttl: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(5),
            balance_slack: 0.25,
            capacity: 0,
            rebalance_rate: 100.0,
            rebalance_cooldown: Duration::from_secs(10),
            max_connections: crate::server::default_max_connections(),
            idle_connection_timeout: Duration::from_secs(60),
        }
    }

    /// Sets the address workers should dial.
    pub fn advertise(mut self, addr: impl Into<String>) -> Self {
        self.advertise = Some(addr.into());
        self
    }

    /// Checks every rule, single-field and cross-field; the settings
    /// back when they hold.
    pub fn validate(self) -> Result<Self, SettingsError> {
        crate::config::validate_id("id", &self.id)?;
        crate::config::Timing {
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
        }
        .validate()?;
        crate::config::check_lease_ttl(self.lease_ttl, self.heartbeat_interval)?;
        if let Some(a) = &self.advertise {
            if a.len() > 256 || !a.contains(':') {
                return Err(SettingsError::Advertise(a.clone()));
            }
        }
        if !(0.0..=10.0).contains(&self.balance_slack) {
            return Err(SettingsError::BalanceSlack(self.balance_slack));
        }
        if !(self.rebalance_rate > 0.0 && self.rebalance_rate <= 1e6) {
            return Err(SettingsError::RebalanceRate(self.rebalance_rate));
        }
        if self.max_connections == 0 {
            return Err(SettingsError::MaxConnections);
        }
        Ok(self)
    }
}

/// Why a head could not start, or stopped other than when asked.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The builder lacks something, or the gRPC server could not be set
    /// up (TLS material, ...). Not retryable without a change.
    #[error("{0}")]
    Setup(String),
    /// The settings break a rule.
    #[error("invalid settings: {0}")]
    Settings(#[from] SettingsError),
    /// A live head of another instance holds this id in the registry.
    #[error("head id {0:?} is in use by another live head")]
    IdInUse(String),
    /// Another head took this head's id over while it ran.
    #[error("head {0:?} was displaced by another head under its id")]
    Displaced(String),
    /// The gRPC server stopped on its own.
    #[error("the gRPC server stopped on its own: {0}")]
    ServerStopped(String),
    /// The lease loop stopped on its own (a bug).
    #[error("the lease loop stopped on its own: {0}")]
    LeaseLoopStopped(String),
}

/// Builds a [`Head`]; see [`Head::builder`].
#[must_use]
pub struct HeadBuilder {
    settings: HeadSettings,
    registry: Option<Registry>,
    security: ServerSecurity,
    client: ClientSecurity,
    metrics: Option<TcpListener>,
}

impl HeadBuilder {
    /// The registry the head leases in and assigns workers through
    /// (required).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// TLS and the bearer token of the gRPC port (default: none).
    pub fn security(mut self, security: ServerSecurity) -> Self {
        self.security = security;
        self
    }

    /// How the head dials other heads (TLS, token) when its dashboard
    /// lists their workers (default: plaintext, no token).
    pub fn client_security(mut self, client: ClientSecurity) -> Self {
        self.client = client;
        self
    }

    /// Serves Prometheus `GET /metrics` and the dashboard (`GET /`, see
    /// docs/operations.md) on `listener` while the head runs.
    pub fn metrics(mut self, listener: TcpListener) -> Self {
        self.metrics = Some(listener);
        self
    }

    /// Checks the settings and returns the head, not yet serving.
    pub fn build(self) -> Result<Head, HeadError> {
        let settings = self.settings.validate()?;
        let registry = self
            .registry
            .ok_or_else(|| HeadError::Setup("a head needs a registry".to_owned()))?;
        Ok(Head {
            drain: Arc::new(Drain::new(settings.drain_timeout)),
            settings,
            registry,
            security: self.security,
            client: self.client,
            metrics: self.metrics,
        })
    }
}

/// A Tether head, ready to serve. See the [module docs](self).
pub struct Head {
    settings: HeadSettings,
    registry: Registry,
    security: ServerSecurity,
    client: ClientSecurity,
    metrics: Option<TcpListener>,
    drain: Arc<Drain>,
}

impl Head {
    /// Starts building a head with `settings`.
    pub fn builder(settings: HeadSettings) -> HeadBuilder {
        HeadBuilder {
            settings,
            registry: None,
            security: ServerSecurity::default(),
            client: ClientSecurity::default(),
            metrics: None,
        }
    }

    /// A handle that begins a drain or tells whether one has begun; it
    /// stays valid while the head serves.
    pub fn handle(&self) -> HeadHandle {
        HeadHandle {
            drain: self.drain.clone(),
        }
    }

    /// Serves `HeadService`, health and reflection on `listener` until
    /// `shutdown` completes or a `Drain` call begins a drain; then hands
    /// every worker to another head, leaves the registry and stops. Ends
    /// with `Ok` after such a clean exit. Dropping the future exits at
    /// once (the workers then fail over).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), HeadError> {
        run::run(self, listener, |r| r, shutdown).await
    }

    /// [`Head::serve`], with `extend` adding the caller's own services to
    /// the head's router, so that they share its port, limits, TLS and
    /// bearer-token layer:
    ///
    /// ```no_run
    /// # async fn example(head: tether::head::Head, listener: tokio::net::TcpListener) {
    /// # let my_service = tonic_health::server::health_reporter().1;
    /// head.serve_with(listener, std::future::pending(), |router| {
    ///     router.add_service(my_service)
    /// })
    /// .await
    /// .unwrap();
    /// # }
    /// ```
    pub async fn serve_with(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        extend: impl FnOnce(Router) -> Router,
    ) -> Result<(), HeadError> {
        run::run(self, listener, extend, shutdown).await
    }
}

/// Begins a head's drain from elsewhere (a signal handler, an admin
/// endpoint), as the `Drain` RPC does. Cheap to clone.
#[derive(Clone)]
pub struct HeadHandle {
    drain: Arc<Drain>,
}

impl HeadHandle {
    /// Begins the drain (once; later calls change nothing).
    pub fn drain(&self) {
        self.drain.begin();
    }

    /// True once a drain has begun, by this handle, the `Drain` RPC or the
    /// shutdown future.
    pub fn draining(&self) -> bool {
        self.drain.begun()
    }
}
