//! What the `herdsman` binary does, as library functions: `main` parses argv, reads the
//! environment once into a [`Process`], and calls [`dispatch`] (or [`resume`]); a [`Failure`]
//! says what to print and which exit code to return ([`crate::exit`]).
//!
//! The supervisor starts in one sequence, whichever way it is started:
//! 1. **settings** ([`run`]): the flags and the config file validated into `Settings`, the
//!    worker command resolved (every problem printed, exit 78);
//! 2. **the process** (`app/process.rs`): herdsman's own logging, the soft fd limit raised, the
//!    kernel checked (exit 71 without pidfds);
//! 3. **sockets**, adopted or bound: the app's listening sockets inherited from systemd
//!    (`LISTEN_FDS`: socket activation) or bound from `listen`; the `SO_REUSEPORT` group of
//!    `--balance steer|sticky`; the control socket (in a private runtime directory); the
//!    metrics endpoint. Privileges are not dropped: herdsman runs as its unit's user, and
//!    only workers change to `user`/`group`, in the child before `execve` (see `credentials`);
//! 4. **the World and the loop** (`app/serve.rs`): sd_notify and the watchdog above, the signals,
//!    the control and metrics servers, the upgrade carry, all injected into
//!    `supervisor::run`, which spawns the workers and runs until stopped; beside it,
//!    `app/memory.rs` hands code and heap pages back each time the loop goes quiet;
//! 5. **the exit code**: 0 after a graceful stop (SIGTERM/SIGINT), 1 if the loop failed.
//!
//! [`resume`] is the new image of an in-place upgrade: it reads the handed-over state instead
//! of the settings, adopts every descriptor (sockets and live workers) instead of binding and
//! spawning, then joins the same `serve`. The client subcommands (`status`, `reload`,
//! `scale`, `metrics`, `upgrade`, `list`) are one call each into `control::client`.

mod memory;
mod process;
mod readopt;
mod resume;
mod run;
mod serve;

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

pub use crate::sys::ensure_stdio_open;
pub use process::Process;
pub use resume::resume;
pub use run::run;

use crate::cli::Command;
use crate::config::{self, Layer, Settings};
use crate::control::client;
pub use crate::exit::Failure;
use crate::{exit, generate, init, service};

/// Every configuration problem, one line each.
fn config_failure(problems: &config::Problems) -> Failure {
    Failure { code: exit::CONFIG, lines: problems.0.iter().map(ToString::to_string).collect() }
}

/// The whole program after `main` read argv and the environment: the new image of an
/// in-place upgrade resumes (its state, not argv, says what to do); otherwise the command line
/// is parsed (`--help`/`--version` print and succeed; a usage error is one line, exit 2) and
/// dispatched.
pub fn main(process: &Process) -> Result<(), Failure> {
    if let Some(fd) = process.var(crate::env::STATE_VAR) {
        return resume(&fd, process);
    }
    let cli = match <crate::cli::Cli as clap::Parser>::try_parse_from(&process.args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return Ok(());
            }
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            return Err(Failure::new(exit::USAGE, format!("{first} (see herdsman --help)")));
        }
    };
    dispatch(cli.command, process)
}

/// Prints a failure's lines (`herdsman: …` on stderr) and lets the last log lines out, bounded.
pub fn report(failure: &Failure) {
    for line in &failure.lines {
        crate::errln!("herdsman: {line}");
    }
    crate::logging::flush(std::time::Duration::from_secs(2));
}

/// Runs one subcommand to its end.
pub fn dispatch(command: Command, process: &Process) -> Result<(), Failure> {
    let env = &process.paths();
    match command {
        Command::Run(args) => run(crate::pm2::run_args(*args)?, process),
        Command::CheckConfig { file } => check_config(&file, process),
        Command::Init(a) if a.pm2.from_pm2.is_some() || !a.pm2.only.is_empty() => {
            crate::pm2::init(&a, cpus(), process.var("SUDO_USER").as_deref())
        }
        Command::Init(a) => init::init(&a, cpus(), process.var("SUDO_USER").as_deref()),
        Command::Remove(a) => init::remove(&a),
        Command::Restart(a) => service(service::Action::Restart, &a, env),
        Command::Stop(a) => service(service::Action::Stop, &a, env),
        Command::Start(a) => service(service::Action::Start, &a, env),
        Command::Generate { dir } => generate::write_all(&dir)
            .map_err(|e| Failure::new(exit::FAILURE, format!("cannot write to {}: {e}", dir.display()))),
        Command::UpgradeCheck => upgrade_check(),
        Command::StopPost { unit } => stop_post(&unit, process),
        Command::Status { target, json } => client::status(target.as_deref(), json, env),
        Command::Metrics { target } => client::metrics(target.as_deref(), env),
        Command::Logs { target, follow, lines, worker, since, json } => {
            let args = crate::control::logs_client::Args { target, follow, lines, worker, since, json };
            crate::control::logs_client::logs(&args, env)
        }
        Command::List { json } => client::list(json, env),
        Command::Reload { target, no_wait, wait: _, timeout } => {
            client::reload(target.as_deref(), !no_wait, timeout_arg(&timeout)?, env)
        }
        Command::Upgrade { target, binary, timeout } => {
            client::upgrade(target.as_deref(), binary.as_deref(), timeout_arg(&timeout)?, env)
        }
        Command::Scale { args, no_wait, timeout } => {
            let (target, workers) = match args.as_slice() {
                [w] => (None, w.as_str()),
                [t, w] => (Some(t.as_str()), w.as_str()),
                _ => unreachable!("clap enforces 1..=2 values"),
            };
            client::scale(target, workers, !no_wait, timeout_arg(&timeout)?, env)
        }
    }
}

/// `herdsman restart|stop|start NAME`; a standalone app of that name is one whose control
/// socket answers.
fn service(
    action: service::Action,
    a: &crate::cli::ServiceArgs,
    env: &crate::control::paths::Env,
) -> Result<(), Failure> {
    let standalone = |name: &str| {
        std::os::unix::net::UnixStream::connect(crate::control::paths::default_socket(name, env)).is_ok()
    };
    service::run(action, a, standalone)
}

/// `herdsman check-config FILE`: exit 0 with one line, or every problem and exit 78.
fn check_config(file: &Path, process: &Process) -> Result<(), Failure> {
    let s = load(Some(file), &Layer::default(), &process.env()).map_err(|p| config_failure(&p))?;
    crate::outln!(
        "{}: ok (app {}, {} worker(s), command {:?})",
        file.display(),
        s.name,
        s.workers,
        s.command.join(" ")
    );
    Ok(())
}

/// `herdsman upgrade-check`: the candidate side of an upgrade's check (see `upgrade`).
fn upgrade_check() -> Result<(), Failure> {
    let report = crate::supervisor::document::check_command(&mut std::io::stdin().lock())
        .map_err(|e| Failure::new(exit::CONFIG, e.to_string()))?;
    crate::outln!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

/// `herdsman stop-post UNIT`, the unit's `ExecStopPost=` (see `fdstore::stop_post`).
fn stop_post(unit: &str, process: &Process) -> Result<(), Failure> {
    let line = crate::fdstore::stop_post::run(unit, |k| process.var(k))
        .map_err(|e| Failure::new(e.code(), e.to_string()))?;
    crate::outln!("{line}");
    Ok(())
}

/// A client's `--timeout` (a bad one is a usage error).
fn timeout_arg(s: &str) -> Result<std::time::Duration, Failure> {
    config::values::duration(s).map_err(|e| Failure::new(exit::USAGE, format!("--timeout: {e}")))
}

/// Loads the settings (the file, then the flags over it) and checks that the command can be
/// found in `base_env` plus the app's `env`: at start, by `check-config`, and on every reload.
fn load(
    file: Option<&Path>,
    flags: &Layer,
    base_env: &[(String, String)],
) -> Result<Settings, config::Problems> {
    let s = config::load(file, flags, cpus())?;
    let mut env = base_env.to_vec();
    env.extend(s.env.iter().cloned());
    crate::program::resolve(&s.command[0], &env, s.cwd.as_deref())
        .map_err(|e| config::Problem::new(config::Place::Anywhere, e))?;
    Ok(s)
}

fn cpus() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// The workers' notify socket and metrics sockets live in the app's runtime directory (that
/// of the default control socket), whatever `--control` says.
fn notify_dir(settings: &Settings, env: &crate::control::paths::Env) -> Option<PathBuf> {
    crate::control::paths::default_socket(&settings.name, env).parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_timeout_is_a_usage_error_naming_the_flag() {
        let f = timeout_arg("bogus").unwrap_err();
        assert_eq!(f.code, exit::USAGE);
        assert!(f.lines[0].starts_with("--timeout: "), "{:?}", f.lines);
        assert_eq!(timeout_arg("2s").unwrap(), std::time::Duration::from_secs(2));
    }
}
