//! The sandbox's root filesystem, assembled inside its private mount namespace.
//!
//! The order matters and `super::build_and_exec` follows it: [`make_private`] so that nothing propagates back to
//! the host; [`DetachedMount::clone_file`] for the two host files the sandbox sees (the agent binary and the
//! generated hosts file), taken while host paths are still reachable; [`mount_overlay`] stacks the image layers and
//! the writable layer at `rootfs_dir`; [`pivot_into`] makes that the root and detaches the host's. Everything after
//! the pivot resolves paths inside the image, so a symbolic link in an image can only ever lead to another place in
//! the same image: [`mount_kernel_filesystems`] (proc, read-only sysfs, a small tmpfs /dev with devpts, shm and
//! mqueue), [`populate_dev`] (device nodes and links), [`attach_agent`] and [`attach_hosts`] (the detached clones),
//! and [`mask_kernel_paths`], Docker's masked and read-only paths under /proc and /sys.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root, sysconf, SysconfVar};
use nook_agent_proto::boot::{BootSpec, AGENT_PATH_IN_SANDBOX};

use super::{BootError, Step};

/// Makes every mount in the new namespace private, so that no mount or unmount from here reaches the host.
pub fn make_private() -> Result<(), BootError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(|| "making all mounts private")
}

/// A bind mount of a host file, cloned with `open_tree` into a mount that is attached nowhere yet. It stays usable
/// after the pivot has made the host's paths unreachable.
pub struct DetachedMount {
    fd: OwnedFd,
    source: PathBuf,
}

/// `open_tree(2)` flag: clone the mount instead of opening it.
const OPEN_TREE_CLONE: libc::c_uint = 1;
/// `move_mount(2)` flag: the source is the file descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

impl DetachedMount {
    /// Clones a bind mount of the regular file at `source`; `what` names it in messages.
    pub fn clone_file(source: &Path, what: &str) -> Result<Self, BootError> {
        let step = || format!("taking a bind mount of {what} {}", source.display());
        let meta = fs::metadata(source).step(step)?;
        if !meta.is_file() {
            return Err(BootError::new(step(), io::Error::other("it is not a regular file")));
        }
        let path = path_cstring(source).step(step)?;
        let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
        // SAFETY: `path` is a NUL-terminated string that outlives the call; open_tree only reads it.
        let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
        if fd < 0 {
            return Err(BootError::new(step(), io::Error::last_os_error()));
        }
        // SAFETY: open_tree returned a new descriptor that nothing else owns; descriptor numbers fit in an i32.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self {
            fd,
            source: source.to_owned(),
        })
    }

    /// Attaches the clone at `target`, an existing file.
    fn attach(self, target: &Path) -> Result<(), BootError> {
        let step = || format!("bind-mounting {} at {}", self.source.display(), target.display());
        let to = path_cstring(target).step(step)?;
        // SAFETY: both strings are NUL-terminated and outlive the call; the descriptor is open and owned by self.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if ret < 0 {
            return Err(BootError::new(step(), io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Mounts the overlay of the image layers and the writable layer at `rootfs_dir`.
pub fn mount_overlay(spec: &BootSpec) -> Result<(), BootError> {
    let step = || format!("mounting the overlayfs root at {}", spec.rootfs_dir.display());
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |size| size as usize);
    let options = overlay_options(&spec.lower_dirs, &spec.upper_dir, &spec.work_dir, page)
        .map_err(|err| BootError::new(step(), err))?;
    if let Some(dir) = &options.relative_to {
        chdir(dir.as_path()).step(|| format!("changing into {} to shorten the overlayfs options", dir.display()))?;
    }
    mount(
        Some("overlay"),
        &spec.rootfs_dir,
        Some("overlay"),
        // Device nodes in image layers or the writable layer never open a host device.
        MsFlags::MS_NODEV,
        Some(options.data.as_str()),
    )
    .step(step)
}

/// overlayfs mount options, and the directory to mount from when the paths in them are relative.
#[derive(Debug, PartialEq)]
struct OverlayOptions {
    data: String,
    relative_to: Option<PathBuf>,
}

/// Builds `lowerdir=a:b,upperdir=u,workdir=w,redirect_dir=off,metacopy=off`: whatever the kernel's defaults, the
/// upper layer holds whole files and directories (a renamed directory is copied, never a redirect), so a sandbox's
/// writable layer can become an image layer on its own (snapshots, builds). The kernel reads at most one page of mount options (including the
/// final NUL); when absolute paths do not fit, the paths are made relative to their longest common parent, which the
/// caller changes into before mounting.
fn overlay_options(lower: &[PathBuf], upper: &Path, work: &Path, page: usize) -> io::Result<OverlayOptions> {
    if lower.is_empty() {
        return Err(io::Error::other("the spec names no image layer"));
    }
    let mut all: Vec<&Path> = lower.iter().map(PathBuf::as_path).collect();
    all.push(upper);
    all.push(work);
    for path in &all {
        let text = path
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", path.display())))?;
        if !path.is_absolute() {
            return Err(io::Error::other(format!("{text} is not an absolute path")));
        }
        if text.contains([',', ':', '\\', '\n']) {
            return Err(io::Error::other(format!(
                "{text} contains a character overlayfs options cannot carry"
            )));
        }
    }
    let render = |base: Option<&Path>| -> String {
        let show = |path: &Path| -> String {
            let path = base.map_or(path, |base| path.strip_prefix(base).unwrap_or(path));
            path.to_str().unwrap_or_default().to_owned()
        };
        let lowers: Vec<String> = lower.iter().map(|path| show(path)).collect();
        format!(
            "lowerdir={},upperdir={},workdir={},redirect_dir=off,metacopy=off",
            lowers.join(":"),
            show(upper),
            show(work)
        )
    };
    let fits = |data: &str| data.len() < page;

    let data = render(None);
    if fits(&data) {
        return Ok(OverlayOptions {
            data,
            relative_to: None,
        });
    }
    let base = common_parent(&all);
    let relative = render(Some(&base));
    if base != Path::new("/") && fits(&relative) {
        return Ok(OverlayOptions {
            data: relative,
            relative_to: Some(base),
        });
    }
    Err(io::Error::other(format!(
        "the options are {} bytes ({} with paths relative to {}), more than fit in a page of {page} bytes",
        data.len(),
        relative.len(),
        base.display()
    )))
}

/// The longest directory that contains every path (and is none of them, so no relative path is empty).
fn common_parent(paths: &[&Path]) -> PathBuf {
    let mut common: Option<PathBuf> = None;
    for path in paths {
        let parent = path.parent().unwrap_or(Path::new("/"));
        common = Some(match common {
            None => parent.to_owned(),
            Some(common) => common
                .components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a)
                .collect(),
        });
    }
    common.unwrap_or_else(|| PathBuf::from("/"))
}

/// Makes the mounted overlay the root (`pivot_root(".", ".")` stacks the old root on top of the new one, the lazy
/// unmount then removes it) and changes into the new root.
pub fn pivot_into(rootfs: &Path) -> Result<(), BootError> {
    chdir(rootfs).step(|| format!("changing into the root filesystem {}", rootfs.display()))?;
    pivot_root(".", ".").step(|| format!("pivoting the root to {}", rootfs.display()))?;
    umount2(".", MntFlags::MNT_DETACH).step(|| "detaching the host's root filesystem")?;
    chdir("/").step(|| "changing into the new root")
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// A kernel filesystem mounted inside the new root.
struct KernelMount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

/// proc, sysfs and /dev with its sub-mounts, parents before children.
const KERNEL_MOUNTS: &[KernelMount] = &[
    KernelMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    KernelMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC.union(MsFlags::MS_RDONLY),
        data: None,
    },
    // Device nodes live here, so no `nodev`; 64 KiB is plenty for nodes, links and a few small files.
    KernelMount {
        fstype: "tmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=755,size=64k"),
    },
    KernelMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    KernelMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777,size=64m"),
    },
    KernelMount {
        fstype: "mqueue",
        target: "/dev/mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Mounts [`KERNEL_MOUNTS`], creating missing mount points.
pub fn mount_kernel_filesystems() -> Result<(), BootError> {
    for m in KERNEL_MOUNTS {
        ensure_dir(Path::new(m.target))?;
        mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data)
            .step(|| format!("mounting {} at {}", m.fstype, m.target))?;
    }
    Ok(())
}

/// Character devices in /dev: name, major, minor.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Symbolic links in /dev: name, target.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Creates the device nodes and links in the fresh /dev tmpfs, and the mount point of the agent.
pub fn populate_dev() -> Result<(), BootError> {
    for &(name, major, minor) in DEVICES {
        let path = Path::new("/dev").join(name);
        let step = || format!("creating the device {}", path.display());
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .step(step)?;
        // The umask took bits away from the mode given to mknod.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).step(step)?;
    }
    for &(name, target) in DEV_LINKS {
        let path = Path::new("/dev").join(name);
        symlink(target, &path).step(|| format!("linking {} to {target}", path.display()))?;
    }
    let agent = Path::new(AGENT_PATH_IN_SANDBOX);
    if let Some(dir) = agent.parent() {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(dir)
            .step(|| format!("creating {}", dir.display()))?;
    }
    create_empty_file(agent)
}

/// Binds the agent binary read-only at [`AGENT_PATH_IN_SANDBOX`] (executable: no `noexec`).
pub fn attach_agent(agent: DetachedMount) -> Result<(), BootError> {
    let target = Path::new(AGENT_PATH_IN_SANDBOX);
    agent.attach(target)?;
    remount_bind(target, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
}

/// Binds a file the runner generated (`/etc/hosts`, `/etc/resolv.conf`) over the image's, creating that if the image
/// has none. The sandbox may edit it, as in Docker.
pub fn attach_etc_file(file: DetachedMount, target: &str) -> Result<(), BootError> {
    let target = Path::new(target);
    if !exists(target).step(|| format!("looking for {}", target.display()))? {
        ensure_dir(Path::new("/etc"))?;
        create_empty_file(target)?;
    }
    file.attach(target)?;
    remount_bind(target, NOSUID_NODEV_NOEXEC)
}

/// Files hidden behind /dev/null.
const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/sysrq-trigger",
];

/// Directories hidden behind an empty read-only tmpfs. Docker also hides powercap, whose energy counters are a side
/// channel (CVE-2020-8694).
const MASKED_DIRS: &[&str] = &[
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Trees bound onto themselves read-only.
const READ_ONLY: &[&str] = &["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"];

/// Applies [`MASKED_FILES`], [`MASKED_DIRS`] and [`READ_ONLY`], skipping paths this kernel does not have.
pub fn mask_kernel_paths() -> Result<(), BootError> {
    for &path in MASKED_FILES {
        if exists(Path::new(path)).step(|| format!("looking for {path}"))? {
            mount(Some("/dev/null"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .step(|| format!("masking {path} with /dev/null"))?;
        }
    }
    for &path in MASKED_DIRS {
        if exists(Path::new(path)).step(|| format!("looking for {path}"))? {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                NOSUID_NODEV_NOEXEC | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .step(|| format!("masking {path} with an empty tmpfs"))?;
        }
    }
    for &path in READ_ONLY {
        if exists(Path::new(path)).step(|| format!("looking for {path}"))? {
            mount(
                Some(path),
                path,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .step(|| format!("binding {path} onto itself"))?;
            remount_bind(Path::new(path), NOSUID_NODEV_NOEXEC | MsFlags::MS_RDONLY)?;
        }
    }
    Ok(())
}

/// Sets the flags of the bind mount at `target` to exactly `flags`.
fn remount_bind(target: &Path, flags: MsFlags) -> Result<(), BootError> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
        None::<&str>,
    )
    .step(|| format!("remounting {} with {flags:?}", target.display()))
}

/// Creates `path` (and its parents) as a directory unless it is one. Only used after the pivot.
fn ensure_dir(path: &Path) -> Result<(), BootError> {
    let step = || format!("creating the mount point {}", path.display());
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(BootError::new(
            step(),
            io::Error::other("it exists and is not a directory"),
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .step(step),
        Err(err) => Err(BootError::new(step(), err)),
    }
}

/// Creates an empty file to bind a file over.
fn create_empty_file(path: &Path) -> Result<(), BootError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .map(drop)
        .step(|| format!("creating the mount point {}", path.display()))
}

/// Whether `path` exists, without following a final symbolic link.
fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("the path contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn short_options_use_absolute_paths() {
        let options = overlay_options(
            &paths(&["/l/b", "/l/a"]),
            Path::new("/s/up"),
            Path::new("/s/work"),
            4096,
        )
        .unwrap();
        assert_eq!(
            options,
            OverlayOptions {
                data: "lowerdir=/l/b:/l/a,upperdir=/s/up,workdir=/s/work,redirect_dir=off,metacopy=off".into(),
                relative_to: None
            }
        );
    }

    #[test]
    fn long_options_become_relative_to_the_common_parent() {
        let base = format!("/var/lib/nook/{}", "x".repeat(40));
        let lowers: Vec<PathBuf> = (0..100)
            .map(|i| PathBuf::from(format!("{base}/layers/{i:064}")))
            .collect();
        let upper = PathBuf::from(format!("{base}/sandboxes/s1/upper"));
        let work = PathBuf::from(format!("{base}/sandboxes/s1/work"));
        let options = overlay_options(&lowers, &upper, &work, 100_000).unwrap();
        assert_eq!(options.relative_to, None);
        let options = overlay_options(&lowers, &upper, &work, 8192).unwrap();
        assert_eq!(options.relative_to, Some(PathBuf::from(&base)));
        assert!(options.data.starts_with(&format!("lowerdir=layers/{:064}:layers/", 0)));
        assert!(options
            .data
            .ends_with(",upperdir=sandboxes/s1/upper,workdir=sandboxes/s1/work,redirect_dir=off,metacopy=off"));
        assert!(options.data.len() < 8192);
    }

    #[test]
    fn options_that_never_fit_are_refused() {
        let lowers: Vec<PathBuf> = (0..100).map(|i| PathBuf::from(format!("/l/{i:064}"))).collect();
        let err = overlay_options(&lowers, Path::new("/s/up"), Path::new("/s/work"), 4096).unwrap_err();
        assert!(
            err.to_string().contains("more than fit in a page of 4096 bytes"),
            "{err}"
        );
    }

    #[test]
    fn unusable_paths_are_refused() {
        for bad in ["/l/a,b", "/l/a:b", "relative", "/l/a\\b"] {
            assert!(
                overlay_options(&paths(&[bad]), Path::new("/u"), Path::new("/w"), 4096).is_err(),
                "{bad}"
            );
        }
        assert!(overlay_options(&[], Path::new("/u"), Path::new("/w"), 4096).is_err());
    }

    #[test]
    fn common_parent_is_a_directory_above_every_path() {
        let a = Path::new("/a/b/c");
        let b = Path::new("/a/b/d/e");
        assert_eq!(common_parent(&[a, b]), PathBuf::from("/a/b"));
        assert_eq!(common_parent(&[a, a]), PathBuf::from("/a/b"));
        assert_eq!(common_parent(&[a, Path::new("/z")]), PathBuf::from("/"));
    }

    #[test]
    fn kernel_mounts_come_before_their_children() {
        for (i, m) in KERNEL_MOUNTS.iter().enumerate() {
            for parent in &KERNEL_MOUNTS[i + 1..] {
                assert!(
                    !Path::new(m.target).starts_with(parent.target),
                    "{} before {}",
                    m.target,
                    parent.target
                );
            }
        }
    }
}
