//! What is wrong with a configuration, and where. A [`Problem`] is typed (a [`Place`] and a
//! [`ConfigError`]) so code and tests can tell problems apart without reading their text; shown,
//! it is one line that names the flag or the key and says how to fix it.

use std::borrow::Borrow;
use std::path::PathBuf;

use super::ListenAddr;
use super::values::ValueError;
use crate::credentials::CredError;

/// Where a problem is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A command-line flag (`--workers`), or `command` for the command after `--`.
    Flag(String),
    /// A key of a config file.
    Key { file: String, key: String },
    /// A config file as a whole.
    File(String),
    /// A rule between settings, each of which may be a flag or a key (`--balance / balance`).
    Setting { flag: String, key: String },
    /// Nowhere in particular (there is no command at all; the program is not found).
    Anywhere,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Flag(flag) => write!(f, "{flag}: "),
            Place::Key { file, key } => write!(f, "{file}: key `{key}`: "),
            Place::File(file) => write!(f, "{file}: "),
            Place::Setting { flag, key } => write!(f, "{flag} / {key}: "),
            Place::Anywhere => Ok(()),
        }
    }
}

/// What is wrong. Every message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file: {0}")]
    Unreadable(String),
    #[error("invalid TOML{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    InvalidToml { line: Option<usize>, message: String },
    #[error("unknown key; allowed keys are: {}", super::keys().join(", "))]
    UnknownKey,
    /// A key's value has the wrong TOML type (`expected a string, got integer`).
    #[error("{0}")]
    WrongType(String),
    #[error(transparent)]
    Value(#[from] ValueError),
    #[error(
        "no command to run: put it after `--` (herdsman run ... -- python3 app.py) or set `command = [\"python3\", \"app.py\"]` in the config file"
    )]
    NoCommand,
    #[error("argument {0:?} contains a NUL byte, which no program can receive; remove it")]
    NulInArgument(String),
    #[error(transparent)]
    Program(#[from] crate::program::ResolveError),
    #[error("working directory {} does not exist or is not a directory", .0.display())]
    NoDirectory(PathBuf),
    #[error(
        "{0} is a unix socket, which cannot be steered (only TCP addresses can); use balance = \"shared\" or a TCP address"
    )]
    NotSteerable(ListenAddr),
    #[error(
        "`message` (PM2's shutdown message) goes over a Node worker's IPC channel, and {0:?} is not node or nodejs: run node itself (node app.js) or use a signal the app handles (e.g. SIGINT)"
    )]
    MessageNeedsNode(String),
    #[error("no such group {0:?}; create it or remove the key")]
    NoControlGroup(String),
    #[error(transparent)]
    Credentials(#[from] CredError),
    #[error("must be greater than 0")]
    Zero,
    #[error("backoff_initial must be > 0 and <= backoff_max")]
    BackoffOrder,
    #[error("{} does not exist; create it or fix the path (relative paths are from herdsman's working directory)", .0.display())]
    NoWatchPath(PathBuf),
    #[error("{0}")]
    WatchIgnore(String),
}

/// One problem: where and what, and the line that shows both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}")]
pub struct Problem {
    pub place: Place,
    pub error: ConfigError,
    /// `place` then `error`, rendered once: it is also what [`Borrow<str>`] gives, so a list
    /// of problems joins like a list of lines (`problems.0.join("; ")`).
    line: String,
}

impl Problem {
    pub fn new(place: Place, error: impl Into<ConfigError>) -> Problem {
        let error = error.into();
        Problem { line: format!("{place}{error}"), place, error }
    }
}

impl Borrow<str> for Problem {
    fn borrow(&self) -> &str {
        &self.line
    }
}

/// Every problem found, one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct Problems(pub Vec<Problem>);

impl From<Problem> for Problems {
    fn from(p: Problem) -> Problems {
        Problems(vec![p])
    }
}
