//! `--watch`: file changes under the watched paths become rolling reloads, for development
//! (`pm2 start app.js --watch`).
//!
//! Two halves. This module is the watcher: a thread that owns an inotify instance (the
//! `notify` crate), with one watch per directory under each watched path except the ignored
//! ones (so `node_modules` costs no inotify watch), that follows new directories and tells the
//! loop that something changed, one [`Changed`] at a time: while one is on its way (not yet
//! taken by the loop), further changes are not sent. That loses nothing: the loop reads its
//! clock when it takes the message, which is after every change it stood for. The loop's half
//! (`supervisor/watch.rs`) debounces: a burst becomes one reload once the files have been quiet
//! for 500 ms (5 s at most after its first change), started through the same path as
//! `herdsman reload`, and never while a roll-out runs (changes during one become one reload
//! after it).
//!
//! What counts as a change: a file or directory created, removed, renamed, written (closed
//! after writing) or its metadata changed; never an open or a read (workers read their own
//! code). Ignored: any path with a component matching one of [`DEFAULT_IGNORE`] or of the
//! `--watch-ignore` globs (see [`Glob`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode, EventKind, MetadataKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

pub use crate::glob::Glob;
pub use crate::requests::Changed;
use crate::requests::Control;

/// Never watched, whatever `--watch-ignore` says: version control, dependency and build
/// directories, editors' swap and backup files, and logs (an app that logs into its own
/// directory would otherwise reload itself forever).
pub const DEFAULT_IGNORE: &[&str] = &[
    ".git",
    ".hg",
    ".svn",
    "node_modules",
    "target",
    "__pycache__",
    "*.pyc",
    ".venv",
    "*.swp",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*.log",
];

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
#[error("--watch: cannot watch {}: {reason}", path.display())]
pub struct WatchError {
    path: PathBuf,
    reason: String,
}

impl WatchError {
    fn new(path: &Path, e: &notify::Error) -> WatchError {
        let reason = match &e.kind {
            notify::ErrorKind::MaxFilesWatch => "the inotify watch limit is reached (sysctl fs.inotify.max_user_watches); watch fewer directories (--watch-ignore big ones) or raise the limit".to_string(),
            _ => e.to_string(),
        };
        WatchError { path: path.to_path_buf(), reason }
    }
}

/// The watched paths and what to ignore below them.
#[derive(Debug, Clone)]
pub struct Watched {
    roots: Vec<PathBuf>,
    ignore: Vec<Glob>,
}

impl Watched {
    /// `roots` absolute; `ignore` the `--watch-ignore` patterns (the defaults are added).
    pub fn new(roots: &[PathBuf], ignore: &[String]) -> Watched {
        let ignore = DEFAULT_IGNORE.iter().copied().chain(ignore.iter().map(String::as_str));
        Watched { roots: roots.to_vec(), ignore: ignore.filter_map(|g| Glob::parse(g).ok()).collect() }
    }

    /// Whether a change of `path` counts: below (or at) a watched path, and not ignored.
    pub fn counts(&self, path: &Path) -> bool {
        let root = self.roots.iter().filter(|r| path.starts_with(r)).max_by_key(|r| r.as_os_str().len());
        root.is_some_and(|root| !self.ignore.iter().any(|g| g.ignores(root, path)))
    }
}

/// Whether an event is a change (not an open, a read or an access-time update).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// Starts watching (every watch is in place when this returns) and a thread that sends
/// [`Control::Changed`] to the loop on `tx`. The thread ends when the loop's receiver is gone.
pub fn spawn(roots: &[PathBuf], ignore: &[String], tx: mpsc::Sender<Control>) -> Result<(), WatchError> {
    let watched = Watched::new(roots, ignore);
    let (events_tx, events) = std::sync::mpsc::channel();
    let first = roots.first().map_or(Path::new("/"), PathBuf::as_path);
    let watcher = notify::INotifyWatcher::new(events_tx, notify::Config::default())
        .map_err(|e| WatchError::new(first, &e))?;
    let mut t = Thread { watched, watcher, tx, sent: Arc::new(AtomicBool::new(false)), dirs: 0 };
    for root in t.watched.roots.clone() {
        if root.is_dir() {
            t.add_tree(&root)?;
        } else {
            // A file: its directory, so that an editor's save by rename is seen too (only
            // the file's own changes count).
            let dir = root.parent().unwrap_or(Path::new("/"));
            t.watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| WatchError::new(dir, &e))?;
            t.dirs += 1;
        }
    }
    tracing::info!(
        "watching {} for changes ({} directories): a rolling reload once they are quiet for 500ms",
        roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
        t.dirs
    );
    std::thread::Builder::new().name("herdsman-watch".into()).spawn(move || t.run(events)).map_err(|e| {
        WatchError { path: first.to_path_buf(), reason: format!("cannot start a thread: {e}") }
    })?;
    Ok(())
}

/// The watcher thread's state.
struct Thread {
    watched: Watched,
    watcher: notify::INotifyWatcher,
    tx: mpsc::Sender<Control>,
    /// Set while a [`Changed`] is on its way to the loop.
    sent: Arc<AtomicBool>,
    /// Directories watched.
    dirs: usize,
}

impl Thread {
    fn run(mut self, events: std::sync::mpsc::Receiver<notify::Result<notify::Event>>) {
        for event in events {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    let path = e.paths.first().cloned().unwrap_or_default();
                    tracing::warn!("--watch: {}", WatchError::new(&path, &e));
                    continue;
                }
            };
            if event.need_rescan() {
                // The kernel's queue overflowed: something changed, we cannot say what.
                if let Some(root) = self.watched.roots.first().cloned() {
                    if !self.changed(root) {
                        return;
                    }
                }
                continue;
            }
            if !is_change(&event.kind) {
                continue;
            }
            let new_dir = matches!(
                event.kind,
                EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            for path in event.paths {
                if !self.watched.counts(&path) {
                    continue;
                }
                if new_dir && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    if let Err(e) = self.add_tree(&path) {
                        tracing::warn!("{e}");
                    }
                }
                if !self.changed(path) {
                    return;
                }
            }
        }
    }

    /// Tells the loop, unless a message is already on its way; false once the loop is gone.
    fn changed(&self, path: PathBuf) -> bool {
        if self.sent.swap(true, Ordering::SeqCst) {
            return true;
        }
        self.tx.blocking_send(Control::Changed(Changed::new(path, self.sent.clone()))).is_ok()
    }

    /// Watches `dir` and every directory below it that is not ignored (symbolic links are not
    /// followed below a watched path).
    fn add_tree(&mut self, dir: &Path) -> Result<(), WatchError> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            match self.watcher.watch(&d, RecursiveMode::NonRecursive) {
                Ok(()) => self.dirs += 1,
                // Gone already (a short-lived directory): its removal is a change of its own.
                Err(e) if matches!(&e.kind, notify::ErrorKind::PathNotFound) => continue,
                Err(e) if matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound) =>
                {
                    continue;
                }
                Err(e) => return Err(WatchError::new(&d, &e)),
            }
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) && self.watched.counts(&path) {
                    stack.push(path);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_ignore_vcs_dependencies_swap_files_and_logs() {
        let w = Watched::new(&[PathBuf::from("/p")], &["*.tmp".into()]);
        for ignored in [
            "/p/.git/index",
            "/p/node_modules/x/index.js",
            "/p/target/debug/app",
            "/p/src/.app.js.swp",
            "/p/src/app.js~",
            "/p/src/4913",
            "/p/app.log",
            "/p/x.tmp",
            "/p/lib/__pycache__/a.cpython-311.pyc",
            "/elsewhere/app.js",
        ] {
            assert!(!w.counts(Path::new(ignored)), "{ignored}");
        }
        for counted in ["/p/app.js", "/p/src/lib/a.py", "/p", "/p/.env", "/p/targets/a"] {
            assert!(w.counts(Path::new(counted)), "{counted}");
        }
    }

    #[test]
    fn opens_reads_and_access_times_are_not_changes() {
        use notify::event::{CreateKind, DataChange};
        assert!(!is_change(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }
}
