//! One PM2 app (an object of the ecosystem's `apps`) → one herdsman app: its name, its
//! settings as a [`Layer`] (the values in herdsman's own syntax, so `config::validate` checks
//! them like any flag), and one note per key herdsman does not map, saying what it does
//! instead. The key mapping table is docs/pm2.md.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::value::{args, env_value, flag, id, instances, kind, millis, shown};
use crate::config::{Layer, values};

/// A mapped app.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub name: String,
    /// The settings: command, workers, env (`env` with `env_NAME` over it), cwd, readiness,
    /// timeouts, memory, stop signal, user and group. Not `listen`: that needs the flags.
    pub layer: Layer,
    /// `(key, what herdsman does instead)`, one per key it does not map.
    pub notes: Vec<(String, String)>,
}

/// The keys herdsman does not map, and what it does instead (one line each).
const UNMAPPED: &[(&str, &str)] = &[
    (
        "watch",
        "not applied; for development run `herdsman run --watch PATH` (a debounced rolling reload on changes)",
    ),
    ("ignore_watch", "not applied; with `herdsman run --watch PATH`, exclude files with --watch-ignore GLOB"),
    ("watch_delay", "not applied; `herdsman run --watch` debounces changes itself"),
    ("watch_options", "not applied; `herdsman run --watch` watches with inotify"),
    (
        "cron",
        "herdsman has no schedule; run `herdsman reload NAME` from a systemd timer (a rolling reload, no downtime)",
    ),
    (
        "cron_restart",
        "herdsman has no schedule; run `herdsman reload NAME` from a systemd timer (a rolling reload, no downtime)",
    ),
    (
        "max_restarts",
        "herdsman never gives up on a crashing worker: it restarts it with exponential back-off (config backoff_initial, backoff_max)",
    ),
    ("min_uptime", "herdsman resets a worker's back-off once it has stayed up backoff_reset (default 10s)"),
    (
        "autorestart",
        "herdsman always restarts a worker that exits (with back-off); `herdsman stop NAME` stops the app",
    ),
    ("restart_delay", "herdsman restarts with exponential back-off from backoff_initial (default 100ms)"),
    (
        "exp_backoff_restart_delay",
        "herdsman always restarts with exponential back-off: set backoff_initial (default 100ms) in the app's config",
    ),
    ("stop_exit_codes", "herdsman restarts a worker whatever its exit code, unless the app is being stopped"),
    (
        "log_date_format",
        "worker lines go to the journal (journalctl -u herdsman@NAME) or herdsman's stderr, timestamped there; see `herdsman logs NAME`",
    ),
    (
        "error_file",
        "worker output goes to the journal (journalctl -u herdsman@NAME, WORKER_ID=N) or herdsman's stderr; see `herdsman logs NAME`",
    ),
    (
        "out_file",
        "worker output goes to the journal (journalctl -u herdsman@NAME, WORKER_ID=N) or herdsman's stderr; see `herdsman logs NAME`",
    ),
    (
        "log_file",
        "worker output goes to the journal (journalctl -u herdsman@NAME) or herdsman's stderr; see `herdsman logs NAME`",
    ),
    (
        "log",
        "worker output goes to the journal (journalctl -u herdsman@NAME) or herdsman's stderr; see `herdsman logs NAME`",
    ),
    ("pid_file", "no pid files: `herdsman status NAME --json` lists every worker's pid"),
    ("merge_logs", "every worker's lines already go to one place, each tagged with its worker id"),
    ("combine_logs", "every worker's lines already go to one place, each tagged with its worker id"),
    ("time", "the journal timestamps every line"),
    ("log_type", "for JSON lines run herdsman with --log-format json"),
    ("disable_logs", "worker output always goes to the journal or herdsman's stderr; silence it in the app"),
    (
        "instance_var",
        "herdsman gives every worker NODE_APP_INSTANCE and HERDSMAN_WORKER_ID (its slot, 0..N-1); read one of those",
    ),
    (
        "increment_var",
        "not supported: the workers share one socket; derive a per-worker value from HERDSMAN_WORKER_ID",
    ),
    ("namespace", "no namespaces: every app is its own herdsman@NAME"),
    ("vizion", "no version metadata: herdsman status shows each worker's generation"),
    ("autostart", "`herdsman init` starts the app; pass --no-start to only write the files"),
    ("force", "an app name is one app: `herdsman init --force` replaces an installed app's config"),
    ("treekill", "herdsman always stops a worker's whole process group"),
    (
        "kill_retry_time",
        "herdsman sends the stop signal once, then SIGKILL after the stop timeout (kill_timeout)",
    ),
    ("source_map_support", "add --enable-source-maps to node_args instead"),
    (
        "append_env_to_name",
        "not applied: the app keeps its name (to install one per environment, copy the app under another name)",
    ),
    (
        "filter_env",
        "workers get herdsman's environment plus the app's env; clean the environment of herdsman itself (its unit) instead",
    ),
    ("post_update", "herdsman does not update code; deploy, then `herdsman reload NAME`"),
    (
        "pmx",
        "no PM2 monitoring agent: `herdsman metrics NAME` (Prometheus) has the app's and its workers' metrics",
    ),
    (
        "automation",
        "no PM2 monitoring agent: `herdsman metrics NAME` (Prometheus) has the app's and its workers' metrics",
    ),
    (
        "deep_monitoring",
        "no PM2 monitoring agent: `herdsman metrics NAME` (Prometheus) has the app's and its workers' metrics",
    ),
    (
        "trace",
        "no PM2 monitoring agent: `herdsman metrics NAME` (Prometheus) has the app's and its workers' metrics",
    ),
    ("windowsHide", "Linux only: nothing to hide"),
    ("port", "not applied; give the address with --listen APP=ADDR or PORT in the app's env"),
];

/// The interpreter PM2 picks for a script by its extension (when `interpreter` is not set).
fn interpreter_for(script: &str) -> Option<&'static str> {
    let ext = Path::new(script).extension()?.to_str()?;
    Some(match ext {
        "js" | "cjs" | "mjs" => "node",
        "sh" => "bash",
        "py" => "python3",
        "rb" => "ruby",
        "pl" => "perl",
        "php" => "php",
        _ => return None,
    })
}

/// Maps the app at `apps[index]`. `env_name`: `--env NAME`. `base`: the directory relative
/// paths (`cwd`, and the default working directory) are taken from: the ecosystem file's.
/// `Err`: one line (the caller names the file and the app) saying what is wrong and the fix.
pub fn app(index: usize, value: &Value, env_name: Option<&str>, base: &Path) -> Result<App, String> {
    let Value::Object(obj) = value else {
        return Err(format!(
            "apps[{index}] is {}, not an app; write it as an object like {{ name: 'api', script: 'server.js' }}",
            kind(value)
        ));
    };
    let script = match obj.get("script") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(other) if !matches!(other, Value::String(_)) => {
            return Err(format!(
                "`script` must be a string (the program or file to run), got {}",
                kind(other)
            ));
        }
        _ => return Err("no `script`: add script: 'server.js' (the program or file to run)".into()),
    };
    let name = match obj.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(other) => return Err(format!("`name` must be a string, got {}", kind(other))),
        // PM2's default: the script's file name without its extension.
        None => Path::new(&script).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    values::name(&name).map_err(|_| {
        format!(
            "`name` {name:?} cannot be a herdsman app name (a systemd instance): use letters, digits, '-', '_' and '.' only, at most 64"
        )
    })?;
    let mut m = Mapper { obj, notes: Vec::new(), layer: Layer::default() };
    m.command(&script, base)?;
    m.workers()?;
    m.env(env_name)?;
    m.rest()?;
    let Mapper { layer, mut notes, .. } = m;
    // Every other key: one line each, known or not.
    for key in obj.keys() {
        if MAPPED.contains(&key.as_str()) || key.starts_with("env_") {
            continue;
        }
        let instead = UNMAPPED.iter().find(|(k, _)| *k == key).map_or_else(
            || "unknown key: ignored (not a PM2 option herdsman knows; check its spelling)".to_string(),
            |(_, instead)| (*instead).to_string(),
        );
        notes.push((key.clone(), instead));
    }
    notes.sort();
    Ok(App { name, layer, notes })
}

/// The keys [`app`] maps (besides `env_NAME`).
const MAPPED: &[&str] = &[
    "name",
    "script",
    "args",
    "interpreter",
    "exec_interpreter",
    "interpreter_args",
    "node_args",
    "instances",
    "exec_mode",
    "cwd",
    "env",
    "wait_ready",
    "listen_timeout",
    "kill_timeout",
    "max_memory_restart",
    "shutdown_with_message",
    "kill_signal",
    "uid",
    "gid",
];

struct Mapper<'a> {
    obj: &'a Map<String, Value>,
    layer: Layer,
    notes: Vec<(String, String)>,
}

impl Mapper<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn note(&mut self, key: &str, text: impl Into<String>) {
        self.notes.push((key.to_string(), text.into()));
    }

    /// `script` + `args` + `interpreter`/`interpreter_args`/`node_args`, and `cwd`.
    fn command(&mut self, script: &str, base: &Path) -> Result<(), String> {
        let cwd = match self.get("cwd") {
            None => base.to_path_buf(),
            Some(Value::String(c)) => base.join(c),
            Some(other) => return Err(format!("`cwd` must be a string (a directory), got {}", kind(other))),
        };
        let interpreter = match self.get("interpreter").or_else(|| self.get("exec_interpreter")) {
            None => None,
            Some(Value::String(i)) if i == "none" => Some(None),
            Some(Value::String(i)) if !i.trim().is_empty() => Some(Some(i.clone())),
            Some(other) => {
                return Err(format!("`interpreter` must be a program name or path, got {}", kind(other)));
            }
        };
        let mut interpreter_args = args(self.get("interpreter_args"), "interpreter_args")?;
        interpreter_args.extend(args(self.get("node_args"), "node_args")?);
        let program = match interpreter {
            Some(chosen) => chosen,
            None => interpreter_for(script).map(String::from),
        };
        let mut command = Vec::new();
        match program {
            Some(p) => {
                command.push(p);
                command.append(&mut interpreter_args);
                command.push(script.to_string());
            }
            None => {
                if !interpreter_args.is_empty() {
                    self.note(
                        "interpreter_args",
                        format!("not applied: {script} runs directly (no interpreter); set interpreter to use them"),
                    );
                }
                // A file in the app's directory runs from there; a bare name is looked up in PATH.
                let local = cwd.join(script);
                let direct = !script.contains('/') && local.is_file();
                command.push(if direct { local.display().to_string() } else { script.to_string() });
            }
        }
        command.extend(args(self.get("args"), "args")?);
        self.layer.command = command;
        self.layer.cwd = Some(cwd);
        Ok(())
    }

    /// `instances` and `exec_mode`.
    fn workers(&mut self) -> Result<(), String> {
        let fork = match self.get("exec_mode") {
            None => false,
            Some(Value::String(m)) if matches!(m.as_str(), "fork" | "fork_mode") => true,
            Some(Value::String(m)) if matches!(m.as_str(), "cluster" | "cluster_mode") => false,
            Some(other) => {
                return Err(format!("`exec_mode` must be \"cluster\" or \"fork\", got {}", shown(other)));
            }
        };
        let requested = self.get("instances").map(instances).transpose()?;
        self.layer.workers = Some(match requested {
            Some(n) if fork && n != "1" => {
                self.note(
                    "instances",
                    format!("{n} not applied: exec_mode fork runs one worker; use exec_mode cluster for {n}"),
                );
                "1".into()
            }
            Some(n) => n,
            None => "1".into(),
        });
        Ok(())
    }

    /// `env`, with `env_NAME` over it for `--env NAME`; a note for each other `env_*`.
    fn env(&mut self, env_name: Option<&str>) -> Result<(), String> {
        let mut env: Vec<(String, String)> = Vec::new();
        let chosen = env_name.map(|n| format!("env_{n}"));
        let mut applied = false;
        for key in std::iter::once("env").chain(chosen.as_deref()) {
            match self.get(key) {
                None => {}
                Some(Value::Object(vars)) => {
                    applied |= key != "env";
                    for (k, v) in vars {
                        let v = env_value(key, k, v)?;
                        env.retain(|(ek, _)| ek != k);
                        env.push((k.clone(), v));
                    }
                }
                Some(other) => {
                    return Err(format!(
                        "`{key}` must be an object of variables like {{ NODE_ENV: 'production' }}, got {}",
                        kind(other)
                    ));
                }
            }
        }
        if let (Some(chosen), false) = (&chosen, applied) {
            self.note(chosen, "not in this app: --env applies only its env");
        }
        for key in self.obj.keys().filter(|k| k.starts_with("env_") && Some(k.as_str()) != chosen.as_deref())
        {
            let name = &key["env_".len()..];
            self.notes.push((key.clone(), format!("not applied: pass --env {name} to merge it over env")));
        }
        self.layer.env = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        Ok(())
    }

    /// Readiness, timeouts, memory, stop signal, user and group.
    fn rest(&mut self) -> Result<(), String> {
        if flag(self.get("wait_ready"), "wait_ready")? {
            // process.send('ready') reaches herdsman through the worker's IPC channel.
            self.layer.ready = Some("notify".into());
        }
        self.layer.ready_timeout =
            self.get("listen_timeout").map(|v| millis(v, "listen_timeout")).transpose()?;
        self.layer.stop_timeout = self.get("kill_timeout").map(|v| millis(v, "kill_timeout")).transpose()?;
        self.layer.max_memory = match self.get("max_memory_restart") {
            None => None,
            Some(v @ (Value::String(_) | Value::Number(_))) => {
                let text = match v {
                    Value::String(s) => s.trim().to_string(),
                    other => other.to_string(),
                };
                values::size(&text).map_err(|e| format!("`max_memory_restart`: {e}"))?;
                Some(text)
            }
            Some(other) => {
                return Err(format!(
                    "`max_memory_restart` must be a size like \"300M\" or bytes, got {}",
                    kind(other)
                ));
            }
        };
        if let Some(v) = self.get("kill_signal") {
            let Value::String(sig) = v else {
                return Err(format!("`kill_signal` must be a signal name like \"SIGINT\", got {}", kind(v)));
            };
            values::stop_signal(sig).map_err(|e| format!("`kill_signal`: {e}"))?;
            self.layer.stop_signal = Some(sig.clone());
        }
        if flag(self.get("shutdown_with_message"), "shutdown_with_message")? {
            if self.layer.stop_signal.is_some() {
                self.note(
                    "kill_signal",
                    "not applied: shutdown_with_message stops workers with the 'shutdown' message",
                );
            }
            self.layer.stop_signal = Some("message".into());
        }
        self.layer.user = self.get("uid").map(|v| id(v, "uid")).transpose()?;
        self.layer.group = self.get("gid").map(|v| id(v, "gid")).transpose()?;
        Ok(())
    }
}

/// The directory an ecosystem file's relative paths are taken from: its own.
pub fn base_dir(file: &Path) -> PathBuf {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    abs.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value, env: Option<&str>) -> Result<App, String> {
        app(0, &v, env, Path::new("/srv/app"))
    }

    #[test]
    fn a_cluster_app_maps_every_key_herdsman_has() {
        let a = map(
            json!({
                "name": "api", "script": "server.js", "args": "--port 80 'a b'", "node_args": ["--max-old-space-size=512"],
                "instances": "4", "exec_mode": "cluster", "cwd": "api", "wait_ready": true, "listen_timeout": 8000,
                "kill_timeout": "3000", "max_memory_restart": "300M", "shutdown_with_message": true,
                "uid": "www-data", "gid": 33, "env": {"A": "1", "PORT": 8080, "DEBUG": false},
                "env_production": {"A": "2", "NODE_ENV": "production"}
            }),
            Some("production"),
        )
        .unwrap();
        assert_eq!(a.name, "api");
        let l = &a.layer;
        assert_eq!(l.command, ["node", "--max-old-space-size=512", "server.js", "--port", "80", "a b"]);
        assert_eq!(l.cwd.as_deref(), Some(Path::new("/srv/app/api")));
        assert_eq!(l.workers.as_deref(), Some("4"));
        assert_eq!(l.env, ["DEBUG=false", "PORT=8080", "A=2", "NODE_ENV=production"]);
        assert_eq!(l.ready.as_deref(), Some("notify"));
        assert_eq!((l.ready_timeout.as_deref(), l.stop_timeout.as_deref()), (Some("8000ms"), Some("3000ms")));
        assert_eq!(l.max_memory.as_deref(), Some("300M"));
        assert_eq!(l.stop_signal.as_deref(), Some("message"));
        assert_eq!((l.user.as_deref(), l.group.as_deref()), (Some("www-data"), Some("33")));
        assert!(a.notes.is_empty(), "{:?}", a.notes);
    }

    #[test]
    fn instances_as_pm2_writes_them() {
        let w =
            |v: Value| map(json!({"script": "a.js", "instances": v}), None).map(|a| a.layer.workers.unwrap());
        assert_eq!(w(json!("max")).unwrap(), "max");
        assert_eq!(w(json!(-1)).unwrap(), "-1");
        assert_eq!(w(json!(0)).unwrap(), "max");
        assert_eq!(w(json!(3)).unwrap(), "3");
        assert_eq!(w(json!(" 4 ")).unwrap(), "4");
        assert_eq!(w(json!(2.0)).unwrap(), "2");
        for bad in [json!("lots"), json!(1.5), json!(true), json!(100000)] {
            let e = w(bad.clone()).unwrap_err();
            assert!(e.starts_with("`instances`") && !e.contains('\n'), "{bad}: {e}");
        }
        let fork = map(json!({"script": "a.js", "instances": 4, "exec_mode": "fork_mode"}), None).unwrap();
        assert_eq!(fork.layer.workers.as_deref(), Some("1"));
        assert_eq!(fork.notes.len(), 1, "{:?}", fork.notes);
        assert_eq!(map(json!({"script": "a.js"}), None).unwrap().layer.workers.as_deref(), Some("1"));
        assert!(
            map(json!({"script": "a.js", "exec_mode": "swarm"}), None).unwrap_err().contains("exec_mode")
        );
    }

    #[test]
    fn the_command_follows_pm2s_interpreter_rules() {
        let cmd = |v: Value| map(v, None).unwrap().layer.command;
        assert_eq!(cmd(json!({"script": "app.js"})), ["node", "app.js"]);
        assert_eq!(cmd(json!({"script": "app.py", "args": ["-v", 2]})), ["python3", "app.py", "-v", "2"]);
        assert_eq!(
            cmd(json!({"script": "app.ts", "interpreter": "bun", "interpreter_args": "run"})),
            ["bun", "run", "app.ts"]
        );
        assert_eq!(cmd(json!({"script": "npm", "args": "start"})), ["npm", "start"]);
        assert_eq!(cmd(json!({"script": "app.js", "interpreter": "none"})), ["app.js"]);
        assert_eq!(cmd(json!({"script": "./bin/www", "exec_interpreter": "node"})), ["node", "./bin/www"]);
        assert_eq!(
            map(json!({"script": "bin/server.js"}), None).unwrap().name,
            "server",
            "PM2's default name"
        );
        assert_eq!(
            super::super::value::split(r#"a "b c" 'd "e"' f\ g "h\"i""#).unwrap(),
            ["a", "b c", "d \"e\"", "f g", "h\"i"]
        );
        assert!(super::super::value::split("'open").is_err());
    }

    #[test]
    fn times_in_ms_and_sizes_as_pm2_writes_them() {
        let l = |v: Value| map(v, None).map(|a| a.layer);
        let t = l(json!({"script": "a", "listen_timeout": "5s", "kill_timeout": 1600.0, "max_memory_restart": 1048576})).unwrap();
        assert_eq!((t.ready_timeout.as_deref(), t.stop_timeout.as_deref()), (Some("5s"), Some("1600ms")));
        assert_eq!(t.max_memory.as_deref(), Some("1048576"));
        for (bad, key) in [
            (json!({"script": "a", "kill_timeout": -1}), "`kill_timeout`"),
            (json!({"script": "a", "kill_timeout": 0}), "`kill_timeout`"),
            (json!({"script": "a", "listen_timeout": "soon"}), "`listen_timeout`"),
            (json!({"script": "a", "max_memory_restart": "lots"}), "`max_memory_restart`"),
            (json!({"script": "a", "wait_ready": "yes"}), "`wait_ready`"),
            (json!({"script": "a", "kill_signal": "SIGNOPE"}), "`kill_signal`"),
            (json!({"script": "a", "uid": -3}), "`uid`"),
            (json!({"script": "a", "env": {"A": {"b": 1}}}), "`env.A`"),
            (json!({"script": "a", "env": {"NODE_APP_INSTANCE": "1"}}), "`env.NODE_APP_INSTANCE`"),
            (json!({"script": "a", "env": ["A=1"]}), "`env`"),
            (json!({"script": "a", "name": "my app"}), "`name`"),
            (json!({"script": 3}), "`script`"),
            (json!({"name": "x"}), "no `script`"),
        ] {
            let e = l(bad.clone()).unwrap_err();
            assert!(e.contains(key) && !e.contains('\n'), "{bad}: {e}");
        }
        assert!(app(3, &json!("x"), None, Path::new("/")).unwrap_err().starts_with("apps[3] is a string"));
    }

    #[test]
    fn every_unmapped_and_unknown_key_gets_one_note() {
        let a = map(
            json!({
                "name": "w", "script": "w.js", "watch": true, "ignore_watch": ["node_modules"], "cron_restart": "0 * * * *",
                "max_restarts": 10, "min_uptime": "10s", "autorestart": true, "exp_backoff_restart_delay": 100,
                "log_date_format": "YYYY", "error_file": "e.log", "out_file": "o.log", "merge_logs": true,
                "instance_var": "INSTANCE_ID", "increment_var": "PORT", "colour": "blue",
                "env_staging": {"A": "1"}, "kill_signal": "SIGINT", "shutdown_with_message": true
            }),
            Some("production"),
        )
        .unwrap();
        let keys: Vec<&str> = a.notes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "autorestart",
                "colour",
                "cron_restart",
                "env_production",
                "env_staging",
                "error_file",
                "exp_backoff_restart_delay",
                "ignore_watch",
                "increment_var",
                "instance_var",
                "kill_signal",
                "log_date_format",
                "max_restarts",
                "merge_logs",
                "min_uptime",
                "out_file",
                "watch",
            ]
        );
        let note = |k: &str| a.notes.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert!(note("watch").contains("--watch"), "{}", note("watch"));
        assert!(note("colour").contains("unknown key"), "{}", note("colour"));
        assert!(note("env_staging").contains("--env staging"), "{}", note("env_staging"));
        assert_eq!(a.layer.stop_signal.as_deref(), Some("message"));
        assert!(a.notes.iter().all(|(_, n)| !n.contains('\n')));
    }
}
