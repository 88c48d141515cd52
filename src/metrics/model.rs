//! Metric families as herdsman renders them, and the two text formats: Prometheus text 0.0.4
//! and OpenMetrics 1.0.
//!
//! The differences that matter here: a counter's family is `x_total` in 0.0.4 and `x` in
//! OpenMetrics (its sample is `x_total` in both); OpenMetrics says `unknown` where 0.0.4 says
//! `untyped`, escapes `"` in HELP, has no `_created` in 0.0.4, and ends with `# EOF`.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "untyped" | "unknown" => Kind::Untyped,
            _ => return None,
        })
    }

    fn name(self, om: bool) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
            Kind::Untyped if om => "unknown",
            Kind::Untyped => "untyped",
        }
    }

    /// The sample-name suffixes a family of this kind may have.
    pub fn suffixes(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &["_total", "_created"],
            Kind::Histogram => &["_bucket", "_sum", "_count", "_created"],
            Kind::Summary => &["", "_sum", "_count", "_created"],
            Kind::Gauge | Kind::Untyped => &[""],
        }
    }
}

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`
    Text,
    /// `application/openmetrics-text; version=1.0.0`
    OpenMetrics,
}

impl Format {
    /// From a scraper's `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.to_ascii_lowercase().contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Appended to the family name: `""`, `"_total"`, `"_bucket"`, ...
    pub suffix: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The family name; for counters without `_total`.
    pub name: String,
    pub help: String,
    pub kind: Kind,
    pub samples: Vec<Sample>,
}

impl Family {
    pub fn new(name: &str, kind: Kind, help: &str) -> Family {
        Family { name: name.to_string(), help: help.to_string(), kind, samples: Vec::new() }
    }

    /// Adds a sample; a counter's value sample gets `_total`.
    pub fn push(&mut self, labels: &[(&str, &str)], value: f64) {
        let suffix = if self.kind == Kind::Counter { "_total" } else { "" };
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.push(Sample { suffix, labels, value });
    }
}

/// A fixed-bucket histogram (`le` upper bounds, not cumulative counts).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn family(&self, name: &str, help: &str) -> Family {
        let mut f = Family::new(name, Kind::Histogram, help);
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let le = float_label(*b);
            f.samples.push(Sample { suffix: "_bucket", labels: vec![("le".into(), le)], value: acc as f64 });
        }
        let inf = vec![("le".to_string(), "+Inf".to_string())];
        f.samples.push(Sample { suffix: "_bucket", labels: inf, value: self.count as f64 });
        f.samples.push(Sample { suffix: "_sum", labels: vec![], value: self.sum });
        f.samples.push(Sample { suffix: "_count", labels: vec![], value: self.count as f64 });
        f
    }
}

/// `1.0`, `0.25`, `+Inf`: the canonical form both formats' parsers accept for `le`.
fn float_label(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 { format!("{v:.1}") } else { value(v) }
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
pub fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn escape_label(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(s: &str, om: bool, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if om => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// Writes `families` in `format` (without the OpenMetrics `# EOF`: see [`finish`]).
pub fn render(families: &[Family], format: Format, out: &mut String) {
    let om = format == Format::OpenMetrics;
    for f in families {
        if f.samples.is_empty() && f.kind == Kind::Untyped {
            continue;
        }
        let head = if f.kind == Kind::Counter && !om { format!("{}_total", f.name) } else { f.name.clone() };
        out.push_str("# HELP ");
        out.push_str(&head);
        out.push(' ');
        escape_help(&f.help, om, out);
        out.push('\n');
        let _ = writeln!(out, "# TYPE {head} {}", f.kind.name(om));
        for s in &f.samples {
            if !om && s.suffix == "_created" {
                continue;
            }
            out.push_str(&f.name);
            out.push_str(s.suffix);
            if !s.labels.is_empty() {
                out.push('{');
                for (i, (k, v)) in s.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(k);
                    out.push_str("=\"");
                    escape_label(v, out);
                    out.push('"');
                }
                out.push('}');
            }
            out.push(' ');
            out.push_str(&value(s.value));
            out.push('\n');
        }
    }
}

/// Ends a page: OpenMetrics needs `# EOF`.
pub fn finish(format: Format, out: &mut String) {
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_per_format() {
        let mut f = Family::new("herdsman_reloads", Kind::Counter, "Reloads \"done\".");
        f.push(&[("result", "ok")], 2.0);
        let mut t = String::new();
        render(&[f.clone()], Format::Text, &mut t);
        assert!(t.contains("# TYPE herdsman_reloads_total counter\n"), "{t}");
        assert!(t.contains("herdsman_reloads_total{result=\"ok\"} 2\n"), "{t}");
        let mut o = String::new();
        render(&[f], Format::OpenMetrics, &mut o);
        finish(Format::OpenMetrics, &mut o);
        assert!(o.contains("# TYPE herdsman_reloads counter\n"), "{o}");
        assert!(o.contains("\\\"done\\\""), "{o}");
        assert!(o.ends_with("# EOF\n"));
    }

    #[test]
    fn histograms_are_cumulative_with_inf() {
        let mut h = Histogram::new(&[0.5, 1.0]);
        h.observe(0.2);
        h.observe(0.7);
        h.observe(9.0);
        let mut t = String::new();
        render(&[h.family("x_seconds", "x")], Format::Text, &mut t);
        assert!(t.contains("x_seconds_bucket{le=\"0.5\"} 1\n"), "{t}");
        assert!(t.contains("x_seconds_bucket{le=\"1.0\"} 2\n"), "{t}");
        assert!(t.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{t}");
        assert!(t.contains("x_seconds_count 3\n"), "{t}");
    }

    #[test]
    fn accept_picks_the_format() {
        assert_eq!(Format::from_accept(None), Format::Text);
        let prom = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
    }
}

/// A histogram's counts, for an in-place upgrade (the buckets are the binary's own).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HistogramState {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn export(&self) -> HistogramState {
        HistogramState { counts: self.counts.clone(), sum: self.sum, count: self.count }
    }

    /// Counts carried over; ignored if the buckets changed between versions.
    pub fn import(&mut self, st: HistogramState) {
        if st.counts.len() == self.counts.len() {
            self.counts = st.counts;
            self.sum = st.sum;
            self.count = st.count;
        }
    }
}
