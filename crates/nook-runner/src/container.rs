//! The `container` isolation backend: Linux namespaces, cgroups, seccomp and capabilities.
//!
//! Booting a sandbox runs `nook-agent boot` (a fresh single-threaded process, because forking and changing
//! namespaces from this multi-threaded server would be unsound) with the [`BootSpec`] on its standard input and the
//! sandbox's listening agent socket on fd 3. The boot process reports the host pid of the sandbox's init and then
//! closes its report pipe when the agent has been executed; a failure arrives as a message naming the failed step.
//!
//! The init is watched through a pidfd, which becomes readable when it exits (no polling), and which also lets the
//! runner reap it: the runner is a child subreaper, so inits whose boot process exited become its children.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nook_agent_proto::boot::{BootReport, BootSpec, LISTEN_FD};
use nook_api::Isolation;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::RunnerError;

/// Longest time a boot may take before it is considered hung.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a backend needs to boot one sandbox.
#[derive(Debug, Clone)]
pub struct BootRequest {
    /// Sandbox id.
    pub sandbox_id: String,
    /// Hostname.
    pub hostname: String,
    /// Image layers, topmost first.
    pub lower_dirs: Vec<PathBuf>,
    /// Writable layer.
    pub upper_dir: PathBuf,
    /// overlayfs work dir.
    pub work_dir: PathBuf,
    /// Mount point for the assembled root.
    pub rootfs_dir: PathBuf,
    /// Host path of the agent socket to create.
    pub socket_path: PathBuf,
    /// `cgroup.procs` files to join.
    pub cgroup_procs: Vec<PathBuf>,
    /// Generated `/etc/hosts`.
    pub hosts_file: Option<PathBuf>,
    /// Generated `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// The init process of a booted sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitProcess {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`), so that a recycled pid is never
    /// mistaken for the init after a restart.
    pub start_time: u64,
}

/// An isolation class's way of building a sandbox. The container class is the first implementation; gVisor and
/// VMs implement the same seam.
#[async_trait::async_trait]
pub trait IsolationBackend: Send + Sync {
    /// The class this backend implements.
    fn isolation(&self) -> Isolation;
    /// Builds and starts the sandbox; on failure nothing it started is left running.
    async fn boot(&self, request: &BootRequest) -> Result<InitProcess, RunnerError>;
}

/// The container backend.
#[derive(Debug, Clone)]
pub struct ContainerBackend {
    agent_binary: PathBuf,
    no_new_privs: bool,
}

impl ContainerBackend {
    /// Uses the static agent binary at `agent_binary`; refuses a missing or dynamically linked one, since the agent
    /// must run inside images that have no (or another) C library.
    pub fn new(agent_binary: &Path) -> Result<Self, RunnerError> {
        let agent_binary = agent_binary.canonicalize().map_err(|source| RunnerError::Io {
            action: "finding the agent binary",
            path: agent_binary.to_path_buf(),
            source,
        })?;
        if elf_has_interpreter(&agent_binary).map_err(|source| RunnerError::Io {
            action: "reading the agent binary",
            path: agent_binary.clone(),
            source,
        })? {
            return Err(RunnerError::Io {
                action: "checking the agent binary",
                path: agent_binary,
                source: std::io::Error::other("it is dynamically linked; build it statically (scripts/build.sh does)"),
            });
        }
        // Like Docker's default, setuid programs work (sudo for the `user` account, as E2B's images expect); what
        // they can gain is bounded by the capability set and the seccomp filter, which no_new_privs does not widen.
        Ok(Self {
            agent_binary,
            no_new_privs: false,
        })
    }
}

#[async_trait::async_trait]
impl IsolationBackend for ContainerBackend {
    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    async fn boot(&self, request: &BootRequest) -> Result<InitProcess, RunnerError> {
        let fail = |message: String| RunnerError::Boot {
            sandbox_id: request.sandbox_id.clone(),
            message,
        };
        let _ = std::fs::remove_file(&request.socket_path);
        let listener =
            std::os::unix::net::UnixListener::bind(&request.socket_path).map_err(|source| RunnerError::Io {
                action: "binding the agent socket",
                path: request.socket_path.clone(),
                source,
            })?;
        let spec = BootSpec {
            sandbox_id: request.sandbox_id.clone(),
            hostname: request.hostname.clone(),
            lower_dirs: request.lower_dirs.clone(),
            upper_dir: request.upper_dir.clone(),
            work_dir: request.work_dir.clone(),
            rootfs_dir: request.rootfs_dir.clone(),
            agent_binary: self.agent_binary.clone(),
            cgroup_procs: request.cgroup_procs.clone(),
            hosts_file: request.hosts_file.clone(),
            resolv_conf: request.resolv_conf.clone(),
            no_new_privs: self.no_new_privs,
        };

        let listen_fd = listener.as_raw_fd();
        let mut command = std::process::Command::new(&self.agent_binary);
        command
            .arg("boot")
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs between fork and exec; dup2 and fcntl are async-signal-safe and touch only descriptors.
        unsafe {
            command.pre_exec(move || {
                if listen_fd == LISTEN_FD {
                    let flags = libc::fcntl(LISTEN_FD, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(LISTEN_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_fd, LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| fail(format!("starting {} failed: {error}", self.agent_binary.display())))?;
        // The agent holds the listening socket now; the runner only ever connects to its path.
        drop(listener);

        let spec_json = serde_json::to_vec(&spec).expect("boot spec serializes");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut stderr = child.stderr.take().expect("piped stderr");

        // The init pid is kept outside the timed future so that every failure path below can kill it.
        let mut init: Option<i32> = None;
        let outcome = tokio::time::timeout(BOOT_TIMEOUT, async {
            stdin
                .write_all(&spec_json)
                .await
                .map_err(|e| format!("sending the boot spec failed: {e}"))?;
            drop(stdin);
            let mut failure: Option<String> = None;
            let mut line = String::new();
            loop {
                line.clear();
                let read = stdout
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("reading boot reports: {e}"))?;
                if read == 0 {
                    break;
                }
                match serde_json::from_str::<BootReport>(line.trim()) {
                    Ok(BootReport::Init { pid }) if pid > 1 => init = Some(pid),
                    Ok(BootReport::Init { pid }) => failure = Some(format!("the boot process reported pid {pid}")),
                    Ok(BootReport::Failed { message }) => failure = Some(message),
                    Err(_) => failure = Some(format!("unexpected boot output: {}", line.trim())),
                }
            }
            let mut errors = String::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_string(&mut errors).await;
            let status = child
                .wait()
                .await
                .map_err(|e| format!("waiting for the boot process: {e}"))?;
            Ok::<_, String>((failure, status, errors))
        })
        .await;

        let outcome = match outcome {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(message)) => Err(message),
            Err(_) => Err(format!("no answer within {} s", BOOT_TIMEOUT.as_secs())),
        };
        let (failure, status, errors) = match outcome {
            Ok(result) => result,
            Err(message) => {
                if let Some(pid) = init {
                    kill_and_reap(pid).await;
                }
                return Err(fail(message));
            }
        };
        let init_pid = init;
        let failure = failure.or_else(|| match (init_pid, status.success()) {
            (Some(_), true) => None,
            (None, _) => Some(format!(
                "the boot process ended ({status}) without starting an init: {}",
                errors.trim()
            )),
            (Some(_), false) => Some(format!("the boot process failed ({status}): {}", errors.trim())),
        });
        if let Some(message) = failure {
            if let Some(pid) = init_pid {
                kill_and_reap(pid).await;
            }
            return Err(fail(message));
        }
        let pid = init_pid.expect("checked above");
        let start_time =
            process_start_time(pid).ok_or_else(|| fail(format!("the init (pid {pid}) vanished at once")))?;
        Ok(InitProcess { pid, start_time })
    }
}

/// Kills a process and waits for it to be gone (reaping it when it is our child).
pub async fn kill_and_reap(pid: i32) {
    let Ok(pidfd) = PidFd::open(pid) else { return };
    pidfd.kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), pidfd.exited()).await;
}

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn elf_has_interpreter(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit ELF file");
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return Err(invalid());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    for index in 0..count {
        let at = phoff + index * entry_size;
        let Some(header) = bytes.get(at..at + 4) else {
            return Err(invalid());
        };
        if u32::from_le_bytes(header.try_into().expect("4 bytes")) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Start time of a process (field 22 of `/proc/<pid>/stat`), `None` if it does not exist.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Registers an owned descriptor with the tokio reactor.
pub(crate) fn register_fd(fd: OwnedFd, interest: tokio::io::Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor that stays open, and always returns the same number, until
    // it is dropped together with the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(std::io::Error::from)
}

/// A pidfd: a handle on a process that becomes readable when it exits.
#[derive(Debug)]
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: i32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        Ok(Self {
            fd: register_fd(fd, tokio::io::Interest::READABLE)?,
        })
    }

    /// Sends SIGKILL through the pidfd: it reaches this process or nothing, never a process that reused its pid.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal on a descriptor we own, with a null siginfo and no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// Waits until the process has exited, then reaps it if it is our child (after a restart it is not, and its
    /// new parent reaps it).
    pub async fn exited(&self) {
        if let Ok(mut guard) = self.fd.readable().await {
            guard.retain_ready();
        }
        let mut info: libc::siginfo_t = {
            // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
            unsafe { std::mem::zeroed() }
        };
        // SAFETY: waitid with P_PIDFD on a descriptor we own, writing into a properly sized siginfo_t.
        unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.get_ref().as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_of_self_is_readable_and_stable() {
        let pid = std::process::id() as i32;
        let first = process_start_time(pid).unwrap();
        assert_eq!(process_start_time(pid), Some(first));
        assert_eq!(process_start_time(i32::MAX), None);
    }

    #[test]
    fn dynamic_binaries_are_detected() {
        assert!(elf_has_interpreter(Path::new("/bin/sh")).unwrap());
    }

    #[tokio::test]
    async fn pidfd_reports_exit_and_reaps() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 0"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let pidfd = PidFd::open(pid).unwrap();
        tokio::time::timeout(Duration::from_secs(10), pidfd.exited())
            .await
            .unwrap();
        // Reaped: the pid no longer exists, not even as a zombie.
        assert!(process_start_time(pid).is_none());
        std::mem::forget(child);
    }
}
