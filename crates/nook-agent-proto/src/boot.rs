//! The boot spec: everything `nook-agent boot` needs to build a container sandbox around itself.
//!
//! The runner writes it as JSON to the boot process's standard input. The boot process joins the cgroups, enters
//! new namespaces, mounts the root filesystem, locks itself down and finally executes the agent as PID 1. The
//! runner reads the boot process's standard output: first a [`BootReport`] line with the host pid of the sandbox's
//! init, then either end of file (the agent is running) or one [`BootReport`] line with the error.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// File descriptor on which the agent finds its listening socket.
pub const LISTEN_FD: i32 = 3;

/// Where the agent binary is bind-mounted, read-only, inside every sandbox.
pub const AGENT_PATH_IN_SANDBOX: &str = "/dev/.nook/nook-agent";

/// How to build one container sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootSpec {
    /// Sandbox id, for messages.
    pub sandbox_id: String,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// Read-only image layers, topmost first (overlayfs `lowerdir` order).
    pub lower_dirs: Vec<PathBuf>,
    /// The sandbox's writable layer.
    pub upper_dir: PathBuf,
    /// overlayfs work directory on the same filesystem as `upper_dir`.
    pub work_dir: PathBuf,
    /// Empty directory where the root filesystem is assembled (only inside the sandbox's mount namespace).
    pub rootfs_dir: PathBuf,
    /// Host path of the static agent binary to bind-mount and execute.
    pub agent_binary: PathBuf,
    /// `cgroup.procs` files to write the boot process's pid into before creating namespaces.
    pub cgroup_procs: Vec<PathBuf>,
    /// Generated `/etc/hosts` to bind-mount over the image's, if any.
    pub hosts_file: Option<PathBuf>,
    /// Generated `/etc/resolv.conf` (naming the runner's resolver) to bind-mount over the image's, if any.
    #[serde(default)]
    pub resolv_conf: Option<PathBuf>,
    /// Set `no_new_privs`, so that setuid binaries cannot raise privileges.
    pub no_new_privs: bool,
}

/// A line the boot process writes on its standard output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum BootReport {
    /// The sandbox's init exists with this host pid.
    Init {
        /// Host pid of PID 1 of the sandbox.
        pid: i32,
    },
    /// Building the sandbox failed.
    Failed {
        /// The step that failed and why.
        message: String,
    },
}
