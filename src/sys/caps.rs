//! Capabilities: giving up what loading the eBPF router needed (`CAP_BPF`, `CAP_PERFMON`, and
//! `CAP_SETPCAP` to take them out of the bounding set) once it is attached, per thread. nix
//! has no `capget`/`capset` or `PR_CAPBSET_DROP`, so these are by hand.

use std::ffi::c_int;
use std::io;

/// `CAP_BPF`, `CAP_PERFMON` (linux/capability.h, Linux 5.8).
pub(super) const CAP_BPF: c_int = 39;
pub(super) const CAP_PERFMON: c_int = 38;
/// `CAP_SETPCAP`: dropping from the bounding set needs it.
pub(super) const CAP_SETPCAP: c_int = 8;

/// What [`drop_steering_capabilities`] did.
#[derive(Debug)]
pub enum CapsDropped {
    /// No eBPF router: nothing was loaded, nothing to give up (see the caller).
    NoRouter,
    /// Neither `CAP_BPF` nor `CAP_PERFMON` was permitted.
    NotHeld,
    /// Gone from every set of the calling thread, bounding set included.
    Dropped,
    /// Kept: without `CAP_BPF` the probe failed with this error (Linux before 6.5 with
    /// `kernel.unprivileged_bpf_disabled` set checks `CAP_BPF` on every `bpf()` call).
    Kept(io::Error),
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets (`capget`).
fn caps_get() -> io::Result<[CapData; 2]> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and room for its two data words; the kernel writes only them.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, data.as_mut_ptr()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(data) }
}

/// Sets the calling thread's capability sets (`capset`; only ever lowers them here).
fn caps_set(data: &[CapData; 2]) -> io::Result<()> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: a version-3 header and its two data words, which the kernel only reads.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `data` without capability `cap`: in the effective set only, or in all three.
fn without(mut data: [CapData; 2], cap: c_int, effective_only: bool) -> [CapData; 2] {
    let word = &mut data[cap as usize / 32];
    let keep = !(1u32 << (cap as u32 % 32));
    word.effective &= keep;
    if !effective_only {
        word.permitted &= keep;
        word.inheritable &= keep;
    }
    data
}

fn has(data: &[CapData; 2], cap: c_int) -> bool {
    data[cap as usize / 32].permitted & (1u32 << (cap as u32 % 32)) != 0
}

/// The eBPF router is loaded and attached; `still_works` writes one of its maps harmlessly.
/// Lowers `CAP_BPF` and `CAP_PERFMON` from the effective set and runs `still_works`: if the
/// kernel refuses the write, they come back and the result is [`CapsDropped::Kept`]. Else
/// `CAP_BPF`, `CAP_PERFMON` and then `CAP_SETPCAP` leave the bounding set (so no later
/// `execve`, an in-place upgrade's included, gets them back, and workers inherit a bounding
/// set without them), and the permitted, effective and inheritable sets (which clears them
/// from the ambient set too).
///
/// Capabilities belong to a thread: this changes the calling thread's, and threads it starts
/// later inherit them. A thread started before keeps its own (herdsman's log thread lowers
/// them itself when it starts, [`lower_steering_capabilities`]).
pub fn drop_steering_capabilities(still_works: impl FnOnce() -> io::Result<()>) -> io::Result<CapsDropped> {
    let before = caps_get()?;
    if !has(&before, CAP_BPF) && !has(&before, CAP_PERFMON) {
        return Ok(CapsDropped::NotHeld);
    }
    caps_set(&without(without(before, CAP_BPF, true), CAP_PERFMON, true))?;
    if let Err(e) = still_works() {
        caps_set(&before)?;
        return Ok(CapsDropped::Kept(e));
    }
    lower_steering_capabilities()?;
    Ok(CapsDropped::Dropped)
}

/// Takes `CAP_BPF`, `CAP_PERFMON` and then `CAP_SETPCAP` out of the calling thread's bounding
/// set (so that an `execve` from this thread, even as root, cannot get them back), then out
/// of its permitted, effective and inheritable sets. Also for a thread that never needs them
/// (herdsman's log thread, started before the router is loaded).
pub fn lower_steering_capabilities() -> io::Result<()> {
    for cap in [CAP_BPF, CAP_PERFMON, CAP_SETPCAP] {
        // SAFETY: prctl with integer arguments only. EPERM without CAP_SETPCAP (then the
        // workers' bounding set drop fails the same way and only the other sets change).
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    lower_capabilities(&[CAP_BPF, CAP_PERFMON, CAP_SETPCAP])
}

/// Takes `caps` out of the calling thread's permitted, effective and inheritable sets.
pub fn lower_capabilities(caps: &[c_int]) -> io::Result<()> {
    let before = caps_get()?;
    let mut after = before;
    for &cap in caps {
        after = without(after, cap, false);
    }
    if after == before { Ok(()) } else { caps_set(&after) }
}
