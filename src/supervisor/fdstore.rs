//! The driver's side of systemd's file descriptor store (issue 26; the protocol and the
//! measured facts: `crate::fdstore`). Under systemd only, as the unit's main process with a
//! notify socket; standalone nothing is stored and `PR_SET_PDEATHSIG` takes the workers down
//! with herdsman, as before.
//!
//! What is stored is exactly what an in-place upgrade hands over: every descriptor of the
//! table [`Supervisor::handover`] builds (each worker's `pidfd-/out-/err-/ipc-/bind-<slot>-
//! <gen>-<pid>`, `control`, `metrics-http`, `listener-N`, `steer-N`, `notify-N`) under the
//! same name, and the state document itself (the serialized core and the driver's state) in
//! the state memfds. After every turn of the loop [`Supervisor::sync_store`] stores the names
//! new in the table, then writes the state if it changed, then removes the names that left
//! it (a worker leaves the table once its exit is handled): the stored state never names a
//! descriptor the store lacks. A crash-restarted herdsman then runs the upgrade's restore on
//! what systemd passes back (`app::readopt`).
//!
//! The state is serialized (and written when it changed) at once when a worker came, went or
//! changed role or state, or the pool's size or generation changed: what a restarted
//! herdsman must know to judge each worker. Anything else (a watchdog ping's time, metrics,
//! output tails) is written at most every [`STATE_EVERY`], so a busy loop with many workers
//! does not serialize the whole state on every turn.
//!
//! Everything is stored with `FDPOLL=0`: systemd would drop a dead worker's pidfd and pipes on
//! `POLLHUP`; kept, the restarted herdsman sees the pidfd readable at once and handles the
//! exit as any other (status unknown), its last output drained from the pipes.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::os::fd::AsFd;

use super::Supervisor;
use crate::fdstore::{self, state::StateFile};
use crate::handoff::Exporter;
use crate::mono::Mono;

/// The state memfds' names (see `fdstore::state`).
const STATE_NAMES: [&str; 2] = ["state-a", "state-b"];

/// How often the state is written at most when nothing a restart depends on changed.
const STATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What herdsman keeps in systemd's fd store.
pub struct Store {
    state: StateFile,
    /// The state memfds are in the store (a fresh [`StateFile`] is stored at the first sync).
    state_stored: bool,
    /// The names systemd holds for herdsman now (without `fdstore::PREFIX`).
    stored: BTreeSet<String>,
    /// A hash of the state last written.
    written: Option<u64>,
    /// Said once: the state cannot be built (no upgrade carry).
    warned: bool,
    /// What the last state was built from (see [`Supervisor::signature`]), and when.
    built: Option<(u64, Mono)>,
    /// A change waits to be written (at the last build + [`STATE_EVERY`]).
    pending: bool,
}

impl Store {
    /// A fresh start: new state memfds, stored at the first sync.
    pub fn create() -> std::io::Result<Store> {
        Ok(Store::with(StateFile::create()?, false, BTreeSet::new()))
    }

    /// Goes on with what the store passed back: its state memfds (`state`, already stored) and
    /// every name it held (`names`); the ones the next sync does not find in the table are
    /// removed then.
    pub fn continuing(state: StateFile, names: impl IntoIterator<Item = String>) -> Store {
        Store::with(state, true, names.into_iter().collect())
    }

    /// Starts over (the stored state was unusable or missing): new state memfds replace the
    /// stored ones, every other name in `names` is removed at the first sync.
    pub fn replacing(names: impl IntoIterator<Item = String>) -> std::io::Result<Store> {
        let stored = names.into_iter().filter(|n| !STATE_NAMES.contains(&n.as_str())).collect();
        Ok(Store::with(StateFile::create()?, false, stored))
    }

    fn with(state: StateFile, state_stored: bool, stored: BTreeSet<String>) -> Store {
        Store { state, state_stored, stored, written: None, warned: false, built: None, pending: false }
    }

    /// How many states were written (or read back) so far.
    #[cfg(test)]
    pub(super) fn sequence(&self) -> u64 {
        self.state.sequence()
    }

    /// The state memfds, for an in-place upgrade to carry under their names.
    pub(super) fn state_fds(&self) -> [(&'static str, std::os::fd::BorrowedFd<'_>); 2] {
        self.state.fds()
    }
}

impl Supervisor {
    /// After every turn of the loop: the store holds the descriptors the state names, and the
    /// state is the current one.
    pub(super) fn sync_store(&mut self) {
        let Some(mut store) = self.store.take() else { return };
        self.sync(&mut store);
        self.store = Some(store);
    }

    /// When the loop must wake to write a state change that waits.
    pub(super) fn store_deadline(&self) -> Option<Mono> {
        let store = self.store.as_ref()?;
        let (_, at) = store.built?;
        store.pending.then(|| at + STATE_EVERY)
    }

    /// What a restarted herdsman depends on, hashed: each worker's pid, slot, generation,
    /// role and state, the pool's size and generation, the roll-out, the sockets learned.
    /// Cheap (no allocation), unlike the state itself.
    fn signature(&self) -> u64 {
        let mut workers = 0u64;
        for w in self.core.pool.workers().values() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (w.pid, w.slot, w.spec.generation, w.role as u8, w.readopted).hash(&mut h);
            std::mem::discriminant(&w.state).hash(&mut h);
            // Order-independent: the pool is a hash map.
            workers = workers.wrapping_add(h.finish());
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (workers, self.core.pool.desired(), self.core.pool.generation(), self.core.stopping).hash(&mut h);
        (self.core.rollouts.current.as_ref().map(|r| (r.done, r.total)), self.outside.learned.len())
            .hash(&mut h);
        self.core.rollouts.last_reload.as_ref().map(|l| l.at).hash(&mut h);
        h.finish()
    }

    fn sync(&self, store: &mut Store) {
        let notifier = &self.outside.notifier;
        let (signature, now) = (self.signature(), self.now());
        if let Some((last, at)) = store.built {
            if last == signature && now < at + STATE_EVERY {
                store.pending = true;
                return;
            }
        }
        store.built = Some((signature, now));
        store.pending = false;
        if !store.state_stored {
            // Two state memfds under one name would make the restarted herdsman read either.
            for (name, fd) in store.state.fds() {
                log(fdstore::remove(notifier, name));
                log(fdstore::store(notifier, name, fd, false));
            }
            store.state_stored = true;
        }
        let mut state = match self.handover(&mut Exporter::new(true, self.fd_floor()), None) {
            Ok(h) => h,
            Err(e) => {
                if !store.warned {
                    tracing::warn!("fd store: cannot build the state, a crash would lose the workers: {e}");
                    store.warned = true;
                }
                return;
            }
        };
        // The dry exporter recorded each descriptor's number, valid while this call runs.
        for (name, n) in &state.fds {
            if store.stored.contains(name) {
                continue;
            }
            match crate::sys::dup_raw_cloexec(*n) {
                Ok(copy) => match fdstore::store(notifier, name, copy.as_fd(), false) {
                    Ok(()) => {
                        store.stored.insert(name.clone());
                    }
                    Err(e) => tracing::warn!("{e}"),
                },
                Err(e) => tracing::warn!("fd store: cannot copy {name}: {e}"),
            }
        }
        // Not an upgrade: no count to add, no exec to time.
        state.upgrades = self.upgrades.count;
        state.exec_at_ns = 0;
        match serde_json::to_vec(&state) {
            Ok(bytes) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                let hash = h.finish();
                if store.written != Some(hash) {
                    match store.state.write(&bytes) {
                        Ok(()) => store.written = Some(hash),
                        Err(e) => tracing::warn!("fd store: writing the state: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("fd store: serializing the state: {e}"),
        }
        let gone: Vec<String> = store
            .stored
            .iter()
            .filter(|n| !state.fds.contains_key(*n) && !STATE_NAMES.contains(&n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            log(fdstore::remove(notifier, &name));
            store.stored.remove(&name);
        }
    }

    /// The loop ended after a stop: nothing is left to re-adopt, the store is emptied (a
    /// `systemctl restart` then starts afresh).
    pub(super) fn clear_store(&mut self) {
        let Some(store) = self.store.take() else { return };
        let notifier = &self.outside.notifier;
        for name in store.stored.iter().map(String::as_str).chain(STATE_NAMES) {
            log(fdstore::remove(notifier, name));
        }
        notifier.flush();
    }
}

fn log(r: Result<(), fdstore::StoreError>) {
    if let Err(e) = r {
        tracing::warn!("{e}");
    }
}
