//! Bounded property-based fuzzing of the parsers that take untrusted input: the config file,
//! the control protocol, workers' metrics pages and the metrics endpoint's HTTP. Neither may panic, and every rejection must be one line per
//! problem. CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

// Test helpers fail the test by panicking, on purpose.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroUsize;

use herdsman::testing::config;
use herdsman::testing::protocol;
use proptest::prelude::*;

fn cpus() -> NonZeroUsize {
    NonZeroUsize::new(4).unwrap()
}

/// TOML-ish text built from the real keys and hostile values.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(config::keys().to_vec()).prop_map(str::to_string);
    let any_key = prop_oneof![key, "[a-z_]{1,12}"];
    let value = prop_oneof![
        "\"[^\"\\\\\n]{0,20}\"".prop_map(|s| s),
        any::<i64>().prop_map(|n| n.to_string()),
        Just("true".to_string()),
        Just("[\"python3\", \"app.py\"]".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ A = \"1\" }".to_string()),
        "[0-9]{1,4}(ms|s|m|h|x)?".prop_map(|s| format!("\"{s}\"")),
        // Durations and sizes around and far beyond the bounds (1y, 1024T) and u64::MAX.
        "[0-9]{1,22}(ns|ms|s|m|h|d|w|y|K|M|G|T)?".prop_map(|s| format!("\"{s}\"")),
        "alive:[0-9]{1,22}(s|d|y)".prop_map(|s| format!("\"{s}\"")),
        // Environment tables with the keys herdsman sets itself, and NUL bytes.
        (env_key(), "[a-z\u{0}]{0,4}")
            .prop_map(|(k, v)| format!("{{ {k} = \"{}\" }}", v.replace('\0', "\\u0000"))),
        "[a-z\u{0}]{0,6}".prop_map(|a| format!("[\"python3\", \"{}\"]", a.replace('\0', "\\u0000"))),
    ];
    prop::collection::vec((any_key, value), 0..8)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect())
}

/// Ordinary keys and the ones herdsman reserves for itself.
fn env_key() -> impl Strategy<Value = String> {
    let reserved = prop::sample::select(config::values::RESERVED_ENV.to_vec()).prop_map(str::to_string);
    prop_oneof![reserved, "HERDSMAN_[A-Z]{0,6}", "[A-Z]{1,6}"]
}

/// What every accepted configuration guarantees: bounded durations and sizes (so no
/// `Instant + Duration` can overflow), no reserved or NUL-carrying environment, no NUL args.
fn assert_bounded(s: &config::Settings) -> Result<(), TestCaseError> {
    let max = config::values::MAX_DURATION;
    let mut durations =
        vec![s.ready_timeout, s.stop_timeout, s.backoff.initial, s.backoff.max, s.backoff.reset_after];
    durations.extend(s.watchdog);
    if let config::ReadyMode::Alive(d) = s.ready {
        durations.push(d);
    }
    for d in durations {
        prop_assert!(d <= max, "unbounded duration {d:?}");
        prop_assert!(std::time::Instant::now().checked_add(d).is_some());
    }
    prop_assert!(s.max_memory.is_none_or(|m| m <= config::values::MAX_SIZE));
    for (k, v) in &s.env {
        prop_assert!(!config::values::env_key_reserved(k) && !v.contains('\0'), "{k}={v:?} accepted");
    }
    prop_assert!(s.command.iter().all(|a| !a.contains('\0')));
    Ok(())
}

proptest! {
    #[test]
    fn config_files_never_panic_and_report_one_line_per_problem(text in config_text()) {
        let dir = std::env::temp_dir().join(format!("herdsman-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.toml");
        std::fs::write(&path, &text).unwrap();
        match config::load(Some(&path), &config::Layer::default(), cpus()) {
            Err(p) => {
                prop_assert!(!p.0.is_empty());
                for line in p.0.iter().map(ToString::to_string) {
                    prop_assert!(!line.contains('\n'), "multi-line problem: {line:?}");
                }
            }
            Ok(s) => assert_bounded(&s)?,
        }
    }

    #[test]
    fn flag_values_never_panic_and_accepted_ones_are_bounded(
        timeout in "[0-9]{1,22}(ms|s|h|d|y)",
        memory in "[0-9]{1,22}(K|M|G|T)?",
        env in (env_key(), "[a-z\u{0}]{0,4}").prop_map(|(k, v)| format!("{k}={v}")),
    ) {
        let ov = config::Layer {
            command: vec!["true".into()],
            ready_timeout: Some(timeout.clone()),
            stop_timeout: Some(timeout.clone()),
            watchdog: Some(timeout.clone()),
            ready: Some(format!("alive:{timeout}")),
            max_memory: Some(memory),
            env: vec![env],
            ..Default::default()
        };
        match config::load(None, &ov, cpus()) {
            Ok(s) => assert_bounded(&s)?,
            Err(p) => prop_assert!(p.0.iter().all(|l| !l.to_string().contains('\n'))),
        }
    }

    #[test]
    fn arbitrary_bytes_as_a_config_file_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = std::env::temp_dir().join(format!("herdsman-fuzzb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.toml");
        std::fs::write(&path, &bytes).unwrap();
        let _ = config::load(Some(&path), &config::Layer::default(), cpus());
    }

    #[test]
    fn control_requests_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = protocol::parse_request(&bytes) {
            prop_assert!(!e.is_empty());
        }
    }

    #[test]
    fn json_shaped_control_requests_never_panic(
        v in any::<u32>(),
        op in "[a-z_]{0,10}",
        workers in "[-+]?[0-9a-z]{0,6}",
        wait in any::<bool>(),
    ) {
        let line = format!(r#"{{"v":{v},"op":"{op}","workers":"{workers}","wait":{wait}}}"#);
        if let Ok(req) = protocol::parse_request(line.as_bytes()) {
            if let protocol::Op::Scale { workers, .. } = req.op {
                let _ = protocol::parse_scale(&workers);
            }
        }
    }

    #[test]
    fn cli_values_never_panic(s in "\\PC{0,24}") {
        let _ = config::values::workers(&s);
        let _ = config::values::duration(&s);
        let _ = config::values::signal(&s);
        let _ = config::values::listen(&s);
        let _ = config::values::ready(&s);
        let _ = config::values::size(&s);
        let _ = config::values::env_pair(&s);
    }
}

/// Prometheus-text-shaped lines: real syntax pieces in hostile orders, with escapes, odd
/// values, timestamps and truncations.
fn metrics_text() -> impl Strategy<Value = String> {
    let name =
        prop_oneof![Just("up".to_string()), Just("x_total".to_string()), "[a-z_:]{1,8}", "[0-9{}\"= ]{1,4}"];
    let line = prop_oneof![
        (
            name.clone(),
            prop::sample::select(vec!["counter", "gauge", "histogram", "summary", "untyped", "bogus"])
        )
            .prop_map(|(n, t)| format!("# TYPE {n} {t}")),
        (name.clone(), "\\PC{0,12}").prop_map(|(n, h)| format!("# HELP {n} {h}")),
        (
            name.clone(),
            "[a-z_]{0,4}",
            "[^\n]{0,6}",
            prop::sample::select(vec!["1", "-2.5e3", "NaN", "+Inf", "-Inf", "x", ""]),
            prop::sample::select(vec!["", " 1700000000000", " zz", " 1 2"]),
        )
            .prop_map(|(n, l, v, val, ts)| format!("{n}{{{l}=\"{v}\"}} {val}{ts}")),
        (name, "[_a-z]{0,7}").prop_map(|(n, s)| format!("{n}{s} 1")),
        "\\PC{0,20}",
    ];
    prop::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

proptest! {
    #[test]
    fn worker_metrics_pages_never_panic_and_accepted_ones_render_parseably(
        text in metrics_text(),
        worker in 0usize..4,
    ) {
        use herdsman::testing::metrics::{model, parse};
        if let Ok(families) = parse::parse(text.as_bytes()) {
            // What herdsman accepts it must be able to write back, in both formats, and
            // read again (the page a scraper gets).
            for format in [model::Format::Text, model::Format::OpenMetrics] {
                let merged = parse::merge(vec![(worker, families.clone())], format);
                let mut out = String::new();
                model::render(&merged, format, &mut out);
                if format == model::Format::Text {
                    let again = parse::parse(out.as_bytes());
                    prop_assert!(again.is_ok(), "re-parse failed: {again:?}\n{out}");
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_as_a_worker_page_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = herdsman::testing::metrics::parse::parse(&bytes);
    }

    #[test]
    fn metrics_http_requests_and_responses_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        text in "(GET|HEAD|POST|) (/metrics|/|/x)(\\?[a-z=]{0,4})? HTTP/1\\.[01]\r\n([A-Za-z-]{1,8}: [^\r\n]{0,20}\r\n){0,3}\r\n",
        resp in "HTTP/1\\.1 (200|404) OK\r\n((Content-Length: [0-9]{1,3})|(Transfer-Encoding: chunked))?\r\n\r\n([0-9a-f]{1,2}\r\n[a-z]{0,5}\r\n){0,3}(0\r\n\r\n)?",
    ) {
        use herdsman::testing::metrics::http;
        let _ = http::parse_request(&bytes);
        let _ = http::parse_request(text.as_bytes());
        let _ = http::complete_response(&bytes);
        let _ = http::response_body(&bytes);
        let _ = http::complete_response(resp.as_bytes());
        let _ = http::response_body(resp.as_bytes());
    }

    /// A worker's answer read in pieces (any split) ends where the whole says it does.
    #[test]
    fn a_response_fed_in_pieces_ends_where_the_whole_says(
        resp in "HTTP/1\\.1 200 OK\r\n((Content-Length: [0-9]{1,2})|(Transfer-Encoding: chunked))?\r\n\r\n([0-9a-f]{1,2}(;x)?\r\n[a-z\r\n]{0,20}\r\n){0,3}(0\r\n\r\n)?[a-z]{0,3}",
        step in 1usize..8,
    ) {
        use herdsman::testing::metrics::http;
        let whole = resp.as_bytes();
        let mut end = http::ResponseEnd::default();
        let (mut got, mut at) = (None, 0);
        while got.is_none() && at < whole.len() {
            at = (at + step).min(whole.len());
            got = end.feed(&whole[..at]);
        }
        prop_assert_eq!(got, http::complete_response(whole));
    }
}
