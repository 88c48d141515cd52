//! Interpreters for the subset of classic BPF and eBPF the routing programs use, so the
//! tests can run them on synthetic connections without `CAP_BPF`: which member does each SYN
//! get? The eBPF one models the router's three maps and stubs the two helpers the program
//! calls (`map_lookup_elem`, `sk_select_reuseport`). Written here rather than taken from a
//! crate: `rbpf` (the maintained user-space eBPF VM) leaves the 32-bit atomic add the program
//! takes its turn with (`ST_W_XADD`, 0xc3) unimplemented, runs over raw pointers and has no
//! maps, so it would need the same stubs and a patched opcode; no crate runs classic BPF.

use std::os::fd::RawFd;

use crate::sys::{BpfInsn, EbpfInsn};

use super::cbpf::*;
use super::ebpf::*;
use super::router::RR_CAPACITY;

/// A tiny classic-BPF interpreter for the instructions [`program`] emits, over a packet
/// given as its IP header + TCP header bytes.
pub(super) fn run(prog: &[BpfInsn], pkt: &[u8]) -> u32 {
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

pub(super) fn v4(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src);
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p
}

pub(super) fn v6(src: [u8; 16], port: u16) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x60;
    p[8..24].copy_from_slice(&src);
    p[40..42].copy_from_slice(&port.to_be_bytes());
    p
}

/// What the eBPF program sees: the router's maps as they are in the kernel.
pub(super) struct World {
    /// `(turn, ring, socks)` descriptors, as the program was built with.
    pub fds: (RawFd, RawFd, RawFd),
    /// `turn[0]` (`None`: the lookup misses, which an array map never does; the program
    /// checks anyway).
    pub turn: Option<[u8; 8]>,
    /// `ring`, both halves.
    pub ring: Vec<u32>,
    /// The member indices put in `socks`.
    pub socks: Vec<u32>,
}

impl World {
    /// Maps as [`super::router::Router::new`] leaves them with `members` inserted.
    pub fn new(members: u32) -> World {
        World {
            fds: (7, 8, 9),
            turn: Some([0; 8]),
            ring: vec![0; 2 * RR_CAPACITY as usize],
            socks: (0..members).collect(),
        }
    }

    /// Writes what [`super::router::Router::update`] writes.
    pub fn update(&mut self, half: u32, list: &[u32]) {
        let (entries, turn) = super::router::layout(half, list);
        for (key, index) in entries {
            self.ring[key as usize] = index;
        }
        self.turn = Some(turn);
    }
}

/// What one run of the eBPF program did.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Outcome {
    /// The return value (`SK_PASS` = 1, `SK_DROP` = 0).
    pub ret: u64,
    /// The member `sk_select_reuseport` selected, if it succeeded.
    pub selected: Option<u32>,
}

// Address regions of the interpreter's pointers (high bits): the stack, the context, a map
// (low bits: its descriptor) and a map value (low bits: the byte offset).
const STACK: u64 = 1 << 40;
const CTX: u64 = 2 << 40;
const MAP: u64 = 3 << 40;
const TURN_VALUE: u64 = 4 << 40;
const RING_VALUE: u64 = 5 << 40;
const REGION: u64 = !((1 << 40) - 1);

/// Runs `prog` once (one SYN) against `world`, which its atomic add changes.
pub(super) fn run_ebpf(prog: &[EbpfInsn], world: &mut World) -> Outcome {
    let mut stack = [0u8; 512];
    let mut r = [0u64; 11];
    r[1] = CTX;
    r[10] = STACK + 512;
    let mut selected = None;
    let mut pc = 0;
    for _ in 0..4096 {
        let i = prog[pc];
        pc += 1;
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        let imm = i64::from(i.imm) as u64;
        let addr = |base: u64| base.wrapping_add(i64::from(i.off) as u64);
        match i.code {
            E_LD_IMM64 => {
                assert_eq!(src, usize::from(PSEUDO_MAP_FD), "only map descriptors are loaded");
                r[dst] = MAP | i.imm as u32 as u64;
                pc += 1;
            }
            E_LDX_W => r[dst] = u64::from(load(&stack, world, addr(r[src]))),
            E_STX_W => store(&mut stack, world, addr(r[dst]), r[src] as u32),
            E_ST_W => store(&mut stack, world, addr(r[dst]), i.imm as u32),
            E_ATOMIC_W => {
                assert_eq!(i.imm, FETCH_ADD);
                let old = load(&stack, world, addr(r[dst]));
                store(&mut stack, world, addr(r[dst]), old.wrapping_add(r[src] as u32));
                r[src] = u64::from(old);
            }
            E_MOV_K => r[dst] = imm,
            E_MOV_X => r[dst] = r[src],
            E_ADD_K => r[dst] = r[dst].wrapping_add(imm),
            E_ADD_X => r[dst] = r[dst].wrapping_add(r[src]),
            E_AND_K => r[dst] &= imm,
            E_RSH_K => r[dst] >>= imm,
            E_MOD_X => {
                if r[src] != 0 {
                    r[dst] %= r[src];
                }
            }
            E_JEQ_K => {
                if r[dst] == imm {
                    pc = (pc as i64 + i64::from(i.off)) as usize;
                }
            }
            E_CALL => {
                let key = |at: u64| load(&stack, world, at);
                r[0] = match i.imm {
                    FN_MAP_LOOKUP_ELEM => {
                        let k = key(r[2]);
                        if r[1] == MAP | world.fds.0 as u32 as u64 {
                            if k == 0 && world.turn.is_some() { TURN_VALUE } else { 0 }
                        } else if r[1] == MAP | world.fds.1 as u32 as u64 {
                            if (k as usize) < world.ring.len() { RING_VALUE + 4 * u64::from(k) } else { 0 }
                        } else {
                            panic!("lookup in an unknown map {:#x}", r[1]);
                        }
                    }
                    FN_SK_SELECT_REUSEPORT => {
                        assert_eq!(r[1], CTX, "the context");
                        assert_eq!(r[2], MAP | world.fds.2 as u32 as u64, "the socks map");
                        assert_eq!(r[4], 0, "no flags");
                        let k = key(r[3]);
                        if world.socks.contains(&k) {
                            selected = Some(k);
                            0
                        } else {
                            -(libc::ENOENT as i64) as u64
                        }
                    }
                    other => panic!("unexpected helper {other}"),
                };
                // Helpers clobber r1-r5.
                for reg in &mut r[1..=5] {
                    *reg = 0xdead_beef;
                }
            }
            E_EXIT => return Outcome { ret: r[0], selected },
            other => panic!("unexpected opcode {other:#x} at {}", pc - 1),
        }
    }
    panic!("the program did not exit");
}

fn load(stack: &[u8; 512], world: &World, at: u64) -> u32 {
    let off = (at & !REGION) as usize;
    match at & REGION {
        STACK => u32::from_ne_bytes(stack[off..off + 4].try_into().unwrap()),
        TURN_VALUE => u32::from_ne_bytes(world.turn.unwrap()[off..off + 4].try_into().unwrap()),
        RING_VALUE => {
            assert_eq!(off % 4, 0);
            world.ring[off / 4]
        }
        _ => panic!("load from {at:#x}"),
    }
}

fn store(stack: &mut [u8; 512], world: &mut World, at: u64, v: u32) {
    let off = (at & !REGION) as usize;
    match at & REGION {
        STACK => stack[off..off + 4].copy_from_slice(&v.to_ne_bytes()),
        TURN_VALUE => world.turn.as_mut().unwrap()[off..off + 4].copy_from_slice(&v.to_ne_bytes()),
        _ => panic!("store to {at:#x}"),
    }
}
