//! Field offsets from the kernel's own type information (BTF, `/sys/kernel/btf/vmlinux`).
//!
//! `steer`'s shortest-queue program reads two kernel fields that no BPF context exposes: the
//! socket pointers of a `REUSEPORT_SOCKARRAY` (`struct reuseport_array.ptrs`) and a listener's
//! accept-queue length (`struct sock.sk_ack_backlog`). Their offsets change between kernel
//! builds, so they are looked up here, in the running kernel's BTF, the way libbpf's CO-RE
//! relocations do. A wrong or missing offset only disables that program (steer then takes
//! plain turns): the program picks *among* receiving members, so a bad read could never send a
//! connection to a worker that is not receiving.
//!
//! Hand-written because it is one linear walk over a documented format
//! (Documentation/bpf/btf.rst) for two lookups; `aya-obj` or `libbpf-rs` would bring a BPF
//! loader or a C library for it.

use std::io;

/// The kernel's BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One type: its kind, name, `size` (or referenced type) word and where its extra data starts.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    name: u32,
    size_or_type: u32,
    extra: usize,
}

/// The parsed type section (types only; names are read on demand).
#[derive(Debug)]
pub struct Btf {
    data: Vec<u8>,
    strings: std::ops::Range<usize>,
    /// Index = type id - 1.
    types: Vec<Type>,
}

/// What a member's type is, after typedefs and qualifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// An integer of this many bytes.
    Int(u32),
    /// An array of pointers.
    PointerArray,
    Other,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed BTF: {what}"))
}

impl Btf {
    pub fn read(path: &str) -> io::Result<Btf> {
        Btf::parse(std::fs::read(path)?)
    }

    pub fn parse(data: Vec<u8>) -> io::Result<Btf> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
        let u32_at = |o: usize| data.get(o..o + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(MAGIC) {
            return Err(bad("no magic (or another byte order)"));
        }
        let field = |o: usize| u32_at(o).map(|v| v as usize).ok_or_else(|| bad("short header"));
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(4)?, field(8)?, field(12)?, field(16)?, field(20)?);
        let types_at = hdr_len + type_off;
        let types_end = types_at + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if types_end > data.len() || strings.end > data.len() {
            return Err(bad("sections past the end"));
        }
        let mut types = Vec::new();
        let mut at = types_at;
        while at < types_end {
            let word = |o: usize| u32_at(at + o).ok_or_else(|| bad("short type"));
            let info = word(4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            let extra = at + 12;
            let len = match kind {
                KIND_INT | 14 | 17 => 4,                         // INT, VAR, DECL_TAG
                KIND_ARRAY => 12,                                // btf_array
                KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen, // members, DATASEC, ENUM64
                6 | 13 => 8 * vlen,                              // ENUM, FUNC_PROTO
                KIND_PTR | 7 | KIND_TYPEDEF..=12 | 16 | KIND_TYPE_TAG => 0,
                _ => return Err(bad("unknown kind")),
            };
            types.push(Type {
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                name: word(0)?,
                size_or_type: word(8)?,
                extra,
            });
            at = extra + len;
        }
        Ok(Btf { data, strings, types })
    }

    fn u32_at(&self, o: usize) -> u32 {
        self.data.get(o..o + 4).map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings.start + off as usize;
        let rest = self.data.get(start..self.strings.end).unwrap_or(&[]);
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// The byte offset of `member` in `struct name`, and what it is.
    pub fn member(&self, name: &str, member: &str) -> Option<(u32, Shape)> {
        let st = self.types.iter().find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())?;
        (0..st.vlen).find_map(|i| {
            let at = st.extra + 12 * i;
            if self.name(self.u32_at(at)) != member.as_bytes() {
                return None;
            }
            let raw = self.u32_at(at + 8);
            // With kind_flag, the top 8 bits are a bitfield's size; a bitfield is no use here.
            let bits = if st.kind_flag {
                if raw >> 24 != 0 {
                    return None;
                }
                raw & 0xff_ffff
            } else {
                raw
            };
            (bits % 8 == 0).then(|| (bits / 8, self.shape(self.u32_at(at + 4))))
        })
    }

    fn shape(&self, mut id: u32) -> Shape {
        for _ in 0..16 {
            let Some(t) = self.get(id) else { return Shape::Other };
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                KIND_INT => return Shape::Int(t.size_or_type),
                KIND_ARRAY => {
                    let elem = self.u32_at(t.extra);
                    return match self.resolve(elem).map(|e| e.kind) {
                        Some(KIND_PTR) => Shape::PointerArray,
                        _ => Shape::Other,
                    };
                }
                _ => return Shape::Other,
            }
        }
        Shape::Other
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_the_fields_steer_reads() {
        let Ok(btf) = Btf::read(VMLINUX) else {
            eprintln!("SKIP: no {VMLINUX} on this kernel");
            return;
        };
        let (backlog, shape) = btf.member("sock", "sk_ack_backlog").expect("struct sock has sk_ack_backlog");
        assert_eq!(shape, Shape::Int(4));
        assert!(backlog > 0);
        let (ptrs, shape) = btf.member("reuseport_array", "ptrs").expect("reuseport_array.ptrs");
        assert_eq!(shape, Shape::PointerArray);
        assert!(ptrs > 0);
        assert_eq!(btf.member("sock", "no_such_field"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for data in
            [vec![], vec![0x9f, 0xeb], vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0]]
        {
            assert!(Btf::parse(data).is_err());
        }
        // A header whose sections fit, with one truncated type.
        let mut d = vec![0u8; 24 + 6];
        d[..2].copy_from_slice(&MAGIC.to_ne_bytes());
        d[4..8].copy_from_slice(&24u32.to_ne_bytes());
        d[12..16].copy_from_slice(&6u32.to_ne_bytes());
        assert!(Btf::parse(d).is_err());
    }
}
