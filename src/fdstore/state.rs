//! The state memfd: the supervisor's serialized state (with the core/driver split, the
//! serialized core: the same bytes an in-place upgrade hands over), kept in systemd's fd store
//! so a restarted supervisor knows what its re-adopted workers are (pidfds carry no slot, no
//! generation, no readiness).
//!
//! A crash can come in the middle of a write, so a write must never leave a torn state that
//! parses. Two memfds, `state-a` and `state-b`, stored once each (`FDPOLL=0`), are written in
//! turn: each write goes to the one that does *not* hold the newest state, as
//! `header + payload`, where the header is
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..8  | magic `HDSTATE1` |
//! | 8..16 | sequence number (u64 LE), one more than the newest so far |
//! | 16..24 | payload length (u64 LE) |
//! | 24..32 | FNV-1a 64 of sequence, length and payload (u64 LE) |
//!
//! A reader ([`newest`]) takes the valid copy with the higher sequence. A write cut short
//! leaves its copy with a checksum that does not match (or too short), so the other copy, the
//! previous state, is taken. Only `pwrite`/`pread` are used: the file offset is shared with
//! systemd's copy of the descriptor and never moves.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// The names the two copies are stored under (without `fdstore::PREFIX`).
pub const NAMES: [&str; 2] = ["state-a", "state-b"];

const MAGIC: &[u8; 8] = b"HDSTATE1";
const HEADER: usize = 32;
/// Largest state accepted back (a corrupt length must not make us allocate gigabytes).
pub const MAX_STATE: u64 = 256 << 20;

/// FNV-1a, 64 bits: detects a torn write (not an adversary: only herdsman and systemd hold
/// the memfd). Written out so the format does not depend on a hasher's version.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The bytes written for `payload` at sequence `seq`.
pub fn encode(seq: u64, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u64;
    let sum = fnv1a(&[&seq.to_le_bytes(), &len.to_le_bytes(), payload]);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// One copy's sequence and payload, if it is whole.
pub fn decode(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let u64_at =
        |i: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes.get(i..i + 8)?.try_into().ok()?)) };
    if bytes.get(..8)? != MAGIC {
        return None;
    }
    let (seq, len, sum) = (u64_at(8)?, u64_at(16)?, u64_at(24)?);
    let end = HEADER.checked_add(usize::try_from(len).ok()?)?;
    let payload = bytes.get(HEADER..end)?;
    (fnv1a(&[&seq.to_le_bytes(), &len.to_le_bytes(), payload]) == sum).then_some((seq, payload))
}

/// The newest whole copy among `copies` (its index, sequence and payload).
pub fn newest<'a>(copies: &[&'a [u8]]) -> Option<(usize, u64, &'a [u8])> {
    copies
        .iter()
        .enumerate()
        .filter_map(|(i, c)| decode(c).map(|(seq, p)| (i, seq, p)))
        .max_by_key(|(_, seq, _)| *seq)
}

/// The two memfds and which one the next write goes to.
#[derive(Debug)]
pub struct StateFile {
    copies: [File; 2],
    /// The sequence of the newest whole copy (0: none yet).
    seq: u64,
    /// The copy the next write goes to (never the newest whole one).
    next: usize,
}

impl StateFile {
    /// Two fresh, empty memfds (close-on-exec). Store both once with [`StateFile::fds`]
    /// (`FDPOLL=0`), then [`StateFile::write`] on every change.
    pub fn create() -> io::Result<StateFile> {
        let make = |name: &std::ffi::CStr| -> io::Result<File> {
            let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
            Ok(File::from(fd))
        };
        Ok(StateFile { copies: [make(c"herdsman-state-a")?, make(c"herdsman-state-b")?], seq: 0, next: 0 })
    }

    /// Takes `state-a` and `state-b` out of what the fd store passed back, and the newest
    /// whole state in them. `None` when either is missing (a fresh start, or a store that
    /// lost one: start over with [`StateFile::create`]); the payload is `None` when neither
    /// copy is whole. Writes continue in these same memfds (already in the store).
    pub fn take(stored: &mut BTreeMap<String, OwnedFd>) -> Option<(StateFile, Option<Vec<u8>>)> {
        if !NAMES.iter().all(|n| stored.contains_key(*n)) {
            return None;
        }
        let mut files = NAMES.map(|n| stored.remove(n).map(File::from));
        let (Some(a), Some(b)) = (files[0].take(), files[1].take()) else { return None };
        let read = |f: &File| read_all(f).unwrap_or_default();
        let (ba, bb) = (read(&a), read(&b));
        let found = newest(&[&ba, &bb]);
        let (seq, next, payload) = match found {
            Some((i, seq, p)) => (seq, 1 - i, Some(p.to_vec())),
            None => (0, 0, None),
        };
        Some((StateFile { copies: [a, b], seq, next }, payload))
    }

    /// The two memfds with the names to store them under (with `FDPOLL=0`: a memfd never
    /// hangs up, but nothing about it must make systemd drop it).
    pub fn fds(&self) -> [(&'static str, BorrowedFd<'_>); 2] {
        [(NAMES[0], self.copies[0].as_fd()), (NAMES[1], self.copies[1].as_fd())]
    }

    /// Writes `payload` as the new newest state, into the copy that does not hold the current
    /// one. On error that copy is left torn (never read back) and the previous state stands.
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let seq = self.seq + 1;
        let bytes = encode(seq, payload);
        let file = &self.copies[self.next];
        file.write_all_at(&bytes, 0)?;
        file.set_len(bytes.len() as u64)?;
        self.seq = seq;
        self.next = 1 - self.next;
        Ok(())
    }

    /// The sequence number of the newest state written or read (0: none).
    #[cfg(test)]
    pub fn sequence(&self) -> u64 {
        self.seq
    }
}

/// The whole file, with `pread` (the offset is shared with systemd's copy and never moves).
fn read_all(f: &File) -> io::Result<Vec<u8>> {
    let len = f.metadata()?.len();
    if len > MAX_STATE + HEADER as u64 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "state memfd too large"));
    }
    let mut buf = vec![0u8; len as usize];
    let mut at = 0;
    while at < buf.len() {
        match f.read_at(&mut buf[at..], at as u64)? {
            0 => break,
            n => at += n,
        }
    }
    buf.truncate(at);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_copy_round_trips_and_anything_else_is_refused() {
        let b = encode(7, b"{\"slots\":3}");
        assert_eq!(decode(&b), Some((7, &b"{\"slots\":3}"[..])));
        assert_eq!(decode(&encode(1, b"")), Some((1, &b""[..])));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(&b[..HEADER - 1]), None, "a torn header");
        // Every cut of a write in progress over zeros (a fresh memfd) is refused.
        for cut in 0..b.len() {
            let mut torn = b[..cut].to_vec();
            torn.resize(b.len(), 0);
            assert_eq!(decode(&torn), None, "cut at {cut}");
            assert_eq!(decode(&b[..cut]), None, "truncated at {cut}");
        }
        let mut flipped = b.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&flipped), None, "a changed payload byte");
        let mut huge = b.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode(&huge), None, "a length past the end");
    }

    #[test]
    fn a_write_cut_anywhere_over_an_older_state_leaves_the_previous_one() {
        // Copy A holds state 3; copy B held state 2 and is being overwritten with state 4
        // (longer) when the crash comes: whatever prefix of state 4 reached B, over the rest
        // of state 2, the reader takes state 3.
        let a = encode(3, b"three");
        let old_b = encode(2, b"two");
        let new_b = encode(4, b"four, and longer than the old one");
        for cut in 0..new_b.len() {
            let mut b = old_b.clone();
            if b.len() < cut {
                b.resize(cut, 0);
            }
            b[..cut].copy_from_slice(&new_b[..cut]);
            let got = newest(&[&a, &b]).map(|(i, seq, p)| (i, seq, p.to_vec()));
            assert_eq!(got, Some((0, 3, b"three".to_vec())), "cut at {cut}");
        }
        // Written whole (the set_len after it may not have happened: a longer old tail).
        let mut b = encode(4, b"4");
        b.extend_from_slice(b"left over from an older, longer state");
        assert_eq!(newest(&[&a, &b]).map(|(i, seq, _)| (i, seq)), Some((1, 4)));
        assert_eq!(newest(&[b"", b"junk"]), None);
    }

    #[test]
    fn writes_alternate_and_a_restart_reads_the_newest_and_continues() {
        let mut s = StateFile::create().unwrap();
        s.write(b"one").unwrap();
        s.write(b"two").unwrap();
        s.write(b"three").unwrap();
        assert_eq!(s.sequence(), 3);
        // What the fd store would pass back after a crash: copies of the two memfds.
        let mut stored = BTreeMap::new();
        for (name, fd) in s.fds() {
            stored.insert(name.to_string(), fd.try_clone_to_owned().unwrap());
        }
        stored.insert("pidfd-0-1-9".to_string(), crate::sys::pipe_cloexec().unwrap().0);
        let (mut again, payload) = StateFile::take(&mut stored).unwrap();
        assert_eq!(payload.as_deref(), Some(&b"three"[..]));
        assert_eq!(stored.keys().collect::<Vec<_>>(), ["pidfd-0-1-9"], "the state fds were taken");
        // A crash while writing the next state: the one being written is torn, "three" stays.
        let target = &again.copies[again.next];
        target.write_all_at(&encode(4, b"four")[..20], 0).unwrap();
        let (ba, bb) = (read_all(&again.copies[0]).unwrap(), read_all(&again.copies[1]).unwrap());
        assert_eq!(newest(&[&ba, &bb]).map(|(_, seq, p)| (seq, p.to_vec())), Some((3, b"three".to_vec())));
        again.write(b"four").unwrap();
        let (ba, bb) = (read_all(&again.copies[0]).unwrap(), read_all(&again.copies[1]).unwrap());
        assert_eq!(newest(&[&ba, &bb]).map(|(_, seq, p)| (seq, p.to_vec())), Some((4, b"four".to_vec())));
        assert!(StateFile::take(&mut BTreeMap::new()).is_none(), "nothing stored: a fresh start");
    }
}
