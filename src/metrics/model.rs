//! Metric families as herdsman renders them, and the two text formats: Prometheus text 0.0.4
//! and OpenMetrics 1.0.
//!
//! The differences that matter here: a counter's family is `x_total` in 0.0.4 and `x` in
//! OpenMetrics (its sample is `x_total` in both); OpenMetrics says `unknown` where 0.0.4 says
//! `untyped`, escapes `"` in HELP, has no `_created` in 0.0.4, and ends with `# EOF`.

use std::borrow::Cow;
use std::fmt::Write;
use std::ops::Range;

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

/// A label: name and (unescaped) value, borrowed from a worker's page where it can be.
pub type Label<'a> = (&'a str, Cow<'a, str>);

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Appended to the family name: `""`, `"_total"`, `"_bucket"`, ...
    pub suffix: &'static str,
    /// This sample's labels: a range of its family's [`Family::labels`].
    pub labels: Range<usize>,
    pub value: f64,
}

/// A family; `'a` is the page its names and labels are borrowed from (`'static` for
/// herdsman's own). Labels live in one vector per family, not one per sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Family<'a> {
    /// The family name; for counters without `_total`.
    pub name: Cow<'a, str>,
    pub help: Cow<'a, str>,
    pub kind: Kind,
    pub samples: Vec<Sample>,
    pub labels: Vec<Label<'a>>,
    /// A worker's family: the `worker` label herdsman adds to each of its samples (written
    /// after their own labels).
    pub worker: Option<usize>,
    /// Families of the same name and kind from later workers' pages (see
    /// [`super::parse::merge`]): written after this one's samples, under its HELP and TYPE.
    pub merged: Vec<Family<'a>>,
}

impl<'a> Family<'a> {
    pub fn new(name: impl Into<Cow<'a, str>>, kind: Kind, help: impl Into<Cow<'a, str>>) -> Family<'a> {
        Family {
            name: name.into(),
            help: help.into(),
            kind,
            samples: Vec::new(),
            labels: Vec::new(),
            worker: None,
            merged: Vec::new(),
        }
    }

    /// Adds a sample; a counter's value sample gets `_total`.
    pub fn push(&mut self, labels: &[(&'a str, &'a str)], value: f64) {
        let suffix = if self.kind == Kind::Counter { "_total" } else { "" };
        let start = self.labels.len();
        self.labels.extend(labels.iter().map(|(k, v)| (*k, Cow::Borrowed(*v))));
        self.samples.push(Sample { suffix, labels: start..self.labels.len(), value });
    }

    /// Adds a sample with owned label values.
    fn push_owned(&mut self, suffix: &'static str, labels: Vec<Label<'a>>, value: f64) {
        let start = self.labels.len();
        self.labels.extend(labels);
        self.samples.push(Sample { suffix, labels: start..self.labels.len(), value });
    }

    /// A sample's labels.
    pub fn labels_of(&self, s: &Sample) -> &[Label<'a>] {
        &self.labels[s.labels.clone()]
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

    pub fn family(&self, name: &'static str, help: &'static str) -> Family<'static> {
        let mut f = Family::new(name, Kind::Histogram, help);
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let le = float_label(*b);
            f.push_owned("_bucket", vec![("le", Cow::Owned(le))], acc as f64);
        }
        f.push_owned("_bucket", vec![("le", Cow::Borrowed("+Inf"))], self.count as f64);
        f.push_owned("_sum", vec![], self.sum);
        f.push_owned("_count", vec![], self.count as f64);
        f
    }
}

/// `1.0`, `0.25`, `+Inf`: the canonical form both formats' parsers accept for `le`.
fn float_label(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 { format!("{v:.1}") } else { value(v) }
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
pub fn value(v: f64) -> String {
    let mut s = String::new();
    write_value(v, &mut s);
    s
}

/// [`value`], written to `out`.
fn write_value(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let i = v as i64;
        if i < 0 {
            out.push('-');
        }
        write_int(i.unsigned_abs(), out);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Decimal digits of `n` (what `{}` writes, without the formatting machinery).
fn write_int(mut n: u64, out: &mut String) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

fn escape_label(s: &str, out: &mut String) {
    if !s.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(s);
        return;
    }
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
pub fn render(families: &[Family<'_>], format: Format, out: &mut String) {
    let om = format == Format::OpenMetrics;
    for f in families {
        if f.samples.is_empty() && f.kind == Kind::Untyped {
            continue;
        }
        let total = if f.kind == Kind::Counter && !om { "_total" } else { "" };
        out.push_str("# HELP ");
        out.push_str(&f.name);
        out.push_str(total);
        out.push(' ');
        escape_help(&f.help, om, out);
        out.push_str("\n# TYPE ");
        out.push_str(&f.name);
        out.push_str(total);
        out.push(' ');
        out.push_str(f.kind.name(om));
        out.push('\n');
        for part in std::iter::once(f).chain(&f.merged) {
            for s in &part.samples {
                if !om && s.suffix == "_created" {
                    continue;
                }
                out.push_str(&f.name);
                out.push_str(s.suffix);
                let labels = part.labels_of(s);
                if !labels.is_empty() || part.worker.is_some() {
                    out.push('{');
                    for (i, (k, v)) in labels.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(k);
                        out.push_str("=\"");
                        escape_label(v, out);
                        out.push('"');
                    }
                    if let Some(w) = part.worker {
                        if !labels.is_empty() {
                            out.push(',');
                        }
                        out.push_str("worker=\"");
                        write_int(w as u64, out);
                        out.push('"');
                    }
                    out.push('}');
                }
                out.push(' ');
                write_value(s.value, out);
                out.push('\n');
            }
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
    fn values_are_written_as_display_would() {
        for v in [0.0f64, -0.0, 7.0, -42.0, 1.7e9, 1e15 - 1.0, -1e15 + 1.0, 1e15, 0.25, -2.5e-7, 1e300] {
            let want =
                if v.fract() == 0.0 && v.abs() < 1e15 { format!("{}", v as i64) } else { format!("{v}") };
            assert_eq!(value(v), want, "{v}");
        }
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(f64::INFINITY), "+Inf");
        assert_eq!(value(f64::NEG_INFINITY), "-Inf");
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
