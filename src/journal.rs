//! journald's native protocol, for worker lines under systemd.
//!
//! Why by hand: the output writer must attach *per-worker* fields (`WORKER_ID`, `WORKER_PID`,
//! `WORKER_GENERATION`) that `journalctl -u herdsman@NAME WORKER_ID=2` filters on. The stream
//! transport (stdout to journald) cannot carry custom fields, and a tracing-to-journal crate
//! writes tracing events, not other processes' lines (herdsman's own events use this module
//! too, through `logging`'s writer thread). The protocol is small: one datagram of `KEY=value\n` fields, with a length-prefixed form for
//! values that contain a newline.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// Where journald listens for native-protocol datagrams.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// Encodes fields as one native-protocol datagram.
pub fn encode(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|(k, v)| k.len() + v.len() + 10).sum());
    for (key, value) in fields {
        out.extend_from_slice(key.as_bytes());
        if value.contains(&b'\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

/// A leading `<N>` (N = 0..7) sets the syslog priority, as journald does for stdout streams.
pub fn split_priority(line: &[u8]) -> (Option<u8>, &[u8]) {
    match line {
        [b'<', d @ b'0'..=b'7', b'>', rest @ ..] => (Some(d - b'0'), rest),
        _ => (None, line),
    }
}

/// Whether our stderr is connected to the journal (`JOURNAL_STREAM` names its device:inode).
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|s| s.split_once(':')) else { return false };
    let Ok(st) = nix::sys::stat::fstat(2) else { return false };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Sends datagrams to journald.
pub struct Journal {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    pub fn connect(path: &Path) -> std::io::Result<Self> {
        Ok(Journal { sock: UnixDatagram::unbound()?, path: path.to_path_buf() })
    }

    /// Sends one entry. Blocks while journald's socket is full: call it only from the log
    /// writer thread (see [`crate::logging`]), never from the event loop.
    #[cfg(test)]
    pub fn send(&self, fields: &[(&str, &[u8])]) -> std::io::Result<()> {
        self.send_raw(&encode(fields))
    }

    /// Sends one already encoded entry (blocking, as [`Journal::send`]).
    pub fn send_raw(&self, datagram: &[u8]) -> std::io::Result<()> {
        self.sock.send_to(datagram, &self.path).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_multiline_values() {
        let d = encode(&[("MESSAGE", b"hi"), ("X", b"a\nb")]);
        let mut want = b"MESSAGE=hi\nX\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(d, want);
    }

    #[test]
    fn priority_prefixes() {
        assert_eq!(split_priority(b"<3>boom"), (Some(3), &b"boom"[..]));
        assert_eq!(split_priority(b"<9>x"), (None, &b"<9>x"[..]));
        assert_eq!(split_priority(b"plain"), (None, &b"plain"[..]));
    }

    #[test]
    fn datagrams_reach_a_listening_socket() {
        let dir = std::env::temp_dir().join(format!("herdsman-journal-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        Journal::connect(&path).unwrap().send(&[("MESSAGE", b"x"), ("WORKER_ID", b"2")]).unwrap();
        let mut buf = [0u8; 128];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MESSAGE=x\nWORKER_ID=2\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
