//! From layers to [`Settings`] and back: [`validate`] reads each setting from the command line
//! (which wins) or the file, checks it, and collects every problem; [`Layer::from`] renders
//! settings as the layer that validates back to them (for `init`).
//!
//! A single-valued setting is one [`Checker::pick`] line with its parser and its default; the
//! few with more to them (the command, the name, the environment, the worker user) have a
//! method each.

use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::layer::{FileLayer, Layer, keys};
use super::problem::{ConfigError, Place, Problem};
use super::values::{self, Balance, ListenAddr, LogFormat, OnFailure, ReadyMode, StopSignal, WorkerCount};
use super::{BackoffPolicy, DEFAULT_MIN_READY, Settings};

/// Validates `cli` over `file` into settings, or every problem found. `cpus` resolves "auto"
/// worker counts.
pub fn validate(cli: &Layer, file: Option<&FileLayer>, cpus: NonZeroUsize) -> Result<Settings, Vec<Problem>> {
    let mut c = Checker { cli, file, problems: Vec::new(), seen: Vec::new() };
    let secs = Duration::from_secs;
    // Each setting: its key, where the layer holds it, its parser, its default. In this order,
    // so that problems are listed as they always were.
    let command = c.command();
    let name = c.name(&command);
    let workers = c.pick("workers", |l| l.workers.as_deref(), values::workers);
    let workers = workers.unwrap_or(WorkerCount::Fixed(NonZeroUsize::MIN)).resolve(cpus);
    let listen = c.listen();
    let env = c.env();
    let cwd = c.cwd();
    let ready = c.pick("ready", |l| l.ready.as_deref(), values::ready).unwrap_or(ReadyMode::Auto);
    let ready_timeout =
        c.pick("ready_timeout", |l| l.ready_timeout.as_deref(), positive_duration).unwrap_or(secs(60));
    let stop_signal = c
        .pick("stop_signal", |l| l.stop_signal.as_deref(), values::stop_signal)
        .unwrap_or(StopSignal::Signal(Signal::SIGTERM));
    c.message_needs_node(stop_signal, &command);
    let stop_timeout =
        c.pick("stop_timeout", |l| l.stop_timeout.as_deref(), positive_duration).unwrap_or(secs(30));
    let reload_batch =
        c.pick("reload_batch", |l| l.reload_batch.as_deref(), values::positive).unwrap_or(NonZeroUsize::MIN);
    let reload_surge = c.pick("reload_surge", |l| l.reload_surge.as_deref(), values::positive);
    let min_ready =
        c.pick("min_ready", |l| l.min_ready.as_deref(), values::duration).unwrap_or(DEFAULT_MIN_READY);
    let on_failure =
        c.pick("on_failure", |l| l.on_failure.as_deref(), values::on_failure).unwrap_or(OnFailure::Rollback);
    let balance = c.pick("balance", |l| l.balance.as_deref(), values::balance).unwrap_or(Balance::Shared);
    c.steerable(balance, &listen);
    let bind_intercept =
        c.pick("bind_intercept", |l| l.bind_intercept.as_deref(), values::bind_intercept).unwrap_or_default();
    let watchdog = c.pick("watchdog", |l| l.watchdog.as_deref(), positive_duration);
    let max_memory = c.pick("max_memory", |l| l.max_memory.as_deref(), values::size);
    let metrics = c.pick("metrics", |l| l.metrics.as_deref(), values::metrics_addr);
    let log_format =
        c.pick("log_format", |l| l.log_format.as_deref(), values::log_format).unwrap_or_default();
    let backoff = c.backoff();
    let control = c.lookup("control", |l| l.control.as_deref()).map(|(p, _)| p.to_path_buf());
    let control_group = c.pick("control_group", |l| l.control_group.as_deref(), group_exists);
    let user = c.user();
    let (watch, watch_ignore) = c.watch();
    let file_workers = file.and_then(|f| f.layer.workers.as_deref()).and_then(|w| values::workers(w).ok());

    debug_assert!(
        keys().iter().all(|k| c.seen.contains(k)),
        "every key must be validated; not: {:?}",
        keys().iter().filter(|k| !c.seen.contains(k)).collect::<Vec<_>>()
    );
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok(Settings {
        name,
        command,
        workers,
        listen,
        env,
        cwd,
        ready,
        ready_timeout,
        stop_signal,
        stop_timeout,
        reload_batch,
        reload_surge,
        min_ready,
        on_failure,
        balance,
        bind_intercept,
        backoff,
        watchdog,
        max_memory,
        control,
        control_group,
        file_workers,
        user,
        metrics,
        watch,
        watch_ignore,
        log_format,
    })
}

impl From<&Settings> for Layer {
    /// Every value in the form its parser reads back. `user` and `group` stay unset: a
    /// resolved identity has no single spelling (`init` writes them as they were given). The
    /// back-off keys are set only when they are not the defaults.
    fn from(s: &Settings) -> Layer {
        let text = |d: Duration| Some(humantime::format_duration(d).to_string());
        let backoff = |d: Duration, default: Duration| if d == default { None } else { text(d) };
        let default = BackoffPolicy::DEFAULT;
        Layer {
            name: Some(s.name.clone()),
            command: s.command.clone(),
            workers: Some(s.workers.to_string()),
            listen: s.listen.iter().map(ToString::to_string).collect(),
            env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: s.cwd.clone(),
            ready: Some(s.ready.to_string()),
            ready_timeout: text(s.ready_timeout),
            stop_signal: Some(s.stop_signal.to_string()),
            stop_timeout: text(s.stop_timeout),
            reload_batch: Some(s.reload_batch.to_string()),
            reload_surge: s.reload_surge.map(|n| n.to_string()),
            min_ready: text(s.min_ready),
            on_failure: Some(s.on_failure.to_string()),
            balance: Some(s.balance.to_string()),
            bind_intercept: Some(s.bind_intercept.to_string()),
            watchdog: s.watchdog.and_then(text),
            max_memory: s.max_memory.map(values::size_text),
            backoff_initial: backoff(s.backoff.initial, default.initial),
            backoff_max: backoff(s.backoff.max, default.max),
            backoff_reset: backoff(s.backoff.reset_after, default.reset_after),
            control: s.control.clone(),
            control_group: s.control_group.clone(),
            user: None,
            group: None,
            metrics: s.metrics.as_ref().map(ToString::to_string),
            watch: s.watch.iter().map(|p| p.display().to_string()).collect(),
            watch_ignore: s.watch_ignore.clone(),
            log_format: (s.log_format != LogFormat::Text).then(|| s.log_format.to_string()),
        }
    }
}

fn positive_duration(s: &str) -> Result<Duration, ConfigError> {
    let d = values::duration(s)?;
    if d.is_zero() { Err(ConfigError::Zero) } else { Ok(d) }
}

fn group_exists(g: &str) -> Result<String, ConfigError> {
    match nix::unistd::Group::from_name(g) {
        Ok(Some(_)) => Ok(g.to_string()),
        _ => Err(ConfigError::NoControlGroup(g.to_string())),
    }
}

/// Reads settings from the two layers, collecting problems.
struct Checker<'a> {
    cli: &'a Layer,
    file: Option<&'a FileLayer>,
    problems: Vec<Problem>,
    /// The keys looked up so far (every key must be, see `validate`).
    seen: Vec<&'static str>,
}

impl<'a> Checker<'a> {
    /// A setting's raw value, from the flag if given, else from the file, and where it is.
    fn lookup<R: ?Sized>(
        &mut self,
        key: &'static str,
        get: impl Fn(&'a Layer) -> Option<&'a R>,
    ) -> Option<(&'a R, Place)> {
        debug_assert!(keys().contains(&key), "{key} is not a setting");
        self.seen.push(key);
        if let Some(v) = get(self.cli) {
            let flag =
                if key == "command" { key.to_string() } else { format!("--{}", key.replace('_', "-")) };
            return Some((v, Place::Flag(flag)));
        }
        let file = self.file?;
        get(&file.layer).map(|v| (v, file.key(key)))
    }

    /// A single-valued setting, parsed; `None` if unset or invalid (then it is a problem).
    fn pick<T, E: Into<ConfigError>>(
        &mut self,
        key: &'static str,
        get: impl Fn(&'a Layer) -> Option<&'a str>,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Option<T> {
        let (raw, place) = self.lookup(key, get)?;
        parse(raw).map_err(|e| self.problems.push(Problem::new(place, e))).ok()
    }

    fn command(&mut self) -> Vec<String> {
        let Some((command, place)) = self.lookup("command", |l| non_empty(&l.command)) else {
            // A `command` key of the wrong type is reported already.
            if !self.file.is_some_and(|f| f.unreadable.contains("command")) {
                self.problems.push(Problem::new(Place::Anywhere, ConfigError::NoCommand));
            }
            return Vec::new();
        };
        if command[0].is_empty() {
            self.problems.push(Problem::new(Place::Anywhere, ConfigError::NoCommand));
        }
        if let Some(arg) = command.iter().find(|a| a.contains('\0')) {
            self.problems.push(Problem::new(place, ConfigError::NulInArgument(arg.clone())));
        }
        command.to_vec()
    }

    /// The name given, else the config file's stem, else one derived from the command.
    fn name(&mut self, command: &[String]) -> String {
        let stem = self.file.and_then(|f| f.path.file_stem()).map(|s| s.to_string_lossy().into_owned());
        let default = stem.or_else(|| command_name(command)).unwrap_or_else(|| "app".to_string());
        self.pick("name", |l| l.name.as_deref(), values::name).unwrap_or_else(|| sanitize_name(&default))
    }

    fn listen(&mut self) -> Vec<ListenAddr> {
        let Some((raw, place)) = self.lookup("listen", |l| non_empty(&l.listen)) else { return Vec::new() };
        let mut listen = Vec::new();
        for l in raw {
            match values::listen(l) {
                Ok(a) => listen.push(a),
                Err(e) => self.problems.push(Problem::new(place.clone(), e)),
            }
        }
        listen
    }

    /// The file's environment with the flags' entries over it.
    fn env(&mut self) -> Vec<(String, String)> {
        self.seen.push("env");
        let file = self.file.map(|f| (&f.layer.env, f.key("env")));
        let mut env: Vec<(String, String)> = Vec::new();
        for (entries, place) in file.into_iter().chain([(&self.cli.env, Place::Flag("--env".into()))]) {
            for entry in entries {
                match values::env_pair(entry) {
                    Ok((k, v)) => {
                        env.retain(|(ek, _)| *ek != k);
                        env.push((k, v));
                    }
                    Err(e) => self.problems.push(Problem::new(place.clone(), e)),
                }
            }
        }
        env
    }

    fn cwd(&mut self) -> Option<std::path::PathBuf> {
        let (dir, place) = self.lookup("cwd", |l| l.cwd.as_deref())?;
        if !dir.is_dir() {
            self.problems.push(Problem::new(place, ConfigError::NoDirectory(dir.to_path_buf())));
        }
        Some(dir.to_path_buf())
    }

    /// Steered sockets are TCP only.
    /// `--stop-signal message` needs the IPC channel only Node workers get (see `ipc`). The
    /// program's file name is the one its resolved path has, so this is known before any start.
    fn message_needs_node(&mut self, stop: StopSignal, command: &[String]) {
        match command.first() {
            Some(program) if stop == StopSignal::Message && !crate::ipc::is_node(program) => {
                let place = Place::Setting { flag: "--stop-signal".into(), key: "stop_signal".into() };
                self.problems.push(Problem::new(place, ConfigError::MessageNeedsNode(program.clone())));
            }
            _ => {}
        }
    }

    fn steerable(&mut self, balance: Balance, listen: &[ListenAddr]) {
        if balance == Balance::Shared {
            return;
        }
        for l in listen.iter().filter(|l| matches!(l, ListenAddr::Unix(_))) {
            let place = Place::Setting { flag: "--balance".into(), key: "balance".into() };
            self.problems.push(Problem::new(place, ConfigError::NotSteerable(l.clone())));
        }
    }

    fn backoff(&mut self) -> BackoffPolicy {
        let default = BackoffPolicy::DEFAULT;
        let backoff = BackoffPolicy {
            initial: self
                .pick("backoff_initial", |l| l.backoff_initial.as_deref(), values::duration)
                .unwrap_or(default.initial),
            max: self
                .pick("backoff_max", |l| l.backoff_max.as_deref(), values::duration)
                .unwrap_or(default.max),
            reset_after: self
                .pick("backoff_reset", |l| l.backoff_reset.as_deref(), values::duration)
                .unwrap_or(default.reset_after),
        };
        if backoff.initial.is_zero() || backoff.max < backoff.initial {
            let place = self.file.map_or(Place::Anywhere, |f| Place::File(f.path.display().to_string()));
            self.problems.push(Problem::new(place, ConfigError::BackoffOrder));
        }
        backoff
    }

    /// The worker user (`user`, `group`) resolved.
    fn user(&mut self) -> Option<crate::credentials::Credentials> {
        let user = self.lookup("user", |l| l.user.as_deref());
        let group = self.lookup("group", |l| l.group.as_deref());
        let (euid, egid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        match crate::credentials::resolve(user.as_ref().map(|u| u.0), group.as_ref().map(|g| g.0), euid, egid)
        {
            Ok(c) => c,
            Err(e) => {
                let (first, second) = if e.is_group() { (group, user) } else { (user, group) };
                let place = first.or(second).map_or(Place::Anywhere, |(_, p)| p);
                self.problems.push(Problem::new(place, e));
                None
            }
        }
    }
}

impl Checker<'_> {
    /// The paths to watch (each must exist; made absolute, so reloads and `init` do not
    /// depend on the working directory) and the patterns to ignore.
    fn watch(&mut self) -> (Vec<std::path::PathBuf>, Vec<String>) {
        let mut watch = Vec::new();
        if let Some((raw, place)) = self.lookup("watch", |l| non_empty(&l.watch)) {
            for p in raw {
                let path = Path::new(p);
                match std::path::absolute(path) {
                    Ok(abs) if path.exists() => watch.push(abs),
                    _ => {
                        self.problems.push(Problem::new(place.clone(), ConfigError::NoWatchPath(path.into())))
                    }
                }
            }
        }
        let mut ignore = Vec::new();
        if let Some((raw, place)) = self.lookup("watch_ignore", |l| non_empty(&l.watch_ignore)) {
            for g in raw {
                match crate::glob::Glob::parse(g) {
                    Ok(_) => ignore.push(g.clone()),
                    Err(e) => self.problems.push(Problem::new(place.clone(), ConfigError::WatchIgnore(e))),
                }
            }
        }
        (watch, ignore)
    }
}

fn non_empty(v: &[String]) -> Option<&[String]> {
    (!v.is_empty()).then_some(v)
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
