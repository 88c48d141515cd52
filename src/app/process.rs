//! The process herdsman runs in: what `main` read from it once ([`Process`]: argv, the
//! environment, the binary's path), and the process-wide set-up that both start-up paths do
//! before the sockets (logging, the fd limit, the kernel check, the event loop's runtime).

use std::ffi::OsString;
use std::path::PathBuf;

use super::Failure;
use crate::control::paths;
use crate::logging::Sink;
use crate::steer::Routing;
use crate::{exit, sys};

/// The world as `main` read it, once. The library reads argv and the environment only
/// through this (never `std::env`), so a test can start a supervisor with a world of its own.
#[derive(Debug, Clone, Default)]
pub struct Process {
    /// argv, the program name first.
    pub args: Vec<OsString>,
    /// The environment, in `environ`'s order.
    pub vars: Vec<(OsString, OsString)>,
    /// This binary's path: where the next in-place upgrade re-executes from.
    pub exe: Option<PathBuf>,
}

impl Process {
    /// The variable `key`, if set to valid UTF-8 (as `std::env::var`).
    pub fn var(&self, key: &str) -> Option<String> {
        let (_, value) = self.vars.iter().find(|(k, _)| k.as_os_str() == key)?;
        value.to_str().map(String::from)
    }

    /// Whether the fd store is in use (`HERDSMAN_FD_STORE=1` and herdsman the unit's main
    /// process): see `fdstore::in_use`.
    pub fn fd_store(&self) -> bool {
        crate::fdstore::in_use(
            self.var(crate::env::FD_STORE_VAR).as_deref(),
            self.var("INVOCATION_ID").as_deref(),
            self.var("SYSTEMD_EXEC_PID").as_deref(),
            std::process::id(),
        )
    }

    /// `HERDSMAN_STEER_ROUTING`: how `--balance steer` picks among receiving workers. The
    /// default, `round-robin`, steps down to `hash` where the kernel refuses eBPF; `hash`
    /// starts there (to compare, or to keep CAP_BPF from the service). `shortest-queue` was
    /// removed (docs/bench-queues.md says why) and is refused with the fix.
    pub fn steer_routing(&self) -> Result<Routing, super::Failure> {
        match self.var("HERDSMAN_STEER_ROUTING").as_deref() {
            None | Some("" | "round-robin") => Ok(Routing::RoundRobin),
            Some("hash") => Ok(Routing::Hash),
            Some("shortest-queue") => Err(super::Failure::new(
                crate::exit::CONFIG,
                "HERDSMAN_STEER_ROUTING=\"shortest-queue\" was removed (it needed CAP_PERFMON to read kernel memory, for a gain inside the benchmarks' noise); use round-robin (the default) or hash, or unset it",
            )),
            Some(other) => Err(super::Failure::new(
                crate::exit::CONFIG,
                format!(
                    "HERDSMAN_STEER_ROUTING={other:?} is not a routing; use round-robin or hash (or unset it)"
                ),
            )),
        }
    }

    /// The whole environment as text (what workers inherit before the app's `env`).
    pub fn env(&self) -> Vec<(String, String)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
            .collect()
    }

    /// argv as text (to re-execute with on an in-place upgrade).
    pub fn argv(&self) -> Vec<String> {
        self.args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    /// The variables that decide where control sockets live.
    pub fn paths(&self) -> paths::Env {
        paths::Env::from_vars(|k| self.var(k))
    }

    /// Installs herdsman's own logging (see [`crate::logging::install`]), as JSON lines with
    /// `log_format = "json"`.
    pub(super) fn start_logging(&self, settings: &crate::config::Settings) -> Option<Sink> {
        let json = settings.log_format == crate::config::LogFormat::Json;
        crate::logging::install(
            self.var("HERDSMAN_LOG").as_deref(),
            self.var("JOURNAL_STREAM").as_deref(),
            self.var("HERDSMAN_JOURNAL_SOCKET").as_deref(),
            json.then_some(settings.name.as_str()),
        )
    }
}

/// Raises the soft fd limit, then checks that the kernel has what supervision needs (exit 71
/// if not).
pub(super) fn kernel_and_limits() -> Result<(), Failure> {
    match sys::raise_fd_limit() {
        Ok((before, after)) if before != after => {
            tracing::debug!("raised the soft file descriptor limit from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
    match sys::check_kernel() {
        Ok(k) if !k.close_range_cloexec => {
            tracing::debug!("close_range(CLOSE_RANGE_CLOEXEC) unavailable: closing worker fds one by one");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) => Err(Failure::new(if e.is_unsupported() { exit::OS } else { exit::FAILURE }, e.to_string())),
    }
}

/// The event loop's runtime: current-thread (the loop and its servers share one thread).
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit::FAILURE, format!("cannot start the event loop: {e}")))
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn process(vars: &[(&str, &[u8])]) -> Process {
        let vars = vars.iter().map(|(k, v)| (OsString::from(k), OsString::from_vec(v.to_vec()))).collect();
        Process { args: vec!["herdsman".into(), OsString::from_vec(b"-c\xff".to_vec())], vars, exe: None }
    }

    #[test]
    fn var_reads_like_std_env_var_the_first_entry_and_only_utf8() {
        let p = process(&[("A", b"one"), ("A", b"two"), ("BAD", b"\xff"), ("EMPTY", b"")]);
        assert_eq!(p.var("A").as_deref(), Some("one"));
        assert_eq!(p.var("BAD"), None);
        assert_eq!(p.var("EMPTY").as_deref(), Some(""));
        assert_eq!(p.var("MISSING"), None);
    }

    #[test]
    fn env_and_argv_keep_every_entry_in_order_lossily() {
        let p = process(&[("A", b"one"), ("BAD", b"\xff")]);
        let env = p.env();
        assert_eq!(env[0], ("A".to_string(), "one".to_string()));
        assert_eq!(env[1], ("BAD".to_string(), "\u{fffd}".to_string()));
        assert_eq!(p.argv(), ["herdsman", "-c\u{fffd}"]);
    }

    #[test]
    fn paths_ignore_empty_runtime_directories() {
        let p = process(&[("RUNTIME_DIRECTORY", b""), ("XDG_RUNTIME_DIR", b"/run/user/1000")]);
        let env = p.paths();
        assert_eq!(env.runtime_directory, None);
        assert_eq!(env.xdg_runtime_dir.as_deref(), Some("/run/user/1000"));
    }
}
