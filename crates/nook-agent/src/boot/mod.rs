//! `nook-agent boot`: the container runtime's init step, run on the host by the runner (like `runc init`).
//!
//! Data flows in one direction. The runner starts this process with a JSON [`BootSpec`] on standard input, a bound
//! and listening unix socket on fd [`LISTEN_FD`] and a pipe on standard output. Stage 1 (this process, which must
//! still be single-threaded) reads the spec, joins the sandbox's cgroups, unshares every namespace but the user
//! namespace and forks. The parent reports the child's host pid as a [`BootReport::Init`] line and exits; the runner,
//! a child subreaper, adopts the child. Stage 2, the child, is PID 1 of the new pid namespace: it assembles the root
//! filesystem ([`mounts`]), names the host and brings up loopback ([`system`]), locks itself down ([`seccomp`],
//! [`caps`]) and executes the agent's `serve` subcommand from
//! [`AGENT_PATH_IN_SANDBOX`](nook_agent_proto::boot::AGENT_PATH_IN_SANDBOX). Its copy of the status pipe
//! is close-on-exec, so the runner sees end of file once the agent runs, or one [`BootReport::Failed`] line naming
//! the step that failed.

mod caps;
mod mounts;
mod seccomp;
mod system;

use std::convert::Infallible;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::stat::Mode;
use nix::unistd::{fork, pipe2, ForkResult};
use nook_agent_proto::boot::{BootReport, BootSpec, LISTEN_FD};

/// Namespaces the sandbox gets. The cgroup namespace is created after joining the cgroups, so that the sandbox sees
/// its own cgroups as the roots.
const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWPID)
    .union(CloneFlags::CLONE_NEWCGROUP);

/// Builds the sandbox described on standard input and executes the agent in it.
///
/// Returns the exit code of the stage-1 process: 0 once the sandbox's init exists and was reported, non-zero when
/// building failed before that. The init child never returns from here: it executes the agent or exits.
pub fn run() -> i32 {
    let status = match StatusPipe::from_stdout() {
        Ok(status) => status,
        Err(err) => {
            // Without a status pipe the runner cannot be told anything; standard error is all that is left.
            eprintln!("nook-agent boot: {}", err.message());
            return 1;
        }
    };
    match stage1(&status) {
        Ok(()) => 0,
        Err(err) => {
            // If even this fails the runner sees end of file without an init line, which it treats as a failure.
            let _ = status.report(&BootReport::Failed { message: err.message() });
            1
        }
    }
}

/// Stage 1: everything up to the fork, then the parent's side of it.
fn stage1(status: &StatusPipe) -> Result<(), BootError> {
    let spec = read_spec()?;
    check_single_threaded()?;
    system::check_listen_fd()?;
    for procs in &spec.cgroup_procs {
        join_cgroup(procs)?;
    }
    unshare(NAMESPACES).step(|| "creating the sandbox's namespaces")?;

    // The child waits until this pipe reaches end of file, so that its failure line can never come before the
    // parent's init line.
    let (sync_read, sync_write) = pipe2(OFlag::O_CLOEXEC).step(|| "creating the start pipe")?;
    // SAFETY: the process is single-threaded (checked above), so the child may do anything, not only
    // async-signal-safe calls.
    match unsafe { fork() }.step(|| "forking the sandbox's init")? {
        ForkResult::Child => {
            drop(sync_write);
            init(&spec, status, sync_read)
        }
        ForkResult::Parent { child } => {
            drop(sync_read);
            if let Err(err) = status.report(&BootReport::Init { pid: child.as_raw() }) {
                // The runner would never learn the pid to reap or kill, so the init must not live on.
                let _ = kill(child, Signal::SIGKILL);
                return Err(err);
            }
            drop(sync_write);
            Ok(())
        }
    }
}

/// Stage 2, PID 1 of the sandbox: builds the sandbox and executes the agent, or reports why not and exits.
fn init(spec: &BootSpec, status: &StatusPipe, sync: OwnedFd) -> ! {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        wait_for_parent(sync)?;
        build_and_exec(spec)
    }));
    let message = match outcome {
        Ok(Ok(never)) => match never {},
        Ok(Err(err)) => err.message(),
        Err(_) => "building the sandbox panicked".to_owned(),
    };
    let _ = status.report(&BootReport::Failed { message });
    // SAFETY: `_exit` ends the process without running anything else, which is what a failed init must do.
    unsafe { libc::_exit(1) }
}

/// Every stage-2 step in order; returns only on failure.
fn build_and_exec(spec: &BootSpec) -> Result<Infallible, BootError> {
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    mounts::make_private()?;
    // Host paths are unreachable after the pivot, so the binds from the host are cloned into detached mounts now and
    // attached inside the new root later.
    let agent = mounts::DetachedMount::clone_file(&spec.agent_binary, "the agent binary")?;
    let hosts = match &spec.hosts_file {
        Some(path) => Some(mounts::DetachedMount::clone_file(path, "the hosts file")?),
        None => None,
    };
    let resolv_conf = match &spec.resolv_conf {
        Some(path) => Some(mounts::DetachedMount::clone_file(path, "the resolver configuration")?),
        None => None,
    };
    mounts::mount_overlay(spec)?;
    // Everything else is mounted after the pivot, where symbolic links in the image resolve inside the image and
    // cannot point the runtime at host paths.
    mounts::pivot_into(&spec.rootfs_dir)?;
    mounts::mount_kernel_filesystems()?;
    mounts::populate_dev()?;
    mounts::attach_agent(agent)?;
    if let Some(hosts) = hosts {
        mounts::attach_etc_file(hosts, "/etc/hosts")?;
    }
    if let Some(resolv_conf) = resolv_conf {
        mounts::attach_etc_file(resolv_conf, "/etc/resolv.conf")?;
    }
    mounts::mask_kernel_paths()?;

    system::set_hostname(&spec.hostname)?;
    system::bring_up_loopback()?;
    system::protect_from_oom_killer()?;
    system::prepare_fds()?;

    if spec.no_new_privs {
        caps::set_no_new_privs()?;
    }
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN, so the filter goes in before the caps go.
    seccomp::install()?;
    caps::drop_to_default_set()?;
    system::reset_signals()?;
    Err(system::exec_agent())
}

/// Blocks until the stage-1 parent has written the init line and closed its end of the start pipe.
fn wait_for_parent(sync: OwnedFd) -> Result<(), BootError> {
    let mut sync = File::from(sync);
    let mut buf = [0u8; 1];
    loop {
        match sync.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(BootError::new("waiting for the boot parent", err)),
        }
    }
}

fn read_spec() -> Result<BootSpec, BootError> {
    let mut text = String::new();
    io::stdin()
        .read_to_string(&mut text)
        .step(|| "reading the boot spec from standard input")?;
    serde_json::from_str(&text).step(|| "parsing the boot spec")
}

/// `unshare(CLONE_NEWNS)` and a fork that keeps running Rust code both need a single-threaded process.
fn check_single_threaded() -> Result<(), BootError> {
    let threads = fs::read_dir("/proc/self/task")
        .step(|| "counting the boot process's threads")?
        .count();
    if threads == 1 {
        Ok(())
    } else {
        Err(BootError::new(
            "checking that the boot process is single-threaded",
            io::Error::other(format!("it has {threads} threads")),
        ))
    }
}

fn join_cgroup(procs: &Path) -> Result<(), BootError> {
    fs::write(procs, std::process::id().to_string()).step(|| format!("joining the cgroup {}", procs.display()))
}

/// The runner's end of the protocol: a close-on-exec duplicate of standard output.
struct StatusPipe {
    file: File,
}

impl StatusPipe {
    fn from_stdout() -> Result<Self, BootError> {
        // Above LISTEN_FD, so that the duplicate can never take the listening socket's number.
        let fd = fcntl(libc::STDOUT_FILENO, FcntlArg::F_DUPFD_CLOEXEC(LISTEN_FD + 1))
            .step(|| "duplicating the status pipe")?;
        // SAFETY: fcntl just returned this descriptor, nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Self { file })
    }

    /// Writes one report line. `&File` implements `Write`, and a line is written with one `write` call (well below
    /// the pipe's atomic size), so the parent and child never interleave.
    fn report(&self, report: &BootReport) -> Result<(), BootError> {
        let mut line = serde_json::to_vec(report).step(|| "encoding a boot report")?;
        line.push(b'\n');
        (&self.file)
            .write_all(&line)
            .step(|| "writing a boot report to the status pipe")
    }
}

/// A boot step that failed, and the reason in `source`.
#[derive(Debug)]
pub struct BootError {
    step: String,
    source: io::Error,
}

impl BootError {
    fn new(step: impl Into<String>, source: io::Error) -> Self {
        Self {
            step: step.into(),
            source,
        }
    }

    /// The one-line message for the runner: the step and why it failed, with errno names such as `EINVAL`.
    pub fn message(&self) -> String {
        let cause = match self.source.raw_os_error() {
            Some(code) => Errno::from_raw(code).to_string(),
            None => self.source.to_string(),
        };
        format!("{self}: {cause}")
    }
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed", self.step)
    }
}

impl std::error::Error for BootError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Names the step of a failed result: `mount(..).step(|| format!("mounting proc at {target}"))`.
trait Step<T> {
    fn step<S: Into<String>>(self, step: impl FnOnce() -> S) -> Result<T, BootError>;
}

impl<T, E: Into<io::Error>> Step<T> for Result<T, E> {
    fn step<S: Into<String>>(self, step: impl FnOnce() -> S) -> Result<T, BootError> {
        self.map_err(|err| BootError::new(step(), err.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nook_agent_proto::boot::AGENT_PATH_IN_SANDBOX;

    #[test]
    fn messages_name_the_step_and_the_errno() {
        let err: Result<(), Errno> = Err(Errno::EINVAL);
        let err = err.step(|| "mounting overlayfs root at /x").unwrap_err();
        assert_eq!(err.to_string(), "mounting overlayfs root at /x failed");
        assert_eq!(
            err.message(),
            "mounting overlayfs root at /x failed: EINVAL: Invalid argument"
        );
    }

    #[test]
    fn messages_keep_non_os_causes() {
        let err = BootError::new("parsing the boot spec", io::Error::other("missing field `hostname`"));
        assert_eq!(err.message(), "parsing the boot spec failed: missing field `hostname`");
    }

    #[test]
    fn agent_path_is_on_the_dev_tmpfs() {
        // mounts::populate_dev creates the mount point for the agent under /dev, on the tmpfs, so that nothing is
        // written to the sandbox's writable layer.
        assert!(Path::new(AGENT_PATH_IN_SANDBOX).starts_with("/dev"));
    }
}
