//! Reading a worker's Prometheus text (0.0.4) and merging every worker's families.
//!
//! Why a parser of our own: the Rust crates that parse the text format are either unmaintained
//! (`prometheus-parse`) or pull in a parser-combinator stack for what is a line format; we
//! need only names, labels and values (timestamps are dropped: herdsman's scrape is the
//! time). It is small, strict (anything unexpected rejects the whole page, which is then
//! counted in `herdsman_worker_scrape_errors_total`) and fuzzed in `tests/fuzz.rs`.

use std::collections::HashMap;

use super::model::{Family, Kind, Sample};

/// Why a worker's page was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {0}: {1}")]
    Line(usize, &'static str),
    #[error("not UTF-8")]
    Utf8,
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if s.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E')) => {
            s.parse().ok()
        }
        _ => None,
    }
}

/// `{a="1",b="x\"y"}` → labels and the rest of the line.
fn labels(s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut out = Vec::new();
    let mut rest = s.strip_prefix('{')?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Some((out, r));
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        if !valid_label(name) {
            return None;
        }
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    _ => return None,
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                out.push('\n');
                chars.next();
            }
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// The family a sample named `name` belongs to, given the current family.
fn belongs(f: &Family, raw: &str, name: &str) -> Option<&'static str> {
    if f.kind == Kind::Counter {
        // `# TYPE x_total counter` with samples `x_total`, or `# TYPE x counter` with `x`.
        return if name == raw {
            Some("_total")
        } else {
            (name.strip_prefix(f.name.as_str()) == Some("_created")).then_some("_created")
        };
    }
    f.kind
        .suffixes()
        .iter()
        .copied()
        .find(|s| name.len() == f.name.len() + s.len() && name.starts_with(&f.name) && name.ends_with(s))
}

/// Parses one worker's page. Timestamps are accepted and dropped.
pub fn parse(text: &[u8]) -> Result<Vec<Family>, ParseError> {
    let text = std::str::from_utf8(text).map_err(|_| ParseError::Utf8)?;
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    // The current family and the name its TYPE/HELP line used.
    let mut current: Option<(usize, String)> = None;
    let family_for = |families: &mut Vec<Family>, index: &mut HashMap<String, usize>, raw: &str| -> usize {
        let name = raw.to_string();
        if let Some(i) = index.get(&name) {
            return *i;
        }
        families.push(Family::new(&name, Kind::Untyped, ""));
        index.insert(name, families.len() - 1);
        families.len() - 1
    };
    for (n, line) in text.split('\n').enumerate() {
        let n = n + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let c = c.trim_start();
            let (what, rest) = match c.split_once(' ') {
                Some((w, r)) if w == "HELP" || w == "TYPE" => (w, r.trim_start()),
                _ => continue,
            };
            let (raw, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            if !valid_name(raw) {
                return Err(ParseError::Line(n, "bad metric name in HELP/TYPE"));
            }
            let i = family_for(&mut families, &mut index, raw);
            if what == "TYPE" {
                let kind = Kind::parse(arg.trim()).ok_or(ParseError::Line(n, "unknown TYPE"))?;
                let f = &mut families[i];
                if !f.samples.is_empty() || (f.kind != Kind::Untyped && f.kind != kind) {
                    return Err(ParseError::Line(n, "TYPE after samples or twice"));
                }
                f.kind = kind;
                if kind == Kind::Counter {
                    f.name = raw.strip_suffix("_total").unwrap_or(raw).to_string();
                }
            } else {
                families[i].help = unescape_help(arg);
            }
            current = Some((i, raw.to_string()));
            continue;
        }
        let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
        let name = &line[..end];
        if !valid_name(name) {
            return Err(ParseError::Line(n, "bad metric name"));
        }
        let rest = &line[end..];
        let (labels, rest) = if rest.starts_with('{') {
            labels(rest).ok_or(ParseError::Line(n, "bad labels"))?
        } else {
            (Vec::new(), rest)
        };
        let mut fields = rest.split_whitespace();
        let v = fields.next().and_then(number).ok_or(ParseError::Line(n, "bad value"))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| ParseError::Line(n, "bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(ParseError::Line(n, "trailing text"));
        }
        let (i, suffix) =
            match current.as_ref().and_then(|(i, raw)| Some((*i, belongs(&families[*i], raw, name)?))) {
                Some(found) => found,
                None => {
                    let i = family_for(&mut families, &mut index, name);
                    if families[i].kind != Kind::Untyped {
                        return Err(ParseError::Line(n, "samples of a family are not together"));
                    }
                    current = Some((i, name.to_string()));
                    (i, "")
                }
            };
        if labels.iter().enumerate().any(|(j, (k, _))| labels[..j].iter().any(|(k2, _)| k2 == k)) {
            return Err(ParseError::Line(n, "duplicate label"));
        }
        families[i].samples.push(Sample { suffix, labels, value: v });
    }
    Ok(families)
}

/// Merges the workers' families (each labelled `worker="ID"`) by name: one HELP/TYPE per
/// name, in the order names first appear. A family whose name herdsman uses itself, or whose
/// type differs from the one already merged under that name, is left out.
pub fn merge(pages: Vec<(usize, Vec<Family>)>, reserved: &[String]) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (worker, families) in pages {
        let id = worker.to_string();
        for mut f in families {
            if reserved.contains(&f.name) || f.samples.is_empty() {
                continue;
            }
            for s in &mut f.samples {
                for (k, _) in &mut s.labels {
                    if k == "worker" {
                        *k = "exported_worker".to_string();
                    }
                }
                s.labels.push(("worker".to_string(), id.clone()));
            }
            match index.get(&f.name) {
                Some(&i) if out[i].kind == f.kind => out[i].samples.append(&mut f.samples),
                Some(_) => {}
                None => {
                    index.insert(f.name.clone(), out.len());
                    out.push(f);
                }
            }
        }
    }
    out
}

/// OpenMetrics reserves `_created` for counters, histograms and summaries: a 0.0.4 page's
/// separate `x_created` gauges (what Python's client writes) would clash, so they go.
pub fn drop_created_twins(families: &mut Vec<Family>) {
    let bases: Vec<String> = families
        .iter()
        .filter(|f| matches!(f.kind, Kind::Counter | Kind::Histogram | Kind::Summary))
        .map(|f| f.name.clone())
        .collect();
    families.retain(|f| {
        !(matches!(f.kind, Kind::Gauge | Kind::Untyped)
            && f.name.strip_suffix("_created").is_some_and(|b| bases.iter().any(|x| x == b)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::model::{Format, render};

    const PAGE: &str = "# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\",worker=\"x\"} 5 1700000000000\n# HELP http_requests_created Created.\n# TYPE http_requests_created gauge\nhttp_requests_created{code=\"200\"} 1.7e9\n# TYPE lat histogram\nlat_bucket{le=\"0.1\"} 1\nlat_bucket{le=\"+Inf\"} 2\nlat_sum 0.3\nlat_count 2\nloose 1\n";

    #[test]
    fn a_page_parses_into_families() {
        let f = parse(PAGE.as_bytes()).unwrap();
        let names: Vec<_> = f.iter().map(|f| (f.name.as_str(), f.kind)).collect();
        assert_eq!(
            names,
            [
                ("http_requests", Kind::Counter),
                ("http_requests_created", Kind::Gauge),
                ("lat", Kind::Histogram),
                ("loose", Kind::Untyped)
            ]
        );
        assert_eq!(f[0].samples[0].suffix, "_total");
        assert_eq!(f[2].samples.len(), 4);
    }

    #[test]
    fn merged_pages_have_one_header_and_worker_labels() {
        let a = parse(PAGE.as_bytes()).unwrap();
        let b = parse(PAGE.as_bytes()).unwrap();
        let mut m = merge(vec![(0, a), (1, b)], &[]);
        let mut t = String::new();
        render(&m, Format::Text, &mut t);
        assert_eq!(t.matches("# TYPE http_requests_total counter").count(), 1, "{t}");
        assert!(
            t.contains("http_requests_total{code=\"200\",exported_worker=\"x\",worker=\"1\"} 5\n"),
            "{t}"
        );
        drop_created_twins(&mut m);
        let mut o = String::new();
        render(&m, Format::OpenMetrics, &mut o);
        assert!(!o.contains("_created"), "{o}");
        assert!(o.contains("# TYPE http_requests counter\n"), "{o}");
        assert!(o.contains("# TYPE loose unknown\n"), "{o}");
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in
            ["<html>", "x{a=\"1} 2", "x 1 2 3", "x{a=\"1\",a=\"2\"} 1", "x notanumber", "# TYPE x flavour"]
        {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse(b"\xff\xfe").is_err());
        assert!(parse(b"").unwrap().is_empty());
    }

    #[test]
    fn herdsman_names_and_type_clashes_are_left_out() {
        let a =
            parse(b"# TYPE herdsman_generation gauge\nherdsman_generation 9\n# TYPE q gauge\nq 1\n").unwrap();
        let b = parse(b"# TYPE q counter\nq 1\n").unwrap();
        let m = merge(vec![(0, a), (1, b)], &["herdsman_generation".to_string()]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].samples.len(), 1);
    }
}
