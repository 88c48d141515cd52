//! Listen queues: how many connections wait to be accepted on each listening socket, and the
//! backlog, from the kernel's `sock_diag` netlink interface (what `ss -l` shows as Recv-Q and
//! Send-Q). For a listening socket the kernel reports the accept queue as `rqueue` and the
//! backlog as `wqueue`, for TCP (inet_diag, IPv4 and IPv6) and unix stream sockets
//! (unix_diag with `UDIAG_SHOW_RQLEN`) alike. Sockets are matched by inode. Plain safe code:
//! requests and answers are byte buffers. A socket the kernel does not report (another
//! family, a namespace we cannot see) simply has no sample.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const TCP_LISTEN_STATE: u32 = 1 << 10;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;

/// Queue length and limit by socket inode.
pub(crate) type Queues = HashMap<u64, (u64, u64)>;

/// The inode of a socket fd (what sock_diag reports).
pub(crate) fn inode(fd: &OwnedFd) -> Option<u64> {
    nix::sys::stat::fstat(fd.as_raw_fd()).ok().map(|s| s.st_ino)
}

/// One dump of every listening TCP (v4, v6) and unix socket in our network namespace.
pub(crate) fn listening() -> Queues {
    let mut q = Queues::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let _ = dump(&inet_request(family), 16 + 4 + 48 + 4, &mut |m| {
            // inet_diag_msg: family, state, timer, retrans (4), id (48), expires, rqueue,
            // wqueue, uid, inode.
            let r = u32_at(m, 56)?;
            let w = u32_at(m, 60)?;
            let ino = u32_at(m, 68)?;
            q.insert(ino as u64, (r as u64, w as u64));
            Some(())
        });
    }
    let _ = dump(&unix_request(), 16, &mut |m| {
        // unix_diag_msg: family, type, state, pad, ino, cookie[2]; then attributes.
        let ino = u32_at(m, 4)?;
        let mut at = 16;
        while at + 4 <= m.len() {
            let len = u16_at(m, at)? as usize;
            let kind = u16_at(m, at + 2)?;
            if len < 4 {
                break;
            }
            if kind == UNIX_DIAG_RQLEN {
                let r = u32_at(m, at + 4)?;
                let w = u32_at(m, at + 8)?;
                q.insert(ino as u64, (r as u64, w as u64));
            }
            at += (len + 3) & !3;
        }
        Some(())
    });
    q
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn header(len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid
    b
}

fn inet_request(family: u8) -> Vec<u8> {
    // inet_diag_req_v2: family, protocol, ext, pad, states, id (48 bytes of zeros: any).
    let mut b = header(16 + 56);
    b.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    b.extend_from_slice(&TCP_LISTEN_STATE.to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]);
    b
}

fn unix_request() -> Vec<u8> {
    // unix_diag_req: family, protocol, pad(2), states, ino, show, cookie[2].
    let mut b = header(16 + 24);
    b.extend_from_slice(&[libc::AF_UNIX as u8, 0, 0, 0]);
    b.extend_from_slice(&TCP_LISTEN_STATE.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&UDIAG_SHOW_RQLEN.to_ne_bytes());
    b.extend_from_slice(&[0xffu8; 8]);
    b
}

/// Sends `req` and calls `each` with every answer's payload (after the netlink header) that
/// is at least `min` bytes long.
fn dump(req: &[u8], min: usize, each: &mut dyn FnMut(&[u8]) -> Option<()>) -> nix::Result<()> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let tv = nix::sys::time::TimeVal::from(libc::timeval { tv_sec: 1, tv_usec: 0 });
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    socket::sendto(fd.as_raw_fd(), req, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(());
        }
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at).unwrap_or(0) as usize;
            let kind = u16_at(&buf, at + 4).unwrap_or(NLMSG_DONE);
            if len < 16 || at + len > n {
                return Ok(());
            }
            if kind == NLMSG_DONE || kind == NLMSG_ERROR {
                return Ok(());
            }
            let payload = &buf[at + 16..at + len];
            if payload.len() + 16 >= min {
                let _ = each(payload);
            }
            at += (len + 3) & !3;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_tcp_socket_reports_its_queue_and_backlog() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let fd: OwnedFd = l.into();
        let ino = inode(&fd).unwrap();
        let q = listening();
        let (len, limit) = q.get(&ino).copied().expect("our socket in the dump");
        assert_eq!(len, 1);
        assert!(limit >= 1, "{limit}");
    }

    #[test]
    fn a_listening_unix_socket_reports_its_queue() {
        let p = std::env::temp_dir().join(format!("herdsman-q-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&p).unwrap();
        let fd: OwnedFd = l.into();
        let ino = inode(&fd).unwrap();
        let q = listening();
        let _ = std::fs::remove_file(&p);
        let (len, limit) = q.get(&ino).copied().expect("our socket in the dump");
        assert_eq!(len, 1);
        assert!(limit >= 1);
    }
}
