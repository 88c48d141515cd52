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
//! * `steer`: the receiving members in turn (**round robin**, an eBPF program: `router.rs`); where
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
//! Files:
//! * `mod.rs` (this one): the pools and their members, the surface the supervisor uses
//!   (reserve, bind, receive, release) and the choice of program;
//! * `router.rs`: the round-robin router (why round robin, its maps, how a state change
//!   reaches them, what `CAP_BPF` is needed for);
//! * `ebpf.rs`, `cbpf.rs`: the two program builders, which jump to symbolic labels resolved by
//!   `asm.rs` instead of counted offsets;
//! * `handover.rs`: what an in-place upgrade carries of all this;
//! * tests: `interp.rs` runs both programs on synthetic connections without privileges (which
//!   member each one gets), `golden.rs` holds the builders to the bytes they produced before
//!   the labels, `tests.rs` lets the kernel route real connections (the eBPF parts as root).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    self, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, sockopt,
};

use crate::config::Balance;
use crate::sys;

mod asm;
mod cbpf;
mod ebpf;
#[cfg(test)]
mod golden;
mod handover;
#[cfg(test)]
mod interp;
mod router;
#[cfg(test)]
mod tests;

use cbpf::program;
pub use handover::SteeringState;
use router::Router;

/// Like systemd's default `Backlog=` on Debian 12.
const BACKLOG: i32 = 4096;

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
            let attach = |err| SteerError::Attach { mode: self.mode, addr: pool.addr.clone(), err };
            let prog = program(self.mode, &receiving, self.slots).map_err(|e| attach(io::Error::other(e)))?;
            sys::attach_reuseport_cbpf(&pool.members[0].fd, &prog).map_err(attach)?;
        }
        Ok(())
    }
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
