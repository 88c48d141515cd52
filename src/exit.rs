//! Exit codes: the one place that names them, so `main`, the docs and the systemd unit
//! (`RestartPreventExitStatus=`) agree.
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success (including a graceful stop) |
//! | 1    | runtime failure (a socket could not be bound, a reload failed, ...) |
//! | 2    | bad command line (unknown flag, missing argument) |
//! | 71   | the kernel (or a seccomp sandbox) lacks what supervision needs: pidfd_open, pidfd_send_signal (`EX_OSERR`) |
//! | 69   | (client commands) the app is not running or cannot be reached (`EX_UNAVAILABLE`) |
//! | 75   | (client commands) no answer before the timeout, or the supervisor is busy: try again (`EX_TEMPFAIL`) |
//! | 77   | (client commands) permission denied (`EX_NOPERM`) |
//! | 78   | bad configuration (`EX_CONFIG`): invalid config file or value, no socket to serve |

/// Everything went well.
pub const OK: i32 = 0;
/// Something failed at run time; retrying may help.
pub const FAILURE: i32 = 1;
/// The command line could not be parsed.
pub const USAGE: i32 = 2;
/// The configuration is invalid; retrying will not help until it is fixed.
pub const CONFIG: i32 = 78;
/// The kernel or the sandbox lacks a facility herdsman needs; retrying will not help.
pub const OS: i32 = 71;
/// The app is not running, or its control socket cannot be reached.
pub const UNAVAILABLE: i32 = 69;
/// No answer before the client's timeout, or the supervisor is busy.
pub const TIMEOUT: i32 = 75;
/// The control socket refused us.
pub const NOPERM: i32 = 77;
