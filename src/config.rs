//! The app configuration: a TOML file and command-line flags, validated together into
//! [`Settings`], whose fields cannot be wrong.
//!
//! Every setting is defined once, as a field of [`Layer`]: raw and optional, read by clap (the
//! flags) and by serde (the file's keys, which are therefore [`keys`]). A run of [`load`] reads
//! the file's layer key by key ([`layer::read`]: unknown keys and wrong types), then
//! [`validate`] takes each setting from the flags or else the file, parses it with the parser in
//! [`values`] that both share, and collects every problem rather than stopping at the first.
//! A [`Problem`] names the flag or the key and the fix, one line each. `init` writes the
//! settings back through the same layer (`Layer::from(&Settings)`).
//!
//! Adding a setting: a field in [`Layer`] (its flag and help, its key and TOML type), a field in
//! [`Settings`], and its line in [`validate`] and in `Layer::from(&Settings)`.

pub mod layer;
pub mod problem;
mod validate;
pub mod values;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use layer::{Layer, keys};
#[cfg(test)]
pub use problem::ConfigError;
pub use problem::{Place, Problem, Problems};
pub use validate::validate;
pub use values::{
    Balance, BindIntercept, ListenAddr, LogFormat, OnFailure, ReadyMode, StopSignal, WorkerCount,
};

/// Restart back-off for workers that fail repeatedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackoffPolicy {
    /// Delay before the first restart after a failure.
    pub initial: Duration,
    /// The delay doubles per consecutive failure up to this cap.
    pub max: Duration,
    /// A worker that stayed up this long resets its failure count.
    pub reset_after: Duration,
}

impl BackoffPolicy {
    /// 100 ms, doubling up to 30 s; reset after 10 s up.
    pub const DEFAULT: BackoffPolicy = BackoffPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(30),
        reset_after: Duration::from_secs(10),
    };
}

/// The default `min_ready`: how long a roll-out's new worker must stay ready before its old
/// worker is stopped. Long enough to catch the common late crash (a server that reports ready
/// before it loads the app, like gunicorn without `--preload`, dies within a few hundred ms of
/// `READY=1`), short enough that a roll-out of N workers costs only N extra seconds. See
/// docs/guarantees.md for the measurements.
pub const DEFAULT_MIN_READY: Duration = Duration::from_secs(1);

/// Validated settings for one app.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub name: String,
    pub command: Vec<String>,
    pub workers: NonZeroUsize,
    pub listen: Vec<ListenAddr>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<PathBuf>,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub stop_signal: StopSignal,
    pub stop_timeout: Duration,
    /// New workers started at a time during a roll-out (the next starts once one is ready).
    pub reload_batch: NonZeroUsize,
    /// The most new workers a roll-out runs at once, starting or holding `min_ready` (`None`:
    /// no limit). Absent from an older image's upgrade state, and left out when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload_surge: Option<NonZeroUsize>,
    /// A roll-out's new worker must stay ready this long before its old worker is stopped.
    pub min_ready: Duration,
    /// What an aborted roll-out does with the slots it already moved.
    pub on_failure: OnFailure,
    /// How new connections reach workers.
    pub balance: Balance,
    /// Whether a worker's own bind() of herdsman's port gets herdsman's socket.
    #[serde(default)]
    pub bind_intercept: BindIntercept,
    pub backoff: BackoffPolicy,
    /// Per-worker watchdog (`WATCHDOG_USEC` for workers).
    pub watchdog: Option<Duration>,
    /// Per-worker memory limit in bytes.
    pub max_memory: Option<u64>,
    pub control: Option<PathBuf>,
    /// Group (besides root and our own user) allowed to use the control socket.
    pub control_group: Option<String>,
    /// The worker count the config file asks for (`None`: it does not say), whatever a flag
    /// says: a reload applies the file's count only when this changed, so a runtime `scale`
    /// survives reloads that leave `workers` alone.
    pub file_workers: Option<WorkerCount>,
    /// Workers run as this user (`user`/`group`), resolved; `None`: as the supervisor.
    pub user: Option<crate::credentials::Credentials>,
    /// Serve `GET /metrics` here (`--metrics`, `metrics`); `None`: no HTTP endpoint.
    pub metrics: Option<ListenAddr>,
    /// Changes below these paths (absolute) are reloads (`--watch`); empty: no watching.
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// Patterns of paths whose changes do not count (`--watch-ignore`), besides the defaults.
    #[serde(default)]
    pub watch_ignore: Vec<String>,
    /// Standalone output as text or JSON lines (`--log-format`, `log_format`).
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Reads and validates `file` (if any) under the flags' layer `cli`. `cpus` resolves "auto"
/// worker counts.
pub fn load(file: Option<&Path>, cli: &Layer, cpus: NonZeroUsize) -> Result<Settings, Problems> {
    let file = file.map(layer::read).transpose()?;
    load_layers(file, cli, cpus)
}

/// [`load`] of a file already read (with its problems).
fn load_layers(
    file: Option<(layer::FileLayer, Vec<Problem>)>,
    cli: &Layer,
    cpus: NonZeroUsize,
) -> Result<Settings, Problems> {
    let (file, mut problems) = file.map_or((None, Vec::new()), |(f, p)| (Some(f), p));
    match validate(cli, file.as_ref(), cpus) {
        Ok(s) if problems.is_empty() => Ok(s),
        Ok(_) => Err(Problems(problems)),
        Err(more) => {
            problems.extend(more);
            Err(Problems(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn cpus() -> NonZeroUsize {
        NonZeroUsize::new(4).unwrap()
    }

    fn parse(text: &str, cli: &Layer) -> Result<Settings, Problems> {
        let table: toml::Table = text.parse().unwrap();
        load_layers(Some(layer::from_table(Path::new("web.toml"), table)), cli, cpus())
    }

    fn flags(cli: Layer) -> Result<Settings, Problems> {
        load_layers(None, &cli, cpus())
    }

    #[test]
    fn file_values_are_used_and_flags_override_them() {
        let text = r#"
            command = ["python3", "app.py"]
            workers = 3
            listen = ["127.0.0.1:8080"]
            stop_signal = "INT"
            env = { A = "1" }
        "#;
        let s = parse(text, &Layer::default()).unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.workers.get(), 3);
        assert_eq!(s.stop_signal, StopSignal::Signal(Signal::SIGINT));
        assert_eq!(s.env, vec![("A".to_string(), "1".to_string())]);
        let ov = Layer {
            workers: Some("max".into()),
            env: vec!["A=2".into()],
            name: Some("api".into()),
            ..Default::default()
        };
        let s = parse(text, &ov).unwrap();
        assert_eq!((s.name.as_str(), s.workers.get()), ("api", 4));
        assert_eq!(s.env, vec![("A".to_string(), "2".to_string())]);
    }

    #[test]
    fn log_format_is_text_by_default_json_from_the_file_or_the_flag_and_nothing_else() {
        let cmd = "command = [\"python3\", \"app.py\"]\n";
        assert_eq!(parse(cmd, &Layer::default()).unwrap().log_format, LogFormat::Text);
        let json = format!("{cmd}log_format = \"json\"");
        assert_eq!(parse(&json, &Layer::default()).unwrap().log_format, LogFormat::Json);
        let flag = Layer { log_format: Some("text".into()), ..Default::default() };
        assert_eq!(parse(&json, &flag).unwrap().log_format, LogFormat::Text);
        let bad = parse(&format!("{cmd}log_format = \"yaml\""), &Layer::default()).unwrap_err().0;
        let line = bad.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(line.contains("`log_format`") && line.contains("\"json\""), "{line}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            command = "python3 app.py"
            workers = "lots"
            colour = "blue"
            ready_timeout = "soon"
            env = { PORT = 8080 }
        "#;
        let p = parse(text, &Layer::default()).unwrap_err().0;
        let joined = p.join("\n");
        for key in ["`command`", "`workers`", "`colour`", "`ready_timeout`", "`env`"] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
        assert!(p.iter().all(|l| !l.to_string().contains('\n')));
    }

    #[test]
    fn name_defaults_to_the_command_basename_or_an_interpreters_script() {
        let name = |cmd: &[&str]| {
            let ov = Layer { command: cmd.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            flags(ov).unwrap().name
        };
        assert_eq!(name(&["/usr/bin/node", "app.js"]), "app");
        assert_eq!(name(&["node", "--enable-source-maps", "/srv/web/server.mjs"]), "server");
        assert_eq!(name(&["python3.11", "-u", "api.py"]), "api");
        assert_eq!(name(&["python3", "-m", "gunicorn", "app:app"]), "gunicorn");
        assert_eq!(name(&["bun", "run", "index.ts"]), "index");
        assert_eq!(name(&["deno", "run", "-A", "main.ts"]), "main");
        assert_eq!(name(&["ruby", "-e", "puts 1"]), "ruby");
        assert_eq!(name(&["node"]), "node");
        assert_eq!(name(&["/usr/bin/gunicorn", "app:app"]), "gunicorn");
        assert_eq!(name(&["nodemon", "app.js"]), "nodemon");
        assert_eq!(name(&["./server.py"]), "server.py");
    }

    #[test]
    fn env_may_not_set_what_herdsman_sets_nor_carry_nul_and_args_no_nul() {
        let text = r#"
            command = ["python3", "app\u0000.py"]
            env = { LISTEN_FDS = "2", NOTIFY_SOCKET = "/x", HERDSMAN_WORKER_ID = "9", OK = "a\u0000b" }
        "#;
        let ov = Layer { env: vec!["WATCHDOG_PID=1".into(), "LISTEN_PID=1".into()], ..Default::default() };
        let p = parse(text, &ov).unwrap_err().0;
        let joined = p.join("\n");
        for needle in
            ["LISTEN_FDS", "NOTIFY_SOCKET", "HERDSMAN_WORKER_ID", "WATCHDOG_PID", "LISTEN_PID", "`command`"]
        {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
        assert_eq!(p.iter().filter(|l| l.to_string().contains("NUL")).count(), 2, "{joined}");
        assert!(p.iter().all(|l| !l.to_string().contains('\n') && !l.to_string().contains('\0')));
    }

    #[test]
    fn durations_beyond_a_year_are_config_errors_not_panics() {
        let text = r#"
            command = ["python3", "app.py"]
            ready_timeout = "18446744073709551615s"
            stop_timeout = "400d"
            backoff_max = "1000000h"
            max_memory = "99999999T"
        "#;
        let joined = parse(text, &Layer::default()).unwrap_err().0.join("\n");
        for key in ["`ready_timeout`", "`stop_timeout`", "`backoff_max`", "`max_memory`"] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn metrics_address_is_validated_and_named_on_error() {
        let s = parse("command = [\"x\"]\nmetrics = \"127.0.0.1:9464\"", &Layer::default()).unwrap();
        assert_eq!(s.metrics, Some(ListenAddr::Tcp("127.0.0.1:9464".parse().unwrap())));
        let p = parse("command = [\"x\"]\nmetrics = \"nowhere\"", &Layer::default()).unwrap_err().0;
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].place, Place::Key { file: "web.toml".into(), key: "metrics".into() });
        assert!(p[0].to_string().contains("9464"), "{p:?}");
        let ov = Layer { metrics: Some("unix:relative".into()), ..Default::default() };
        let p = parse("command = [\"x\"]", &ov).unwrap_err().0;
        assert_eq!(p[0].place, Place::Flag("--metrics".into()));
    }

    #[test]
    fn an_empty_command_array_is_a_problem_not_a_panic() {
        // `command = []` used to pass validation and panic in `main` (index 0 of nothing).
        let p = parse("command = []", &Layer::default()).unwrap_err().0;
        assert_eq!(p.iter().map(|p| &p.error).collect::<Vec<_>>(), [&ConfigError::NoCommand]);
    }

    #[test]
    fn a_key_of_the_wrong_type_is_a_problem_even_when_a_flag_overrides_it() {
        let text = "command = [\"x\"]\nlisten = \":80\"\nworkers = \"lots\"";
        let flags = Layer { listen: vec![":80".into()], workers: Some("2".into()), ..Layer::default() };
        let p = parse(text, &flags).unwrap_err().0;
        // The file's shape is wrong whatever the flags say; its values only count when used.
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].place, Place::Key { file: "web.toml".into(), key: "listen".into() });
    }

    #[test]
    fn zero_durations_name_the_flag_or_the_key_they_came_from() {
        let flags = Layer { ready_timeout: Some("0s".into()), ..Layer::default() };
        let p = parse("command = [\"x\"]\nwatchdog = \"0ms\"", &flags).unwrap_err().0;
        let lines: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            ["--ready-timeout: must be greater than 0", "web.toml: key `watchdog`: must be greater than 0"]
        );
    }

    #[test]
    fn the_files_worker_count_is_kept_as_requested_whatever_the_flag_says() {
        let s = parse("command = [\"x\"]\nworkers = \"max\"", &Layer::default()).unwrap();
        assert_eq!((s.workers.get(), s.file_workers), (4, Some(WorkerCount::CpusMinus(0))));
        let s = parse(
            "command = [\"x\"]\nworkers = -1",
            &Layer { workers: Some("2".into()), ..Layer::default() },
        )
        .unwrap();
        assert_eq!((s.workers.get(), s.file_workers), (2, Some(WorkerCount::CpusMinus(1))));
        assert_eq!(
            flags(Layer { command: vec!["x".into()], ..Layer::default() }).unwrap().file_workers,
            None
        );
    }

    #[test]
    fn settings_render_as_a_file_that_loads_back_to_them() {
        let text = r#"
            name = "api"
            command = ["python3", "app.py", "--port", "80"]
            workers = 3
            listen = ["127.0.0.1:8080", ":9000", "[::1]:80"]
            env = { A = "1", B = "x=y" }
            cwd = "/tmp"
            ready = "alive:1500ms"
            ready_timeout = "90s"
            stop_signal = "int"
            stop_timeout = "1h"
            reload_batch = 2
            reload_surge = 3
            min_ready = "0s"
            on_failure = "keep"
            balance = "sticky"
            watchdog = "10s"
            max_memory = "1000"
            backoff_initial = "1s"
            backoff_max = "1m"
            control = "/run/x.sock"
            control_group = "root"
            metrics = "unix:/run/m.sock"
            watch = ["/tmp", "/"]
            watch_ignore = ["*.tmp", "dist/**"]
        "#;
        let s = parse(text, &Layer::default()).unwrap();
        let written = Layer::from(&s).to_toml();
        assert!(written.contains("max_memory = \"1000\"\n"), "bytes stay bytes, not \"0K\": {written}");
        assert!(!written.contains("backoff_reset"), "a default is not written: {written}");
        assert_eq!(parse(&written, &Layer::default()).unwrap(), s, "{written}");
    }

    #[test]
    fn watch_paths_must_exist_and_are_made_absolute() {
        let ov = Layer { watch: vec!["/no/such/dir".into(), "src".into()], ..Layer::default() };
        let p = parse("command = [\"x\"]\nwatch_ignore = [\"ok\", \" \"]", &ov).unwrap_err().0;
        let lines: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("--watch: /no/such/dir does not exist; "), "{lines:?}");
        assert!(lines[1].starts_with("web.toml: key `watch_ignore`: empty pattern"), "{lines:?}");
        let s = parse("command = [\"x\"]\nwatch = [\"src\"]", &Layer::default()).unwrap();
        assert_eq!(s.watch, [std::env::current_dir().unwrap().join("src")]);
    }

    #[test]
    fn missing_command_is_an_error() {
        let p = flags(Layer::default()).unwrap_err();
        assert_eq!(p.0[0].error, ConfigError::NoCommand);
    }
}
