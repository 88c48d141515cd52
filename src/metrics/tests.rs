use super::scrape::rendered_bound;
use super::*;

/// The budget of the workers' part of a page holds only if [`rendered_bound`] is one:
/// pages that grow the most when rendered stay within it, in both formats.
#[test]
fn the_rendered_bound_is_an_upper_bound() {
    let pages: [&[u8]; 5] = [
        b"# TYPE c counter\nc 1\nc 2\nc 3\n",
        b"# TYPE e counter\ne{worker=\"\"} 1\ne{worker=\"\"} 2\n",
        b"a 1\nb 1\nc 1\nd{x=\"1\"} 2 1700000000000\n",
        b"# HELP h \"\"\"\"\"\"\"\" \\x \\x\n# TYPE h gauge\nh{ a = \"\\\"\" , worker=\"w\" } 1e300\n",
        b"# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\n# TYPE k histogram\nk_bucket{le=\"+Inf\"} 1\nk_sum 1\nk_count 1\n",
    ];
    for format in [Format::Text, Format::OpenMetrics] {
        let parsed: Vec<(usize, Vec<Family<'_>>)> =
            pages.iter().map(|p| (usize::MAX, parse::parse(p).unwrap())).collect();
        let bound: usize = pages.iter().zip(&parsed).map(|(p, (_, f))| rendered_bound(p.len(), f)).sum();
        let merged = parse::merge(parsed, format);
        let mut out = String::new();
        model::render(&merged, format, &mut out);
        assert!(out.len() <= bound, "{} > {bound}:\n{out}", out.len());
    }
}

#[test]
fn pages_over_the_series_or_family_cap_are_rejected() {
    let many = "x 1\n".repeat(11);
    assert!(parse::parse_capped(many.as_bytes(), 5, 10).is_err());
    assert!(parse::parse_capped(many.as_bytes(), 5, 11).is_ok());
    let families: String = (0..6).map(|i| format!("f{i} 1\n")).collect();
    assert!(parse::parse_capped(families.as_bytes(), 5, 100).is_err());
    assert!(parse::parse_capped(families.as_bytes(), 6, 100).is_ok());
}
