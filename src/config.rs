//! The app configuration: a TOML file and command-line overrides, validated together into
//! [`Settings`], whose fields cannot be wrong.
//!
//! Parsing is two-step on purpose. The file is read as a plain TOML table, then every key is
//! checked on its own, so one run reports *every* problem (unknown keys, wrong types, bad
//! values), each naming the key and what is allowed. serde's `deny_unknown_fields` would stop at
//! the first one. The same value parsers ([`values`]) serve the flags and the file.

pub mod values;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

pub use values::{Balance, ListenAddr, OnFailure, ReadyMode, WorkerCount};

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
    #[serde(with = "values::signal_name")]
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub reload_batch: NonZeroUsize,
    /// A roll-out's new worker must stay ready this long before its old worker is stopped.
    pub min_ready: Duration,
    /// What an aborted roll-out does with the slots it already moved.
    pub on_failure: OnFailure,
    /// How new connections reach workers.
    pub balance: Balance,
    pub backoff: BackoffPolicy,
    /// Per-worker watchdog (`WATCHDOG_USEC` for workers).
    pub watchdog: Option<Duration>,
    /// Per-worker memory limit in bytes.
    pub max_memory: Option<u64>,
    pub control: Option<PathBuf>,
    /// Group (besides root and our own user) allowed to use the control socket.
    pub control_group: Option<String>,
    /// The config file's own `workers` value, as written, to notice when it changes on reload.
    pub file_workers: Option<String>,
    /// Workers run as this user (`user`/`group`), resolved; `None`: as the supervisor.
    pub user: Option<crate::credentials::Credentials>,
    /// Serve `GET /metrics` here (`--metrics`, `metrics`); `None`: no HTTP endpoint.
    pub metrics: Option<ListenAddr>,
}

/// Values given on the command line; each overrides the file's.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Overrides {
    pub name: Option<String>,
    pub workers: Option<String>,
    pub listen: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub ready: Option<String>,
    pub ready_timeout: Option<String>,
    pub stop_signal: Option<String>,
    pub stop_timeout: Option<String>,
    pub reload_batch: Option<String>,
    pub min_ready: Option<String>,
    pub on_failure: Option<String>,
    pub balance: Option<String>,
    pub watchdog: Option<String>,
    pub max_memory: Option<String>,
    pub control: Option<PathBuf>,
    pub command: Vec<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub metrics: Option<String>,
}

/// Every problem found, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct Problems(pub Vec<String>);

/// The keys a config file may contain; also the order of the annotated example.
pub const KEYS: &[&str] = &[
    "name",
    "command",
    "workers",
    "listen",
    "env",
    "cwd",
    "ready",
    "ready_timeout",
    "stop_signal",
    "stop_timeout",
    "reload_batch",
    "min_ready",
    "on_failure",
    "balance",
    "watchdog",
    "max_memory",
    "backoff_initial",
    "backoff_max",
    "backoff_reset",
    "control",
    "control_group",
    "user",
    "group",
    "metrics",
];

/// Reads and validates `file` (if any) merged with `ov`. `cpus` resolves "auto" worker counts.
pub fn load(file: Option<&Path>, ov: &Overrides, cpus: NonZeroUsize) -> Result<Settings, Problems> {
    let table = match file {
        Some(path) => Some(read_table(path)?),
        None => None,
    };
    build(file, table.as_ref(), ov, cpus)
}

fn read_table(path: &Path) -> Result<toml::Table, Problems> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problems(vec![format!("{}: cannot read config file: {e}", path.display())]))?;
    text.parse::<toml::Table>().map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        let line = e
            .span()
            .map(|s| format!(" (line {})", text[..s.start].lines().count().max(1)))
            .unwrap_or_default();
        Problems(vec![format!("{}: invalid TOML{line}: {msg}", path.display())])
    })
}

/// Collects problems while fields are validated one by one.
struct Checker<'a> {
    file: String,
    table: Option<&'a toml::Table>,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn file_problem(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.problems.push(format!("{}: key `{key}`: {msg}", self.file));
    }

    fn flag_problem(&mut self, flag: &str, msg: impl std::fmt::Display) {
        self.problems.push(format!("{flag}: {msg}"));
    }

    fn file_value(&self, key: &str) -> Option<&toml::Value> {
        self.table.and_then(|t| t.get(key))
    }

    fn file_str(&mut self, key: &str) -> Option<String> {
        match self.file_value(key)? {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                let msg = format!("expected a string, got {}", other.type_str());
                self.file_problem(key, msg);
                None
            }
        }
    }

    /// A value that may come from a flag (which wins) or the file, parsed by `parse`.
    fn pick<T>(
        &mut self,
        flag: &str,
        cli: Option<&str>,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let from_file = self.file_str(key).map(|s| parse(&s));
        match cli {
            Some(v) => match parse(v) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.flag_problem(flag, e);
                    None
                }
            },
            None => match from_file? {
                Ok(t) => Some(t),
                Err(e) => {
                    self.file_problem(key, e);
                    None
                }
            },
        }
    }

    fn file_str_list(&mut self, key: &str) -> Option<Vec<String>> {
        let value = self.file_value(key)?.clone();
        let toml::Value::Array(items) = value else {
            let msg = format!("expected an array of strings, got {}", value.type_str());
            self.file_problem(key, msg);
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                toml::Value::String(s) => out.push(s),
                other => {
                    let msg = format!("expected an array of strings, found {} in it", other.type_str());
                    self.file_problem(key, msg);
                    return None;
                }
            }
        }
        Some(out)
    }
}

fn build(
    file: Option<&Path>,
    table: Option<&toml::Table>,
    ov: &Overrides,
    cpus: NonZeroUsize,
) -> Result<Settings, Problems> {
    let mut c = Checker {
        file: file.map(|p| p.display().to_string()).unwrap_or_default(),
        table,
        problems: Vec::new(),
    };
    if let Some(t) = table {
        for key in t.keys() {
            if !KEYS.contains(&key.as_str()) {
                let msg = format!("unknown key; allowed keys are: {}", KEYS.join(", "));
                c.file_problem(key, msg);
            }
        }
    }

    let mut command = ov.command.clone();
    let file_command = c.file_str_list("command");
    if command.is_empty() {
        command = file_command.unwrap_or_default();
    }
    let command_key_bad = c.file_value("command").is_some() && command.is_empty();
    if !command_key_bad && (command.is_empty() || command[0].is_empty()) {
        c.problems.push(
            "no command to run: put it after `--` (herdsman run ... -- python3 app.py) or set `command = [\"python3\", \"app.py\"]` in the config file"
                .to_string(),
        );
    }

    if let Some(arg) = command.iter().find(|a| a.contains('\0')) {
        let msg = format!("argument {arg:?} contains a NUL byte, which no program can receive; remove it");
        if ov.command.is_empty() { c.file_problem("command", msg) } else { c.flag_problem("command", msg) }
    }

    let default_name = file
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .or_else(|| command_name(&command))
        .unwrap_or_else(|| "app".to_string());
    let name = c
        .pick("--name", ov.name.as_deref(), "name", values::name)
        .or_else(|| (ov.name.is_none() && c.file_value("name").is_none()).then(|| default_name.clone()))
        .map(|n| values::name(&n).unwrap_or_else(|_| sanitize_name(&n)));

    let file_workers = c.file_value("workers").map(|v| v.to_string());
    let workers = match (&ov.workers, c.file_value("workers").cloned()) {
        (Some(v), _) => values::workers(v).map_err(|e| c.flag_problem("--workers", e)).ok(),
        (None, Some(toml::Value::Integer(n))) => {
            values::workers_int(n).map_err(|e| c.file_problem("workers", e)).ok()
        }
        (None, Some(toml::Value::String(s))) => {
            values::workers(&s).map_err(|e| c.file_problem("workers", e)).ok()
        }
        (None, Some(other)) => {
            let msg = format!("expected a number or \"auto\", got {}", other.type_str());
            c.file_problem("workers", msg);
            None
        }
        (None, None) => Some(WorkerCount::Fixed(NonZeroUsize::MIN)),
    }
    .map(|w| w.resolve(cpus));

    let mut listen = Vec::new();
    let listen_raw =
        if ov.listen.is_empty() { c.file_str_list("listen").unwrap_or_default() } else { ov.listen.clone() };
    let from_cli = !ov.listen.is_empty();
    for l in &listen_raw {
        match values::listen(l) {
            Ok(a) => listen.push(a),
            Err(e) if from_cli => c.flag_problem("--listen", e),
            Err(e) => c.file_problem("listen", e),
        }
    }

    let mut env = Vec::new();
    match c.file_value("env").cloned() {
        None => {}
        Some(toml::Value::Table(t)) => {
            for (k, v) in t {
                match v {
                    toml::Value::String(s) if values::env_key_ok(&k) => match values::env_entry(&k, &s) {
                        Ok(()) => env.push((k, s)),
                        Err(msg) => c.file_problem("env", msg),
                    },
                    toml::Value::String(_) => c.file_problem("env", format!("invalid variable name {k:?}")),
                    other => {
                        let msg = format!("`{k}` must be a string (quote it), got {}", other.type_str());
                        c.file_problem("env", msg);
                    }
                }
            }
        }
        Some(other) => {
            let msg = format!(
                "expected a table like env = {{ NODE_ENV = \"production\" }}, got {}",
                other.type_str()
            );
            c.file_problem("env", msg);
        }
    }
    for e in &ov.env {
        match values::env_pair(e) {
            Ok((k, v)) => {
                env.retain(|(ek, _)| *ek != k);
                env.push((k, v));
            }
            Err(msg) => c.flag_problem("--env", msg),
        }
    }

    let cwd = ov.cwd.clone().or_else(|| c.file_str("cwd").map(PathBuf::from));
    if let Some(dir) = &cwd {
        if !dir.is_dir() {
            let msg = format!("working directory {} does not exist or is not a directory", dir.display());
            if ov.cwd.is_some() {
                c.flag_problem("--cwd", msg);
            } else {
                c.file_problem("cwd", msg);
            }
        }
    }

    let ready = c.pick("--ready", ov.ready.as_deref(), "ready", values::ready);
    let ready_timeout =
        c.pick("--ready-timeout", ov.ready_timeout.as_deref(), "ready_timeout", values::duration);
    let stop_signal = c.pick("--stop-signal", ov.stop_signal.as_deref(), "stop_signal", values::signal);
    let stop_timeout = c.pick("--stop-timeout", ov.stop_timeout.as_deref(), "stop_timeout", values::duration);
    let reload_batch = match (&ov.reload_batch, c.file_value("reload_batch").cloned()) {
        (Some(v), _) => positive(v).map_err(|e| c.flag_problem("--reload-batch", e)).ok(),
        (None, Some(toml::Value::Integer(n))) => {
            positive(&n.to_string()).map_err(|e| c.file_problem("reload_batch", e)).ok()
        }
        (None, Some(other)) => {
            c.file_problem("reload_batch", format!("expected a positive integer, got {}", other.type_str()));
            None
        }
        (None, None) => Some(NonZeroUsize::MIN),
    };
    let min_ready = c.pick("--min-ready", ov.min_ready.as_deref(), "min_ready", values::duration);
    let on_failure = c.pick("--on-failure", ov.on_failure.as_deref(), "on_failure", values::on_failure);
    let balance = c.pick("--balance", ov.balance.as_deref(), "balance", values::balance);
    if matches!(balance, Some(Balance::Steer | Balance::Sticky)) {
        for l in listen.iter().filter(|l| matches!(l, ListenAddr::Unix(_))) {
            c.problems.push(format!(
                "--balance / balance: {l} is a unix socket, which cannot be steered (only TCP addresses can); use balance = \"shared\" or a TCP address"
            ));
        }
    }
    let watchdog = c.pick("--watchdog", ov.watchdog.as_deref(), "watchdog", values::duration);
    let max_memory = c.pick("--max-memory", ov.max_memory.as_deref(), "max_memory", values::size);
    let metrics = c.pick("--metrics", ov.metrics.as_deref(), "metrics", values::metrics_addr);
    let b_initial = c.pick("", None, "backoff_initial", values::duration);
    let b_max = c.pick("", None, "backoff_max", values::duration);
    let b_reset = c.pick("", None, "backoff_reset", values::duration);
    let control = ov.control.clone().or_else(|| c.file_str("control").map(PathBuf::from));
    let control_group = c.file_str("control_group");
    if let Some(g) = &control_group {
        if !matches!(nix::unistd::Group::from_name(g), Ok(Some(_))) {
            c.file_problem("control_group", format!("no such group {g:?}; create it or remove the key"));
        }
    }

    let user_key = ov.user.clone().or_else(|| c.file_str("user"));
    let group_key = ov.group.clone().or_else(|| c.file_str("group"));
    let (euid, egid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    let user = crate::credentials::resolve(user_key.as_deref(), group_key.as_deref(), euid, egid)
        .unwrap_or_else(|e| {
            let (flag, key, cli) =
                if e.is_group() { ("--group", "group", &ov.group) } else { ("--user", "user", &ov.user) };
            if cli.is_some() {
                c.flag_problem(flag, e)
            } else {
                c.file_problem(key, e)
            }
            None
        });

    let backoff = BackoffPolicy {
        initial: b_initial.unwrap_or(Duration::from_millis(100)),
        max: b_max.unwrap_or(Duration::from_secs(30)),
        reset_after: b_reset.unwrap_or(Duration::from_secs(10)),
    };
    if backoff.initial.is_zero() || backoff.max < backoff.initial {
        c.problems.push(format!(
            "{}: backoff_initial must be > 0 and <= backoff_max",
            if c.file.is_empty() { "backoff" } else { &c.file }
        ));
    }
    for (d, what) in [
        (ready_timeout, "--ready-timeout / ready_timeout"),
        (stop_timeout, "--stop-timeout / stop_timeout"),
        (watchdog, "--watchdog / watchdog"),
    ] {
        if d.is_some_and(|d| d.is_zero()) {
            c.problems.push(format!("{what}: must be greater than 0"));
        }
    }

    if !c.problems.is_empty() {
        return Err(Problems(c.problems));
    }
    Ok(Settings {
        name: name.unwrap_or(default_name),
        command,
        workers: workers.unwrap_or(NonZeroUsize::MIN),
        listen,
        env,
        cwd,
        ready: ready.unwrap_or(ReadyMode::Alive(Duration::from_secs(1))),
        ready_timeout: ready_timeout.unwrap_or(Duration::from_secs(60)),
        stop_signal: stop_signal.unwrap_or(Signal::SIGTERM),
        stop_timeout: stop_timeout.unwrap_or(Duration::from_secs(30)),
        reload_batch: reload_batch.unwrap_or(NonZeroUsize::MIN),
        min_ready: min_ready.unwrap_or(DEFAULT_MIN_READY),
        on_failure: on_failure.unwrap_or(OnFailure::Rollback),
        balance: balance.unwrap_or(Balance::Shared),
        backoff,
        watchdog,
        max_memory,
        control,
        control_group,
        file_workers,
        user,
        metrics,
    })
}

fn positive(s: &str) -> Result<NonZeroUsize, String> {
    s.trim()
        .parse::<NonZeroUsize>()
        .map_err(|_| format!("invalid value {s:?}; use a whole number greater than 0"))
}

/// Programs whose first argument is the app: `node app.js` is `app`, not `node`.
const INTERPRETERS: &[&str] = &["node", "nodejs", "bun", "deno", "python", "python3", "ruby", "perl", "php"];

/// The default app name without a config file: the program's basename, or for an interpreter
/// (`node`, `python3.11`, `ruby`, `bun`, `deno`, ...) the file stem of its first argument that is
/// not a flag (`node --enable-source-maps /srv/web/app.js` → `app`, `python3 -m gunicorn` →
/// `gunicorn`; `bun run`/`deno run` skip the `run`).
fn command_name(command: &[String]) -> Option<String> {
    let program = Path::new(command.first()?).file_name()?.to_string_lossy().into_owned();
    let interpreter = INTERPRETERS.iter().any(|i| {
        program == *i
            || program
                .strip_prefix(i)
                .is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
    });
    if !interpreter {
        return Some(program);
    }
    let script = command[1..]
        .iter()
        .filter(|a| !a.starts_with('-'))
        .find(|a| !(matches!(program.as_str(), "bun" | "deno") && a.as_str() == "run"));
    let stem = script.and_then(|a| Path::new(a).file_stem()).map(|s| s.to_string_lossy().into_owned());
    // `-c 'code'` and the like: no usable name, keep the interpreter's.
    Some(stem.filter(|s| values::name(s).is_ok()).unwrap_or(program))
}

/// Turns a derived default name (a command basename like `server.py`) into a valid one.
fn sanitize_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(64)
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_string();
    if cleaned.is_empty() { "app".to_string() } else { cleaned }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpus() -> NonZeroUsize {
        NonZeroUsize::new(4).unwrap()
    }

    fn parse(text: &str, ov: &Overrides) -> Result<Settings, Problems> {
        let table: toml::Table = text.parse().unwrap();
        build(Some(Path::new("web.toml")), Some(&table), ov, cpus())
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
        let s = parse(text, &Overrides::default()).unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.workers.get(), 3);
        assert_eq!(s.stop_signal, Signal::SIGINT);
        assert_eq!(s.env, vec![("A".to_string(), "1".to_string())]);
        let ov = Overrides {
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
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            command = "python3 app.py"
            workers = "lots"
            colour = "blue"
            ready_timeout = "soon"
            env = { PORT = 8080 }
        "#;
        let p = parse(text, &Overrides::default()).unwrap_err().0;
        let joined = p.join("\n");
        for key in ["`command`", "`workers`", "`colour`", "`ready_timeout`", "`env`"] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
        assert!(p.iter().all(|l| !l.contains('\n')));
    }

    #[test]
    fn name_defaults_to_the_command_basename_or_an_interpreters_script() {
        let name = |cmd: &[&str]| {
            let ov = Overrides { command: cmd.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            build(None, None, &ov, cpus()).unwrap().name
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
        let ov =
            Overrides { env: vec!["WATCHDOG_PID=1".into(), "LISTEN_PID=1".into()], ..Default::default() };
        let p = parse(text, &ov).unwrap_err().0;
        let joined = p.join("\n");
        for needle in
            ["LISTEN_FDS", "NOTIFY_SOCKET", "HERDSMAN_WORKER_ID", "WATCHDOG_PID", "LISTEN_PID", "`command`"]
        {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
        assert_eq!(p.iter().filter(|l| l.contains("NUL")).count(), 2, "{joined}");
        assert!(p.iter().all(|l| !l.contains('\n') && !l.contains('\0')));
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
        let joined = parse(text, &Overrides::default()).unwrap_err().0.join("\n");
        for key in ["`ready_timeout`", "`stop_timeout`", "`backoff_max`", "`max_memory`"] {
            assert!(joined.contains(key), "missing {key} in:\n{joined}");
        }
    }

    #[test]
    fn metrics_address_is_validated_and_named_on_error() {
        let s = parse("command = [\"x\"]\nmetrics = \"127.0.0.1:9464\"", &Overrides::default()).unwrap();
        assert_eq!(s.metrics, Some(ListenAddr::Tcp("127.0.0.1:9464".parse().unwrap())));
        let p = parse("command = [\"x\"]\nmetrics = \"nowhere\"", &Overrides::default()).unwrap_err().0;
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("`metrics`") && p[0].contains("9464"), "{p:?}");
        let ov = Overrides { metrics: Some("unix:relative".into()), ..Default::default() };
        let p = parse("command = [\"x\"]", &ov).unwrap_err().0;
        assert!(p[0].starts_with("--metrics:"), "{p:?}");
    }

    #[test]
    fn missing_command_is_an_error() {
        let p = build(None, None, &Overrides::default(), cpus()).unwrap_err();
        assert!(p.0[0].contains("no command"));
    }
}
