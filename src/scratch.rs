//! Unit tests' scratch directory (tests only): a fresh directory under the system's temp dir,
//! named by the test's tag and the process id, removed when dropped.

use std::path::{Path, PathBuf};

pub(crate) struct Scratch(PathBuf);

/// A unit test that cannot run here because it needs root: fails where `CI` is set (CI runs
/// the suite as root), elsewhere says SKIP and why, and the caller returns (as
/// `tests/support`'s `needs`).
pub(crate) fn needs(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}; CI is set, where this test must run");
    eprintln!("SKIP {test}: {why}");
}

impl Scratch {
    pub(crate) fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("herdsman-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to `name` in the directory; returns its path.
    pub(crate) fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
