//! herdsman's own cgroup (the unit's, under systemd): which processes are in it, and a sweep
//! that SIGKILLs every one of them except herdsman itself and the ones it keeps.
//!
//! With `KillMode=process`, systemd no longer empties the cgroup when the main process dies
//! or stops, so whatever herdsman cannot account for must be killed by herdsman: at start
//! (the workers of a run that was stopped during the restart gap, processes the fd store
//! lost track of) and after a stop (`herdsman stop-post`). Only ever under systemd (the
//! caller decides): standalone, herdsman's cgroup is its user's session.
//!
//! Where the cgroup is: `/proc/self/cgroup` names it per hierarchy. On a unified (v2) host it
//! is the `0::/path` line under `/sys/fs/cgroup`; on a hybrid or legacy (v1) host systemd
//! tracks units in its named hierarchy, `N:name=systemd:/path` under `/sys/fs/cgroup/systemd`
//! (the `0::` line then lives under `/sys/fs/cgroup/unified`). [`locate`] picks the first
//! that exists, in that order. Child cgroups (none without `Delegate=`) are included.
//!
//! Killing is by pidfd: a pid read from `cgroup.procs` is opened, then checked to still be
//! listed there, and only then signalled through the pidfd, so a pid reused meanwhile by a
//! process outside the cgroup is never hit. (`cgroup.procs`, not `/proc/PID/cgroup`: with
//! `ProtectProc=invisible` and no `CAP_SYS_PTRACE`, root cannot see a `nobody` worker's
//! `/proc` entry.)

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cgroup: its path in the hierarchy (as `/proc/PID/cgroup` writes it) and its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Which `/proc/PID/cgroup` line it came from.
    pub hierarchy: Hierarchy,
    /// The path inside the hierarchy, e.g. `/system.slice/system-herdsman.slice/herdsman@web.service`.
    pub path: String,
    /// Its directory, e.g. `/sys/fs/cgroup/systemd/system.slice/...`.
    pub dir: PathBuf,
}

/// A line of `/proc/PID/cgroup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hierarchy {
    /// `0::/path` (cgroup v2).
    Unified,
    /// `N:name=systemd:/path` (v1, systemd's own named hierarchy).
    NamedSystemd,
}

/// The path of `hierarchy` in a `/proc/PID/cgroup` text.
pub fn parse(text: &str, hierarchy: Hierarchy) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match hierarchy {
            Hierarchy::Unified => controllers.is_empty(),
            Hierarchy::NamedSystemd => controllers.split(',').any(|c| c == "name=systemd"),
        };
        (wanted && path.starts_with('/')).then(|| path.to_string())
    })
}

/// Where the cgroup of a `/proc/PID/cgroup` text is, under `root` (`/sys/fs/cgroup`): the
/// unified hierarchy when `root` is one (`cgroup.controllers` exists), else systemd's named
/// hierarchy (`root/systemd`), else the hybrid layout's unified one (`root/unified`).
pub fn locate(text: &str, root: &Path) -> Option<Cgroup> {
    let join = |base: PathBuf, path: &str| base.join(path.trim_start_matches('/'));
    let candidates = [
        (Hierarchy::Unified, root.to_path_buf(), root.join("cgroup.controllers")),
        (Hierarchy::NamedSystemd, root.join("systemd"), root.join("systemd")),
        (Hierarchy::Unified, root.join("unified"), root.join("unified/cgroup.controllers")),
    ];
    candidates.into_iter().find_map(|(h, base, marker)| {
        if !marker.exists() {
            return None;
        }
        let path = parse(text, h)?;
        let dir = join(base, &path);
        dir.is_dir().then_some(Cgroup { hierarchy: h, path, dir })
    })
}

impl Cgroup {
    /// This process's cgroup.
    pub fn own() -> io::Result<Cgroup> {
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        locate(&text, Path::new("/sys/fs/cgroup")).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no cgroup directory for {:?}", text.trim()))
        })
    }

    /// The last component of the path: the unit's name (`herdsman@web.service`).
    pub fn leaf(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or("")
    }

    /// Every process in the cgroup and its children, sorted.
    pub fn procs(&self) -> io::Result<BTreeSet<i32>> {
        let mut out = BTreeSet::new();
        collect(&self.dir, &mut out, 0)?;
        Ok(out)
    }
}

fn collect(dir: &Path, out: &mut BTreeSet<i32>, depth: usize) -> io::Result<()> {
    match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
        // The cgroup went away (the unit stopped and systemd removed it): empty.
        Err(e) if e.kind() == io::ErrorKind::NotFound && depth > 0 => return Ok(()),
        Err(e) => return Err(e),
    }
    if depth >= 16 {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect(&entry.path(), out, depth + 1)?;
        }
    }
    Ok(())
}

/// How a process hangs off others, from its `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub pid: i32,
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
}

/// The [`Link`]s of `procs` that can be read. `/proc/PID/stat` is read as herdsman first,
/// then with the filesystem ids of each of `owners` (the workers' `--user`): with
/// `ProtectProc=invisible` and no `CAP_SYS_PTRACE`, root cannot see another user's `/proc`
/// entries, but the same user can (the check uses the filesystem ids, see
/// `sys::with_fs_ids`). A process still unreadable (gone, or of yet another user) has none.
pub fn links(procs: &BTreeSet<i32>, owners: &[(u32, u32)]) -> Vec<Link> {
    procs
        .iter()
        .filter_map(|&pid| {
            let read = || std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            let stat = read()
                .or_else(|| owners.iter().find_map(|&(uid, gid)| crate::sys::with_fs_ids(uid, gid, read)))?;
            let (ppid, pgid, sid) = parse_stat(&stat)?;
            Some(Link { pid, ppid, pgid, sid })
        })
        .collect()
}

/// `roots` and every process of `links` that descends from one of them, or whose process
/// group or session is a root's (workers are group leaders, and an app may make itself a
/// session leader; a pre-forking server's children are in its group, a daemonizing child has
/// the worker as its parent until it double-forks, and stays in the worker's session unless
/// it calls `setsid`): what a sweep must keep besides the re-adopted workers themselves. A process without a link (see
/// [`links`]) is not kept.
pub fn family(links: &[Link], roots: &BTreeSet<i32>) -> BTreeSet<i32> {
    let mut kept = roots.clone();
    loop {
        let before = kept.len();
        for l in links {
            if kept.contains(&l.ppid) || roots.contains(&l.pgid) || roots.contains(&l.sid) {
                kept.insert(l.pid);
            }
        }
        if kept.len() == before {
            return kept;
        }
    }
}

/// (ppid, pgid, sid) from a `/proc/PID/stat` line (the command name may hold spaces and `)`).
fn parse_stat(stat: &str) -> Option<(i32, i32, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let _state = fields.next()?;
    let mut next = || fields.next()?.parse().ok();
    Some((next()?, next()?, next()?))
}

/// What a sweep keeps, given the cgroup's processes of a pass (see [`sweep`]).
pub type Keep<'a> = dyn Fn(&BTreeSet<i32>) -> BTreeSet<i32> + 'a;

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// The processes SIGKILLed.
    pub killed: BTreeSet<i32>,
    /// Processes still in the cgroup (not kept) at the deadline.
    pub left: BTreeSet<i32>,
}

/// SIGKILLs every process in `cg` except this one and those `keep` returns, and waits (until
/// `within`) for them to be gone; processes that appear meanwhile (a child forked by one about
/// to die) are killed too. `keep` is asked again on every pass, with the cgroup's processes
/// of that pass: a kept worker's new children (a pre-forking server replacing one) are kept
/// too. Each kill goes through a pidfd opened and checked to be in `cg` (see the module
/// doc). Only under systemd: the caller decides.
pub fn sweep(cg: &Cgroup, keep: &Keep<'_>, within: Duration) -> io::Result<Swept> {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + within;
    let mut swept = Swept::default();
    let mut dying: Vec<OwnedFd> = Vec::new();
    loop {
        let procs = cg.procs()?;
        let kept = keep(&procs);
        let extra: BTreeSet<i32> = procs.into_iter().filter(|p| *p != me && !kept.contains(p)).collect();
        if extra.is_empty() {
            swept.left.clear();
            return Ok(swept);
        }
        // Open first, then check membership again: a pidfd refers to whoever held the pid
        // when it was opened, and that process still holds it as long as it lives. So if the
        // pid is still listed after the open, a signal through the pidfd reaches either that
        // member of the cgroup or a dead process (ESRCH), never a process outside.
        let opened: Vec<(i32, OwnedFd)> =
            extra.iter().filter_map(|&pid| crate::sys::pidfd_open(pid).ok().map(|fd| (pid, fd))).collect();
        let members = cg.procs()?;
        for (pid, pidfd) in opened {
            if !members.contains(&pid) {
                continue;
            }
            match crate::sys::pidfd_signal(&pidfd, libc::SIGKILL) {
                Ok(()) => {
                    if swept.killed.insert(pid) {
                        tracing::info!("killed process {pid}, left over in {}", cg.path);
                    }
                    dying.push(pidfd);
                }
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => tracing::warn!("cannot kill process {pid} in {}: {e}", cg.path),
            }
        }
        let now = Instant::now();
        if now >= deadline {
            swept.left = extra;
            return Ok(swept);
        }
        // Wait until every pidfd is readable (the process exited), bounded by the deadline and
        // by a short step, then look at the cgroup again (new processes, reaping).
        wait_exited(&mut dying, (deadline - now).min(Duration::from_millis(100)));
        if dying.is_empty() {
            // All exited: give PID 1 a moment to reap them out of cgroup.procs.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Polls `pidfds` until all are readable or `within` passed; drops the readable ones.
fn wait_exited(pidfds: &mut Vec<OwnedFd>, within: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let end = Instant::now() + within;
    while !pidfds.is_empty() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> =
                pidfds.iter().map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN)).collect();
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            if poll(&mut fds, PollTimeout::from(ms)).is_err() {
                return;
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        let mut i = 0;
        pidfds.retain(|_| {
            let keep = !ready[i];
            i += 1;
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/system-herdsman.slice/herdsman@web.service\n0::/system.slice/system-herdsman.slice/herdsman@web.service\n";

    #[test]
    fn the_lines_of_proc_cgroup() {
        assert_eq!(
            parse("0::/user.slice/a.scope\n", Hierarchy::Unified).as_deref(),
            Some("/user.slice/a.scope")
        );
        assert_eq!(parse("0::/user.slice/a.scope\n", Hierarchy::NamedSystemd), None);
        assert_eq!(
            parse(HYBRID, Hierarchy::NamedSystemd).as_deref(),
            Some("/system.slice/system-herdsman.slice/herdsman@web.service")
        );
        assert_eq!(parse("4:cpu,cpuacct:/\n", Hierarchy::Unified), None);
        assert_eq!(parse("3:cpu,name=systemd:/a\n", Hierarchy::NamedSystemd).as_deref(), Some("/a"));
        assert_eq!(parse("garbage\n0::relative\n", Hierarchy::Unified), None);
        // A path may contain ':' (only the first two separate fields).
        assert_eq!(parse("0::/a:b\n", Hierarchy::Unified).as_deref(), Some("/a:b"));
    }

    fn tree(layout: &str) -> crate::scratch::Scratch {
        let s = crate::scratch::Scratch::new(&format!("cgroup-{layout}"));
        let unit = "system.slice/system-herdsman.slice/herdsman@web.service";
        match layout {
            "unified" => {
                s.file("cgroup.controllers", "cpu");
                std::fs::create_dir_all(s.path().join(unit)).unwrap();
            }
            "hybrid" => {
                std::fs::create_dir_all(s.path().join("systemd").join(unit)).unwrap();
                std::fs::create_dir_all(s.path().join("unified").join(unit)).unwrap();
                std::fs::write(s.path().join("unified/cgroup.controllers"), "").unwrap();
            }
            _ => {
                std::fs::create_dir_all(s.path().join("unified").join(unit)).unwrap();
                std::fs::write(s.path().join("unified/cgroup.controllers"), "").unwrap();
            }
        }
        s
    }

    #[test]
    fn the_directory_of_each_layout() {
        let unit = "/system.slice/system-herdsman.slice/herdsman@web.service";
        let v2 = tree("unified");
        let cg = locate(&format!("0::{unit}\n"), v2.path()).unwrap();
        assert_eq!((cg.hierarchy, cg.dir.clone()), (Hierarchy::Unified, v2.path().join(&unit[1..])));
        assert_eq!(cg.leaf(), "herdsman@web.service");
        let hy = tree("hybrid");
        let cg = locate(HYBRID, hy.path()).unwrap();
        assert_eq!(
            (cg.hierarchy, cg.dir.clone()),
            (Hierarchy::NamedSystemd, hy.path().join("systemd").join(&unit[1..]))
        );
        let only_unified = tree("unified-only");
        let cg = locate(&format!("0::{unit}\n"), only_unified.path()).unwrap();
        assert_eq!(cg.dir, only_unified.path().join("unified").join(&unit[1..]));
        assert!(locate("0::/elsewhere\n", v2.path()).is_none(), "no such directory");
    }

    #[test]
    fn procs_include_child_cgroups_and_a_removed_child_is_empty() {
        let v2 = tree("unified");
        let cg = locate("0::/system.slice/system-herdsman.slice/herdsman@web.service\n", v2.path()).unwrap();
        std::fs::write(cg.dir.join("cgroup.procs"), "10\n12\n").unwrap();
        std::fs::create_dir_all(cg.dir.join("sub")).unwrap();
        std::fs::write(cg.dir.join("sub/cgroup.procs"), "11\n").unwrap();
        std::fs::create_dir_all(cg.dir.join("gone")).unwrap();
        assert_eq!(cg.procs().unwrap(), BTreeSet::from([10, 11, 12]));
    }

    #[test]
    fn a_workers_children_are_its_family() {
        assert_eq!(parse_stat("12 (a b) c) S 7 12 13 0 -1"), Some((7, 12, 13)));
        assert_eq!(parse_stat("garbage"), None);
        // A "worker" (a shell) with a child and a grandchild; an unrelated process.
        let worker =
            std::process::Command::new("sh").args(["-c", "sh -c 'sleep 60 & wait' & wait"]).spawn().unwrap();
        let other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let w = worker.id() as i32;
        let children = |pid: i32| -> Vec<i32> {
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let (child, grandchild) = loop {
            if let Some(&c) = children(w).first() {
                if let Some(&g) = children(c).first() {
                    break (c, g);
                }
            }
            assert!(Instant::now() < deadline, "the shells did not start their children");
            std::thread::sleep(Duration::from_millis(10));
        };
        let procs = BTreeSet::from([w, child, grandchild, other.id() as i32, 999_999_999]);
        assert_eq!(family(&links(&procs, &[]), &BTreeSet::from([w])), BTreeSet::from([w, child, grandchild]));
        for mut c in [worker, other] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(grandchild), nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGKILL);
    }

    fn link(pid: i32, ppid: i32, pgid: i32, sid: i32) -> Link {
        Link { pid, ppid, pgid, sid }
    }

    #[test]
    fn a_workers_group_session_and_descendants_are_kept_and_nothing_else() {
        // Worker 100 (a group leader that also called setsid). 101: its child; 102: 101's child in a group
        // of its own; 103: reparented to PID 1 but in the worker's group; 104: a daemon that
        // double-forked out of the group but is still in the worker's session; 105: a
        // leftover of a dead worker (its own session, parent 1); 106: 105's child.
        let links = [
            link(100, 1, 100, 100),
            link(101, 100, 100, 100),
            link(102, 101, 102, 100),
            link(103, 1, 100, 100),
            link(104, 1, 104, 100),
            link(105, 1, 105, 105),
            link(106, 105, 105, 105),
        ];
        assert_eq!(family(&links, &BTreeSet::from([100])), BTreeSet::from([100, 101, 102, 103, 104]));
        assert_eq!(family(&links, &BTreeSet::new()), BTreeSet::new());
        // Order does not matter (a child listed before its parent).
        let mut reversed = links;
        reversed.reverse();
        assert_eq!(family(&reversed, &BTreeSet::from([100])), family(&links, &BTreeSet::from([100])));
    }

    #[test]
    fn a_sweep_asks_what_to_keep_on_every_pass() {
        // A pre-forking worker's new child appears in the cgroup while the sweep runs (added
        // to the listing during the first pass): it is kept, the leftover dies.
        let s = crate::scratch::Scratch::new("cgroup-sweep-passes");
        let mut leftover = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let mut worker = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let (l, w, c) = (leftover.id() as i32, worker.id() as i32, child.id() as i32);
        let listing = s.path().join("cgroup.procs");
        std::fs::write(&listing, format!("{}\n{l}\n{w}\n", std::process::id())).unwrap();
        let cg = Cgroup { hierarchy: Hierarchy::Unified, path: "/test".into(), dir: s.path().to_path_buf() };
        let passes = std::cell::Cell::new(0);
        let keep = |procs: &BTreeSet<i32>| {
            passes.set(passes.get() + 1);
            // Pass 1: the child appears. Later: the leftover (killed in pass 1) is gone from the
            // listing, as once PID 1 reaped it, so the sweep ends without waiting its deadline.
            let listed = if passes.get() == 1 { format!("{l}\n{w}\n{c}") } else { format!("{w}\n{c}") };
            std::fs::write(&listing, format!("{}\n{listed}\n", std::process::id())).unwrap();
            // The worker's family: the worker and, once listed, its child.
            procs.intersection(&BTreeSet::from([w, c])).copied().collect()
        };
        let swept = sweep(&cg, &keep, Duration::from_secs(30)).unwrap();
        assert_eq!(swept.killed, BTreeSet::from([l]));
        assert!(swept.left.is_empty());
        assert!(passes.get() >= 2, "asked once only");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(leftover.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(child.try_wait().unwrap().is_none(), "the worker's new child lives");
        assert!(worker.try_wait().unwrap().is_none(), "the worker lives");
        for mut p in [worker, child] {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    #[test]
    fn a_sweep_kills_only_what_is_in_the_cgroup_and_not_kept() {
        // A fake cgroup directory listing us, a child of ours, a kept child, and a pid that
        // does not exist; a third child of ours is not listed: it must live.
        let s = crate::scratch::Scratch::new("cgroup-sweep");
        let mut doomed = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let mut kept = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let mut outside = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let (d, k) = (doomed.id() as i32, kept.id() as i32);
        std::fs::write(
            s.path().join("cgroup.procs"),
            format!("{}\n{d}\n{k}\n999999999\n", std::process::id()),
        )
        .unwrap();
        let cg = Cgroup { hierarchy: Hierarchy::Unified, path: "/test".into(), dir: s.path().to_path_buf() };
        let swept = sweep(&cg, &|_| BTreeSet::from([k]), Duration::from_millis(300)).unwrap();
        assert_eq!(swept.killed, BTreeSet::from([d]));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(doomed.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(kept.try_wait().unwrap().is_none(), "the kept process lives");
        assert!(outside.try_wait().unwrap().is_none(), "a process outside the cgroup lives");
        for mut c in [kept, outside] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
