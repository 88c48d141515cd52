//! Reading a worker's Prometheus text (0.0.4) and merging every worker's families.
//!
//! Why a parser of our own: the Rust crates that parse the text format are either unmaintained
//! (`prometheus-parse`) or pull in a parser-combinator stack for what is a line format; we
//! need only names, labels and values (timestamps are dropped: herdsman's scrape is the
//! time). It is small, strict (anything unexpected rejects the whole page, which is then
//! counted in `herdsman_worker_scrape_errors_total`) and fuzzed in `tests/fuzz.rs`.

use std::borrow::Cow;
use std::collections::HashMap;

use super::model::{Family, Format, Kind, Label, Sample};

/// Why a worker's page was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line {0}: {1}")]
    Line(usize, &'static str),
    #[error("not UTF-8")]
    Utf8,
}

fn valid_name(s: &str) -> bool {
    let mut c = s.bytes();
    matches!(c.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && c.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn valid_label(s: &str) -> bool {
    let mut c = s.bytes();
    matches!(c.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && c.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn number(s: &str) -> Option<f64> {
    // Most values are small integers: exact as f64 below 2^53, the same as `parse` gives.
    if (1..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        return Some(s.bytes().fold(0u64, |n, b| n * 10 + u64::from(b - b'0')) as f64);
    }
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

/// A quoted label value's text up to its closing `"` (what follows the opening one) →
/// the value (borrowed unless it has escapes) and the rest after the closing quote.
fn label_value(s: &str) -> Option<(Cow<'_, str>, &str)> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut escaped = false;
    loop {
        match *b.get(i)? {
            b'"' => break,
            b'\\' => {
                if !matches!(b.get(i + 1)?, b'n' | b'\\' | b'"') {
                    return None;
                }
                escaped = true;
                i += 2;
            }
            _ => i += 1,
        }
    }
    let (raw, rest) = (&s[..i], &s[i + 1..]);
    if !escaped {
        return Some((Cow::Borrowed(raw), rest));
    }
    let mut value = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        value.push(match c {
            '\\' => match chars.next()? {
                'n' => '\n',
                c => c,
            },
            c => c,
        });
    }
    Some((Cow::Owned(value), rest))
}

/// `{a="1",b="x\"y"}` → labels (appended to `out`) and the rest of the line.
fn labels<'a>(s: &'a str, out: &mut Vec<Label<'a>>) -> Option<&'a str> {
    let mut rest = s.strip_prefix('{')?;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix('}') {
            return Some(r);
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        if !valid_label(name) {
            return None;
        }
        let (value, r) = label_value(rest[eq + 1..].trim_start().strip_prefix('"')?)?;
        out.push((name, value));
        rest = r.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}

fn unescape_help(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
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
    Cow::Owned(out)
}

/// The family a sample named `name` belongs to, given the current family.
fn belongs(f: &Family<'_>, raw: &str, name: &str) -> Option<&'static str> {
    if f.kind == Kind::Counter {
        // `# TYPE x_total counter` with samples `x_total`, or `# TYPE x counter` with `x`.
        return if name == raw {
            Some("_total")
        } else {
            (name.strip_prefix(&*f.name) == Some("_created")).then_some("_created")
        };
    }
    f.kind
        .suffixes()
        .iter()
        .copied()
        .find(|s| name.len() == f.name.len() + s.len() && name.starts_with(&*f.name) && name.ends_with(s))
}

fn family_for<'a>(
    families: &mut Vec<Family<'a>>,
    index: &mut HashMap<&'a str, usize>,
    raw: &'a str,
) -> usize {
    *index.entry(raw).or_insert_with(|| {
        families.push(Family::new(raw, Kind::Untyped, ""));
        families.len() - 1
    })
}

/// Parses one worker's page; names, help texts and label values are borrowed from `text`
/// (copied only where they have escapes). Timestamps are accepted and dropped.
pub fn parse(text: &[u8]) -> Result<Vec<Family<'_>>, ParseError> {
    parse_capped(text, usize::MAX, usize::MAX)
}

/// [`parse`], rejecting a page with more than `max_families` families or `max_series`
/// samples as soon as it has them (a page is bounded in bytes, but a page of short lines
/// multiplies: each sample gets a `worker` label and its own entries in the merge).
pub fn parse_capped(
    text: &[u8],
    max_families: usize,
    max_series: usize,
) -> Result<Vec<Family<'_>>, ParseError> {
    let mut series = 0usize;
    let text = std::str::from_utf8(text).map_err(|_| ParseError::Utf8)?;
    let mut families: Vec<Family<'_>> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    // The current family and the name its TYPE/HELP line used.
    let mut current: Option<(usize, &str)> = None;
    // One line's labels (reused).
    let mut line_labels: Vec<Label<'_>> = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let n = n + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        // (A line starting with a visible ASCII character is not blank: skips the trim.)
        if !line.as_bytes().first().is_some_and(u8::is_ascii_graphic) && line.trim().is_empty() {
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
            if families.len() > max_families {
                return Err(ParseError::Line(n, "too many metric families"));
            }
            if what == "TYPE" {
                let kind = Kind::parse(arg.trim()).ok_or(ParseError::Line(n, "unknown TYPE"))?;
                let f = &mut families[i];
                if !f.samples.is_empty() || (f.kind != Kind::Untyped && f.kind != kind) {
                    return Err(ParseError::Line(n, "TYPE after samples or twice"));
                }
                f.kind = kind;
                if kind == Kind::Counter {
                    f.name = Cow::Borrowed(raw.strip_suffix("_total").unwrap_or(raw));
                }
            } else {
                families[i].help = unescape_help(arg);
            }
            current = Some((i, raw));
            continue;
        }
        let end = line.bytes().position(|b| matches!(b, b'{' | b' ' | b'\t')).unwrap_or(line.len());
        let name = &line[..end];
        if !valid_name(name) {
            return Err(ParseError::Line(n, "bad metric name"));
        }
        let rest = &line[end..];
        line_labels.clear();
        let rest = if rest.starts_with('{') {
            labels(rest, &mut line_labels).ok_or(ParseError::Line(n, "bad labels"))?
        } else {
            rest
        };
        let mut fields = rest.split_whitespace();
        let v = fields.next().and_then(number).ok_or(ParseError::Line(n, "bad value"))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| ParseError::Line(n, "bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(ParseError::Line(n, "trailing text"));
        }
        let (i, suffix) = match current.and_then(|(i, raw)| Some((i, belongs(&families[i], raw, name)?))) {
            Some(found) => found,
            None => {
                let i = family_for(&mut families, &mut index, name);
                if families.len() > max_families {
                    return Err(ParseError::Line(n, "too many metric families"));
                }
                if families[i].kind != Kind::Untyped {
                    return Err(ParseError::Line(n, "samples of a family are not together"));
                }
                current = Some((i, name));
                (i, "")
            }
        };
        let ls = &line_labels;
        if ls.iter().enumerate().any(|(j, (k, _))| ls[..j].iter().any(|(k2, _)| k2 == k)) {
            return Err(ParseError::Line(n, "duplicate label"));
        }
        series += 1;
        if series > max_series {
            return Err(ParseError::Line(n, "too many series"));
        }
        let f = &mut families[i];
        let start = f.labels.len();
        f.labels.append(&mut line_labels);
        f.samples.push(Sample { suffix, labels: start..f.labels.len(), value: v });
    }
    Ok(families)
}

/// The prefix of herdsman's own series: no worker series may be rendered with it.
pub const RESERVED_PREFIX: &str = "herdsman_";

/// What a worker's `worker` label is renamed to, as Prometheus renames an exposed label that
/// clashes with a target label: the first of these the sample does not have already.
const EXPORTED_WORKER: [&str; 3] =
    ["exported_worker", "exported_exported_worker", "exported_exported_exported_worker"];

/// Merges the workers' families (each sample labelled `worker="ID"`) into what the page may
/// hold, as a strict scraper reads it (Prometheus drops a whole scrape over one bad series):
/// one HELP/TYPE per name, in the order names first appear. Nothing is copied: a later
/// page's family goes into the first one's [`Family::merged`]. Left out:
/// * a family with a series that would be rendered with [`RESERVED_PREFIX`] (herdsman's);
/// * a family whose type differs from the one already merged under its name, or with a
///   series name another family already has in `format` (`x_total` of a counter `x` and a
///   gauge `x_total`; a histogram's `x_sum` and a gauge `x_sum`): the first one stays;
/// * a sample with a label named `__*` (reserved for Prometheus's own use);
/// * a sample that is the same series as one before it, once its `worker` label is renamed
///   to `exported_worker` (or `exported_exported_worker` when it has that label too, ...).
pub fn merge<'a>(pages: Vec<(usize, Vec<Family<'a>>)>, format: Format) -> Vec<Family<'a>> {
    let om = format == Format::OpenMetrics;
    let mut out: Vec<Family<'a>> = Vec::new();
    let mut index: HashMap<Cow<'a, str>, usize> = HashMap::new();
    for (worker, families) in pages {
        for mut f in families {
            if rendered_names(&f, om).iter().any(|n| n.starts_with(RESERVED_PREFIX)) {
                continue;
            }
            tidy(&mut f);
            if f.samples.is_empty() {
                continue;
            }
            f.worker = Some(worker);
            match index.get(&f.name) {
                Some(&i) if out[i].kind == f.kind => out[i].merged.push(f),
                Some(_) => {}
                None => {
                    index.insert(f.name.clone(), out.len());
                    out.push(f);
                }
            }
        }
    }
    if om {
        drop_created_twins(&mut out);
    }
    // Names a family takes on the page: its own, then the first family to take one keeps it.
    let mut taken: HashMap<String, usize> = HashMap::new();
    let mut keep = Vec::with_capacity(out.len());
    for (i, f) in out.iter().enumerate() {
        let names = rendered_names(f, om);
        let free = names.iter().all(|n| taken.get(n).is_none_or(|j| *j == i));
        if free {
            taken.extend(names.into_iter().map(|n| (n, i)));
        }
        keep.push(free);
    }
    let mut keep = keep.into_iter();
    out.retain(|_| keep.next().unwrap_or(false));
    out
}

/// The names `f` is written with in a page: its HELP/TYPE name and its samples' names.
fn rendered_names(f: &Family<'_>, om: bool) -> Vec<String> {
    let family =
        if f.kind == Kind::Counter && !om { format!("{}_total", f.name) } else { f.name.to_string() };
    let mut names = vec![family];
    for suffix in f.kind.suffixes() {
        if om || *suffix != "_created" {
            let n = format!("{}{suffix}", f.name);
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names
}

/// A worker's family made fit to merge: samples with a `__*` label, or the same series as
/// one before them once the `worker` label is renamed, go; `worker` is renamed.
fn tidy(f: &mut Family<'_>) {
    let mut keep = Vec::with_capacity(f.samples.len());
    for s in &f.samples {
        let labels = &mut f.labels[s.labels.clone()];
        let mut ok = !labels.iter().any(|(k, _)| k.starts_with("__"));
        if let Some(i) = labels.iter().position(|(k, _)| *k == "worker") {
            match EXPORTED_WORKER.iter().find(|n| !labels.iter().any(|(k, _)| k == *n)) {
                Some(n) => labels[i].0 = n,
                None => ok = false,
            }
        }
        keep.push(ok);
    }
    drop_repeated(f, &mut keep);
    let mut keep = keep.into_iter();
    f.samples.retain(|_| keep.next().unwrap_or(false));
}

/// Marks in `keep` each sample of `f` that is the same series as a kept one before it.
/// Series are found by a hash of their suffix and sorted labels (one reused buffer): the
/// first sample with each hash, and the others whose labels differ (collisions).
fn drop_repeated(f: &Family<'_>, keep: &mut [bool]) {
    use std::collections::hash_map::Entry;
    use std::hash::BuildHasher;
    fn sorted<'s>(f: &'s Family<'_>, i: usize, out: &mut Vec<(&'s str, &'s str)>) {
        out.clear();
        out.extend(f.labels_of(&f.samples[i]).iter().map(|(k, v)| (*k, &**v)));
        out.sort_unstable();
    }
    let same = |i: usize, j: usize, a: &mut Vec<_>, b: &mut Vec<_>| {
        sorted(f, i, a);
        sorted(f, j, b);
        f.samples[i].suffix == f.samples[j].suffix && a == b
    };
    let state = std::collections::hash_map::RandomState::new();
    let mut first: HashMap<u64, usize> = HashMap::with_capacity(f.samples.len());
    let mut more: Vec<(u64, usize)> = Vec::new();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, kept) in keep.iter_mut().enumerate() {
        if !*kept {
            continue;
        }
        sorted(f, i, &mut a);
        let h = state.hash_one((f.samples[i].suffix, &a));
        match first.entry(h) {
            Entry::Vacant(e) => {
                e.insert(i);
            }
            Entry::Occupied(e) => {
                let j = *e.get();
                let dup = same(i, j, &mut a, &mut b)
                    || more.iter().filter(|(h2, _)| *h2 == h).any(|(_, j)| same(i, *j, &mut a, &mut b));
                if dup {
                    *kept = false;
                } else {
                    more.push((h, i));
                }
            }
        }
    }
}

/// OpenMetrics reserves `_created` for counters, histograms and summaries: a 0.0.4 page's
/// separate `x_created` gauges (what Python's client writes) would clash, so they go.
fn drop_created_twins(families: &mut Vec<Family<'_>>) {
    let bases: Vec<Cow<'_, str>> = families
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
        let names: Vec<_> = f.iter().map(|f| (&*f.name, f.kind)).collect();
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
        let m = merge(vec![(0, a.clone()), (1, b.clone())], Format::Text);
        let mut t = String::new();
        render(&m, Format::Text, &mut t);
        assert_eq!(t.matches("# TYPE http_requests_total counter").count(), 1, "{t}");
        assert!(
            t.contains("http_requests_total{code=\"200\",exported_worker=\"x\",worker=\"1\"} 5\n"),
            "{t}"
        );
        let m = merge(vec![(0, a), (1, b)], Format::OpenMetrics);
        let mut o = String::new();
        render(&m, Format::OpenMetrics, &mut o);
        assert!(!o.contains("_created"), "{o}");
        assert!(o.contains("# TYPE http_requests counter\n"), "{o}");
        assert!(o.contains("# TYPE loose unknown\n"), "{o}");
    }

    #[test]
    fn label_values_keep_their_escapes_and_the_worker_label_comes_last() {
        let page = "# HELP e A \\n\\\\ \\x \"q\".\n# TYPE e gauge\ne{ a = \"x\\\"y\\\\z\\n\" , b=\"é,}\"} 1\ne 2.5\n";
        let f = parse(page.as_bytes()).unwrap();
        assert!(matches!(f[0].labels_of(&f[0].samples[0])[0].1, Cow::Owned(_)));
        assert!(matches!(f[0].labels_of(&f[0].samples[0])[1].1, Cow::Borrowed("é,}")));
        let m = merge(vec![(12, f)], Format::Text);
        let mut t = String::new();
        render(&m, Format::Text, &mut t);
        assert_eq!(
            t,
            "# HELP e A \\n\\\\ \\\\x \"q\".\n# TYPE e gauge\ne{a=\"x\\\"y\\\\z\\n\",b=\"é,}\",worker=\"12\"} 1\ne{worker=\"12\"} 2.5\n"
        );
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
    fn a_workers_page_cannot_forge_or_break_the_merged_one() {
        let page = "# TYPE f gauge\nf{worker=\"a\"} 1\nf{exported_worker=\"a\"} 2\nf{worker=\"b\",exported_worker=\"c\"} 3\nf{__name__=\"x\"} 4\nf 5\nf 6\n# TYPE herdsman_up_total untyped\nherdsman_up_total 1\n# TYPE herdsman counter\nherdsman 1\n# TYPE c_total gauge\nc_total 1\n# TYPE c counter\nc 2\n# TYPE l histogram\nl_sum 1\nl_count 1\n# TYPE l_count gauge\nl_count 3\n";
        for format in [Format::Text, Format::OpenMetrics] {
            let m = merge(vec![(7, parse(page.as_bytes()).unwrap())], format);
            let names: Vec<_> = m.iter().map(|f| &*f.name).collect();
            assert_eq!(names, ["f", "c_total", "l"], "{format:?}");
            let mut t = String::new();
            render(&m, format, &mut t);
            let f: Vec<_> = t.lines().filter(|l| l.starts_with("f")).collect();
            assert_eq!(
                f,
                [
                    "f{exported_worker=\"a\",worker=\"7\"} 1",
                    "f{exported_exported_worker=\"b\",exported_worker=\"c\",worker=\"7\"} 3",
                    "f{worker=\"7\"} 5"
                ],
                "{t}"
            );
        }
    }

    #[test]
    fn herdsman_names_and_type_clashes_are_left_out() {
        let a =
            parse(b"# TYPE herdsman_generation gauge\nherdsman_generation 9\n# TYPE q gauge\nq 1\n").unwrap();
        let b = parse(b"# TYPE q counter\nq 1\n").unwrap();
        let m = merge(vec![(0, a), (1, b)], Format::Text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].samples.len(), 1);
        assert!(m[0].merged.is_empty());
    }
}
