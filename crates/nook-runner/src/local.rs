//! The in-process runner used by a single-node `nook serve`.
//!
//! State on disk, under the runner's directory:
//! ```text
//! images/ layers/ names.json     the image store (see `images`)
//! sandboxes/<id>/state.json      spec, image layers and config, and the init process while running
//! sandboxes/<id>/fs/upper, work  the writable layer and overlayfs work dir, in one volume (a btrfs subvolume where
//!                                the storage is btrfs: see `storage`); sandboxes made before volumes keep them in
//!                                sandboxes/<id>/upper, work
//! sandboxes/<id>/rootfs          mount point of the root (mounted only inside the sandbox's mount namespace)
//! sandboxes/<id>/agent.sock      the agent's socket, reachable only from the host
//! ```
//! Every operation on one sandbox holds that sandbox's operation lock, so create, start, stop and delete never
//! interleave. A monitor task per running sandbox waits on the init's pidfd and on OOM events; when the init exits
//! without being asked to, it cleans up and reports [`RunnerEvent::InitExited`].
//!
//! On open, the runner becomes a child subreaper (so sandbox inits, whose boot process exits, are its children and
//! get reaped), then re-adopts every sandbox whose recorded init is still alive (same pid and start time).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nook_agent_proto::{ExecSpec, ProtocolError, Request};
use nook_api::{Image, ImageConfig, ImagePruneResult, Resources, TransferEvent};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use crate::agent_client;
use crate::build::{BuildSpec, BUILD_SANDBOX_PREFIX};
use crate::cgroups::{CgroupHost, SandboxCgroup};
use crate::container::{
    kill_and_reap, process_start_time, BootRequest, ContainerBackend, InitProcess, IsolationBackend, PidFd,
};
use crate::images::registry::{Registries, RegistryConfig};
use crate::images::{write_atomically, ImageError, ImageStore, LayerPin};
use crate::network::{Attachment, Network};
use crate::storage::Storage;
use crate::{ByteStream, ExecOptions, ExecStream, Runner, RunnerError, RunnerEvent, SandboxSpec};

/// How long the freshly booted agent has to answer its first ping.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a killed init has to finish exiting.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the metering task reads each running sandbox's memory (the kernel keeps a peak, not an average).
const METER_INTERVAL: Duration = Duration::from_secs(10);
/// Every how many memory readings the metering task also measures each sandbox's disk.
const DISK_EVERY: u64 = 6;
/// Longest Unix socket path the kernel accepts (sun_path minus the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where a local runner keeps its state and finds the agent.
#[derive(Debug, Clone)]
pub struct LocalRunnerConfig {
    /// Directory for images and sandboxes.
    pub dir: PathBuf,
    /// The static `nook-agent` binary.
    pub agent_binary: PathBuf,
    /// How to reach image registries.
    pub registries: RegistryConfig,
    /// Where archived writable layers go.
    pub archive: crate::archive::ArchiveStore,
    /// How sandboxes are networked; without it they have only loopback.
    pub network: Option<crate::network::NetworkConfig>,
}

/// A sandbox's record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxRecord {
    spec: SandboxSpec,
    lower_dirs: Vec<PathBuf>,
    image_config: ImageConfig,
    init: Option<InitProcess>,
    /// Whether its processes are frozen (written before a freeze and after a thaw, so that a crash in between is
    /// settled the safe way when the sandbox is adopted again).
    #[serde(default)]
    paused: bool,
    /// Where its writable layer is while it is archived (absent: on local disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    archived: Option<crate::archive::ArchivedLayer>,
    /// Its place on the network while it runs with an interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    network: Option<Attachment>,
}

/// Readings the metering task keeps for a running sandbox.
#[derive(Debug, Default, Clone, Copy)]
struct Meter {
    /// Sum of its memory readings, and how many there were.
    memory_sum: u128,
    memory_readings: u64,
    /// Its last disk reading.
    disk: Option<crate::disk::DiskUsage>,
}

/// A running sandbox.
struct Live {
    record: SandboxRecord,
    /// The init, pinned: signals through it never reach a process that reused the pid.
    pidfd: Arc<PidFd>,
    stopping: AtomicBool,
    /// Its processes are frozen: requests that need the agent are refused until it is resumed.
    paused: AtomicBool,
    /// Its limits now (changed by resizes while it runs).
    resources: Mutex<Resources>,
    /// What the metering task has read of it during this run.
    meter: Mutex<Meter>,
    /// Its place on the network now (policy changes may add or remove its interface).
    network: Mutex<Option<Attachment>>,
    exited: watch::Receiver<bool>,
}

/// How long a connection to a sandbox's port may take to be accepted.
const PORT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Inner {
    dir: PathBuf,
    images: Arc<ImageStore>,
    storage: Storage,
    archive: crate::archive::ArchiveStore,
    registries: Arc<Registries>,
    cgroups: CgroupHost,
    backend: Box<dyn IsolationBackend>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Held for every read-modify-write of a sandbox's record (the OOM monitor writes without the operation lock).
    record_writes: Mutex<()>,
    oom_victims: Arc<crate::kmsg::OomVictims>,
    network: Option<Arc<Network>>,
    op_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: broadcast::Sender<RunnerEvent>,
}

/// The in-process runner.
#[derive(Clone)]
pub struct LocalRunner {
    inner: Arc<Inner>,
}

impl LocalRunner {
    /// Opens the runner's state, re-adopting sandboxes that are still running.
    pub async fn open(config: LocalRunnerConfig) -> Result<Self, RunnerError> {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag and has no memory-safety preconditions.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(RunnerError::Io {
                action: "becoming a child subreaper for",
                path: config.dir.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        // Sandboxes' files are owned by their (real) root users and may be setuid: no host user may reach them.
        let sandboxes = config.dir.join("sandboxes");
        std::fs::create_dir_all(&sandboxes)
            .and_then(|()| std::fs::set_permissions(&config.dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| RunnerError::Io {
                action: "creating",
                path: sandboxes.clone(),
                source,
            })?;
        let images = Arc::new(ImageStore::open(&config.dir)?);
        let storage = Storage::detect(&sandboxes)?;
        let registries = Arc::new(Registries::new(config.registries).map_err(ImageError::from)?);
        let cgroups = CgroupHost::detect()?;
        let backend = Box::new(ContainerBackend::new(&config.agent_binary)?);
        let network = match config.network {
            Some(network) => Some(Network::open(network).await?),
            None => None,
        };
        let (events, _) = broadcast::channel(1024);
        let runner = Self {
            inner: Arc::new(Inner {
                dir: config.dir,
                images,
                storage,
                archive: config.archive,
                registries,
                cgroups,
                backend,
                live: Mutex::new(HashMap::new()),
                record_writes: Mutex::new(()),
                oom_victims: crate::kmsg::OomVictims::start(),
                network,
                op_locks: Mutex::new(HashMap::new()),
                events,
            }),
        };
        runner.adopt_all().await?;
        runner.start_metering();
        // Scratch directories of builds a crash interrupted.
        let _ = std::fs::remove_dir_all(runner.inner.dir.join("builds"));
        Ok(runner)
    }

    /// The directory of a sandbox.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.inner.dir.join("sandboxes").join(id)
    }

    /// The volume that holds a sandbox's writable layer and overlayfs work dir.
    fn volume_dir(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("fs")
    }

    /// The directory that holds a sandbox's `upper` and `work`: its volume, or the sandbox directory itself for a
    /// sandbox made before volumes.
    fn layer_parent(&self, id: &str) -> PathBuf {
        let volume = self.volume_dir(id);
        if volume.is_dir() {
            volume
        } else {
            self.sandbox_dir(id)
        }
    }

    /// A sandbox's writable layer.
    fn upper_dir(&self, id: &str) -> PathBuf {
        self.layer_parent(id).join("upper")
    }

    /// Imports an image from a local file without going through HTTP (used for the built-in `base` image).
    pub async fn import_image_file(&self, name: &str, path: &Path, config: ImageConfig) -> Result<Image, RunnerError> {
        let file = std::fs::File::open(path).map_err(|source| RunnerError::Io {
            action: "opening",
            path: path.to_path_buf(),
            source,
        })?;
        let inner = self.inner.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || inner.images.import(&name, file, config))
            .await
            .expect("import task does not panic")
            .map_err(RunnerError::from)
    }

    /// Builds a sandbox from layers (lowest first) and a config, and starts it; on failure nothing of it is left.
    pub(crate) async fn create_from_layers(
        &self,
        spec: SandboxSpec,
        layers: &[String],
        image_config: ImageConfig,
    ) -> Result<(), RunnerError> {
        let lock = self.op_lock(&spec.id);
        let _guard = lock.lock().await;
        let record = SandboxRecord {
            lower_dirs: layers
                .iter()
                .rev()
                .map(|layer| self.inner.images.layer_dir(layer))
                .collect(),
            image_config,
            init: None,
            paused: false,
            archived: None,
            network: None,
            spec,
        };
        self.prepare(&record, None)?;
        let id = record.spec.id.clone();
        let result = self.boot_and_start(record).await;
        if result.is_err() {
            self.remove_sandbox_files(&id);
        }
        result
    }

    /// Makes a sandbox's directory, its volume (empty, or a copy of `copy_of`), its disk quota and its record; on
    /// failure nothing of it is left. Blocking, but quick (a subvolume snapshot is copy-on-write): the caller holds
    /// the sandbox's operation lock.
    fn prepare(&self, record: &SandboxRecord, copy_of: Option<&Path>) -> Result<(), RunnerError> {
        let id = &record.spec.id;
        let dir = self.sandbox_dir(id);
        if dir.exists() {
            return Err(RunnerError::AlreadyRunning(id.clone()));
        }
        let storage = &self.inner.storage;
        let volume = self.volume_dir(id);
        let made = (|| -> Result<(), RunnerError> {
            let io = |action: &'static str, path: &Path| {
                let path = path.to_path_buf();
                move |source| RunnerError::Io { action, path, source }
            };
            std::fs::create_dir_all(dir.join("rootfs")).map_err(io("creating", &dir))?;
            std::fs::write(
                dir.join("hosts"),
                format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                    record.spec.hostname
                ),
            )
            .map_err(io("writing", &dir.join("hosts")))?;
            match copy_of {
                Some(source) => storage.clone_volume(source, &volume)?,
                None => {
                    storage.create_volume(&volume)?;
                    for sub in ["upper", "work"] {
                        std::fs::create_dir(volume.join(sub)).map_err(io("creating", &volume.join(sub)))?;
                    }
                }
            }
            // A new volume (or snapshot) has no limit of its own; quotas are switched on only when one is asked for,
            // because btrfs accounts every write of the filesystem once they are on.
            if let Some(mb) = record.spec.resources.disk_mb {
                storage.set_quota(&volume, Some(mb * MIB))?;
            }
            self.write_record(id, record)
        })();
        if made.is_err() {
            self.remove_sandbox_files(id);
        }
        made
    }

    /// Removes a stopped sandbox's writable layer and overlayfs work dir from local disk (its volume, or the
    /// directories of a sandbox made before volumes). Blocking.
    fn remove_layer_files(&self, id: &str) -> Result<(), RunnerError> {
        let volume = self.volume_dir(id);
        let paths = if volume.is_dir() {
            vec![volume]
        } else {
            vec![self.sandbox_dir(id).join("upper"), self.sandbox_dir(id).join("work")]
        };
        for path in paths {
            self.inner.storage.remove_tree(&path)?;
        }
        Ok(())
    }

    /// Brings an archived sandbox's writable layer back into a fresh volume (hash checked), records it local again,
    /// then removes the archive. On failure the sandbox stays archived and nothing local is left.
    async fn restore(&self, record: &mut SandboxRecord) -> Result<(), RunnerError> {
        let id = record.spec.id.clone();
        let archived = record.archived.clone().expect("called for archived sandboxes");
        let restoring = self.sandbox_dir(&id).join("fs.restoring");
        let runner = self.clone();
        let (id_owned, restoring_owned) = (id.clone(), restoring.clone());
        tokio::task::spawn_blocking(move || -> Result<(), RunnerError> {
            // Left by a crash: an earlier attempt, or the local copy an archive had not removed yet.
            runner.inner.storage.remove_tree(&restoring_owned)?;
            runner.remove_layer_files(&id_owned)?;
            runner.inner.storage.create_volume(&restoring_owned)?;
            for sub in ["upper", "work"] {
                std::fs::create_dir(restoring_owned.join(sub)).map_err(|source| RunnerError::Io {
                    action: "creating",
                    path: restoring_owned.join(sub),
                    source,
                })?;
            }
            Ok(())
        })
        .await
        .expect("preparing does not panic")?;
        if let Err(error) = self.inner.archive.download(&archived, &restoring.join("upper")).await {
            let _ = self.inner.storage.remove_tree(&restoring);
            return Err(error.into());
        }
        let volume = self.volume_dir(&id);
        std::fs::rename(&restoring, &volume).map_err(|source| RunnerError::Io {
            action: "moving the restored layer into",
            path: volume.clone(),
            source,
        })?;
        if let Some(mb) = record.spec.resources.disk_mb {
            self.inner.storage.set_quota(&volume, Some(mb * MIB))?;
        }
        {
            let _writing = self.inner.record_writes.lock().expect("record writes");
            record.archived = None;
            self.write_record(&id, record)?;
        }
        if let Err(error) = self.inner.archive.remove(&archived.key).await {
            tracing::warn!(sandbox = %id, error = %crate::error_chain(&error), "removing a restored archive failed; it is left in the store");
        }
        tracing::info!(sandbox = %id, bytes = archived.bytes, "restored the writable layer from its archive");
        Ok(())
    }

    /// Removes a sandbox's directory and volume (logged, not returned: this is the undo of a failed step).
    fn remove_sandbox_files(&self, id: &str) {
        if let Err(error) = self.inner.storage.remove_tree(&self.sandbox_dir(id)) {
            tracing::error!(sandbox = %id, error = %crate::error_chain(&error), "removing a sandbox's files failed");
        }
    }

    /// Boots a sandbox, then starts its template's start command and waits until it is ready; a sandbox whose
    /// start command does not become ready is stopped again. Called with the sandbox's operation lock held.
    async fn boot_and_start(&self, record: SandboxRecord) -> Result<(), RunnerError> {
        let id = record.spec.id.clone();
        let start = record.image_config.start.clone();
        self.boot(record).await?;
        let Some(start) = start else { return Ok(()) };
        let started = crate::template_start::start_and_wait(self, &id, &start).await;
        if started.is_err() {
            if let Err(error) = self.stop_locked(&id).await {
                tracing::error!(sandbox = %id, error = %crate::error_chain(&error), "stopping a sandbox whose start command failed");
            }
        }
        started
    }

    /// The scratch directory of a build (its unpacked context).
    pub(crate) fn build_scratch_dir(&self, build_id: &str) -> PathBuf {
        self.inner.dir.join("builds").join(build_id)
    }

    /// Keeps a layer from garbage collection while a build uses it.
    pub(crate) fn pin_layer(&self, diff_id: &str) -> LayerPin {
        self.inner.images.pin(diff_id)
    }

    fn build_cache_path(&self, key: &str) -> PathBuf {
        self.inner.dir.join("build-cache").join(key)
    }

    /// The build cache's result for a step key: `Some(None)` for a step that added no layer, `Some(Some(layer))`
    /// when its layer is still in the store (pinned first, so that a prune cannot take it after the check), `None`
    /// for a miss.
    pub(crate) fn cached_layer(&self, key: &str) -> Option<Option<(String, LayerPin)>> {
        let text = std::fs::read_to_string(self.build_cache_path(key)).ok()?;
        let layer: Option<String> = serde_json::from_str(&text).ok()?;
        match layer {
            Some(layer) => {
                let pin = self.inner.images.pin(&layer);
                self.inner
                    .images
                    .layer_dir(&layer)
                    .is_dir()
                    .then_some(Some((layer, pin)))
            }
            None => Some(None),
        }
    }

    /// Removes the build cache's entries whose layer is gone (after a prune): they could only ever miss.
    fn forget_pruned_cache_entries(&self) {
        let Ok(entries) = std::fs::read_dir(self.inner.dir.join("build-cache")) else {
            return;
        };
        for entry in entries.flatten() {
            let layer = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|text| serde_json::from_str::<Option<String>>(&text).ok());
            let stale = match layer {
                Some(Some(layer)) => !self.inner.images.layer_dir(&layer).is_dir(),
                Some(None) => false,
                None => true,
            };
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Records a step's result in the build cache (a failure to record only costs a later rebuild).
    pub(crate) fn remember_layer(&self, key: &str, layer: Option<&str>) {
        let path = self.build_cache_path(key);
        let written = std::fs::create_dir_all(path.parent().expect("cache entries have a directory"))
            .map_err(|source| ImageError::Io {
                action: "creating",
                path: path.clone(),
                source,
            })
            .and_then(|()| write_atomically(&path, serde_json::to_string(&layer).expect("serializable").as_bytes()));
        if let Err(error) = written {
            tracing::warn!(error = %crate::error_chain(&error), "recording a build step in the cache failed");
        }
    }

    /// Turns the writable layer of a stopped sandbox into a layer of the store (moved, not copied); `None` when the
    /// sandbox changed nothing. The layer stays pinned as long as the returned pin lives.
    pub(crate) async fn commit_upper(&self, id: &str) -> Result<Option<(String, LayerPin)>, RunnerError> {
        let runner = self.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            let scratch = runner.capture_layer(&id, false)?;
            runner.layer_from_capture(scratch)
        })
        .await
        .expect("committing a layer does not panic")
    }

    /// Puts a sandbox's writable layer into the store's scratch area, as a copy (`keep`: copy-on-write where the
    /// storage allows) or by moving it (the sandbox is about to be removed). Returns where it is, in overlayfs form:
    /// finish with [`Self::layer_from_capture`]. Blocking.
    fn capture_layer(&self, id: &str, keep: bool) -> Result<PathBuf, RunnerError> {
        let scratch = self.inner.images.scratch_path();
        let volume = self.volume_dir(id);
        let (source, is_volume) = if volume.is_dir() {
            (volume, true)
        } else {
            (self.sandbox_dir(id).join("upper"), false)
        };
        if keep {
            self.inner.storage.clone_volume(&source, &scratch)?;
        } else {
            std::fs::rename(&source, &scratch).map_err(|source_error| RunnerError::Io {
                action: "moving into the layer store",
                path: source.clone(),
                source: source_error,
            })?;
        }
        if is_volume {
            if let Err(error) = hoist_upper(&scratch) {
                let _ = self.inner.storage.remove_tree(&scratch);
                return Err(RunnerError::Io {
                    action: "taking the writable layer out of",
                    path: scratch,
                    source: error,
                });
            }
        }
        Ok(scratch)
    }

    /// Makes a captured writable layer a layer of the store (hashing it for its id); `None` when it is empty.
    /// Blocking.
    fn layer_from_capture(&self, scratch: PathBuf) -> Result<Option<(String, LayerPin)>, RunnerError> {
        Ok(self.inner.images.adopt_directory(scratch)?)
    }

    /// Stores a built image under `name`.
    pub(crate) fn commit_built_image(
        &self,
        name: &str,
        layers: Vec<String>,
        config: ImageConfig,
    ) -> Result<Image, RunnerError> {
        Ok(self.inner.images.commit_layers(name, layers, config)?)
    }

    async fn adopt_all(&self) -> Result<(), RunnerError> {
        let dir = self.inner.dir.join("sandboxes");
        let entries = std::fs::read_dir(&dir).map_err(|source| RunnerError::Io {
            action: "listing",
            path: dir,
            source,
        })?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().to_string();
            if id.starts_with(BUILD_SANDBOX_PREFIX) {
                // A step sandbox of a build that a crash interrupted: the build is gone, so is the sandbox.
                tracing::warn!(sandbox = %id, "removing the step sandbox of an interrupted build");
                self.clean_after_exit(&id);
                if let Ok(record) = self.read_record(&id) {
                    if let Some(init) = record.init {
                        if PidFd::open(init.pid).is_ok() && process_start_time(init.pid) == Some(init.start_time) {
                            kill_and_reap(init.pid).await;
                        }
                    }
                }
                self.remove_sandbox_files(&id);
                continue;
            }
            let Ok(mut record) = self.read_record(&id) else {
                tracing::warn!(sandbox = %id, "ignoring a sandbox directory without a readable state.json");
                continue;
            };
            let Some(init) = record.init else { continue };
            // Pin the pid first, then check it is still the same process (start time), so a recycled pid cannot be
            // adopted.
            if let Ok(pidfd) = PidFd::open(init.pid) {
                if process_start_time(init.pid) == Some(init.start_time) {
                    let cgroup = self.inner.cgroups.existing(&id);
                    // The freezer is settled as the record says: a crash between the record and the freeze (or the
                    // thaw) leaves them apart.
                    if let Err(error) = cgroup.set_frozen(record.paused).await {
                        if record.paused {
                            tracing::warn!(sandbox = %id, %error, "freezing a paused sandbox again failed; it runs");
                            record.paused = false;
                            self.write_record(&id, &record)?;
                        }
                    }
                    if let (Some(network), Some(attachment)) = (&self.inner.network, record.network) {
                        if let Err(error) = network.adopt(&id, attachment, &record.spec.network) {
                            tracing::error!(sandbox = %id, %error, "the adopted sandbox's egress policy could not be loaded");
                        }
                    }
                    self.watch(record, pidfd, cgroup);
                    tracing::info!(sandbox = %id, pid = init.pid, "re-adopted running sandbox");
                    continue;
                }
            }
            tracing::warn!(sandbox = %id, "the sandbox's init is gone; cleaning up its leftovers");
            self.clean_after_exit(&id);
            record.init = None;
            record.network = None;
            self.write_record(&id, &record)?;
        }
        Ok(())
    }

    fn op_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.inner
            .op_locks
            .lock()
            .expect("op locks")
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("state.json")
    }

    fn read_record(&self, id: &str) -> Result<SandboxRecord, RunnerError> {
        let path = self.record_path(id);
        let bytes = std::fs::read(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                RunnerError::NoSuchSandbox(id.to_string())
            } else {
                RunnerError::Io {
                    action: "reading",
                    path: path.clone(),
                    source,
                }
            }
        })?;
        serde_json::from_slice(&bytes).map_err(|error| RunnerError::Io {
            action: "parsing",
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
        })
    }

    fn write_record(&self, id: &str, record: &SandboxRecord) -> Result<(), RunnerError> {
        let bytes = serde_json::to_vec_pretty(record).expect("record serializes");
        write_atomically(&self.record_path(id), &bytes).map_err(RunnerError::from)
    }

    fn socket_path(&self, id: &str) -> PathBuf {
        self.sandbox_dir(id).join("agent.sock")
    }

    /// Removes what a sandbox's run leaves on the host: any process still in its cgroup, the cgroup, the socket.
    /// Blocking (it may wait for killed processes to finish exiting): call from a blocking thread.
    fn clean_after_exit(&self, id: &str) {
        // The callers clear the record's attachment when they clear its init; a second detach of the same one does
        // nothing, because the network frees an address only for the sandbox that holds it.
        if let (Some(network), Ok(record)) = (&self.inner.network, self.read_record(id)) {
            if let Some(attachment) = record.network {
                network.detach(id, attachment);
            }
        }
        let cgroup = self.inner.cgroups.existing(id);
        if cgroup.exists() {
            cgroup.kill_all();
            // Frozen processes die of the SIGKILL only once thawed.
            cgroup.thaw();
            if let Err(error) = cgroup.remove() {
                tracing::error!(sandbox = %id, error = %error, "removing the sandbox's cgroup failed");
            }
        }
        let _ = std::fs::remove_file(self.socket_path(id));
    }

    /// [`Self::clean_after_exit`] on a blocking thread.
    async fn clean_after_exit_async(&self, id: &str) {
        let runner = self.clone();
        let id = id.to_string();
        let _ = tokio::task::spawn_blocking(move || runner.clean_after_exit(&id)).await;
    }

    /// Boots a sandbox whose directory and record exist; on failure nothing of the run is left.
    async fn boot(&self, mut record: SandboxRecord) -> Result<(), RunnerError> {
        let id = record.spec.id.clone();
        // A sandbox boots running, whatever its last run was.
        record.paused = false;
        let dir = self.sandbox_dir(&id);
        let socket_path = self.socket_path(&id);
        if socket_path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RunnerError::Io {
                action: "creating the agent socket",
                path: socket_path,
                source: std::io::Error::other("the path is too long for a Unix socket; use a shorter --data-dir"),
            });
        }
        if let Some(network) = &self.inner.network {
            let path = dir.join("resolv.conf");
            std::fs::write(&path, network.resolv_conf()).map_err(|source| RunnerError::Io {
                action: "writing",
                path,
                source,
            })?;
        }
        let cgroup = self.inner.cgroups.create(&id, &record.spec.resources)?;
        let request = BootRequest {
            sandbox_id: id.clone(),
            hostname: record.spec.hostname.clone(),
            lower_dirs: record.lower_dirs.clone(),
            upper_dir: self.layer_parent(&id).join("upper"),
            work_dir: self.layer_parent(&id).join("work"),
            rootfs_dir: dir.join("rootfs"),
            socket_path: socket_path.clone(),
            cgroup_procs: cgroup.procs_files(),
            hosts_file: Some(dir.join("hosts")),
            resolv_conf: self.inner.network.is_some().then(|| dir.join("resolv.conf")),
        };
        let init = match self.inner.backend.boot(&request).await {
            Ok(init) => init,
            Err(error) => {
                self.clean_after_exit_async(&id).await;
                return Err(error);
            }
        };
        // Record the init before anything else can fail, so that a crash from here on leaves a record that the
        // next start adopts or cleans up, never an unknown process.
        record.init = Some(init);
        let pidfd = PidFd::open(init.pid).map_err(|source| RunnerError::Io {
            action: "watching the init of",
            path: dir.clone(),
            source,
        });
        // The network is made while the agent starts (nothing runs in the sandbox before the agent answers), and is
        // recorded in the same write as the init.
        let recorded = match pidfd {
            Ok(pidfd) => match self.attach_network(&record.spec, init.pid).await {
                Ok(attachment) => {
                    record.network = attachment;
                    self.write_record(&id, &record).map(|()| pidfd)
                }
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let ready = match recorded {
            Ok(pidfd) => match tokio::time::timeout(AGENT_READY_TIMEOUT, agent_client::ping(&socket_path)).await {
                Ok(Ok(_)) => Ok(pidfd),
                Ok(Err(source)) => Err(RunnerError::Agent {
                    sandbox_id: id.clone(),
                    source,
                }),
                Err(_) => Err(RunnerError::Boot {
                    sandbox_id: id.clone(),
                    message: format!("the agent did not answer within {} s", AGENT_READY_TIMEOUT.as_secs()),
                }),
            },
            Err(error) => Err(error),
        };
        match ready {
            Ok(pidfd) => {
                self.watch(record, pidfd, cgroup);
                Ok(())
            }
            Err(error) => {
                kill_and_reap(init.pid).await;
                // The attachment may be in memory only (its record write failed); detaching twice is harmless.
                if let (Some(network), Some(attachment)) = (self.inner.network.clone(), record.network.take()) {
                    let id = id.clone();
                    let _ = tokio::task::spawn_blocking(move || network.detach(&id, attachment)).await;
                }
                self.clean_after_exit_async(&id).await;
                record.init = None;
                let _ = self.write_record(&id, &record);
                Err(error)
            }
        }
    }

    /// Gives a booting sandbox its interface and policy: none for a `none` policy; on a runner without a network,
    /// only loopback for the default policy, and a refusal for one that asks for more.
    async fn attach_network(&self, spec: &SandboxSpec, pid: i32) -> Result<Option<Attachment>, RunnerError> {
        if spec.network.egress == nook_api::EgressMode::None {
            return Ok(None);
        }
        let Some(network) = self.inner.network.clone() else {
            if spec.network != nook_api::NetworkPolicy::default() {
                return Err(crate::network::NetworkError::Disabled.into());
            }
            return Ok(None);
        };
        let (id, policy) = (spec.id.clone(), spec.network.clone());
        let attachment = tokio::task::spawn_blocking(move || network.attach(&id, pid, &policy))
            .await
            .expect("attaching does not panic")?;
        Ok(Some(attachment))
    }

    /// Registers a running sandbox and starts its monitor task.
    fn watch(&self, record: SandboxRecord, pidfd: PidFd, cgroup: SandboxCgroup) {
        let id = record.spec.id.clone();
        let (exited_sender, exited) = watch::channel(false);
        let pidfd = Arc::new(pidfd);
        let live = Arc::new(Live {
            paused: AtomicBool::new(record.paused),
            resources: Mutex::new(record.spec.resources),
            meter: Mutex::new(Meter::default()),
            network: Mutex::new(record.network),
            record,
            pidfd: pidfd.clone(),
            stopping: AtomicBool::new(false),
            exited,
        });
        self.inner
            .live
            .lock()
            .expect("live map")
            .insert(id.clone(), live.clone());
        let runner = self.clone();
        tokio::spawn(async move {
            let mut oom = match cgroup.watch_oom() {
                Ok(watcher) => Some(watcher),
                Err(error) => {
                    tracing::warn!(sandbox = %id, %error, "OOM kills in this sandbox will not be reported");
                    without_auto_grow(&id, &cgroup, &live);
                    None
                }
            };
            let mut reported = cgroup.oom_kills();
            // Events from before (an adopted sandbox's) are not a call for more memory now.
            let mut high_seen = 0;
            cgroup.needs_memory(&mut high_seen);
            loop {
                tokio::select! {
                    _ = pidfd.exited() => break,
                    event = next_oom(&mut oom) => {
                        if event.is_err() {
                            oom = None;
                            without_auto_grow(&id, &cgroup, &live);
                            continue;
                        }
                        if let Some(event) = runner.grow_memory(&id, &cgroup, &live, &mut high_seen) {
                            let _ = runner.inner.events.send(event);
                            continue;
                        }
                        // cgroup v1 notifies when the OOM begins, before the victim is killed and counted: look
                        // again a little later if the count has not moved yet.
                        let mut oom_kills = cgroup.oom_kills();
                        for delay_ms in [20, 200, 1000] {
                            if oom_kills > reported {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            oom_kills = cgroup.oom_kills();
                        }
                        if oom_kills > reported {
                            reported = oom_kills;
                            let victim = runner.inner.oom_victims.take(&id, Duration::from_millis(500)).await;
                            tracing::warn!(sandbox = %id, oom_kills, ?victim, "the kernel OOM-killed a process");
                            if !id.starts_with(BUILD_SANDBOX_PREFIX) {
                                let victim = victim.map(|victim| victim.name);
                                let _ = runner.inner.events.send(RunnerEvent::Oom { sandbox_id: id.clone(), oom_kills, victim });
                            }
                        }
                    }
                }
            }
            let _ = exited_sender.send(true);
            if live.stopping.load(Ordering::SeqCst) {
                return;
            }
            // Exited on its own: clean up under the operation lock unless a stop or delete already took over.
            let lock = runner.op_lock(&id);
            let _guard = lock.lock().await;
            let still_ours = {
                let mut map = runner.inner.live.lock().expect("live map");
                match map.get(&id) {
                    Some(current) if Arc::ptr_eq(current, &live) => {
                        map.remove(&id);
                        true
                    }
                    _ => false,
                }
            };
            if !still_ours {
                return;
            }
            tracing::warn!(sandbox = %id, "the sandbox's init exited on its own");
            let cleanup = runner.clone();
            let cleanup_id = id.clone();
            let _ = tokio::task::spawn_blocking(move || cleanup.clean_after_exit(&cleanup_id)).await;
            {
                let _writing = runner.inner.record_writes.lock().expect("record writes");
                if let Ok(mut record) = runner.read_record(&id) {
                    record.init = None;
                    record.network = None;
                    record.paused = false;
                    let _ = runner.write_record(&id, &record);
                }
            }
            if !id.starts_with(BUILD_SANDBOX_PREFIX) {
                let _ = runner.inner.events.send(RunnerEvent::InitExited { sandbox_id: id });
            }
        });
    }

    /// Reads every running sandbox's memory each [`METER_INTERVAL`] (for its average) and its disk every
    /// [`DISK_EVERY`] readings (for `/metrics`, which must not walk every sandbox's files on each scrape). The task
    /// holds only a weak reference: it ends with the runner.
    fn start_metering(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(METER_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for tick in 0u64.. {
                ticks.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let runner = LocalRunner { inner };
                let live = runner.client_sandboxes();
                let measure_disk = tick % DISK_EVERY == 0;
                let _ = tokio::task::spawn_blocking(move || {
                    for (id, live) in live {
                        let memory = runner
                            .inner
                            .cgroups
                            .existing(&id)
                            .usage()
                            .ok()
                            .map(|usage| usage.memory_used);
                        let disk = measure_disk
                            .then(|| crate::disk::usage(&runner.upper_dir(&id)).ok())
                            .flatten();
                        let mut meter = live.meter.lock().expect("meter");
                        if let Some(memory) = memory {
                            meter.memory_sum += u128::from(memory);
                            meter.memory_readings += 1;
                        }
                        if disk.is_some() {
                            meter.disk = disk;
                        }
                    }
                })
                .await;
            }
        });
    }

    /// A live sandbox's usage now; `disk` measured by the caller (or the metering task's last reading).
    fn stats_of(
        &self,
        id: &str,
        live: &Live,
        usage: crate::cgroups::CgroupUsage,
        disk: crate::disk::DiskUsage,
    ) -> nook_api::SandboxStats {
        let resources = *live.resources.lock().expect("resources");
        let meter = *live.meter.lock().expect("meter");
        let cgroup = self.inner.cgroups.existing(id);
        let (network_rx_bytes, network_tx_bytes) = live.record.init.map_or((0, 0), |init| network_bytes(init.pid));
        let now = chrono::Utc::now();
        nook_api::SandboxStats {
            at: now,
            started_at: live
                .record
                .init
                .and_then(|init| started_at(init.start_time))
                .unwrap_or(now),
            cpu_used_ns: usage.cpu_ns,
            cpu_limit: resources.cpu,
            memory_used_bytes: usage.memory_used,
            memory_cache_bytes: usage.memory_cache,
            memory_limit_bytes: usage.memory_limit.unwrap_or(resources.memory_mb * MIB),
            memory_peak_bytes: cgroup.memory_peak().unwrap_or(usage.memory_used),
            memory_average_bytes: match meter.memory_readings {
                0 => usage.memory_used,
                readings => (meter.memory_sum / u128::from(readings)) as u64,
            },
            network_rx_bytes,
            network_tx_bytes,
            pids: usage.pids,
            disk_used_bytes: disk.used_bytes,
            disk_used_complete: disk.complete,
            disk_total_bytes: resources.disk_mb.map_or(disk.total_bytes, |mb| mb * MIB),
        }
    }

    /// Raises a sandbox's memory limit by a step (a quarter, at least 64 MiB), within its `memory_max_mb`, when it
    /// needs more memory now; at the ceiling the kernel's OOM killer takes over again. Returns the event to report.
    fn grow_memory(&self, id: &str, cgroup: &SandboxCgroup, live: &Live, high_seen: &mut u64) -> Option<RunnerEvent> {
        let mut resources = live.resources.lock().expect("resources");
        let ceiling = resources
            .memory_max_mb
            .filter(|ceiling| *ceiling > resources.memory_mb)?;
        if !cgroup.needs_memory(high_seen) {
            return None;
        }
        let from_mb = resources.memory_mb;
        let mut grown = *resources;
        grown.memory_mb = (from_mb + (from_mb / 4).max(64)).min(ceiling);
        if let Err(error) = cgroup.resize(&grown) {
            tracing::error!(sandbox = %id, %error, "raising the memory limit failed");
            return None;
        }
        *resources = grown;
        drop(resources);
        tracing::info!(sandbox = %id, from_mb, to_mb = grown.memory_mb, "raised the memory limit");
        let _writing = self.inner.record_writes.lock().expect("record writes");
        if let Ok(mut record) = self.read_record(id) {
            record.spec.resources.memory_mb = grown.memory_mb;
            if let Err(error) = self.write_record(id, &record) {
                tracing::error!(sandbox = %id, error = %crate::error_chain(&error), "recording a raised memory limit failed");
            }
        }
        Some(RunnerEvent::MemoryGrown {
            sandbox_id: id.to_string(),
            from_mb,
            to_mb: grown.memory_mb,
            ceiling_mb: ceiling,
        })
    }

    /// Stops a live sandbox; the caller holds its operation lock.
    async fn stop_locked(&self, id: &str) -> Result<bool, RunnerError> {
        let live = self.inner.live.lock().expect("live map").remove(id);
        let Some(live) = live else { return Ok(false) };
        live.stopping.store(true, Ordering::SeqCst);
        // Killing PID 1 of the sandbox's PID namespace makes the kernel kill every process in it (a paused one's
        // only once thawed).
        live.pidfd.kill();
        if live.paused.load(Ordering::SeqCst) {
            self.inner.cgroups.existing(id).thaw();
        }
        let mut exited = live.exited.clone();
        let waited = tokio::time::timeout(STOP_TIMEOUT, exited.wait_for(|done| *done))
            .await
            .is_ok();
        // Whatever is left in the cgroup is killed too, then the cgroup and socket go.
        self.clean_after_exit_async(id).await;
        if !waited && self.inner.cgroups.existing(id).exists() {
            return Err(RunnerError::Boot {
                sandbox_id: id.to_string(),
                message: format!(
                    "the sandbox's processes did not exit within {} s of SIGKILL",
                    STOP_TIMEOUT.as_secs()
                ),
            });
        }
        // The record on disk carries changes made while it ran (resizes).
        let _writing = self.inner.record_writes.lock().expect("record writes");
        let mut record = self.read_record(id).unwrap_or_else(|_| live.record.clone());
        record.init = None;
        record.network = None;
        record.paused = false;
        self.write_record(id, &record)?;
        Ok(true)
    }

    /// The sandbox whose processes exist (running or paused), or why there is none.
    fn present(&self, id: &str) -> Result<Arc<Live>, RunnerError> {
        self.live(id).ok_or_else(|| {
            if self.record_path(id).exists() {
                RunnerError::NotRunning(id.to_string())
            } else {
                RunnerError::NoSuchSandbox(id.to_string())
            }
        })
    }

    /// The running sandbox whose agent can answer, or why there is none (a paused sandbox's agent is frozen).
    fn running(&self, id: &str) -> Result<Arc<Live>, RunnerError> {
        let live = self.present(id)?;
        if live.paused.load(Ordering::SeqCst) {
            return Err(RunnerError::Paused(id.to_string()));
        }
        Ok(live)
    }

    /// Freezes or thaws a present sandbox, recording the paused state so that the record is never less paused
    /// than the processes.
    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let live = self.present(id)?;
        if live.paused.load(Ordering::SeqCst) == paused {
            return Ok(());
        }
        let cgroup = self.inner.cgroups.existing(id);
        if paused {
            // Refuse new agent requests, record, then freeze; undone if the freeze fails.
            live.paused.store(true, Ordering::SeqCst);
            self.record_paused(id, true)?;
            if let Err(error) = cgroup.set_frozen(true).await {
                live.paused.store(false, Ordering::SeqCst);
                let _ = self.record_paused(id, false);
                return Err(error.into());
            }
        } else {
            cgroup.set_frozen(false).await?;
            self.record_paused(id, false)?;
            live.paused.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Writes whether a sandbox is paused into its record.
    fn record_paused(&self, id: &str, paused: bool) -> Result<(), RunnerError> {
        let _writing = self.inner.record_writes.lock().expect("record writes");
        let mut record = self.read_record(id)?;
        record.paused = paused;
        self.write_record(id, &record)
    }

    /// The full process spec for a request: the image's environment, then the sandbox's, then the request's.
    fn exec_spec(&self, id: &str, options: ExecOptions) -> Result<ExecSpec, RunnerError> {
        let live = self.running(id)?;
        let config = &live.record.image_config;
        let mut env: Vec<String> = config.env.clone();
        let mut set = |key: &str, value: &str| {
            env.retain(|entry| entry.split_once('=').map(|(k, _)| k) != Some(key));
            env.push(format!("{key}={value}"));
        };
        for (key, value) in live.record.spec.env.iter().chain(options.env.iter()) {
            set(key, value);
        }
        Ok(ExecSpec {
            argv: options.argv,
            env,
            cwd: options.cwd.or_else(|| config.working_dir.clone()),
            user: options.user.or_else(|| config.user.clone()),
            timeout_ms: options.timeout_ms,
            stdin: options.stdin,
            pty: options.pty,
            output_buffer: options.output_buffer,
        })
    }

    /// A request with one answer; the agent's refusals become [`RunnerError::Process`].
    async fn call<T: serde::de::DeserializeOwned>(&self, id: &str, request: &Request) -> Result<T, RunnerError> {
        self.running(id)?;
        answered(id, agent_client::call(&self.socket_path(id), request).await)
    }

    /// Runs the blocking `work` (a copy of the sandbox's files) with its processes frozen if it runs, so that what
    /// is copied is one moment's state; returns its result and how long the processes were frozen. A paused or
    /// stopped sandbox is still already. Called with the sandbox's operation lock held.
    async fn with_frozen<T: Send + 'static>(
        &self,
        id: &str,
        work: impl FnOnce() -> Result<T, RunnerError> + Send + 'static,
    ) -> Result<(T, Duration), RunnerError> {
        let freeze = self.live(id).is_some_and(|live| !live.paused.load(Ordering::SeqCst));
        let cgroup = self.inner.cgroups.existing(id);
        if freeze {
            // What the sandbox wrote is written back while it still runs, so the freeze only covers the rest.
            let runner = self.clone();
            let volume = self.layer_parent(id);
            tokio::task::spawn_blocking(move || runner.inner.storage.flush(&volume))
                .await
                .expect("writing back does not panic")?;
        }
        let started = std::time::Instant::now();
        if freeze {
            cgroup.set_frozen(true).await?;
        }
        let result = tokio::task::spawn_blocking(work)
            .await
            .expect("copying a sandbox's files does not panic");
        let mut frozen = Duration::ZERO;
        if freeze {
            let thawed = cgroup.set_frozen(false).await;
            frozen = started.elapsed();
            if let Err(error) = thawed {
                tracing::error!(sandbox = %id, %error, "thawing a sandbox after copying its files failed");
                return Err(error.into());
            }
        }
        Ok((result?, frozen))
    }

    /// The live sandboxes clients made (build steps left out).
    fn client_sandboxes(&self) -> Vec<(String, Arc<Live>)> {
        self.inner
            .live
            .lock()
            .expect("live map")
            .iter()
            .filter(|(id, _)| !id.starts_with(BUILD_SANDBOX_PREFIX))
            .map(|(id, live)| (id.clone(), live.clone()))
            .collect()
    }

    fn live(&self, id: &str) -> Option<Arc<Live>> {
        self.inner.live.lock().expect("live map").get(id).cloned()
    }
}

/// Bytes received and sent by the interfaces of process `pid`'s network namespace, loopback excluded
/// (`/proc/<pid>/net/dev`); zeros when it cannot be read.
fn network_bytes(pid: i32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
        return (0, 0);
    };
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let (name, counters) = line.split_once(':')?;
            if name.trim() == "lo" {
                return None;
            }
            let counters: Vec<u64> = counters.split_whitespace().filter_map(|n| n.parse().ok()).collect();
            Some((*counters.first()?, *counters.get(8)?))
        })
        .fold((0, 0), |(rx, tx), (r, t)| (rx + r, tx + t))
}

/// Turns memory auto-grow off for a sandbox whose OOM notifications cannot be followed: nobody would raise its limit,
/// and with the OOM killer held off (v1) its processes would wait at the limit for ever.
fn without_auto_grow(id: &str, cgroup: &SandboxCgroup, live: &Live) {
    let memory = live.resources.lock().expect("resources").memory_mb * MIB;
    if let Err(error) = cgroup.set_auto_grow(false, memory) {
        tracing::error!(sandbox = %id, %error, "turning memory auto-grow off failed");
    }
}

/// Turns a captured volume (`upper` and `work` inside) into a layer: `work` goes, the contents of `upper` move up
/// one level, and the root takes the upper root's mode and owner.
fn hoist_upper(volume: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::remove_dir_all(volume.join("work")) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    // Renamed first, so that an entry of the upper named `upper` cannot collide with the directory itself.
    let suffix: u64 = rand::random();
    let hoisted = volume.join(format!(".nook-upper-{suffix:016x}"));
    std::fs::rename(volume.join("upper"), &hoisted)?;
    for entry in std::fs::read_dir(&hoisted)? {
        let entry = entry?;
        std::fs::rename(entry.path(), volume.join(entry.file_name()))?;
    }
    let root = std::fs::symlink_metadata(&hoisted)?;
    std::os::unix::fs::lchown(volume, Some(root.uid()), Some(root.gid()))?;
    std::fs::set_permissions(volume, root.permissions())?;
    std::fs::remove_dir(&hoisted)
}

const MIB: u64 = 1024 * 1024;

/// Turns an agent's answer into the runner's result: refusals become [`RunnerError::Process`].
fn answered<T>(id: &str, answer: Result<agent_client::Answer<T>, ProtocolError>) -> Result<T, RunnerError> {
    match answer {
        Ok(agent_client::Answer::Done(value)) => Ok(value),
        Ok(agent_client::Answer::Refused { code, message }) => Err(RunnerError::Process { code, message }),
        Err(source) => Err(RunnerError::Agent {
            sandbox_id: id.to_string(),
            source,
        }),
    }
}

/// The wall-clock time a process started, from its start in clock ticks since boot (`/proc/<pid>/stat`) and the
/// boot time (`btime` of `/proc/stat`).
fn started_at(start_ticks: u64) -> Option<chrono::DateTime<chrono::Utc>> {
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot_s: i64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    let since_boot_ms = start_ticks.checked_mul(1000)? / u64::try_from(ticks_per_s).ok().filter(|t| *t > 0)?;
    chrono::DateTime::from_timestamp(boot_s, 0)?
        .checked_add_signed(chrono::Duration::milliseconds(since_boot_ms as i64))
}

async fn next_oom(watcher: &mut Option<crate::cgroups::OomWatcher>) -> std::io::Result<()> {
    match watcher {
        Some(watcher) => watcher.next().await,
        None => std::future::pending().await,
    }
}

#[async_trait::async_trait]
impl Runner for LocalRunner {
    fn describe(&self) -> String {
        format!(
            "local runner at {} ({}, storage on {}, isolation {:?})",
            self.inner.dir.display(),
            self.inner.cgroups.describe(),
            self.inner.storage.describe(),
            self.inner.backend.isolation()
        )
    }

    async fn list_images(&self) -> Result<Vec<Image>, RunnerError> {
        Ok(self.inner.images.list()?)
    }

    async fn image(&self, name: &str) -> Result<Image, RunnerError> {
        Ok(self.inner.images.get(name)?)
    }

    async fn import_image(&self, name: &str, archive: ByteStream) -> Result<Image, RunnerError> {
        let inner = self.inner.clone();
        let name = name.to_string();
        let reader = SyncIoBridge::new(archive);
        let config = ImageConfig {
            env: vec![format!(
                "PATH={}",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            )],
            ..ImageConfig::default()
        };
        tokio::task::spawn_blocking(move || inner.images.import(&name, reader, config))
            .await
            .expect("import task does not panic")
            .map_err(RunnerError::from)
    }

    fn image_name_for(&self, reference: &str) -> Result<String, RunnerError> {
        let reference = self
            .inner
            .registries
            .parse_reference(reference)
            .map_err(ImageError::from)?;
        Ok(reference.to_string())
    }

    async fn pull_image(
        &self,
        reference: &str,
        name: Option<&str>,
        events: mpsc::Sender<TransferEvent>,
    ) -> Result<Image, RunnerError> {
        let reference = self
            .inner
            .registries
            .parse_reference(reference)
            .map_err(ImageError::from)?;
        let name = name.map_or_else(|| reference.to_string(), str::to_string);
        nook_api::names::check_image_name(&name).map_err(ImageError::InvalidName)?;
        Ok(self
            .inner
            .registries
            .pull(&self.inner.images, &reference, &name, &events)
            .await?)
    }

    async fn push_image(
        &self,
        name: &str,
        reference: &str,
        events: mpsc::Sender<TransferEvent>,
    ) -> Result<Image, RunnerError> {
        let image = self.inner.images.get(name)?;
        let reference = self
            .inner
            .registries
            .parse_reference(reference)
            .map_err(ImageError::from)?;
        self.inner
            .registries
            .push(&self.inner.images, &image, &reference, &events)
            .await?;
        Ok(image)
    }

    async fn prune_images(&self) -> Result<ImagePruneResult, RunnerError> {
        let runner = self.clone();
        tokio::task::spawn_blocking(move || {
            // Every sandbox, running or stopped, is built on its layers until it is deleted.
            let dir = runner.inner.dir.join("sandboxes");
            let entries = std::fs::read_dir(&dir).map_err(|source| RunnerError::Io {
                action: "listing",
                path: dir.clone(),
                source,
            })?;
            let mut in_use = std::collections::HashSet::new();
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if let Ok(record) = runner.read_record(&id) {
                    in_use.extend(
                        record
                            .lower_dirs
                            .iter()
                            .filter_map(|dir| dir.file_name())
                            .map(|hex| format!("sha256:{}", hex.to_string_lossy())),
                    );
                }
            }
            let report = runner.inner.images.prune(&in_use)?;
            runner.forget_pruned_cache_entries();
            tracing::info!(?report, "pruned images");
            Ok(ImagePruneResult {
                images_removed: report.images_removed,
                layers_removed: report.layers_removed,
                bytes_freed: report.bytes_freed,
            })
        })
        .await
        .expect("pruning does not panic")
    }

    async fn tag_image(&self, source: &str, target: &str) -> Result<Image, RunnerError> {
        Ok(self.inner.images.tag(source, target)?)
    }

    async fn remove_image(&self, name: &str) -> Result<(), RunnerError> {
        Ok(self.inner.images.remove(name)?)
    }

    async fn export_image(&self, name: &str) -> Result<ByteStream, RunnerError> {
        let image = self.inner.images.get(name)?;
        // The layers stay pinned until the export is written, so a prune cannot take them half-way.
        let pins: Vec<LayerPin> = image.layers.iter().map(|layer| self.inner.images.pin(layer)).collect();
        let images = self.inner.images.clone();
        Ok(crate::produced_stream(move |out| {
            let written = images.export_layout(&image, out).map_err(|error| {
                tracing::warn!(image = %image.name, error = %crate::error_chain(&error), "exporting an image failed");
                std::io::Error::other(crate::error_chain(&error))
            });
            drop(pins);
            written
        }))
    }

    async fn build_image(
        &self,
        spec: BuildSpec,
        context: ByteStream,
        events: mpsc::Sender<nook_api::BuildEvent>,
        cancel: CancellationToken,
    ) -> Result<Image, RunnerError> {
        crate::build::build(self, &spec, context, &events, &cancel).await
    }

    async fn create_sandbox(&self, spec: SandboxSpec) -> Result<(), RunnerError> {
        let image = self.inner.images.get(&spec.image)?;
        self.create_from_layers(spec, &image.layers, image.config).await
    }

    async fn start_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        if self.live(id).is_some() {
            return Err(RunnerError::AlreadyRunning(id.to_string()));
        }
        let mut record = self.read_record(id)?;
        if record.archived.is_some() {
            self.restore(&mut record).await?;
        }
        self.boot_and_start(record).await
    }

    async fn stop_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        if !self.stop_locked(id).await? && !self.record_path(id).exists() {
            return Err(RunnerError::NoSuchSandbox(id.to_string()));
        }
        Ok(())
    }

    async fn pause_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        self.set_paused(id, true).await
    }

    async fn resume_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        self.set_paused(id, false).await
    }

    async fn snapshot_sandbox(&self, id: &str, name: &str) -> Result<Image, RunnerError> {
        nook_api::names::check_image_name(name).map_err(ImageError::InvalidName)?;
        let lock = self.op_lock(id);
        let guard = lock.lock().await;
        let record = self.read_record(id)?;
        let runner = self.clone();
        let id_owned = id.to_string();
        let (scratch, _) = self
            .with_frozen(id, move || runner.capture_layer(&id_owned, true))
            .await?;
        drop(guard);
        // Hashing the new layer needs no lock: the capture is the snapshot's own copy.
        let runner = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let layer = runner.layer_from_capture(scratch)?;
            let mut layers: Vec<String> = record
                .lower_dirs
                .iter()
                .rev()
                .filter_map(|dir| dir.file_name())
                .map(|hex| format!("sha256:{}", hex.to_string_lossy()))
                .collect();
            if let Some((diff_id, _)) = &layer {
                layers.push(diff_id.clone());
            }
            let image = runner.inner.images.commit_layers(&name, layers, record.image_config)?;
            drop(layer);
            Ok(image)
        })
        .await
        .expect("snapshotting does not panic")
    }

    async fn fork_sandbox(&self, id: &str, forks: Vec<SandboxSpec>) -> Result<Duration, RunnerError> {
        let lock = self.op_lock(id);
        let guard = lock.lock().await;
        let source = self.read_record(id)?;
        let source_volume = self.volume_dir(id);
        if !source_volume.is_dir() {
            return Err(RunnerError::Boot {
                sandbox_id: id.to_string(),
                message: "it was made by an earlier nook that kept its files outside a volume, so it cannot be \
                          forked; snapshot it and create sandboxes from the image instead"
                    .to_string(),
            });
        }
        let records: Vec<SandboxRecord> = forks
            .into_iter()
            .map(|spec| SandboxRecord {
                spec,
                lower_dirs: source.lower_dirs.clone(),
                image_config: source.image_config.clone(),
                init: None,
                paused: false,
                archived: None,
                network: None,
            })
            .collect();
        let runner = self.clone();
        let (records, frozen) = self
            .with_frozen(id, move || {
                for (index, record) in records.iter().enumerate() {
                    if let Err(error) = runner.prepare(record, Some(&source_volume)) {
                        for made in &records[..index] {
                            runner.remove_sandbox_files(&made.spec.id);
                        }
                        return Err(error);
                    }
                }
                Ok(records)
            })
            .await?;
        drop(guard);
        let ids: Vec<String> = records.iter().map(|record| record.spec.id.clone()).collect();
        let boots = records.into_iter().map(|record| {
            let runner = self.clone();
            async move {
                let lock = runner.op_lock(&record.spec.id);
                let _guard = lock.lock().await;
                runner.boot_and_start(record).await
            }
        });
        let results = futures::future::join_all(boots).await;
        if let Some(position) = results.iter().position(Result::is_err) {
            for fork in &ids {
                if let Err(error) = self.delete_sandbox(fork).await {
                    tracing::error!(sandbox = %fork, error = %crate::error_chain(&error), "removing a fork after a failed fork");
                }
            }
            return Err(results
                .into_iter()
                .nth(position)
                .expect("found above")
                .expect_err("an error"));
        }
        Ok(frozen)
    }

    async fn update_resources(&self, id: &str, resources: Resources) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let old = self.read_record(id)?.spec.resources;
        let live = self.live(id);
        let cgroup = self.inner.cgroups.existing(id);
        // Every check first, so that a refused change changes nothing.
        let new_quota = resources.disk_mb != old.disk_mb;
        if let (true, Some(mb)) = (new_quota, resources.disk_mb) {
            if !self.inner.storage.is_btrfs() {
                // Refused with the reason, before any file is measured.
                self.inner.storage.set_quota(&self.volume_dir(id), Some(mb * MIB))?;
            }
            let upper = self.upper_dir(id);
            let used = tokio::task::spawn_blocking(move || crate::disk::usage(&upper))
                .await
                .expect("measuring does not panic")
                .map_err(|source| RunnerError::Io {
                    action: "measuring",
                    path: self.upper_dir(id),
                    source,
                })?
                .used_bytes;
            if used > mb * MIB {
                return Err(RunnerError::BelowUsage(format!(
                    "a disk quota of {mb} MiB is below the {} MiB the sandbox's files take now; remove files first",
                    used.div_ceil(MIB)
                )));
            }
        }
        if live.is_some() && resources.memory_mb < old.memory_mb {
            let used = cgroup.usage()?.memory_used;
            if used > resources.memory_mb * MIB {
                return Err(RunnerError::BelowUsage(format!(
                    "memory_mb {} is below the {} MiB the sandbox uses now; free memory inside it first",
                    resources.memory_mb,
                    used.div_ceil(MIB)
                )));
            }
        }
        // Then the cgroup (which the kernel may still refuse to shrink), then the quota.
        if let Some(live) = &live {
            cgroup.resize(&resources).map_err(|error| match error {
                crate::cgroups::CgroupError::Io { ref source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                    RunnerError::BelowUsage(format!(
                        "the kernel could not reclaim enough of the sandbox's memory to go down to {} MiB",
                        resources.memory_mb
                    ))
                }
                other => other.into(),
            })?;
            *live.resources.lock().expect("resources") = resources;
        }
        if new_quota {
            self.inner
                .storage
                .set_quota(&self.volume_dir(id), resources.disk_mb.map(|mb| mb * MIB))?;
        }
        let _writing = self.inner.record_writes.lock().expect("record writes");
        let mut record = self.read_record(id)?;
        record.spec.resources = resources;
        self.write_record(id, &record)
    }

    async fn update_network(&self, id: &str, policy: nook_api::NetworkPolicy) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        let mut record = self.read_record(id)?;
        if self.inner.network.is_none() && policy.egress != nook_api::EgressMode::None {
            return Err(crate::network::NetworkError::Disabled.into());
        }
        if let (Some(network), Some(live)) = (self.inner.network.clone(), self.live(id)) {
            let attachment = record.network;
            let wanted = policy.egress != nook_api::EgressMode::None;
            match (attachment, wanted) {
                (Some(attachment), true) => {
                    let (network, id, policy) = (network.clone(), id.to_string(), policy.clone());
                    tokio::task::spawn_blocking(move || network.apply(&id, attachment, &policy))
                        .await
                        .expect("applying a policy does not panic")?;
                }
                (Some(attachment), false) => {
                    let id = id.to_string();
                    tokio::task::spawn_blocking(move || network.detach(&id, attachment))
                        .await
                        .expect("detaching does not panic");
                    record.network = None;
                }
                (None, true) => {
                    let Some(pid) = live.record.init.map(|init| init.pid) else {
                        return Err(RunnerError::NotRunning(id.to_string()));
                    };
                    let (network, id, policy) = (network.clone(), id.to_string(), policy.clone());
                    let attachment = tokio::task::spawn_blocking(move || network.attach(&id, pid, &policy))
                        .await
                        .expect("attaching does not panic")?;
                    record.network = Some(attachment);
                }
                (None, false) => {}
            }
        }
        if let Some(live) = self.live(id) {
            *live.network.lock().expect("network") = record.network;
        }
        let _writing = self.inner.record_writes.lock().expect("record writes");
        let network = record.network;
        let mut record = self.read_record(id)?;
        record.network = network;
        record.spec.network = policy;
        self.write_record(id, &record)
    }

    async fn address(&self, id: &str) -> Option<std::net::Ipv4Addr> {
        let attachment = *self.live(id)?.network.lock().expect("network");
        attachment.map(|attachment| attachment.address)
    }

    async fn connect_port(&self, id: &str, port: u16) -> Result<tokio::net::TcpStream, RunnerError> {
        let live = self.live(id).ok_or_else(|| RunnerError::NotRunning(id.to_string()))?;
        if live.paused.load(Ordering::SeqCst) {
            return Err(RunnerError::Paused(id.to_string()));
        }
        let pid = live
            .record
            .init
            .map(|init| init.pid)
            .ok_or_else(|| RunnerError::NotRunning(id.to_string()))?;
        let namespace_path = format!("/proc/{pid}/ns/net");
        let namespace = std::fs::File::open(&namespace_path).map_err(|source| RunnerError::Io {
            action: "opening the network namespace",
            path: namespace_path.into(),
            source,
        })?;
        // The socket is made inside the sandbox's namespace (and stays there) and the connect started there without
        // waiting; the wait happens here, bounded: a server that never accepts (a full backlog drops the SYNs) costs
        // a timeout, not a blocked thread.
        let started = tokio::task::spawn_blocking(move || {
            crate::network::netlink::in_namespace(namespace, move || {
                use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, SockaddrIn};
                let socket = socket(
                    AddressFamily::Inet,
                    SockType::Stream,
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    None,
                )?;
                let address = SockaddrIn::new(127, 0, 0, 1, port);
                match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &address) {
                    Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(std::net::TcpStream::from(socket)),
                    Err(errno) => Err(std::io::Error::from(errno)),
                }
            })
        })
        .await
        .expect("connecting does not panic");
        let closed = |source| RunnerError::PortClosed {
            sandbox_id: id.to_string(),
            port,
            source,
        };
        let stream = tokio::net::TcpStream::from_std(started.map_err(closed)?).map_err(closed)?;
        match tokio::time::timeout(PORT_CONNECT_TIMEOUT, stream.writable()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(closed(error)),
            Err(_) => {
                return Err(closed(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the connection was not accepted within {} s",
                        PORT_CONNECT_TIMEOUT.as_secs()
                    ),
                )))
            }
        }
        if let Some(error) = stream.take_error().map_err(closed)? {
            return Err(closed(error));
        }
        stream.set_nodelay(true).map_err(closed)?;
        Ok(stream)
    }

    async fn archive_sandbox(&self, id: &str) -> Result<crate::archive::ArchivedLayer, RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        if self.live(id).is_some() {
            return Err(RunnerError::AlreadyRunning(id.to_string()));
        }
        let record = self.read_record(id)?;
        if let Some(archived) = record.archived {
            return Ok(archived);
        }
        let upper = self.upper_dir(id);
        let suffix: u64 = rand::random();
        let key = format!("sandboxes/{id}/{suffix:016x}.tar.zst");
        let archived = self.inner.archive.upload(&upper, &key).await?;
        // Recorded before the local copy goes: a crash in between leaves both.
        {
            let _writing = self.inner.record_writes.lock().expect("record writes");
            let mut record = self.read_record(id)?;
            record.archived = Some(archived.clone());
            self.write_record(id, &record)?;
        }
        let runner = self.clone();
        let id_owned = id.to_string();
        tokio::task::spawn_blocking(move || runner.remove_layer_files(&id_owned))
            .await
            .expect("removing does not panic")?;
        tracing::info!(sandbox = %id, key = %archived.key, bytes = archived.bytes, "archived the writable layer");
        Ok(archived)
    }

    async fn delete_sandbox(&self, id: &str) -> Result<(), RunnerError> {
        let lock = self.op_lock(id);
        let _guard = lock.lock().await;
        self.stop_locked(id).await?;
        if let Some(archived) = self.read_record(id).ok().and_then(|record| record.archived) {
            self.inner.archive.remove(&archived.key).await?;
        }
        let runner = self.clone();
        let id_owned = id.to_string();
        let dir = self.sandbox_dir(id);
        tokio::task::spawn_blocking(move || {
            runner.clean_after_exit(&id_owned);
            runner.inner.storage.remove_tree(&dir)
        })
        .await
        .expect("delete task does not panic")?;
        self.inner.op_locks.lock().expect("op locks").remove(id);
        Ok(())
    }

    async fn exec(&self, id: &str, options: ExecOptions) -> Result<ExecStream, RunnerError> {
        let spec = self.exec_spec(id, options)?;
        agent_client::exec(&self.socket_path(id), spec)
            .await
            .map_err(|source| RunnerError::Agent {
                sandbox_id: id.to_string(),
                source,
            })
    }

    async fn spawn(&self, id: &str, options: ExecOptions) -> Result<u32, RunnerError> {
        let spec = self.exec_spec(id, options)?;
        let spawned: nook_agent_proto::Spawned = self.call(id, &Request::Spawn(spec)).await?;
        Ok(spawned.pid)
    }

    async fn attach(
        &self,
        id: &str,
        pid: u32,
        offset: u64,
        follow: bool,
        hold: bool,
    ) -> Result<ExecStream, RunnerError> {
        self.running(id)?;
        let request = Request::Attach {
            pid,
            offset,
            follow,
            hold,
        };
        agent_client::stream(&self.socket_path(id), &request)
            .await
            .map_err(|source| RunnerError::Agent {
                sandbox_id: id.to_string(),
                source,
            })
    }

    async fn wait(&self, id: &str, pid: u32) -> Result<nook_agent_proto::Exit, RunnerError> {
        self.call(id, &Request::Wait { pid }).await
    }

    async fn input(&self, id: &str, pid: u32, data: Vec<u8>, close: bool) -> Result<(), RunnerError> {
        // The request carries the bytes as base64 in one frame: stay well under the frame limit per request.
        let mut chunks: Vec<&[u8]> = data.chunks(nook_agent_proto::MAX_FRAME_LEN / 2).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        for (index, chunk) in chunks.into_iter().enumerate() {
            let request = Request::Input {
                pid,
                data: chunk.to_vec(),
                close: close && index == last,
            };
            let _: serde_json::Value = self.call(id, &request).await?;
        }
        Ok(())
    }

    async fn resize(&self, id: &str, pid: u32, size: nook_agent_proto::PtySize) -> Result<(), RunnerError> {
        let _: serde_json::Value = self.call(id, &Request::Resize { pid, size }).await?;
        Ok(())
    }

    async fn signal(&self, id: &str, pid: u32, signal: i32) -> Result<(), RunnerError> {
        let _: serde_json::Value = self.call(id, &Request::Signal { pid, signal }).await?;
        Ok(())
    }

    async fn processes(&self, id: &str) -> Result<Vec<nook_agent_proto::ProcessInfo>, RunnerError> {
        self.call(id, &Request::List).await
    }

    async fn read_file(
        &self,
        id: &str,
        path: &str,
    ) -> Result<(nook_agent_proto::FileStat, agent_client::FileChunks), RunnerError> {
        self.running(id)?;
        answered(
            id,
            agent_client::read_stream(&self.socket_path(id), &Request::ReadFile { path: path.to_string() }).await,
        )
    }

    async fn write_file(
        &self,
        id: &str,
        write: nook_agent_proto::FileWrite,
        body: ByteStream,
    ) -> Result<nook_agent_proto::FileStat, RunnerError> {
        self.running(id)?;
        answered(
            id,
            agent_client::write_stream(&self.socket_path(id), Request::WriteFile(write), body).await,
        )
    }

    async fn read_archive(
        &self,
        id: &str,
        path: &str,
    ) -> Result<(nook_agent_proto::FileStat, agent_client::FileChunks), RunnerError> {
        self.running(id)?;
        let request = Request::ReadArchive { path: path.to_string() };
        answered(id, agent_client::read_stream(&self.socket_path(id), &request).await)
    }

    async fn write_archive(
        &self,
        id: &str,
        path: &str,
        parents: bool,
        owner: Option<(u32, u32)>,
        body: ByteStream,
    ) -> Result<nook_agent_proto::ArchiveWritten, RunnerError> {
        self.running(id)?;
        let request = Request::WriteArchive {
            path: path.to_string(),
            parents,
            owner,
        };
        answered(
            id,
            agent_client::write_stream(&self.socket_path(id), request, body).await,
        )
    }

    async fn watch(&self, id: &str, path: &str, recursive: bool) -> Result<agent_client::WatchEvents, RunnerError> {
        self.running(id)?;
        answered(
            id,
            agent_client::watch(&self.socket_path(id), path.to_string(), recursive).await,
        )
    }

    async fn file_call(&self, id: &str, request: Request) -> Result<serde_json::Value, RunnerError> {
        self.call(id, &request).await
    }

    async fn stats(&self, id: &str) -> Result<nook_api::SandboxStats, RunnerError> {
        // A paused sandbox has usage too (its memory, no CPU): it is read from the host, not asked of the agent.
        let live = self.present(id)?;
        let cgroup = self.inner.cgroups.existing(id);
        let upper = self.upper_dir(id);
        let (usage, disk) = tokio::task::spawn_blocking(move || (cgroup.usage(), crate::disk::usage(&upper)))
            .await
            .expect("reading usage does not panic");
        // The cgroup goes away with the sandbox: a failed read of a sandbox that stopped meanwhile says so.
        let usage = usage.map_err(|error| match self.live(id) {
            Some(_) => RunnerError::from(error),
            None => RunnerError::NotRunning(id.to_string()),
        })?;
        let disk = disk.map_err(|source| RunnerError::Io {
            action: "measuring",
            path: self.upper_dir(id),
            source,
        })?;
        Ok(self.stats_of(id, &live, usage, disk))
    }

    async fn cpu_time(&self, id: &str) -> Result<u64, RunnerError> {
        self.present(id)?;
        Ok(self.inner.cgroups.existing(id).usage()?.cpu_ns)
    }

    async fn meters(&self) -> Vec<(String, nook_api::SandboxStats)> {
        let live = self.client_sandboxes();
        let runner = self.clone();
        tokio::task::spawn_blocking(move || {
            live.into_iter()
                .filter_map(|(id, live)| {
                    let usage = runner.inner.cgroups.existing(&id).usage().ok()?;
                    // The metering task's last disk reading: a scrape never walks sandboxes' files.
                    let disk = live.meter.lock().expect("meter").disk.unwrap_or_default();
                    let stats = runner.stats_of(&id, &live, usage, disk);
                    Some((id, stats))
                })
                .collect()
        })
        .await
        .expect("metering does not panic")
    }

    async fn running_sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .inner
            .live
            .lock()
            .expect("live map")
            .keys()
            .filter(|id| !id.starts_with(BUILD_SANDBOX_PREFIX))
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    fn subscribe(&self) -> broadcast::Receiver<RunnerEvent> {
        self.inner.events.subscribe()
    }

    fn egress_decisions(&self) -> Option<broadcast::Receiver<crate::network::EgressDecision>> {
        self.inner.network.as_ref().map(|network| network.egress_decisions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_become_wall_clock_time() {
        let ticks = process_start_time(std::process::id() as i32).unwrap();
        let started = started_at(ticks).unwrap();
        let age = chrono::Utc::now() - started;
        assert!(
            age >= chrono::Duration::seconds(-2) && age < chrono::Duration::hours(1),
            "{started}"
        );
    }
}
