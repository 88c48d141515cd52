//! The in-place upgrade's state document (format [`upgrade::STATE_FORMAT`]): the supervisor's
//! core serialized as it is, the driver's state beside it (sockets, steering, notify socket,
//! control socket, metrics endpoint and counters, the workers' last output), and every
//! descriptor in one table by name. `crate::upgrade` is the mechanism (check, exec) and knows
//! nothing of this document but its bytes; `app::resume` reads it back (through [`parse`]),
//! converting the previous release's format 2 ([`super::v2`]).

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Core;
use crate::config::Layer;
use crate::upgrade::{self, CheckReport, STATE_FORMAT, STATE_FORMAT_V2};

/// Everything the new image needs, in one document: the supervisor's core as it is, the
/// driver's state beside it, and the descriptors as a table by name.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub format: u32,
    /// The version of the image that wrote this.
    pub from_version: String,
    /// The path the next upgrade re-executes by default.
    pub binary: PathBuf,
    /// In-place upgrades since the service started, this one included.
    pub upgrades: u64,
    /// `CLOCK_MONOTONIC` (ns) just before `execve`, to measure the take-over.
    pub exec_at_ns: i64,
    /// What `herdsman run` was started with, for reloads that re-read the config.
    pub config: Option<PathBuf>,
    /// Its flags' layer (the settings given on the command line).
    pub overrides: Layer,
    /// The argv to re-execute with next time.
    pub argv: Vec<String>,
    /// The workers' soft fd limit (see `sys::raise_fd_limit`).
    pub worker_fd_limit: u64,
    /// The control socket (its descriptor: `control` in [`Handover::fds`]).
    pub control: ControlState,
    /// The metrics endpoint (its descriptor: `metrics-http`).
    pub metrics_http: Option<HttpState>,
    pub metrics: crate::metrics::carry::MetricsState,
    pub listeners: crate::listeners::ListenersState,
    pub steering: Option<crate::steer::SteeringState>,
    pub notify: crate::notify::NotifyState,
    /// The supervisor's core: plain data, serialized as it is.
    pub core: Core,
    /// Each live worker's last output lines, by pid (for failure reports).
    pub tails: BTreeMap<i32, Vec<String>>,
    /// Every descriptor, by name (see [`fd_name`]): across `execve` the value is the
    /// descriptor's number; the listening sockets', steering's and the notify socket's states
    /// refer to theirs by that value, which is then only a key (see [`keyed`]).
    pub fds: BTreeMap<String, RawFd>,
}

/// The names of a worker's descriptors in [`Handover::fds`]: `pidfd-<slot>-<generation>-<pid>`,
/// `out-…`, `err-…`, `ipc-…` (Node IPC channel), `bind-…` (bind filter).
pub fn fd_name(kind: &str, slot: usize, generation: u64, pid: i32) -> String {
    format!("{kind}-{slot}-{generation}-{pid}")
}

/// The fixed names in [`Handover::fds`].
pub const FD_CONTROL: &str = "control";
pub const FD_METRICS_HTTP: &str = "metrics-http";
pub const FD_REPLY: &str = "reply";

/// The descriptors the listening sockets', steering's and the notify socket's states refer to
/// by key (every name in `table` but the supervisor's own), taken out of `fds` (by name) into
/// a [`crate::sys::HandedOver`] keyed as those states expect.
pub fn keyed(
    table: &BTreeMap<String, RawFd>,
    fds: &mut BTreeMap<String, OwnedFd>,
    prefixes: &[&str],
) -> std::io::Result<crate::sys::HandedOver> {
    let mut by_key = std::collections::HashMap::new();
    for (name, key) in table {
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let fd = fds.remove(name).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("descriptor {name} missing"))
        })?;
        by_key.insert(*key, fd);
    }
    Ok(crate::sys::HandedOver::from_owned(by_key))
}

/// The name prefixes [`keyed`] hands to the listeners, steering and the notify socket.
pub const KEYED_PREFIXES: &[&str] = &["listener-", "steer-", "notify-", "legacy-"];

/// The control socket.
#[derive(Debug, Serialize, Deserialize)]
pub struct ControlState {
    pub path: PathBuf,
    pub made_dir: Option<PathBuf>,
    pub uid: u32,
    pub group: Option<u32>,
}

/// The metrics endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct HttpState {
    /// `Some(path)` for a unix socket, `None` for TCP.
    pub unix: Option<PathBuf>,
    pub address: String,
}

/// The state the candidate's check reads: the whole document (the check proves the new
/// binary parses all of it), with every value that may be a secret replaced: the workers'
/// environment (config `env`, `-e`) and herdsman's own argv. The check needs none of them.
pub fn redacted(mut state: Handover) -> Handover {
    const HIDDEN: &str = "(redacted)";
    state.core.redact(HIDDEN);
    for kv in &mut state.overrides.env {
        let key = kv.split_once('=').map(|(k, _)| k.to_string()).unwrap_or_default();
        *kv = format!("{key}={HIDDEN}");
    }
    state.argv = state.argv.iter().take(1).cloned().collect();
    state
}

/// `herdsman upgrade-check`: reads a state from stdin and says whether this binary can take it
/// over (exit 0 and one JSON line) or not (a line on stderr, exit 78).
pub fn check_command(input: &mut impl std::io::Read) -> Result<CheckReport, String> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf).map_err(|e| format!("cannot read the state: {e}"))?;
    let (format, _state) = parse_with_format(&buf)?;
    Ok(CheckReport { version: upgrade::version().to_string(), state_format: format })
}

/// Parses a state, refusing formats this binary does not read; a format-2 state (the previous
/// release's) is converted (see `supervisor::v2`).
pub fn parse(bytes: &[u8]) -> Result<Handover, String> {
    parse_with_format(bytes).map(|(_, h)| h)
}

/// [`parse`], with the format the state was written in.
pub fn parse_with_format(bytes: &[u8]) -> Result<(u32, Handover), String> {
    #[derive(Deserialize)]
    struct Head {
        format: u32,
    }
    let head: Head = serde_json::from_slice(bytes).map_err(|e| format!("unreadable upgrade state: {e}"))?;
    match head.format {
        STATE_FORMAT => serde_json::from_slice(bytes)
            .map(|h| (STATE_FORMAT, h))
            .map_err(|e| format!("unreadable upgrade state: {e}")),
        STATE_FORMAT_V2 => super::v2::convert(bytes).map(|h| (STATE_FORMAT_V2, h)),
        other => Err(format!(
            "upgrade state format {other} is not {STATE_FORMAT} (or {STATE_FORMAT_V2}), the ones this herdsman reads"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_format_is_refused_by_name_before_it_is_read() {
        let err = parse(br#"{"format": 99}"#).unwrap_err();
        assert!(err.contains("format 99"), "{err}");
        assert!(parse(b"not json").unwrap_err().starts_with("unreadable upgrade state"));
        let err = parse(format!(r#"{{"format": {STATE_FORMAT}}}"#).as_bytes()).unwrap_err();
        assert!(err.contains("missing field"), "{err}");
    }
}
