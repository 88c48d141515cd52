//! `herdsman run` as the unit's main process, restarted by systemd after the previous one
//! crashed (a SIGKILL, a panic, an OOM kill, the watchdog): the workers kept serving
//! (`KillMode=process`) and systemd passed back what herdsman stored (see `fdstore`). The
//! stored state is the document an in-place upgrade writes; its descriptors come from the
//! store instead of `execve`, and the same [`restore`] rebuilds everything (sockets, the
//! control socket, the workers' notify socket, the metrics endpoint, the workers). Then the
//! cgroup is swept of every process not accounted for, and the loop goes on: missing slots
//! start, `READY=1` follows once all are ready (see `supervisor::readopt`).
//!
//! Nothing usable stored (a first start, a graceful stop before, a state that does not parse
//! or was written during a stop): the sweep kills whatever is left and herdsman starts
//! afresh, removing the stale names from the store.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;

use super::Process;
use super::process::runtime;
use super::resume::restore;
use super::serve::Parts;
use crate::config::Settings;
use crate::fdstore::{self, cgroup, state::StateFile};
use crate::logging::Sink;
use crate::supervisor::{Store, readopt};

/// What a start under systemd found in the fd store.
pub(super) enum Start {
    /// The workers of the crashed supervisor, restored: serve these.
    Restored { settings: Box<Settings>, parts: Box<Parts>, rt: tokio::runtime::Runtime },
    /// Nothing to re-adopt (the cgroup is swept): start afresh with this store.
    Fresh { journal: Option<Sink>, store: Option<Store> },
}

/// Whether the fd store passed back a state (`LISTEN_FDNAMES` holds herdsman's state memfd):
/// then the listening sockets come from the store too, and `--listen` is not bound again
/// (the re-adopted workers hold it).
pub(super) fn has_state(fdnames: Option<&str>) -> bool {
    let want = format!("{}state-a", fdstore::PREFIX);
    fdnames.is_some_and(|names| names.split(':').any(|n| n == want))
}

/// The settings the crashed supervisor ran with, from the state in the fd store (`stored`,
/// read through copies: [`take_back`] reads it again), or `None` when there is no whole state
/// that parses. For a restart after a crash whose config file does not load (a failed
/// reload of a bad file left it there): the workers keep the settings they run with.
pub(super) fn stored_settings(stored: &BTreeMap<String, OwnedFd>) -> Option<Settings> {
    let mut copies: BTreeMap<String, OwnedFd> = stored
        .iter()
        .filter(|(name, _)| fdstore::state::NAMES.contains(&name.as_str()))
        .filter_map(|(name, fd)| Some((name.clone(), fd.try_clone().ok()?)))
        .collect();
    let (_, payload) = StateFile::take(&mut copies)?;
    let state = crate::supervisor::document::parse(&payload?).ok()?;
    Some(state.core.settings().clone())
}

/// Restores the crashed supervisor's workers from `stored` (the descriptors systemd passed
/// back, by name), or sweeps the cgroup and says to start afresh.
pub(super) fn take_back(
    mut stored: BTreeMap<String, OwnedFd>,
    journal: Option<Sink>,
    process: &Process,
) -> Start {
    let names: Vec<String> = stored.keys().cloned().collect();
    let fresh = |journal, why: &str| {
        if !names.is_empty() {
            tracing::warn!("the fd store holds {} descriptor(s) but {why}: starting afresh", names.len());
        }
        fdstore::sweep_at_start(&|_| BTreeSet::new());
        Start::Fresh { journal, store: Store::replacing(names.clone()).ok() }
    };
    let Some((file, payload)) = StateFile::take(&mut stored) else {
        return fresh(journal, "no state");
    };
    let state = match payload.as_deref().map(crate::supervisor::document::parse) {
        Some(Ok(state)) => state,
        Some(Err(e)) => return fresh(journal, &format!("its state is unusable ({e})")),
        None => return fresh(journal, "no whole state"),
    };
    if state.core.is_stopping() {
        return fresh(journal, "it was written during a stop");
    }
    let mut state = state;
    let ro = readopt::prepare(&mut state.core, &mut stored);
    // Only now, with the live workers known: everything else in the cgroup goes. Their
    // families are read as their user (`--user`: see `cgroup::links`), on every pass.
    let owners: Vec<(u32, u32)> = state.core.settings().user.iter().map(|u| (u.uid, u.gid)).collect();
    let live = ro.live().clone();
    fdstore::sweep_at_start(&|procs| cgroup::family(&cgroup::links(procs, &owners), &live));
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(f) => {
            tracing::error!("cannot re-adopt the workers: {}", f.lines.join("; "));
            return fresh(journal, "no runtime");
        }
    };
    let settings = state.core.settings().clone();
    let restored = {
        // Adopted sockets register with the runtime's reactor.
        let _entered = rt.enter();
        restore(state, stored, journal.clone(), process)
    };
    match restored {
        Ok(mut parts) => {
            parts.resume = parts.resume.map(|r| r.readopting(ro));
            parts.store = Some(Store::continuing(file, names));
            Start::Restored { settings: Box::new(settings), parts: Box::new(parts), rt }
        }
        Err(e) => {
            tracing::error!("cannot re-adopt the workers ({e}): killing them and starting afresh");
            drop(rt);
            fresh(journal, &format!("the restore failed ({e})"))
        }
    }
}
