//! The classic BPF routing program (`SO_ATTACH_REUSEPORT_CBPF`): a pure function of the
//! receiving members, rebuilt and attached again on every state change. It needs no privilege,
//! so it is what `sticky` always runs, what `steer` runs where the kernel refuses eBPF (or with
//! `HERDSMAN_STEER_ROUTING=hash`), and the bridge while the eBPF router is being built.
//!
//! Key: `steer` hashes the client's source port and address (`key % n` over the receiving
//! members); `sticky` takes the client's IPv4 address (IPv6: its /64), `key % slots` picks the
//! slot and that slot's newest receiving member, and a slot with none falls back to `key % n`.
//! With nothing receiving the program is `return 0`: the parking member.
//!
//! No crate builds classic reuseport programs; this one is a few dozen instructions, written
//! with the labels of `asm.rs` and run in the tests by `interp.rs`.

use crate::config::Balance;
use crate::sys::BpfInsn;

use super::asm::{AsmError, Label, Labels};

/// `SKF_NET_OFF`: loads relative to the network (IP) header.
pub(super) const NET: u32 = libc::SKF_NET_OFF as u32;

// Classic BPF opcodes (linux/filter.h).
pub(super) const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
pub(super) const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
pub(super) const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
pub(super) const LD_H_IND: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_IND) as u16;
pub(super) const LDX_B_MSH: u16 = (libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH) as u16;
pub(super) const LD_MEM: u16 = (libc::BPF_LD | libc::BPF_MEM) as u16;
pub(super) const LDX_MEM: u16 = (libc::BPF_LDX | libc::BPF_MEM) as u16;
pub(super) const ST: u16 = libc::BPF_ST as u16;
pub(super) const RSH_K: u16 = (libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K) as u16;
pub(super) const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;
pub(super) const MUL_K: u16 = (libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K) as u16;
pub(super) const XOR_X: u16 = (libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X) as u16;
pub(super) const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
pub(super) const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
pub(super) const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Which field of a classic jump holds the offset.
#[derive(Debug, Clone, Copy)]
enum Field {
    Jt,
    Jf,
    /// `ja`'s offset.
    K,
}

/// A classic program under construction; jumps name [`Label`]s (or `None`: the next
/// instruction, offset 0).
#[derive(Default)]
struct Asm {
    p: Vec<BpfInsn>,
    labels: Labels<Field>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.label()
    }

    /// The next instruction is `label`.
    fn bind(&mut self, label: Label) {
        self.labels.bind(label, self.p.len());
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.p.push(BpfInsn { code, jt: 0, jf: 0, k });
    }

    /// `if A == k goto jt else goto jf`.
    fn jeq(&mut self, k: u32, jt: Option<Label>, jf: Option<Label>) {
        let at = self.p.len();
        for (field, to) in [(Field::Jt, jt), (Field::Jf, jf)] {
            if let Some(to) = to {
                self.labels.jump(at, field, to);
            }
        }
        self.stmt(JEQ_K, k);
    }

    fn ja(&mut self, to: Label) {
        self.labels.jump(self.p.len(), Field::K, to);
        self.stmt(JA, 0);
    }

    fn finish(mut self) -> Result<Vec<BpfInsn>, AsmError> {
        for (at, field, offset) in self.labels.resolve()? {
            let insn = &mut self.p[at];
            let range = AsmError::OutOfRange { at, offset };
            match field {
                Field::Jt => insn.jt = u8::try_from(offset).map_err(|_| range)?,
                Field::Jf => insn.jf = u8::try_from(offset).map_err(|_| range)?,
                Field::K => insn.k = u32::try_from(offset).map_err(|_| range)?,
            }
        }
        Ok(self.p)
    }
}

/// The routing program for one pool: `receiving` are (member index, slot) of the members that
/// may get new connections. Returns the member index for each SYN (0 = parking).
pub(crate) fn program(
    mode: Balance,
    receiving: &[(u32, usize)],
    slots: usize,
) -> Result<Vec<BpfInsn>, AsmError> {
    let mut a = Asm::default();
    let Some(&(first, _)) = receiving.first() else {
        a.stmt(RET_K, 0);
        return a.finish();
    };
    let (v6, key) = (a.label(), a.label());
    // A = the IP version; 6 → the IPv6 block, else the IPv4 block.
    a.stmt(LD_B_ABS, NET);
    a.stmt(RSH_K, 4);
    a.jeq(6, Some(v6), None);
    match mode {
        // The source port (after the IPv4 header: X = its length) xor the source address.
        Balance::Steer | Balance::Shared => {
            a.stmt(LDX_B_MSH, NET);
            a.stmt(LD_H_IND, NET);
            a.stmt(ST, 0);
            a.stmt(LD_W_ABS, NET + 12);
            a.stmt(LDX_MEM, 0);
            a.stmt(XOR_X, 0);
        }
        // The source address.
        Balance::Sticky => a.stmt(LD_W_ABS, NET + 12),
    }
    a.ja(key);
    a.bind(v6);
    match mode {
        // The source port (after the fixed 40-byte header: a SYN carries no extension headers)
        // xor the last word of the source address.
        Balance::Steer | Balance::Shared => {
            a.stmt(LD_H_ABS, NET + 40);
            a.stmt(ST, 0);
            a.stmt(LD_W_ABS, NET + 20);
        }
        // The source /64: the first two words of the source address, folded.
        Balance::Sticky => {
            a.stmt(LD_W_ABS, NET + 8);
            a.stmt(ST, 0);
            a.stmt(LD_W_ABS, NET + 12);
        }
    }
    a.stmt(LDX_MEM, 0);
    a.stmt(XOR_X, 0);
    a.bind(key);
    if mode != Balance::Sticky {
        // Mix (Fibonacci hashing): ephemeral ports of one client step by 2, and `% n` of raw
        // ports would put them all on the same parity.
        a.stmt(MUL_K, 0x9E37_79B1);
        a.stmt(RSH_K, 16);
    }
    // A = key. Keep it in M[1] for the fallback.
    a.stmt(ST, 1);
    let spread = a.label();
    if mode == Balance::Sticky {
        // slot = key % slots → that slot's newest receiving member, else the spread below.
        let slots = slots.max(1);
        a.stmt(MOD_K, slots as u32);
        for s in 0..slots {
            let next = a.label();
            a.jeq(s as u32, None, Some(next));
            match receiving.iter().rev().find(|(_, slot)| *slot == s) {
                Some((index, _)) => a.stmt(RET_K, *index),
                None => a.ja(spread),
            }
            a.bind(next);
        }
    }
    // key % n → the n-th receiving member.
    a.bind(spread);
    a.stmt(LD_MEM, 1);
    a.stmt(MOD_K, receiving.len() as u32);
    for (n, (index, _)) in receiving.iter().enumerate() {
        let next = a.label();
        a.jeq(n as u32, None, Some(next));
        a.stmt(RET_K, *index);
        a.bind(next);
    }
    a.stmt(RET_K, first);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::super::interp::{run, v4, v6};
    use super::*;

    fn program(mode: Balance, receiving: &[(u32, usize)], slots: usize) -> Vec<BpfInsn> {
        super::program(mode, receiving, slots).unwrap()
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

    /// Over many sets of receiving members: every connection goes to a receiving member
    /// (never a draining or free one), `sticky` to its slot's newest receiving member when
    /// the slot has one, and the program never runs off its end.
    #[test]
    fn every_connection_goes_to_a_receiving_member_for_any_set() {
        for slots in [1usize, 2, 3, 7] {
            for mask in 1u32..64 {
                let receiving: Vec<(u32, usize)> = (0..6u32)
                    .filter(|i| mask & 1 << i != 0)
                    .map(|i| (i * 3 + 1, i as usize % slots))
                    .collect();
                let members: Vec<u32> = receiving.iter().map(|r| r.0).collect();
                let steer = program(Balance::Steer, &receiving, slots);
                let sticky = program(Balance::Sticky, &receiving, slots);
                for last in 1..=40u8 {
                    let port = 30000 + u16::from(last) * 7;
                    let m = run(&steer, &v4([10, 0, 0, last], port));
                    assert!(members.contains(&m), "steer {receiving:?}: {m}");
                    let client = [10, 0, 0, last];
                    let m = run(&sticky, &v4(client, port));
                    assert!(members.contains(&m), "sticky {receiving:?}: {m}");
                    let slot = u32::from_be_bytes(client) as usize % slots;
                    if let Some((newest, _)) = receiving.iter().rev().find(|(_, s)| *s == slot) {
                        assert_eq!(m, *newest, "sticky {receiving:?} slot {slot}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_jump_too_far_for_its_encoding_is_an_error() {
        let too_far = |n: usize| {
            let mut a = Asm::default();
            let far = a.label();
            a.jeq(0, Some(far), None);
            for _ in 0..n {
                a.stmt(RET_K, 0);
            }
            a.bind(far);
            a.stmt(RET_K, 1);
            a.finish().err()
        };
        assert_eq!(too_far(255), None, "jt holds 255");
        assert_eq!(too_far(256), Some(AsmError::OutOfRange { at: 0, offset: 256 }));
        // Classic BPF only jumps forward.
        let mut a = Asm::default();
        let back = a.label();
        a.bind(back);
        a.ja(back);
        assert_eq!(a.finish().err(), Some(AsmError::OutOfRange { at: 0, offset: -1 }));
    }
}
