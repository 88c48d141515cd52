//! The last step of both start-up paths: the sockets and state that [`super::run`] (fresh)
//! or [`super::resume`] (after an in-place upgrade) assembled, as [`Parts`], become the
//! supervisor's `World`; the signals, the control socket and the metrics endpoint are served
//! next to the loop on one runtime until the loop ends.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::{Failure, Process, load, notify_dir};
use crate::config::{self, Layer, Settings};
use crate::control::server;
use crate::listeners::Listeners;
use crate::logging::Sink;
use crate::notify::{self, Notifier, WorkerNotify};
use crate::output::Output;
use crate::requests::Control;
use crate::steer::Steering;
use crate::supervisor::{self, World, handover::Resumed};
use crate::{exit, metrics, upgrade};

/// What [`super::run`] (fresh) or [`super::resume`] (after an in-place upgrade) hands to
/// [`serve`].
pub(super) struct Parts {
    pub journal: Option<Sink>,
    pub listeners: Listeners,
    pub steering: Option<Steering>,
    pub control: server::Bound,
    pub access: server::Access,
    pub metrics_bound: Option<metrics::http::Bound>,
    pub metrics: metrics::Metrics,
    /// The workers' notify socket, when adopted (a fresh start makes its own).
    pub notify: Option<WorkerNotify>,
    /// The loop's state and live workers, when adopted.
    pub resume: Option<Resumed>,
    pub config: Option<PathBuf>,
    /// The flags' layer, for reloads.
    pub overrides: Layer,
    /// Where the next in-place upgrade re-executes from.
    pub binary: PathBuf,
    pub argv: Vec<String>,
    /// Whether workers get the bind filter, when already resolved (`None`: probe now).
    pub bind_intercept: Option<bool>,
    /// What systemd's fd store holds of a previous run (`None`: a fresh store is made when
    /// herdsman is the unit's main process; see `fdstore`).
    pub store: Option<supervisor::Store>,
}

/// Runs the loop with its control socket, metrics endpoint and signals until it stops, then
/// lets the last log lines out: `Ok` after a graceful stop.
pub(super) fn serve(
    settings: Settings,
    p: Parts,
    rt: tokio::runtime::Runtime,
    process: &Process,
) -> Result<(), Failure> {
    let notifier = match Notifier::new(process.var("NOTIFY_SOCKET").as_deref()) {
        Ok(n) => n,
        Err(e) => {
            crate::errln!("herdsman: NOTIFY_SOCKET is unusable ({e}); not notifying the service manager");
            Notifier::disabled()
        }
    };
    let watchdog = notify::watchdog_interval(
        process.var("WATCHDOG_USEC").as_deref(),
        process.var("WATCHDOG_PID").as_deref(),
        std::process::id(),
    );
    let base_env = process.env();
    let reload_source: Option<supervisor::ReloadSource> = p.config.clone().map(|file| {
        let flags = p.overrides.clone();
        let env = base_env.clone();
        Box::new(move || load(Some(&file), &flags, &env)) as supervisor::ReloadSource
    });
    let carry = match carry(&p, base_env.clone(), process) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("in-place upgrades are unavailable: cannot keep copies of the sockets ({e})");
            None
        }
    };
    // Under systemd as the unit's own process: the workers outlive a crash of herdsman and the
    // restarted one re-adopts them from the fd store. Standalone: PR_SET_PDEATHSIG, as ever.
    let fd_store = process.fd_store();
    let store = match p.store {
        _ if !(fd_store && notifier.is_enabled()) => None,
        Some(s) => Some(s),
        None => supervisor::Store::create()
            .map_err(|e| {
                tracing::warn!("no fd store (a crash of herdsman will take the workers with it): {e}")
            })
            .ok(),
    };
    let Parts {
        journal, listeners, steering, control, access, metrics_bound, metrics, notify, resume, ..
    } = p;
    let notify_dir = notify_dir(&settings, &process.paths());
    let bind_intercept = match p.bind_intercept {
        Some(b) => b,
        None => crate::intercept::resolve(
            settings.bind_intercept,
            super::run::worker_program(&settings, &base_env).as_deref(),
        )
        .map_err(|e| Failure::new(exit::OS, e.to_string()))?,
    };
    // systemd sets INVOCATION_ID for every unit it runs: it is the reaper there already.
    let under_systemd = process.var("INVOCATION_ID").is_some();
    let control_ref = &control;
    let metrics_ref = &metrics_bound;
    let (tx, rx) = mpsc::channel(64);
    if !settings.watch.is_empty() {
        crate::watch::spawn(&settings.watch, &settings.watch_ignore, tx.clone())
            .map_err(|e| Failure::new(exit::FAILURE, e.to_string()))?;
    }
    let result = rt.block_on(async move {
        // A container's PID 1, or a subreaper standalone: orphans are reaped (see `reaper`).
        let reaper = crate::reaper::become_reaper(under_systemd);
        if reaper != crate::reaper::Reaper::Off {
            tracing::debug!("reaping orphans ({reaper:?})");
        }
        forward_signals(tx.clone(), reaper != crate::reaper::Reaper::Off)?;
        // Standalone, worker lines are kept in a ring for `herdsman logs`; under journald the
        // journal keeps them (see `logs`).
        let (output, logs) = match journal {
            Some(sink) => (
                Output::journal(sink),
                crate::logs::Source::Journal { unit: crate::logs::own_unit(), app: settings.name.clone() },
            ),
            None => {
                let ring = crate::logs::Ring::default();
                let json = settings.log_format == config::LogFormat::Json;
                (Output::standalone(json, ring.clone()), crate::logs::Source::Ring(ring))
            }
        };
        server::spawn(control_ref, tx.clone(), access, metrics.clone(), logs)?;
        if let Some(b) = metrics_ref {
            metrics::http::serve(b, metrics.clone(), tx.clone())?;
        }
        let world = World {
            listeners,
            notifier,
            base_env,
            output,
            reload_source,
            watchdog,
            notify_dir,
            steering,
            metrics,
            carry,
            notify,
            resume,
            bind_intercept,
            store,
        };
        // The start-up is over: its code and freed heap leave the resident set, and so do a
        // roll-out's or a scale's once the supervisor is quiet again (see `memory`;
        // docs/benchmarks.md, supervisor RSS).
        tokio::spawn(super::memory::release_when_settled());
        supervisor::run(settings, world, rx).await
    });
    drop(control);
    drop(metrics_bound);
    // The last log lines are still in the log queue: let them out (bounded).
    crate::logging::flush(std::time::Duration::from_secs(2));
    result.map_err(|e| Failure::new(exit::FAILURE, format!("{e:#}")))
}

/// What an in-place upgrade hands to the next image besides the loop's own state: copies of
/// the control socket and the metrics endpoint, and how this image was started.
fn carry(p: &Parts, env: Vec<(String, String)>, process: &Process) -> std::io::Result<upgrade::Carry> {
    let control = OwnedFd::from(p.control.listener.try_clone()?);
    Ok(upgrade::Carry {
        binary: p.binary.clone(),
        config: p.config.clone(),
        overrides: p.overrides.clone(),
        argv: p.argv.clone(),
        env,
        control: (control, p.control.path.clone(), p.control.made_dir(), p.access.uid, p.access.group),
        metrics_http: p.metrics_bound.as_ref().map(|b| b.carry()).transpose()?,
        check_timeout: process
            .var("HERDSMAN_UPGRADE_CHECK_TIMEOUT")
            .and_then(|v| config::values::duration(&v).ok())
            .unwrap_or(upgrade::CHECK_TIMEOUT),
    })
}

/// Copies of the listening sockets, for the metrics to read their queues (never their flags).
pub(super) fn queue_copies(listeners: &Listeners) -> Vec<(String, OwnedFd)> {
    listeners.copies().unwrap_or_default().into_iter().map(|(addr, _, fd)| (addr, fd)).collect()
}

/// SIGHUP = reload, SIGTERM/SIGINT = stop, SIGTTIN/SIGTTOU = one worker more/less, SIGUSR2 =
/// in-place upgrade from the path herdsman was started from (as `herdsman upgrade`); with
/// `reap`, SIGCHLD = reap the orphans.
fn forward_signals(tx: mpsc::Sender<Control>, reap: bool) -> std::io::Result<()> {
    use crate::requests::{Scale, Waiter};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
    let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let mut chld = if reap { Some(signal(SignalKind::child())?) } else { None };
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = hup.recv() => Control::Reload(Waiter::default()),
                _ = term.recv() => Control::Stop,
                _ = int.recv() => Control::Stop,
                _ = ttin.recv() => Control::Scale { scale: Scale::Add(1), wait: false, reply: None },
                _ = ttou.recv() => Control::Scale { scale: Scale::Remove(1), wait: false, reply: None },
                _ = usr2.recv() => Control::Upgrade { binary: None, reply: None, conn: None },
                Some(_) = async { chld.as_mut()?.recv().await } => Control::ReapOrphans,
            };
            if tx.send(c).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
