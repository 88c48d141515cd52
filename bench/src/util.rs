//! Small helpers: clocks, polling, process clean-up, statistics. (`/proc` is read in `procfs`.)

// The monotonic clock and kill(2) through libc: two calls, each an `unsafe` block with its
// SAFETY comment (the crate denies `unsafe_code` elsewhere).
#![allow(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::procfs::alive;

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on this machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Polls `f` every `every_ms` until it returns Some or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, every_ms: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        sleep_ms(every_ms);
    }
}

pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a gone pid is an
    // error we ignore.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// SIGKILLs `pids` that are still alive.
pub fn kill_all(pids: &[i32]) {
    for &p in pids {
        if alive(p) {
            kill(p, libc::SIGKILL);
        }
    }
}

/// Statistics over a sample: median, min, max.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Mmm {
    pub med: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// Median, min, max of the finite values; all zero with n = 0 for none (JSON has no NaN).
pub fn mmm(v: &[f64]) -> Mmm {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return Mmm::default();
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Mmm { med, min: s[0], max: s[n - 1], n }
}

/// Percentile (nearest rank) of an already sorted slice.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn read_file(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub fn fmt_bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}
