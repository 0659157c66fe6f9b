//! `tether-bench --help` names every scenario. Also the reason Cargo
//! builds the `tether-bench` executable during `cargo test` at the
//! workspace root: an integration test of the package needs it, and the
//! root package's `tests/bench_smoke.rs` runs the same executable.

use std::process::Command;

#[test]
fn help_lists_every_scenario() {
    let output = Command::new(env!("CARGO_BIN_EXE_tether-bench"))
        .arg("--help")
        .output()
        .expect("tether-bench starts");
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for scenario in [
        "failover", "hang", "drain", "scale-up", "steady", "floor", "sweep", "capacity",
    ] {
        assert!(help.contains(scenario), "--help lacks {scenario}:\n{help}");
    }
    assert!(
        !help.contains("floor-server"),
        "--help shows the hidden floor-server:\n{help}"
    );
}
