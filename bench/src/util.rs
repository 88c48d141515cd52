//! Small helpers: clocks, /proc sampling, process clean-up, statistics.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on this machine.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
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

/// CPU time (user + system, ns) of every thread of `pid`, from /proc/PID/task/*/schedstat
/// (nanosecond resolution, unlike the 10 ms ticks of /proc/PID/stat).
pub fn cpu_ns(pid: i32) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: i32) -> u64 {
    status_field(pid, "VmRSS:")
}

/// Private memory (USS: Private_Clean + Private_Dirty from smaps_rollup) of `pid` in bytes.
pub fn uss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
                * 1024
        })
        .unwrap_or(0)
}

fn status_field(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next().and_then(|k| k.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Direct children of `pid` (all its threads).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// `pid` and all its descendants, parents first.
pub fn tree(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let c = children(out[i]);
        out.extend(c);
        i += 1;
    }
    out
}

pub fn alive(pid: i32) -> bool {
    // A zombie still "exists" for kill(0); look at the state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

pub fn kill(pid: i32, sig: i32) {
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
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
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
