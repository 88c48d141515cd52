//! What crosses an in-place upgrade and is shared beyond [`crate::upgrade`]: the [`Exporter`]
//! that every component holding a descriptor (listeners, steering, notify, metrics, the loop)
//! hands its fds to, and [`UpgradeError`], the answer an upgrade request waits for. A leaf
//! module, so those components do not depend on the upgrade itself (which depends on all of
//! them). The receiving side of the descriptors is [`crate::sys::HandedOver`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Collects the descriptors of a state, each under a name. A *dry* exporter (for the check)
/// records the current numbers; a real one duplicates each without close-on-exec, above the
/// workers' fd range. Descriptors exported without a name ([`Exporter::fd`], by the listeners,
/// steering and the notify socket) are named after the current [`Exporter::prefix`].
pub struct Exporter {
    dry: bool,
    floor: RawFd,
    dups: Vec<OwnedFd>,
    table: BTreeMap<String, RawFd>,
    prefix: String,
    counter: usize,
}

impl Exporter {
    pub fn new(dry: bool, floor: RawFd) -> Exporter {
        Exporter { dry, floor, dups: Vec::new(), table: BTreeMap::new(), prefix: "legacy".into(), counter: 0 }
    }

    /// Names the next unnamed descriptors `<prefix>-0`, `<prefix>-1`, …
    pub fn prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
        self.counter = 0;
    }

    /// Exports `fd` under the next name of the current prefix; returns its key (its number in
    /// the new image across `execve`).
    pub fn fd(&mut self, fd: &impl AsFd) -> std::io::Result<RawFd> {
        let name = format!("{}-{}", self.prefix, self.counter);
        self.counter += 1;
        self.named(name, fd)
    }

    /// Exports `fd` as `name`; returns its key.
    pub fn named(&mut self, name: String, fd: &impl AsFd) -> std::io::Result<RawFd> {
        if !valid_fd_name(&name) || self.table.contains_key(&name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("descriptor name {name:?} is invalid or used twice"),
            ));
        }
        let n = if self.dry {
            fd.as_fd().as_raw_fd()
        } else {
            let dup = sys::dup_inheritable(fd.as_fd(), self.floor)?;
            let n = dup.as_raw_fd();
            self.dups.push(dup);
            n
        };
        self.table.insert(name, n);
        Ok(n)
    }

    /// The descriptors exported so far: (name, number).
    pub fn table(&self) -> BTreeMap<String, RawFd> {
        self.table.clone()
    }
}

/// What herdsman puts before every name it keeps in systemd's fd store (see `fdstore`), so
/// that its own descriptors are told from the socket unit's by name alone.
pub const STORE_PREFIX: &str = "herdsman.";

/// Longest `FDNAME=` systemd accepts (`FDNAME_MAX`).
pub const MAX_FD_NAME: usize = 255;

/// Why `name` cannot name a descriptor, or `None`: the one rule for the upgrade's table and
/// systemd's fd store, which keeps the same names ([`STORE_PREFIX`] included, at most
/// [`MAX_FD_NAME`] printable ASCII characters without `:`, the separator of `LISTEN_FDNAMES`).
pub fn fd_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if STORE_PREFIX.len() + name.len() > MAX_FD_NAME {
        Some("it is longer than 255 characters with the herdsman. prefix")
    } else if name.contains(':') {
        Some("it contains ':' (the separator of LISTEN_FDNAMES)")
    } else if !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Some("it contains a character that is not printable ASCII")
    } else {
        None
    }
}

/// Whether `name` may name a descriptor (see [`fd_name_problem`]).
pub fn valid_fd_name(name: &str) -> bool {
    fd_name_problem(name).is_none()
}

/// Why an upgrade was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    #[error("{0} does not exist; give an installed herdsman with --binary PATH")]
    Missing(String),
    #[error("{0} is not an executable file; check its permissions (chmod +x) or give another --binary")]
    NotExecutable(String),
    #[error("{path} failed its take-over check ({how}){detail}; it cannot take over this supervisor")]
    CheckFailed { path: String, how: String, detail: String },
    #[error("{path} did not answer its take-over check within {within} (killed); is it herdsman?")]
    CheckTimeout { path: String, within: String },
    #[error(
        "{path} (version {version}) reads state format {theirs}, this supervisor writes {ours}; upgrade in two steps or restart the service"
    )]
    Incompatible { path: String, version: String, theirs: u32, ours: u32 },
    #[error("cannot prepare the hand-over: {0}")]
    Prepare(String),
    #[error("execve {path} failed: {err}; the running supervisor carries on")]
    Exec { path: String, err: String },
    #[error("an upgrade is already in progress; wait for it to finish")]
    Busy,
    #[error("the supervisor is stopping")]
    Stopping,
    /// The candidate could have been supplied by someone who may not run code as herdsman's
    /// user (see `crate::upgrade::Candidate::open`).
    #[error("refusing to run {path}: {why}")]
    Untrusted { path: String, why: String },
}

impl UpgradeError {
    /// Whether this is a refusal of an untrusted binary (`ErrorKind::Untrusted`, exit 77).
    pub fn untrusted(&self) -> bool {
        matches!(self, UpgradeError::Untrusted { .. })
    }
}
