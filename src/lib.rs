//! Tether keeps every worker of an elastic cluster attached to exactly one
//! live head while heads come and go.
//!
//! Heads register in Redis under a lease and stream heartbeats to their
//! workers over bidirectional gRPC streams; when a head vanishes, its
//! workers pick another live head (from any head's `ListHeads`, or from the
//! registry) and move there with a `Reassign` call, whose per-assignment
//! secret the new stream must present.
//!
//! # Using it as a library
//! - [`head`]: run a head in your program (`Head::builder(settings)
//!   .registry(..).build()?.serve(listener, shutdown)`), or next to your
//!   own gRPC services on one port (`serve_with`).
//! - [`worker`]: keep your program attached (`Worker::builder(id)
//!   .heads(..).spawn()?`), watch its [`worker::Attachment`], and
//!   `shutdown().await`.
//!
//! The feature `mimalloc` (default) only sets `tether-head`'s allocator;
//! `default-features = false` leaves the library without it.
//!
//! # Public API
//! - [`head`] and [`worker`], above.
//! - [`pb`]: the generated protocol (`proto/tether/v1/tether.proto`) and
//!   the descriptor set that reflection serves, for clients of the gRPC
//!   API.
//! - [`registry`]: the Redis registry a head needs ([`registry::Registry`],
//!   [`registry::RegistryError`]), and a worker may read heads from.
//! - [`security`]: TLS / mutual TLS and the bearer token, for
//!   [`head::HeadBuilder::security`] and [`worker::WorkerBuilder::security`].
//! - [`shutdown`]: signals and the cancellation handle a head's or
//!   worker's owner can use.
//! - [`ConfigError`]: why an id, a duration or a timing setting is refused
//!   (inside [`head::SettingsError`] and [`worker::WorkerError`]).
//!
//! # Layout
//! Internal modules (`pub(crate)`):
//! - `codec`: the protobuf codec with small per-call buffers.
//! - `events`: membership events through Redis pub/sub.
//!
//! Public but hidden from the documentation: not part of the API, no
//! stability promised, `pub` only because a binary, `tether-bench`, the
//! test harness or the tests of this package (all outside the crate) use
//! them:
//! - `attach`: the worker side of the protocol, under [`worker`];
//!   `tether-bench` runs thousands of these loops and reads their raw
//!   snapshots.
//! - `discovery`: how a worker learns the heads (`ListHeads` on a
//!   bootstrap list, or the registry); named by `attach::run`.
//! - `config`: flag types (durations, Redis URL, ids), the binaries' clap
//!   arguments and validation; the binaries and the bench.
//! - `listing`: `ListWorkers` in pages and the client loop that reads
//!   every page; `tetherctl` and the test harness.
//! - `placement`: rendezvous ordering and the load bound; tests predict
//!   where a worker goes with it.
//! - `server`: what every gRPC server shares (health, reflection, limits,
//!   binding); `tether-worker` and the bench.
//! - `metrics`: Prometheus metrics and the metrics port's HTTP server;
//!   `tether-worker` serves them.
//! - `telemetry`: tracing set-up (text or JSON); the binaries and the
//!   bench.
//! - `backoff`: capped exponential backoff with jitter; `tetherctl`.

#![warn(missing_docs)]

// Hidden modules: `pub` for the users outside the crate named in the
// crate doc's "Layout"; not part of the API.
#[doc(hidden)]
pub mod attach;
#[doc(hidden)]
pub mod backoff;
pub(crate) mod codec;
#[doc(hidden)]
pub mod config;
pub(crate) mod direct;
#[doc(hidden)]
pub mod discovery;
pub(crate) mod events;
#[path = "../services/head/mod.rs"]
pub mod head;
#[doc(hidden)]
pub mod listing;
#[doc(hidden)]
pub mod metrics;
pub mod pb;
#[doc(hidden)]
pub mod placement;
pub mod registry;
pub mod security;
#[doc(hidden)]
pub mod server;
pub mod shutdown;
#[doc(hidden)]
pub mod telemetry;
pub mod worker;

pub use config::ConfigError;
