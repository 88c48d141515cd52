//! Where control sockets live, and how a TARGET (an app name or a socket path) is found.
//!
//! Under systemd the unit sets `RuntimeDirectory=herdsman/%i`, so the socket is
//! `$RUNTIME_DIRECTORY/control.sock` = `/run/herdsman/NAME/control.sock`. Standalone, root
//! uses the same place and other users `$XDG_RUNTIME_DIR/herdsman/NAME/control.sock`. The
//! environment is passed in as [`Env`] (read once by `main`).

use std::path::{Path, PathBuf};

pub const SOCKET_FILE: &str = "control.sock";
const SYSTEM_DIR: &str = "/run/herdsman";

/// The environment variables that decide socket locations.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub runtime_directory: Option<String>,
    pub xdg_runtime_dir: Option<String>,
    pub euid: u32,
}

impl Env {
    pub fn from_process() -> Self {
        Env {
            runtime_directory: std::env::var("RUNTIME_DIRECTORY").ok().filter(|s| !s.is_empty()),
            xdg_runtime_dir: std::env::var("XDG_RUNTIME_DIR").ok().filter(|s| !s.is_empty()),
            euid: nix::unistd::geteuid().as_raw(),
        }
    }

    /// Directories that hold one `NAME/control.sock` per app, most specific first.
    fn app_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if self.euid != 0 {
            if let Some(x) = &self.xdg_runtime_dir {
                dirs.push(Path::new(x).join("herdsman"));
            }
        }
        dirs.push(PathBuf::from(SYSTEM_DIR));
        dirs
    }
}

/// The socket `herdsman run` creates for app `name` when `--control` is not given.
pub fn default_socket(name: &str, env: &Env) -> PathBuf {
    if let Some(rd) = &env.runtime_directory {
        // systemd may list several directories separated by ':'; ours is the first.
        let first = rd.split(':').next().unwrap_or(rd);
        return Path::new(first).join(SOCKET_FILE);
    }
    let base = match (&env.xdg_runtime_dir, env.euid) {
        (_, 0) => PathBuf::from(SYSTEM_DIR),
        (Some(x), _) => Path::new(x).join("herdsman"),
        (None, uid) => std::env::temp_dir().join(format!("herdsman-{uid}")),
    };
    base.join(name).join(SOCKET_FILE)
}

/// Every control socket found in the standard places, as (app name, path).
pub fn discover(env: &Env) -> Vec<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut dirs = env.app_dirs();
    if let Some(rd) = &env.runtime_directory {
        if let Some(parent) = Path::new(rd.split(':').next().unwrap_or(rd)).parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        let mut here: Vec<(String, PathBuf)> = entries
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path().join(SOCKET_FILE)))
            .filter(|(_, p)| p.exists())
            .collect();
        here.sort();
        for item in here {
            if !found.iter().any(|(_, p)| *p == item.1) {
                found.push(item);
            }
        }
    }
    found
}

/// Only live supervisors count: a socket file left by a killed one is dropped.
fn live_only(apps: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
    apps.into_iter().filter(|(_, p)| std::os::unix::net::UnixStream::connect(p).is_ok()).collect()
}

/// Turns a TARGET into a socket path.
pub fn resolve(target: Option<&str>, env: &Env) -> Result<PathBuf, String> {
    match target {
        Some(t) if t.contains('/') => Ok(PathBuf::from(t)),
        Some(name) => {
            let mut candidates = Vec::new();
            if let Some(rd) = &env.runtime_directory {
                let dir = Path::new(rd.split(':').next().unwrap_or(rd));
                if dir.file_name().is_some_and(|f| f == name) {
                    candidates.push(dir.join(SOCKET_FILE));
                }
            }
            candidates.extend(env.app_dirs().into_iter().map(|d| d.join(name).join(SOCKET_FILE)));
            candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
                let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
                format!("app {name:?} is not running (no control socket at {})", looked.join(" or "))
            })
        }
        None => {
            let apps = live_only(discover(env));
            match apps.len() {
                1 => Ok(apps[0].1.clone()),
                0 => Err(
                    "no herdsman app is running here; start one with `herdsman run` or name a control socket"
                        .into(),
                ),
                n => {
                    let names: Vec<&str> = apps.iter().map(|(n, _)| n.as_str()).collect();
                    Err(format!("{n} apps are running ({}); name the one you mean", names.join(", ")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_socket_follows_systemd_root_and_user_rules() {
        let sd = Env { runtime_directory: Some("/run/herdsman/web".into()), xdg_runtime_dir: None, euid: 0 };
        assert_eq!(default_socket("web", &sd), PathBuf::from("/run/herdsman/web/control.sock"));
        let root = Env { runtime_directory: None, xdg_runtime_dir: Some("/run/user/0".into()), euid: 0 };
        assert_eq!(default_socket("web", &root), PathBuf::from("/run/herdsman/web/control.sock"));
        let user =
            Env { runtime_directory: None, xdg_runtime_dir: Some("/run/user/1000".into()), euid: 1000 };
        assert_eq!(default_socket("web", &user), PathBuf::from("/run/user/1000/herdsman/web/control.sock"));
    }

    #[test]
    fn sockets_left_by_killed_supervisors_are_not_live() {
        let dir = std::env::temp_dir().join(format!("herdsman-paths-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (live, stale) = (dir.join("live.sock"), dir.join("stale.sock"));
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let apps = vec![("a".to_string(), live.clone()), ("b".to_string(), stale)];
        assert_eq!(live_only(apps), vec![("a".to_string(), live)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_target_is_used_as_is() {
        assert_eq!(resolve(Some("/tmp/x.sock"), &Env::default()).unwrap(), PathBuf::from("/tmp/x.sock"));
        let err = resolve(Some("surely-not-running-xyz"), &Env::default()).unwrap_err();
        assert!(err.contains("is not running"), "{err}");
    }
}
