//! herdsman's own log output (its events, and worker lines under systemd), written so that the
//! event loop never blocks on logging and no output error can panic.
//!
//! Why: a journal entry is a blocking `sendto` on journald's socket, and a log line a blocking
//! `write` on stderr. When the reader stalls (journald busy with a flood of worker lines, a
//! stopped pager), a write on the loop thread would freeze the control socket and the
//! `WATCHDOG=1` pings, and systemd would kill the app. So every entry goes into one bounded
//! queue ([`Sink`]) drained by one thread, the only place that blocks. When the queue is
//! full, the entry is dropped and counted: [`dropped`] (`log_dropped` in `status --json`),
//! and once an entry gets through again, one entry says how many were lost (with a
//! `HERDSMAN_LOG_DROPPED=N` field). Write errors (EPIPE on a closed stderr) are ignored: with
//! `panic = "abort"`, a panicking `eprintln!` would kill the supervisor and every worker.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::journal::{Journal, encode};

/// Entries the queue had no room for, since start. A process-wide counter, so the supervisor
/// can report it without owning the log machinery.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The queue holds at most this many entries (counted in [`QUEUED`]: the channel itself is
/// unbounded, so it allocates as entries come and frees as they go, where a bounded
/// `sync_channel` would hold 4096 slots, 256 KiB, for the process's whole life)...
const QUEUE: usize = 4096;
/// ... and at most this many bytes (worker lines may be up to 16 KiB each).
const QUEUE_BYTES: usize = 8 << 20;

/// Entries waiting in the queue.
static QUEUED: AtomicUsize = AtomicUsize::new(0);
/// Bytes waiting in the queue.
static QUEUED_BYTES: AtomicUsize = AtomicUsize::new(0);
/// Entries queued or being written (for [`flush`]).
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Installs herdsman's own logging, once per process: structured journal entries when our
/// stderr is the journal (under systemd), else plain lines on stderr; either way through the
/// queue. Returns the queue for worker lines when they go to the journal. The arguments are
/// the environment's: `HERDSMAN_LOG=error|warn|info|debug|trace` sets the verbosity
/// (default info); `JOURNAL_STREAM` says whether stderr is the journal;
/// `HERDSMAN_JOURNAL_SOCKET=PATH` sends everything to that native journal socket instead of
/// `/run/systemd/journal/socket`, whatever stderr is (for tests: a socket nobody reads stands
/// in for a stalled journald). With `json_app` (`--log-format json`, outside the journal),
/// each event is one JSON object per line on stderr ([`JsonLayer`]).
pub fn install(
    level: Option<&str>,
    journal_stream: Option<&str>,
    journal_socket: Option<&str>,
    json_app: Option<&str>,
) -> Option<Sink> {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = level.and_then(|l| l.parse::<LevelFilter>().ok()).unwrap_or(LevelFilter::INFO);
    let journal = match journal_socket.filter(|s| !s.is_empty()) {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            crate::journal::stderr_is_journal(journal_stream).then(|| PathBuf::from(crate::journal::SOCKET))
        }
    };
    if let Some(path) = journal {
        if let Ok(sink) = Sink::start(Some(path)) {
            tracing_subscriber::registry().with(level).with(JournalLayer::new(sink.clone())).init();
            return Some(sink);
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Some(app) = json_app {
        if let Ok(sink) = Sink::start(None) {
            tracing_subscriber::registry().with(level).with(JsonLayer { sink, app: app.to_string() }).init();
            return None;
        }
    }
    match Sink::start(None) {
        Ok(sink) => tracing_subscriber::fmt()
            .with_writer(sink.stderr_writer())
            .with_ansi(ansi)
            .with_target(false)
            .with_max_level(level)
            .init(),
        // No thread for the queue (resources exhausted at start): write directly, still
        // never panicking on an error.
        Err(_) => tracing_subscriber::fmt()
            .with_writer(|| IgnoreErrors(std::io::stderr()))
            .with_ansi(ansi)
            .with_target(false)
            .with_max_level(level)
            .init(),
    }
    None
}

/// A writer that reports success whatever happens (so `tracing` never prints its own error).
struct IgnoreErrors<W>(W);

impl<W: Write> Write for IgnoreErrors<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

/// Waits (at most `max`, so a stalled journal cannot hold up an exit) until every queued
/// entry is written: called once before the process exits, so the last lines are not lost.
pub fn flush(max: std::time::Duration) {
    let end = std::time::Instant::now().checked_add(max);
    while PENDING.load(Ordering::Acquire) > 0 && end.is_some_and(|e| std::time::Instant::now() < e) {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Log entries lost because the journal (or stderr) was not accepting them, since start.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

enum Entry {
    /// A native-protocol datagram, and the line to write to stderr if the journal refuses it.
    Journal {
        datagram: Vec<u8>,
        fallback: Vec<u8>,
    },
    Stderr(Vec<u8>),
}

impl Entry {
    fn size(&self) -> usize {
        match self {
            Entry::Journal { datagram, fallback } => datagram.len() + fallback.len(),
            Entry::Stderr(bytes) => bytes.len(),
        }
    }
}

/// The bounded log queue; cheap to clone. Pushing never blocks.
#[derive(Clone)]
pub struct Sink {
    tx: Sender<Entry>,
}

impl Sink {
    /// Starts the writer thread. With `journal`, entries go to that native journal socket
    /// (normally [`crate::journal::SOCKET`]); otherwise to stderr.
    pub fn start(journal: Option<PathBuf>) -> std::io::Result<Sink> {
        let journal = journal.map(|p| Journal::connect(&p)).transpose()?;
        let (tx, rx) = channel();
        std::thread::Builder::new().name("herdsman-log".into()).spawn(move || {
            // Started before steering loads its program: never needs what that takes (the
            // supervisor's main thread gives them up once loaded; threads keep their own).
            let _ = crate::sys::lower_steering_capabilities();
            drain(rx, journal)
        })?;
        Ok(Sink { tx })
    }

    fn push(&self, e: Entry) {
        let size = e.size();
        if QUEUED.fetch_add(1, Ordering::Relaxed) + 1 > QUEUE {
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if QUEUED_BYTES.fetch_add(size, Ordering::Relaxed) + size > QUEUE_BYTES {
            QUEUED_BYTES.fetch_sub(size, Ordering::Relaxed);
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        PENDING.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(e).is_err() {
            PENDING.fetch_sub(1, Ordering::AcqRel);
            QUEUED_BYTES.fetch_sub(size, Ordering::Relaxed);
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues one journal entry; `fallback` is written to stderr if the journal refuses it.
    pub fn journal(&self, fields: &[(&str, &[u8])], fallback: Vec<u8>) {
        self.push(Entry::Journal { datagram: encode(fields), fallback });
    }

    /// Queues bytes for stderr.
    pub fn stderr(&self, bytes: Vec<u8>) {
        self.push(Entry::Stderr(bytes));
    }

    /// A `tracing_subscriber` writer that queues each formatted event for stderr.
    pub fn stderr_writer(&self) -> impl for<'w> tracing_subscriber::fmt::MakeWriter<'w> + use<> {
        let sink = self.clone();
        move || QueuedStderr(sink.clone())
    }
}

struct QueuedStderr(Sink);

impl Write for QueuedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.stderr(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writer thread: the only place where log output blocks.
fn drain(rx: Receiver<Entry>, journal: Option<Journal>) {
    let mut reported = 0;
    while let Ok(e) = rx.recv() {
        QUEUED.fetch_sub(1, Ordering::Relaxed);
        QUEUED_BYTES.fetch_sub(e.size(), Ordering::Relaxed);
        let delivered = match e {
            Entry::Journal { datagram, fallback } => match &journal {
                Some(j) if j.send_raw(&datagram).is_ok() => true,
                _ => {
                    // Never lose a line silently: our stderr (the journal stream, under systemd).
                    write_ignoring(&mut std::io::stderr(), &fallback);
                    false
                }
            },
            Entry::Stderr(bytes) => std::io::stderr().lock().write_all(&bytes).is_ok(),
        };
        let lost = DROPPED.load(Ordering::Relaxed);
        if delivered && lost > reported {
            let n = lost - reported;
            reported = lost;
            let target = if journal.is_some() { "the journal" } else { "stderr" };
            let msg = format!("{n} log lines dropped while {target} was not accepting");
            match &journal {
                Some(j) => {
                    let n = n.to_string();
                    let fields: [(&str, &[u8]); 4] = [
                        ("MESSAGE", msg.as_bytes()),
                        ("PRIORITY", b"4"),
                        ("SYSLOG_IDENTIFIER", b"herdsman"),
                        ("HERDSMAN_LOG_DROPPED", n.as_bytes()),
                    ];
                    let _ = j.send_raw(&encode(&fields));
                }
                None => write_ignoring(&mut std::io::stderr(), format!("herdsman: {msg}\n").as_bytes()),
            }
        }
        PENDING.fetch_sub(1, Ordering::AcqRel);
    }
}

fn write_ignoring(w: &mut impl Write, bytes: &[u8]) {
    let _ = w.write_all(bytes);
}

/// Writes one line to stderr, ignoring errors (see [`crate::errln`]).
pub fn write_err(args: fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// Writes to stdout, ignoring errors (see [`crate::outln`]).
pub fn write_out(args: fmt::Arguments, newline: bool) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args);
    if newline {
        let _ = out.write_all(b"\n");
    }
    let _ = out.flush();
}

/// Like `eprintln!`, but a write error (EPIPE, a closed stderr) is ignored, never a panic.
#[macro_export]
macro_rules! errln {
    ($($t:tt)*) => { $crate::logging::write_err(format_args!($($t)*)) };
}

/// Like `println!`, but a write error (EPIPE: `herdsman status | head -1`) is ignored.
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::logging::write_out(format_args!($($t)*), true) };
}

/// Like `print!`, but a write error is ignored.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::logging::write_out(format_args!($($t)*), false) };
}

/// herdsman's own events as native journal entries (`MESSAGE`, `PRIORITY`,
/// `SYSLOG_IDENTIFIER=herdsman`, and each event field as an upper-case field, e.g. `APP`),
/// queued on a [`Sink`] instead of sent from the calling thread.
pub struct JournalLayer {
    sink: Sink,
}

impl JournalLayer {
    pub fn new(sink: Sink) -> Self {
        JournalLayer { sink }
    }
}

impl<S> tracing_subscriber::Layer<S> for JournalLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        keep_span_fields(attrs, id, &ctx);
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let v = event_fields(event, &ctx);
        let prio: &[u8] = match *event.metadata().level() {
            tracing::Level::ERROR => b"3",
            tracing::Level::WARN => b"4",
            tracing::Level::INFO => b"6",
            _ => b"7",
        };
        let mut fields: Vec<(&str, &[u8])> =
            vec![("MESSAGE", v.message.as_bytes()), ("PRIORITY", prio), ("SYSLOG_IDENTIFIER", b"herdsman")];
        fields.extend(v.other.iter().map(|(k, val)| (k.as_str(), val.as_bytes())));
        let fallback = format!("herdsman: {}\n", v.message).into_bytes();
        self.sink.journal(&fields, fallback);
    }
}

/// herdsman's own events as JSON lines on stderr (`--log-format json`), for container log
/// collectors: `ts` (RFC 3339, UTC), `app`, `stream` (always `"herdsman"`, where worker lines
/// say `"stdout"`/`"stderr"`), `level` (`error`, `warn`, `info`, `debug`, `trace`), `message`,
/// and the event's fields: `worker_id`, `worker_pid` and `generation`/`worker_generation`
/// become `worker`, `pid` and `generation` (numbers, as in worker lines), any other keeps its
/// name (string values).
pub struct JsonLayer {
    sink: Sink,
    app: String,
}

impl<S> tracing_subscriber::Layer<S> for JsonLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        keep_span_fields(attrs, id, &ctx);
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let v = event_fields(event, &ctx);
        let line = json_event(&self.app, *event.metadata().level(), v, std::time::SystemTime::now());
        self.sink.stderr(line);
    }
}

fn json_event(app: &str, level: tracing::Level, v: Fields, now: std::time::SystemTime) -> Vec<u8> {
    use serde_json::{Map, Value};
    let mut o = Map::new();
    o.insert("ts".into(), crate::logs::rfc3339(crate::logs::unix_us(now)).into());
    o.insert("app".into(), app.into());
    o.insert("stream".into(), "herdsman".into());
    o.insert("level".into(), level.as_str().to_ascii_lowercase().into());
    o.insert("message".into(), v.message.into());
    for (k, val) in v.raw {
        let (key, number) = match k.as_str() {
            "worker_id" => ("worker", true),
            "worker_pid" => ("pid", true),
            "generation" | "worker_generation" => ("generation", true),
            "app" | "ts" | "stream" | "level" | "message" => continue,
            other => (other, false),
        };
        let value = match val.parse::<i64>() {
            Ok(n) if number => Value::from(n),
            _ => Value::from(val),
        };
        o.insert(key.to_string(), value);
    }
    let mut line = serde_json::to_vec(&Value::Object(o)).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Keeps a new span's fields (the loop's `app`; a worker's `worker_id`, `worker_pid`,
/// `worker_generation`) on it, for [`event_fields`].
fn keep_span_fields<S>(attrs: &Attributes<'_>, id: &Id, ctx: &Context<'_, S>)
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let mut f = Fields::default();
    attrs.record(&mut f);
    if let Some(span) = ctx.span(id) {
        span.extensions_mut().insert(f);
    }
}

/// The fields of the spans `event` happened in, outermost first, then the event's own: an
/// event inside a worker's span carries its fields as if it had them itself.
fn event_fields<S>(event: &tracing::Event<'_>, ctx: &Context<'_, S>) -> Fields
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    let mut v = Fields::default();
    if let Some(scope) = ctx.event_scope(event) {
        for span in scope.from_root() {
            if let Some(f) = span.extensions().get::<Fields>() {
                v.other.extend(f.other.iter().cloned());
                v.raw.extend(f.raw.iter().cloned());
            }
        }
    }
    event.record(&mut v);
    v
}

#[derive(Default, Clone)]
struct Fields {
    message: String,
    other: Vec<(String, String)>,
    /// Every field but the message, under its own name.
    raw: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
            return;
        }
        self.raw.push((field.name().to_string(), value.clone()));
        if let Some(name) = journal_name(field.name()) {
            self.other.push((name, value));
        }
    }
}

/// Journal field names are upper-case letters, digits and '_', not starting with '_' (those
/// are trusted fields journald sets itself) or a digit; the ones we set ourselves are skipped.
fn journal_name(name: &str) -> Option<String> {
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    let name = name.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit());
    let ours = ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"];
    (!name.is_empty() && !ours.contains(&name)).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn a_stalled_journal_drops_and_counts_then_reports_once_it_accepts_again() {
        let dir = std::env::temp_dir().join(format!("herdsman-logging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let sink = Sink::start(Some(path)).unwrap();
        let before = dropped();
        for i in 0..(QUEUE * 4) {
            sink.journal(&[("MESSAGE", format!("line {i}").as_bytes())], Vec::new());
        }
        assert!(dropped() > before, "nobody reads: the queue fills and lines are counted, not waited for");
        rx.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut buf = vec![0u8; 4096];
        let report = loop {
            let n = rx.recv(&mut buf).expect("the dropped-lines report arrives");
            let d = String::from_utf8_lossy(&buf[..n]).into_owned();
            if d.contains("HERDSMAN_LOG_DROPPED=") {
                break d;
            }
            // Keep the flow going so the writer thread gets through again.
            sink.journal(&[("MESSAGE", b"more")], Vec::new());
        };
        let n: u64 =
            report.lines().find_map(|l| l.strip_prefix("HERDSMAN_LOG_DROPPED=")).unwrap().parse().unwrap();
        assert!(n > 0, "{report}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// issue 24: the worker fields come from the worker's span, not from each event; the
    /// journal and JSON layers still give every event inside it `WORKER_ID`/`worker`, ….
    #[test]
    fn an_event_in_a_worker_span_carries_the_spans_fields_in_the_journal_and_json() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        struct Capture(Arc<Mutex<Vec<Fields>>>);
        impl<S> tracing_subscriber::Layer<S> for Capture
        where
            S: tracing::Subscriber + for<'a> LookupSpan<'a>,
        {
            fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
                keep_span_fields(attrs, id, &ctx);
            }
            fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
                self.0.lock().unwrap().push(event_fields(event, &ctx));
            }
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let app = tracing::info_span!("loop", app = "web");
            let _in_loop = app.enter();
            crate::worker::span(2, 77, 3).in_scope(|| tracing::warn!("worker 2 replaced"));
        });
        let v = seen.lock().unwrap().pop().unwrap();
        let journal: Vec<(&str, &str)> = v.other.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for field in [("APP", "web"), ("WORKER_ID", "2"), ("WORKER_PID", "77"), ("WORKER_GENERATION", "3")] {
            assert!(journal.contains(&field), "{field:?} missing from {journal:?}");
        }
        let line = json_event("web", tracing::Level::WARN, v, std::time::UNIX_EPOCH);
        let o: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!((&o["worker"], &o["pid"], &o["generation"]), (&2.into(), &77.into(), &3.into()), "{o}");
    }

    #[test]
    fn json_events_carry_the_documented_keys_and_worker_fields_as_numbers() {
        let v = Fields {
            message: "worker 2 replaced".into(),
            other: Vec::new(),
            raw: vec![
                ("worker_id".into(), "2".into()),
                ("worker_pid".into(), "77".into()),
                ("app".into(), "x".into()),
            ],
        };
        let line = json_event("web", tracing::Level::WARN, v, std::time::UNIX_EPOCH);
        assert_eq!(line.last(), Some(&b'\n'));
        let j: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(j["app"], "web");
        assert_eq!(j["stream"], "herdsman");
        assert_eq!(j["level"], "warn");
        assert_eq!(j["worker"], 2);
        assert_eq!(j["pid"], 77);
        assert_eq!(j["ts"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn field_names_become_journal_names() {
        assert_eq!(journal_name("app").as_deref(), Some("APP"));
        assert_eq!(journal_name("worker.id").as_deref(), Some("WORKER_ID"));
        assert_eq!(journal_name("_pid").as_deref(), Some("PID"));
        assert_eq!(journal_name("MESSAGE"), None);
        assert_eq!(journal_name("__"), None);
    }
}
