//! What a scenario measured, printed as a table and written as JSON lines.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};

/// One figure: its name, our value, and the baseline's (and the limit's) where there is one.
#[derive(Debug, Clone)]
pub struct Figure {
    pub name: &'static str,
    pub measured: Value,
    pub baseline: Option<Value>,
    pub limit: Option<Value>,
}

/// A target and whether this run met it.
#[derive(Debug, Clone)]
pub struct Target {
    pub description: String,
    pub met: bool,
}

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct Record {
    pub name: String,
    pub parameters: Vec<(&'static str, Value)>,
    pub figures: Vec<Figure>,
    /// Our figure over the baseline's, for the figure named in `ratio_of`.
    pub ratio: Option<f64>,
    pub ratio_of: &'static str,
    pub baseline_name: String,
    /// A second reference measured in the same run (the HTTP scenarios: the fastest a file
    /// server reaches here), and our figure over its, for `ratio_of`.
    pub limit_name: Option<String>,
    pub limit_ratio: Option<f64>,
    pub targets: Vec<Target>,
}

impl Record {
    pub fn new(name: impl Into<String>, baseline_name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            parameters: Vec::new(),
            figures: Vec::new(),
            ratio: None,
            ratio_of: "",
            baseline_name: baseline_name.into(),
            limit_name: None,
            limit_ratio: None,
            targets: Vec::new(),
        }
    }

    pub fn param(&mut self, name: &'static str, value: impl Into<Value>) -> &mut Self {
        self.parameters.push((name, value.into()));
        self
    }

    /// A figure with no baseline counterpart.
    pub fn figure(&mut self, name: &'static str, measured: impl Into<Value>) -> &mut Self {
        self.figures.push(Figure { name, measured: measured.into(), baseline: None, limit: None });
        self
    }

    /// A figure measured for both.
    pub fn pair(
        &mut self,
        name: &'static str,
        measured: impl Into<Value>,
        baseline: impl Into<Value>,
    ) -> &mut Self {
        self.figures.push(Figure {
            name,
            measured: measured.into(),
            baseline: Some(baseline.into()),
            limit: None,
        });
        self
    }

    /// A figure measured for us, the baseline and the limit.
    pub fn triple(
        &mut self,
        name: &'static str,
        measured: impl Into<Value>,
        baseline: impl Into<Value>,
        limit: impl Into<Value>,
    ) -> &mut Self {
        self.figures.push(Figure {
            name,
            measured: measured.into(),
            baseline: Some(baseline.into()),
            limit: Some(limit.into()),
        });
        self
    }

    /// Name the limit column.
    pub fn limit(&mut self, name: impl Into<String>) -> &mut Self {
        self.limit_name = Some(name.into());
        self
    }

    /// Our figure over the limit's, for the figure named in `ratio_of`.
    pub fn limit_ratio(&mut self, ratio: f64) -> &mut Self {
        self.limit_ratio = Some(ratio);
        self
    }

    pub fn ratio(&mut self, of: &'static str, ratio: f64) -> &mut Self {
        self.ratio = Some(ratio);
        self.ratio_of = of;
        self
    }

    pub fn target(&mut self, description: impl Into<String>, met: bool) -> &mut Self {
        self.targets.push(Target { description: description.into(), met });
        self
    }

    /// One JSON object: name, parameters, measured and baseline figures, ratio, targets.
    pub fn to_json(&self) -> Value {
        let parameters: Map<String, Value> =
            self.parameters.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let measured: Map<String, Value> =
            self.figures.iter().map(|f| (f.name.to_owned(), f.measured.clone())).collect();
        let baseline: Map<String, Value> =
            self.figures.iter().filter_map(|f| f.baseline.clone().map(|b| (f.name.to_owned(), b))).collect();
        let limit: Map<String, Value> =
            self.figures.iter().filter_map(|f| f.limit.clone().map(|b| (f.name.to_owned(), b))).collect();
        let targets: Vec<Value> =
            self.targets.iter().map(|t| json!({ "target": t.description, "met": t.met })).collect();
        json!({
            "name": self.name,
            "parameters": parameters,
            "measured": measured,
            "baseline_name": self.baseline_name,
            "baseline": baseline,
            "ratio": self.ratio,
            "ratio_of": self.ratio_of,
            "limit_name": self.limit_name,
            "limit": limit,
            "limit_ratio": self.limit_ratio,
            "targets": targets,
        })
    }

    /// A Markdown table of the record.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let params: Vec<String> = self.parameters.iter().map(|(k, v)| format!("{k}={}", show(v))).collect();
        let _ = writeln!(out, "### {}\n\n{}\n", self.name, params.join(", "));
        let cell = |v: &Option<Value>| v.as_ref().map_or_else(|| "-".to_owned(), show);
        if let Some(limit_name) = &self.limit_name {
            let _ = writeln!(out, "| figure | dunite | {} | {limit_name} |", self.baseline_name);
            let _ = writeln!(out, "|---|---:|---:|---:|");
            for f in &self.figures {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} |",
                    f.name,
                    show(&f.measured),
                    cell(&f.baseline),
                    cell(&f.limit)
                );
            }
            let ratio = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("**{r:.3}**"));
            let _ = writeln!(
                out,
                "| **dunite / it** ({}) | | {} | {} |",
                self.ratio_of,
                ratio(self.ratio),
                ratio(self.limit_ratio)
            );
        } else {
            let _ = writeln!(out, "| figure | dunite | {} |", self.baseline_name);
            let _ = writeln!(out, "|---|---:|---:|");
            for f in &self.figures {
                let _ = writeln!(out, "| {} | {} | {} |", f.name, show(&f.measured), cell(&f.baseline));
            }
            if let Some(ratio) = self.ratio {
                let _ = writeln!(out, "| **ratio** ({}) | **{ratio:.3}** | |", self.ratio_of);
            }
        }
        out.push('\n');
        for t in &self.targets {
            let _ = writeln!(out, "- [{}] {}", if t.met { "met" } else { "MISSED" }, t.description);
        }
        out
    }
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => {
                if x.abs() >= 100.0 {
                    format!("{x:.0}")
                } else if x.abs() >= 1.0 {
                    format!("{x:.2}")
                } else {
                    format!("{x:.4}")
                }
            }
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Milliseconds, as a JSON-friendly float.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Microseconds, as a JSON-friendly float.
pub fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, d: std::time::Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}
