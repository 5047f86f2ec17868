//! Wire types of nook's native v1 API.
//!
//! Every request and response body that crosses the HTTP boundary is defined here once and shared by the control
//! plane (which serves it and derives the OpenAPI document from these types), the Rust client and the CLI. Request
//! bodies reject unknown fields so that a typo in a client is an error rather than a silently ignored setting.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub mod audit;
pub mod limits;
pub mod names;
pub mod network;
pub mod preview;
pub mod tenancy;

pub use network::{EgressAction, EgressMode, EgressRule, NetworkPolicy};
pub use preview::{
    PortAccess, PreviewLink, PreviewLinkList, PreviewLinkRequest, PreviewSettings, PreviewSettingsRequest,
};

/// The lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// The control plane accepted the request and the runner is building the sandbox.
    Creating,
    /// The sandbox's processes are running and its agent answers.
    Running,
    /// Its processes are frozen where they are (no CPU used, memory kept) until it is resumed.
    Paused,
    /// No process runs; the writable filesystem layer is kept on disk.
    Stopped,
    /// Reserved: the writable layer lives in the object store.
    Archived,
    /// Something failed; `state_reason` and `state_message` say what.
    Error,
    /// The sandbox and its files are gone.
    Deleted,
}

impl SandboxState {
    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Archived => "archived",
            Self::Error => "error",
            Self::Deleted => "deleted",
        }
    }

    /// Parses the wire name of a state.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "creating" => Self::Creating,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "stopped" => Self::Stopped,
            "archived" => Self::Archived,
            "error" => Self::Error,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }
}

impl std::fmt::Display for SandboxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a sandbox entered its current state. Stable codes: clients may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateReason {
    /// A client asked for the transition (create, start, stop, delete).
    Requested,
    /// The kernel killed a process in the sandbox because it hit its memory limit.
    Oom,
    /// The sandbox's init process (the agent) exited on its own.
    InitExited,
    /// Building the sandbox failed; the message says which step and why.
    CreateFailed,
    /// Starting a stopped sandbox failed; the message says which step and why.
    StartFailed,
    /// After a restart the runner no longer found the sandbox's processes (for example after a host reboot).
    LostOnRestart,
    /// The sandbox's deadline passed and its `on_deadline` action stopped it.
    DeadlinePassed,
    /// Its limits (CPU, memory, processes, disk) were changed; the message says from what to what.
    Resized,
    /// A client changed its network policy.
    NetworkChanged,
    /// A client changed who may reach its ports (public ports, wake on request, rotated tokens).
    PreviewChanged,
    /// A preview request woke it (resumed or started it) because its `preview.wake_on_request` is on.
    WokenByRequest,
    /// It was made as a fork of another sandbox (named in the message and in `parent`).
    Forked,
    /// A snapshot of its files was taken (the image is named in the message).
    Snapshotted,
    /// Its lifecycle policy stopped it after a time without activity (`lifecycle.idle_stop_s`).
    Idle,
    /// Its lifecycle policy archived it after it had been stopped for `lifecycle.stopped_archive_s`.
    AutoArchived,
    /// It reached its memory limit and the limit was raised on its own (within `memory_max_mb`) instead of a process
    /// being killed.
    MemoryGrown,
}

impl StateReason {
    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Oom => "oom",
            Self::InitExited => "init_exited",
            Self::CreateFailed => "create_failed",
            Self::StartFailed => "start_failed",
            Self::LostOnRestart => "lost_on_restart",
            Self::DeadlinePassed => "deadline_passed",
            Self::Resized => "resized",
            Self::NetworkChanged => "network_changed",
            Self::PreviewChanged => "preview_changed",
            Self::WokenByRequest => "woken_by_request",
            Self::Forked => "forked",
            Self::Snapshotted => "snapshotted",
            Self::MemoryGrown => "memory_grown",
            Self::Idle => "idle",
            Self::AutoArchived => "auto_archived",
        }
    }

    /// Parses the wire name of a reason.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "requested" => Self::Requested,
            "oom" => Self::Oom,
            "init_exited" => Self::InitExited,
            "create_failed" => Self::CreateFailed,
            "start_failed" => Self::StartFailed,
            "lost_on_restart" => Self::LostOnRestart,
            "deadline_passed" => Self::DeadlinePassed,
            "resized" => Self::Resized,
            "network_changed" => Self::NetworkChanged,
            "preview_changed" => Self::PreviewChanged,
            "woken_by_request" => Self::WokenByRequest,
            "forked" => Self::Forked,
            "snapshotted" => Self::Snapshotted,
            "memory_grown" => Self::MemoryGrown,
            "idle" => Self::Idle,
            "auto_archived" => Self::AutoArchived,
            _ => return None,
        })
    }
}

/// How a sandbox is isolated from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Linux namespaces, cgroups, a seccomp filter and a reduced capability set.
    #[default]
    Container,
}

/// Resource limits requested for a sandbox. Omitted fields take the server's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    /// CPU time as a number of cores (fractions allowed), enforced as a CFS quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory limit in MiB; processes beyond it are OOM-killed inside the sandbox (unless `memory_max_mb` lets it
    /// grow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Auto-grow ceiling in MiB: when the sandbox reaches its memory limit, the limit is raised (in steps, up to this)
    /// instead of a process being killed, and an event says so. None when omitted (on a resize: unchanged; 0 turns it
    /// off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_mb: Option<u64>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// Disk quota of the sandbox's writable layer in MiB (what it may add to or change in its image); writes beyond
    /// it fail inside the sandbox with "Disk quota exceeded". No quota when omitted (on a resize: unchanged; 0
    /// removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// Resource limits in force for a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Resources {
    /// CPU time as a number of cores.
    pub cpu: f64,
    /// Memory limit in MiB.
    pub memory_mb: u64,
    /// Ceiling up to which the memory limit grows on its own instead of an OOM kill; absent: no auto-grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max_mb: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: u32,
    /// Disk quota of the writable layer in MiB; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
}

/// Longest timeout a sandbox's deadline can be set to, in seconds (ten years: a deadline is optional, and no
/// sandbox has one unless asked; this bound only keeps the arithmetic finite).
pub const MAX_TIMEOUT_S: u64 = 10 * 365 * 24 * 3600;

/// What a sandbox's deadline does when it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineAction {
    /// Delete the sandbox and its files.
    #[default]
    Delete,
    /// Stop it: processes end, files are kept, and it can be started again.
    Stop,
}

impl DeadlineAction {
    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Stop => "stop",
        }
    }

    /// Parses the wire name of an action.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "delete" => Some(Self::Delete),
            "stop" => Some(Self::Stop),
            _ => None,
        }
    }
}

/// What a sandbox does on its own as time passes (besides its deadline). Every automatic change is an event with
/// its reason. Body of `PUT /v1/sandboxes/{sandbox}/lifecycle` (the fields given are set; 0 turns one off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// Stop the sandbox (files kept) after this many seconds without activity: no API call working on it (exec,
    /// processes, terminal input, files) and under 1% of a core of CPU used. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_stop_s: Option<u64>,
    /// Delete the sandbox once it has been stopped (or archived) this many seconds. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_delete_s: Option<u64>,
    /// Archive the sandbox (its files to the archive store, off local disk) once it has been stopped this many
    /// seconds. Absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_archive_s: Option<u64>,
}

/// Body of `PUT /v1/sandboxes/{sandbox}/deadline`: sets, moves or removes a sandbox's deadline.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDeadlineRequest {
    /// Seconds from now until the deadline (at most ten years); absent or null removes the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// What the deadline does (unchanged when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<DeadlineAction>,
}

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandboxRequest {
    /// Image name (`base` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Unique name; also the sandbox's hostname. Generated from the id when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form labels to select sandboxes by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Environment variables for every process started in the sandbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resource limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequest>,
    /// Isolation class (`container` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
    /// Seconds from creation until the sandbox's deadline (at most ten years); none when omitted: a sandbox lives
    /// until it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// What the deadline does (`delete` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<DeadlineAction>,
    /// What the sandbox does on its own as time passes (idle stop, delete once stopped); nothing when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// What the sandbox may reach on the network (any public address when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// Who may reach its ports through the preview proxy (every port private when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<PreviewSettings>,
}

/// A sandbox as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    /// Stable identifier (`sb-` followed by 20 lowercase letters and digits).
    pub id: String,
    /// Unique name and hostname.
    pub name: String,
    /// Image name the sandbox was created from.
    pub image: String,
    /// Content digest of that image at creation time.
    pub image_digest: String,
    /// Isolation class.
    pub isolation: Isolation,
    /// Current state.
    pub state: SandboxState,
    /// Why the sandbox entered its current state, or the last notable event (such as `oom`) while in it.
    pub state_reason: StateReason,
    /// A sentence explaining `state_reason`.
    pub state_message: String,
    /// Labels given at creation.
    pub labels: BTreeMap<String, String>,
    /// Environment given at creation.
    pub env: BTreeMap<String, String>,
    /// Limits in force.
    pub resources: Resources,
    /// How many processes the kernel has OOM-killed in this sandbox since it was created.
    pub oom_kills: u64,
    /// When the sandbox ends on its own, by `on_deadline`; absent: it lives until it is deleted. Cleared once it
    /// has acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// What the deadline does.
    #[serde(default)]
    pub on_deadline: DeadlineAction,
    /// What it does on its own as time passes.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// The sandbox this one was forked from, if it is a fork.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// What it may reach on the network.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// Its IPv4 address while it runs with a network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Who may reach its ports through the preview proxy.
    #[serde(default)]
    pub preview: PreviewSettings,
    /// The tenant it belongs to.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// When the sandbox was created.
    pub created_at: DateTime<Utc>,
    /// When the sandbox last changed state.
    pub updated_at: DateTime<Utc>,
}

fn default_tenant() -> String {
    tenancy::DEFAULT_TENANT.to_string()
}

/// Body of `POST /v1/sandboxes/{sandbox}/fork`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many forks to make (1 when omitted, at most 64 per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Names of the forks, one per fork (generated from their ids when omitted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Labels of the forks (the source's when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Seconds from the fork until each fork's deadline (at most ten years); none when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// What each fork's deadline does (`delete` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_deadline: Option<DeadlineAction>,
}

/// Response of `POST /v1/sandboxes/{sandbox}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResult {
    /// The new sandboxes, running, in the order of `names`.
    pub sandboxes: Vec<Sandbox>,
    /// How long the source was frozen while its files were copied (copy-on-write), in microseconds; 0 for a source
    /// that was not running.
    pub frozen_us: u64,
}

/// Body of `POST /v1/sandboxes/{sandbox}/snapshot`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Name of the image to make (an existing name is moved to the new image).
    pub image: String,
}

/// One recorded state transition or notable event of a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxEvent {
    /// When it happened.
    pub at: DateTime<Utc>,
    /// State before the event.
    pub from_state: Option<SandboxState>,
    /// State after the event.
    pub to_state: SandboxState,
    /// Why.
    pub reason: StateReason,
    /// A sentence with the details.
    pub message: String,
}

/// Response of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    /// Matching sandboxes, oldest first.
    pub sandboxes: Vec<Sandbox>,
}

/// One line of `GET /v1/sandboxes/{sandbox}/events/stream` (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SandboxEventLine {
    /// An event, with its number: reconnect with `?after=` that number to miss nothing and see nothing twice.
    Event {
        /// The event's number (increasing).
        seq: u64,
        /// The event.
        event: SandboxEvent,
    },
    /// Nothing happened for a while; the stream is alive.
    Keepalive,
    /// The sandbox was deleted; the stream ends.
    Deleted,
}

/// Response of `GET /v1/sandboxes/{sandbox}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxEventList {
    /// Events, oldest first.
    pub events: Vec<SandboxEvent>,
}

/// Response of `GET /v1/sandboxes/{sandbox}/stats`: what a running sandbox uses now, read from its cgroup and its
/// writable layer when asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxStats {
    /// When the figures were read.
    pub at: DateTime<Utc>,
    /// When the sandbox's current run began (its last create or start).
    pub started_at: DateTime<Utc>,
    /// CPU time used by all the sandbox's processes during this run, in nanoseconds (v1 `cpuacct.usage`, v2
    /// `usage_usec` of `cpu.stat`). Rates come from the difference of two readings.
    pub cpu_used_ns: u64,
    /// CPU allowance in cores (the CFS quota).
    pub cpu_limit: f64,
    /// Memory in use, without the page cache the kernel can drop: the cgroup's usage less its inactive file pages
    /// (what `docker stats` and `kubectl top` report).
    pub memory_used_bytes: u64,
    /// Page cache charged to the sandbox (file-backed pages, active and inactive).
    pub memory_cache_bytes: u64,
    /// Memory limit; processes beyond it are OOM-killed.
    pub memory_limit_bytes: u64,
    /// The most memory charged to the sandbox at any moment of this run, as the kernel tracked it (page cache
    /// included: v1 `memory.max_usage_in_bytes`, v2 `memory.peak`).
    pub memory_peak_bytes: u64,
    /// Memory in use (as `memory_used_bytes`) on average over this run, from a reading every 10 s (the current
    /// figure until the first reading).
    pub memory_average_bytes: u64,
    /// Bytes received by the sandbox's network interfaces (loopback excluded) during this run.
    pub network_rx_bytes: u64,
    /// Bytes sent by the sandbox's network interfaces (loopback excluded) during this run.
    pub network_tx_bytes: u64,
    /// Processes and threads now.
    pub pids: u64,
    /// Bytes allocated on disk by the sandbox's writable layer (its changes to the image), hard links counted once.
    pub disk_used_bytes: u64,
    /// False when the writable layer holds more entries than one reading walks (`disk_used_bytes` then counts the
    /// first of them only).
    pub disk_used_complete: bool,
    /// The disk the writable layer may use: its quota where it has one, otherwise the size of the host filesystem
    /// that holds it.
    pub disk_total_bytes: u64,
}

/// Body of `POST /v1/sandboxes/{sandbox}/exec` and `.../exec/stream`.
///
/// Exactly one of `command` (an argv, run without a shell) and `shell` (a string run by `/bin/sh -c`) is given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// A shell command line run by `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Extra environment, on top of the image's and the sandbox's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (the user's home when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// User name or numeric uid to run as (`root` when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Text written to the process's standard input, which is then closed. No input when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Kill the process (SIGKILL) after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Background processes only: run on a pseudo-terminal of this size (an interactive shell, a REPL); its output
    /// arrives as stdout, input goes to the terminal, and `.../resize` changes the size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Background processes only: bytes of output kept for replay to late or reconnecting readers (1 MiB by
    /// default, 4 KiB to 64 MiB); older output is dropped and reported as missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_buffer_bytes: Option<u64>,
}

/// A terminal size; also the body of `POST /v1/sandboxes/{sandbox}/processes/{pid}/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtySize {
    /// Columns (1 to 1000).
    pub cols: u16,
    /// Rows (1 to 1000).
    pub rows: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// True when nook killed it because `timeout_ms` ran out.
    pub timed_out: bool,
}

/// Response of `POST /v1/sandboxes/{sandbox}/exec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// Exit code when the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
    /// True when nook killed it because `timeout_ms` ran out.
    pub timed_out: bool,
    /// Standard output, decoded as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    /// Standard error, decoded as UTF-8 (invalid sequences replaced).
    pub stderr: String,
    /// True when standard output exceeded the capture limit and was cut.
    pub stdout_truncated: bool,
    /// True when standard error exceeded the capture limit and was cut.
    pub stderr_truncated: bool,
    /// Wall time from start to exit, in milliseconds.
    pub duration_ms: f64,
}

/// One line of the NDJSON stream of `POST /v1/sandboxes/{sandbox}/exec/stream`.
///
/// Output chunks come in the order the process wrote them to each stream; the stream ends with exactly one `exit`
/// line, or with one `error` line when the process's end could not be observed (an exit is never invented).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started; `pid` is its id inside the sandbox.
    Started {
        /// Process id inside the sandbox's PID namespace.
        pid: u32,
    },
    /// A chunk of standard output, base64-encoded.
    Stdout {
        /// Base64 (standard alphabet, padded) of the raw bytes.
        data: String,
        /// For background processes: offset of this chunk's first byte in the combined output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// A chunk of standard error, base64-encoded.
    Stderr {
        /// Base64 (standard alphabet, padded) of the raw bytes.
        data: String,
        /// For background processes: offset of this chunk's first byte in the combined output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    /// First line of a background process's output stream: replay starts at `offset`; `missed` bytes before it
    /// were dropped from the bounded buffer.
    Attached {
        /// Offset of the next byte.
        offset: u64,
        /// Bytes requested but no longer held.
        missed: u64,
    },
    /// Without `follow`: the stream caught up with the output so far (final). Reattach from `offset`.
    End {
        /// Offset just past the last byte sent.
        offset: u64,
    },
    /// Sent every 15 s while nothing else is, so that idle streams are never cut by proxies or timeouts.
    Keepalive,
    /// The process ended.
    Exit {
        /// How it ended.
        #[serde(flatten)]
        status: ExitStatus,
        /// Wall time from start to exit, in milliseconds.
        duration_ms: f64,
    },
    /// A problem that does not end the stream: on a terminal socket, an input or control message that could not be
    /// applied (for example a resize of a process without a terminal).
    Notice {
        /// Stable error code.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// The stream failed before the process's end was observed.
    Error {
        /// Stable error code.
        code: String,
        /// What went wrong.
        message: String,
    },
}

/// A text message from the client on a terminal WebSocket
/// (`GET /v1/sandboxes/{sandbox}/processes/{pid}/terminal`).
///
/// The protocol: binary messages from the client are the process's standard input, unchanged; binary messages from
/// the server are its standard output (for a terminal: everything the terminal shows). Text messages from the
/// server are [`ExecEvent`] JSON: one `attached` first, `stderr` chunks for processes without a terminal, and a
/// final `exit` (or `error`) before the server closes the socket. Closing the socket detaches: the process keeps
/// running and can be attached again from any offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TerminalCommand {
    /// Set the terminal's size; the foreground process group gets SIGWINCH.
    Resize {
        /// Columns (1 to 1000).
        cols: u16,
        /// Rows (1 to 1000).
        rows: u16,
    },
    /// Send a signal to the process.
    Signal {
        /// Signal number (1 to 64).
        signal: i32,
    },
    /// Close the process's standard input (end of file).
    CloseStdin,
}

/// A background process in a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProcessInfo {
    /// Process id inside the sandbox.
    pub pid: u32,
    /// Program and arguments.
    pub command: Vec<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Bytes of output (stdout and stderr together) written so far; the offset a follower would reach.
    pub output_bytes: u64,
    /// Whether it is still running.
    pub running: bool,
    /// Whether it runs on a pseudo-terminal (attach with `nook attach`, or the terminal WebSocket).
    #[serde(default)]
    pub terminal: bool,
    /// How it ended, once it has.
    pub exit: Option<ExitStatus>,
}

/// Response of `GET /v1/sandboxes/{sandbox}/processes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    /// Running and recently ended background processes, by pid.
    pub processes: Vec<ProcessInfo>,
}

/// Body of `POST /v1/sandboxes/{sandbox}/processes/{pid}/signal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Signal number (e.g. 15 for SIGTERM, 9 for SIGKILL, 2 for SIGINT).
    pub signal: i32,
}

/// What kind of file system object a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed by file operations).
    Symlink,
    /// A device, socket or FIFO.
    Other,
}

/// Response of `PUT /v1/sandboxes/{sandbox}/files/archive`: what a tar upload unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArchiveResult {
    /// Entries created (files, directories, links).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A path in a sandbox and its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Last path component.
    pub name: String,
    /// Kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits, e.g. 420 (0o644).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Last modification.
    pub modified_at: DateTime<Utc>,
    /// Where a symlink points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
}

/// Response of `GET /v1/sandboxes/{sandbox}/files/list`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// Entries: for a listing, sorted by path; for a multipart upload, in form order.
    pub entries: Vec<FileInfo>,
}

/// What changed under a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    /// A file or directory appeared.
    Create,
    /// A file opened for writing was closed.
    Write,
    /// A file or directory was removed.
    Remove,
    /// A path was renamed away.
    RenameFrom,
    /// A path was renamed to here.
    RenameTo,
    /// Permissions, owner or times changed.
    Metadata,
    /// The kernel dropped events: list the directory again.
    Overflow,
    /// Nothing happened for 15 s (sent so idle streams are never cut).
    Keepalive,
    /// The watch ended abnormally (for example, the sandbox stopped); `path` holds the reason.
    Error,
}

/// One line of the NDJSON stream of `GET /v1/sandboxes/{sandbox}/files/watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: WatchEventKind,
    /// The absolute path it happened to (the reason, for `error`).
    pub path: String,
    /// Whether the path is a directory.
    pub is_dir: bool,
}

/// Response of `GET /v1/sandboxes/{sandbox}/files/find`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FindResult {
    /// Matching paths, sorted.
    pub matches: Vec<FileInfo>,
    /// Whether the result limit stopped the search.
    pub truncated: bool,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/search`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// Absolute file or directory to search (recursively; symlinks are not followed, binary files skipped).
    pub path: String,
    /// Regular expression (linear-time syntax: no backreferences or lookaround).
    pub regex: String,
    /// Only files whose name matches this glob, e.g. `*.py`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<String>,
    /// Most matching lines to return (1000 by default, at most 100000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
    /// Time limit in milliseconds (10 s by default, at most 600 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One matching line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SearchMatch {
    /// File.
    pub path: String,
    /// Line number, from 1.
    pub line_number: u64,
    /// The line, without its newline (cut at 4 KiB).
    pub line: String,
}

/// Response of `POST /v1/sandboxes/{sandbox}/files/search`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SearchResult {
    /// Matching lines, by file then line.
    pub matches: Vec<SearchMatch>,
    /// Whether the result or time limit stopped the search.
    pub truncated: bool,
    /// Text files searched.
    pub files_searched: u64,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/replace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplaceRequest {
    /// Absolute paths of the files to rewrite.
    pub paths: Vec<String>,
    /// Regular expression.
    pub regex: String,
    /// Replacement; `$1` or `${name}` insert groups.
    pub replacement: String,
}

/// One rewritten file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplacedFile {
    /// File.
    pub path: String,
    /// Matches replaced.
    pub replacements: u64,
}

/// Response of `POST /v1/sandboxes/{sandbox}/files/replace`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplaceResult {
    /// Each file and its count.
    pub files: Vec<ReplacedFile>,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/chmod`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChmodRequest {
    /// Absolute path.
    pub path: String,
    /// Permission bits, e.g. 493 (0o755).
    pub mode: u32,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/chown`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChownRequest {
    /// Absolute path.
    pub path: String,
    /// New owner uid.
    pub uid: u32,
    /// New group gid.
    pub gid: u32,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/mkdir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MakeDirRequest {
    /// Absolute path; missing parents are created too.
    pub path: String,
}

/// Body of `POST /v1/sandboxes/{sandbox}/files/move`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// Absolute source path.
    pub from: String,
    /// Absolute destination path.
    pub to: String,
}

/// Configuration carried by an image and applied to every process in sandboxes made from it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageConfig {
    /// `KEY=value` environment entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Default working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Default user (a name or uid, optionally `:group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The image's entrypoint (OCI `Entrypoint`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// The image's default command or entrypoint arguments (OCI `Cmd`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Ports the image says its servers listen on, as `port/protocol`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// The image's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// For a template: a process started in every sandbox made from the image when it starts, and how to know it is
    /// ready (nook's own field; not part of OCI image configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<TemplateStart>,
}

/// A template's start command and readiness check: on every start of a sandbox made from the template, `command`
/// is started as a background process (with the image's user, environment and working directory), then
/// `ready_command` is run until it exits 0; the sandbox is reported running only then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateStart {
    /// Shell command (`/bin/sh -c`) that keeps running: a dev server, a Jupyter server.
    pub command: String,
    /// Shell command that exits 0 once `command` is ready (such as `curl -sf localhost:8000`); none: ready at
    /// once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_command: Option<String>,
    /// Seconds the readiness check may take before the start fails (default 60, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_s: Option<u64>,
}

/// The longest a template's readiness check may take, in seconds.
pub const MAX_READY_TIMEOUT_S: u64 = 3600;
/// How long a template's readiness check takes at most when the template does not say.
pub const DEFAULT_READY_TIMEOUT_S: u64 = 60;

/// An image in the runner's content-addressed store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// Name the image is known by.
    pub name: String,
    /// `sha256:` digest identifying the image's content.
    pub digest: String,
    /// Layer digests, lowest first (each the sha256 of its uncompressed tar stream).
    pub layers: Vec<String>,
    /// Unpacked size in bytes.
    pub size_bytes: u64,
    /// Configuration applied to sandboxes.
    pub config: ImageConfig,
    /// When it was imported.
    pub created_at: DateTime<Utc>,
}

/// Response of `GET /v1/images`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    /// All images, by name.
    pub images: Vec<Image>,
}

/// Body of `POST /v1/images/pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// `registry[:port]/repository[:tag][@sha256:…]`; a reference without a registry host uses the server's
    /// configured default registry.
    pub reference: String,
    /// Name to store the image under; defaults to the reference itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Body of `POST /v1/images/tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagRequest {
    /// An existing image name.
    pub source: String,
    /// The additional name (replacing what it named before).
    pub target: String,
}

/// Body of `POST /v1/images/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The image to export.
    pub name: String,
}

/// Response of `POST /v1/images/prune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImagePruneResult {
    /// Images removed because no name pointed to them any more.
    pub images_removed: u64,
    /// Layers removed because no image and no sandbox used them.
    pub layers_removed: u64,
    /// Bytes of file data freed.
    pub bytes_freed: u64,
}

/// Body of `POST /v1/images/push`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// The stored image to push.
    pub name: String,
    /// Where to: `registry[:port]/repository:tag`.
    pub reference: String,
}

/// One layer of an image being pulled or pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TransferLayer {
    /// Digest of the (compressed) layer blob.
    pub digest: String,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Whether the destination already holds it (the store, for a pull; the registry, for a push), so it is not
    /// transferred.
    pub present: bool,
}

/// What an image pull or push reports, one JSON object per line, as it goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TransferEvent {
    /// The image is known: these layers make it.
    Resolved {
        /// The registry reference, as understood.
        reference: String,
        /// Digest of the manifest (for a push: of the manifest being pushed).
        digest: String,
        /// The layers, lowest first.
        layers: Vec<TransferLayer>,
    },
    /// Bytes of a layer transferred so far (sent at most a few times a second per layer).
    Progress {
        /// The layer's blob digest.
        layer: String,
        /// Bytes received or sent.
        transferred: u64,
        /// The blob's size.
        size: u64,
    },
    /// A layer is verified and in the store (pull), or in the registry (push).
    LayerDone {
        /// The layer's blob digest.
        layer: String,
    },
    /// The transfer is complete: for a pull, the image is stored under its name.
    Done {
        /// The image.
        image: Box<Image>,
    },
    /// The transfer failed; for a pull, nothing of it was named.
    Error {
        /// What failed.
        error: ApiError,
    },
}

/// Query parameters of `POST /v1/builds`; the body is the build context, a tar stream (plain, gzip or zstd).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BuildRequest {
    /// Name of the image the build produces.
    pub name: String,
    /// Path of the Dockerfile inside the context (default `Dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// Build arguments as a JSON object of strings (`{"VERSION":"1.2"}`), overriding the Dockerfile's `ARG`
    /// defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_args: Option<String>,
    /// Run every step again instead of taking cached layers.
    #[serde(default)]
    pub no_cache: bool,
    /// Seconds the whole build may take (default 3600, at most 86400); a build past it fails and leaves nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// For a template: the start command every sandbox from the image runs (see [`TemplateStart`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_command: Option<String>,
    /// For a template: the readiness check of the start command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_command: Option<String>,
    /// For a template: seconds the readiness check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_s: Option<u64>,
}

/// The longest a build may take, in seconds.
pub const MAX_BUILD_TIMEOUT_S: u64 = 24 * 3600;
/// How long a build may take when the request does not say, in seconds.
pub const DEFAULT_BUILD_TIMEOUT_S: u64 = 3600;

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildState {
    /// Steps are running.
    Building,
    /// The image is stored under its name.
    Succeeded,
    /// A step failed or the build could not go on; nothing was named.
    Failed,
    /// A client cancelled it; nothing was named.
    Cancelled,
}

/// A build as `GET /v1/builds/{build}` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Build {
    /// Stable identifier (`bld-` and 16 lowercase letters and digits).
    pub id: String,
    /// Name of the image it produces.
    pub name: String,
    /// Where it is.
    pub state: BuildState,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// The image, once built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<Image>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    /// The step that failed, if one did (1-based instruction number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<u32>,
    /// Events recorded so far (the offset to follow its events from).
    pub events: u64,
}

/// Response of `GET /v1/builds`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BuildList {
    /// Recent builds, oldest first.
    pub builds: Vec<Build>,
}

/// Which output stream a line of build output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What a build reports as it goes, one JSON object per line (`GET /v1/builds/{build}/events`). Every event but
/// `missed` and `keepalive` is one entry of the build's log: a client that counts them (adding `missed`'s count)
/// knows the offset to follow the log from after a reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BuildEvent {
    /// The log no longer holds the events asked for (it keeps the most recent output of a long build): this many
    /// were skipped, and the stream goes on with the oldest event kept.
    Missed {
        /// Events skipped.
        events: u64,
    },
    /// Nothing happened for a while; sent so that idle connections stay open (not part of the log).
    Keepalive,
    /// The context is unpacked and the Dockerfile parsed.
    Started {
        /// The build's id.
        build: String,
        /// Instructions in the Dockerfile.
        steps: u32,
        /// Files in the context (after `.dockerignore`).
        context_files: u64,
        /// Bytes of those files.
        context_bytes: u64,
    },
    /// A step begins.
    Step {
        /// 1-based number of the instruction.
        step: u32,
        /// The instruction as written.
        instruction: String,
    },
    /// Output of the step's process, as it comes (UTF-8, invalid bytes replaced).
    Output {
        /// The step.
        step: u32,
        /// Which stream.
        stream: OutputStream,
        /// The text.
        text: String,
    },
    /// Something worth knowing that is not output (an instruction nook ignores, an image being pulled).
    Notice {
        /// The step.
        step: u32,
        /// What happened.
        message: String,
    },
    /// A step ended.
    StepDone {
        /// The step.
        step: u32,
        /// Whether its result came from the build cache.
        cached: bool,
        /// The layer it added, if it added one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
        /// Seconds it took.
        seconds: f64,
    },
    /// The build succeeded: the image is stored under its name.
    Done {
        /// The image.
        image: Box<Image>,
        /// Seconds the whole build took.
        seconds: f64,
        /// Steps whose results came from the cache.
        cached_steps: u32,
    },
    /// The build failed or was cancelled (final).
    Error {
        /// What failed; for a failed `RUN`, the message names the exit code and ends with the last output lines.
        error: ApiError,
        /// The step that failed, if one did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
        /// The failed command's exit code.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code, such as `not_found` or `invalid_request`.
    pub code: String,
    /// A sentence saying what failed and why.
    pub message: String,
    /// The underlying cause, when there is one worth showing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Response of `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
    /// Server version.
    pub version: String,
}
