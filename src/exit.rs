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

/// Why a command failed: the lines to print on stderr (each after `herdsman: `, by `main`) and
/// the exit code. The one failure type of every command (`run`, the clients, `init`, `pm2`).
#[derive(Debug)]
pub struct Failure {
    /// The exit code (one of this module's).
    pub code: i32,
    /// What to say, one line each (the `herdsman: ` prefix is the printer's).
    pub lines: Vec<String>,
}

impl Failure {
    /// A failure said in one line, printed as it is.
    pub fn new(code: i32, line: impl Into<String>) -> Failure {
        Failure { code, lines: vec![line.into()] }
    }

    /// A failure said in a text of one or more lines, each printed with the prefix.
    pub fn text(code: i32, text: &str) -> Failure {
        Failure { code, lines: text.lines().map(String::from).collect() }
    }

    /// The lines, joined: what a caller that wraps the failure quotes.
    pub fn message(&self) -> String {
        self.lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_prints_one_line_per_line_and_a_line_as_one() {
        let f = Failure::text(CONFIG, "one\ntwo");
        assert_eq!((f.code, f.lines), (CONFIG, vec!["one".to_string(), "two".to_string()]));
        let f = Failure::new(TIMEOUT, "slow\nstill one");
        assert_eq!((f.code, f.lines), (TIMEOUT, vec!["slow\nstill one".to_string()]));
    }
}
