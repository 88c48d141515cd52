//! Today's program bytes, recorded from the builders as they were before the labelled
//! assembler (commit 1fda19d) in `golden.txt`: the assembler must produce them exactly.

use crate::config::Balance;
use crate::sys::{BpfInsn, EbpfInsn};

use super::ebpf::round_robin_program;
use super::program;

/// FNV-1a: a digest that is stable across Rust versions (unlike `DefaultHasher`).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// `struct sock_filter` as the kernel reads it (little-endian here).
fn cbpf_bytes(p: &[BpfInsn]) -> Vec<u8> {
    p.iter()
        .flat_map(|i| {
            let mut v = i.code.to_le_bytes().to_vec();
            v.extend([i.jt, i.jf]);
            v.extend(i.k.to_le_bytes());
            v
        })
        .collect()
}

/// `struct bpf_insn` as the kernel reads it (little-endian here).
fn ebpf_bytes(p: &[EbpfInsn]) -> Vec<u8> {
    p.iter()
        .flat_map(|i| {
            let mut v = vec![i.code, i.regs];
            v.extend(i.off.to_le_bytes());
            v.extend(i.imm.to_le_bytes());
            v
        })
        .collect()
}
/// A builder's input: mode, slots, receiving (member index, slot).
type Case = (Balance, usize, Vec<(u32, usize)>);

/// The inputs the bytes are recorded for: every subset of 8 members over 5 slot counts, in
/// each mode, and three large pools.
fn cases() -> Vec<Case> {
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

/// One line per group of cases: its digest (the small ones folded together per mode and
/// slot count, the large ones each with its length).
fn golden(
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

/// The bytes the labelled builders produce, for the inputs of [`cases`], match the ones the
/// patched-index builders produced (`golden.txt`, written by the same [`golden`] function).
#[test]
fn the_labelled_builders_produce_the_same_bytes_as_before() {
    let now = golden(
        |m, r, s| cbpf_bytes(&program(m, r, s).unwrap()),
        |t, r, k| ebpf_bytes(&round_robin_program(t, r, k).unwrap()),
    );
    let before = include_str!("golden.txt");
    for (a, b) in now.lines().zip(before.lines()) {
        assert_eq!(a, b);
    }
    assert_eq!(now.lines().count(), before.lines().count());
}
