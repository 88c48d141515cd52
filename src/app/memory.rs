//! The supervisor's resident memory between bursts of work (issue 24: ≤ 4 MiB with 8 workers).
//!
//! Most of herdsman's `VmRSS` is mapped code: its own and the C library's. The kernel maps a
//! file's pages in 64 KiB windows around each fault ("fault-around"), so every path that ran
//! once (start-up, a roll-out, a scale, a config reload) stays resident afterwards, and the
//! heap keeps what malloc freed. [`release_when_settled`] hands both back once the supervisor
//! has gone quiet after such a burst (`sys::release_idle_pages`): the pages stay in the page
//! cache, and what runs again is mapped again by a minor fault.
//!
//! "Quiet" is read from the process's own minor-fault count (`getrusage`), which every burst
//! of work raises (code and heap pages mapped in) and an idle supervisor leaves alone: no hook
//! in the loop, no other state shared with it. Once quiet, the resident set (`statm`) says
//! whether a release is worth it: 256 KiB more than once the last release settled. A check is
//! a `getrusage` and a `statm` read (~0.15 ms after a long sleep); while nothing happens the
//! checks back off to one a minute, so an idle supervisor stays idle; releases that are mapped
//! straight back (a supervisor busy without pause) back off to one a minute too. A burst's
//! pages are released at most about a minute after it ends.

use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

/// The check interval right after activity: how long the supervisor must be quiet before its
/// pages are released.
const QUIET: Duration = Duration::from_secs(1);
/// The longest interval between checks while nothing happens.
const IDLE_CHECK: Duration = Duration::from_secs(64);
/// The longest wait between two releases while what they free keeps being mapped back.
const MAX_GAP: Duration = Duration::from_secs(64);
/// Growth of the resident set since the last release below which releasing is not worth it:
/// what the idle loop and these checks map back after a release stays under it.
const WORTH_RELEASING_KIB: u64 = 256;

/// The decision between checks, from the process's minor-fault count (pure: the loop below
/// does the reading and the releasing).
#[derive(Debug)]
struct Settle {
    /// The resident set once the last release settled, in KiB: read at the first check after
    /// it (`None` until then), when the idle loop's own path (its timers, these checks) is
    /// mapped back, so that path alone never counts as worth another release.
    at_release: Option<u64>,
    /// Faults counted at the last check.
    last: i64,
    /// Until when another release waits: doubled by each release, reset once a release holds
    /// (nothing faults back for a whole check), so a supervisor busy without pause (a worker
    /// printing all the time, a scrape every second) releases rarely instead of every two
    /// seconds only to map the same pages again.
    not_before: Instant,
    gap: Duration,
    /// Until the next check.
    interval: Duration,
}

impl Settle {
    fn new(faults: i64, resident_kib: u64, now: Instant) -> Self {
        // The start-up's release comes before the workers are spawned: the start-up's burst
        // follows at once, so its baseline is the resident set right after it.
        Settle { at_release: Some(resident_kib), last: faults, not_before: now, gap: QUIET, interval: QUIET }
    }

    /// At a check, with the fault count and the resident set: whether to release now (then
    /// [`Settle::released`] follows).
    fn check(&mut self, faults: i64, resident_kib: u64, now: Instant) -> bool {
        let quiet = faults == self.last;
        self.last = faults;
        let at_release = *self.at_release.get_or_insert(resident_kib);
        if !quiet {
            // Work is going on: check again soon.
            self.interval = QUIET;
            return false;
        }
        if resident_kib < at_release + WORTH_RELEASING_KIB {
            // Quiet, and what the last release freed stayed free: check less often, and the
            // next burst's pages may go as soon as it is over.
            self.interval = (self.interval * 2).min(IDLE_CHECK);
            self.gap = QUIET;
            self.not_before = now;
            return false;
        }
        if now < self.not_before {
            self.interval = QUIET;
            return false;
        }
        true
    }

    /// After a release, with the fault count right after it.
    fn released(&mut self, faults: i64, now: Instant) {
        self.at_release = None;
        self.last = faults;
        self.interval = QUIET;
        self.not_before = now + self.gap;
        self.gap = (self.gap * 2).min(MAX_GAP);
    }
}

fn minor_faults() -> i64 {
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| u.minor_page_faults())
}

/// This process's resident set in KiB (`/proc/self/statm`), 0 if unreadable.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// Releases the start-up's pages now, then, for the life of the runtime, again each time the
/// supervisor goes quiet after a burst of work (a roll-out, scaling, a config reload).
pub(super) async fn release_when_settled() {
    let released = crate::sys::release_idle_pages();
    tracing::debug!("start-up pages released: {} KiB", released / 1024);
    let mut settle = Settle::new(minor_faults(), resident_kib(), Instant::now());
    loop {
        tokio::time::sleep(settle.interval).await;
        if settle.check(minor_faults(), resident_kib(), Instant::now()) {
            // Not logged: the log line's own pages would count as the next burst.
            crate::sys::release_idle_pages();
            settle.released(minor_faults(), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_once_quiet_after_a_burst_then_backs_off() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Settle::new(100, 2000, t0);
        // A burst: faults at each check, no release; then a quiet check with 1.5 MiB more
        // resident: release.
        assert!(!s.check(400, 3000, at(1)));
        assert_eq!(s.interval, QUIET);
        assert!(s.check(400, 3500, at(2)));
        s.released(405, at(2));
        // The idle loop maps its own path back (the baseline, however large); then what was
        // released stays free: idle, the checks back off to IDLE_CHECK.
        assert!(!s.check(450, 2600, at(3)));
        assert!(!s.check(450, 2700, at(4)));
        let mut t = 4;
        for _ in 0..8 {
            t += s.interval.as_secs();
            assert!(!s.check(450, 2700, at(t)));
        }
        assert_eq!(s.interval, IDLE_CHECK);
        // The next burst's pages go as soon as it is quiet again.
        assert!(!s.check(900, 3900, at(t + 64)));
        assert!(s.check(900, 3900, at(t + 65)));
    }

    #[test]
    fn a_supervisor_busy_without_pause_releases_ever_more_rarely() {
        let t0 = Instant::now();
        let mut s = Settle::new(0, 2000, t0);
        let mut faults = 0;
        let mut resident = 3000;
        let mut releases = Vec::new();
        // Each release frees 1 MiB that is mapped back over the next two seconds (a periodic
        // task slower than the first check), then it is quiet.
        let mut back = 0;
        for sec in 1..=300u64 {
            let now = t0 + Duration::from_secs(sec);
            if back > 0 {
                back -= 1;
                resident += 500;
                faults += 25;
            }
            if s.check(faults, resident, now) {
                releases.push(sec);
                s.released(faults, now);
                resident -= 1000;
                back = 2;
            }
        }
        // 1 s, 2 s, 4 s, ... up to MAX_GAP apart: a handful, not one every two seconds.
        assert!(releases.len() < 12, "{releases:?}");
        let gaps: Vec<u64> = releases.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
    }
}
