//! herdsman: runs N copies of a server on shared listening sockets and replaces them one by
//! one on reload, with zero downtime, natively under systemd or standalone.
//!
//! Theory of operation (where to look first; docs/architecture.md maps every concern to its
//! file):
//! * `main` reads argv and the environment once into an [`app::Process`], calls [`app`], and
//!   turns its [`exit::Failure`] into an exit code ([`exit`]). [`app`] is the start-up sequence
//!   (settings, sockets adopted or bound, the `World`, the loop, the exit code) for `run` and
//!   for the new image of an in-place upgrade, and the subcommands; it owns the process-wide
//!   signals; it reads the environment only through the `Process`.
//! * [`config`] turns flags and the TOML file into validated [`config::Settings`]: every
//!   setting is one field of [`config::Layer`], which is both the flags ([`cli`]) and the
//!   file's keys; [`credentials`] resolves `user`/`group` before any fork.
//! * [`listeners`] inherits the sockets from systemd (`LISTEN_FDS`) or binds them; with
//!   `--balance steer|sticky`, [`steer`] gives every worker its own socket in one
//!   `SO_REUSEPORT` group and rewrites the classic BPF program that routes new connections.
//! * [`supervisor`] is the event loop that owns every worker's lifetime: spawn, readiness,
//!   exits, back-off, scaling, and the rolling reload with its safety net
//!   (`supervisor/rollout.rs`: `min_ready`, abort on any new-worker failure, rollback,
//!   generations pinned to their release). It is a serializable core that decides (plain
//!   data, the time passed in as [`mono::Mono`], decisions out as commands) and a driver that
//!   owns every descriptor and acts through its `Host` (`supervisor/host.rs`), so its decisions
//!   are tested in-process without forking (`supervisor/tests/`) and an in-place upgrade is
//!   the core serialized plus the descriptors by name. [`spawn`] and [`sys`] (the only `unsafe` code)
//!   start workers with the sockets at fd 3.. and their own `LISTEN_PID`.
//! * [`output`] and [`journal`] route worker lines (journald fields `WORKER_ID`, `WORKER_PID`,
//!   `WORKER_GENERATION`); [`logging`] writes herdsman's own events without ever blocking the
//!   loop; [`notify`] speaks sd_notify with systemd above and with workers below. [`logs`]
//!   keeps a bounded ring of recent worker lines for `herdsman logs` (standalone; under
//!   systemd the client reads the journal).
//! * [`control`] is the control socket (server, client, the `logs` request's halves; peers
//!   authenticated by `SO_PEERCRED`), speaking [`protocol`] (the public wire schema); [`procstat`] reads `/proc` for it and the metrics; [`metrics`] serves Prometheus metrics, herdsman's own and its workers',
//!   outside the loop.
//! * [`reaper`] reaps orphans as a container's PID 1 (or as a subreaper) without ever taking a
//!   worker's exit; [`init`] and [`service`] install an app as systemd units and drive them.
//! * [`upgrade`] re-executes the supervisor in place (`herdsman upgrade`, `SIGUSR2`): a
//!   take-over check of the new binary, then every descriptor and the whole state handed to
//!   `execve` in one memfd; `supervisor/handover.rs` is the loop's side.
//! * [`watch`] (`--watch`, for development) turns file changes into [`requests`];
//!   `supervisor/watch.rs` debounces them into one rolling reload, never during a roll-out.
//! * Leaves, shared by the modules above without tying them to each other (no import cycle
//!   among the top-level modules: `tests/architecture.rs`): [`protocol`], [`program`]
//!   (finding a worker's program), [`handoff`] (the upgrade's fd [`handoff::Exporter`] and
//!   [`handoff::UpgradeError`]), [`env`] (shared variable names), [`glob`], [`exit`] (the
//!   codes and [`exit::Failure`]) and [`sys`].

pub mod app;
pub(crate) mod backoff;
pub(crate) mod cli;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod credentials;
pub(crate) mod env;
pub mod exit;
pub(crate) mod fdstore;
pub(crate) mod generate;
pub(crate) mod glob;
pub(crate) mod handoff;
pub(crate) mod init;
pub(crate) mod intercept;
pub(crate) mod ipc;
pub(crate) mod journal;
pub(crate) mod listeners;
pub(crate) mod logging;
pub(crate) mod logs;
pub(crate) mod metrics;
pub(crate) mod mono;
pub(crate) mod notify;
pub(crate) mod output;
pub(crate) mod pm2;
pub(crate) mod procstat;
pub(crate) mod program;
pub(crate) mod protocol;
pub(crate) mod reaper;
pub(crate) mod requests;
#[cfg(test)]
mod scratch;
pub(crate) mod service;
pub(crate) mod spawn;
pub(crate) mod specs;
pub(crate) mod steer;
pub(crate) mod supervisor;
pub(crate) mod sys;
pub(crate) mod upgrade;
pub(crate) mod watch;
pub(crate) mod worker;

/// What the integration tests (`tests/`) reach inside the crate: the parsers they fuzz and the
/// few constants they check. Not an API: everything else is `pub(crate)`, so rustc reports
/// dead code.
#[doc(hidden)]
pub mod testing {
    pub mod config {
        pub use crate::config::{Layer, ReadyMode, Settings, keys, load};
        pub mod values {
            pub use crate::config::values::{
                MAX_DURATION, MAX_SIZE, RESERVED_ENV, duration, env_key_reserved, env_pair, listen, ready,
                signal, size, workers,
            };
        }
    }
    pub mod protocol {
        pub use crate::protocol::{Op, parse_request, parse_scale};
    }
    pub mod metrics {
        pub mod model {
            pub use crate::metrics::model::{Format, render};
        }
        pub mod parse {
            pub use crate::metrics::parse::{merge, parse};
        }
        pub mod http {
            pub use crate::metrics::http::wire::{
                ResponseEnd, complete_response, parse_request, response_body,
            };
        }
    }
    pub use crate::control::server::MAX_CLIENTS;
    pub use crate::env::STATE_VAR;
    pub use crate::upgrade::STATE_FORMAT;
}
