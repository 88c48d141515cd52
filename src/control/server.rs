//! The control socket inside `herdsman run`.
//!
//! Each connection carries one request; a malformed, oversized or slow request gets an error
//! reply and the connection is closed, without touching the supervisor. Requests become
//! [`Control`]s on the supervisor's queue.
//!
//! Slots. The peer's credentials (`SO_PEERCRED`) are checked as soon as a connection is
//! accepted: a peer that may not use the socket is answered and closed at once and never
//! holds anything. At most [`MAX_CLIENTS`] connections are served at once (each holds a file
//! descriptor, and the supervisor's descriptors are for its workers); [`ROOT_SLOTS`] of them
//! only root ever uses (so `systemctl reload` always gets one), one non-root uid holds at
//! most [`SLOTS_PER_UID`], and a non-root connection must send its request within 2 s (root's:
//! 5 s). When a new connection finds no room, the oldest connection that has not sent its
//! request yet (of the same uid, or of any non-root uid, or for root of anyone) is told
//! "busy" and closed to make room; only when every connection in the way is in the middle of
//! a request is the new one answered "busy". Clients retry "busy" for a few seconds.
//!
//! Followers (`logs -f`) stay connected as long as they like: once its request is read, a
//! follower gives its slot back and holds a follower place instead (see
//! [`crate::control::logs_server`]); it is fed from its own bounded queue: a slow one loses lines,
//! counted, and never holds up the supervisor or other clients.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::logs_server::Followers;
use crate::logs::Source;
use crate::procstat::CpuMeter;
use crate::protocol::ReloadOutcome;
use crate::protocol::{self, ErrorKind, MAX_REQUEST, Op, Reply};
use crate::requests::{Control, Waiter};

/// A client has this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Control connections served at the same time; more are answered "busy" and closed.
pub const MAX_CLIENTS: usize = 64;

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    pub uid: u32,
    pub group: Option<u32>,
}

impl Access {
    /// Root, herdsman's own uid, and members of `group`: the peer's primary group (from
    /// `SO_PEERCRED`) or its supplementary groups. Those come from `/proc/PID/status` when it
    /// is readable, else from the group database for the peer's uid (under the shipped
    /// unit's `ProtectProc=invisible` other users' processes are hidden from herdsman).
    /// May consult NSS: call it off the event loop.
    fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if self.allows_at_once(uid, gid) {
            return true;
        }
        let Some(g) = self.group else { return false };
        let groups = pid.and_then(process_groups).unwrap_or_else(|| member_groups(uid, gid));
        groups.contains(&g)
    }

    /// The answer that needs no lookup: `true` for root, our uid and the primary group.
    fn allows_at_once(&self, uid: u32, gid: u32) -> bool {
        uid == 0 || uid == self.uid || self.group == Some(gid)
    }
}

/// The supplementary groups of process `pid`, if its `/proc` entry can be read.
fn process_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let groups = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(groups.split_whitespace().filter_map(|x| x.parse().ok()).collect())
}

/// The groups user `uid` belongs to according to the group database (`getgrouplist`).
fn member_groups(uid: u32, gid: u32) -> Vec<u32> {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else { return Vec::new() };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}

/// The bound socket; the file (and the directory, if we made it) is removed on drop.
pub(crate) struct Bound {
    pub listener: std::os::unix::net::UnixListener,
    pub path: PathBuf,
    made_dir: Option<PathBuf>,
}

impl Bound {
    /// The directory herdsman created for the socket (removed at exit), if any.
    pub(crate) fn made_dir(&self) -> Option<PathBuf> {
        self.made_dir.clone()
    }

    /// The socket a previous image handed over in an in-place upgrade.
    pub(crate) fn adopt(
        fd: std::os::fd::OwnedFd,
        path: PathBuf,
        made_dir: Option<PathBuf>,
    ) -> std::io::Result<Bound> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(Bound { listener, path, made_dir })
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(d) = &self.made_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Why the control socket could not be created.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error("cannot create the control directory {}: {err}", dir.display())]
    Dir { dir: PathBuf, err: std::io::Error },
    #[error(
        "another supervisor already answers on {}; stop it first or choose another --name/--control",
        .0.display()
    )]
    Running(PathBuf),
    /// Only a stale *socket* is ever removed: anything else at the path is someone's file.
    #[error(
        "{} exists and is not a socket; refusing to replace it: remove it or choose another --control path",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error("cannot remove the stale control socket {}: {err}", path.display())]
    Stale { path: PathBuf, err: std::io::Error },
    #[error("cannot create the control socket {}: {err}", path.display())]
    Create { path: PathBuf, err: std::io::Error },
    #[error("cannot give the control socket to group {gid}: {err}")]
    Group { gid: u32, err: nix::Error },
    #[error("control socket: {0}")]
    Nonblocking(std::io::Error),
}

/// Creates the control socket at `path`: 0600, or 0660 owned by `group`. Refuses when another
/// supervisor answers there (the app is already running) or when the path is not a socket;
/// removes a stale socket.
///
/// A directory that exists is left alone. Under systemd it is the `RuntimeDirectory=`, whose
/// mode and owner systemd re-applies before every `ExecReload=`; changing its group would
/// even make systemd re-own everything inside (the socket's group included). The shipped
/// unit's `RuntimeDirectoryMode=0711` lets `control_group` members reach the socket.
pub(crate) fn bind(path: &Path, group: Option<u32>) -> Result<Bound, BindError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let made_dir = if dir.exists() {
        None
    } else {
        std::fs::create_dir_all(dir).map_err(|err| BindError::Dir { dir: dir.to_path_buf(), err })?;
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode));
        if let Some(g) = group {
            let _ = nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(g)));
        }
        Some(dir.to_path_buf())
    };
    // lstat: a symlink (even to a socket) is not ours to remove.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(BindError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::Running(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|err| BindError::Stale { path: path.to_path_buf(), err })?;
    }
    // The socket file takes its mode from the umask at bind time: no window where it is open.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(|err| BindError::Create { path: path.to_path_buf(), err })?;
    if let Some(g) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(g)))
            .map_err(|err| BindError::Group { gid: g, err })?;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    }
    listener.set_nonblocking(true).map_err(BindError::Nonblocking)?;
    Ok(Bound { listener, path: path.to_path_buf(), made_dir })
}

/// Serves clients until the runtime shuts down.
pub(crate) fn spawn(
    bound: &Bound,
    controls: mpsc::Sender<Control>,
    access: Access,
    metrics: crate::metrics::Metrics,
    logs: Source,
) -> std::io::Result<()> {
    let listener = UnixListener::from_std(bound.listener.try_clone()?)?;
    let followers = Followers::default();
    let meter = Arc::new(Mutex::new(CpuMeter::default()));
    let slots = Arc::new(Mutex::new(Slots::default()));
    let lookups = Arc::new(Semaphore::new(MAX_LOOKUPS));
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE/ENFILE among others: the connection waits in the backlog.
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Who it is comes first: nothing is held for a peer before it is known.
            let Ok(cred) = stream.peer_cred() else { continue };
            let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
            let conn = Conn {
                stream,
                uid,
                controls: controls.clone(),
                access,
                meter: meter.clone(),
                metrics: metrics.clone(),
                slots: slots.clone(),
                logs: logs.clone(),
                followers: followers.clone(),
            };
            if access.allows_at_once(uid, gid) {
                conn.admit();
                continue;
            }
            if access.group.is_none() {
                refuse(&conn.stream, uid, pid, access);
                continue;
            }
            // Supplementary groups need a lookup (NSS may block): off the loop, a bounded
            // number at once; over that the peer hears "busy" (its client retries).
            let Ok(permit) = lookups.clone().try_acquire_owned() else {
                refuse_busy(&conn.stream, "membership checks");
                continue;
            };
            tokio::spawn(async move {
                let allowed =
                    tokio::task::spawn_blocking(move || access.allows(uid, gid, pid)).await.unwrap_or(false);
                drop(permit);
                if allowed {
                    conn.admit();
                } else {
                    refuse(&conn.stream, uid, pid, access);
                }
            });
        }
    });
    Ok(())
}

/// Supplementary-group lookups (`/proc`, NSS) running at the same time.
const MAX_LOOKUPS: usize = 16;

/// Of [`MAX_CLIENTS`], this many are only ever used by uid 0 (`systemctl reload` runs
/// `herdsman reload` as root): whatever other users hold, root gets a slot.
pub(crate) const ROOT_SLOTS: usize = 16;

/// Slots one non-root uid may hold at once.
pub(crate) const SLOTS_PER_UID: usize = 16;

/// A non-root client's request must arrive within this (root's: [`REQUEST_TIMEOUT`]). Every
/// client sends its one line at once; an idle connection only holds a slot.
const USER_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// The connections being served. A connection is *idle* until its request line has arrived;
/// idle ones are evicted (oldest first) to make room, busy ones never are.
#[derive(Default)]
struct Slots {
    next: u64,
    /// By age (ids grow): uid, and the eviction signal while idle.
    held: std::collections::BTreeMap<u64, (u32, Option<oneshot::Sender<()>>)>,
}

impl Slots {
    /// A slot for `uid`, evicting the oldest idle connection that stands in the way; `None`
    /// when every connection in the way is in the middle of a request.
    fn take(&mut self, uid: u32) -> Option<(u64, oneshot::Receiver<()>)> {
        let users = self.held.values().filter(|(u, _)| *u != 0).count();
        let mine = self.held.values().filter(|(u, _)| *u == uid).count();
        let full = self.held.len() >= MAX_CLIENTS;
        // Whose idle connection must go to make room, if any.
        let victim = if uid != 0 && mine >= SLOTS_PER_UID {
            self.oldest_idle(|u| u == uid)
        } else if uid != 0 && (full || users >= MAX_CLIENTS - ROOT_SLOTS) {
            self.oldest_idle(|u| u != 0)
        } else if full {
            // Root, and every slot held: another user's idle connection first, else root's.
            self.oldest_idle(|u| u != 0).or_else(|| self.oldest_idle(|_| true))
        } else {
            return Some(self.add(uid));
        };
        self.evict_then_add(victim, uid)
    }

    fn oldest_idle(&self, of: impl Fn(u32) -> bool) -> Option<u64> {
        self.held.iter().find(|(_, (u, evict))| of(*u) && evict.is_some()).map(|(id, _)| *id)
    }

    fn evict_then_add(&mut self, victim: Option<u64>, uid: u32) -> Option<(u64, oneshot::Receiver<()>)> {
        let (_, evict) = self.held.remove(&victim?)?;
        if let Some(tx) = evict {
            let _ = tx.send(());
        }
        Some(self.add(uid))
    }

    fn add(&mut self, uid: u32) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next;
        self.next += 1;
        self.held.insert(id, (uid, Some(tx)));
        (id, rx)
    }

    /// The request arrived: no longer evictable.
    fn busy(&mut self, id: u64) {
        if let Some((_, evict)) = self.held.get_mut(&id) {
            *evict = None;
        }
    }
}

/// Gives the slot back when the connection's task ends.
struct Held {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).held.remove(&self.id);
    }
}

/// An authorized connection, before it has a slot.
struct Conn {
    stream: UnixStream,
    uid: u32,
    controls: mpsc::Sender<Control>,
    access: Access,
    meter: Arc<Mutex<CpuMeter>>,
    metrics: crate::metrics::Metrics,
    slots: Arc<Mutex<Slots>>,
    logs: Source,
    followers: Followers,
}

impl Conn {
    /// Takes a slot (see [`Slots::take`]) and serves the connection, or answers "busy".
    fn admit(self) {
        let taken = self.slots.lock().unwrap_or_else(|p| p.into_inner()).take(self.uid);
        let Some((id, evicted)) = taken else {
            return refuse_busy(&self.stream, "requests in progress");
        };
        tokio::spawn(async move {
            let held = Held { slots: self.slots.clone(), id };
            if let Err(e) = handle(self, held, evicted).await {
                tracing::debug!("control client: {e}");
            }
        });
    }
}

/// A peer that may not use the socket: one line, without waiting (a fresh connection's send
/// buffer is empty, so the write cannot block), then closed by the caller's drop.
fn refuse(stream: &UnixStream, uid: u32, pid: Option<i32>, access: Access) {
    tracing::warn!("control: refused uid {uid} (pid {pid:?})");
    let also = access.group.map(|g| format!(" and members of group {g}")).unwrap_or_default();
    let msg = format!(
        "permission denied: uid {uid} may not control this app (allowed: root, uid {}{also})",
        access.uid
    );
    let _ = stream.try_write(Reply::error(ErrorKind::PermissionDenied, msg).line().as_bytes());
}

/// No slot: one line, without waiting, then the connection is closed by the caller's drop.
fn refuse_busy(stream: &UnixStream, what: &str) {
    let message = format!("busy: the control socket is full ({what}); try again in a moment");
    let _ = stream.try_write(Reply::error(ErrorKind::Busy, message).line().as_bytes());
}

async fn handle(conn: Conn, held: Held, mut evicted: oneshot::Receiver<()>) -> std::io::Result<()> {
    let Conn { stream, uid, controls, access, meter, metrics, slots, logs, followers } = conn;
    let (read, mut write) = stream.into_split();
    let within = if uid == 0 { REQUEST_TIMEOUT } else { USER_REQUEST_TIMEOUT };
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let got = tokio::select! {
        got = tokio::time::timeout(within, reader.read_until(b'\n', &mut line)) => got,
        _ = &mut evicted => {
            let message = "busy: the control socket is full and this connection sent nothing; try again";
            return write.write_all(Reply::error(ErrorKind::Busy, message).line().as_bytes()).await;
        }
    };
    slots.lock().unwrap_or_else(|p| p.into_inner()).busy(held.id);
    let request = match got {
        Err(_) => Err(format!(
            "request timed out: send one JSON line within {}",
            humantime::format_duration(within)
        )),
        Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Err(format!("request too large (limit {MAX_REQUEST} bytes)"))
        }
        Ok(Ok(_)) => protocol::parse_request(&line),
    };
    let op = match request {
        Ok(r) => r.op,
        Err(message) => {
            return write.write_all(Reply::error(ErrorKind::BadRequest, message).line().as_bytes()).await;
        }
    };
    let gone = || Reply::error(ErrorKind::ShuttingDown, "the supervisor is shutting down");
    match op {
        Op::Status => {
            let (tx, rx) = oneshot::channel();
            if controls.send(Control::Status { reply: tx }).await.is_err() {
                return write.write_all(gone().line().as_bytes()).await;
            }
            let reply = match rx.await {
                Ok(mut snap) => {
                    let mut m = meter.lock().unwrap_or_else(|p| p.into_inner());
                    for w in &mut snap.workers {
                        if let Some(pid) = w.pid {
                            (w.cpu_percent, w.rss_bytes) = m.measure(pid, w.uptime_s);
                        }
                    }
                    let alive: Vec<i32> = snap.workers.iter().filter_map(|w| w.pid).collect();
                    m.retain(&alive);
                    Reply::Status { status: Box::new(snap) }
                }
                Err(_) => gone(),
            };
            write.write_all(reply.line().as_bytes()).await
        }
        Op::Reload { wait } => {
            let (tx, mut rx) = oneshot::channel::<ReloadOutcome>();
            let (ptx, mut prx) = mpsc::unbounded_channel();
            let waiter = Waiter { reply: Some(tx), progress: wait.then_some(ptx) };
            if controls.send(Control::Reload(waiter)).await.is_err() {
                return write.write_all(gone().line().as_bytes()).await;
            }
            if !wait {
                let outcome = ReloadOutcome::new(true, 0, "reload requested");
                return write.write_all(Reply::Reload(outcome).line().as_bytes()).await;
            }
            loop {
                tokio::select! {
                    Some(message) = prx.recv() => {
                        write.write_all(Reply::Progress { message }.line().as_bytes()).await?;
                    }
                    outcome = &mut rx => {
                        while let Ok(message) = prx.try_recv() {
                            write.write_all(Reply::Progress { message }.line().as_bytes()).await?;
                        }
                        let reply = outcome.map(Reply::Reload).unwrap_or_else(|_| gone());
                        return write.write_all(reply.line().as_bytes()).await;
                    }
                }
            }
        }
        // Upgrading runs a binary as herdsman's user: root's (or that user's own) decision
        // alone, never a control_group member's.
        Op::Upgrade { .. } if uid != 0 && uid != access.uid => {
            tracing::warn!("control: refused an upgrade from uid {uid}");
            let message = format!(
                "permission denied: only root{} may upgrade herdsman in place (uid {uid} may ask for status, reload and scale)",
                if access.uid != 0 { format!(" and uid {}", access.uid) } else { String::new() }
            );
            write.write_all(Reply::error(ErrorKind::PermissionDenied, message).line().as_bytes()).await
        }
        Op::Upgrade { binary } => {
            // The new image answers on this same connection (a copy of it is handed over);
            // this task only answers when the upgrade is refused or fails.
            let conn = write.as_ref().as_fd().try_clone_to_owned()?;
            let (tx, rx) = oneshot::channel();
            let c = Control::Upgrade { binary, reply: Some(tx), conn: Some(conn) };
            if controls.send(c).await.is_err() {
                return write.write_all(gone().line().as_bytes()).await;
            }
            let reply = match rx.await {
                Ok(Ok(done)) => Reply::Upgrade(done),
                Ok(Err(e)) => {
                    let kind = if e.untrusted() { ErrorKind::Untrusted } else { ErrorKind::UpgradeRefused };
                    Reply::error(kind, format!("cannot upgrade: {e}"))
                }
                Err(_) => gone(),
            };
            write.write_all(reply.line().as_bytes()).await
        }
        Op::Metrics => {
            let reply = match metrics.collect(&controls, crate::metrics::model::Format::Text).await {
                Ok(text) => Reply::Metrics { text },
                Err(message) => Reply::error(ErrorKind::Failed, message),
            };
            write.write_all(reply.line().as_bytes()).await
        }
        Op::Logs { lines, follow, worker, since_us } => {
            let query = crate::logs::Query { lines, worker, since_us };
            super::logs_server::answer(logs, query, follow, uid, &followers, held, reader, write).await
        }
        Op::Scale { workers, wait } => {
            let scale = match protocol::parse_scale(&workers) {
                Ok(s) => s,
                Err(message) => {
                    return write
                        .write_all(Reply::error(ErrorKind::BadRequest, message).line().as_bytes())
                        .await;
                }
            };
            let (tx, rx) = oneshot::channel();
            if controls.send(Control::Scale { scale, wait, reply: Some(tx) }).await.is_err() {
                return write.write_all(gone().line().as_bytes()).await;
            }
            let reply = match rx.await {
                Ok(Ok(workers)) => Reply::Scale { workers },
                Ok(Err(e)) => Reply::error(ErrorKind::Scale, e.to_string()),
                Err(_) => gone(),
            };
            write.write_all(reply.line().as_bytes()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_always_gets_a_slot_and_users_evict_their_own_oldest_idle_connection() {
        let mut slots = Slots::default();
        // One user fills its share: the next one of its connections evicts its oldest.
        let mut rx: Vec<_> = (0..SLOTS_PER_UID).map(|_| slots.take(1000).unwrap().1).collect();
        let (_, newest) = slots.take(1000).unwrap();
        assert!(rx[0].try_recv().is_ok(), "the oldest idle connection was not evicted");
        assert!(rx[1].try_recv().is_err());
        assert_eq!(slots.held.values().filter(|(u, _)| *u == 1000).count(), SLOTS_PER_UID);
        // Many users fill what is not root's: a new user evicts the oldest idle user connection.
        for uid in 1001..1010 {
            for _ in 0..SLOTS_PER_UID {
                slots.take(uid).unwrap();
            }
        }
        let users = slots.held.values().filter(|(u, _)| *u != 0).count();
        assert_eq!(users, MAX_CLIENTS - ROOT_SLOTS);
        // Root gets every reserved slot without evicting anyone...
        for _ in 0..ROOT_SLOTS {
            slots.take(0).unwrap();
        }
        assert_eq!(slots.held.len(), MAX_CLIENTS);
        // ...and, with all held, evicts a user's idle connection rather than be refused.
        slots.take(0).unwrap();
        assert_eq!(slots.held.len(), MAX_CLIENTS);
        assert_eq!(slots.held.values().filter(|(u, _)| *u == 0).count(), ROOT_SLOTS + 1);
        drop(newest);
    }

    #[test]
    fn connections_in_the_middle_of_a_request_are_never_evicted() {
        let mut slots = Slots::default();
        let ids: Vec<u64> = (0..SLOTS_PER_UID).map(|_| slots.take(1000).unwrap().0).collect();
        for id in &ids {
            slots.busy(*id);
        }
        assert!(slots.take(1000).is_none(), "evicted a connection that sent its request");
        // Root is not affected by a user's busy connections.
        assert!(slots.take(0).is_some());
    }
}
