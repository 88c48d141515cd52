//! The IPC channel of a Node worker: what PM2 gives every Node app it forks, so that unchanged
//! PM2 apps can say `process.send('ready')` (PM2's `wait_ready`) and hear PM2's `'shutdown'`
//! message (`shutdown_with_message`).
//!
//! Node opens the channel when it finds `NODE_CHANNEL_FD` in its environment: one end of a
//! `socketpair(AF_UNIX, SOCK_STREAM)`, placed by herdsman in the worker right after its
//! listening sockets (`3 + LISTEN_FDS`, never 3.., which are the sockets), with
//! `NODE_CHANNEL_SERIALIZATION_MODE=json`. The protocol is one JSON value per line in both
//! directions: `process.send('ready')` arrives as `"ready"\n`, and `"shutdown"\n` makes the app's
//! `process.on('message')` see `'shutdown'`. Node's own messages (`{"cmd":"NODE_..."}`) are
//! ignored, as is anything else an app sends (logged at debug level).
//!
//! Only Node workers get a channel (the program's file name is `node` or `nodejs`): any other
//! program would just hold a stray descriptor. The supervisor keeps its end (close-on-exec,
//! non-blocking) with the worker's record, reads it from one task per worker, and hands it to
//! the next image in an in-place upgrade.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};

/// PM2's stop request (`shutdown_with_message`), sent with `--stop-signal message`.
pub const SHUTDOWN: &str = "shutdown";

/// What the channel's `NODE_CHANNEL_SERIALIZATION_MODE` is.
pub const SERIALIZATION: &str = "json";

/// A line longer than this is dropped (up to its newline): an app cannot make the supervisor
/// buffer without bound.
const MAX_LINE: usize = 64 * 1024;

/// Whether `program` (as written or resolved: the file name is the same) is Node, which gets
/// an IPC channel.
pub fn is_node(program: &str) -> bool {
    matches!(std::path::Path::new(program).file_name().and_then(|n| n.to_str()), Some("node" | "nodejs"))
}

/// A new channel: `(supervisor's end, worker's end)`. Both close-on-exec (the worker's end is
/// placed with `dup2`, which clears the flag on the copy); the supervisor's end is
/// non-blocking. The two ends are separate open file descriptions, so the worker's end keeps
/// the blocking mode Node expects.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
        .map_err(io::Error::from)?;
    set_nonblocking(&ours)?;
    Ok((ours, theirs))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What a worker said that herdsman acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `process.send('ready')`: PM2's `wait_ready`, the same as `READY=1`.
    Ready,
}

/// One line from the worker: `Some` for what herdsman acts on; Node's internal messages and
/// everything else are `None`.
pub fn parse(line: &[u8]) -> Option<Incoming> {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => {
            tracing::debug!("IPC: not a JSON line, ignored: {:?}", String::from_utf8_lossy(line));
            return None;
        }
    };
    match &value {
        serde_json::Value::String(s) if s == "ready" => Some(Incoming::Ready),
        serde_json::Value::Object(o)
            if o.get("cmd").and_then(|c| c.as_str()).is_some_and(|c| c.starts_with("NODE_")) =>
        {
            None
        }
        other => {
            tracing::debug!("IPC: message ignored: {other}");
            None
        }
    }
}

/// Splits bytes read from the channel into lines, dropping overlong ones.
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
    /// Inside an overlong line: skip up to its newline.
    skipping: bool,
}

impl Lines {
    /// Feeds `bytes`; returns the messages of the lines they completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Incoming> {
        let mut out = Vec::new();
        for part in bytes.split_inclusive(|b| *b == b'\n') {
            let complete = part.ends_with(b"\n");
            let body = if complete { &part[..part.len() - 1] } else { part };
            if !self.skipping {
                if self.buf.len() + body.len() > MAX_LINE {
                    tracing::debug!("IPC: a line over {MAX_LINE} bytes was dropped");
                    self.buf.clear();
                    self.skipping = true;
                } else {
                    self.buf.extend_from_slice(body);
                }
            }
            if complete {
                if !self.skipping && !self.buf.iter().all(u8::is_ascii_whitespace) {
                    out.extend(parse(&self.buf));
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
        out
    }
}

/// Reads the supervisor's end of a channel until the worker closes it (or exits), calling
/// `on` for every message herdsman acts on.
pub async fn read(fd: Arc<OwnedFd>, mut on: impl FnMut(Incoming)) {
    let afd = match crate::sys::watch_readable(fd.clone()) {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("IPC: cannot watch the channel: {e}");
            return;
        }
    };
    let mut lines = Lines::default();
    let mut buf = [0u8; 4096];
    loop {
        let Ok(mut guard) = afd.readable().await else { return };
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => lines.feed(&buf[..n]).into_iter().for_each(&mut on),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::debug!("IPC: reading the channel: {e}");
                return;
            }
        }
    }
}

/// Sends `message` (a JSON string, e.g. PM2's `shutdown`) as one line. Never blocks and never
/// raises `SIGPIPE`: a worker that closed its end, or whose end is full, is an error.
pub fn send(fd: &OwnedFd, message: &str) -> io::Result<()> {
    let mut line = serde_json::Value::String(message.to_string()).to_string();
    line.push('\n');
    let n = nix::sys::socket::send(
        fd.as_raw_fd(),
        line.as_bytes(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )?;
    if n < line.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "the channel took only part of the message"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_recognised_by_the_programs_file_name() {
        for p in ["node", "nodejs", "/usr/bin/node", "/home/u/.nvm/versions/node/v20.1.0/bin/node"] {
            assert!(is_node(p), "{p}");
        }
        for p in ["npm", "python3", "/usr/bin/node20", "node.sh", "/opt/node/bin/bun", ""] {
            assert!(!is_node(p), "{p}");
        }
    }

    #[test]
    fn only_the_ready_string_counts_and_node_internal_messages_are_ignored() {
        assert_eq!(parse(br#""ready""#), Some(Incoming::Ready));
        assert_eq!(parse(br#"{"cmd":"NODE_HANDLE_ACK"}"#), None);
        assert_eq!(parse(br#"{"type":"process:msg","data":{"x":1}}"#), None);
        assert_eq!(parse(br#""shutdown""#), None);
        assert_eq!(parse(b"ready"), None, "not JSON");
        assert_eq!(parse(br#"{"cmd":"ready"}"#), None);
    }

    #[test]
    fn lines_are_split_across_reads_and_overlong_ones_are_dropped() {
        let mut l = Lines::default();
        assert_eq!(l.feed(b"\"rea"), vec![]);
        assert_eq!(
            l.feed(b"dy\"\n{\"cmd\":\"NODE_X\"}\n\n\"ready\"\n"),
            vec![Incoming::Ready, Incoming::Ready]
        );
        let mut long = vec![b'"'];
        long.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        assert_eq!(l.feed(&long), vec![]);
        assert_eq!(l.feed(b"\"ready\"\n"), vec![], "still the overlong line");
        assert_eq!(l.feed(b"\"ready\"\n"), vec![Incoming::Ready]);
    }

    #[test]
    fn a_message_is_one_json_line_and_a_closed_peer_is_an_error_not_a_signal() {
        let (ours, theirs) = pair().unwrap();
        send(&ours, "shutdown").unwrap();
        let mut buf = [0u8; 64];
        let n = nix::unistd::read(theirs.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"\"shutdown\"\n");
        drop(theirs);
        assert!(send(&ours, "shutdown").is_err(), "EPIPE, and this process is still alive");
    }

    #[tokio::test]
    async fn the_reader_reports_ready_and_ends_when_the_worker_closes_its_end() {
        let (ours, theirs) = pair().unwrap();
        let mut worker = std::os::unix::net::UnixStream::from(theirs);
        std::io::Write::write_all(&mut worker, b"{\"cmd\":\"NODE_X\"}\n\"ready\"\n").unwrap();
        drop(worker);
        let mut got = Vec::new();
        tokio::time::timeout(std::time::Duration::from_secs(30), read(Arc::new(ours), |m| got.push(m)))
            .await
            .unwrap();
        assert_eq!(got, vec![Incoming::Ready]);
    }
}
