//! Everything the bench reads from `/proc`: process state, CPU time, memory, children, load.
//!
//! The main crate has its own `/proc/PID/stat` reader (`src/control/procstat.rs`: process group,
//! CPU ticks and RSS summed per worker group). The bench does not depend on the herdsman crate
//! for it: that would build the whole supervisor (tokio, clap, nix, toml, tracing: 72 crates
//! against the bench's 19) into the bench for a private ten-line parser, and the bench needs
//! other fields (the state letter; CPU in ns from `schedstat`, not 10 ms ticks). Both parse
//! `stat` the same way: the fields after the last `)`, since the command name may contain
//! spaces and parentheses.

/// The state letter of `/proc/PID/stat` (`R`, `S`, `D`, `Z`, ...); None once the process is gone.
pub fn state(pid: i32) -> Option<char> {
    parse_state(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_state(stat: &str) -> Option<char> {
    // "PID (COMMAND) STATE PPID ...": COMMAND may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.split_whitespace().next()?.chars().next()
}

/// The process exists and is not a zombie (a zombie still "exists" for `kill(pid, 0)`).
pub fn alive(pid: i32) -> bool {
    state(pid).is_some_and(|s| s != 'Z' && s != 'X')
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

/// VmRSS of `pid` in bytes (0 once it is gone).
pub fn rss_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|k| k.parse::<u64>().ok()))
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
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

/// Direct children of `pid` (of all its threads).
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

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them ("0.52, 0.61, 0.70").
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn the_state_is_read_after_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(parse_state("4242 (a (b) c) S 1 4240 4240 0 -1 4194560"), Some('S'));
        assert_eq!(parse_state("7 (x) Z 1 7 7"), Some('Z'));
        assert_eq!(parse_state("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_uses_cpu_and_memory() {
        // `stat` is the main thread's: S while the test harness waits for this test.
        assert!(alive(me()) && state(me()).is_some());
        let c0 = cpu_ns(me());
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ns(me()) > c0, "CPU time grows while spinning");
        assert!(rss_bytes(me()) > 0 && uss_bytes(me()) > 0);
    }

    #[test]
    fn a_child_is_in_the_tree_then_a_zombie_then_gone() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        assert!(children(me()).contains(&pid) && tree(me()).contains(&pid));
        assert!(alive(pid));
        crate::util::kill(pid, libc::SIGKILL);
        // Killed but not reaped: a zombie, which does not count as alive.
        let end = Instant::now() + Duration::from_secs(10);
        while state(pid) != Some('Z') && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(state(pid), Some('Z'));
        assert!(!alive(pid));
        child.wait().unwrap();
        assert_eq!(state(pid), None);
        assert!(!alive(pid) && cpu_ns(pid) == 0 && rss_bytes(pid) == 0 && children(pid).is_empty());
    }

    #[test]
    fn the_load_average_is_three_numbers() {
        let l = loadavg();
        let v: Vec<f64> = l.split(", ").map(|x| x.parse().unwrap()).collect();
        assert_eq!(v.len(), 3, "{l}");
    }
}
