//! `tether-bench` runs every scenario to the end at a tiny size and writes
//! well-formed JSON. Timings are never asserted: this proves the bench
//! works, not how fast Tether is (that is `docs/BENCHMARKS.md`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Fast timings and a tiny cluster, shared by every scenario.
const SMALL: &[&str] = &[
    "--workers",
    "20",
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "600ms",
    "--lease-ttl",
    "1s",
    "--attach-timeout",
    "30s",
];

/// `tether-bench` is its own workspace member (crates/tether-bench), so
/// Cargo gives this test no `CARGO_BIN_EXE_` for it: it is next to
/// `tether-head`, in target/<profile>/. `cargo test` at the root builds it
/// (it is a default member); `cargo test --test bench_smoke` alone does
/// not, hence the advice.
fn bench_binary() -> PathBuf {
    let path =
        std::path::Path::new(env!("CARGO_BIN_EXE_tether-head")).with_file_name("tether-bench");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p tether-bench` (or `cargo test` at the root, which builds it)",
        path.display()
    );
    path
}

fn json_path(scenario: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "tether-bench-smoke-{}-{scenario}.json",
        std::process::id()
    ))
}

/// Runs one scenario with `SMALL` plus `extra`; returns its JSON, parsed.
fn run_scenario(scenario: &str, extra: &[&str]) -> serde_json::Value {
    let json = json_path(scenario);
    let _ = std::fs::remove_file(&json);
    let started = Instant::now();
    let output = Command::new(bench_binary())
        .arg(scenario)
        .args(SMALL)
        .args(extra)
        .arg("--json")
        .arg(&json)
        .env_remove("RUST_LOG")
        .output()
        .expect("tether-bench starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "tether-bench {scenario} failed ({}) after {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status,
        started.elapsed()
    );
    assert!(
        stdout.contains(&format!("tether-bench {scenario}")),
        "no table on stdout:\n{stdout}"
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("{scenario} wrote no JSON at {}: {e}", json.display()));
    let _ = std::fs::remove_file(&json);
    let value: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{scenario} wrote malformed JSON ({e}):\n{text}"));
    assert_eq!(
        value["scenario"], scenario,
        "{scenario} JSON names another scenario:\n{text}"
    );
    for key in ["results", "machine"] {
        assert!(
            value[key].is_object(),
            "{scenario} JSON lacks the object {key:?}:\n{text}"
        );
    }
    value
}

/// True if the scenario's `results` hold `key`.
fn has_result(value: &serde_json::Value, key: &str) -> bool {
    value["results"].get(key).is_some()
}

#[test]
fn every_scenario_completes_and_writes_json() {
    let started = Instant::now();
    let failover = run_scenario("failover", &["--heads", "2"]);
    assert!(has_result(&failover, "move_p99_ms"), "{failover}");
    let hang = run_scenario("hang", &["--heads", "2"]);
    assert!(has_result(&hang, "move_p99_minus_timeout_ms"), "{hang}");
    let drain = run_scenario("drain", &["--heads", "2"]);
    assert!(has_result(&drain, "missed_beats"), "{drain}");
    let scale_up = run_scenario(
        "scale-up",
        &[
            "--heads",
            "2",
            "--rebalance-cooldown",
            "500ms",
            "--quiet",
            "1s",
        ],
    );
    assert!(has_result(&scale_up, "workers_moved"), "{scale_up}");
    let steady = run_scenario("steady", &["--duration", "2s", "--warmup", "200ms"]);
    assert!(has_result(&steady, "spurious_moves"), "{steady}");
    let capacity = run_scenario("capacity", &["--steps", "10,20", "--hold", "1s"]);
    assert!(has_result(&capacity, "largest_held"), "{capacity}");
    eprintln!("all scenarios ran in {:?}", started.elapsed());
}

#[test]
fn bad_flags_exit_with_a_usage_code() {
    let output = Command::new(bench_binary())
        .args([
            "steady",
            "--heartbeat-interval",
            "1s",
            "--heartbeat-timeout",
            "1s",
        ])
        .output()
        .expect("tether-bench starts");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--heartbeat-timeout"), "{stderr}");
}
