//! `herdsman restart|stop|start NAME` (PM2's `pm2 restart|stop|start`): `systemctl` on the
//! units of an app installed with `herdsman init`.
//!
//! - `restart`: `systemctl restart herdsman@NAME.service`. The socket unit is not touched (the
//!   service `Requires=` the socket, which propagates a stop of the socket to the service, never
//!   the other way): systemd keeps the listening socket open and the kernel queues new
//!   connections (`Backlog=4096`) until the new supervisor's workers accept them. Nothing is
//!   refused; requests in flight on the old workers are drained (stop signal, stop timeout).
//!   Prefer `herdsman reload NAME` for a deploy: it replaces workers one by one without a pause.
//! - `stop`: the service *and* the socket. Stopping only the service would leave the socket
//!   listening: the next connection would start the service again (socket activation), and
//!   until then clients would wait in the queue instead of being told the app is down. After
//!   `stop`, connections are refused until `start`.
//! - `start`: the socket, then the service (the order `systemctl` derives from `After=`).
//!
//! Exit codes: 0; 1 when `systemctl` fails (its own message is on stderr, the job's reason in
//! `systemctl status herdsman@NAME`); 69 when NAME is not an app installed with `init` (a
//! standalone `herdsman run` is told how to stop or reload it instead) or systemd is not
//! running; 78 when NAME is not a valid app name.

use std::path::Path;
use std::process::Command;

use crate::cli::ServiceArgs;
use crate::exit;
use crate::init::{Failure, fail, socket_dropin, systemd_running, units};

/// What to do to an installed app's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Restart,
    Stop,
    Start,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Stop => "stop",
            Action::Start => "start",
        }
    }
}

/// The `systemctl` command line for `action` on app `name`.
pub fn command(action: Action, name: &str) -> Vec<String> {
    let [sock, svc] = units(name);
    let mut cmd = vec!["systemctl".to_string(), action.verb().to_string()];
    match action {
        Action::Restart => cmd.push(svc),
        // Both: see the module doc (a stopped service behind a live socket restarts on the
        // next connection).
        Action::Stop | Action::Start => cmd.extend([sock, svc]),
    }
    cmd
}

/// `herdsman restart|stop|start NAME`. `standalone`: whether a standalone supervisor of that
/// name answers on its control socket (asked only when NAME is not installed).
pub fn run(action: Action, a: &ServiceArgs, standalone: impl FnOnce(&str) -> bool) -> Result<(), Failure> {
    let name = crate::config::values::name(&a.name).map_err(|e| fail(exit::CONFIG, format!("NAME: {e}")))?;
    let config = a.config_dir.join(format!("{name}.toml"));
    let installed = config.exists() || socket_dropin(&a.unit_dir, &name).exists();
    if !installed {
        return Err(not_installed(action, &name, &config, standalone(&name)));
    }
    if !systemd_running() {
        return Err(fail(
            exit::UNAVAILABLE,
            format!(
                "{name} is installed ({}) but systemd is not running here (no /run/systemd/system); run it with `herdsman run --config {}`",
                config.display(),
                config.display()
            ),
        ));
    }
    let cmd = command(action, &name);
    let status = Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .map_err(|e| fail(exit::FAILURE, format!("cannot run {}: {e}", cmd.join(" "))))?;
    if !status.success() {
        return Err(fail(
            exit::FAILURE,
            format!("`{}` failed ({status}); see systemctl status herdsman@{name}", cmd.join(" ")),
        ));
    }
    let done = match action {
        Action::Restart => "restarted (its socket stayed open: connections waited, none was refused)",
        Action::Stop => "stopped (service and socket: connections are refused until `herdsman start`)",
        Action::Start => "started",
    };
    crate::outln!("{name}: {done}");
    Ok(())
}

/// The one line for an app `init` did not install: what to do instead.
fn not_installed(action: Action, name: &str, config: &Path, standalone: bool) -> Failure {
    let verb = action.verb();
    let line = if standalone {
        let what = match action {
            Action::Restart => format!("use `herdsman reload {name}` (zero downtime)"),
            Action::Stop => "stop it with Ctrl-C or SIGTERM to its supervisor".to_string(),
            Action::Start => format!("it is already running; `herdsman status {name}` shows it"),
        };
        format!(
            "{name} is not installed with `herdsman init` (it runs standalone, from `herdsman run`): `herdsman {verb}` works on installed apps only; {what}"
        )
    } else {
        format!(
            "no app {name} installed with `herdsman init` here (no {}) and none running standalone; install it with `herdsman init {name} --listen ADDR -- COMMAND`, or run it with `herdsman run`",
            config.display()
        )
    };
    fail(exit::UNAVAILABLE, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, name: &str) -> ServiceArgs {
        ServiceArgs { name: name.into(), config_dir: dir.join("etc"), unit_dir: dir.join("units") }
    }

    #[test]
    fn restart_touches_only_the_service_stop_and_start_both_units() {
        assert_eq!(command(Action::Restart, "web"), ["systemctl", "restart", "herdsman@web.service"]);
        assert_eq!(
            command(Action::Stop, "web"),
            ["systemctl", "stop", "herdsman@web.socket", "herdsman@web.service"]
        );
        assert_eq!(
            command(Action::Start, "web"),
            ["systemctl", "start", "herdsman@web.socket", "herdsman@web.service"]
        );
    }

    #[test]
    fn an_app_not_installed_with_init_gets_one_line_saying_what_to_do_instead() {
        let dir = std::env::temp_dir().join(format!("herdsman-service-{}", std::process::id()));
        for (standalone, want) in [(true, "herdsman reload web"), (false, "herdsman init web --listen")] {
            let f = run(Action::Restart, &args(&dir, "web"), |_| standalone).err().unwrap();
            assert_eq!(f.code, exit::UNAVAILABLE);
            assert!(f.message().contains(want), "{}", f.message());
            assert!(!f.message().contains('\n'), "{}", f.message());
        }
        let f = run(Action::Stop, &args(&dir, "web"), |_| true).err().unwrap();
        assert!(f.message().contains("Ctrl-C or SIGTERM"), "{}", f.message());
        let f = run(Action::Start, &args(&dir, "bad/name"), |_| true).err().unwrap();
        assert_eq!(f.code, exit::CONFIG);
    }
}
