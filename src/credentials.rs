//! Who the workers run as: `--user`/`--group` (config `user`/`group`) resolved into numbers.
//!
//! The supervisor keeps its own credentials (it needs them for the sockets and, later, BPF and
//! cgroups); only the forked child changes them, just before `execve`. Everything that needs
//! the user database (names, the primary group, the supplementary group list) is looked up
//! here, in the parent, before fork: NSS lookups allocate and lock, so the child only calls
//! `setgroups`, `setgid`, `setuid` on the numbers in [`Credentials`] (see `sys`).

use std::ffi::CString;

/// The identity a worker gets, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// The user's name, for `USER`/`LOGNAME`.
    pub user: String,
    pub uid: u32,
    /// The primary group: the user's own, or `--group`.
    pub gid: u32,
    /// Supplementary groups (`getgrouplist`, including `gid`).
    pub groups: Vec<u32>,
    /// The user's home directory, for `HOME`.
    pub home: String,
}

/// Why `--user`/`--group` cannot be used. Each message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredError {
    #[error("no such user {0:?}; create it (useradd --system {0}) or name an existing user or uid")]
    UnknownUser(String),
    #[error("no such group {0:?}; create it (groupadd --system {0}) or name an existing group or gid")]
    UnknownGroup(String),
    #[error(
        "cannot run workers as {0:?}: only root can switch users and herdsman runs as uid {1}; run herdsman as root or drop the setting"
    )]
    NotRoot(String, u32),
    #[error("cannot look up {what}: {err}")]
    Lookup { what: String, err: String },
}

impl CredError {
    /// Whether the problem is with the group setting (else the user setting).
    pub fn is_group(&self) -> bool {
        matches!(self, CredError::UnknownGroup(_))
    }
}

/// A user name or a numeric uid.
fn find_user(spec: &str) -> Result<nix::unistd::User, CredError> {
    let lookup = |r: nix::Result<Option<nix::unistd::User>>| {
        r.map_err(|e| CredError::Lookup { what: format!("user {spec:?}"), err: e.to_string() })
    };
    let by_name = if spec.contains('\0') { None } else { lookup(nix::unistd::User::from_name(spec))? };
    if let Some(u) = by_name {
        return Ok(u);
    }
    if let Ok(uid) = spec.trim().parse::<u32>() {
        if let Some(u) = lookup(nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)))? {
            return Ok(u);
        }
    }
    Err(CredError::UnknownUser(spec.to_string()))
}

/// A group name or a numeric gid.
fn find_group(spec: &str) -> Result<u32, CredError> {
    let lookup = |r: nix::Result<Option<nix::unistd::Group>>| {
        r.map_err(|e| CredError::Lookup { what: format!("group {spec:?}"), err: e.to_string() })
    };
    let by_name = if spec.contains('\0') { None } else { lookup(nix::unistd::Group::from_name(spec))? };
    if let Some(g) = by_name {
        return Ok(g.gid.as_raw());
    }
    if let Ok(gid) = spec.trim().parse::<u32>() {
        if let Some(g) = lookup(nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)))? {
            return Ok(g.gid.as_raw());
        }
    }
    Err(CredError::UnknownGroup(spec.to_string()))
}

/// Resolves `user`/`group` for a supervisor whose effective uid is `euid` and effective gid
/// `egid`. `Ok(None)`: nothing to change (no setting, or a non-root supervisor naming itself).
/// `group` without `user` overrides the primary group of the supervisor's own user.
pub fn resolve(
    user: Option<&str>,
    group: Option<&str>,
    euid: u32,
    egid: u32,
) -> Result<Option<Credentials>, CredError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let pw = match user {
        Some(u) => find_user(u)?,
        None => find_user(&euid.to_string())?,
    };
    let gid = match group {
        Some(g) => find_group(g)?,
        None => pw.gid.as_raw(),
    };
    let uid = pw.uid.as_raw();
    if euid != 0 {
        if uid == euid && gid == egid {
            return Ok(None);
        }
        let what = match (user, group) {
            (Some(u), _) if uid != euid => u.to_string(),
            (_, Some(g)) => format!("{}:{g}", pw.name),
            _ => pw.name.clone(),
        };
        return Err(CredError::NotRoot(what, euid));
    }
    let name = CString::new(pw.name.clone())
        .map_err(|_| CredError::Lookup { what: format!("user {:?}", pw.name), err: "NUL in name".into() })?;
    let groups = nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map_err(|e| CredError::Lookup { what: format!("the groups of {:?}", pw.name), err: e.to_string() })?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(Some(Credentials { user: pw.name, uid, gid, groups, home: pw.dir.display().to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_set_changes_nothing() {
        assert_eq!(resolve(None, None, 0, 0), Ok(None));
    }

    #[test]
    fn root_resolves_names_and_uids_with_primary_and_supplementary_groups() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("nobody exists");
        let c = resolve(Some("nobody"), None, 0, 0).unwrap().unwrap();
        assert_eq!((c.uid, c.gid), (nobody.uid.as_raw(), nobody.gid.as_raw()));
        assert_eq!(c.user, "nobody");
        assert!(c.groups.contains(&c.gid), "{c:?}");
        let by_uid = resolve(Some(&nobody.uid.to_string()), None, 0, 0).unwrap().unwrap();
        assert_eq!(by_uid, c);
        let root_group = resolve(Some("nobody"), Some("0"), 0, 0).unwrap().unwrap();
        assert_eq!(root_group.gid, 0);
        assert!(root_group.groups.contains(&0));
    }

    #[test]
    fn unknown_user_and_group_are_named() {
        let e = resolve(Some("no-such-user-xyz"), None, 0, 0).unwrap_err();
        assert_eq!(e, CredError::UnknownUser("no-such-user-xyz".into()));
        assert!(!e.is_group());
        let e = resolve(Some("nobody"), Some("no-such-group-xyz"), 0, 0).unwrap_err();
        assert!(e.is_group(), "{e}");
        assert!(matches!(resolve(Some("4294967"), None, 0, 0), Err(CredError::UnknownUser(_))));
    }

    #[test]
    fn a_non_root_supervisor_can_only_name_itself() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("nobody exists");
        let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
        assert_eq!(resolve(Some("nobody"), None, uid, gid), Ok(None));
        assert!(
            matches!(resolve(Some("root"), None, uid, gid), Err(CredError::NotRoot(u, _)) if u == "root")
        );
        assert!(matches!(resolve(None, Some("0"), uid, gid), Err(CredError::NotRoot(..))));
    }
}
