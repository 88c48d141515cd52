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
//! in the loop, no other state shared with it. A check is one `getrusage`; while nothing
//! happens the checks back off to one a minute, so an idle supervisor stays idle.

use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};

/// The check interval right after activity: how long the supervisor must be quiet before its
/// pages are released.
const QUIET: Duration = Duration::from_secs(1);
/// The longest interval between checks while nothing happens.
const IDLE_CHECK: Duration = Duration::from_secs(16);
/// Minor faults since the last release below which releasing is not worth it (each fault maps
/// up to 64 KiB of code; the checks themselves cause a few after a release).
const WORTH_RELEASING: i64 = 16;

/// What the next check does, from the fault counts: at the last release, at the last check,
/// and now.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Faults since the last check: work is going on; check again soon.
    Busy,
    /// Quiet since the last check after enough faults since the last release: release now.
    Release,
    /// Quiet, nothing worth releasing: check less often.
    Idle,
}

fn step(at_release: i64, last: i64, now: i64) -> Step {
    if now != last {
        Step::Busy
    } else if now - at_release >= WORTH_RELEASING {
        Step::Release
    } else {
        Step::Idle
    }
}

fn minor_faults() -> i64 {
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |u| u.minor_page_faults())
}

/// Releases the start-up's pages now, then, for the life of the runtime, again each time the
/// supervisor goes quiet after a burst of work (a roll-out, scaling, a config reload).
pub(super) async fn release_when_settled() {
    let released = crate::sys::release_idle_pages();
    tracing::debug!("start-up pages released: {} KiB", released / 1024);
    let mut at_release = minor_faults();
    let mut last = at_release;
    let mut interval = QUIET;
    loop {
        tokio::time::sleep(interval).await;
        let now = minor_faults();
        match step(at_release, last, now) {
            Step::Busy => interval = QUIET,
            Step::Release => {
                // Not logged: the log line's own faults would count as the next burst.
                crate::sys::release_idle_pages();
                at_release = minor_faults();
                interval = QUIET;
            }
            Step::Idle => interval = (interval * 2).min(IDLE_CHECK),
        }
        last = minor_faults();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_only_once_quiet_after_enough_faults() {
        // Faults since the last check: busy, whatever happened before.
        assert_eq!(step(0, 10, 500), Step::Busy);
        // Quiet after a burst: release.
        assert_eq!(step(0, 500, 500), Step::Release);
        // Quiet, but only the checks' own faults since the last release: nothing to do.
        assert_eq!(step(500, 503, 503), Step::Idle);
    }
}
