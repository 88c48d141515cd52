//! `herdsman logs`: the workers' recent lines, like `pm2 logs`.
//!
//! Where the lines are depends on where they went:
//! * **standalone** (`herdsman run` outside systemd), the supervisor keeps a bounded ring of
//!   the app's recent worker lines ([`Ring`], fed by [`crate::output`] where the worker pipes
//!   are read) and serves it over the control socket (`{"op":"logs"}`, see
//!   docs/control.md); `-f` keeps the connection open and streams new lines;
//! * **under systemd**, worker lines are journal entries with `WORKER_ID` & co. (see
//!   [`crate::output`]); the supervisor keeps no ring and answers `logs` with the unit to read,
//!   and the client reads the journal itself ([`journal`]); an app installed with `init` whose
//!   supervisor is not running is read from the journal too.
//!
//! Every line is a [`Record`], whichever the source: its JSON form (`--json`, and worker lines
//! under `run --log-format json`) has exactly the keys `ts`, `app`, `worker`, `pid`,
//! `generation`, `stream`, `line`.
//!
//! The ring's bounds: at most [`RING_LINES`] lines and [`RING_BYTES`] bytes (text plus a fixed
//! [`ENTRY_OVERHEAD`] per line), the oldest lines going first; a line longer than
//! [`LINE_BYTES`] is kept cut to that (at a character boundary) with `…` appended. A follower
//! (`-f`) gets new lines through its own queue of [`FOLLOW_QUEUE`] lines, filled without
//! waiting: when the follower reads slower than workers write, lines are dropped for it alone
//! (never for the ring, the terminal or the journal, and the loop never waits), and it is told
//! how many.

pub mod journal;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The ring keeps at most this many lines...
pub const RING_LINES: usize = 10_000;
/// ... and at most this many bytes (each line's text plus [`ENTRY_OVERHEAD`]).
pub const RING_BYTES: usize = 4 << 20;
/// What one kept line costs besides its text (the record's other fields and allocations).
pub const ENTRY_OVERHEAD: usize = 128;
/// Longer lines are kept cut to this many bytes, `…` appended.
pub const LINE_BYTES: usize = 4096;
/// A follower's queue: lines beyond it, while the follower does not read, are dropped for it.
pub const FOLLOW_QUEUE: usize = 1024;
/// `herdsman logs` without `-n` prints this many lines (as `pm2 logs`).
pub const DEFAULT_LINES: usize = 15;

/// Which of a worker's streams a line came from (`"stdout"`/`"stderr"` in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Who wrote a line.
#[derive(Debug)]
pub struct Origin {
    pub app: Arc<str>,
    pub worker_id: usize,
    pub pid: i32,
    pub generation: u64,
}

/// One worker line. The JSON keys are a stable interface (`logs --json`, `run --log-format
/// json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the supervisor read it (the journal's receive time under systemd): RFC 3339,
    /// UTC, microseconds.
    pub ts: String,
    pub app: String,
    /// The worker's slot id (`WORKER_ID`, `HERDSMAN_WORKER_ID`).
    pub worker: usize,
    pub pid: i32,
    pub generation: u64,
    pub stream: Stream,
    pub line: String,
}

impl Record {
    /// A line as `pm2 logs` shows it, with the stream: `2|web | out | text`.
    pub fn text(&self) -> String {
        let stream = match self.stream {
            Stream::Stdout => "out",
            Stream::Stderr => "err",
        };
        format!("{}|{} | {stream} | {}", self.worker, self.app, self.line)
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// RFC 3339 in UTC with microseconds.
pub fn rfc3339(us: u64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_micros(us);
    humantime::format_rfc3339_micros(t).to_string()
}

/// `text` as UTF-8 (lossy), cut to [`LINE_BYTES`] at a character boundary with `…`.
fn kept_text(text: &[u8]) -> String {
    let cut = text.len().min(LINE_BYTES);
    let mut s = String::from_utf8_lossy(&text[..cut]).into_owned();
    if text.len() > LINE_BYTES {
        // A multi-byte character cut in two became U+FFFD: drop it, then mark the cut.
        if s.ends_with('\u{fffd}') {
            s.pop();
        }
        s.push('…');
    }
    s
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// The last this many (of those that pass the filters).
    pub lines: usize,
    pub worker: Option<usize>,
    /// Only lines read at or after this time (µs since the epoch).
    pub since_us: Option<u64>,
}

impl Query {
    fn wants(&self, at_us: u64, r: &Record) -> bool {
        self.worker.is_none_or(|w| w == r.worker) && self.since_us.is_none_or(|s| at_us >= s)
    }
}

/// The supervisor's ring of recent worker lines; cheap to clone. Pushing never waits.
#[derive(Clone, Default)]
pub struct Ring(Arc<Mutex<Inner>>);

#[derive(Default)]
struct Inner {
    lines: VecDeque<(u64, Arc<Record>)>,
    bytes: usize,
    followers: Vec<Follower>,
}

struct Follower {
    tx: mpsc::Sender<Arc<Record>>,
    worker: Option<usize>,
    dropped: Arc<AtomicU64>,
}

/// A follower's end: new lines, and how many were dropped for it since it last looked.
pub struct Subscription {
    pub rx: mpsc::Receiver<Arc<Record>>,
    dropped: Arc<AtomicU64>,
}

impl Subscription {
    /// Lines dropped for this follower since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

impl Ring {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps one worker line (read at `now`) and hands it to every follower that has room.
    pub fn push(&self, origin: &Origin, stream: Stream, text: &[u8], now: SystemTime) {
        let at = unix_us(now);
        let rec = Arc::new(Record {
            ts: rfc3339(at),
            app: origin.app.to_string(),
            worker: origin.worker_id,
            pid: origin.pid,
            generation: origin.generation,
            stream,
            line: kept_text(text),
        });
        let mut inner = self.lock();
        inner.followers.retain(|f| {
            if f.worker.is_some_and(|w| w != rec.worker) {
                return !f.tx.is_closed();
            }
            match f.tx.try_send(rec.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    f.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        inner.bytes += rec.line.len() + ENTRY_OVERHEAD;
        inner.lines.push_back((at, rec));
        while inner.lines.len() > RING_LINES || inner.bytes > RING_BYTES {
            let Some((_, old)) = inner.lines.pop_front() else { break };
            inner.bytes -= old.line.len() + ENTRY_OVERHEAD;
        }
    }

    /// The last lines that `q` wants, oldest first.
    pub fn recent(&self, q: &Query) -> Vec<Arc<Record>> {
        Self::recent_in(&self.lock(), q)
    }

    fn recent_in(inner: &Inner, q: &Query) -> Vec<Arc<Record>> {
        let mut out: Vec<Arc<Record>> = inner
            .lines
            .iter()
            .rev()
            .filter(|(at, r)| q.wants(*at, r))
            .take(q.lines)
            .map(|(_, r)| r.clone())
            .collect();
        out.reverse();
        out
    }

    /// [`Ring::recent`] and a subscription to every later line (of `q.worker`), taken at the
    /// same instant: nothing missed, nothing twice.
    pub fn follow(&self, q: &Query) -> (Vec<Arc<Record>>, Subscription) {
        let mut inner = self.lock();
        let backlog = Self::recent_in(&inner, q);
        let (tx, rx) = mpsc::channel(FOLLOW_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        inner.followers.push(Follower { tx, worker: q.worker, dropped: dropped.clone() });
        (backlog, Subscription { rx, dropped })
    }

    /// Lines and bytes kept (for tests and status).
    #[cfg(test)]
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.lines.len(), inner.bytes)
    }
}

/// Where the supervisor's worker lines can be read, as the control server answers `logs`.
#[derive(Clone)]
pub enum Source {
    /// Standalone: the ring.
    Ring(Ring),
    /// Under journald: the unit whose journal holds them (`None`: not in a service; the
    /// reader matches the supervisor's pid instead).
    Journal { unit: Option<String>, app: String },
}

/// The systemd unit this process runs in (the last `.service` of its cgroup path), if any.
pub fn own_unit() -> Option<String> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    unit_of_cgroup(&cgroup)
}

fn unit_of_cgroup(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/').rfind(|c| c.ends_with(".service")).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(worker_id: usize) -> Origin {
        Origin { app: "web".into(), worker_id, pid: 100 + worker_id as i32, generation: 1 }
    }

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(s)
    }

    #[test]
    fn the_ring_is_bounded_by_lines_and_by_bytes_oldest_first() {
        let ring = Ring::default();
        for i in 0..(RING_LINES + 10) {
            ring.push(&origin(1), Stream::Stdout, format!("{i}").as_bytes(), at(1));
        }
        let (n, _) = ring.usage();
        assert_eq!(n, RING_LINES);
        let all = ring.recent(&Query { lines: usize::MAX, worker: None, since_us: None });
        assert_eq!(all.first().unwrap().line, "10");
        let big = vec![b'x'; LINE_BYTES];
        for _ in 0..(RING_BYTES / LINE_BYTES + 10) {
            ring.push(&origin(1), Stream::Stdout, &big, at(1));
        }
        let (n, bytes) = ring.usage();
        assert!(bytes <= RING_BYTES, "{bytes}");
        assert!((RING_BYTES / (LINE_BYTES + ENTRY_OVERHEAD)..RING_LINES).contains(&n), "{n}");
    }

    #[test]
    fn long_lines_are_cut_with_a_mark_and_at_a_character_boundary() {
        let mut text = vec![b'a'; LINE_BYTES - 1];
        text.extend_from_slice("é and more".as_bytes());
        let kept = kept_text(&text);
        assert!(kept.ends_with('…'));
        assert!(!kept.contains('\u{fffd}'));
        assert!(kept.len() <= LINE_BYTES + '…'.len_utf8());
        assert_eq!(kept_text(b"short"), "short");
    }

    #[test]
    fn queries_filter_by_worker_and_time_and_keep_the_last_n_in_order() {
        let ring = Ring::default();
        for i in 0..10u64 {
            ring.push(&origin((i % 2) as usize), Stream::Stderr, format!("l{i}").as_bytes(), at(i));
        }
        let q = Query { lines: 2, worker: Some(1), since_us: None };
        let got: Vec<_> = ring.recent(&q).iter().map(|r| r.line.clone()).collect();
        assert_eq!(got, ["l7", "l9"]);
        let q = Query { lines: 100, worker: None, since_us: Some(8_000_000) };
        let got: Vec<_> = ring.recent(&q).iter().map(|r| r.line.clone()).collect();
        assert_eq!(got, ["l8", "l9"]);
    }

    #[test]
    fn a_follower_that_does_not_read_loses_lines_counted_and_never_blocks_the_push() {
        let ring = Ring::default();
        let (_, mut sub) = ring.follow(&Query { lines: 0, worker: None, since_us: None });
        for i in 0..(FOLLOW_QUEUE + 7) {
            ring.push(&origin(0), Stream::Stdout, format!("{i}").as_bytes(), at(1));
        }
        assert_eq!(sub.take_dropped(), 7);
        assert_eq!(sub.take_dropped(), 0);
        assert_eq!(sub.rx.try_recv().unwrap().line, "0");
        drop(sub);
        ring.push(&origin(0), Stream::Stdout, b"after", at(1));
        assert!(ring.lock().followers.is_empty(), "a gone follower is forgotten");
    }

    #[test]
    fn records_read_as_pm2_shows_them_and_serialize_with_the_documented_keys() {
        let r = Record {
            ts: rfc3339(1_500_000),
            app: "web".into(),
            worker: 2,
            pid: 7,
            generation: 3,
            stream: Stream::Stdout,
            line: "hi".into(),
        };
        assert_eq!(r.text(), "2|web | out | hi");
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["app", "generation", "line", "pid", "stream", "ts", "worker"]);
        assert_eq!(v["stream"], "stdout");
        assert_eq!(v["ts"], "1970-01-01T00:00:01.500000Z");
    }

    #[test]
    fn the_unit_comes_from_the_cgroup_path() {
        let cg = "0::/system.slice/system-herdsman.slice/herdsman@web.service\n";
        assert_eq!(unit_of_cgroup(cg).as_deref(), Some("herdsman@web.service"));
        assert_eq!(unit_of_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"), None);
    }
}
