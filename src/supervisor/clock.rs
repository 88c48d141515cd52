//! The core's time: [`Mono`], a point on `CLOCK_MONOTONIC` in nanoseconds.
//!
//! The core never reads a clock: the driver reads it ([`Mono::now`], through the host) and
//! passes it in. A `Mono` is plain data (`serde`, `Copy`), and because `CLOCK_MONOTONIC`
//! survives `execve`, a deadline written by one image means the same moment in the next: an
//! in-place upgrade serializes the core's timers as they are.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point on `CLOCK_MONOTONIC`, in nanoseconds since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Mono(u64);

impl Mono {
    /// The clock now. Only the driver (the host) calls this; the core is given the time.
    pub fn now() -> Mono {
        let ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| (t.tv_sec() as i128) * 1_000_000_000 + t.tv_nsec() as i128)
            .unwrap_or(0);
        Mono(u64::try_from(ns).unwrap_or(0))
    }

    pub const fn from_nanos(ns: u64) -> Mono {
        Mono(ns)
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Microseconds, as systemd's `MONOTONIC_USEC=` wants them.
    pub const fn as_micros(self) -> u64 {
        self.0 / 1_000
    }

    /// How long after `earlier` this is; zero if it is not later.
    pub fn saturating_duration_since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Same as [`Mono::saturating_duration_since`] (like `Instant::duration_since`, which
    /// saturates too).
    pub fn duration_since(self, earlier: Mono) -> Duration {
        self.saturating_duration_since(earlier)
    }

    pub fn checked_add(self, d: Duration) -> Option<Mono> {
        u64::try_from(d.as_nanos()).ok().and_then(|n| self.0.checked_add(n)).map(Mono)
    }

    pub fn checked_sub(self, d: Duration) -> Option<Mono> {
        u64::try_from(d.as_nanos()).ok().and_then(|n| self.0.checked_sub(n)).map(Mono)
    }

    /// The tokio instant of the same moment (for the driver's sleep).
    pub fn to_tokio(self) -> tokio::time::Instant {
        let now = Mono::now();
        let base = tokio::time::Instant::now();
        if self >= now {
            base + self.saturating_duration_since(now)
        } else {
            base.checked_sub(now.saturating_duration_since(self)).unwrap_or(base)
        }
    }
}

impl Add<Duration> for Mono {
    type Output = Mono;
    /// Saturates at the end of time (a deadline that far away never comes).
    fn add(self, d: Duration) -> Mono {
        self.checked_add(d).unwrap_or(Mono(u64::MAX))
    }
}

impl Sub<Duration> for Mono {
    type Output = Mono;
    /// Saturates at boot.
    fn sub(self, d: Duration) -> Mono {
        self.checked_sub(d).unwrap_or(Mono(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mono_is_the_monotonic_clock_in_nanoseconds_and_saturates() {
        let a = Mono::now();
        let b = Mono::now();
        assert!(b >= a);
        let later = a + Duration::from_millis(1500);
        assert_eq!(later.saturating_duration_since(a), Duration::from_millis(1500));
        assert_eq!(a.saturating_duration_since(later), Duration::ZERO);
        assert_eq!(Mono::from_nanos(5) - Duration::from_secs(1), Mono::from_nanos(0));
        assert_eq!(Mono::from_nanos(u64::MAX - 1) + Duration::from_secs(1), Mono::from_nanos(u64::MAX));
        let json = serde_json::to_string(&Mono::from_nanos(42)).unwrap();
        assert_eq!(json, "42");
        assert_eq!(serde_json::from_str::<Mono>(&json).unwrap(), Mono::from_nanos(42));
    }
}
