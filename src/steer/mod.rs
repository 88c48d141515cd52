//! Steered sockets (`--balance steer` / `sticky`): the kernel routes each new connection to a
//! worker that is ready and not draining; herdsman only rewrites the routing program.
//!
//! Mechanism. For every TCP address there is a [`Pool`] of listening sockets, all bound to the
//! same address with `SO_REUSEPORT`, so they form one reuseport *group*. Each worker gets its
//! own member at fd 3 (the number the shared socket would have had). A classic BPF program
//! attached to the group (`SO_ATTACH_REUSEPORT_CBPF`, unprivileged) returns, for each SYN, the
//! *index* of the member that gets the connection. Indices are the order in which members
//! called `listen()`; herdsman never closes a member while it runs, so its own list is the
//! kernel's order. Every state change (a worker becomes ready, starts draining, is killed,
//! exits) rebuilds the program from the set of *receiving* members and attaches it again,
//! which replaces the group's program atomically.
//!
//! * `steer`: the receiving members in turn (**round robin**, an eBPF program, below); where
//!   the kernel refuses eBPF (no `CAP_BPF`, a seccomp filter) or with
//!   `HERDSMAN_STEER_ROUTING=hash`, the classic program, key = a hash of the client's source
//!   port and address, `key % n`.
//! * `sticky`: key = the client's IPv4 address (IPv6: its /64); `key % slots` picks the slot,
//!   which maps to that slot's receiving member; a slot with none falls back to
//!   `key % n` over the receiving members, so its clients come back when it is ready again.
//! * Nothing receiving: every connection goes to member 0, the *parking* member (systemd's
//!   first socket, or the one herdsman bound first). It queues there until a worker that holds
//!   member 0 accepts; free members with waiting connections are handed out first.
//!
//! Stopping a worker never resets a queued connection: its member stops receiving first, then
//! the worker is left running (`draining`) until its own accept queue is empty (read with
//! `TCP_INFO` on herdsman's copy of the socket) and a short grace has passed for handshakes
//! that were already on their way, and only then gets its stop signal. herdsman's copy keeps
//! the member listening after the worker closed its fd, so a late connection waits for the next
//! worker that gets the member instead of being reset.
//!
//! Round robin (`steer`, eBPF). A hash spreads connections evenly only on average: at any
//! moment one worker's queue holds more than its share while another's may be empty, and a
//! keep-alive connection stays where its hash put it. On a CPU-bound endpoint
//! (docs/bench-queues.md, `bench/routing.sh`) taking turns gave about 7 % more new-connection
//! throughput and a 22–27 % lower keep-alive p99 than the hash. Classic BPF has no state, so
//! this part is an eBPF `SK_REUSEPORT` program ([`round_robin_program`], 36 instructions)
//! over three maps per pool: `socks` (a `REUSEPORT_SOCKARRAY`: key = member index, value = the
//! member; every member is put in once, when it is created), `ring` (two halves of receiving
//! member indices) and `turn` (`{counter, active}`, `active` = half base << 16 | count). The
//! program adds 1 to the counter atomically, picks `ring[base + counter % count]` and
//! selects that member. A state change writes the *inactive* half, then `active` in one store,
//! so a SYN never sees a half-written list. The program is attached once; later changes only
//! write the maps. It needs `CAP_BPF` (or root) and the `bpf` system call; if anything is
//! refused, steering stays on the classic program (which is attached first, and stays the
//! bridge while the eBPF one is built), herdsman says so once, and `status --json` shows
//! `"routing": "hash"`. A kernel socket can be in one `SOCKARRAY` at a time: after a restart
//! the previous program's maps are freed by the kernel shortly after the classic bridge
//! replaced it, so putting a member in the new map is retried for up to 2 s. An in-place
//! upgrade hands the program and its maps over with the sockets ([`RouterState`]).
//!
//! Capabilities. `CAP_BPF` is needed to create the maps and load the program, not to write a
//! map through a descriptor one holds (Linux 6.5 and later; before, with
//! `kernel.unprivileged_bpf_disabled` set, every `bpf()` call checks it) nor to attach a
//! loaded program to a socket. So once the routers are attached,
//! [`Steering::give_up_capabilities`] takes it (with `CAP_PERFMON` and `CAP_SETPCAP`) out of
//! every set of the supervisor, the bounding set included, after checking that a harmless map
//! write still works without it. steer's earlier default, the shortest accept queue, read
//! queue lengths from kernel memory (`CAP_PERFMON`, a BTF parser) and was removed in issue 22
//! for a gain no benchmark separated from the noise (docs/bench-queues.md).
//!
//! Why hand-written instructions: the programs are a handful of instructions built here and
//! unit-tested (the classic ones with a small interpreter, the eBPF one by the kernel's
//! verifier and a real group); `aya`/`libbpf-rs` would bring a BPF toolchain or a C
//! library for one program of 36 instructions, and no crate builds classic reuseport
//! programs.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, sockopt,
};

use crate::config::Balance;
use crate::sys::{self, BpfInsn, EbpfInsn};

/// Like systemd's default `Backlog=` on Debian 12.
const BACKLOG: i32 = 4096;
/// `SKF_NET_OFF`: loads relative to the network (IP) header.
const NET: u32 = libc::SKF_NET_OFF as u32;

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("--balance {mode}: {addr} cannot be steered ({why}); use a TCP address or balance = \"shared\"")]
    NotTcp { mode: Balance, addr: String, why: &'static str },
    #[error(
        "--balance {mode}: the inherited socket for {addr} has no SO_REUSEPORT; add ReusePort=yes to the socket unit (herdsman init --balance {mode} writes it)"
    )]
    NoReusePort { mode: Balance, addr: String },
    #[error(
        "--balance {mode}: the kernel refused the steering program on {addr} ({err}); use balance = \"shared\" on this system"
    )]
    Attach { mode: Balance, addr: String, err: io::Error },
    #[error("cannot open another listening socket for {addr}: {err}")]
    Open { addr: String, err: io::Error },
}

/// One listening socket of a pool.
#[derive(Debug)]
struct Member {
    fd: OwnedFd,
    /// The worker holding it (pid), if any.
    holder: Option<i32>,
    /// That worker's slot (for `sticky`).
    slot: usize,
    /// Whether new connections may reach it.
    receiving: bool,
}

/// The members of one address's reuseport group, in the kernel's index order.
#[derive(Debug)]
struct Pool {
    addr: String,
    /// `LISTEN_FDNAMES` entry (the first socket's name).
    name: String,
    local: SockaddrStorage,
    family: AddressFamily,
    members: Vec<Member>,
    /// The eBPF router (`steer`, when the kernel allows it).
    router: Option<Router>,
}

/// Every steered address, and the routing mode.
#[derive(Debug)]
pub struct Steering {
    mode: Balance,
    pools: Vec<Pool>,
    /// The number of slots (`sticky` hashes over them).
    slots: usize,
    /// fds at or below this are the workers' target range: keep ours above it.
    floor: RawFd,
}

/// How new connections are spread over the receiving members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// `steer` with the eBPF program: take turns.
    RoundRobin,
    /// `steer` with the classic program: a hash of the client's port and address.
    Hash,
    /// `sticky`: the client's address picks the slot.
    ClientAddress,
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Routing::RoundRobin => "round-robin",
            Routing::Hash => "hash",
            Routing::ClientAddress => "client-address",
        })
    }
}

impl Steering {
    /// Takes the listening sockets (one per address, or several per address under systemd)
    /// and checks that they can be steered. `sockets` are (address, name, fd) in fd order.
    pub fn new(
        mode: Balance,
        sockets: Vec<(String, String, OwnedFd)>,
        slots: usize,
        floor: RawFd,
        want: Routing,
    ) -> Result<Self, SteerError> {
        let mut pools: Vec<Pool> = Vec::new();
        for (addr, name, fd) in sockets {
            let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd())
                .map_err(|_| SteerError::NotTcp { mode, addr: addr.clone(), why: "getsockname failed" })?;
            let family = match local.family() {
                Some(f @ (AddressFamily::Inet | AddressFamily::Inet6)) => f,
                _ => return Err(SteerError::NotTcp { mode, addr, why: "not a TCP socket" }),
            };
            if !matches!(socket::getsockopt(&fd, sockopt::SockType), Ok(SockType::Stream)) {
                return Err(SteerError::NotTcp { mode, addr, why: "not a stream socket" });
            }
            if !socket::getsockopt(&fd, sockopt::ReusePort).unwrap_or(false) {
                return Err(SteerError::NoReusePort { mode, addr });
            }
            let member = Member { fd, holder: None, slot: 0, receiving: false };
            match pools.iter_mut().find(|p| p.local == local) {
                Some(p) => p.members.push(member),
                None => pools.push(Pool { addr, name, local, family, members: vec![member], router: None }),
            }
        }
        let mut steering = Steering { mode, pools, slots: slots.max(1), floor };
        steering.start(want)?;
        Ok(steering)
    }

    /// Attaches the classic program, then (for `steer` with `want` round robin) builds the
    /// eBPF router of every pool; if the kernel refuses it, steering stays on the classic
    /// hash, said once in the log.
    fn start(&mut self, want: Routing) -> Result<(), SteerError> {
        self.apply()?;
        if self.mode != Balance::Steer || want != Routing::RoundRobin {
            return Ok(());
        }
        let built: io::Result<Vec<Router>> = self.pools.iter().map(Router::new).collect();
        match built {
            Ok(routers) => {
                for (pool, router) in self.pools.iter_mut().zip(routers) {
                    pool.router = Some(router);
                }
                // Attaches the eBPF programs (replacing the classic ones) with the current set.
                self.apply()
            }
            Err(e) => {
                tracing::warn!(
                    "--balance steer: round robin needs eBPF, which the kernel refused ({e}); new connections are spread by a hash instead (give the service CAP_BPF and the bpf system call: herdsman init --balance steer writes them)"
                );
                Ok(())
            }
        }
    }

    /// Every program is loaded and attached: from here on steering only writes the maps,
    /// through descriptors herdsman holds (and an in-place upgrade hands them over), so the
    /// supervisor gives up `CAP_BPF`, `CAP_PERFMON` and `CAP_SETPCAP` (permitted, effective,
    /// inheritable and bounding sets, [`sys::drop_steering_capabilities`]) where the kernel
    /// lets a process without `CAP_BPF` write a map it holds: Linux 6.5 and later (and stable
    /// kernels that took the change), or any kernel with `kernel.unprivileged_bpf_disabled =
    /// 0`. Before, with unprivileged BPF disabled (Debian's default), every `bpf()` call needs
    /// `CAP_BPF`, so it keeps them (said once in the log; found by a probe, not the version). Call it from the main thread before any other thread that
    /// could hold them is started (capabilities are per thread; see the function).
    pub fn give_up_capabilities(&self) -> Result<sys::CapsDropped, io::Error> {
        let Some(router) = self.pools.iter().find_map(|p| p.router.as_ref()) else {
            return Ok(sys::CapsDropped::NoRouter);
        };
        let dropped = sys::drop_steering_capabilities(|| router.probe())?;
        if let sys::CapsDropped::Kept(e) = &dropped {
            tracing::info!(
                "--balance steer: keeping CAP_BPF: this kernel refuses map writes without it ({e}; Linux before 6.5 with kernel.unprivileged_bpf_disabled set)"
            );
        }
        Ok(dropped)
    }

    /// How new connections are spread (for status): the eBPF router's way only where every
    /// address has one.
    pub fn routing(&self) -> Routing {
        if self.mode == Balance::Sticky {
            return Routing::ClientAddress;
        }
        // Every pool's router is built (or handed over) at once.
        if self.pools.iter().all(|p| p.router.is_some()) { Routing::RoundRobin } else { Routing::Hash }
    }

    pub fn mode(&self) -> Balance {
        self.mode
    }

    /// The worker-facing addresses, one per pool (what `LISTEN_FDS` counts).
    pub fn addrs(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.addr.clone()).collect()
    }

    /// `LISTEN_FDNAMES` for workers: one name per address.
    pub fn names(&self) -> String {
        self.pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(":")
    }

    /// Sticky hashes over this many slots.
    pub fn set_slots(&mut self, slots: usize) -> Result<(), SteerError> {
        self.slots = slots.max(1);
        self.apply()
    }

    /// Picks (or opens) a free member in every pool for a new worker of `slot`; returns their
    /// fds, for fd 3, 4, ... Free members with queued connections go first, then member 0.
    pub fn reserve(&mut self, slot: usize) -> Result<Vec<usize>, SteerError> {
        let mut picked = Vec::with_capacity(self.pools.len());
        for pool in &mut self.pools {
            let free = pool
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.holder.is_none())
                .max_by_key(|(i, m)| (sys::tcp_listen_queue(&m.fd).map_or(0, |q| q.0), usize::MAX - i))
                .map(|(i, _)| i);
            let index = match free {
                Some(i) => i,
                None => {
                    let fd = open_member(pool, self.floor)
                        .map_err(|err| SteerError::Open { addr: pool.addr.clone(), err })?;
                    pool.members.push(Member { fd, holder: None, slot, receiving: false });
                    pool.members.len() - 1
                }
            };
            let m = &mut pool.members[index];
            m.holder = Some(0);
            m.slot = slot;
            picked.push(index);
        }
        Ok(picked)
    }

    /// The fds of reserved members, in pool order.
    pub fn fds(&self, picked: &[usize]) -> Vec<RawFd> {
        self.pools.iter().zip(picked).map(|(p, i)| p.members[*i].fd.as_raw_fd()).collect()
    }

    /// The sockets worker `pid` holds (for its bind filter after an in-place upgrade).
    pub fn fds_of(&self, pid: i32) -> Vec<RawFd> {
        self.pools
            .iter()
            .flat_map(|p| &p.members)
            .filter(|m| m.holder == Some(pid))
            .map(|m| m.fd.as_raw_fd())
            .collect()
    }

    /// The reserved members now belong to worker `pid`.
    pub fn bind(&mut self, picked: &[usize], pid: i32) {
        for (p, i) in self.pools.iter_mut().zip(picked) {
            p.members[*i].holder = Some(pid);
        }
    }

    /// The spawn failed: the reserved members are free again.
    pub fn unreserve(&mut self, picked: &[usize]) {
        for (p, i) in self.pools.iter_mut().zip(picked) {
            p.members[*i].holder = None;
        }
    }

    /// Lets new connections reach worker `pid` (or stops them). Rewrites the program when
    /// something changed.
    pub fn set_receiving(&mut self, pid: i32, receiving: bool) -> Result<(), SteerError> {
        let mut changed = false;
        for m in self.members_of(pid) {
            changed |= m.receiving != receiving;
            m.receiving = receiving;
        }
        if changed { self.apply() } else { Ok(()) }
    }

    /// Worker `pid` is gone: its members are free (and no longer receive).
    pub fn release(&mut self, pid: i32) -> Result<(), SteerError> {
        let was = self.is_receiving(pid);
        for m in self.members_of(pid) {
            m.holder = None;
            m.receiving = false;
        }
        if was { self.apply() } else { Ok(()) }
    }

    /// Whether `pid` holds a parking member (member 0 of a pool), where connections wait
    /// while no worker receives.
    pub fn holds_parking(&self, pid: i32) -> bool {
        self.pools.iter().any(|p| p.members[0].holder == Some(pid))
    }

    pub fn is_receiving(&self, pid: i32) -> bool {
        self.pools.iter().flat_map(|p| &p.members).any(|m| m.holder == Some(pid) && m.receiving)
    }

    /// Connections waiting in worker `pid`'s own accept queues.
    pub fn queued(&self, pid: i32) -> u32 {
        self.pools
            .iter()
            .flat_map(|p| &p.members)
            .filter(|m| m.holder == Some(pid))
            .map(|m| sys::tcp_listen_queue(&m.fd).map_or(0, |q| q.0))
            .sum()
    }

    fn members_of(&mut self, pid: i32) -> impl Iterator<Item = &mut Member> {
        self.pools.iter_mut().flat_map(|p| p.members.iter_mut()).filter(move |m| m.holder == Some(pid))
    }

    /// For an in-place upgrade: every member, with the number it will have in the new image.
    pub fn export(&self, ex: &mut crate::upgrade::Exporter) -> io::Result<SteeringState> {
        let mut pools = Vec::new();
        for p in &self.pools {
            let mut members = Vec::new();
            for m in &p.members {
                members.push(MemberState {
                    fd: ex.fd(&m.fd)?,
                    holder: m.holder,
                    slot: m.slot,
                    receiving: m.receiving,
                });
            }
            let router = p.router.as_ref().map(|r| r.export(ex)).transpose()?;
            pools.push(PoolState { addr: p.addr.clone(), name: p.name.clone(), members, router });
        }
        Ok(SteeringState { mode: self.mode, slots: self.slots, floor: self.floor, pools })
    }

    /// The pools a previous image handed over, in the same kernel order (no socket was
    /// closed). Their eBPF routers (program and maps, still attached) are handed over too and
    /// kept as they are, so the new image needs no `CAP_BPF` (the previous one may have given
    /// it up); from an image that had none (or an older one that did not hand them over),
    /// the routing program is built and attached again (`want` as for [`Steering::new`]: the
    /// environment is the one the first image started with).
    pub fn adopt(st: SteeringState, fds: &mut sys::HandedOver, want: Routing) -> io::Result<Steering> {
        let mut pools = Vec::new();
        let mut routers = Vec::new();
        for p in st.pools {
            routers.push(p.router.map(|r| Router::adopt(r, fds)).transpose()?);
            let mut members = Vec::new();
            for m in p.members {
                members.push(Member {
                    fd: fds.take(m.fd)?,
                    holder: m.holder,
                    slot: m.slot,
                    receiving: m.receiving,
                });
            }
            let first =
                members.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "empty pool"))?;
            let local: SockaddrStorage = socket::getsockname(first.fd.as_raw_fd())?;
            let family =
                local.family().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no family"))?;
            pools.push(Pool { addr: p.addr, name: p.name, local, family, members, router: None });
        }
        let mut steering = Steering { mode: st.mode, pools, slots: st.slots.max(1), floor: st.floor };
        let kept: Option<Vec<Router>> = routers.into_iter().collect();
        match kept {
            Some(kept) if st.mode == Balance::Steer && !kept.is_empty() => {
                for (pool, router) in steering.pools.iter_mut().zip(kept) {
                    pool.router = Some(router);
                }
                // Writes the maps with the adopted state; the program stays attached.
                steering.apply()
            }
            // Dropping a partial set closes those maps; the classic bridge replaces their program.
            _ => steering.start(want),
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(steering)
    }

    /// Attaches the current program to every pool (or, with the eBPF router, writes its maps).
    fn apply(&mut self) -> Result<(), SteerError> {
        for pool in &mut self.pools {
            // (member index, slot) of the members new connections may reach.
            let receiving: Vec<(u32, usize)> = pool
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.receiving)
                .map(|(i, m)| (i as u32, m.slot))
                .collect();
            if let Some(router) = &mut pool.router {
                match router.update(&pool.members, &receiving) {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(
                            "--balance steer: the eBPF router of {} failed ({e}); spreading new connections by a hash from now on",
                            pool.addr
                        );
                        pool.router = None;
                    }
                }
            }
            let prog = program(self.mode, &receiving, self.slots);
            sys::attach_reuseport_cbpf(&pool.members[0].fd, &prog).map_err(|err| SteerError::Attach {
                mode: self.mode,
                addr: pool.addr.clone(),
                err,
            })?;
        }
        Ok(())
    }
}

/// Members per pool the eBPF router can hold: every worker twice (a roll-out of all at once)
/// plus systemd's spare sockets. Map memory is reserved up front: 8 + 2 × 4 bytes per entry.
const RR_CAPACITY: u32 = 2 * crate::config::values::MAX_WORKERS as u32 + 512;
/// `BPF_MAP_TYPE_ARRAY`, `BPF_MAP_TYPE_REUSEPORT_SOCKARRAY` (linux/bpf.h).
const MAP_ARRAY: u32 = 2;
const MAP_REUSEPORT_SOCKARRAY: u32 = 20;

/// One pool's eBPF router: its maps and program (see the module doc).
#[derive(Debug)]
struct Router {
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
    fn new(pool: &Pool) -> io::Result<Router> {
        let socks = sys::BpfMap::create(MAP_REUSEPORT_SOCKARRAY, 8, RR_CAPACITY)
            .map_err(|e| io::Error::new(e.kind(), format!("creating a REUSEPORT_SOCKARRAY map: {e}")))?;
        let ring = sys::BpfMap::create(MAP_ARRAY, 4, 2 * RR_CAPACITY)?;
        let turn = sys::BpfMap::create(MAP_ARRAY, 8, 1)?;
        let insns = round_robin_program(turn.raw_fd(), ring.raw_fd(), socks.raw_fd());
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
    fn export(&self, ex: &mut crate::upgrade::Exporter) -> io::Result<RouterState> {
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
    fn adopt(st: RouterState, fds: &mut sys::HandedOver) -> io::Result<Router> {
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
    fn probe(&self) -> io::Result<()> {
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
    fn update(&mut self, members: &[Member], receiving: &[(u32, usize)]) -> io::Result<()> {
        self.insert(members)?;
        let mut list: Vec<u32> = receiving.iter().map(|(i, _)| *i).collect();
        if list.is_empty() {
            list.push(0);
        }
        if self.active.is_some() && list == self.current {
            return Ok(());
        }
        let half = self.active.map_or(0, |h| 1 - h);
        let base = half * RR_CAPACITY;
        for (j, index) in list.iter().enumerate() {
            self.ring.update(base + j as u32, &index.to_ne_bytes())?;
        }
        let active = (base << 16) | list.len() as u32;
        // `turn` is {counter: u32, active: u32}; writing it restarts the counter at 0.
        let mut turn = [0u8; 8];
        turn[4..].copy_from_slice(&active.to_ne_bytes());
        self.turn.update(0, &turn)?;
        if self.active.is_none() {
            sys::attach_reuseport_ebpf(&members[0].fd, &self.prog)?;
        }
        self.active = Some(half);
        self.current = list;
        Ok(())
    }
}

// eBPF encoding (linux/bpf_common.h, linux/bpf.h).
const E_LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
const E_LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const E_STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
const E_ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
const E_ATOMIC_W: u8 = 0xc3; // BPF_STX | BPF_ATOMIC | BPF_W
const E_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const E_MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const E_ADD_K: u8 = 0x07;
const E_ADD_X: u8 = 0x0f;
const E_AND_K: u8 = 0x57;
const E_RSH_K: u8 = 0x77;
const E_MOD_X: u8 = 0x9f;
const E_JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const E_CALL: u8 = 0x85;
const E_EXIT: u8 = 0x95;
/// `BPF_ADD | BPF_FETCH`: the old value comes back in the source register.
const FETCH_ADD: i32 = 0x01;
/// `BPF_PSEUDO_MAP_FD`: a 64-bit immediate that is a map's descriptor.
const PSEUDO_MAP_FD: u8 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_SELECT_REUSEPORT: i32 = 82;
/// `SK_PASS`: take the selected member (or, if none was selected, the kernel's hash).
const SK_PASS: i32 = 1;

fn e(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> EbpfInsn {
    EbpfInsn { code, regs: (src << 4) | dst, off, imm }
}

/// `dst = map` (two instruction slots).
fn e_map(dst: u8, map: RawFd) -> [EbpfInsn; 2] {
    [e(E_LD_IMM64, dst, PSEUDO_MAP_FD, 0, map), e(0, 0, 0, 0, 0)]
}

/// The program's start: `r6` = ctx, `r7` = the active half's base, `r8` =
/// this connection's turn (the counter before an atomic add of 1), `r9` = the number of
/// receiving members (never 0). Returns the positions of the jumps to `return SK_PASS`.
fn take_a_turn(p: &mut Vec<EbpfInsn>, turn: RawFd) -> Vec<usize> {
    // r6 = ctx; key 0 at fp-4; r0 = &turn[0].
    p.push(e(E_MOV_X, 6, 1, 0, 0));
    p.push(e(E_ST_W, 10, 0, -4, 0));
    p.extend(e_map(1, turn));
    p.push(e(E_MOV_X, 2, 10, 0, 0));
    p.push(e(E_ADD_K, 2, 0, 0, -4));
    p.push(e(E_CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
    let miss_1 = p.len();
    p.push(e(E_JEQ_K, 0, 0, 0, 0)); // if r0 == 0 goto pass
    // r7 = active; r8 = counter++ (atomic, the old value).
    p.push(e(E_LDX_W, 7, 0, 4, 0));
    p.push(e(E_MOV_K, 8, 0, 0, 1));
    p.push(e(E_ATOMIC_W, 0, 8, 0, FETCH_ADD));
    // r9 = count; if 0 goto pass; r7 = base.
    p.push(e(E_MOV_X, 9, 7, 0, 0));
    p.push(e(E_AND_K, 9, 0, 0, 0xffff));
    let miss_2 = p.len();
    p.push(e(E_JEQ_K, 9, 0, 0, 0));
    p.push(e(E_RSH_K, 7, 0, 0, 16));
    vec![miss_1, miss_2]
}

/// `r1` = the member at `ring[r7 + r8 % r9]`'s key, stored at fp-8; `r0` = its entry.
fn ring_entry(p: &mut Vec<EbpfInsn>, ring: RawFd) {
    p.push(e(E_MOV_X, 1, 8, 0, 0));
    p.push(e(E_MOD_X, 1, 9, 0, 0));
    p.push(e(E_ADD_X, 1, 7, 0, 0));
    p.push(e(E_STX_W, 10, 1, -8, 0));
    p.extend(e_map(1, ring));
    p.push(e(E_MOV_X, 2, 10, 0, 0));
    p.push(e(E_ADD_K, 2, 0, 0, -8));
    p.push(e(E_CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM));
}

/// `sk_select_reuseport(ctx, socks, &member at fp-12, 0)`, then `return SK_PASS` (at the
/// returned position).
fn select_and_pass(p: &mut Vec<EbpfInsn>, socks: RawFd) -> usize {
    p.push(e(E_MOV_X, 1, 6, 0, 0));
    p.extend(e_map(2, socks));
    p.push(e(E_MOV_X, 3, 10, 0, 0));
    p.push(e(E_ADD_K, 3, 0, 0, -12));
    p.push(e(E_MOV_K, 4, 0, 0, 0));
    p.push(e(E_CALL, 0, 0, 0, FN_SK_SELECT_REUSEPORT));
    let pass = p.len();
    p.push(e(E_MOV_K, 0, 0, 0, SK_PASS));
    p.push(e(E_EXIT, 0, 0, 0, 0));
    pass
}

/// The member at `ring[r7 + r8 % r9]` (the one whose turn it is) at fp-12; returns the
/// position of the jump taken if the ring has no such entry.
fn member_of_turn(p: &mut Vec<EbpfInsn>, ring: RawFd) -> usize {
    ring_entry(p, ring);
    let miss = p.len();
    p.push(e(E_JEQ_K, 0, 0, 0, 0));
    p.push(e(E_LDX_W, 1, 0, 0, 0));
    p.push(e(E_STX_W, 10, 1, -12, 0));
    miss
}

/// Points the jumps at `from` to `to`.
fn patch(p: &mut [EbpfInsn], from: &[usize], to: usize) {
    for &at in from {
        p[at].off = (to - at - 1) as i16;
    }
}

/// The round-robin `SK_REUSEPORT` program over `turn`, `ring` and `socks` (module doc).
/// Every path ends in `SK_PASS`: a missing entry falls back to the kernel's hash rather than
/// refusing the connection.
pub fn round_robin_program(turn: RawFd, ring: RawFd, socks: RawFd) -> Vec<EbpfInsn> {
    let mut p = Vec::new();
    let mut misses = take_a_turn(&mut p, turn);
    misses.push(member_of_turn(&mut p, ring));
    let pass = select_and_pass(&mut p, socks);
    patch(&mut p, &misses, pass);
    p
}

/// Opens one more member of `pool`'s group: same address, `SO_REUSEPORT`, listening.
fn open_member(pool: &Pool, floor: RawFd) -> io::Result<OwnedFd> {
    let fd = socket::socket(pool.family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    if pool.family == AddressFamily::Inet6 {
        // Match the group's first member (a dual-stack [::] socket stays dual-stack).
        if let Ok(v6only) = socket::getsockopt(&pool.members[0].fd, sockopt::Ipv6V6Only) {
            socket::setsockopt(&fd, sockopt::Ipv6V6Only, &v6only)?;
        }
    }
    socket::bind(fd.as_raw_fd(), &pool.local)?;
    socket::listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    sys::dup_cloexec_from(&fd, floor)
}

/// Steered sockets in an upgrade's state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SteeringState {
    pub mode: Balance,
    pub slots: usize,
    pub floor: RawFd,
    pub pools: Vec<PoolState>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PoolState {
    pub addr: String,
    pub name: String,
    pub members: Vec<MemberState>,
    /// The eBPF router (absent: none, or an image from before routers were handed over).
    #[serde(default)]
    pub router: Option<RouterState>,
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

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MemberState {
    pub fd: RawFd,
    pub holder: Option<i32>,
    pub slot: usize,
    pub receiving: bool,
}

// Classic BPF opcodes (linux/filter.h).
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
const LD_MEM: u16 = (libc::BPF_LD | libc::BPF_MEM) as u16;
const LDX_MEM: u16 = (libc::BPF_LDX | libc::BPF_MEM) as u16;
const ST: u16 = libc::BPF_ST as u16;
const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}
fn stmt(code: u16, k: u32) -> BpfInsn {
    insn(code, 0, 0, k)
}

/// The routing program for one pool: `receiving` are (member index, slot) of the members that
/// may get new connections. Returns the member index for each SYN (0 = parking).
pub fn program(mode: Balance, receiving: &[(u32, usize)], slots: usize) -> Vec<BpfInsn> {
    if receiving.is_empty() {
        return vec![stmt(RET_K, 0)];
    }
    let mut p = Vec::new();
    // A = the IP version.
    p.push(stmt(LD_B_ABS, NET));
    p.push(stmt(RSH_K, 4));
    // jeq 6 → the IPv6 block (which starts after the IPv4 block); else fall into IPv4.
    let v4: Vec<BpfInsn> = match mode {
        // The source port (after the IPv4 header: X = its length) xor the source address.
        Balance::Steer | Balance::Shared => vec![
            stmt(LDX_B_MSH, NET),
            stmt(LD_H_IND, NET),
            stmt(ST, 0),
            stmt(LD_W_ABS, NET + 12),
            stmt(LDX_MEM, 0),
            stmt(XOR_X, 0),
        ],
        // The source address.
        Balance::Sticky => vec![stmt(LD_W_ABS, NET + 12)],
    };
    let v6: Vec<BpfInsn> = match mode {
        // The source port (after the fixed 40-byte header: a SYN carries no extension headers)
        // xor the last word of the source address.
        Balance::Steer | Balance::Shared => vec![
            stmt(LD_H_ABS, NET + 40),
            stmt(ST, 0),
            stmt(LD_W_ABS, NET + 20),
            stmt(LDX_MEM, 0),
            stmt(XOR_X, 0),
        ],
        // The source /64: the first two words of the source address, folded.
        Balance::Sticky => vec![
            stmt(LD_W_ABS, NET + 8),
            stmt(ST, 0),
            stmt(LD_W_ABS, NET + 12),
            stmt(LDX_MEM, 0),
            stmt(XOR_X, 0),
        ],
    };
    // v4 block ends with a jump over the v6 block.
    p.push(insn(JEQ_K, (v4.len() + 1) as u8, 0, 6));
    p.extend(v4);
    p.push(stmt(JA, v6.len() as u32));
    p.extend(v6);
    if mode != Balance::Sticky {
        // Mix (Fibonacci hashing): ephemeral ports of one client step by 2, and `% n` of raw
        // ports would put them all on the same parity.
        p.push(stmt(MUL_K, 0x9E37_79B1));
        p.push(stmt(RSH_K, 16));
    }
    // A = key. Keep it in M[1] for the fallback.
    p.push(stmt(ST, 1));
    let spread = |p: &mut Vec<BpfInsn>| {
        p.push(stmt(LD_MEM, 1));
        p.push(stmt(MOD_K, receiving.len() as u32));
        for (n, (index, _)) in receiving.iter().enumerate() {
            p.push(insn(JEQ_K, 0, 1, n as u32));
            p.push(stmt(RET_K, *index));
        }
        p.push(stmt(RET_K, receiving[0].0));
    };
    if mode == Balance::Sticky {
        // slot = key % slots → that slot's newest receiving member, else the fallback below.
        let slots = slots.max(1);
        p.push(stmt(MOD_K, slots as u32));
        let table_len = 2 * slots;
        for s in 0..slots {
            p.push(insn(JEQ_K, 0, 1, s as u32));
            match receiving.iter().rev().find(|(_, slot)| *slot == s) {
                Some((index, _)) => p.push(stmt(RET_K, *index)),
                // Jump to the fallback, which starts right after the table.
                None => p.push(stmt(JA, (table_len - 2 * s - 2) as u32)),
            }
        }
    }
    spread(&mut p);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny classic-BPF interpreter for the instructions [`program`] emits, over a packet
    /// given as its IP header + TCP header bytes.
    fn run(prog: &[BpfInsn], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let at = |k: u32, x: u32, n: usize| -> u32 {
            let off = (k.wrapping_sub(NET)).wrapping_add(x) as usize;
            pkt[off..off + n].iter().fold(0u32, |acc, b| (acc << 8) | *b as u32)
        };
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => a = at(i.k, 0, 4),
                LD_H_ABS => a = at(i.k, 0, 2),
                LD_B_ABS => a = at(i.k, 0, 1),
                LD_H_IND => a = at(i.k, x, 2),
                LDX_B_MSH => x = (at(i.k, 0, 1) & 0xf) * 4,
                LD_MEM => a = mem[i.k as usize],
                LDX_MEM => x = mem[i.k as usize],
                ST => mem[i.k as usize] = a,
                RSH_K => a >>= i.k,
                MOD_K => a %= i.k,
                MUL_K => a = a.wrapping_mul(i.k),
                XOR_X => a ^= x,
                JEQ_K => pc += if a == i.k { i.jt } else { i.jf } as usize,
                JA => pc += i.k as usize,
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn v4(src: [u8; 4], port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[20..22].copy_from_slice(&port.to_be_bytes());
        p
    }

    fn v6(src: [u8; 16], port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 60];
        p[0] = 0x60;
        p[8..24].copy_from_slice(&src);
        p[40..42].copy_from_slice(&port.to_be_bytes());
        p
    }

    #[test]
    fn nothing_receiving_parks_every_connection_on_member_0() {
        for mode in [Balance::Steer, Balance::Sticky] {
            assert_eq!(run(&program(mode, &[], 4), &v4([127, 0, 0, 1], 40000)), 0);
        }
    }

    #[test]
    fn steer_spreads_over_receiving_members_only_by_source_port() {
        let receiving = [(1, 0), (3, 1), (4, 2)];
        let prog = program(Balance::Steer, &receiving, 3);
        let mut seen = std::collections::BTreeMap::new();
        for port in (40000..40600u16).step_by(2) {
            let a = run(&prog, &v4([127, 0, 0, 1], port));
            let b = run(&prog, &v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], port));
            assert!([1, 3, 4].contains(&a) && [1, 3, 4].contains(&b), "{a} {b}");
            *seen.entry(a).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "every receiving member gets connections: {seen:?}");
        assert!(seen.values().all(|n| (70..=130).contains(n)), "even spread: {seen:?}");
    }

    #[test]
    fn an_ipv4_header_with_options_still_finds_the_port() {
        let prog = program(Balance::Steer, &[(5, 0), (6, 1)], 2);
        let mut p = vec![0u8; 48];
        p[0] = 0x46; // IHL 6: 4 bytes of options
        p[24..26].copy_from_slice(&40001u16.to_be_bytes());
        assert_eq!(run(&prog, &p), 6);
    }

    #[test]
    fn sticky_keeps_a_client_on_its_slot_and_falls_back_while_the_slot_is_down() {
        // Slots 0-2 receiving on members 0, 2, 5.
        let all = [(0, 0), (2, 1), (5, 2)];
        let prog = program(Balance::Sticky, &all, 3);
        let member_of_slot = |m: u32| all.iter().find(|(i, _)| *i == m).map(|(_, s)| *s).unwrap();
        for last in 1..=60u8 {
            let client = [127, 0, 0, last];
            let m = run(&prog, &v4(client, 40000));
            // Any source port: same member.
            assert_eq!(run(&prog, &v4(client, 51234)), m);
            assert_eq!(member_of_slot(m), u32::from_be_bytes(client) as usize % 3);
        }
        // Slot 1 has no receiving member: its clients go elsewhere; the others stay put.
        let down = [(0, 0), (5, 2)];
        let prog2 = program(Balance::Sticky, &down, 3);
        for last in 1..=60u8 {
            let client = [127, 0, 0, last];
            let before = run(&prog, &v4(client, 40000));
            let after = run(&prog2, &v4(client, 40000));
            assert!(after == 0 || after == 5);
            if before != 2 {
                assert_eq!(before, after, "clients of live slots keep their slot");
            }
        }
        // A slot's newest receiving member wins (old and new of one slot during a reload).
        let reload = [(0, 0), (2, 1), (5, 2), (7, 1)];
        let prog3 = program(Balance::Sticky, &reload, 3);
        let client = (1..=255u8).map(|l| [127, 0, 0, l]).find(|c| u32::from_be_bytes(*c) % 3 == 1).unwrap();
        assert_eq!(run(&prog3, &v4(client, 40000)), 7);
    }

    #[test]
    fn sticky_uses_the_ipv6_slash_64() {
        let prog = program(Balance::Sticky, &[(0, 0), (1, 1), (2, 2), (3, 3)], 4);
        let mut a = [0u8; 16];
        a[0] = 0x20;
        a[7] = 9;
        let mut b = a;
        b[15] = 0xff; // same /64, another host
        assert_eq!(run(&prog, &v6(a, 1000)), run(&prog, &v6(b, 2000)));
    }

    fn bound_reuseport() -> (String, String, OwnedFd) {
        bound_reuseport_on("127.0.0.1:0")
    }

    fn bound_reuseport_on(addr: &str) -> (String, String, OwnedFd) {
        let sa = addr.parse::<std::net::SocketAddr>().unwrap();
        let fam = if sa.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let fd = socket::socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        socket::setsockopt(&fd, sockopt::ReusePort, &true).unwrap();
        let any: SockaddrStorage = sa.into();
        socket::bind(fd.as_raw_fd(), &any).unwrap();
        socket::listen(&fd, Backlog::new(128).unwrap()).unwrap();
        let local: SockaddrStorage = socket::getsockname(fd.as_raw_fd()).unwrap();
        (local.to_string(), "t".to_string(), sys::dup_cloexec_from(&fd, 10).unwrap())
    }

    fn connect_n(addr: &str, n: usize, from: std::net::Ipv4Addr) -> Vec<std::net::TcpStream> {
        (0..n)
            .map(|_| {
                let s = socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
                    .unwrap();
                let src: SockaddrStorage = std::net::SocketAddr::new(from.into(), 0).into();
                socket::bind(s.as_raw_fd(), &src).unwrap();
                let dst: SockaddrStorage = addr.parse::<std::net::SocketAddr>().unwrap().into();
                socket::connect(s.as_raw_fd(), &dst).unwrap();
                std::net::TcpStream::from(s)
            })
            .collect()
    }

    /// Waits (bounded) until the queues hold `total` connections; returns them per member.
    fn queues(st: &Steering, total: u32) -> Vec<u32> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let q: Vec<u32> =
                st.pools[0].members.iter().map(|m| sys::tcp_listen_queue(&m.fd).unwrap().0).collect();
            if q.iter().sum::<u32>() >= total || std::time::Instant::now() > end {
                return q;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn the_kernel_routes_connections_only_to_receiving_members() {
        let (addr, name, fd) = bound_reuseport();
        let mut st =
            Steering::new(Balance::Steer, vec![(addr.clone(), name, fd)], 3, 10, Routing::Hash).unwrap();
        let picks: Vec<Vec<usize>> = (0..3).map(|slot| st.reserve(slot).unwrap()).collect();
        assert_eq!(picks, vec![vec![0], vec![1], vec![2]], "member 0 first, then new ones in order");
        for (i, p) in picks.iter().enumerate() {
            st.bind(p, 100 + i as i32);
        }
        // Nothing receiving: parked on member 0.
        let _c0 = connect_n(&addr, 5, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&st, 5), vec![5, 0, 0]);
        // Members 1 and 2 receive: new connections go there only.
        st.set_receiving(101, true).unwrap();
        st.set_receiving(102, true).unwrap();
        let _c1 = connect_n(&addr, 40, std::net::Ipv4Addr::LOCALHOST);
        let q = queues(&st, 45);
        assert_eq!(q[0], 5, "{q:?}");
        assert!(q[1] > 0 && q[2] > 0 && q[1] + q[2] == 40, "{q:?}");
        assert_eq!(st.queued(101), q[1]);
        // Member 2 stops receiving: nothing more reaches it.
        st.set_receiving(102, false).unwrap();
        let _c2 = connect_n(&addr, 10, std::net::Ipv4Addr::LOCALHOST);
        let q2 = queues(&st, 55);
        assert_eq!((q2[0], q2[1], q2[2]), (5, q[1] + 10, q[2]), "{q2:?}");
    }

    /// Whether this process may load eBPF (CAP_BPF or CAP_SYS_ADMIN in its effective set).
    fn may_load_ebpf() -> bool {
        cap_eff() & (1 << 39 | 1 << 21) != 0
    }

    /// This process's effective capabilities.
    fn cap_eff() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
        u64::from_str_radix(eff, 16).unwrap()
    }

    /// A steered group with `n` members held by pids 100.. (none receiving yet).
    fn steered_group(n: usize, want: Routing) -> (String, Steering) {
        let (addr, name, fd) = bound_reuseport();
        let mut st = Steering::new(Balance::Steer, vec![(addr.clone(), name, fd)], n, 10, want).unwrap();
        for slot in 0..n {
            let p = st.reserve(slot).unwrap();
            st.bind(&p, 100 + slot as i32);
        }
        (addr, st)
    }

    #[test]
    fn round_robin_takes_turns_exactly_over_receiving_members_only() {
        let (addr, mut st) = steered_group(3, Routing::RoundRobin);
        if !may_load_ebpf() {
            assert_eq!(st.routing(), Routing::Hash);
            eprintln!("SKIP: no CAP_BPF here: steer routes by hash");
            return;
        }
        assert_eq!(st.routing(), Routing::RoundRobin);
        // Nothing receiving: parked on member 0.
        let _c0 = connect_n(&addr, 4, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&st, 4), vec![4, 0, 0]);
        st.set_receiving(101, true).unwrap();
        st.set_receiving(102, true).unwrap();
        let _c1 = connect_n(&addr, 40, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&st, 44), vec![4, 20, 20], "one connection at a time: strict turns");
        st.set_receiving(100, true).unwrap();
        st.set_receiving(102, false).unwrap();
        let _c2 = connect_n(&addr, 10, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&st, 54), vec![9, 25, 20]);
        // A member opened later (scale up) joins the turns.
        let p = st.reserve(3).unwrap();
        st.bind(&p, 103);
        st.set_receiving(103, true).unwrap();
        let _c3 = connect_n(&addr, 9, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&st, 63), vec![12, 28, 20, 3]);
    }

    /// A capability set of the calling thread (`CapEff`, `CapBnd`, ...).
    fn thread_caps(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let hex = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).unwrap().trim();
        u64::from_str_radix(hex, 16).unwrap()
    }

    #[test]
    fn after_giving_up_cap_bpf_the_router_takes_turns_over_members_opened_later() {
        if !may_load_ebpf() {
            eprintln!("SKIP: no CAP_BPF here");
            return;
        }
        // Its own thread: capabilities are per thread, and this one gives them up for good.
        std::thread::spawn(|| {
            // As under the unit: CAP_BPF is the only capability that allows bpf() (root's
            // CAP_SYS_ADMIN would too).
            sys::lower_capabilities(&[21]).unwrap(); // CAP_SYS_ADMIN
            let (addr, mut st) = steered_group(2, Routing::RoundRobin);
            assert_eq!(st.routing(), Routing::RoundRobin);
            let dropped = st.give_up_capabilities().unwrap();
            // Before Linux 6.5, with unprivileged BPF disabled, every bpf() call needs CAP_BPF.
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
            let mut v = release.split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
            let since_6_5 = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 5);
            let unpriv_ok = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
                .is_ok_and(|s| s.trim() == "0");
            // (Some stable kernels before 6.5 took the change: either outcome there.)
            if let sys::CapsDropped::Kept(e) = &dropped {
                assert!(!since_6_5 && !unpriv_ok, "kept CAP_BPF on a kernel that needs it only to load: {e}");
                assert_ne!(thread_caps("CapEff") & 1 << 39, 0, "CAP_BPF is back where it is needed");
                eprintln!("SKIP (rest): this kernel needs CAP_BPF for every bpf() call");
                return;
            }
            assert!(matches!(dropped, sys::CapsDropped::Dropped), "{dropped:?}");
            const STEER_CAPS: u64 = 1 << 39 | 1 << 38 | 1 << 8;
            for field in ["CapEff", "CapPrm", "CapInh", "CapBnd"] {
                assert_eq!(thread_caps(field) & STEER_CAPS, 0, "{field}");
            }
            assert_eq!(thread_caps("CapEff") & 1 << 21, 0, "no CAP_SYS_ADMIN either");
            // Really gone: creating a map is refused now (unprivileged BPF is disabled here).
            if !unpriv_ok {
                assert!(sys::BpfMap::create(MAP_ARRAY, 4, 1).is_err(), "a map without CAP_BPF");
            }
            st.set_receiving(100, true).unwrap();
            st.set_receiving(101, true).unwrap();
            // A member opened now is written into the SOCKARRAY without CAP_BPF.
            let p = st.reserve(2).unwrap();
            st.bind(&p, 102);
            st.set_receiving(102, true).unwrap();
            let _c = connect_n(&addr, 9, std::net::Ipv4Addr::LOCALHOST);
            assert_eq!(queues(&st, 9), vec![3, 3, 3]);
            assert_eq!(st.routing(), Routing::RoundRobin);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_second_supervisor_on_the_same_group_takes_the_round_robin_over() {
        // What a restart under systemd or an in-place upgrade does: the group's sockets are
        // already in the previous router's map, which the kernel frees once the new
        // supervisor's classic bridge has replaced the old program.
        let (addr, mut first) = steered_group(2, Routing::RoundRobin);
        if !may_load_ebpf() {
            eprintln!("SKIP: no CAP_BPF here");
            return;
        }
        let copies: Vec<(String, String, OwnedFd)> = first.pools[0]
            .members
            .iter()
            .map(|m| (addr.clone(), "t".to_string(), sys::dup_cloexec_from(&m.fd, 10).unwrap()))
            .collect();
        first.set_receiving(100, true).unwrap();
        drop(first);
        let mut second = Steering::new(Balance::Steer, copies, 2, 10, Routing::RoundRobin).unwrap();
        assert_eq!(second.routing(), Routing::RoundRobin);
        for (i, slot) in [(0, 0), (1, 1)] {
            second.pools[0].members[i].holder = Some(200 + slot);
        }
        second.set_receiving(200, true).unwrap();
        second.set_receiving(201, true).unwrap();
        let _c = connect_n(&addr, 10, std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(queues(&second, 10), vec![5, 5]);
    }

    #[test]
    fn every_miss_in_the_round_robin_program_goes_to_sk_pass() {
        // Every jump lands inside the program and every path ends in `exit`.
        let prog = round_robin_program(7, 8, 9);
        assert_eq!(prog.last().unwrap().code, E_EXIT);
        for (i, insn) in prog.iter().enumerate() {
            if insn.code == E_JEQ_K {
                let to = i as i64 + 1 + i64::from(insn.off);
                assert!(to > i as i64 && (to as usize) < prog.len(), "jump at {i} to {to}");
                assert_eq!(prog[to as usize].code, E_MOV_K, "every miss goes to `return SK_PASS`");
            }
        }
        let maps: Vec<i32> = prog.iter().filter(|i| i.code == E_LD_IMM64).map(|i| i.imm).collect();
        assert_eq!(maps, vec![7, 8, 9]);
        assert_eq!(prog.len(), 36, "the module doc counts them");
    }

    #[test]
    fn the_kernel_keeps_sticky_clients_on_their_slot() {
        let (addr, name, fd) = bound_reuseport();
        let mut st =
            Steering::new(Balance::Sticky, vec![(addr.clone(), name, fd)], 3, 10, Routing::Hash).unwrap();
        for slot in 0..3 {
            let p = st.reserve(slot).unwrap();
            st.bind(&p, 200 + slot as i32);
            st.set_receiving(200 + slot as i32, true).unwrap();
        }
        let mut expected = vec![0u32; 3];
        let mut conns = Vec::new();
        for last in 2..14u8 {
            let from = std::net::Ipv4Addr::new(127, 0, 0, last);
            conns.extend(connect_n(&addr, 2, from));
            expected[(u32::from(from) % 3) as usize] += 2;
        }
        assert_eq!(queues(&st, 24), expected);
    }

    #[test]
    fn the_kernel_routes_ipv6_connections_only_to_receiving_members() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("SKIP: no IPv6 loopback here");
            return;
        }
        let (addr, name, fd) = bound_reuseport_on("[::1]:0");
        let mut st =
            Steering::new(Balance::Steer, vec![(addr.clone(), name, fd)], 3, 10, Routing::Hash).unwrap();
        for slot in 0..3 {
            let p = st.reserve(slot).unwrap();
            st.bind(&p, 300 + slot as i32);
        }
        st.set_receiving(300, true).unwrap();
        st.set_receiving(302, true).unwrap();
        let conns: Vec<std::net::TcpStream> =
            (0..30).map(|_| std::net::TcpStream::connect(addr.as_str()).unwrap()).collect();
        let q = queues(&st, 30);
        assert_eq!(q[1], 0, "{q:?}");
        assert!(q[0] > 0 && q[2] > 0 && q[0] + q[2] == 30, "{q:?}");
        drop(conns);
    }
}

#[cfg(test)]
mod golden_capture {
    use super::*;

    pub fn fnv(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
    }
    pub fn cbpf_bytes(p: &[BpfInsn]) -> Vec<u8> {
        p.iter()
            .flat_map(|i| {
                let mut v = i.code.to_le_bytes().to_vec();
                v.extend([i.jt, i.jf]);
                v.extend(i.k.to_le_bytes());
                v
            })
            .collect()
    }
    pub fn ebpf_bytes(p: &[EbpfInsn]) -> Vec<u8> {
        p.iter()
            .flat_map(|i| {
                let mut v = vec![i.code, i.regs];
                v.extend(i.off.to_le_bytes());
                v.extend(i.imm.to_le_bytes());
                v
            })
            .collect()
    }
    /// (mode, slots, receiving) cases.
    pub fn cases() -> Vec<(Balance, usize, Vec<(u32, usize)>)> {
        let mut out = Vec::new();
        for mode in [Balance::Steer, Balance::Shared, Balance::Sticky] {
            for slots in [1usize, 2, 3, 5, 8] {
                for mask in 0u32..256 {
                    let r = (0..8u32)
                        .filter(|i| mask & (1 << i) != 0)
                        .map(|i| (i, (i as usize * 7 + 3) % slots))
                        .collect();
                    out.push((mode, slots, r));
                }
            }
            for (slots, n) in [(64usize, 100u32), (300, 40), (1, 600)] {
                let r = (0..n).map(|i| (i * 2 + 1, (i as usize * 5) % slots)).collect();
                out.push((mode, slots, r));
            }
        }
        out
    }

    #[test]
    fn capture() {
        std::fs::write(
            "/tmp/steer-golden.txt",
            golden(
                |m, r, s| cbpf_bytes(&program(m, r, s)),
                |t, r, k| ebpf_bytes(&round_robin_program(t, r, k)),
            ),
        )
        .unwrap();
    }

    pub fn golden(
        cbpf: impl Fn(Balance, &[(u32, usize)], usize) -> Vec<u8>,
        ebpf: impl Fn(i32, i32, i32) -> Vec<u8>,
    ) -> String {
        let mut s = String::new();
        let mut group: Option<(String, usize, u64)> = None;
        for (mode, slots, r) in cases() {
            let key = format!("cbpf {mode} slots={slots}");
            let b = cbpf(mode, &r, slots);
            if r.len() > 8 {
                s += &format!("{key} members={} len={} {:016x}\n", r.len(), b.len() / 8, fnv(&b));
                continue;
            }
            match &mut group {
                Some((k, n, h)) if *k == key => {
                    *n += 1;
                    *h = fnv(&[h.to_le_bytes().as_slice(), &b].concat());
                }
                _ => {
                    if let Some((k, n, h)) = group.take() {
                        s += &format!("{k} cases={n} {h:016x}\n");
                    }
                    group = Some((key, 1, fnv(&b)));
                }
            }
        }
        if let Some((k, n, h)) = group.take() {
            s += &format!("{k} cases={n} {h:016x}\n");
        }
        for (t, r, k) in [(7, 8, 9), (3, 4, 5), (100, 200, 300), (-1, 0, i32::MAX)] {
            let b = ebpf(t, r, k);
            s += &format!("ebpf {t} {r} {k} len={} {:016x}\n", b.len() / 8, fnv(&b));
        }
        s
    }
}
