//! What a scenario hands back: a small table for people, a JSON document
//! for scripts, built from the same values so the two never disagree, and
//! sometimes a chart (`plot`) to look at.
//!
//! The JSON is `serde_json`'s, with objects in insertion order
//! (`preserve_order`), so fields appear as the scenario adds them.

use crate::plot::Chart;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A JSON value of the reports.
pub type Json = serde_json::Value;

/// An object from `(key, value)` pairs, in order.
pub fn obj<K: Into<String>>(fields: impl IntoIterator<Item = (K, Json)>) -> Json {
    Json::Object(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// A number of milliseconds from a duration, to 0.1 ms.
pub fn json_ms(d: std::time::Duration) -> Json {
    Json::from((d.as_secs_f64() * 10_000.0).round() / 10.0)
}

/// One row of the table, also one field of `results` in the JSON.
#[derive(Debug)]
struct Metric {
    key: String,
    label: String,
    value: Json,
    /// The cell text; `None` for a value only in the JSON (another row
    /// shows it).
    shown: Option<String>,
}

/// A target of the issue, checked against a measurement.
#[derive(Debug)]
struct Target {
    name: String,
    goal: String,
    measured: String,
    met: bool,
}

/// The outcome of one scenario run.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    config: Vec<(String, Json)>,
    metrics: Vec<Metric>,
    /// JSON-only details: per-head loads, per-step rows, command counts.
    details: Vec<(String, Json)>,
    targets: Vec<Target>,
    notes: Vec<String>,
    /// The picture of the results, written next to the JSON.
    chart: Option<Chart>,
}

impl Report {
    /// An empty report of `scenario`.
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            config: Vec::new(),
            metrics: Vec::new(),
            details: Vec::new(),
            targets: Vec::new(),
            notes: Vec::new(),
            chart: None,
        }
    }

    /// Records a setting the run used.
    pub fn config(&mut self, key: &str, value: impl Into<Json>) {
        self.config.push((key.to_owned(), value.into()));
    }

    /// Adds a table row and a `results` field. `shown` is the cell text.
    pub fn metric(&mut self, key: &str, label: &str, value: impl Into<Json>, shown: String) {
        self.metrics.push(Metric {
            key: key.to_owned(),
            label: label.to_owned(),
            value: value.into(),
            shown: Some(shown),
        });
    }

    /// Adds a `results` field with no row of its own: a number that
    /// another row shows, such as a ratio beside what it divides.
    pub fn result(&mut self, key: &str, value: impl Into<Json>) {
        self.metrics.push(Metric {
            key: key.to_owned(),
            label: String::new(),
            value: value.into(),
            shown: None,
        });
    }

    /// The `results` object of the JSON, for a report kept inside
    /// another one (the floor inside `steady`, each step of `sweep`).
    pub fn results(&self) -> Json {
        Json::Object(
            self.metrics
                .iter()
                .map(|m| (m.key.clone(), m.value.clone()))
                .collect(),
        )
    }

    /// Sets the chart written next to the JSON.
    pub fn chart(&mut self, chart: Chart) {
        self.chart = Some(chart);
    }

    /// Adds a duration row, shown and stored in milliseconds.
    pub fn metric_ms(&mut self, key: &str, label: &str, d: Option<std::time::Duration>) {
        let (value, shown) = match d {
            Some(d) => (json_ms(d), format!("{:.1} ms", d.as_secs_f64() * 1000.0)),
            None => (Json::Null, "-".to_owned()),
        };
        self.metric(key, label, value, shown);
    }

    /// Adds a count row.
    pub fn metric_count(&mut self, key: &str, label: &str, n: impl Into<u64>) {
        let n = n.into();
        self.metric(key, label, n, n.to_string());
    }

    /// Adds a JSON-only detail.
    pub fn detail(&mut self, key: &str, value: Json) {
        self.details.push((key.to_owned(), value));
    }

    /// Checks a target: `goal` and `measured` are the texts shown.
    pub fn target(&mut self, name: &str, goal: String, measured: String, met: bool) {
        self.targets.push(Target {
            name: name.to_owned(),
            goal,
            measured,
            met,
        });
    }

    /// A remark printed under the table and kept in the JSON.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The table, as printed on stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "tether-bench {}", self.scenario);
        let config: Vec<String> = self
            .config
            .iter()
            .map(|(k, v)| {
                let mut s = String::new();
                match v {
                    Json::String(text) => s.push_str(text),
                    other => s.push_str(&other.to_string()),
                }
                format!("{k}={s}")
            })
            .collect();
        let _ = writeln!(out, "  {}", config.join(" "));
        let rows = || {
            self.metrics
                .iter()
                .filter_map(|m| Some((m.label.as_str(), m.shown.as_deref()?)))
        };
        let width = rows()
            .map(|(label, _)| label.chars().count())
            .max()
            .unwrap_or(0);
        for (label, shown) in rows() {
            let _ = writeln!(out, "  {label:<width$}  {shown}");
        }
        if !self.targets.is_empty() {
            let width = self.targets.iter().map(|t| t.name.len()).max().unwrap_or(0);
            let _ = writeln!(out, "  targets:");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "    {:<width$}  {:<6}  goal {}, measured {}",
                    t.name,
                    if t.met { "met" } else { "MISSED" },
                    t.goal,
                    t.measured
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        out
    }

    /// The JSON document, with the machine description around it.
    pub fn json(&self, machine: Json) -> String {
        let doc = obj([
            ("bench", Json::from("tether-bench")),
            ("version", Json::from(env!("CARGO_PKG_VERSION"))),
            ("scenario", Json::from(self.scenario)),
            ("machine", machine),
            ("config", obj(self.config.clone())),
            ("results", self.results()),
            ("details", obj(self.details.clone())),
            (
                "targets",
                Json::Array(
                    self.targets
                        .iter()
                        .map(|t| {
                            obj([
                                ("name", Json::from(t.name.as_str())),
                                ("goal", Json::from(t.goal.as_str())),
                                ("measured", Json::from(t.measured.as_str())),
                                ("met", Json::from(t.met)),
                            ])
                        })
                        .collect(),
                ),
            ),
            (
                "notes",
                Json::Array(self.notes.iter().map(|n| Json::from(n.as_str())).collect()),
            ),
        ]);
        let mut out = doc.to_string();
        out.push('\n');
        out
    }

    /// Writes the JSON document to `path`.
    pub fn write_json(&self, path: &Path, machine: Json) -> std::io::Result<()> {
        std::fs::write(path, self.json(machine))
    }

    /// Writes the chart, if the scenario drew one, next to the JSON at
    /// `json_path`: the same name with `.svg`. Returns where.
    pub fn write_chart(&self, json_path: &Path) -> Result<Option<PathBuf>, String> {
        let Some(chart) = &self.chart else {
            return Ok(None);
        };
        let path = json_path.with_extension("svg");
        let svg = chart.svg()?;
        std::fs::write(&path, svg).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keeps_field_order_and_has_no_nan() {
        let v = obj([
            ("z", Json::from("x\"y\n\u{1}")),
            (
                "a",
                Json::Array(vec![Json::from(1), Json::from(0.5), Json::Null]),
            ),
            ("c", Json::from(f64::NAN)),
        ]);
        assert_eq!(
            v.to_string(),
            r#"{"z":"x\"y\n\u0001","a":[1,0.5,null],"c":null}"#
        );
    }
}
