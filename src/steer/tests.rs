//! Steering on real reuseport groups: the kernel runs the programs (as root, the eBPF router
//! too; without `CAP_BPF` those tests check the hash fallback instead).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, sockopt};

use super::router::MAP_ARRAY;
use super::*;

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
            let s =
                socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
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
    let mut st = Steering::new(Balance::Steer, vec![(addr.clone(), name, fd)], 3, 10, Routing::Hash).unwrap();
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
    let mut st = Steering::new(Balance::Steer, vec![(addr.clone(), name, fd)], 3, 10, Routing::Hash).unwrap();
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
