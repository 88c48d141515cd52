use super::answer::*;
use super::inspect::*;
use super::*;
use std::os::fd::AsRawFd;

#[test]
fn sockaddrs_are_read_as_the_kernel_lays_them_out() {
    let mut v4 = [0u8; 16];
    v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    v4[2..4].copy_from_slice(&8000u16.to_be_bytes());
    v4[4..8].copy_from_slice(&[127, 0, 0, 1]);
    assert_eq!(parse_sockaddr(&v4), Some("127.0.0.1:8000".parse().unwrap()));
    let mut v6 = [0u8; 28];
    v6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    v6[2..4].copy_from_slice(&8000u16.to_be_bytes());
    assert_eq!(parse_sockaddr(&v6), Some("[::]:8000".parse().unwrap()));
    let mut unix = [0u8; 16];
    unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    assert_eq!(parse_sockaddr(&unix), None);
    assert_eq!(parse_sockaddr(&v4[..4]), None);
}

#[test]
fn a_bind_gets_the_exact_address_else_the_only_socket_on_its_port() {
    let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (p1, p2) = (l1.local_addr().unwrap().port(), l2.local_addr().unwrap().port());
    let s = Sockets::of(&[l1.as_raw_fd(), l2.as_raw_fd()], None);
    let at = |a: &str| s.find(a.parse().unwrap()).map(|t| t.addr.port());
    assert_eq!(at(&format!("127.0.0.1:{p1}")), Some(p1));
    assert_eq!(at(&format!("0.0.0.0:{p2}")), Some(p2), "any host, by port");
    assert_eq!(at(&format!("[::]:{p2}")), Some(p2), "any family, by port");
    assert_eq!(at("127.0.0.1:0"), None, "port 0 is never substituted");
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    assert_eq!(at(&other.local_addr().unwrap().to_string()), None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(Sockets::of(&[udp.as_raw_fd()], None).is_empty(), "only TCP sockets are offered");
}

/// An ELF header: `class` 1 (32-bit) or 2 (64-bit), little-endian, machine `machine`.
fn elf(dir: &std::path::Path, name: &str, class: u8, machine: u16) -> std::path::PathBuf {
    let mut h = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
    h.resize(64, 0);
    h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    let p = dir.join(name);
    std::fs::write(&p, h).unwrap();
    p
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("herdsman-intercept-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_32_bit_worker_program_is_recognised_by_its_elf_header() {
    let d = scratch("elf");
    assert_eq!(compat_kind(&elf(&d, "i386", 1, 3)), Some("32-bit (i386)"));
    assert_eq!(compat_kind(&elf(&d, "x32", 1, 62)), Some("x32"));
    assert_eq!(compat_kind(&elf(&d, "amd64", 2, 62)), None);
    // A script is judged by its interpreter.
    let i386 = elf(&d, "i386-interp", 1, 3);
    std::fs::write(d.join("script"), format!("#!{} -x\n", i386.display())).unwrap();
    assert_eq!(compat_kind(&d.join("script")), Some("32-bit (i386)"));
    std::fs::write(d.join("env-script"), "#!/usr/bin/env node\n").unwrap();
    assert_eq!(compat_kind(&d.join("env-script")), None);
    assert_eq!(compat_kind(&d.join("missing")), None);
    // This test binary itself is a 64-bit build.
    assert_eq!(compat_kind(&std::env::current_exe().unwrap()), None);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_32_bit_worker_fails_on_and_turns_auto_off() {
    let d = scratch("compat");
    let i386 = elf(&d, "i386", 1, 3);
    let ok = || Ok(());
    let e = resolve_with(BindIntercept::On, Some(&i386), ok).unwrap_err();
    assert!(matches!(e, Unavailable::Compat { kind: "32-bit (i386)", .. }), "{e}");
    let line = e.to_string();
    assert!(!line.contains('\n') && line.contains("--bind-intercept=off"), "{line}");
    assert!(!resolve_with(BindIntercept::Auto, Some(&i386), ok).unwrap());
    assert!(!resolve_with(BindIntercept::Off, Some(&i386), ok).unwrap());
    std::fs::remove_dir_all(&d).unwrap();
}

/// A kernel before 5.9 answers `SECCOMP_IOCTL_NOTIF_ADDFD` with `EINVAL` (an unknown
/// ioctl of the notification fd), one before 5.0 refuses the listener flag the same way.
#[test]
fn a_kernel_without_addfd_fails_on_and_turns_auto_off() {
    let old_kernel = || {
        Err(sys::FilterRefused {
            step: "SECCOMP_IOCTL_NOTIF_ADDFD",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })
    };
    if cfg!(target_arch = "x86_64") {
        let e = resolve_with(BindIntercept::On, None, old_kernel).unwrap_err();
        assert!(matches!(e, Unavailable::Kernel { step: "SECCOMP_IOCTL_NOTIF_ADDFD", .. }), "{e}");
        let line = e.to_string();
        assert!(
            !line.contains('\n') && line.contains("5.9") && line.contains("--bind-intercept=off"),
            "{line}"
        );
        assert!(!resolve_with(BindIntercept::Auto, None, old_kernel).unwrap());
        // A sandbox's refusal is told apart from an old kernel.
        let refused = || {
            Err(sys::FilterRefused { step: "seccomp()", err: std::io::Error::from_raw_os_error(libc::EPERM) })
        };
        assert!(matches!(resolve_with(BindIntercept::On, None, refused), Err(Unavailable::Refused { .. })));
        assert!(resolve_with(BindIntercept::On, None, || Ok(())).unwrap());
    }
}

#[test]
fn the_filter_is_accepted_by_this_kernel() {
    // The development and CI kernels are x86_64 and newer than 5.9.
    if cfg!(target_arch = "x86_64") {
        sys::probe_bind_filter(&filter()).unwrap();
    }
}
