//! The control server's answer to `logs` (see docs/control.md): the ring's recent lines, or
//! (`follow`) those and every new one until the client hangs up; under journald, where to
//! read instead.
//!
//! Followers stay connected as long as they like, so they do not hold the control socket's
//! request slots (which are for requests that end): once its request is read, a follower
//! gives its slot back and holds one of [`MAX_FOLLOWERS`] follower places instead, non-root
//! peers at most [`USER_FOLLOWERS`] of them, so root can always follow; more are answered
//! "busy". A follower is never evicted as idle and has no deadline. It is fed from its own
//! bounded queue ([`crate::logs::Ring::follow`]): a slow one loses lines, counted, and holds up
//! only its own task.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::logs::{Query, Record, Source};
use crate::protocol::{ErrorKind, Reply};

/// A `logs` answer without `follow` (up to the ring's 4 MiB) must be read within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// `logs -f` connections served at the same time (besides the request slots).
pub(crate) const MAX_FOLLOWERS: usize = 16;
/// Of [`MAX_FOLLOWERS`], non-root peers hold at most this many.
pub(crate) const USER_FOLLOWERS: usize = 12;

/// The follower places; cheap to clone.
#[derive(Clone)]
pub(crate) struct Followers {
    all: Arc<Semaphore>,
    users: Arc<Semaphore>,
}

impl Default for Followers {
    fn default() -> Self {
        Followers {
            all: Arc::new(Semaphore::new(MAX_FOLLOWERS)),
            users: Arc::new(Semaphore::new(USER_FOLLOWERS)),
        }
    }
}

/// A follower's place, given back on drop.
struct Place {
    _all: OwnedSemaphorePermit,
    _user: Option<OwnedSemaphorePermit>,
}

impl Followers {
    fn take(&self, uid: u32) -> Option<Place> {
        let user = if uid == 0 { None } else { Some(self.users.clone().try_acquire_owned().ok()?) };
        Some(Place { _all: self.all.clone().try_acquire_owned().ok()?, _user: user })
    }
}

/// `log` replies for `records`, as one buffer.
fn lines(records: &[Arc<Record>]) -> String {
    records.iter().map(|r| Reply::Log(Record::clone(r)).line()).collect()
}

/// Answers one `logs` request from peer `uid`. `slot` is the connection's request slot,
/// dropped when it becomes a follower; `reader` is the rest of the connection (only read to
/// notice the hang-up).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn answer<W: AsyncWriteExt + Unpin>(
    source: Source,
    query: Query,
    follow: bool,
    uid: u32,
    followers: &Followers,
    slot: impl Sized,
    mut reader: impl AsyncRead + Unpin,
    mut write: W,
) -> std::io::Result<()> {
    let ring = match source {
        Source::Ring(ring) => ring,
        Source::Journal { unit, app } => {
            let reply = Reply::Journal { unit, app, pid: std::process::id() };
            return write.write_all(reply.line().as_bytes()).await;
        }
    };
    if !follow {
        let recent = ring.recent(&query);
        let mut out = lines(&recent);
        out.push_str(&Reply::Logs { lines: recent.len() }.line());
        // A client that does not read it gives its slot up.
        return match tokio::time::timeout(ANSWER_TIMEOUT, write.write_all(out.as_bytes())).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "logs: the client did not read")),
        };
    }
    let Some(_place) = followers.take(uid) else {
        let message = format!(
            "busy: {MAX_FOLLOWERS} followers (logs -f) are connected, {USER_FOLLOWERS} at most for users other than root; stop one or try again"
        );
        return write.write_all(Reply::error(ErrorKind::Busy, message).line().as_bytes()).await;
    };
    drop(slot);
    let (backlog, mut sub) = ring.follow(&query);
    write.write_all(lines(&backlog).as_bytes()).await?;
    let mut scratch = [0u8; 256];
    loop {
        tokio::select! {
            next = sub.rx.recv() => {
                let Some(r) = next else { return Ok(()) };
                let dropped = sub.take_dropped();
                let mut out = String::new();
                if dropped > 0 {
                    out.push_str(&Reply::LogsDropped { dropped }.line());
                }
                out.push_str(&Reply::Log(Record::clone(&r)).line());
                write.write_all(out.as_bytes()).await?;
            }
            // The client hung up (it sends nothing after its request).
            n = reader.read(&mut scratch) => if matches!(n, Ok(0) | Err(_)) { return Ok(()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_hold_at_most_their_share_of_follower_places_and_root_the_rest() {
        let f = Followers::default();
        let users: Vec<_> = (0..USER_FOLLOWERS).map(|i| f.take(1000 + i as u32).unwrap()).collect();
        assert!(f.take(2000).is_none(), "a user took more than the users' share");
        let root: Vec<_> = (USER_FOLLOWERS..MAX_FOLLOWERS).map(|_| f.take(0).unwrap()).collect();
        assert!(f.take(0).is_none());
        drop(users);
        assert!(f.take(1000).is_some(), "places come back when followers leave");
        drop(root);
    }
}
