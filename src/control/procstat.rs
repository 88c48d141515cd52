//! CPU and memory of a process, read from `/proc` (what `ps` and PM2 show).

use std::collections::HashMap;
use std::time::Instant;

/// CPU ticks used so far (user + system) and resident bytes of `pid`.
pub fn sample(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15, rss (pages) 24.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    Some((utime + stime, rss_pages * page_size()))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

/// Remembers the previous sample per pid, so CPU % is "since the last look" like `top`.
#[derive(Default)]
pub struct CpuMeter {
    last: HashMap<i32, (u64, Instant)>,
}

impl CpuMeter {
    /// CPU % (100 = one core) and RSS of `pid`; `uptime_s` is used for the first look.
    pub fn measure(&mut self, pid: i32, uptime_s: f64) -> (f64, u64) {
        let Some((ticks, rss)) = sample(pid) else { return (0.0, 0) };
        let now = Instant::now();
        let (used, over) = match self.last.get(&pid) {
            Some((t0, at)) => (ticks.saturating_sub(*t0), now.duration_since(*at).as_secs_f64()),
            None => (ticks, uptime_s),
        };
        self.last.insert(pid, (ticks, now));
        let pct = if over > 0.0 { used as f64 / ticks_per_second() / over * 100.0 } else { 0.0 };
        ((pct * 10.0).round() / 10.0, rss)
    }

    /// Forgets pids not in `alive`.
    pub fn retain(&mut self, alive: &[i32]) {
        self.last.retain(|pid, _| alive.contains(pid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_has_memory_and_cpu() {
        let (ticks, rss) = sample(std::process::id() as i32).unwrap();
        assert!(rss > 0);
        let _ = ticks;
        assert!(sample(-1).is_none());
    }
}
