//! `herdsman run`: a fresh start, standalone or socket-activated (the same path: the
//! listeners come from `LISTEN_FDS` when systemd passed them to us, else they are bound).
//! Settings, the process set-up, then every socket before the runtime, so a bad address or a
//! busy control socket fails the start with its own exit code, before any worker runs.

use std::path::PathBuf;

use super::process::{kernel_and_limits, runtime};
use super::serve::{Parts, queue_copies, serve};
use super::{Failure, Process, load, notify_dir};
use crate::cli::RunArgs;
use crate::config::{Balance, Settings};
use crate::control::{paths, server};
use crate::exit;
use crate::listeners::{Activation, ListenError, Listeners};
use crate::metrics::{self, Metrics};
use crate::steer::{SteerError, Steering};

/// Runs an app until it is stopped: 0 after a graceful stop, else the [`Failure`] of the
/// step that failed (78 bad configuration, 71 kernel, 1 anything else).
pub fn run(args: RunArgs, process: &Process) -> Result<(), Failure> {
    let flags = args.layer();
    let activation = Activation {
        listen_fds: process.var("LISTEN_FDS"),
        listen_pid: process.var("LISTEN_PID"),
        listen_fdnames: process.var("LISTEN_FDNAMES"),
    };
    let fd_store = process.fd_store();
    // Restarted after a crash: the re-adopted workers hold the sockets, the store has them.
    let readopting = fd_store && super::readopt::has_state(activation.listen_fdnames.as_deref());
    let (settings, bad_config, early) = match load(args.config.as_deref(), &flags, &process.env()) {
        Ok(s) => (s, None, None),
        // After a crash, with the workers serving: a config file that does not load (left by a
        // reload that failed on it) must not turn the crash into an outage. The workers are
        // re-adopted with the settings they run with; the next reload reads the file again.
        Err(p) if readopting => {
            let stored = Listeners::open(&activation, std::process::id(), &[], false)
                .ok()
                .and_then(|l| super::readopt::stored_settings(l.stored()).map(|s| (s, l)));
            match stored {
                Some((s, l)) => (s, Some(p), Some(l)),
                None => return Err(super::config_failure(&p)),
            }
        }
        Err(p) => return Err(super::config_failure(&p)),
    };
    let journal = process.start_logging(&settings);
    if let Some(p) = bad_config {
        let f = super::config_failure(&p);
        tracing::warn!(
            "the configuration does not load ({}): re-adopting the workers with the settings they run with; fix it and reload",
            f.lines.join("; ")
        );
    }
    kernel_and_limits()?;

    let steered = settings.balance != Balance::Shared;
    let listen: &[crate::config::ListenAddr] = if readopting { &[] } else { &settings.listen };
    let program = worker_program(&settings, &process.env());
    let bind_intercept = crate::intercept::resolve(settings.bind_intercept, program.as_deref())
        .map_err(|e| Failure::new(exit::OS, e.to_string()))?;
    let mut listeners = match early {
        Some(l) => l,
        None => open_listeners(&activation, listen, &settings, bind_intercept)?,
    };
    // Under systemd, as the unit's own process: the fd store's descriptors came back with the
    // sockets. After a crash they are the previous run's workers, re-adopted; whatever else
    // is in the unit's cgroup is a leftover, swept (see `fdstore`, `readopt`).
    let stored = listeners.take_stored();
    let (journal, store) = if fd_store {
        match super::readopt::take_back(stored, journal, process) {
            super::readopt::Start::Restored { settings, parts, rt } => {
                return serve(*settings, *parts, rt, process);
            }
            super::readopt::Start::Fresh { journal, store } => {
                // Nothing re-adopted after all (the sweep killed the leftovers): bind now.
                if readopting && listeners.is_empty() && !settings.listen.is_empty() {
                    let none = Activation { listen_fds: None, listen_pid: None, listen_fdnames: None };
                    listeners = open_listeners(&none, &settings.listen, &settings, bind_intercept)?;
                }
                (journal, store)
            }
        }
    } else {
        (journal, None)
    };
    let steering = if steered { Some(steering(&settings, &listeners, process)?) } else { None };
    let paths_env = process.paths();
    let (control, access) = control_socket(&settings, &paths_env)?;
    let metrics_bound = settings
        .metrics
        .as_ref()
        .map(metrics::http::bind)
        .transpose()
        .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    let rt = runtime()?;
    // Copies of the listening sockets, to read their queues (never their flags).
    let metrics = Metrics::new(notify_dir(&settings, &paths_env), queue_copies(&listeners));
    let parts = Parts {
        journal,
        listeners,
        steering,
        control,
        access,
        metrics_bound,
        metrics,
        notify: None,
        resume: None,
        config: args.config,
        overrides: flags,
        // Where the next in-place upgrade re-executes from: this binary's installed path.
        binary: process.exe.clone().unwrap_or_else(|| PathBuf::from("/usr/bin/herdsman")),
        argv: process.argv(),
        bind_intercept: Some(bind_intercept),
        store,
    };
    serve(settings, parts, rt, process)
}

/// The listening sockets: systemd's (`activation`), else bound (`listen`).
fn open_listeners(
    activation: &Activation,
    listen: &[crate::config::ListenAddr],
    settings: &Settings,
    bind_intercept: bool,
) -> Result<Listeners, Failure> {
    let steered = settings.balance != Balance::Shared;
    match Listeners::open(activation, std::process::id(), listen, steered) {
        // No address: learned from the first worker's own bind (see `intercept`).
        Err(ListenError::Nothing) if bind_intercept && !steered => Ok(Listeners::none()),
        Err(ListenError::Nothing) if steered => Err(Failure::new(
            exit::CONFIG,
            format!(
                "--balance {} needs --listen (every worker gets its own socket, bound before it starts, so the address cannot be learned from the app); add --listen 127.0.0.1:8080 or use --balance shared",
                settings.balance
            ),
        )),
        r => r.map_err(|e| {
            Failure::new(if e.is_config() { exit::CONFIG } else { exit::FAILURE }, e.to_string())
        }),
    }
}

/// `--balance steer|sticky`: every worker's own socket, in one `SO_REUSEPORT` group per address.
fn steering(settings: &Settings, listeners: &Listeners, process: &Process) -> Result<Steering, Failure> {
    let want = process.steer_routing()?;
    let copies = listeners
        .copies()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot duplicate the listening sockets: {e}")))?;
    let steering = Steering::new(settings.balance, copies, settings.workers.get(), listeners.floor(), want)
        .map_err(|e| {
        let config = matches!(e, SteerError::NotTcp { .. } | SteerError::NoReusePort { .. });
        Failure::new(if config { exit::CONFIG } else { exit::FAILURE }, e.to_string())
    })?;
    // Loaded and attached: CAP_BPF is not needed any more (main thread, before the runtime
    // and the workers' threads exist).
    steering
        .give_up_capabilities()
        .map_err(|e| Failure::new(exit::FAILURE, format!("--balance steer: giving up CAP_BPF: {e}")))?;
    Ok(steering)
}

/// Binds the control socket (`--control`, else the app's default place, in a runtime
/// directory that must be private) and says who may use it.
fn control_socket(
    settings: &Settings,
    paths_env: &paths::Env,
) -> Result<(server::Bound, server::Access), Failure> {
    let default_control = paths::default_socket(&settings.name, paths_env);
    if let Some(dir) = paths::fallback_dir(paths_env) {
        paths::ensure_private_dir(&dir, paths_env.euid).map_err(|e| {
            let not_ours = matches!(e, paths::PrivateDirError::NotOurs { .. });
            Failure::new(if not_ours { exit::CONFIG } else { exit::FAILURE }, e.to_string())
        })?;
    }
    let control_path = settings.control.clone().unwrap_or(default_control);
    let group = settings
        .control_group
        .as_deref()
        .and_then(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw());
    let control =
        server::bind(&control_path, group).map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    Ok((control, server::Access { uid: paths_env.euid, group }))
}

/// The worker program as it will run (for `intercept::resolve`'s 32-bit check): on the
/// workers' `PATH` (herdsman's environment, then the app's `env`), from their directory.
pub(crate) fn worker_program(
    settings: &crate::config::Settings,
    env: &[(String, String)],
) -> Option<std::path::PathBuf> {
    let mut env = env.to_vec();
    env.extend(settings.env.iter().cloned());
    crate::intercept::worker_program(&settings.command, &env, settings.cwd.as_deref())
}
