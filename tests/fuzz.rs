//! Bounded property-based fuzzing of the two parsers that take untrusted input: the config
//! file and the control protocol. Neither may panic, and every rejection must be one line per
//! problem. CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release --test fuzz`.

use std::num::NonZeroUsize;

use herdsman::config;
use herdsman::control::protocol;
use proptest::prelude::*;

fn cpus() -> NonZeroUsize {
    NonZeroUsize::new(4).unwrap()
}

/// TOML-ish text built from the real keys and hostile values.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(config::KEYS.to_vec()).prop_map(str::to_string);
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
        match config::load(Some(&path), &config::Overrides::default(), cpus()) {
            Err(p) => {
                prop_assert!(!p.0.is_empty());
                for line in &p.0 {
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
        let ov = config::Overrides {
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
            Err(p) => prop_assert!(p.0.iter().all(|l| !l.contains('\n'))),
        }
    }

    #[test]
    fn arbitrary_bytes_as_a_config_file_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = std::env::temp_dir().join(format!("herdsman-fuzzb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.toml");
        std::fs::write(&path, &bytes).unwrap();
        let _ = config::load(Some(&path), &config::Overrides::default(), cpus());
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
