//! The workers' metrics socket files: where they are made (herdsman's runtime directory, or
//! `metrics-uUID/` for workers of another user), how they are removed, and how a scrape opens
//! and connects to one without trusting or following anything a worker could have put there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// See [`Metrics::remove_files`].
pub(super) fn remove_files(dir: Option<&Path>, sockets: &mut HashMap<i32, (usize, PathBuf)>) {
    for (_, (_, path)) in sockets.drain() {
        let _ = std::fs::remove_file(path);
    }
    if let Some(d) = dir {
        remove_stale(d, true);
    }
}

/// Creates `d` (herdsman's, group `gid`, 0770) for workers of another user.
pub(super) fn user_dir(d: &Path, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o770).create(d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(d)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    if m.uid() != nix::unistd::geteuid().as_raw() {
        return Err(std::io::Error::other(format!("owned by uid {}, not herdsman", m.uid())));
    }
    if m.gid() != gid {
        std::os::unix::fs::lchown(d, None, Some(gid))?;
    }
    if m.permissions().mode() & 0o7777 != 0o770 {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o770))?;
    }
    Ok(())
}

/// Removes worker sockets left by supervisors that are gone (ours too, if our pid was
/// reused) from herdsman's runtime directory `dir`, and everything but live supervisors'
/// sockets from each `metrics-uUID/` in it. Nothing is followed: a worker may put anything in
/// its `metrics-uUID/`, and a symbolic link there (to `.`, to a root-only directory) must
/// neither be walked into nor have what it points to removed. Only `dir` and one level of
/// real directories named `metrics-u<digits>` that herdsman owns are read; entries are told
/// apart by `DirEntry::file_type` (never follows) and removing one removes only the name.
/// `exiting`: herdsman is about to exit, so the `metrics-uUID/` directories go too (when
/// nothing of another supervisor sharing `dir` is left in them).
pub(super) fn remove_stale(dir: &Path, exiting: bool) {
    use std::os::unix::fs::MetadataExt;
    let euid = nix::unistd::geteuid().as_raw();
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let (Ok(ty), Some(name)) = (e.file_type(), e.file_name().to_str().map(str::to_owned)) else {
            continue;
        };
        if ty.is_dir() {
            // (`DirEntry::metadata` does not follow links either.)
            if user_dir_uid(&name).is_some() && e.metadata().is_ok_and(|m| m.uid() == euid) {
                remove_stale_in(&e.path());
                if exiting {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            continue;
        }
        use std::os::unix::fs::FileTypeExt;
        // (Only worker sockets: the control socket and the notify sockets live here too.)
        if ty.is_socket() && name.ends_with(".sock") && stale(&name) == Some(true) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// In a `metrics-uUID/`: removes every entry but directories and live supervisors' sockets.
fn remove_stale_in(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(ty) = e.file_type() else { continue };
        let name = e.file_name();
        let live =
            ty.is_socket() && name.to_str().is_some_and(|n| n.ends_with(".sock") && stale(n) == Some(false));
        if !ty.is_dir() && !live {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether the worker socket name `metrics-PID-...` is not (any more) a live supervisor's:
/// its supervisor is gone, or it is ours from an earlier life of our pid (or herdsman is
/// exiting). `None`: not a worker socket's name.
fn stale(name: &str) -> Option<bool> {
    let pid: i32 = name.strip_prefix("metrics-")?.split('-').next()?.parse().ok()?;
    Some(
        pid <= 0
            || pid == std::process::id() as i32
            || matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            ),
    )
}

/// The uid a worker's socket must belong to: [`Metrics::socket_for`] puts the sockets of a
/// worker running as another user in `metrics-uUID/`, the others next to it (herdsman's).
pub(super) fn socket_owner(path: &Path, euid: u32) -> u32 {
    let dir = path.parent().and_then(Path::file_name).and_then(|n| n.to_str());
    dir.and_then(user_dir_uid).unwrap_or(euid)
}

/// `metrics-uUID` → UID.
fn user_dir_uid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("metrics-u")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Opens a worker's metrics socket file (`O_PATH`) without following anything a worker could
/// have put in its way: herdsman's runtime directory is opened as configured, then
/// `metrics-uUID/` (writable by the worker's group) and the socket name without following a
/// symbolic link (each relative to the directory opened before it: through
/// `/proc/self/fd/N/`, what `openat` does). The directory must be herdsman's, the socket a
/// socket owned by the worker's uid: a link or hard link to another socket (a root-only
/// one, say) is refused, never connected to as root.
pub(super) fn open_socket(path: &Path, euid: u32) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let bad = |what: &str| std::io::Error::other(format!("{}: {what}", path.display()));
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(bad("not a socket path"));
    };
    let open = |p: &Path, flags: i32| {
        std::fs::OpenOptions::new().read(true).custom_flags(flags | libc::O_NOFOLLOW).open(p)
    };
    let within = |d: &std::fs::File, name: &std::ffi::OsStr| {
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", d.as_raw_fd()));
        p.push(name);
        p
    };
    let owner = socket_owner(path, euid);
    let dir = match (dir.parent(), dir.file_name()) {
        (Some(base), Some(sub)) if owner != euid => {
            let base = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(base)?;
            let d = open(&within(&base, sub), libc::O_DIRECTORY)
                .map_err(|e| bad(&format!("its directory is not a directory ({e})")))?;
            let m = d.metadata()?;
            if m.uid() != euid || m.mode() & 0o002 != 0 {
                return Err(bad("its directory is not herdsman's"));
            }
            d
        }
        _ => std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir)?,
    };
    let sock = open(&within(&dir, name), libc::O_PATH).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => bad("a symbolic link, not the worker's socket"),
        _ => e,
    })?;
    let m = sock.metadata()?;
    if !m.file_type().is_socket() {
        return Err(bad("not a socket"));
    }
    if m.uid() != owner {
        return Err(bad(&format!("owned by uid {}, not the worker's {owner}", m.uid())));
    }
    Ok(sock)
}

/// Connects to a worker's metrics socket, opened by [`open_socket`], through
/// `/proc/self/fd/N` (the very file checked). A worker of another user may have made its
/// socket 0750 (a UMask): herdsman keeps CAP_CHOWN for this, takes that file for the
/// connect (`fchownat` on the descriptor) and gives it back.
pub(super) async fn connect(path: &Path, euid: u32) -> std::io::Result<tokio::net::UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let sock = open_socket(path, euid)?;
    let at = format!("/proc/self/fd/{}", sock.as_raw_fd());
    match tokio::net::UnixStream::connect(&at).await {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            let owner = sock.metadata()?.uid();
            let chown = |uid: u32| {
                nix::unistd::fchownat(
                    Some(sock.as_raw_fd()),
                    "",
                    Some(nix::unistd::Uid::from_raw(uid)),
                    None,
                    nix::fcntl::AtFlags::AT_EMPTY_PATH,
                )
                .map_err(std::io::Error::from)
            };
            chown(euid)?;
            let s = tokio::net::UnixStream::connect(&at).await;
            chown(owner)?;
            s
        }
        r => r,
    }
}
