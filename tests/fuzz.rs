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
    ];
    prop::collection::vec((any_key, value), 0..8)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect())
}

proptest! {
    #[test]
    fn config_files_never_panic_and_report_one_line_per_problem(text in config_text()) {
        let dir = std::env::temp_dir().join(format!("herdsman-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.toml");
        std::fs::write(&path, &text).unwrap();
        if let Err(p) = config::load(Some(&path), &config::Overrides::default(), cpus()) {
            prop_assert!(!p.0.is_empty());
            for line in &p.0 {
                prop_assert!(!line.contains('\n'), "multi-line problem: {line:?}");
            }
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
