//! Where control sockets live, and how a TARGET (an app name or a socket path) is found.
//!
//! Under systemd the unit sets `RuntimeDirectory=herdsman/%i`, so the socket is
//! `$RUNTIME_DIRECTORY/control.sock` = `/run/herdsman/NAME/control.sock`. Standalone, root
//! uses the same place and other users `$XDG_RUNTIME_DIR/herdsman/NAME/control.sock`. The
//! environment is passed in as [`Env`] (from what `main` read once).

use std::path::{Path, PathBuf};

pub(crate) const SOCKET_FILE: &str = "control.sock";
const SYSTEM_DIR: &str = "/run/herdsman";

/// The environment variables that decide socket locations.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub runtime_directory: Option<String>,
    pub xdg_runtime_dir: Option<String>,
    pub euid: u32,
}

impl Env {
    /// From the environment as `var` reads it (`app::Process::var`: what `main` read once).
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        Env {
            runtime_directory: var("RUNTIME_DIRECTORY").filter(|s| !s.is_empty()),
            xdg_runtime_dir: var("XDG_RUNTIME_DIR").filter(|s| !s.is_empty()),
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
pub(crate) fn default_socket(name: &str, env: &Env) -> PathBuf {
    if let Some(rd) = &env.runtime_directory {
        // systemd may list several directories separated by ':'; ours is the first.
        let first = rd.split(':').next().unwrap_or(rd);
        return Path::new(first).join(SOCKET_FILE);
    }
    let base = match (&env.xdg_runtime_dir, env.euid) {
        (_, 0) => PathBuf::from(SYSTEM_DIR),
        (Some(x), _) => Path::new(x).join("herdsman"),
        (None, _) => fallback_dir(env).unwrap_or_default(),
    };
    base.join(name).join(SOCKET_FILE)
}

/// The shared-`/tmp` directory [`default_socket`] falls back to (non-root, no
/// `XDG_RUNTIME_DIR`), which must be checked with [`ensure_private_dir`] before use: anyone
/// can create `/tmp/herdsman-UID` first.
pub(crate) fn fallback_dir(env: &Env) -> Option<PathBuf> {
    let used = env.runtime_directory.is_none() && env.xdg_runtime_dir.is_none() && env.euid != 0;
    used.then(|| std::env::temp_dir().join(format!("herdsman-{}", env.euid)))
}

/// Why a private runtime directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrivateDirError {
    #[error(
        "{} is not ours ({what}): another user may have created it to spy on or hijack the control socket; set XDG_RUNTIME_DIR to a private directory (e.g. /run/user/{euid}) or pass --control",
        dir.display()
    )]
    NotOurs { dir: PathBuf, what: String, euid: u32 },
    #[error("cannot set up the runtime directory {}: {err}; set XDG_RUNTIME_DIR or pass --control", dir.display())]
    Io { dir: PathBuf, err: std::io::Error },
}

/// Makes sure `dir` is a directory (not a symlink) owned by `euid` with mode 0700: creates it
/// so, fixes the mode of one of ours, refuses anything else.
pub(crate) fn ensure_private_dir(dir: &Path, euid: u32) -> Result<(), PrivateDirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let io = |err| PrivateDirError::Io { dir: dir.to_path_buf(), err };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    // lstat: a symlink planted here must not redirect us (chmod below would follow it).
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    let not_ours = |what: String| PrivateDirError::NotOurs { dir: dir.to_path_buf(), what, euid };
    if !meta.file_type().is_dir() {
        return Err(not_ours("not a directory".into()));
    }
    if meta.uid() != euid {
        return Err(not_ours(format!("owned by uid {}", meta.uid())));
    }
    if meta.mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Every control socket found in the standard places, as (app name, path).
pub(crate) fn discover(env: &Env) -> Vec<(String, PathBuf)> {
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
pub(crate) fn resolve(target: Option<&str>, env: &Env) -> Result<PathBuf, String> {
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
        // Bound, never listening (what a killed supervisor leaves): refused even while another
        // test's fork holds a copy of the descriptor, which a dropped listener would not be.
        {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
            use std::os::fd::AsRawFd;
            let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
            bind(fd.as_raw_fd(), &UnixAddr::new(&stale).unwrap()).unwrap();
        }
        let apps = vec![("a".to_string(), live.clone()), ("b".to_string(), stale)];
        assert_eq!(live_only(apps), vec![("a".to_string(), live)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tmp_fallback_dir_must_be_ours_and_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let scratch = std::env::temp_dir().join(format!("herdsman-privdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let euid = nix::unistd::geteuid().as_raw();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        // Missing: created 0700.
        let fresh = scratch.join("fresh");
        ensure_private_dir(&fresh, euid).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        // Ours but opened up (e.g. created under a lax umask): fixed.
        let lax = scratch.join("lax");
        std::fs::create_dir(&lax).unwrap();
        std::fs::set_permissions(&lax, std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&lax, euid).unwrap();
        assert_eq!(mode(&lax), 0o700);
        // Someone else's (here: we pretend to be another uid): refused, naming the fix.
        let err = ensure_private_dir(&lax, euid + 1).unwrap_err();
        assert!(matches!(err, PrivateDirError::NotOurs { .. }), "{err}");
        assert!(err.to_string().contains("XDG_RUNTIME_DIR"), "{err}");
        // A symlink to a directory we own: refused, and its target keeps its mode.
        let target = scratch.join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = scratch.join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(ensure_private_dir(&link, euid), Err(PrivateDirError::NotOurs { .. })));
        assert_eq!(mode(&target), 0o755);
        assert_eq!(std::fs::metadata(&target).unwrap().uid(), euid);
        let _ = std::fs::remove_dir_all(&scratch);
    }

    #[test]
    fn only_non_root_without_xdg_runtime_dir_falls_back_to_tmp() {
        let user = Env { runtime_directory: None, xdg_runtime_dir: None, euid: 1000 };
        let dir = fallback_dir(&user).unwrap();
        assert!(dir.ends_with("herdsman-1000"));
        assert_eq!(default_socket("web", &user), dir.join("web").join(SOCKET_FILE));
        assert!(fallback_dir(&Env { euid: 0, ..user.clone() }).is_none());
        assert!(fallback_dir(&Env { xdg_runtime_dir: Some("/run/user/1000".into()), ..user }).is_none());
    }

    #[test]
    fn a_path_target_is_used_as_is() {
        assert_eq!(resolve(Some("/tmp/x.sock"), &Env::default()).unwrap(), PathBuf::from("/tmp/x.sock"));
        let err = resolve(Some("surely-not-running-xyz"), &Env::default()).unwrap_err();
        assert!(err.contains("is not running"), "{err}");
    }
}
