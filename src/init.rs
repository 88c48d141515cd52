//! `herdsman init` and `herdsman remove`: turn a command line into a systemd-managed app
//! (PM2's `startup` + `save`), and undo it.
//!
//! `init` writes `/etc/herdsman/NAME.toml` (the validated settings), a drop-in giving
//! `herdsman@NAME.socket` its address(es), and, when the stop timeout is longer than the
//! unit's default allows, a drop-in raising `TimeoutStopSec=`; then `daemon-reload` and
//! `enable --now` of the socket and the service.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cli::{InitArgs, RemoveArgs};
use crate::config::{self, ListenAddr, Settings};
use crate::exit;

/// The service unit's `TimeoutStopSec=` covers a stop timeout up to this.
const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A failure with its exit code.
pub struct Failure {
    pub code: i32,
    pub message: String,
}

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into() }
}

struct Plan {
    files: Vec<(PathBuf, String)>,
    commands: Vec<Vec<String>>,
}

fn socket_dropin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("herdsman@{name}.socket.d")).join("listen.conf")
}

fn service_dropin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("herdsman@{name}.service.d")).join("stop-timeout.conf")
}

fn units(name: &str) -> [String; 2] {
    [format!("herdsman@{name}.socket"), format!("herdsman@{name}.service")]
}

/// Renders the validated settings as the app's config file.
fn render_config(s: &Settings, workers: Option<&str>) -> String {
    let mut t = toml::Table::new();
    let strs = |v: &[String]| toml::Value::Array(v.iter().map(|x| toml::Value::String(x.clone())).collect());
    t.insert("name".into(), s.name.clone().into());
    t.insert("command".into(), strs(&s.command));
    let w = match workers.map(config::values::workers) {
        Some(Ok(config::WorkerCount::Fixed(n))) => toml::Value::Integer(n.get() as i64),
        Some(Ok(config::WorkerCount::CpusMinus(0))) => "auto".into(),
        Some(Ok(config::WorkerCount::CpusMinus(k))) => toml::Value::Integer(-(k as i64)),
        _ => toml::Value::Integer(s.workers.get() as i64),
    };
    t.insert("workers".into(), w);
    t.insert("listen".into(), strs(&s.listen.iter().map(ToString::to_string).collect::<Vec<_>>()));
    if let Some(cwd) = &s.cwd {
        t.insert("cwd".into(), cwd.display().to_string().into());
    }
    t.insert("ready".into(), s.ready.to_string().into());
    let dur = |d: Duration| toml::Value::String(humantime::format_duration(d).to_string());
    t.insert("ready_timeout".into(), dur(s.ready_timeout));
    t.insert("stop_signal".into(), s.stop_signal.as_str().into());
    t.insert("stop_timeout".into(), dur(s.stop_timeout));
    t.insert("reload_batch".into(), toml::Value::Integer(s.reload_batch.get() as i64));
    t.insert("min_ready".into(), dur(s.min_ready));
    t.insert("on_failure".into(), s.on_failure.to_string().into());
    if let Some(w) = s.watchdog {
        t.insert("watchdog".into(), dur(w));
    }
    if let Some(m) = s.max_memory {
        t.insert("max_memory".into(), format!("{}K", m >> 10).into());
    }
    if !s.env.is_empty() {
        let env: toml::Table =
            s.env.iter().map(|(k, v)| (k.clone(), toml::Value::String(v.clone()))).collect();
        t.insert("env".into(), toml::Value::Table(env));
    }
    let body = toml::to_string(&t).unwrap_or_default();
    format!(
        "# herdsman app {name}: written by `herdsman init`; edit, then `systemctl reload herdsman@{name}`.\n\
         # `listen` is used only when the app runs without systemd: under systemd the socket unit\n\
         # herdsman@{name}.socket owns the address (drop-in herdsman@{name}.socket.d/listen.conf).\n{body}",
        name = s.name
    )
}

fn render_socket(s: &Settings) -> String {
    let mut out = format!(
        "# Written by `herdsman init {}`: the app's listening address(es).\n[Socket]\nListenStream=\n",
        s.name
    );
    for l in &s.listen {
        let addr = match l {
            ListenAddr::Tcp(a) => a.to_string(),
            ListenAddr::Unix(p) => p.display().to_string(),
        };
        let _ = writeln!(out, "ListenStream={addr}");
    }
    out
}

fn plan_init(a: &InitArgs, s: &Settings) -> Plan {
    let mut files = vec![
        (a.config_dir.join(format!("{}.toml", s.name)), render_config(s, a.app.workers.as_deref())),
        (socket_dropin(&a.unit_dir, &s.name), render_socket(s)),
    ];
    if s.stop_timeout > UNIT_STOP_TIMEOUT {
        let secs = (s.stop_timeout + Duration::from_secs(15)).as_secs();
        files.push((
            service_dropin(&a.unit_dir, &s.name),
            format!("# Written by `herdsman init`: stop_timeout plus a margin.\n[Service]\nTimeoutStopSec={secs}s\n"),
        ));
    }
    let [sock, svc] = units(&s.name);
    let commands = if a.no_start {
        vec![]
    } else {
        vec![
            vec!["systemctl".into(), "daemon-reload".into()],
            vec!["systemctl".into(), "enable".into(), "--now".into(), sock, svc],
        ]
    };
    Plan { files, commands }
}

fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn run_command(cmd: &[String]) -> Result<(), Failure> {
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .map_err(|e| fail(exit::FAILURE, format!("cannot run {}: {e}", cmd.join(" "))))?;
    if status.success() {
        Ok(())
    } else {
        Err(fail(exit::FAILURE, format!("`{}` failed ({status}); see journalctl -xe", cmd.join(" "))))
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), Failure> {
    let io = |e: std::io::Error| fail(exit::FAILURE, format!("cannot write {}: {e}", path.display()));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

pub fn init(a: &InitArgs, cpus: std::num::NonZeroUsize) -> Result<(), Failure> {
    let name = config::values::name(&a.name).map_err(|e| fail(exit::CONFIG, format!("NAME: {e}")))?;
    if a.app.listen.is_empty() {
        return Err(fail(
            exit::CONFIG,
            "init needs --listen ADDR: the address the app's socket unit listens on",
        ));
    }
    let mut command = a.command.clone();
    // Pin the program to an absolute path: the service runs with systemd's PATH, not yours.
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.extend(a.app.env.iter().filter_map(|e| config::values::env_pair(e).ok()));
    let cwd = match &a.app.cwd {
        Some(c) => std::path::absolute(c).unwrap_or_else(|_| c.clone()),
        None => {
            std::env::current_dir().map_err(|e| fail(exit::FAILURE, format!("current directory: {e}")))?
        }
    };
    if let Some(first) = command.first_mut() {
        if !first.contains('/') {
            *first = crate::spawn::resolve(first, &env, Some(&cwd)).map_err(|e| fail(exit::CONFIG, e))?;
        }
    }
    let mut ov = a.app.overrides(Some(name.clone()), None, command);
    ov.cwd = Some(cwd);
    let settings = config::load(None, &ov, cpus).map_err(|p| fail(exit::CONFIG, p.0.join("\n")))?;
    let config_path = a.config_dir.join(format!("{name}.toml"));
    if config_path.exists() && !a.force && !a.dry_run {
        return Err(fail(
            exit::FAILURE,
            format!("app {name} already exists ({}); pass --force to overwrite it", config_path.display()),
        ));
    }
    let plan = plan_init(a, &settings);
    if a.dry_run {
        for (path, text) in &plan.files {
            println!("would write {}:\n{}", path.display(), indent(text));
        }
        for c in &plan.commands {
            println!("would run: {}", c.join(" "));
        }
        return Ok(());
    }
    if !plan.commands.is_empty() && !systemd_running() {
        return Err(fail(
            exit::FAILURE,
            "systemd is not running here (no /run/systemd/system); use `herdsman run`, or --no-start to only write the files",
        ));
    }
    let was_active = !plan.commands.is_empty() && is_active(&units(&name)[1]);
    for (path, text) in &plan.files {
        write_file(path, text)?;
        println!("wrote {}", path.display());
    }
    for c in &plan.commands {
        run_command(c)?;
    }
    if was_active {
        // Already running (--force): roll the workers onto the new config without downtime.
        run_command(&["systemctl".into(), "reload".into(), units(&name)[1].clone()])?;
        println!(
            "reloaded the running app; a changed listen address needs `systemctl restart herdsman@{name}.socket`"
        );
    }
    let addrs: Vec<String> = settings.listen.iter().map(ToString::to_string).collect();
    println!(
        "app {name}: {} worker(s) on {}\n  status: herdsman status {name}\n  deploy: systemctl reload herdsman@{name}\n  logs:   journalctl -u herdsman@{name} -f",
        settings.workers,
        addrs.join(", ")
    );
    Ok(())
}

fn is_active(unit: &str) -> bool {
    Command::new("systemctl").args(["is-active", "--quiet", unit]).status().is_ok_and(|s| s.success())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

pub fn remove(a: &RemoveArgs) -> Result<(), Failure> {
    let name = config::values::name(&a.name).map_err(|e| fail(exit::CONFIG, format!("NAME: {e}")))?;
    let files = [
        a.config_dir.join(format!("{name}.toml")),
        socket_dropin(&a.unit_dir, &name),
        service_dropin(&a.unit_dir, &name),
    ];
    let present: Vec<&PathBuf> = files.iter().filter(|p| p.exists()).collect();
    if present.is_empty() {
        return Err(fail(exit::FAILURE, format!("no app {name} here (no {})", files[0].display())));
    }
    let [sock, svc] = units(&name);
    if !a.yes {
        println!("would stop and disable {svc} and {sock}, then delete:");
        for p in &present {
            println!("  {}", p.display());
        }
        return Err(fail(exit::FAILURE, "nothing done: pass --yes to remove the app"));
    }
    if systemd_running() {
        run_command(&["systemctl".into(), "disable".into(), "--now".into(), svc, sock])?;
    }
    for p in present {
        std::fs::remove_file(p)
            .map_err(|e| fail(exit::FAILURE, format!("cannot delete {}: {e}", p.display())))?;
        println!("deleted {}", p.display());
        if let Some(dir) = p.parent().filter(|d| d.extension().is_some_and(|e| e == "d")) {
            let _ = std::fs::remove_dir(dir);
        }
    }
    if systemd_running() {
        run_command(&["systemctl".into(), "daemon-reload".into()])?;
    }
    Ok(())
}
