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

fn json_path(scenario: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "tether-bench-smoke-{}-{scenario}.json",
        std::process::id()
    ))
}

/// Runs one scenario with `SMALL` plus `extra`; returns its JSON text.
fn run_scenario(scenario: &str, extra: &[&str]) -> String {
    let json = json_path(scenario);
    let _ = std::fs::remove_file(&json);
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_tether-bench"))
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
    if let Err(at) = check_json(&text) {
        panic!("{scenario} wrote malformed JSON (at byte {at}):\n{text}");
    }
    for key in [
        format!("\"scenario\":\"{scenario}\""),
        "\"results\":{".to_owned(),
        "\"machine\":{".to_owned(),
    ] {
        assert!(text.contains(&key), "{scenario} JSON lacks {key}:\n{text}");
    }
    text
}

#[test]
fn every_scenario_completes_and_writes_json() {
    let started = Instant::now();
    let failover = run_scenario("failover", &["--heads", "2"]);
    assert!(failover.contains("\"move_p99_ms\":"), "{failover}");
    let hang = run_scenario("hang", &["--heads", "2"]);
    assert!(hang.contains("\"move_p99_minus_timeout_ms\":"), "{hang}");
    let drain = run_scenario("drain", &["--heads", "2"]);
    assert!(drain.contains("\"missed_beats\":"), "{drain}");
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
    assert!(scale_up.contains("\"workers_moved\":"), "{scale_up}");
    let steady = run_scenario("steady", &["--duration", "2s", "--warmup", "200ms"]);
    assert!(steady.contains("\"spurious_moves\":"), "{steady}");
    let capacity = run_scenario("capacity", &["--steps", "10,20", "--hold", "1s"]);
    assert!(capacity.contains("\"largest_held\":"), "{capacity}");
    eprintln!("all scenarios ran in {:?}", started.elapsed());
}

#[test]
fn bad_flags_exit_with_a_usage_code() {
    let output = Command::new(env!("CARGO_BIN_EXE_tether-bench"))
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

/// Checks that `text` is one JSON value (RFC 8259 grammar) followed by
/// whitespace only; on failure, the byte offset where it went wrong.
fn check_json(text: &str) -> Result<(), usize> {
    let bytes = text.as_bytes();
    let mut at = 0;
    value(bytes, &mut at)?;
    skip_ws(bytes, &mut at);
    if at == bytes.len() {
        Ok(())
    } else {
        Err(at)
    }
}

fn skip_ws(b: &[u8], at: &mut usize) {
    while *at < b.len() && matches!(b[*at], b' ' | b'\n' | b'\r' | b'\t') {
        *at += 1;
    }
}

fn expect(b: &[u8], at: &mut usize, c: u8) -> Result<(), usize> {
    skip_ws(b, at);
    if b.get(*at) == Some(&c) {
        *at += 1;
        Ok(())
    } else {
        Err(*at)
    }
}

fn value(b: &[u8], at: &mut usize) -> Result<(), usize> {
    skip_ws(b, at);
    match b.get(*at) {
        Some(b'{') => {
            *at += 1;
            skip_ws(b, at);
            if b.get(*at) == Some(&b'}') {
                *at += 1;
                return Ok(());
            }
            loop {
                skip_ws(b, at);
                string(b, at)?;
                expect(b, at, b':')?;
                value(b, at)?;
                skip_ws(b, at);
                match b.get(*at) {
                    Some(b',') => *at += 1,
                    Some(b'}') => {
                        *at += 1;
                        return Ok(());
                    }
                    _ => return Err(*at),
                }
            }
        }
        Some(b'[') => {
            *at += 1;
            skip_ws(b, at);
            if b.get(*at) == Some(&b']') {
                *at += 1;
                return Ok(());
            }
            loop {
                value(b, at)?;
                skip_ws(b, at);
                match b.get(*at) {
                    Some(b',') => *at += 1,
                    Some(b']') => {
                        *at += 1;
                        return Ok(());
                    }
                    _ => return Err(*at),
                }
            }
        }
        Some(b'"') => string(b, at),
        Some(b't') => literal(b, at, b"true"),
        Some(b'f') => literal(b, at, b"false"),
        Some(b'n') => literal(b, at, b"null"),
        Some(c) if *c == b'-' || c.is_ascii_digit() => number(b, at),
        _ => Err(*at),
    }
}

fn literal(b: &[u8], at: &mut usize, word: &[u8]) -> Result<(), usize> {
    if b[*at..].starts_with(word) {
        *at += word.len();
        Ok(())
    } else {
        Err(*at)
    }
}

fn string(b: &[u8], at: &mut usize) -> Result<(), usize> {
    if b.get(*at) != Some(&b'"') {
        return Err(*at);
    }
    *at += 1;
    while let Some(&c) = b.get(*at) {
        match c {
            b'"' => {
                *at += 1;
                return Ok(());
            }
            b'\\' => match b.get(*at + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *at += 2,
                Some(b'u')
                    if b.len() >= *at + 6
                        && b[*at + 2..*at + 6].iter().all(u8::is_ascii_hexdigit) =>
                {
                    *at += 6
                }
                _ => return Err(*at),
            },
            c if c < 0x20 => return Err(*at),
            _ => *at += 1,
        }
    }
    Err(*at)
}

fn number(b: &[u8], at: &mut usize) -> Result<(), usize> {
    let start = *at;
    if b.get(*at) == Some(&b'-') {
        *at += 1;
    }
    let digits = |at: &mut usize| {
        let from = *at;
        while b.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        *at > from
    };
    if !digits(at) {
        return Err(start);
    }
    if b.get(*at) == Some(&b'.') {
        *at += 1;
        if !digits(at) {
            return Err(*at);
        }
    }
    if matches!(b.get(*at), Some(b'e' | b'E')) {
        *at += 1;
        if matches!(b.get(*at), Some(b'+' | b'-')) {
            *at += 1;
        }
        if !digits(at) {
            return Err(*at);
        }
    }
    Ok(())
}

#[test]
fn the_json_checker_rejects_what_it_should() {
    assert!(check_json(r#"{"a":[1,-2.5e3,true,null,"x\"\u00e9"],"b":{}}"#).is_ok());
    for bad in [
        "{",
        r#"{"a":}"#,
        "[1,]",
        "01x",
        r#"{"a" 1}"#,
        "NaN",
        "\"\n\"",
    ] {
        assert!(check_json(bad).is_err(), "accepted {bad:?}");
    }
}
