//! Tests that measure failover or balance times share a two-core machine
//! with each other; run in parallel, their timings would measure the
//! machine. Each such test holds [`ONE_AT_A_TIME`] for its whole run.
//! (Every test binary links its own copy, so binaries still run side by
//! side, as `cargo test` runs them one after the other anyway.)

use tokio::sync::Mutex;

/// Held by each timing-sensitive test of a test binary while it runs:
/// `let _serial = ONE_AT_A_TIME.lock().await;`
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());
