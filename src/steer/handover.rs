//! What an in-place upgrade carries of steering: every pool's members (descriptors, holder,
//! slot, receiving) in the kernel's order, and each eBPF router's maps and program, so the new
//! image routes exactly as the old one did without `CAP_BPF`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{self, SockaddrLike, SockaddrStorage};

use crate::config::Balance;
use crate::sys;

use super::router::{Router, RouterState};
use super::{Member, Pool, Routing, Steering};

impl Steering {
    /// For an in-place upgrade: every member, with the number it will have in the new image.
    pub fn export(&self, ex: &mut crate::handoff::Exporter) -> io::Result<SteeringState> {
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

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MemberState {
    pub fd: RawFd,
    pub holder: Option<i32>,
    pub slot: usize,
    pub receiving: bool,
}
