//! The nook runner: the part of nook that owns sandboxes on one host.
//!
//! The control plane talks to runners only through the [`Runner`] trait. [`LocalRunner`] implements it in-process
//! for a single-node `nook serve`; a remote runner (a later HTTP implementation for clusters) implements the same
//! trait. A runner keeps its own on-disk state for every sandbox (`sandboxes/<id>/state.json`), so that a restarted
//! server re-adopts the sandboxes that kept running without touching them.
//!
//! Modules: [`images`] (content-addressed layer store, safe layer unpacking, OCI archives), [`build`] (Dockerfile
//! builds in step sandboxes, with a layer cache), [`cgroups`] (v1/hybrid/v2 limits, usage and OOM watching),
//! [`disk`] (bounded measuring of a writable layer), [`storage`] (the volumes that hold writable layers: btrfs
//! subvolumes for copy-on-write forks, snapshots and disk quotas, plain directories elsewhere),
//! [`container`] (the container isolation backend: boots `nook-agent boot`), [`agent_client`] (the agent protocol
//! seen from the runner), [`local`] (the in-process runner tying them together), `template_start` (a template's start
//! command and readiness check, run on every start of a sandbox).

use std::collections::BTreeMap;
use std::pin::Pin;

use nook_api::{Image, ImagePruneResult, Resources, TransferEvent};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;
use tokio::sync::{broadcast, mpsc};

pub mod agent_client;
pub mod archive;
pub mod build;
pub mod cgroups;
pub mod container;
pub mod disk;
pub mod images;
mod kmsg;
pub mod local;
pub mod network;
pub mod storage;
mod template_start;

pub use agent_client::{ExecInput, ExecOutput, ExecStream};
pub use local::{LocalRunner, LocalRunnerConfig};

/// What a runner needs to build a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox id (validated by the control plane).
    pub id: String,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// Image name.
    pub image: String,
    /// Limits.
    pub resources: Resources,
    /// Environment for every process, on top of the image's.
    pub env: BTreeMap<String, String>,
    /// What it may reach on the network.
    #[serde(default)]
    pub network: nook_api::NetworkPolicy,
}

/// A process to run in a sandbox, as the control plane asks for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOptions {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment for this process only.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// User name or uid.
    pub user: Option<String>,
    /// Kill after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whether the caller will feed standard input.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (background processes only).
    pub pty: Option<nook_agent_proto::PtySize>,
    /// Bytes of output kept for replay (background processes only).
    pub output_buffer: Option<u64>,
}

/// Something that happened to a sandbox without a client asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerEvent {
    /// The kernel OOM-killed a process in the sandbox; `oom_kills` is the running total since the sandbox booted.
    Oom {
        /// Which sandbox.
        sandbox_id: String,
        /// Kernel's count of OOM kills in its cgroup.
        oom_kills: u64,
        /// The killed process's command name, as the kernel logged it (absent where the log cannot be read).
        victim: Option<String>,
    },
    /// The sandbox reached its memory limit and, as its `memory_max_mb` allows, the runner raised the limit instead
    /// of letting the kernel kill a process.
    MemoryGrown {
        /// Which sandbox.
        sandbox_id: String,
        /// The limit it reached, in MiB.
        from_mb: u64,
        /// The new limit, in MiB.
        to_mb: u64,
        /// The most it may grow to, in MiB.
        ceiling_mb: u64,
    },
    /// The sandbox's init exited on its own; the runner has cleaned up and the sandbox is stopped.
    InitExited {
        /// Which sandbox.
        sandbox_id: String,
    },
}

/// Why a runner operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The runner has no sandbox with this id.
    #[error("sandbox {0} does not exist on this runner")]
    NoSuchSandbox(String),
    /// The sandbox is not running.
    #[error("sandbox {0} is not running")]
    NotRunning(String),
    /// The sandbox already runs.
    #[error("sandbox {0} is already running")]
    AlreadyRunning(String),
    /// The sandbox is paused: its processes (the agent among them) are frozen until it is resumed.
    #[error("sandbox {0} is paused; resume it first")]
    Paused(String),
    /// An image operation failed.
    #[error(transparent)]
    Image(#[from] images::ImageError),
    /// A cgroup operation failed.
    #[error(transparent)]
    Cgroup(#[from] cgroups::CgroupError),
    /// Building the sandbox failed at a named step.
    #[error("booting sandbox {sandbox_id} failed: {message}")]
    Boot {
        /// Which sandbox.
        sandbox_id: String,
        /// Which step failed and why.
        message: String,
    },
    /// A template's start command did not become ready (it exited, or its readiness check never passed); the
    /// sandbox was stopped.
    #[error("sandbox {sandbox_id} did not start: {message}")]
    NotReady {
        /// Which sandbox.
        sandbox_id: String,
        /// What the start command and its readiness check did.
        message: String,
    },
    /// The agent refused a process operation (unknown pid, closed stdin, program not found...).
    #[error("{message}")]
    Process {
        /// The agent's stable code: `no_such_process`, `stdin_closed`, `spawn_failed`, `no_such_user`, `bad_cwd`.
        code: String,
        /// What went wrong.
        message: String,
    },
    /// The sandbox's agent did not answer.
    #[error("the agent of sandbox {sandbox_id} did not answer")]
    Agent {
        /// Which sandbox.
        sandbox_id: String,
        /// The protocol or socket error.
        #[source]
        source: nook_agent_proto::ProtocolError,
    },
    /// A Dockerfile build failed.
    #[error(transparent)]
    Build(#[from] build::BuildError),
    /// A volume operation failed, or the storage cannot do what was asked (a disk quota without btrfs).
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    /// Archiving or restoring a writable layer failed.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// Setting up a sandbox's network failed.
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    /// A new limit is below what the sandbox uses now.
    #[error("{0}")]
    BelowUsage(String),
    /// Nothing accepted a connection to a port inside the sandbox.
    #[error("nothing in sandbox {sandbox_id} accepts connections on port {port}")]
    PortClosed {
        /// Which sandbox.
        sandbox_id: String,
        /// Which port.
        port: u16,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// A file operation on the runner's own state failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: std::path::PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

/// `error: cause: cause` in one line: the error and its whole chain of sources.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A byte stream handed to the runner (an image archive being uploaded).
pub type ByteStream = Pin<Box<dyn AsyncRead + Send>>;

/// Size of the chunks [`produced_stream`] hands over.
const PRODUCED_CHUNK: usize = 1 << 16;

/// A byte stream that `produce` writes on a blocking thread (a tar being packed). A failure of `produce` is an error
/// of the stream, so whoever reads it sees a broken stream rather than a short one that looks whole.
pub fn produced_stream(
    produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send + 'static,
) -> ByteStream {
    let (sender, receiver) = mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut writer = std::io::BufWriter::with_capacity(PRODUCED_CHUNK, ChannelWriter(sender.clone()));
        let result = produce(&mut writer).and_then(|()| std::io::Write::flush(&mut writer));
        if let Err(error) = result {
            let _ = sender.blocking_send(Err(error));
        }
    });
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    Box::pin(tokio_util::io::StreamReader::new(chunks))
}

/// A writer that hands what it is given to an async reader, chunk by chunk.
struct ChannelWriter(mpsc::Sender<std::io::Result<bytes::Bytes>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(bytes::Bytes::copy_from_slice(data)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the reader went away"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The seam between the control plane and the hosts that run sandboxes.
#[async_trait::async_trait]
pub trait Runner: Send + Sync + 'static {
    /// A one-line description of the runner and its host (for logs).
    fn describe(&self) -> String;

    /// All images on this runner.
    async fn list_images(&self) -> Result<Vec<Image>, RunnerError>;
    /// One image by name.
    async fn image(&self, name: &str) -> Result<Image, RunnerError>;
    /// Imports an image archive (OCI image layout or `docker save`) or a root filesystem tar, plain, gzip or zstd,
    /// as image `name`.
    async fn import_image(&self, name: &str, archive: ByteStream) -> Result<Image, RunnerError>;
    /// Pulls an image from a registry, naming it `name` (default: the reference), reporting progress on `events`.
    /// The local name a pull of `reference` gives its image when no name is asked for.
    fn image_name_for(&self, reference: &str) -> Result<String, RunnerError>;
    /// Pulls an image from a registry.
    async fn pull_image(
        &self,
        reference: &str,
        name: Option<&str>,
        events: mpsc::Sender<TransferEvent>,
    ) -> Result<Image, RunnerError>;
    /// Pushes the stored image `name` to a registry reference, reporting progress on `events`.
    async fn push_image(
        &self,
        name: &str,
        reference: &str,
        events: mpsc::Sender<TransferEvent>,
    ) -> Result<Image, RunnerError>;
    /// Removes unnamed images and the layers that no image and no sandbox of this runner uses.
    async fn prune_images(&self) -> Result<ImagePruneResult, RunnerError>;
    /// Gives the image `source` the additional name `target`.
    async fn tag_image(&self, source: &str, target: &str) -> Result<Image, RunnerError>;
    /// Removes an image name.
    async fn remove_image(&self, name: &str) -> Result<(), RunnerError>;
    /// Writes a stored image out as the tar of an OCI image layout, streamed as it is made (an import of it gives
    /// the same image back, under any name).
    async fn export_image(&self, name: &str) -> Result<ByteStream, RunnerError>;
    /// Builds an image from a Dockerfile in the tar stream `context`, reporting progress on `events`; stops (and
    /// leaves nothing) when `cancel` fires.
    async fn build_image(
        &self,
        spec: build::BuildSpec,
        context: ByteStream,
        events: mpsc::Sender<nook_api::BuildEvent>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<Image, RunnerError>;

    /// Builds a new sandbox and starts it. On failure nothing of it is left on the host.
    async fn create_sandbox(&self, spec: SandboxSpec) -> Result<(), RunnerError>;
    /// Starts a stopped sandbox with its files as they were.
    async fn start_sandbox(&self, id: &str) -> Result<(), RunnerError>;
    /// Stops a sandbox: every process is killed, the files stay.
    async fn stop_sandbox(&self, id: &str) -> Result<(), RunnerError>;
    /// Pauses a running sandbox: every process is frozen where it is (using no CPU) until it is resumed. Pausing a
    /// paused sandbox does nothing.
    async fn pause_sandbox(&self, id: &str) -> Result<(), RunnerError>;
    /// Resumes a paused sandbox: its processes continue exactly where they were. Resuming a running sandbox does
    /// nothing.
    async fn resume_sandbox(&self, id: &str) -> Result<(), RunnerError>;
    /// Makes the image `name` from a sandbox's files: its image's layers and one more with what the sandbox changed.
    /// A running sandbox is frozen for the moment its files are captured, so the image is consistent.
    async fn snapshot_sandbox(&self, id: &str, name: &str) -> Result<Image, RunnerError>;
    /// Makes and starts new sandboxes (one per spec) from a sandbox's files as they are now, copy-on-write where the
    /// storage allows; a running source is frozen only while they are copied, and goes on. All are made or none.
    /// Returns how long the source was frozen.
    async fn fork_sandbox(&self, id: &str, forks: Vec<SandboxSpec>) -> Result<std::time::Duration, RunnerError>;
    /// Changes a sandbox's limits; a running or paused sandbox's at once, without a restart. A memory limit or disk
    /// quota below what it uses now is refused with [`RunnerError::BelowUsage`].
    async fn update_resources(&self, id: &str, resources: Resources) -> Result<(), RunnerError>;
    /// Sets a sandbox's network policy; a running or paused sandbox's is in force for its next packet (a switch to
    /// or from `none` removes or adds its interface).
    async fn update_network(&self, id: &str, policy: nook_api::NetworkPolicy) -> Result<(), RunnerError>;
    /// A running sandbox's IPv4 address, if it has a network interface.
    async fn address(&self, id: &str) -> Option<std::net::Ipv4Addr>;
    /// A TCP connection to `port` on the loopback interface of a running sandbox's own network (so servers bound
    /// to 127.0.0.1 are reached too, and sandboxes without an interface as well): how the preview proxy reaches it.
    async fn connect_port(&self, id: &str, port: u16) -> Result<tokio::net::TcpStream, RunnerError>;
    /// Moves a stopped sandbox's writable layer to the archive store and frees its local disk; starting it brings the
    /// layer back (hash checked). Archiving an archived sandbox answers what was recorded.
    async fn archive_sandbox(&self, id: &str) -> Result<archive::ArchivedLayer, RunnerError>;
    /// Stops (if needed) and removes everything of a sandbox. Removing an unknown sandbox succeeds.
    async fn delete_sandbox(&self, id: &str) -> Result<(), RunnerError>;
    /// Runs a process in a running sandbox and streams it.
    async fn exec(&self, id: &str, options: ExecOptions) -> Result<ExecStream, RunnerError>;
    /// Starts a background process that outlives any connection; returns its pid.
    async fn spawn(&self, id: &str, options: ExecOptions) -> Result<u32, RunnerError>;
    /// Streams a background process's output from `offset`; with `hold`, a follower that lags holds the process back
    /// instead of missing output (see `nook_agent_proto::Request::Attach`).
    async fn attach(
        &self,
        id: &str,
        pid: u32,
        offset: u64,
        follow: bool,
        hold: bool,
    ) -> Result<ExecStream, RunnerError>;
    /// Waits for a background process to end.
    async fn wait(&self, id: &str, pid: u32) -> Result<nook_agent_proto::Exit, RunnerError>;
    /// Writes to a background process's standard input (and closes it with `close`).
    async fn input(&self, id: &str, pid: u32, data: Vec<u8>, close: bool) -> Result<(), RunnerError>;
    /// Resizes a background process's terminal.
    async fn resize(&self, id: &str, pid: u32, size: nook_agent_proto::PtySize) -> Result<(), RunnerError>;
    /// Signals a background process.
    async fn signal(&self, id: &str, pid: u32, signal: i32) -> Result<(), RunnerError>;
    /// The sandbox's background processes.
    async fn processes(&self, id: &str) -> Result<Vec<nook_agent_proto::ProcessInfo>, RunnerError>;
    /// Reads a file: its metadata, and its bytes as a bounded stream.
    async fn read_file(
        &self,
        id: &str,
        path: &str,
    ) -> Result<(nook_agent_proto::FileStat, agent_client::FileChunks), RunnerError>;
    /// Writes a file from a byte stream as `write` says (path, mode, owner of the file and of any directories
    /// created for it, user metadata); it appears whole or not at all.
    async fn write_file(
        &self,
        id: &str,
        write: nook_agent_proto::FileWrite,
        body: ByteStream,
    ) -> Result<nook_agent_proto::FileStat, RunnerError>;
    /// Packs a file or directory tree as a tar stream (symlinks kept as links).
    async fn read_archive(
        &self,
        id: &str,
        path: &str,
    ) -> Result<(nook_agent_proto::FileStat, agent_client::FileChunks), RunnerError>;
    /// Unpacks a tar stream into the directory `path`, everything owned by `owner` (root when absent).
    async fn write_archive(
        &self,
        id: &str,
        path: &str,
        parents: bool,
        owner: Option<(u32, u32)>,
        body: ByteStream,
    ) -> Result<nook_agent_proto::ArchiveWritten, RunnerError>;
    /// Watches a directory; the watch is in place when this returns and lasts until the receiver is dropped.
    async fn watch(&self, id: &str, path: &str, recursive: bool) -> Result<agent_client::WatchEvents, RunnerError>;
    /// A file operation answered with one JSON value (stat, list, mkdir, move, remove).
    async fn file_call(&self, id: &str, request: nook_agent_proto::Request) -> Result<serde_json::Value, RunnerError>;
    /// What a running sandbox uses now: CPU time, memory, processes, and the disk its writable layer takes.
    async fn stats(&self, id: &str) -> Result<nook_api::SandboxStats, RunnerError>;
    /// The CPU time a running sandbox's processes have used in this run, in nanoseconds (a cgroup read, no more).
    async fn cpu_time(&self, id: &str) -> Result<u64, RunnerError>;
    /// Every running or paused sandbox's usage, cheaply (disk as last measured in the background): for `/metrics`.
    async fn meters(&self) -> Vec<(String, nook_api::SandboxStats)>;
    /// Ids of the sandboxes whose processes are running now (including those re-adopted after a restart).
    async fn running_sandboxes(&self) -> Vec<String>;
    /// Events about sandboxes that happen without a request (OOM kills, init exits).
    fn subscribe(&self) -> broadcast::Receiver<RunnerEvent>;
    /// Follows the egress decisions (by name) of the runner's resolver and egress proxy; `None` without networking.
    fn egress_decisions(&self) -> Option<broadcast::Receiver<network::EgressDecision>>;
}

/// Builds an [`ExecStream`] from channels; used by runner implementations and test doubles.
pub fn exec_stream(events: mpsc::Receiver<ExecOutput>, input: mpsc::Sender<ExecInput>) -> ExecStream {
    ExecStream { events, input }
}
