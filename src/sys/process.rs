//! Processes and this process's resources: pidfds (open, signal), killing a child nobody
//! watches, the fd limit (raised for the supervisor, given back to workers), and giving
//! freed heap memory back.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Opens a pidfd for our child `pid`: readable when it exits, and safe to signal (no pid reuse).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` through a pidfd (cannot hit a recycled pid).
pub fn pidfd_signal(pidfd: &OwnedFd, sig: c_int) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Kills and reaps a child that is not supervised (yet): SIGKILL to its process group and to
/// itself, then `waitpid`. Only for our own unreaped child — until it is reaped its pid (and
/// so its process group id) cannot be reused, so the signal cannot hit anyone else. Used when
/// a worker was started but cannot be watched (no pidfd).
pub fn kill_and_reap_unwatched(pid: i32) {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::sys::wait::waitpid;
    let p = nix::unistd::Pid::from_raw(pid);
    // The worker made itself a group leader right after fork (setpgid), before exec.
    let _ = killpg(p, Signal::SIGKILL);
    let _ = kill(p, Signal::SIGKILL);
    while let Err(nix::errno::Errno::EINTR) = waitpid(p, None) {}
}

/// The soft `RLIMIT_NOFILE` herdsman was started with, once [`raise_fd_limit`] raised it
/// (`u64::MAX`: never raised). Workers get it back before exec.
static WORKER_NOFILE: AtomicU64 = AtomicU64::new(u64::MAX);

/// The workers' soft fd limit (for the upgrade state): `u64::MAX` when never raised.
pub fn worker_fd_limit() -> u64 {
    WORKER_NOFILE.load(Ordering::Relaxed)
}

/// Restores the workers' soft fd limit after an in-place upgrade (the new image finds the
/// limit already raised, so it cannot learn the original one itself).
pub fn set_worker_fd_limit(v: u64) {
    WORKER_NOFILE.store(v, Ordering::Relaxed);
}

/// Raises the soft fd limit to the hard one: each worker costs the supervisor three
/// descriptors (its pidfd and two output pipes), and the default soft limit (1024) is far
/// below what `MAX_WORKERS` needs. Workers are started with the original soft limit again.
/// Returns `(before, after)`.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        WORKER_NOFILE.store(soft, Ordering::Relaxed);
    }
    Ok((soft, hard))
}

/// For an [`ExecPlan`](super::ExecPlan), read before fork: where the child's close-one-by-one
/// fallback stops (the soft fd limit, at most 65536; 1024 if unknown), and the limit to give
/// the worker back if [`raise_fd_limit`] raised ours.
pub(super) fn worker_nofile() -> (c_int, Option<libc::rlimit>) {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let original = WORKER_NOFILE.load(Ordering::Relaxed);
            let restore = (original < soft).then_some(libc::rlimit { rlim_cur: original, rlim_max: hard });
            (soft.min(65536) as c_int, restore)
        }
        Err(_) => (1024, None),
    }
}

/// Returns the heap memory malloc holds free to the system (glibc's `malloc_trim`, every
/// arena, including free pages inside the heap). glibc otherwise keeps it: a freed buffer
/// larger than its mmap threshold raises that threshold, so the next big buffers come from
/// the heap, and a scrape's pages and parse data end up as free heap nobody gives back.
/// A no-op where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own arenas under their locks; it takes no
    // pointer from us and is safe to call from any thread at any time outside a fork child.
    unsafe {
        libc::malloc_trim(0);
    }
}

// --- Resident memory between bursts of work (issue 24, RSS) ---

/// Takes this process's page-table entries off the pages of its clean read-only file mappings
/// (herdsman's code and constants, the C library's, the dynamic loader's), then gives free heap
/// memory back ([`release_free_memory`]). Called when the start-up (argument parsing,
/// configuration, binding, logging set-up) is over and again whenever the supervisor goes quiet
/// after a burst of work (`app/memory.rs`): the kernel maps file pages in 64 KiB windows around
/// each fault ("fault-around"), so code that ran once would otherwise stay in the supervisor's
/// `VmRSS` for its whole life. The pages stay in the page cache, shared; code that runs again is
/// mapped again on first use (a minor fault, no disk read while it is cached).
/// Returns the bytes advised (for the debug log).
pub fn release_idle_pages() -> usize {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut advised = 0;
    for (start, len) in clean_file_mappings(&smaps) {
        // SAFETY: `start..start + len` is a whole mapping of this process, read from
        // /proc/self/smaps just now: a file mapping without write permission and without
        // private (anonymous, copy-on-write) pages, so every page in it is the file's own
        // content. MADV_DONTNEED only drops our page-table entries; the next access maps the
        // same file pages again, so no byte anyone reads changes. Mappings are not unmapped
        // meanwhile (nothing in herdsman unloads a library or unmaps a file), and the call
        // takes no pointer it dereferences in user space.
        let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if r == 0 {
            advised += len;
        }
    }
    advised += release_stack_below(&smaps);
    release_free_memory();
    advised
}

/// How much of the calling thread's stack below its current frame is kept resident: far more
/// than the frames `madvise` and its wrapper push.
const STACK_KEPT: usize = 16 * 1024;

/// Drops the calling thread's stack pages more than [`STACK_KEPT`] below its current frame:
/// what deeper calls of the start-up or a roll-out touched once (a page of stack stays
/// resident for the thread's life once touched). Returns the bytes advised.
#[inline(never)]
fn release_stack_below(smaps: &str) -> usize {
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let Some((start, _)) = mapping_containing(smaps, here) else {
        return 0;
    };
    let page = 4096;
    let Some(top) = here.checked_sub(STACK_KEPT).map(|t| t & !(page - 1)) else {
        return 0;
    };
    if top <= start {
        return 0;
    }
    // SAFETY: `start..top` lies in the mapping that holds this function's own local, that is
    // this thread's stack, and ends at least STACK_KEPT below this frame: below the stack
    // pointer of every frame now live on this thread (the stack grows down), where no one
    // keeps data (the System V red zone is 128 bytes; signal handlers run and return before
    // or after the system call, never across it). MADV_DONTNEED on private anonymous memory
    // makes those pages read as zeros when touched again: deeper calls later write their
    // frames before reading them. Nothing is unmapped, so the stack's limits do not change.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, top - start, libc::MADV_DONTNEED) };
    if r == 0 { top - start } else { 0 }
}

/// The mapping in `smaps` (or `/proc/PID/maps`) that contains address `addr`, as (start, end).
fn mapping_containing(smaps: &str, addr: usize) -> Option<(usize, usize)> {
    smaps.lines().find_map(|line| {
        let (a, b) = line.split_whitespace().next()?.split_once('-')?;
        let (start, end) = (usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?);
        (start <= addr && addr < end).then_some((start, end))
    })
}

/// The mappings in `smaps` (the text of `/proc/PID/smaps`) that [`release_idle_pages`] may
/// advise, as (start, length): readable, not writable, backed by a file (a path, not
/// `[vdso]`/`[stack]` or anonymous), and with `Anonymous: 0 kB` (no page was copied on write:
/// that excludes RELRO, whose pages hold the relocations).
fn clean_file_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut candidate = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            let perms = fields.next().unwrap_or("").as_bytes();
            let path = fields.nth(3).unwrap_or("");
            let clean_candidate = perms.len() == 4
                && perms[0] == b'r'
                && perms[1] == b'-'
                && path.starts_with('/')
                && end > start;
            candidate = clean_candidate.then_some((start, end - start));
        } else if first == "Anonymous:"
            && let Some(range) = candidate.take()
            && fields.next() == Some("0")
        {
            out.push(range);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unwatched_child_is_killed_with_its_group_and_reaped() {
        use std::os::unix::process::CommandExt;
        // A group leader with a grandchild in its group, like a worker that forked.
        let child = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let in_group = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                        let f: Vec<&str> =
                            s.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
                        f.get(2) == Some(&pid.to_string().as_str())
                    })
                })
                .count()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while in_group() < 2 {
            assert!(std::time::Instant::now() < deadline, "the grandchild never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        kill_and_reap_unwatched(pid);
        // Reaped: no zombie left, and waitpid has nothing more to give.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "child {pid} not reaped");
        assert!(nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).is_err());
        // The grandchild got the SIGKILL too (it is reparented and reaped by init or a
        // subreaper, so poll until it is gone).
        while in_group() > 0 {
            assert!(std::time::Instant::now() < deadline, "the worker's group survived");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::mem::forget(child);
    }

    #[test]
    fn clean_file_mappings_are_read_only_file_backed_and_never_copied_on_write() {
        let smaps = "\
55d0a0000000-55d0a0090000 r--p 00000000 fe:00 10 /usr/bin/herdsman
Anonymous:             0 kB
55d0a0090000-55d0a0300000 r-xp 00090000 fe:00 10 /usr/bin/herdsman
Size:               2504 kB
Anonymous:             0 kB
55d0a0300000-55d0a0313000 r--p 002f1000 fe:00 10 /usr/bin/herdsman
Anonymous:            68 kB
55d0a0313000-55d0a0315000 rw-p 00303000 fe:00 10 /usr/bin/herdsman
Anonymous:             8 kB
55d0a1000000-55d0a1080000 rw-p 00000000 00:00 0                          [heap]
Anonymous:           512 kB
7f0000000000-7f0000010000 r--s 00000000 00:05 7 /memfd:state (deleted)
Anonymous:             0 kB
7f0000020000-7f0000021000 ---p 00000000 fe:00 11 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000030000-7f0000032000 r-xp 00000000 00:00 0                          [vdso]
Anonymous:             0 kB
7f0000040000-7f0000041000 r--p 00000000 00:00 0
Anonymous:             0 kB
VmFlags: rd ex mr mw me
";
        assert_eq!(
            clean_file_mappings(smaps),
            vec![(0x55d0a0000000, 0x90000), (0x55d0a0090000, 0x270000), (0x7f0000000000, 0x10000)]
        );
    }

    #[test]
    fn the_mapping_containing_an_address_is_found_and_only_that_one() {
        let smaps = "\
55d0a0000000-55d0a0090000 r--p 00000000 fe:00 10 /usr/bin/herdsman
Anonymous:             0 kB
7ffd10000000-7ffd10021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
";
        assert_eq!(mapping_containing(smaps, 0x7ffd10020ff8), Some((0x7ffd10000000, 0x7ffd10021000)));
        assert_eq!(mapping_containing(smaps, 0x7ffd10021000), None);
        assert_eq!(mapping_containing(smaps, 0x55d0a0000000), Some((0x55d0a0000000, 0x55d0a0090000)));
    }

    #[test]
    fn releasing_the_stack_below_the_frame_keeps_every_frame_intact() {
        // Deep frames touch stack pages, then return; the release drops those below this frame.
        fn deep(n: u32) -> u64 {
            let buf = std::hint::black_box([n as u8; 4096]);
            if n == 0 { u64::from(buf[0]) } else { deep(n - 1) + u64::from(buf[4095]) }
        }
        // KiB resident in the mapping that holds `addr` (this thread's stack).
        fn resident_kb(addr: usize) -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                if let Some((a, b)) = line.split_whitespace().next().and_then(|r| r.split_once('-'))
                    && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= addr && addr < b;
                } else if inside && line.starts_with("Rss:") {
                    return line.split_whitespace().nth(1).unwrap().parse().unwrap();
                }
            }
            panic!("no mapping holds {addr:#x}")
        }
        let live = std::hint::black_box([7u8; 1024]);
        let here = &live as *const u8 as usize;
        assert_eq!(deep(64), (1..=64).sum::<u64>());
        let before = resident_kb(here);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        assert!(release_stack_below(&smaps) > 0);
        let after = resident_kb(here);
        assert!(after + 128 < before, "resident stack {before} kB -> {after} kB");
        // This frame's data is intact, and deeper calls still work on zeroed pages.
        assert!(live.iter().all(|&b| b == 7));
        assert_eq!(deep(64), (1..=64).sum::<u64>());
    }

    #[test]
    fn releasing_idle_pages_lowers_resident_code_and_keeps_it_runnable() {
        fn resident_code_kb() -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut sum = 0;
            let mut code = false;
            for line in smaps.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.first().is_some_and(|a| a.contains('-') && !a.ends_with(':')) && f.len() >= 2 {
                    code = f[1] == "r-xp" && f.get(5).is_some_and(|p| p.starts_with('/'));
                } else if code && f.first() == Some(&"Rss:") {
                    sum += f[1].parse::<u64>().unwrap();
                }
            }
            sum
        }
        let before = resident_code_kb();
        assert!(release_idle_pages() > 0);
        let after = resident_code_kb();
        assert!(after < before, "resident code {before} kB -> {after} kB");
        // Everything still runs: code, constants and relocations are intact.
        let text = format!("{:?}", std::collections::BTreeMap::from([(1, "one"), (2, "two")]));
        assert_eq!(text, r#"{1: "one", 2: "two"}"#);
    }
}
