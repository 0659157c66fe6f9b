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
//! # Layout
//! - [`codec`]: the protobuf codec with small per-call buffers.
//! - [`pb`]: the generated protocol (`proto/tether/v1/tether.proto`) and
//!   the descriptor set that reflection serves.
//! - [`registry`]: everything in Redis: key layout, head leases,
//!   assignments with epochs in each head's hash (Lua scripts; epochs are
//!   decimal strings there, never Lua numbers).
//! - `events` (internal): membership events through Redis pub/sub.
//! - [`listing`]: `ListWorkers` in pages: sizes, the head's cut, the
//!   client loop that reads every page.
//! - [`placement`]: rendezvous ordering of heads for a worker.
//! - [`head`]: the head (files in `services/head/`).
//! - [`worker`]: the worker API over the attach loop.
//! - [`attach`]: the worker side of the protocol, shared by `tether-worker`
//!   and the benchmark.
//! - [`discovery`]: how a worker learns the heads: `ListHeads` on a
//!   bootstrap list, or the Redis registry.
//! - [`server`]: what every gRPC server shares: health, reflection, limits.
//! - [`security`]: optional TLS / mutual TLS and the bearer-token layer.
//! - [`config`]: flag types (durations, Redis URL, ids) and validation.
//! - [`telemetry`]: tracing set-up (text or JSON).
//! - [`metrics`]: Prometheus counters and histograms, and the metrics
//!   port's HTTP server (`/metrics`; a head adds its dashboard there).
//! - [`shutdown`]: signals and cancellation.
//! - [`backoff`]: capped exponential backoff with jitter.

#![warn(missing_docs)]

pub mod attach;
pub mod backoff;
pub mod codec;
pub mod config;
pub mod discovery;
pub(crate) mod events;
#[path = "../services/head/mod.rs"]
pub mod head;
pub mod listing;
pub mod metrics;
pub mod pb;
pub mod placement;
pub mod registry;
pub mod security;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod worker;
