//! What herdsman tells its own service manager (systemd, through `NOTIFY_SOCKET`): the first
//! `READY=1`, every change of the one-line `STATUS=`, and `WATCHDOG=1` on time.
//!
//! The roll-out's messages (`RELOADING=1`, `EXTEND_TIMEOUT_USEC=`, its `READY=1`) come as
//! effects from the roll-out and are sent through here too; this part only decides the ones
//! that are about the supervisor as a whole.
//!
//! Plain data: it decides what to say; the driver says it (its `Notifier`).

use super::clock::Mono;
use std::time::Duration;

/// How soon a message the manager had no room for is sent again.
const NOTIFY_RETRY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Manager {
    /// Send `WATCHDOG=1` this often (from `WATCHDOG_USEC`), and when it was last sent.
    watchdog: Option<(Duration, Mono)>,
    /// The first `READY=1` was sent (or is no longer due: a stop began first).
    pub sent_ready: bool,
    /// The last `STATUS=` sent.
    last_status: String,
}

impl Manager {
    pub fn new(watchdog: Option<Duration>, now: Mono) -> Manager {
        Manager { watchdog: watchdog.map(|d| (d, now)), sent_ready: false, last_status: String::new() }
    }

    /// The manager's part of a state taken over from an image that wrote only `sent_ready`
    /// (the watchdog interval is set on resume: [`Manager::set_watchdog`]).
    pub fn taken_over(sent_ready: bool) -> Manager {
        Manager { watchdog: None, sent_ready, last_status: String::new() }
    }

    /// This image's watchdog interval (its `WATCHDOG_USEC`), counting from `now`.
    pub fn set_watchdog(&mut self, watchdog: Option<Duration>, now: Mono) {
        self.watchdog = watchdog.map(|d| (d, now));
    }

    /// When the loop must wake to ping the manager or retry a message (`backlog`: the
    /// notifier holds messages it had no room for).
    pub fn deadlines(&self, now: Mono, backlog: bool) -> impl Iterator<Item = Mono> {
        let ping = self.watchdog.map(|(every, last)| last + every);
        let retry = backlog.then(|| now + NOTIFY_RETRY);
        ping.into_iter().chain(retry)
    }

    /// `WATCHDOG=1` if it is due (then it counts as sent).
    pub fn ping_if_due(&mut self, now: Mono) -> Option<&'static str> {
        let (every, last) = self.watchdog?;
        if now < last + every {
            return None;
        }
        self.watchdog = Some((every, now));
        Some("WATCHDOG=1")
    }

    /// Makes the next [`Manager::ping_if_due`] ping at once (after an in-place upgrade: the
    /// exec took a moment of the manager's watchdog).
    pub fn ping_soon(&mut self, now: Mono) {
        if let Some((every, _)) = self.watchdog {
            self.watchdog = Some((every, now.checked_sub(every).unwrap_or(now)));
        }
    }

    /// Whether the first `READY=1` is due now: once every slot has `settled`, unless
    /// `stopping` came first (then it is never sent).
    pub fn ready_once(&mut self, settled: bool, stopping: bool) -> bool {
        if self.sent_ready || !(stopping || settled) {
            return false;
        }
        self.sent_ready = true;
        !stopping
    }

    /// `STATUS=` when it changed.
    pub fn status(&mut self, line: String) -> Option<String> {
        if line == self.last_status {
            return None;
        }
        let msg = format!("STATUS={line}");
        self.last_status = line;
        Some(msg)
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
        let now = Mono::now();
        let mut m = Manager::new(None, now);
        assert!(!m.ready_once(false, false), "READY=1 before the slots settled");
        assert!(m.ready_once(true, false));
        assert!(!m.ready_once(true, false), "READY=1 twice");
        let mut stopped = Manager::new(None, now);
        assert!(!stopped.ready_once(false, true), "READY=1 after a stop began");
        assert!(stopped.sent_ready && !stopped.ready_once(true, false));
    }

    #[test]
    fn the_manager_watchdog_pings_on_time_and_at_once_after_an_upgrade() {
        let start = Mono::now();
        let every = Duration::from_secs(10);
        let mut m = Manager::new(Some(every), start);
        assert_eq!(m.deadlines(start, false).collect::<Vec<_>>(), [start + every]);
        assert_eq!(m.ping_if_due(start + every - Duration::from_millis(1)), None);
        assert_eq!(m.deadlines(start, false).next(), Some(start + every), "pinged early");
        assert_eq!(m.ping_if_due(start + every), Some("WATCHDOG=1"));
        assert_eq!(m.deadlines(start, false).next(), Some(start + every + every));
        let later = start + Duration::from_secs(60);
        m.ping_soon(later);
        assert!(m.deadlines(later, false).next().is_some_and(|d| d <= later));
    }
}
