//! Capabilities: the sandbox's root keeps Docker's default set, less `CAP_MKNOD`, and nothing more.
//!
//! [`drop_to_default_set`] runs last before the exec, after the seccomp filter is in (installing one without
//! `no_new_privs` needs CAP_SYS_ADMIN). It clears the ambient set, drops every capability outside [`DEFAULT_CAPS`]
//! from the bounding set (which caps what any later exec, setuid binaries included, can gain), then sets the
//! effective, permitted and inheritable sets to exactly [`DEFAULT_CAPS`]. When the agent is executed as uid 0 it gets
//! the bounding set, that is [`DEFAULT_CAPS`], again.

use std::fs;
use std::io;

use super::{BootError, Step};

/// Docker's default capabilities without `CAP_MKNOD`: number, name. nook has no device cgroup on every host (cgroup
/// v2 needs a BPF device program), so no sandbox may create device nodes at all.
pub const DEFAULT_CAPS: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (10, "CAP_NET_BIND_SERVICE"),
    (13, "CAP_NET_RAW"),
    (18, "CAP_SYS_CHROOT"),
    (29, "CAP_AUDIT_WRITE"),
    (31, "CAP_SETFCAP"),
];

/// [`DEFAULT_CAPS`] as a bit mask.
pub fn default_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |mask, &(cap, _)| mask | 1 << cap)
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets passed as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`, one per 32-bit word.
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets `no_new_privs`: no exec can gain privileges from then on (setuid bits and file capabilities are ignored).
pub fn set_no_new_privs() -> Result<(), BootError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(ret).step(|| "setting no_new_privs")
}

/// Reduces every capability set of this process to [`DEFAULT_CAPS`].
pub fn drop_to_default_set() -> Result<(), BootError> {
    let keep = default_mask();

    // SAFETY: PR_CAP_AMBIENT takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check(ret).step(|| "clearing the ambient capabilities")?;

    let last = last_cap()?;
    for cap in (0..=last).filter(|cap| keep & 1 << cap == 0) {
        // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        check(ret).step(|| format!("dropping capability {cap} from the bounding set"))?;
    }

    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let words = [keep as u32, (keep >> 32) as u32];
    let data = words.map(|word| CapData {
        effective: word,
        permitted: word,
        inheritable: word,
    });
    // SAFETY: version 3 reads one header and two data structs, which live on the stack for the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) };
    check(ret as libc::c_int).step(|| "setting the capabilities to Docker's default set")
}

/// The highest capability number this kernel knows.
fn last_cap() -> Result<u32, BootError> {
    let path = "/proc/sys/kernel/cap_last_cap";
    let text = fs::read_to_string(path).step(|| format!("reading {path}"))?;
    text.trim()
        .parse()
        .map_err(|err| io::Error::other(format!("{text:?}: {err}")))
        .step(|| format!("parsing {path}"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers() {
        // CapEff of a root process in a default Docker container.
        assert_eq!(default_mask(), 0xa004_25fb);
    }

    #[test]
    fn sys_admin_is_not_kept() {
        const CAP_SYS_ADMIN: u32 = 21;
        assert_eq!(default_mask() & 1 << CAP_SYS_ADMIN, 0);
    }
}
