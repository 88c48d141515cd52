//! What herdsman tells its own service manager (systemd, through `NOTIFY_SOCKET`): the first
//! `READY=1`, every change of the one-line `STATUS=`, and `WATCHDOG=1` on time.
//!
//! The roll-out's messages (`RELOADING=1`, `EXTEND_TIMEOUT_USEC=`, its `READY=1`) come as
//! effects from the roll-out and are sent through here too; this part only decides the ones
//! that are about the supervisor as a whole.

use std::time::{Duration, Instant};

use crate::notify::Notifier;

/// How soon a message the manager had no room for is sent again.
const NOTIFY_RETRY: Duration = Duration::from_millis(50);

pub(super) struct Manager {
    notifier: Notifier,
    /// Send `WATCHDOG=1` this often (from `WATCHDOG_USEC`), and when it was last sent.
    watchdog: Option<(Duration, Instant)>,
    /// The first `READY=1` was sent (or is no longer due: a stop began first).
    pub sent_ready: bool,
    /// The last `STATUS=` sent.
    last_status: String,
}

impl Manager {
    pub fn new(notifier: Notifier, watchdog: Option<Duration>, now: Instant) -> Manager {
        Manager {
            notifier,
            watchdog: watchdog.map(|d| (d, now)),
            sent_ready: false,
            last_status: String::new(),
        }
    }

    pub fn send(&self, msg: &str) {
        self.notifier.send(msg);
    }

    /// Retries what the manager had no room for; `true` once nothing is left.
    pub fn flush(&self) -> bool {
        self.notifier.flush()
    }

    /// When the loop must wake to ping the manager or retry a message.
    pub fn deadlines(&self, now: Instant) -> impl Iterator<Item = Instant> {
        let ping = self.watchdog.map(|(every, last)| last + every);
        let retry = self.notifier.has_backlog().then(|| now + NOTIFY_RETRY);
        ping.into_iter().chain(retry)
    }

    /// Sends `WATCHDOG=1` if it is due.
    pub fn ping_if_due(&mut self, now: Instant) {
        if let Some((every, last)) = self.watchdog {
            if now >= last + every {
                self.notifier.send("WATCHDOG=1");
                self.watchdog = Some((every, now));
            }
        }
    }

    /// Makes the next [`Manager::ping_if_due`] ping at once (after an in-place upgrade: the
    /// exec took a moment of the manager's watchdog).
    pub fn ping_soon(&mut self, now: Instant) {
        if let Some((every, _)) = self.watchdog {
            self.watchdog = Some((every, now.checked_sub(every).unwrap_or(now)));
        }
    }

    /// Sends the first `READY=1` once every slot has `settled`, unless `stopping` came first
    /// (then it is never sent). Returns whether it was sent now.
    pub fn ready_once(&mut self, settled: bool, stopping: bool) -> bool {
        if self.sent_ready || !(stopping || settled) {
            return false;
        }
        self.sent_ready = true;
        if !stopping {
            self.notifier.send("READY=1");
        }
        !stopping
    }

    /// Sends `STATUS=` when it changed.
    pub fn status(&mut self, line: String) {
        if line != self.last_status {
            self.notifier.send(&format!("STATUS={line}"));
            self.last_status = line;
        }
    }

    /// Forgets the last `STATUS=` so that the next one is sent even if unchanged (someone
    /// else, e.g. a failed upgrade, said something in between).
    pub fn forget_status(&mut self) {
        self.last_status.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_ready_is_sent_once_every_slot_settled_and_never_after_a_stop() {
        let now = Instant::now();
        let mut m = Manager::new(Notifier::disabled(), None, now);
        assert!(!m.ready_once(false, false), "READY=1 before the slots settled");
        assert!(m.ready_once(true, false));
        assert!(!m.ready_once(true, false), "READY=1 twice");
        let mut stopped = Manager::new(Notifier::disabled(), None, now);
        assert!(!stopped.ready_once(false, true), "READY=1 after a stop began");
        assert!(stopped.sent_ready && !stopped.ready_once(true, false));
    }

    #[test]
    fn the_manager_watchdog_pings_on_time_and_at_once_after_an_upgrade() {
        let start = Instant::now();
        let every = Duration::from_secs(10);
        let mut m = Manager::new(Notifier::disabled(), Some(every), start);
        assert_eq!(m.deadlines(start).collect::<Vec<_>>(), [start + every]);
        m.ping_if_due(start + every - Duration::from_millis(1));
        assert_eq!(m.deadlines(start).next(), Some(start + every), "pinged early");
        m.ping_if_due(start + every);
        assert_eq!(m.deadlines(start).next(), Some(start + every + every));
        let later = start + Duration::from_secs(60);
        m.ping_soon(later);
        assert!(m.deadlines(later).next().is_some_and(|d| d <= later));
    }
}
