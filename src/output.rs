//! Worker output routing: every line a worker writes reaches the supervisor's output with the
//! worker it came from attached.
//!
//! Each worker's stdout and stderr are pipes read by small tasks that cut the bytes into lines
//! (partial lines are held until their newline or end of stream; lines longer than
//! [`MAX_LINE`] are split) and send them, tagged, to one writer thread. The thread is the only
//! place that does blocking writes, so a slow terminal or pipe never stalls the event loop; a
//! full queue pushes back on the worker's pipe instead. Lines carry the worker id, pid and
//! generation: under systemd each line is a journal entry with them as fields
//! ([`Output::journal`]); standalone they go to the terminal (or JSON) and the `logs` ring.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::journal::split_priority;
use crate::logging::Sink;
pub use crate::logs::{Origin, Stream};
use crate::logs::{Record, Ring};
use tokio::sync::mpsc;

/// Longer lines are split into pieces of this size.
pub const MAX_LINE: usize = 16 * 1024;
/// How many recent lines are kept per worker for failure reports.
const TAIL_LINES: usize = 10;
const TAIL_LINE_CHARS: usize = 300;
const QUEUE: usize = 4096;

struct Line {
    origin: Arc<Origin>,
    stream: Stream,
    text: Vec<u8>,
    /// When it was read (µs since the epoch).
    at_us: u64,
}

/// The last lines a worker printed, for reports like "worker 1 exited with status 3: ...".
#[derive(Debug, Default, Clone)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: &[u8]) {
        let mut text = String::from_utf8_lossy(line).into_owned();
        if text.len() > TAIL_LINE_CHARS {
            let cut = (0..=TAIL_LINE_CHARS).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            text.truncate(cut);
            text.push('…');
        }
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == TAIL_LINES {
            q.pop_front();
        }
        q.push_back(text);
    }

    /// A tail that already holds `lines` (a worker taken over in an upgrade).
    pub fn from_lines(lines: Vec<String>) -> Tail {
        Tail(Arc::new(Mutex::new(lines.into_iter().rev().take(TAIL_LINES).rev().collect())))
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }
}

/// Handle to the output writer; cheap to clone.
#[derive(Clone)]
pub struct Output {
    tx: mpsc::Sender<Line>,
    /// Standalone: the ring `herdsman logs` reads (see [`crate::logs`]).
    ring: Option<Ring>,
}

impl Output {
    /// Standalone output: `ID|APP | line` on our stdout (worker stdout) or stderr (worker
    /// stderr), like `pm2 logs`; with `json` (`--log-format json`), one [`Record`] object
    /// per line instead. Every line is also kept in `ring` for `herdsman logs`.
    pub fn standalone(json: bool, ring: Ring) -> Self {
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let mut out = Self::with_writer(move |line| {
            let mut buf = Vec::with_capacity(line.text.len() + 32);
            if json {
                let o = &line.origin;
                let record = Record {
                    ts: crate::logs::rfc3339(line.at_us),
                    app: o.app.to_string(),
                    worker: o.worker_id,
                    pid: o.pid,
                    generation: o.generation,
                    stream: line.stream,
                    line: String::from_utf8_lossy(&line.text).into_owned(),
                };
                let _ = serde_json::to_writer(&mut buf, &record);
            } else {
                let _ = write!(buf, "{}|{} | ", line.origin.worker_id, line.origin.app);
                buf.extend_from_slice(&line.text);
            }
            buf.push(b'\n');
            let _ = match line.stream {
                Stream::Stdout => stdout.lock().write_all(&buf),
                Stream::Stderr => stderr.lock().write_all(&buf),
            };
        });
        out.ring = Some(ring);
        out
    }

    /// Under systemd: one journal entry per line, with the worker's fields, so that
    /// `journalctl -u herdsman@NAME WORKER_ID=2` shows exactly worker 2's lines and the
    /// default view reads `NAME/2[PID]: line`. `<N>` prefixes set the priority. Entries go
    /// through the log [`Sink`]: a stalled journald drops (and counts) lines instead of
    /// blocking anything.
    pub fn journal(sink: Sink) -> Self {
        Self::with_writer(move |line| {
            let (prio, text) = split_priority(&line.text);
            let o = &line.origin;
            let ident = format!("{}/{}", o.app, o.worker_id);
            let (id, pid, generation) =
                (o.worker_id.to_string(), o.pid.to_string(), o.generation.to_string());
            let prio = [b'0' + prio.unwrap_or(6)];
            let stream: &[u8] = match line.stream {
                Stream::Stdout => b"stdout",
                Stream::Stderr => b"stderr",
            };
            let fields: [(&str, &[u8]); 9] = [
                ("MESSAGE", text),
                ("PRIORITY", &prio),
                ("SYSLOG_IDENTIFIER", ident.as_bytes()),
                ("SYSLOG_PID", pid.as_bytes()),
                ("WORKER_ID", id.as_bytes()),
                ("WORKER_PID", pid.as_bytes()),
                ("WORKER_GENERATION", generation.as_bytes()),
                ("HERDSMAN_APP", o.app.as_bytes()),
                ("HERDSMAN_STREAM", stream),
            ];
            let mut fallback = Vec::with_capacity(ident.len() + text.len() + 3);
            fallback.extend_from_slice(ident.as_bytes());
            fallback.extend_from_slice(b": ");
            fallback.extend_from_slice(text);
            fallback.push(b'\n');
            sink.journal(&fields, fallback);
        })
    }

    /// Starts the writer thread: the only place where output blocks.
    fn with_writer(mut write: impl FnMut(Line) + Send + 'static) -> Self {
        let (tx, mut rx) = mpsc::channel::<Line>(QUEUE);
        std::thread::Builder::new()
            .name("herdsman-output".into())
            .spawn(move || {
                while let Some(line) = rx.blocking_recv() {
                    write(line);
                }
            })
            .expect("spawning the output thread");
        Output { tx, ring: None }
    }

    /// Waits (at most `limit`) until the writer thread has taken every queued line. Blocking:
    /// only for the moment before an upgrade's `execve`.
    pub fn flush(&self, limit: std::time::Duration) {
        let end = std::time::Instant::now() + limit;
        while self.tx.capacity() < self.tx.max_capacity() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Starts reading one worker stream. `done` is dropped at end of stream, so the
    /// supervisor can wait for a dead worker's last lines before reporting on it.
    pub fn capture(
        &self,
        fd: Arc<OwnedFd>,
        stream: Stream,
        origin: Arc<Origin>,
        tail: Tail,
        done: mpsc::Sender<()>,
    ) {
        let tx = self.tx.clone();
        let ring = self.ring.clone();
        tokio::spawn(async move {
            let _done = done;
            // The worker's entry keeps the same descriptor (for an in-place upgrade), so the
            // pipe is read through a shared handle, not owned by this task.
            let rx = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .map_err(std::io::Error::from)
            .and_then(|_| crate::sys::watch_readable(fd));
            let rx = match rx {
                Ok(rx) => rx,
                Err(e) => {
                    tracing::warn!("cannot read worker {} output: {e}", origin.worker_id);
                    return;
                }
            };
            let mut pending: Vec<u8> = Vec::new();
            let emit = |text: Vec<u8>| {
                let tx = tx.clone();
                let origin = origin.clone();
                let tail = tail.clone();
                let now = std::time::SystemTime::now();
                if let Some(ring) = &ring {
                    ring.push(&origin, stream, &text, now);
                }
                async move {
                    tail.push(&text);
                    let at_us = crate::logs::unix_us(now);
                    let _ = tx.send(Line { origin, stream, text, at_us }).await;
                }
            };
            loop {
                let got = match rx.readable().await {
                    Ok(mut guard) => guard.try_io(|fd| {
                        // On the (one) loop thread's stack for the read only: a buffer held by
                        // each reader was 8 KiB of heap per stream of every worker, old and new
                        // during a reload, mostly for workers that never print.
                        let mut chunk = [0u8; 8192];
                        let n = nix::unistd::read(fd.get_ref().as_raw_fd(), &mut chunk)
                            .map_err(std::io::Error::from)?;
                        pending.extend_from_slice(&chunk[..n]);
                        Ok(n)
                    }),
                    Err(_) => break,
                };
                match got {
                    Err(_would_block) => continue,
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {}
                }
                for line in split_lines(&mut pending) {
                    emit(line).await;
                }
                if pending.is_empty() {
                    // Holds no capacity between lines (a burst would otherwise keep its size).
                    pending = Vec::new();
                }
            }
            if !pending.is_empty() {
                emit(std::mem::take(&mut pending)).await;
            }
        });
    }
}

/// Takes every complete line (and every full `MAX_LINE` piece) out of `pending`.
fn split_lines(pending: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let rest = &pending[start..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(pos) if pos <= MAX_LINE => {
                let mut line = rest[..pos].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                out.push(line);
                start += pos + 1;
            }
            _ if rest.len() >= MAX_LINE => {
                out.push(rest[..MAX_LINE].to_vec());
                start += MAX_LINE;
            }
            _ => break,
        }
    }
    pending.drain(..start);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let mut p = b"one\ntw".to_vec();
        assert_eq!(split_lines(&mut p), vec![b"one".to_vec()]);
        assert_eq!(p, b"tw");
        p.extend_from_slice(b"o\r\n");
        assert_eq!(split_lines(&mut p), vec![b"two".to_vec()]);
        assert!(p.is_empty());
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        let mut p = vec![b'x'; MAX_LINE * 2 + 5];
        let lines = split_lines(&mut p);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let t = Tail::default();
        for i in 0..25 {
            t.push(format!("line {i}").as_bytes());
        }
        let lines = t.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.last().unwrap(), "line 24");
    }
}
