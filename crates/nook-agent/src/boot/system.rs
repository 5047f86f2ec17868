//! The init's own state, set after the root filesystem is assembled: hostname, loopback, OOM score, file
//! descriptors and signals, then the exec of the agent.
//!
//! [`check_listen_fd`] runs in stage 1, before anything is created, so that a runner bug is reported before a
//! sandbox exists. The rest runs in the init, in the order `super::build_and_exec` calls it; [`prepare_fds`] leaves
//! exactly fds 0–2 (/dev/null of the new root) and [`LISTEN_FD`] open across the exec, everything else, the status
//! pipe included, is close-on-exec.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::socket::{getsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
use nix::sys::stat::{fstat, SFlag};
use nix::unistd::{dup2, execve, sethostname};
use nook_agent_proto::boot::{AGENT_PATH_IN_SANDBOX, LISTEN_FD};

use super::{BootError, Step};

/// The agent's whole environment.
const AGENT_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Checks that [`LISTEN_FD`] is a listening stream socket.
pub fn check_listen_fd() -> Result<(), BootError> {
    let step = || format!("checking the listening socket on fd {LISTEN_FD}");
    let stat = fstat(LISTEN_FD).step(step)?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(BootError::new(step(), io::Error::other("it is not a socket")));
    }
    // SAFETY: fstat just showed that fd 3 is open; nothing closes it while this borrow lives.
    let fd = unsafe { BorrowedFd::borrow_raw(LISTEN_FD) };
    if !getsockopt(&fd, sockopt::AcceptConn).step(step)? {
        return Err(BootError::new(step(), io::Error::other("the socket is not listening")));
    }
    Ok(())
}

pub fn set_hostname(hostname: &str) -> Result<(), BootError> {
    sethostname(hostname).step(|| format!("setting the hostname to {hostname:?}"))
}

/// Sets `IFF_UP` on `lo`, the only interface of the new network namespace.
pub fn bring_up_loopback() -> Result<(), BootError> {
    let step = || "bringing up the loopback interface";
    let sock = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).step(step)?;
    // SAFETY: ifreq is plain old data (a name and a union of integers and addresses); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name from `req` and writes the flags into it; `req` outlives
    // the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq) };
    if ret < 0 {
        return Err(BootError::new(step(), io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, which outlives the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req as *const libc::ifreq) };
    if ret < 0 {
        return Err(BootError::new(step(), io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes the init the OOM killer's last choice; the agent sets its children back to 0.
///
/// Lowering the score needs CAP_SYS_RESOURCE. A runner without it (some hosted machines withhold it even from
/// root) still gets a working sandbox: the init keeps the score it inherited, and the runner's log says so.
pub fn protect_from_oom_killer() -> Result<(), BootError> {
    let step = || "setting the init's oom_score_adj to -1000";
    match fs::write("/proc/self/oom_score_adj", "-1000") {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EACCES) => {
            // Standard error is still the runner's here; prepare_fds replaces it later.
            let err = BootError::new(step(), err);
            eprintln!(
                "nook-agent boot: {} (no CAP_SYS_RESOURCE?); keeping the inherited score",
                err.message()
            );
            Ok(())
        }
        Err(err) => Err(BootError::new(step(), err)),
    }
}

/// Points 0–2 at /dev/null, keeps [`LISTEN_FD`] open across exec and marks every other descriptor close-on-exec.
pub fn prepare_fds() -> Result<(), BootError> {
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .step(|| "opening /dev/null")?;
    for fd in 0..=2 {
        // dup2 leaves the new descriptor without close-on-exec.
        dup2(null.as_raw_fd(), fd).step(|| format!("pointing fd {fd} at /dev/null"))?;
    }
    drop(null);
    fcntl(LISTEN_FD, FcntlArg::F_SETFD(FdFlag::empty()))
        .step(|| format!("keeping the listening socket on fd {LISTEN_FD} open across exec"))?;

    let step = || "marking inherited descriptors close-on-exec";
    let mut others = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").step(step)? {
        let entry = entry.step(step)?;
        if let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) {
            if fd > LISTEN_FD {
                others.push(fd);
            }
        }
    }
    for fd in others {
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            // The directory's own descriptor is gone by now.
            Ok(_) | Err(nix::errno::Errno::EBADF) => {}
            Err(err) => return Err(BootError::new(format!("marking fd {fd} close-on-exec"), err.into())),
        }
    }
    Ok(())
}

/// Unblocks every signal and sets every disposition back to the default; ignored signals (Rust ignores SIGPIPE)
/// would otherwise stay ignored in the agent.
pub fn reset_signals() -> Result<(), BootError> {
    for signal in 1..=64 {
        // SAFETY: SIG_DFL installs no handler. SIGKILL, SIGSTOP and the signals libc reserves make this fail with
        // EINVAL, which is fine: they cannot be ignored either.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).step(|| "unblocking all signals")
}

/// Executes `nook-agent serve`; returns only the reason it could not.
pub fn exec_agent() -> BootError {
    let step = || format!("executing the agent at {AGENT_PATH_IN_SANDBOX}");
    let path = match CString::new(AGENT_PATH_IN_SANDBOX) {
        Ok(path) => path,
        Err(err) => return BootError::new(step(), io::Error::other(err)),
    };
    let args = [c"nook-agent", c"serve"];
    let env = match CString::new(AGENT_ENV) {
        Ok(env) => env,
        Err(err) => return BootError::new(step(), io::Error::other(err)),
    };
    match execve(&path, &args, &[env]) {
        Ok(never) => match never {},
        Err(err) => BootError::new(step(), err.into()),
    }
}
