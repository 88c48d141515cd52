//! herdsman: runs N copies of a server on shared listening sockets and replaces them one by
//! one on reload, with zero downtime, natively under systemd or standalone.
//!
//! Theory of operation:
//! * `main` reads the world once (argv, environment, signals) and injects it.
//! * [`config`] turns flags and the TOML file into validated [`config::Settings`].
//! * [`listeners`] inherits the sockets from systemd (`LISTEN_FDS`) or binds them.
//! * [`supervisor`] is the event loop that owns every worker; [`spawn`] and [`sys`] start
//!   them with the sockets at fd 3.. and their own `LISTEN_PID`; [`output`] routes their lines;
//!   [`notify`] speaks sd_notify with systemd above and with workers below; [`logging`] writes
//!   herdsman's own log output without ever blocking the loop; [`metrics`] serves
//!   Prometheus metrics, herdsman's own and its workers', outside the loop.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod credentials;
pub mod exit;
pub mod generate;
pub mod init;
pub mod journal;
pub mod listeners;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod output;
pub mod spawn;
pub mod steer;
pub mod supervisor;
pub mod sys;
pub mod worker;
