//! The steering system calls (see `steer`): attaching a classic or an eBPF program to a
//! `SO_REUSEPORT` group, `bpf(2)` for the eBPF router's maps and program, and a listener's
//! accept queue (`TCP_INFO`), which the router's fallback and the status read.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; not exported by libc for glibc targets).
const SO_ATTACH_REUSEPORT_CBPF: c_int = 51;

/// One classic BPF instruction (`struct sock_filter`).
pub type BpfInsn = libc::sock_filter;

/// Attaches a classic BPF program to `fd`'s `SO_REUSEPORT` group: from now on it picks the
/// group member (by index) for each new connection. Replaces the group's previous program
/// atomically. The kernel copies and checks the program; an invalid one is refused (EINVAL).
pub fn attach_reuseport_cbpf(fd: &OwnedFd, prog: &[BpfInsn]) -> io::Result<()> {
    let len = u16::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr().cast_mut() };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel only reads `len`
    // instructions from it and copies them.
    unsafe { set_socket_option(fd, SO_ATTACH_REUSEPORT_CBPF, &fprog) }
}

/// `setsockopt(fd, SOL_SOCKET, option, value, size_of::<T>())`.
///
/// # Safety
/// `T` must be the type the kernel expects for `option`, and any pointer inside `value` valid
/// for the kernel to read for the duration of the call.
unsafe fn set_socket_option<T>(fd: &OwnedFd, option: c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of exactly the length passed; the caller vouches for the
    // type and for what it points at.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `SO_ATTACH_REUSEPORT_EBPF` (asm-generic/socket.h).
const SO_ATTACH_REUSEPORT_EBPF: c_int = 52;
/// `bpf(2)` commands (linux/bpf.h).
const BPF_MAP_CREATE: c_int = 0;
const BPF_MAP_UPDATE_ELEM: c_int = 2;
const BPF_PROG_LOAD: c_int = 5;
/// `BPF_PROG_TYPE_SK_REUSEPORT` and its attach type `BPF_SK_REUSEPORT_SELECT`.
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_SK_REUSEPORT_SELECT: u32 = 39;

/// One eBPF instruction (`struct bpf_insn`): `regs` is dst in the low nibble, src in the high.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EbpfInsn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// The `BPF_MAP_CREATE` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// The `BPF_MAP_*_ELEM` part of `union bpf_attr`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf(cmd, attr, size)`; a new descriptor for the commands that return one.
///
/// # Safety
/// `attr` must be the `union bpf_attr` layout `cmd` expects, and every pointer in it valid
/// for the kernel to read (or write, for a log buffer) for the duration of the call.
unsafe fn bpf<T>(cmd: c_int, attr: &mut T) -> io::Result<c_int> {
    // SAFETY: the caller guarantees `attr`'s layout and pointers; the size is the struct's
    // own, and the kernel requires nothing beyond it to be present (it zero-extends).
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), std::mem::size_of::<T>())
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as c_int) }
}

/// [`bpf`] for a command that returns a new descriptor (`BPF_MAP_CREATE`, `BPF_PROG_LOAD`):
/// owned, close-on-exec (the kernel sets it on every bpf descriptor).
///
/// # Safety
/// As for [`bpf`]; `cmd` must be one that returns a new descriptor.
unsafe fn bpf_new_fd<T>(cmd: c_int, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: the caller's promise for `attr`; on success the kernel just returned this new
    // descriptor, which nobody else owns.
    unsafe { bpf(cmd, attr).map(|fd| OwnedFd::from_raw_fd(fd)) }
}

/// A BPF map with 4-byte keys, and the value size it was created with.
#[derive(Debug)]
pub struct BpfMap {
    fd: OwnedFd,
    value_size: usize,
}

impl BpfMap {
    /// Creates a map (`BPF_MAP_CREATE`); its descriptor is close-on-exec.
    pub fn create(map_type: u32, value_size: u32, max_entries: u32) -> io::Result<BpfMap> {
        let mut attr = MapCreateAttr { map_type, key_size: 4, value_size, max_entries, map_flags: 0 };
        // SAFETY: a plain `BPF_MAP_CREATE` attribute without pointers.
        let fd = unsafe { bpf_new_fd(BPF_MAP_CREATE, &mut attr)? };
        Ok(BpfMap { fd, value_size: value_size as usize })
    }

    /// Sets element `key` (`BPF_MAP_UPDATE_ELEM`, `BPF_ANY`); `value` must be the map's size.
    pub fn update(&self, key: u32, value: &[u8]) -> io::Result<()> {
        if value.len() != self.value_size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut attr = ElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            _pad: 0,
            key: (&key as *const u32) as u64,
            value: value.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `key` (4 bytes, the map's key size) and `value` (checked above to be the
        // map's value size) outlive the call; the kernel only reads them.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    /// The descriptor, for a program's map reference.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A map handed over by a previous image (its descriptor and value size).
    pub fn adopt(fd: OwnedFd, value_size: usize) -> BpfMap {
        BpfMap { fd, value_size }
    }

    /// The descriptor, to hand it over.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// Loads a `BPF_PROG_TYPE_SK_REUSEPORT` program. On refusal the error carries the first line
/// of the verifier's log that says why.
pub fn bpf_load_reuseport_prog(prog: &[EbpfInsn], license: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        insn_cnt: u32::try_from(prog.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"herdsman_steer\0\0",
        prog_ifindex: 0,
        expected_attach_type: BPF_SK_REUSEPORT_SELECT,
    };
    // SAFETY: `prog`, `license` outlive the call; no log buffer on the first try.
    match unsafe { bpf_new_fd(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => Ok(fd),
        Err(e) if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::EACCES) => Err(e),
        Err(first) => {
            // Again with the verifier's log, only to say why.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            // SAFETY: as above; `log` is writable for `log_size` bytes and outlives the call.
            if let Ok(fd) = unsafe { bpf_new_fd(BPF_PROG_LOAD, &mut attr) } {
                return Ok(fd);
            }
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
            let why = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.starts_with("processed"))
                .unwrap_or("");
            Err(io::Error::new(first.kind(), format!("{first}: {why}")))
        }
    }
}

/// Attaches an eBPF `SK_REUSEPORT` program to `fd`'s `SO_REUSEPORT` group, replacing the
/// group's previous program (classic or eBPF) atomically.
pub fn attach_reuseport_ebpf(fd: &OwnedFd, prog: &OwnedFd) -> io::Result<()> {
    let pfd: c_int = prog.as_raw_fd();
    // SAFETY: the option's value is one int, the program's descriptor.
    unsafe { set_socket_option(fd, SO_ATTACH_REUSEPORT_EBPF, &pfd) }
}

/// A listening TCP socket's accept queue: (connections waiting to be accepted, backlog), from
/// `TCP_INFO` (`tcpi_unacked` / `tcpi_sacked` mean exactly that for a listener).
pub fn tcp_listen_queue(fd: &OwnedFd) -> io::Result<(u32, u32)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes; the kernel writes at most `len`
    // bytes and updates `len`; zeroed memory is a valid `tcp_info` whatever it writes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised above and (partly) filled by the kernel: every bit pattern is a
    // valid `tcp_info` (plain integers).
    let info = unsafe { info.assume_init() };
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}
