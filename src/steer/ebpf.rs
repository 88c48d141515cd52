//! The eBPF `SK_REUSEPORT` program of the round-robin router ([`super::router`]): 36
//! instructions over the router's three maps, written here with symbolic labels.
//!
//! Why hand-written instructions: the program is a handful of instructions built here and
//! tested twice, by an interpreter in this crate's tests (which member each connection gets)
//! and by the kernel's verifier and a real group (`steer::tests`, as root); `aya`/`libbpf-rs`
//! would bring a BPF toolchain or a C library for one program of 36 instructions.

use std::os::fd::RawFd;

use crate::sys::EbpfInsn;

use super::asm::{AsmError, Label, Labels};

// eBPF encoding (linux/bpf_common.h, linux/bpf.h).
pub(super) const E_LD_IMM64: u8 = 0x18; // BPF_LD | BPF_DW | BPF_IMM
pub(super) const E_LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub(super) const E_STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
pub(super) const E_ST_W: u8 = 0x62; // BPF_ST | BPF_MEM | BPF_W
pub(super) const E_ATOMIC_W: u8 = 0xc3; // BPF_STX | BPF_ATOMIC | BPF_W
pub(super) const E_MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
pub(super) const E_MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
pub(super) const E_ADD_K: u8 = 0x07;
pub(super) const E_ADD_X: u8 = 0x0f;
pub(super) const E_AND_K: u8 = 0x57;
pub(super) const E_RSH_K: u8 = 0x77;
pub(super) const E_MOD_X: u8 = 0x9f;
pub(super) const E_JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
pub(super) const E_CALL: u8 = 0x85;
pub(super) const E_EXIT: u8 = 0x95;
/// `BPF_ADD | BPF_FETCH`: the old value comes back in the source register.
pub(super) const FETCH_ADD: i32 = 0x01;
/// `BPF_PSEUDO_MAP_FD`: a 64-bit immediate that is a map's descriptor.
pub(super) const PSEUDO_MAP_FD: u8 = 1;
pub(super) const FN_MAP_LOOKUP_ELEM: i32 = 1;
pub(super) const FN_SK_SELECT_REUSEPORT: i32 = 82;
/// `SK_PASS`: take the selected member (or, if none was selected, the kernel's hash).
pub(super) const SK_PASS: i32 = 1;

/// An eBPF program under construction; jumps name [`Label`]s.
#[derive(Default)]
struct Asm {
    p: Vec<EbpfInsn>,
    labels: Labels<()>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.label()
    }

    /// The next instruction is `label`.
    fn bind(&mut self, label: Label) {
        self.labels.bind(label, self.p.len());
    }

    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.p.push(EbpfInsn { code, regs: (src << 4) | dst, off, imm });
    }

    /// `dst = map` (two instruction slots).
    fn map(&mut self, dst: u8, map: RawFd) {
        self.op(E_LD_IMM64, dst, PSEUDO_MAP_FD, 0, map);
        self.op(0, 0, 0, 0, 0);
    }

    /// `if dst == imm goto to`.
    fn jeq(&mut self, dst: u8, imm: i32, to: Label) {
        self.labels.jump(self.p.len(), (), to);
        self.op(E_JEQ_K, dst, 0, 0, imm);
    }

    fn finish(mut self) -> Result<Vec<EbpfInsn>, AsmError> {
        for (at, (), offset) in self.labels.resolve()? {
            self.p[at].off = i16::try_from(offset).map_err(|_| AsmError::OutOfRange { at, offset })?;
        }
        Ok(self.p)
    }
}

/// The round-robin `SK_REUSEPORT` program over `turn`, `ring` and `socks` (see
/// [`super::router`]). Every path ends in `SK_PASS`: a missing entry falls back to the
/// kernel's hash rather than refusing the connection.
pub(crate) fn round_robin_program(turn: RawFd, ring: RawFd, socks: RawFd) -> Result<Vec<EbpfInsn>, AsmError> {
    let mut a = Asm::default();
    let pass = a.label();
    // Take a turn. r6 = ctx; key 0 at fp-4; r0 = &turn[0].
    a.op(E_MOV_X, 6, 1, 0, 0);
    a.op(E_ST_W, 10, 0, -4, 0);
    a.map(1, turn);
    a.op(E_MOV_X, 2, 10, 0, 0);
    a.op(E_ADD_K, 2, 0, 0, -4);
    a.op(E_CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jeq(0, 0, pass);
    // r7 = active; r8 = counter++ (atomic, the old value: this connection's turn).
    a.op(E_LDX_W, 7, 0, 4, 0);
    a.op(E_MOV_K, 8, 0, 0, 1);
    a.op(E_ATOMIC_W, 0, 8, 0, FETCH_ADD);
    // r9 = count of receiving members; if 0 goto pass; r7 = the active half's base.
    a.op(E_MOV_X, 9, 7, 0, 0);
    a.op(E_AND_K, 9, 0, 0, 0xffff);
    a.jeq(9, 0, pass);
    a.op(E_RSH_K, 7, 0, 0, 16);
    // The member whose turn it is: key r7 + r8 % r9 at fp-8; r0 = &ring[key].
    a.op(E_MOV_X, 1, 8, 0, 0);
    a.op(E_MOD_X, 1, 9, 0, 0);
    a.op(E_ADD_X, 1, 7, 0, 0);
    a.op(E_STX_W, 10, 1, -8, 0);
    a.map(1, ring);
    a.op(E_MOV_X, 2, 10, 0, 0);
    a.op(E_ADD_K, 2, 0, 0, -8);
    a.op(E_CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jeq(0, 0, pass);
    // Its member index at fp-12.
    a.op(E_LDX_W, 1, 0, 0, 0);
    a.op(E_STX_W, 10, 1, -12, 0);
    // sk_select_reuseport(ctx, socks, &member, 0).
    a.op(E_MOV_X, 1, 6, 0, 0);
    a.map(2, socks);
    a.op(E_MOV_X, 3, 10, 0, 0);
    a.op(E_ADD_K, 3, 0, 0, -12);
    a.op(E_MOV_K, 4, 0, 0, 0);
    a.op(E_CALL, 0, 0, 0, FN_SK_SELECT_REUSEPORT);
    a.bind(pass);
    a.op(E_MOV_K, 0, 0, 0, SK_PASS);
    a.op(E_EXIT, 0, 0, 0, 0);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::super::interp::{World, run_ebpf};
    use super::super::router::RR_CAPACITY;
    use super::*;

    fn round_robin_program(turn: RawFd, ring: RawFd, socks: RawFd) -> Vec<EbpfInsn> {
        super::round_robin_program(turn, ring, socks).unwrap()
    }

    /// Runs `n` connections; the members they were given (`None`: no selection, the kernel's
    /// hash). Every run must return `SK_PASS`: the program never refuses a connection.
    fn connections(world: &mut World, n: usize) -> Vec<Option<u32>> {
        let (t, r, s) = world.fds;
        let prog = round_robin_program(t, r, s);
        (0..n)
            .map(|_| {
                let out = run_ebpf(&prog, world);
                assert_eq!(out.ret, SK_PASS as u64, "{out:?}");
                out.selected
            })
            .collect()
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
    fn round_robin_takes_strict_turns_over_the_receiving_members() {
        let mut w = World::new(5);
        w.update(0, &[1, 3, 4]);
        assert_eq!(connections(&mut w, 7), [1, 3, 4, 1, 3, 4, 1].map(Some));
    }

    #[test]
    fn a_new_half_takes_over_whole_and_draining_members_get_nothing_more() {
        let mut w = World::new(5);
        w.update(0, &[1, 3, 4]);
        connections(&mut w, 2);
        // Members 1 and 4 drain, 0 joins: the other half; the old half keeps its stale list.
        w.update(1, &[0, 3]);
        assert_eq!(connections(&mut w, 4), [0, 3, 0, 3].map(Some), "turns restart on the new list");
        assert_eq!(&w.ring[..3], &[1, 3, 4]);
        // And back to the first half, overwriting it.
        w.update(0, &[2]);
        assert_eq!(connections(&mut w, 2), [Some(2), Some(2)]);
    }

    #[test]
    fn nothing_receiving_parks_on_member_0() {
        // The router writes [0] when no member receives.
        let mut w = World::new(3);
        w.update(1, &[0]);
        assert_eq!(connections(&mut w, 3), [Some(0); 3]);
    }

    #[test]
    fn every_miss_passes_to_the_kernel_hash_instead_of_refusing() {
        // Before the first update `active` is 0: no members counted.
        let mut w = World::new(2);
        assert_eq!(connections(&mut w, 2), [None, None]);
        // No `turn` entry.
        w.turn = None;
        assert_eq!(connections(&mut w, 1), [None]);
        // A base past the ring's end: the lookup misses.
        let mut w = World::new(2);
        let active = (2 * RR_CAPACITY) << 16 | 1;
        let mut turn = [0u8; 8];
        turn[4..].copy_from_slice(&active.to_ne_bytes());
        w.turn = Some(turn);
        assert_eq!(connections(&mut w, 1), [None]);
        // A member that is not in `socks` (yet): `sk_select_reuseport` fails.
        let mut w = World::new(2);
        w.update(0, &[5]);
        assert_eq!(connections(&mut w, 1), [None]);
    }

    #[test]
    fn the_counter_wraps_without_leaving_the_list() {
        let mut w = World::new(4);
        w.update(0, &[1, 2, 3]);
        let mut turn = w.turn.unwrap();
        turn[..4].copy_from_slice(&(u32::MAX - 2).to_ne_bytes());
        w.turn = Some(turn);
        for m in connections(&mut w, 6) {
            assert!(matches!(m, Some(1..=3)), "{m:?}");
        }
    }

    #[test]
    fn a_jump_too_far_for_its_encoding_is_an_error() {
        let jump_over = |n: usize| {
            let mut a = Asm::default();
            let far = a.label();
            a.jeq(0, 0, far);
            for _ in 0..n {
                a.op(E_EXIT, 0, 0, 0, 0);
            }
            a.bind(far);
            a.op(E_EXIT, 0, 0, 0, 0);
            a.finish()
        };
        assert_eq!(jump_over(32767).unwrap()[0].off, i16::MAX);
        assert_eq!(jump_over(32768).err(), Some(AsmError::OutOfRange { at: 0, offset: 32768 }));
    }
}
