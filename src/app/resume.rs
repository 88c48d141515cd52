//! The new image after an in-place upgrade (`HERDSMAN_UPGRADE_STATE` is set; `main` checks it
//! before argv): the previous image's state is read from the memfd it names, then every
//! descriptor it lists is adopted — listening and steered sockets, the workers' notify
//! socket, the control socket, the metrics endpoint, the live workers' descriptors —
//! all or nothing, and the supervisor goes on in [`super::serve`] as after `run`.

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};

use super::process::{kernel_and_limits, runtime};
use super::serve::{Parts, queue_copies, serve};
use super::{Failure, Process, notify_dir};
use crate::control::{protocol::UpgradeDone, server};
use crate::listeners::Listeners;
use crate::logging::Sink;
use crate::metrics::{self, Metrics};
use crate::notify::WorkerNotify;
use crate::steer::{Routing, Steering};
use crate::supervisor::document::{self, Handover};
use crate::supervisor::handover::Resumed;
use crate::sys::HandedOver;
use crate::upgrade;
use crate::{exit, sys};

/// Takes over from the previous image, whose state is in the memfd numbered `fd`, and
/// supervises until stopped.
pub fn resume(fd: &str, process: &Process) -> Result<(), Failure> {
    // Logging starts once the state says how (`log_format`): a failure to read it is
    // printed on stderr by `main` all the same.
    let state = read_state(fd).map_err(|e| fail("reading the state", &e))?;
    let journal = process.start_logging(state.core.settings());
    kernel_and_limits()?;
    sys::set_worker_fd_limit(state.worker_fd_limit);
    let fds = adopt_by_name(&state.fds).map_err(|e| fail("adopting the descriptors", &e))?;
    let rt = runtime()?;
    // Adopted sockets register with the runtime's reactor.
    let entered = rt.enter();
    let settings = state.core.settings().clone();
    let parts = restore(state, fds, journal, process).map_err(|e| fail("rebuilding from the state", &e))?;
    drop(entered);
    serve(settings, parts, rt, process)
}

/// Adopts the descriptors `execve` carried (numbers, all open and listed once, or none taken)
/// as the table by name that [`restore`] takes.
fn adopt_by_name(table: &BTreeMap<String, RawFd>) -> std::io::Result<BTreeMap<String, OwnedFd>> {
    let numbers: Vec<RawFd> = table.values().copied().collect();
    let mut fds = HandedOver::adopt(&numbers)?;
    table.iter().map(|(name, n)| Ok((name.clone(), fds.take(*n)?))).collect()
}

/// The take-over failed: said in the log too, as the previous image reads it there.
fn fail(what: &str, e: &dyn std::fmt::Display) -> Failure {
    tracing::error!("upgrade: the new image cannot take over ({what}: {e})");
    Failure::new(exit::FAILURE, format!("upgrade: the new image cannot take over ({what}: {e})"))
}

fn read_state(fd: &str) -> Result<Handover, String> {
    let n: RawFd =
        fd.trim().parse().map_err(|_| format!("{} is not a descriptor number", upgrade::STATE_VAR))?;
    let mut memfd = HandedOver::adopt(&[n]).map_err(|e| e.to_string())?;
    let mut file = std::fs::File::from(memfd.take(n).map_err(|e| e.to_string())?);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(|e| e.to_string())?;
    document::parse(&bytes)
}

/// The [`Parts`] a fresh start would have bound, from the state and its descriptors by name
/// (`fds`: every descriptor `state.fds` names, wherever it came from: `execve` or a store).
/// Descriptors left over are closed, with a warning.
pub(crate) fn restore(
    state: Handover,
    mut fds: BTreeMap<String, OwnedFd>,
    journal: Option<Sink>,
    process: &Process,
) -> std::io::Result<Parts> {
    let mut keyed = document::keyed(&state.fds, &mut fds, document::KEYED_PREFIXES)?;
    let parts = rebuild(state, &mut keyed, &mut fds, journal, process)?;
    let left = keyed.left() + fds.len();
    if left > 0 {
        tracing::warn!("upgrade: {left} handed-over descriptor(s) were not used and are closed");
    }
    Ok(parts)
}

fn rebuild(
    state: Handover,
    keyed: &mut HandedOver,
    named: &mut BTreeMap<String, OwnedFd>,
    journal: Option<Sink>,
    process: &Process,
) -> std::io::Result<Parts> {
    let mut take = |name: &str| {
        named.remove(name).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("descriptor {name} missing"))
        })
    };
    let fds = keyed;
    let listeners = Listeners::adopt(state.listeners, fds)?;
    // The previous image is gone: a value it never read (an older binary) must not stop the
    // take-over; it means the hash, with a warning.
    let steering = match state.steering {
        Some(st) => {
            let want = process.steer_routing().unwrap_or_else(|f| {
                tracing::warn!("{}; steering by hash", f.lines.join("; "));
                Routing::Hash
            });
            let steering = Steering::adopt(st, fds, want)?;
            // As after `run`: the router was handed over (or loaded again), CAP_BPF can go.
            steering.give_up_capabilities()?;
            Some(steering)
        }
        None => None,
    };
    let notify = WorkerNotify::adopt(state.notify, fds)?;
    let c = state.control;
    let control = server::Bound::adopt(take(document::FD_CONTROL)?, c.path, c.made_dir)?;
    let metrics_bound = match state.metrics_http {
        Some(h) => Some(metrics::http::Bound::adopt(take(document::FD_METRICS_HTTP)?, h.unix, h.address)?),
        None => None,
    };
    let dir = notify_dir(state.core.settings(), &process.paths());
    let metrics = Metrics::resume(dir, queue_copies(&listeners), state.metrics);
    let reply = named.remove(document::FD_REPLY);
    let done = UpgradeDone {
        version: upgrade::version().to_string(),
        from_version: state.from_version.clone(),
        pid: std::process::id(),
        upgrades: state.upgrades,
        took_ms: (upgrade::monotonic_ns() - state.exec_at_ns) as f64 / 1e6,
        workers: state.core.workers(),
    };
    // The fd store's state memfds, when the previous image kept one (see `fdstore`).
    let store = crate::fdstore::state::StateFile::take(named)
        .map(|(file, _)| crate::supervisor::Store::continuing(file, state.fds.keys().cloned()));
    let resumed = Resumed::take(state.core, state.tails, named, reply.map(|r| (r, done)), state.upgrades)?;
    Ok(Parts {
        journal,
        listeners,
        steering,
        control,
        access: server::Access { uid: c.uid, group: c.group },
        metrics_bound,
        metrics,
        notify: Some(notify),
        resume: Some(resumed),
        config: state.config,
        overrides: state.overrides,
        binary: state.binary,
        argv: state.argv,
        bind_intercept: None,
        store,
    })
}
