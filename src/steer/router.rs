//! The round-robin router (`steer`, eBPF). A hash spreads connections evenly only on average: at
//! any moment one worker's queue holds more than its share while another's may be empty, and a
//! keep-alive connection stays where its hash put it. On a CPU-bound endpoint
//! (docs/bench-queues.md, `bench/routing.sh`) taking turns gave about 7 % more new-connection
//! throughput and a 22–27 % lower keep-alive p99 than the hash. Classic BPF has no state, so this
//! part is an eBPF `SK_REUSEPORT` program ([`super::ebpf::round_robin_program`], 36 instructions)
//! over three maps per pool: `socks` (a `REUSEPORT_SOCKARRAY`: key = member index, value = the
//! member; every member is put in once, when it is created), `ring` (two halves of receiving member
//! indices) and `turn` (`{counter, active}`, `active` = half base << 16 | count). The program adds
//! 1 to the counter atomically, picks `ring[base + counter % count]` and selects that member. A
//! state change writes the *inactive* half, then `active` in one store, so a SYN never sees a
//! half-written list. The program is attached once; later changes only write the maps. It needs
//! `CAP_BPF` (or root) and the `bpf` system call; if anything is refused, steering stays on the
//! classic program (which is attached first, and stays the bridge while the eBPF one is built),
//! herdsman says so once, and `status --json` shows `"routing": "hash"`. A kernel socket can be in
//! one `SOCKARRAY` at a time: after a restart the previous program's maps are freed by the kernel
//! shortly after the classic bridge replaced it, so putting a member in the new map is retried for
//! up to 2 s. An in-place upgrade hands the program and its maps over with the sockets
//! ([`RouterState`]).
//!
//! Capabilities. `CAP_BPF` is needed to create the maps and load the program, not to write a map
//! through a descriptor one holds (Linux 6.5 and later; before, with
//! `kernel.unprivileged_bpf_disabled` set, every `bpf()` call checks it) nor to attach a loaded
//! program to a socket. So once the routers are attached, [`super::Steering::give_up_capabilities`]
//! takes it (with `CAP_PERFMON` and `CAP_SETPCAP`) out of every set of the supervisor, the bounding
//! set included, after checking that a harmless map write still works without it. steer's earlier
//! default, the shortest accept queue, read queue lengths from kernel memory (`CAP_PERFMON`, a BTF
//! parser) and was removed in issue 22 for a gain no benchmark separated from the noise
//! (docs/bench-queues.md).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

use super::ebpf::round_robin_program;
use super::{Member, Pool};

/// Members per pool the eBPF router can hold: every worker twice (a roll-out of all at once)
/// plus systemd's spare sockets. Map memory is reserved up front: 8 + 2 × 4 bytes per entry.
pub(super) const RR_CAPACITY: u32 = 2 * crate::config::values::MAX_WORKERS as u32 + 512;
/// `BPF_MAP_TYPE_ARRAY`, `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` (linux/bpf.h).
pub(super) const MAP_ARRAY: u32 = 2;
const MAP_REUSEPORT_SOCKARRAY: u32 = 20;

/// One pool's eBPF router: its maps and program (see the module doc).
#[derive(Debug)]
pub(super) struct Router {
    socks: sys::BpfMap,
    ring: sys::BpfMap,
    turn: sys::BpfMap,
    prog: OwnedFd,
    /// Members `0..inserted` are in `socks`.
    inserted: usize,
    /// The half of `ring` the program reads (0 or 1); `None` before the first update.
    active: Option<u32>,
    /// What the active half holds, to skip writes that change nothing.
    current: Vec<u32>,
}

impl Router {
    /// Creates the maps and loads the program; [`Router::update`] attaches it.
    pub(super) fn new(pool: &Pool) -> io::Result<Router> {
        let socks = sys::BpfMap::create(MAP_REUSEPORT_SOCKARRAY, 8, RR_CAPACITY)
            .map_err(|e| io::Error::new(e.kind(), format!("creating a REUSEPORT_SOCKARRAY map: {e}")))?;
        let ring = sys::BpfMap::create(MAP_ARRAY, 4, 2 * RR_CAPACITY)?;
        let turn = sys::BpfMap::create(MAP_ARRAY, 8, 1)?;
        let insns =
            round_robin_program(turn.raw_fd(), ring.raw_fd(), socks.raw_fd()).map_err(io::Error::other)?;
        let prog = sys::bpf_load_reuseport_prog(&insns, c"MIT OR Apache-2.0").map_err(|e| {
            // EINVAL: the verifier refused it: a kernel before 5.12 (no atomic fetch-add).
            let hint = if e.kind() == io::ErrorKind::InvalidInput {
                "; this kernel is too old (needs Linux 5.12)"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("loading the SK_REUSEPORT program: {e}{hint}"))
        })?;
        let mut rr = Router { socks, ring, turn, prog, inserted: 0, active: None, current: Vec::new() };
        // A member may still be in the map of the program a previous herdsman attached; the
        // kernel frees that map shortly after the classic bridge replaced the program.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match rr.insert(&pool.members) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other.map(|()| rr),
            }
        }
    }

    /// For an in-place upgrade: the descriptors and what the maps hold.
    pub(super) fn export(&self, ex: &mut crate::handoff::Exporter) -> io::Result<RouterState> {
        Ok(RouterState {
            socks: ex.fd(self.socks.fd())?,
            ring: ex.fd(self.ring.fd())?,
            turn: ex.fd(self.turn.fd())?,
            prog: ex.fd(&self.prog)?,
            inserted: self.inserted,
            active: self.active,
            current: self.current.clone(),
        })
    }

    /// The router a previous image handed over: same maps, same attached program.
    pub(super) fn adopt(st: RouterState, fds: &mut sys::HandedOver) -> io::Result<Router> {
        Ok(Router {
            socks: sys::BpfMap::adopt(fds.take(st.socks)?, 8),
            ring: sys::BpfMap::adopt(fds.take(st.ring)?, 4),
            turn: sys::BpfMap::adopt(fds.take(st.turn)?, 8),
            prog: fds.take(st.prog)?,
            inserted: st.inserted,
            active: st.active,
            current: st.current,
        })
    }

    /// A map write that changes nothing the program reads (the last entry of the inactive
    /// half of `ring`): whether this process may still write the maps.
    pub(super) fn probe(&self) -> io::Result<()> {
        let half = self.active.map_or(1, |h| 1 - h);
        self.ring.update(half * RR_CAPACITY + RR_CAPACITY - 1, &0u32.to_ne_bytes())
    }

    /// Puts members not yet in `socks` there (at their index).
    fn insert(&mut self, members: &[Member]) -> io::Result<()> {
        if members.len() > RR_CAPACITY as usize {
            return Err(io::Error::other(format!("more than {RR_CAPACITY} sockets on one address")));
        }
        while self.inserted < members.len() {
            let fd = members[self.inserted].fd.as_raw_fd() as u64;
            self.socks.update(self.inserted as u32, &fd.to_ne_bytes())?;
            self.inserted += 1;
        }
        Ok(())
    }

    /// Makes the program pick among the receiving members (member 0, the parking one, when
    /// none is): writes the inactive half, then switches to it; attaches the program the
    /// first time.
    pub(super) fn update(&mut self, members: &[Member], receiving: &[(u32, usize)]) -> io::Result<()> {
        self.insert(members)?;
        let mut list: Vec<u32> = receiving.iter().map(|(i, _)| *i).collect();
        if list.is_empty() {
            list.push(0);
        }
        if self.active.is_some() && list == self.current {
            return Ok(());
        }
        let half = self.active.map_or(0, |h| 1 - h);
        let (entries, turn) = layout(half, &list);
        for (key, index) in entries {
            self.ring.update(key, &index.to_ne_bytes())?;
        }
        self.turn.update(0, &turn)?;
        if self.active.is_none() {
            sys::attach_reuseport_ebpf(&members[0].fd, &self.prog)?;
        }
        self.active = Some(half);
        self.current = list;
        Ok(())
    }
}

/// What makes the program pick among `list` from ring half `half`: the `ring` entries (key,
/// member index) and the value of `turn[0]`, `{counter: u32, active: u32}` with `active` =
/// the half's base << 16 | its length (writing it restarts the counter at 0).
pub(super) fn layout(half: u32, list: &[u32]) -> (Vec<(u32, u32)>, [u8; 8]) {
    let base = half * RR_CAPACITY;
    let entries = list.iter().enumerate().map(|(j, index)| (base + j as u32, *index)).collect();
    let active = (base << 16) | list.len() as u32;
    let mut turn = [0u8; 8];
    turn[4..].copy_from_slice(&active.to_ne_bytes());
    (entries, turn)
}

/// A pool's eBPF router in an upgrade's state: descriptors of its maps and program.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RouterState {
    pub socks: RawFd,
    pub ring: RawFd,
    pub turn: RawFd,
    pub prog: RawFd,
    pub inserted: usize,
    pub active: Option<u32>,
    pub current: Vec<u32>,
}
