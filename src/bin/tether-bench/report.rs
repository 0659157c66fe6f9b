//! What a scenario hands back: a small table for people and a JSON
//! document for scripts, built from the same values so the two never
//! disagree.
//!
//! The JSON is written by hand: it is a few dozen fields, not worth a
//! serialisation dependency.

use std::fmt::Write as _;
use std::path::Path;

/// A JSON value, just enough of it for the reports.
#[derive(Debug, Clone)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// An object from `(key, value)` pairs, in order.
    pub fn obj<K: Into<String>>(fields: impl IntoIterator<Item = (K, Json)>) -> Json {
        Json::Obj(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A number of milliseconds from a duration, to 0.1 ms.
    pub fn ms(d: std::time::Duration) -> Json {
        Json::Num((d.as_secs_f64() * 10_000.0).round() / 10.0)
    }

    /// Writes the value as compact JSON.
    pub fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Int(i) => {
                let _ = write!(out, "{i}");
            }
            // JSON has no NaN or infinity.
            Json::Num(n) if !n.is_finite() => out.push_str("null"),
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => write_str(s, out),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Self {
        Json::Str(s.to_owned())
    }
}

impl From<String> for Json {
    fn from(s: String) -> Self {
        Json::Str(s)
    }
}

impl From<bool> for Json {
    fn from(b: bool) -> Self {
        Json::Bool(b)
    }
}

impl From<f64> for Json {
    fn from(n: f64) -> Self {
        Json::Num(n)
    }
}

impl From<u64> for Json {
    fn from(n: u64) -> Self {
        Json::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<usize> for Json {
    fn from(n: usize) -> Self {
        Json::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

impl From<i64> for Json {
    fn from(n: i64) -> Self {
        Json::Int(n)
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One row of the table, also one field of `results` in the JSON.
#[derive(Debug)]
struct Metric {
    key: String,
    label: String,
    value: Json,
    shown: String,
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
            shown,
        });
    }

    /// Adds a duration row, shown and stored in milliseconds.
    pub fn metric_ms(&mut self, key: &str, label: &str, d: Option<std::time::Duration>) {
        let (value, shown) = match d {
            Some(d) => (Json::ms(d), format!("{:.1} ms", d.as_secs_f64() * 1000.0)),
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
                    Json::Str(text) => s.push_str(text),
                    other => other.write(&mut s),
                }
                format!("{k}={s}")
            })
            .collect();
        let _ = writeln!(out, "  {}", config.join(" "));
        let width = self
            .metrics
            .iter()
            .map(|m| m.label.len())
            .max()
            .unwrap_or(0);
        for m in &self.metrics {
            let _ = writeln!(out, "  {:<width$}  {}", m.label, m.shown);
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
        let doc = Json::obj([
            ("bench", Json::from("tether-bench")),
            ("version", Json::from(env!("CARGO_PKG_VERSION"))),
            ("scenario", Json::from(self.scenario)),
            ("machine", machine),
            ("config", Json::Obj(self.config.clone())),
            (
                "results",
                Json::Obj(
                    self.metrics
                        .iter()
                        .map(|m| (m.key.clone(), m.value.clone()))
                        .collect(),
                ),
            ),
            ("details", Json::Obj(self.details.clone())),
            (
                "targets",
                Json::Arr(
                    self.targets
                        .iter()
                        .map(|t| {
                            Json::obj([
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
                Json::Arr(self.notes.iter().map(|n| Json::from(n.as_str())).collect()),
            ),
        ]);
        let mut out = String::new();
        doc.write(&mut out);
        out.push('\n');
        out
    }

    /// Writes the JSON document to `path`.
    pub fn write_json(&self, path: &Path, machine: Json) -> std::io::Result<()> {
        std::fs::write(path, self.json(machine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_escapes_and_nests() {
        let v = Json::obj([
            ("a", Json::from("x\"y\n\u{1}")),
            (
                "b",
                Json::Arr(vec![Json::Int(1), Json::Num(0.5), Json::Null]),
            ),
            ("c", Json::Num(f64::NAN)),
        ]);
        let mut s = String::new();
        v.write(&mut s);
        assert_eq!(s, r#"{"a":"x\"y\n\u0001","b":[1,0.5,null],"c":null}"#);
    }
}
