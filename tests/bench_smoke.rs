//! `tether-bench` runs every scenario to the end at a tiny size and writes
//! well-formed JSON, and its chart beside it where it draws one. Timings
//! are never asserted: this proves the bench works, not how fast Tether is
//! (that is `docs/BENCHMARKS.md`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The fleet of every scenario but `sweep`, which takes `--steps`.
const WORKERS: &[&str] = &["--workers", "20"];

/// Fast timings, shared by every scenario.
const SMALL: &[&str] = &[
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

/// What a scenario wrote: its JSON, parsed, and its chart if it drew one.
struct Written {
    json: serde_json::Value,
    svg: Option<String>,
}

/// Runs one scenario with `SMALL`, 20 workers and `extra`.
fn run_scenario(scenario: &str, extra: &[&str]) -> serde_json::Value {
    run_sized(scenario, WORKERS, extra).json
}

/// Runs one scenario with `SMALL`, `size` and `extra`; returns what it
/// wrote, the chart too (the JSON path with `.svg`).
fn run_sized(scenario: &str, size: &[&str], extra: &[&str]) -> Written {
    let json = json_path(scenario);
    let svg = json.with_extension("svg");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    let started = Instant::now();
    let output = Command::new(bench_binary())
        .arg(scenario)
        .args(SMALL)
        .args(size)
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
    let chart = std::fs::read_to_string(&svg).ok();
    let _ = std::fs::remove_file(&svg);
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
    Written {
        json: value,
        svg: chart,
    }
}

/// Asserts that `written` came with a chart that is SVG and draws at
/// least one line; returns the JSON.
fn with_chart(scenario: &str, written: Written) -> serde_json::Value {
    let svg = written
        .svg
        .unwrap_or_else(|| panic!("{scenario} wrote no chart next to its JSON"));
    assert!(
        svg.contains("<svg") && svg.contains("</svg>"),
        "{scenario}'s chart is not SVG:\n{svg}"
    );
    assert!(
        svg.contains("<polyline") || svg.contains("<path"),
        "{scenario}'s chart draws no line:\n{svg}"
    );
    written.json
}

/// True if the scenario's `results` hold `key`.
fn has_result(value: &serde_json::Value, key: &str) -> bool {
    value["results"].get(key).is_some()
}

#[test]
fn every_scenario_completes_and_writes_json() {
    let started = Instant::now();
    for scenario in ["failover", "hang", "drain"] {
        let written = run_sized(scenario, WORKERS, &["--heads", "2"]);
        let value = with_chart(scenario, written);
        let key = match scenario {
            "hang" => "move_p99_minus_timeout_ms",
            "drain" => "missed_beats",
            _ => "move_p99_ms",
        };
        assert!(has_result(&value, key), "{value}");
    }
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
    // The ratios may be null: at 20 workers the floor can use less than
    // one clock tick of CPU.
    for key in [
        "spurious_moves",
        "head_cpu_us_per_worker_second",
        "floor_cpu_us_per_worker_second",
        "head_cpu_over_floor",
        "head_rss_growth_kib_per_worker",
        "floor_rss_growth_kib_per_worker",
        "head_rss_over_floor",
    ] {
        assert!(has_result(&steady, key), "steady lacks {key}: {steady}");
    }
    assert!(
        steady["details"]["floor"]["beats_received"].as_u64() > Some(0),
        "the floor's workers got no beat: {steady}"
    );
    let floor = run_scenario("floor", &["--duration", "1s", "--warmup", "200ms"]);
    for key in [
        "cpu_percent",
        "sys_cpu_percent",
        "cpu_us_per_worker_second",
        "rss_growth_kib_per_worker",
        "beats_received",
        "workers_missing_beats",
    ] {
        assert!(has_result(&floor, key), "floor lacks {key}: {floor}");
    }
    let sweep = with_chart(
        "sweep",
        run_sized(
            "sweep",
            &["--steps", "10,20"],
            &["--duration", "1s", "--warmup", "200ms"],
        ),
    );
    let points = sweep["details"]["points"].as_array();
    assert_eq!(points.map(Vec::len), Some(2), "{sweep}");
    for point in points.into_iter().flatten() {
        assert!(
            point["floor"].is_object() && point["tether"].is_object(),
            "a sweep point lacks the floor or Tether: {point}"
        );
    }
    assert!(has_result(&sweep, "head_cpu_over_floor_20"), "{sweep}");
    let capacity = with_chart(
        "capacity",
        run_sized(
            "capacity",
            &["--steps", "10,20"],
            &["--hold", "1s", "--workers", "20"],
        ),
    );
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
