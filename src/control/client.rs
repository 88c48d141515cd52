//! The client side: `herdsman status | list | reload | scale`. Plain blocking I/O: one
//! request, then replies until the final one (or the deadline).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{paths, table};
use crate::exit;
use crate::protocol::{Envelope, ErrorKind, Op, Reply, Request, VERSION};

pub use crate::exit::Failure;

fn fail(code: i32, message: impl Into<String>) -> Failure {
    Failure::new(code, message)
}

/// How long a client keeps asking again while the supervisor answers "busy" (its control
/// connections are all in use; idle ones are evicted to make room, so this is short-lived).
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Sends `op` to the supervisor at `path`; calls `progress` for each progress line and returns
/// the final reply. A "busy" answer (nothing was carried out) is retried for up to
/// 5 s (`BUSY_RETRY`), within `timeout`.
pub(crate) fn call(
    path: &Path,
    op: Op,
    timeout: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Reply, Failure> {
    call_with(path, op, timeout, |r| match r {
        Reply::Progress { message } => {
            progress(message);
            true
        }
        _ => false,
    })
}

/// [`call`] for answers of many lines (`logs`): `interim` sees every reply that is not an
/// error and says whether more are to come (`true`: read on); the first one it says `false`
/// to is returned.
pub(crate) fn call_with(
    path: &Path,
    op: Op,
    timeout: Duration,
    mut interim: impl FnMut(&Reply) -> bool,
) -> Result<Reply, Failure> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        match call_once(path, op.clone(), left, &mut interim) {
            Err((_, true)) if started.elapsed() + pause < BUSY_RETRY.min(timeout) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => return other.map_err(|(f, _)| f),
        }
    }
}

/// One attempt; the error says whether it was "busy" (nothing carried out: ask again).
fn call_once(
    path: &Path,
    op: Op,
    timeout: Duration,
    interim: &mut impl FnMut(&Reply) -> bool,
) -> Result<Reply, (Failure, bool)> {
    call_inner(path, op, timeout, interim).map_err(|f| {
        let busy = f.code == BUSY;
        (Failure { code: if busy { exit::TIMEOUT } else { f.code }, ..f }, busy)
    })
}

/// Marks a "busy" answer inside [`call_once`] (never leaves this module).
const BUSY: i32 = -75;

fn call_inner(
    path: &Path,
    op: Op,
    timeout: Duration,
    interim: &mut impl FnMut(&Reply) -> bool,
) -> Result<Reply, Failure> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => fail(
            exit::NOPERM,
            format!(
                "permission denied: cannot connect to {}; run as root or as the app's user",
                path.display()
            ),
        ),
        _ => fail(exit::UNAVAILABLE, format!("cannot reach the supervisor at {}: {e}", path.display())),
    })?;
    // Checked: a timeout too far away to represent is "no deadline we could reach" anyway.
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + crate::config::values::MAX_DURATION);
    let mut req =
        serde_json::to_string(&Request { v: VERSION, op }).map_err(|e| fail(exit::FAILURE, e.to_string()))?;
    req.push('\n');
    // A refusal may arrive (and the server hang up) before we finish sending: read it anyway.
    let sent = stream.write_all(req.as_bytes());
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail(
                exit::TIMEOUT,
                format!("no answer within {}", humantime::format_duration(timeout)),
            ));
        }
        let _ = reader.get_ref().set_read_timeout(Some(left));
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                let why = sent.err().map(|e| format!(" (sending the request: {e})")).unwrap_or_default();
                let msg = format!("the supervisor closed the connection without an answer{why}");
                return Err(fail(exit::UNAVAILABLE, msg));
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(fail(
                    exit::TIMEOUT,
                    format!("no answer within {}", humantime::format_duration(timeout)),
                ));
            }
            Err(e) => return Err(fail(exit::UNAVAILABLE, format!("reading the answer: {e}"))),
        }
        let env: Envelope = serde_json::from_str(&line)
            .map_err(|e| fail(exit::FAILURE, format!("unreadable answer: {e}")))?;
        match env.reply {
            Reply::Error { kind, message } => {
                let code = match kind {
                    ErrorKind::PermissionDenied | ErrorKind::Untrusted => exit::NOPERM,
                    ErrorKind::Busy => BUSY,
                    ErrorKind::Failed
                    | ErrorKind::BadRequest
                    | ErrorKind::ShuttingDown
                    | ErrorKind::Scale
                    | ErrorKind::UpgradeRefused => exit::FAILURE,
                };
                return Err(fail(code, message));
            }
            other if interim(&other) => {}
            other => return Ok(other),
        }
    }
}

const QUICK: Duration = Duration::from_secs(10);

pub(crate) fn status(target: Option<&str>, json: bool, env: &paths::Env) -> Result<(), Failure> {
    let path = paths::resolve(target, env).map_err(|m| fail(exit::UNAVAILABLE, m))?;
    match call(&path, Op::Status, QUICK, |_| {})? {
        Reply::Status { status } if json => {
            crate::outln!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
            Ok(())
        }
        Reply::Status { status } => {
            crate::out!("{}", table::status(&status));
            Ok(())
        }
        other => Err(fail(exit::FAILURE, format!("unexpected answer: {other:?}"))),
    }
}

/// `herdsman metrics [TARGET]`: the page, as the HTTP endpoint serves it (0.0.4 text).
pub(crate) fn metrics(target: Option<&str>, env: &paths::Env) -> Result<(), Failure> {
    let path = paths::resolve(target, env).map_err(|m| fail(exit::UNAVAILABLE, m))?;
    match call(&path, Op::Metrics, QUICK, |_| {})? {
        Reply::Metrics { text } => {
            crate::out!("{text}");
            Ok(())
        }
        other => Err(fail(exit::FAILURE, format!("unexpected answer: {other:?}"))),
    }
}

pub(crate) fn list(json: bool, env: &paths::Env) -> Result<(), Failure> {
    let apps = paths::discover(env);
    let mut rows = vec![["NAME", "PID", "READY", "GEN", "STATUS", "CONTROL"].map(String::from).to_vec()];
    let mut snaps = Vec::new();
    for (name, path) in &apps {
        match call(path, Op::Status, QUICK, |_| {}) {
            Ok(Reply::Status { status }) => {
                rows.push(vec![
                    status.name.clone(),
                    status.pid.to_string(),
                    format!("{}/{}", status.ready, status.desired),
                    status.generation.to_string(),
                    status.status.clone(),
                    path.display().to_string(),
                ]);
                snaps.push(*status);
            }
            _ => rows.push(vec![
                name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "not responding".into(),
                path.display().to_string(),
            ]),
        }
    }
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&snaps).unwrap_or_default());
    } else if apps.is_empty() {
        crate::outln!("no herdsman app is running");
    } else {
        crate::out!("{}", table::columns(&rows));
    }
    Ok(())
}

pub(crate) fn reload(
    target: Option<&str>,
    wait: bool,
    timeout: Duration,
    env: &paths::Env,
) -> Result<(), Failure> {
    let path = paths::resolve(target, env).map_err(|m| fail(exit::UNAVAILABLE, m))?;
    let started = Instant::now();
    let reply = loop {
        let left = timeout.saturating_sub(started.elapsed());
        let reply = call(&path, Op::Reload { wait }, left, |line| {
            crate::outln!("{line}");
            let _ = std::io::stdout().flush();
        })?;
        match reply {
            // The supervisor was upgraded in place before this reload started: ask the new
            // image (its control socket is the same; it may take a moment to answer).
            Reply::Reload(o) if o.retry => {
                crate::outln!("{}", o.message);
                std::thread::sleep(Duration::from_millis(100));
            }
            other => break other,
        }
    };
    match reply {
        Reply::Reload(o) if o.ok => {
            crate::outln!("{}", o.message);
            Ok(())
        }
        Reply::Reload(o) => Err(fail(exit::FAILURE, o.message)),
        other => Err(fail(exit::FAILURE, format!("unexpected answer: {other:?}"))),
    }
}

pub(crate) fn scale(
    target: Option<&str>,
    workers: &str,
    wait: bool,
    timeout: Duration,
    env: &paths::Env,
) -> Result<(), Failure> {
    crate::protocol::parse_scale(workers).map_err(|m| fail(exit::USAGE, m))?;
    let path = paths::resolve(target, env).map_err(|m| fail(exit::UNAVAILABLE, m))?;
    match call(&path, Op::Scale { workers: workers.to_string(), wait }, timeout, |_| {})? {
        Reply::Scale { workers } => {
            crate::outln!("{} worker(s){}", workers, if wait { " ready" } else { " requested" });
            Ok(())
        }
        other => Err(fail(exit::FAILURE, format!("unexpected answer: {other:?}"))),
    }
}

/// `herdsman upgrade [TARGET] [--binary PATH]`: the new image answers (with its version).
pub(crate) fn upgrade(
    target: Option<&str>,
    binary: Option<&Path>,
    timeout: Duration,
    env: &paths::Env,
) -> Result<(), Failure> {
    let path = paths::resolve(target, env).map_err(|m| fail(exit::UNAVAILABLE, m))?;
    // A relative --binary is the caller's, not the supervisor's, relative path.
    let binary = match binary {
        Some(b) => Some(
            std::path::absolute(b)
                .map_err(|e| fail(exit::USAGE, format!("--binary {}: {e}", b.display())))?,
        ),
        None => None,
    };
    match call(&path, Op::Upgrade { binary }, timeout, |line| crate::outln!("{line}"))? {
        Reply::Upgrade(done) => {
            crate::outln!(
                "upgraded in place: herdsman {} → {} (pid {}, {} worker(s) kept, {:.1} ms; upgrade #{})",
                done.from_version,
                done.version,
                done.pid,
                done.workers,
                done.took_ms,
                done.upgrades
            );
            Ok(())
        }
        other => Err(fail(exit::FAILURE, format!("unexpected answer: {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;

    /// A server that answers the first `busy` connections "busy" (without reading, as the
    /// real one does), then `scale`; returns how many connections it saw.
    fn server(path: &Path, busy: usize) -> std::thread::JoinHandle<usize> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for n in 0.. {
                let (mut s, _) = listener.accept().unwrap();
                if n < busy {
                    let reply = Reply::error(ErrorKind::Busy, "busy: the control socket is full; try again");
                    s.write_all(reply.line().as_bytes()).unwrap();
                    continue;
                }
                let mut line = [0u8; 1];
                let _ = s.read(&mut line);
                s.write_all(Reply::Scale { workers: 3 }.line().as_bytes()).unwrap();
                return n + 1;
            }
            unreachable!()
        })
    }

    #[test]
    fn a_busy_answer_is_retried_until_the_supervisor_has_room() {
        let dir = std::env::temp_dir().join(format!("herdsman-client-busy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let seen = server(&path, 3);
        let reply = call(&path, Op::Status, Duration::from_secs(30), |_| {}).unwrap();
        assert!(matches!(reply, Reply::Scale { workers: 3 }), "{reply:?}");
        assert_eq!(seen.join().unwrap(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_supervisor_that_stays_busy_is_reported_busy_with_exit_75_after_a_few_seconds() {
        let dir = std::env::temp_dir().join(format!("herdsman-client-busier-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let _server = server(&path, usize::MAX);
        let started = Instant::now();
        let err = call(&path, Op::Status, Duration::from_secs(60), |_| {}).unwrap_err();
        assert_eq!(err.code, exit::TIMEOUT, "{}", err.message());
        assert!(err.message().starts_with("busy:"), "{}", err.message());
        assert!(started.elapsed() < Duration::from_secs(50), "kept retrying for {:?}", started.elapsed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
