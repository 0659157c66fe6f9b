//! The flags that most tests start heads and workers with: short enough
//! that a failover takes well under a second, long enough that a debug
//! build on a loaded two-core machine does not miss beats. Tests that need
//! other timings (chaos, the pause tests) say so next to their own flags.

use std::time::Duration;

/// Head timings for tests: beats every 200 ms, a peer is gone after
/// 600 ms of silence, a crashed head leaves the registry after 1 s.
pub const HEAD_ARGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "600ms",
    "--lease-ttl",
    "1s",
    "--shutdown-timeout",
    "2s",
];

/// Worker settings for tests: quick to give up on a dead head and quick
/// to retry when no head is there.
pub const WORKER_ARGS: &[&str] = &["--connect-timeout", "500ms", "--max-backoff", "500ms"];

/// Bound on a process starting: generous, a debug build on a loaded
/// two-core machine can be slow.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The readiness entry of a head in health.
pub const HEAD_SERVICE: &str = "tether.v1.HeadService";

/// The readiness entry of a worker in health.
pub const WORKER_SERVICE: &str = "tether.v1.WorkerService";

/// [`HEAD_ARGS`] with `extra` added; a flag of `extra` that
/// [`HEAD_ARGS`] also sets replaces its value there (the binaries refuse
/// a flag given twice).
pub fn head_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args: Vec<&str> = HEAD_ARGS.to_vec();
    let mut rest = Vec::new();
    let mut i = 0;
    while i < extra.len() {
        let flag = extra[i];
        match args.iter().position(|a| *a == flag) {
            Some(at) if i + 1 < extra.len() => {
                args[at + 1] = extra[i + 1];
                i += 2;
            }
            _ => {
                rest.push(flag);
                i += 1;
            }
        }
    }
    args.extend(rest);
    args
}
