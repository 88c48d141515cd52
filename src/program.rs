//! Finding a worker's program before any fork, as `execvp` would: a leaf module, so the
//! configuration (which reports a missing program as a problem), `spawn`, `init`, `pm2` and the
//! bind interception share it without depending on each other.

use std::path::{Path, PathBuf};

/// Why a program cannot be found or run, before any fork.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(clippy::enum_variant_names)] // "not executable", "not found", "not on PATH": the words say why
pub enum ResolveError {
    #[error("{0} is not an executable file; check its permissions (chmod +x)")]
    NotExecutable(String),
    #[error("command not found: {0}")]
    NotFound(String),
    #[error("command not found: {program} (searched PATH={path})")]
    NotOnPath { program: String, path: String },
}

/// Finds the program like `execvp` would, but before forking (so a typo is a clear error, and
/// the child does no path search).
pub fn resolve(program: &str, env: &[(String, String)], cwd: Option<&Path>) -> Result<String, ResolveError> {
    if program.contains('/') {
        let full = match cwd {
            Some(dir) if !program.starts_with('/') => dir.join(program),
            _ => PathBuf::from(program),
        };
        return if is_executable(&full) {
            Ok(program.to_string())
        } else if full.exists() {
            Err(ResolveError::NotExecutable(program.to_string()))
        } else {
            Err(ResolveError::NotFound(program.to_string()))
        };
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p))
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| ResolveError::NotOnPath { program: program.to_string(), path: path.to_string() })
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_rejected_clearly() {
        let env = vec![("PATH".to_string(), "/nonexistent:/bin:/usr/bin".to_string())];
        assert!(resolve("sh", &env, None).unwrap().ends_with("/sh"));
        assert!(matches!(resolve("no-such-program-xyz", &env, None), Err(ResolveError::NotOnPath { .. })));
        let plain = std::env::temp_dir().join(format!("herdsman-not-exec-{}", std::process::id()));
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let err = resolve(plain.to_str().unwrap(), &env, None).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(matches!(err, ResolveError::NotExecutable(_)), "{err}");
    }
}
