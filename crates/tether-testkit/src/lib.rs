//! Tether's test harness, in its own crate so that the `tether` library
//! that users depend on ships none of it: the root package uses it only
//! as a dev-dependency, and `tether-bench` as a normal one.
//!
//! # Layout
//! - [`localcluster`]: a real `redis-server` on a free port, `tether-head`
//!   and `tether-worker` processes on free ports, signals, gRPC probes and
//!   a blocking Redis command (the `redis` crate's client).
//! - [`timings`]: the short head and worker flags that keep the suite fast.
//! - [`serial`]: the lock that makes the timing-sensitive tests of one test
//!   binary run one at a time.
//! - [`moves`]: waiting for a set of workers to be attached elsewhere.

pub mod localcluster;
pub mod moves;
pub mod serial;
pub mod timings;

pub use serial::ONE_AT_A_TIME;
