//! CPU and memory of a worker's whole process group, read from `/proc`.
//!
//! Every worker runs in its own process group (pgid = the worker's pid), and a pre-fork server
//! (gunicorn, Puma, `npm start` → node) does its real work in children of the worker. So what
//! herdsman shows and limits is the sum over every process whose pgid is the worker's pid:
//!
//! * memory: the sum of each process's RSS (`/proc/PID/stat` field 24). Pages that forked
//!   children share copy-on-write with their parent (the code, a `--preload`ed app) are counted
//!   once per process, so the sum overstates what the group really takes; it is what `ps`
//!   shows per process, added up. PSS (`/proc/PID/smaps_rollup`) would split shared pages
//!   fairly, but it walks every page table of the process on each read and needs ptrace-read
//!   access to workers running as another user, which the hardened unit does not grant:
//!   not worth it for a limit that is sampled every few seconds.
//! * CPU: user + system time of the group's live processes, plus the time of the children the
//!   worker itself has reaped (its `cutime`/`cstime`), so a master that forks and reaps
//!   workers is charged for them.
//!
//! One scan of `/proc` serves every worker: [`scan_groups`] asks each process's group with
//! `getpgid` and reads the `stat` of the processes in a counted group once.

use std::collections::HashMap;
use std::io::Read;
use std::time::{Duration, Instant};

/// Totals for one process group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU ticks used so far (user + system), see the module docs.
    pub ticks: u64,
    /// Sum of the resident set sizes of the group's processes, in bytes.
    pub rss_bytes: u64,
    /// How many processes the group has.
    pub processes: u32,
}

/// The fields of `/proc/PID/stat` herdsman uses.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    pgid: i32,
    ticks: u64,
    child_ticks: u64,
    rss_pages: u64,
}

fn parse_stat(stat: &str) -> Option<Stat> {
    // Fields after the parenthesised command name (which may contain spaces and parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): pgrp is field 5, utime 14, stime 15, cutime 16,
    // cstime 17, rss (pages) 24.
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        pgid: f.get(2)?.parse().ok()?,
        ticks: num(11)? + num(12)?,
        child_ticks: num(13)? + num(14)?,
        rss_pages: num(21)?,
    })
}

/// One pass over `/proc`: usage per process group, for the groups led by `leaders` only.
pub fn scan_groups(leaders: &[i32]) -> HashMap<i32, Usage> {
    let mut out: HashMap<i32, Usage> = leaders.iter().map(|&p| (p, Usage::default())).collect();
    if out.is_empty() {
        return out;
    }
    let page = page_size();
    let Ok(dir) = std::fs::read_dir("/proc") else { return HashMap::new() };
    let mut buf = String::with_capacity(512);
    let mut path = String::with_capacity(24);
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(dir) = name.to_str() else { continue };
        let Ok(pid) = dir.parse::<i32>() else { continue };
        // One syscall tells whether the process is in a group we count; only those have
        // their `stat` opened and formatted by the kernel (the expensive part of a scan).
        match nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))) {
            Ok(g) if out.contains_key(&g.as_raw()) => {}
            _ => continue,
        }
        buf.clear();
        path.clear();
        path.push_str("/proc/");
        path.push_str(dir);
        path.push_str("/stat");
        let read = std::fs::File::open(&path).and_then(|mut f| f.read_to_string(&mut buf));
        // A process that exited between readdir and open is simply not counted.
        let Some(st) = read.ok().and_then(|_| parse_stat(&buf)) else { continue };
        let Some(u) = out.get_mut(&st.pgid) else { continue };
        u.ticks += st.ticks;
        if pid == st.pgid {
            u.ticks += st.child_ticks;
        }
        u.rss_bytes += st.rss_pages * page;
        u.processes += 1;
    }
    // A leader that is gone (and whose group is empty) has no usage to report.
    out.retain(|_, u| u.processes > 0);
    out
}

/// Usage of the process group led by `pid` (one scan; prefer [`scan_groups`] for many).
#[cfg(test)]
pub fn sample(pid: i32) -> Option<Usage> {
    scan_groups(&[pid]).remove(&pid)
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

/// Status requests measure every worker in a row: one `/proc` scan serves all the
/// measurements made within this window.
const SCAN_REUSE: Duration = Duration::from_millis(200);

/// Remembers the previous sample per worker, so CPU % is "since the last look" like `top`.
#[derive(Default)]
pub struct CpuMeter {
    last: HashMap<i32, (u64, Instant)>,
    scan: Option<(Instant, HashMap<i32, Usage>)>,
}

impl CpuMeter {
    /// CPU % (100 = one core) and RSS of the process group of worker `pid`; `uptime_s` is
    /// used for the first look. Measurements made together share one `/proc` scan.
    pub fn measure(&mut self, pid: i32, uptime_s: f64) -> (f64, u64) {
        let now = Instant::now();
        let fresh = self
            .scan
            .as_ref()
            .is_some_and(|(at, groups)| now.duration_since(*at) < SCAN_REUSE && groups.contains_key(&pid));
        if !fresh {
            // Scan for every worker seen recently too, so the next calls reuse this scan.
            let mut leaders: Vec<i32> = self.last.keys().copied().collect();
            leaders.push(pid);
            self.scan = Some((now, scan_groups(&leaders)));
        }
        let Some(Usage { ticks, rss_bytes, .. }) = self.scan.as_ref().and_then(|(_, g)| g.get(&pid).copied())
        else {
            return (0.0, 0);
        };
        let (used, over) = match self.last.get(&pid) {
            Some((t0, at)) => (ticks.saturating_sub(*t0), now.duration_since(*at).as_secs_f64()),
            None => (ticks, uptime_s),
        };
        self.last.insert(pid, (ticks, now));
        let pct = if over > 0.0 { used as f64 / ticks_per_second() / over * 100.0 } else { 0.0 };
        ((pct * 10.0).round() / 10.0, rss_bytes)
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
    fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (a (b) c) S 1 4240 4240 0 -1 4194560 100 0 0 0 7 3 5 6 20 0 1 0 100 1000000 250 18446744073709551615";
        let st = parse_stat(line).unwrap();
        assert_eq!(st, Stat { pgid: 4240, ticks: 10, child_ticks: 11, rss_pages: 250 });
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn our_own_group_has_memory_and_a_gone_group_has_none() {
        let me = nix::unistd::getpgrp().as_raw();
        let u = sample(me).unwrap();
        assert!(u.rss_bytes > 0 && u.processes >= 1, "{u:?}");
        assert!(sample(-1).is_none());
    }

    #[test]
    fn a_child_in_the_group_adds_its_memory() {
        use std::os::unix::process::CommandExt;
        // A new group led by `sh`, with a child `sleep` in it.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = leader.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        let u = loop {
            let u = sample(pgid).unwrap_or_default();
            if u.processes >= 3 || Instant::now() > deadline {
                break u;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        let _ = leader.wait();
        assert_eq!(u.processes, 3, "{u:?}");
        assert!(u.rss_bytes > 0, "{u:?}");
    }
}
