//! Control groups for sandboxes on cgroup v1, hybrid and v2 hosts.
//!
//! The host's layout is detected once ([`CgroupHost::detect`]) from `/proc/self/mountinfo`: if the unified (v2)
//! hierarchy offers the memory controller, everything lives there; otherwise (v1, or hybrid with an empty v2
//! hierarchy as on many Debian hosts) each controller is used from its own v1 hierarchy. Every sandbox gets one
//! directory `nook/<sandbox id>` per hierarchy, with its CPU, memory and pids limits written before any process
//! joins. The boot process joins by writing its pid into each `cgroup.procs`, so every process of the sandbox is
//! accounted from its first instruction.
//!
//! What a sandbox uses now ([`SandboxCgroup::usage`]) is read from the same directories when asked: CPU time from
//! `cpuacct.usage` (v1) or `cpu.stat` (v2), memory from `memory.usage_in_bytes`/`memory.current` less the inactive
//! file pages of `memory.stat` (the working set, as `docker stats` reports it).
//!
//! OOM kills are observed without polling: an eventfd registered through `cgroup.event_control` on v1, inotify on
//! `memory.events` on v2; each wake-up re-reads the kernel's `oom_kill` counter.
//!
//! Pausing freezes the whole cgroup ([`SandboxCgroup::set_frozen`]): `freezer.state` on v1, `cgroup.freeze` on v2.
//! The kernel freezes asynchronously and v1 has no notification for it, so the state file is re-read (its read is
//! what advances a v1 freeze) with a growing pause from 100 µs, bounded by [`FREEZE_TIMEOUT`]; a freeze that does not
//! complete (a process stuck in an uninterruptible sleep) is undone and reported.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nook_api::Resources;
use tokio::io::unix::AsyncFd;

/// Name of the directory that holds all of nook's sandbox cgroups in each hierarchy.
pub(crate) const PARENT: &str = "nook";

/// Devices a sandbox may open where the v1 devices controller exists (defence in depth: sandboxes also lack
/// `CAP_MKNOD` and their root is mounted `nodev`): null, zero, full, random, urandom, tty, ptmx and the pts.
const ALLOWED_DEVICES: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// How long a freeze may take before it is given up. A freeze takes well under a millisecond, unless a process waits
/// in the kernel where it cannot be frozen: a page fault under heavy disk writeback can take seconds.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// CFS period used for CPU quotas, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host lacks a controller nook needs.
    #[error("the host has no usable {0} cgroup controller (checked the v2 hierarchy and v1 mounts)")]
    MissingController(&'static str),
    /// A cgroup file or directory operation failed.
    #[error("{action} {path} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The host has no freezer for this sandbox's cgroup (a v1 host without the freezer controller).
    #[error("this host's cgroups have no freezer, so sandboxes cannot be paused here")]
    NoFreezer,
    /// The kernel did not finish freezing the sandbox's processes in time; they were thawed again.
    #[error("the sandbox's processes did not all freeze within {} s (one may be in an uninterruptible sleep); they were left running", FREEZE_TIMEOUT.as_secs())]
    FreezeTimedOut,
    /// Processes were still in the cgroup when it had to be removed.
    #[error("cgroup {0} still has processes after the sandbox was stopped")]
    Busy(PathBuf),
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The host's cgroup layout.
#[derive(Debug, Clone)]
pub enum CgroupHost {
    /// Unified hierarchy with the controllers enabled.
    V2 {
        /// Mount point of the unified hierarchy.
        root: PathBuf,
    },
    /// One v1 hierarchy per controller (a path may serve several controllers, e.g. `cpu,cpuacct`).
    V1 {
        /// Mount point per controller name: `memory`, `cpu`, `pids`, and `cpuacct` (CPU time used), `freezer` and
        /// `devices` when present.
        mounts: BTreeMap<&'static str, PathBuf>,
    },
}

impl CgroupHost {
    /// Detects the layout of this host.
    pub fn detect() -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io_error("reading", Path::new("/proc/self/mountinfo")))?;
        Self::from_mountinfo(&mountinfo, |path| std::fs::read_to_string(path).ok())
    }

    fn from_mountinfo(mountinfo: &str, read: impl Fn(&Path) -> Option<String>) -> Result<Self, CgroupError> {
        let mut v1 = BTreeMap::new();
        let mut v2_root = None;
        for line in mountinfo.lines() {
            // Fields: id parent major:minor root mountpoint options [optional...] - fstype source superoptions
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if left.len() < 5 || right.len() < 3 {
                continue;
            }
            let mount_point = PathBuf::from(left[4]);
            match right[0] {
                "cgroup2" => v2_root = Some(mount_point),
                "cgroup" => {
                    for option in right[2].split(',') {
                        for controller in ["memory", "cpu", "cpuacct", "pids", "freezer", "devices"] {
                            if option == controller {
                                v1.entry(controller).or_insert_with(|| mount_point.clone());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(root) = v2_root {
            let controllers = read(&root.join("cgroup.controllers")).unwrap_or_default();
            let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
            if has("memory") && has("pids") && has("cpu") {
                return Ok(Self::V2 { root });
            }
        }
        for needed in ["memory", "cpu", "pids"] {
            if !v1.contains_key(needed) {
                return Err(CgroupError::MissingController(needed));
            }
        }
        Ok(Self::V1 { mounts: v1 })
    }

    /// A short description for logs and `nook doctor`-style output.
    pub fn describe(&self) -> String {
        match self {
            Self::V2 { root } => format!("cgroup v2 at {}", root.display()),
            Self::V1 { mounts } => format!("cgroup v1 ({})", mounts.keys().copied().collect::<Vec<_>>().join(", ")),
        }
    }

    /// The directories a sandbox's cgroup occupies, one per distinct hierarchy; the memory one first.
    fn dirs_for(&self, sandbox_id: &str) -> Vec<PathBuf> {
        match self {
            Self::V2 { root } => vec![root.join(PARENT).join(sandbox_id)],
            Self::V1 { mounts } => {
                let mut dirs = vec![mounts["memory"].join(PARENT).join(sandbox_id)];
                for mount in mounts.values() {
                    let dir = mount.join(PARENT).join(sandbox_id);
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                dirs
            }
        }
    }

    /// Creates a sandbox's cgroup with its limits. An existing one (left by a crash) is reused and re-limited.
    pub fn create(&self, sandbox_id: &str, resources: &Resources) -> Result<SandboxCgroup, CgroupError> {
        if let Self::V2 { root } = self {
            enable_v2_controllers(root)?;
        }
        let cgroup = SandboxCgroup {
            host: self.clone(),
            dirs: self.dirs_for(sandbox_id),
        };
        for dir in &cgroup.dirs {
            std::fs::create_dir_all(dir).map_err(io_error("creating cgroup", dir))?;
        }
        if let Err(error) = cgroup.apply(resources) {
            let _ = cgroup.remove_dirs();
            return Err(error);
        }
        Ok(cgroup)
    }

    /// The cgroup a sandbox would have, without creating anything (to re-attach after a restart or clean up).
    pub fn existing(&self, sandbox_id: &str) -> SandboxCgroup {
        SandboxCgroup {
            host: self.clone(),
            dirs: self.dirs_for(sandbox_id),
        }
    }
}

fn enable_v2_controllers(root: &Path) -> Result<(), CgroupError> {
    let parent = root.join(PARENT);
    std::fs::create_dir_all(&parent).map_err(io_error("creating cgroup", &parent))?;
    for dir in [root.to_path_buf(), parent] {
        let control = dir.join("cgroup.subtree_control");
        let current = std::fs::read_to_string(&control).unwrap_or_default();
        if ["memory", "pids", "cpu"]
            .iter()
            .all(|c| current.split_whitespace().any(|x| x == *c))
        {
            continue;
        }
        std::fs::write(&control, "+memory +pids +cpu").map_err(io_error("enabling controllers in", &control))?;
    }
    Ok(())
}

/// One sandbox's cgroup (a directory in each hierarchy).
#[derive(Debug, Clone)]
pub struct SandboxCgroup {
    host: CgroupHost,
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    fn memory_dir(&self) -> &Path {
        &self.dirs[0]
    }

    fn controller_dir(&self, controller: &str) -> &Path {
        match &self.host {
            CgroupHost::V2 { .. } => &self.dirs[0],
            CgroupHost::V1 { mounts } => {
                let mount = &mounts[controller];
                self.dirs
                    .iter()
                    .find(|dir| dir.starts_with(mount))
                    .expect("a dir per hierarchy")
            }
        }
    }

    /// Writes the limits of a new cgroup: what is set once (no swap, the CPU period, the device rules), then the
    /// limits a resize changes.
    pub fn apply(&self, resources: &Resources) -> Result<(), CgroupError> {
        match &self.host {
            CgroupHost::V2 { .. } => write_if_present(&self.dirs[0], "memory.swap.max", "0")?,
            CgroupHost::V1 { mounts } => {
                write(
                    self.controller_dir("cpu"),
                    "cpu.cfs_period_us",
                    &CPU_PERIOD_US.to_string(),
                )?;
                if mounts.contains_key("devices") {
                    let dir = self.controller_dir("devices");
                    write(dir, "devices.deny", "a")?;
                    for rule in ALLOWED_DEVICES {
                        write(dir, "devices.allow", rule)?;
                    }
                }
            }
        }
        self.resize(resources)
    }

    /// Changes the CPU, memory and pids limits of a live cgroup (nothing else is rewritten, so its processes never
    /// see a device rule missing). On v1 the memory+swap limit must stay at least the memory limit, so it moves
    /// first when the limit grows and last when it shrinks. The kernel reclaims what it can when memory shrinks and
    /// refuses (`EBUSY`, v1) when it cannot; the caller checks the working set first.
    pub fn resize(&self, resources: &Resources) -> Result<(), CgroupError> {
        let memory = resources.memory_mb * 1024 * 1024;
        let quota = ((resources.cpu * CPU_PERIOD_US as f64).round() as u64).max(1000);
        match &self.host {
            CgroupHost::V2 { .. } => {
                let dir = &self.dirs[0];
                write(dir, "memory.max", &memory.to_string())?;
                write(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                write(dir, "pids.max", &resources.pids.to_string())?;
                self.set_auto_grow(auto_grows(resources), memory)?;
            }
            CgroupHost::V1 { .. } => {
                let dir = self.controller_dir("memory");
                let current = std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                    .ok()
                    .and_then(|text| text.trim().parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                if memory >= current {
                    write_if_present(dir, "memory.memsw.limit_in_bytes", &memory.to_string())?;
                    write(dir, "memory.limit_in_bytes", &memory.to_string())?;
                } else {
                    write(dir, "memory.limit_in_bytes", &memory.to_string())?;
                    write_if_present(dir, "memory.memsw.limit_in_bytes", &memory.to_string())?;
                }
                write(self.controller_dir("cpu"), "cpu.cfs_quota_us", &quota.to_string())?;
                write(self.controller_dir("pids"), "pids.max", &resources.pids.to_string())?;
                self.set_auto_grow(auto_grows(resources), memory)?;
            }
        }
        Ok(())
    }

    /// Sets the kernel's side of memory auto-grow for a limit of `memory` bytes. On: on v1 the cgroup's OOM killer is
    /// disabled, so that a process reaching the limit waits (and the OOM notification wakes the runner, which raises
    /// the limit) instead of being killed; on v2, `memory.high` is set a step below `memory.max`, so the sandbox is
    /// throttled and a `high` event wakes the runner before the limit is reached. Off: the kernel's defaults (a
    /// process waiting on v1 is then OOM-killed at once).
    pub fn set_auto_grow(&self, enabled: bool, memory: u64) -> Result<(), CgroupError> {
        match &self.host {
            CgroupHost::V1 { .. } => write(self.memory_dir(), "memory.oom_control", if enabled { "1" } else { "0" }),
            CgroupHost::V2 { .. } => {
                let high = if enabled {
                    memory.saturating_sub((memory / 8).max(8 << 20)).to_string()
                } else {
                    "max".to_string()
                };
                write(self.memory_dir(), "memory.high", &high)
            }
        }
    }

    /// Whether the sandbox needs more memory now: on v1, its processes wait at the limit (`under_oom`); on v2, it
    /// went over `memory.high` since the last look (`high_seen` keeps the count of `high` events looked at).
    pub fn needs_memory(&self, high_seen: &mut u64) -> bool {
        match self.host {
            CgroupHost::V1 { .. } => std::fs::read_to_string(self.memory_dir().join("memory.oom_control"))
                .is_ok_and(|text| stat_value(&text, "under_oom") == Some(1)),
            CgroupHost::V2 { .. } => {
                let high = std::fs::read_to_string(self.memory_dir().join("memory.events"))
                    .ok()
                    .and_then(|text| stat_value(&text, "high"))
                    .unwrap_or(0);
                let needs = high > *high_seen;
                *high_seen = high;
                needs
            }
        }
    }

    /// The `cgroup.procs` files a process writes its pid into to join the sandbox.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|dir| dir.join("cgroup.procs")).collect()
    }

    /// Pids currently in the sandbox's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.memory_dir().join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process still in the cgroup (processes a lost init left behind, or an init that was never
    /// recorded). Each pid is pinned with a pidfd and re-checked to be in this cgroup before it is signalled, so a
    /// recycled pid is never hit.
    pub fn kill_all(&self) {
        let marker = format!("/{PARENT}/{}", self.sandbox_id());
        for pid in self.pids() {
            let Ok(pidfd) = crate::container::PidFd::open(pid) else {
                continue;
            };
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if cgroup.lines().any(|line| line.ends_with(&marker)) {
                pidfd.kill();
            }
        }
    }

    fn sandbox_id(&self) -> String {
        self.memory_dir()
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether any of the cgroup's directories exists.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|dir| dir.exists())
    }

    /// The kernel's count of OOM kills in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.host {
            CgroupHost::V2 { .. } => ("memory.events", "oom_kill"),
            CgroupHost::V1 { .. } => ("memory.oom_control", "oom_kill"),
        };
        std::fs::read_to_string(self.memory_dir().join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                (name == key).then(|| value.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    }

    /// What the sandbox uses now. CPU time reads as zero where it is not accounted (a v1 host without the cpuacct
    /// controller, or a sandbox started before nook used it); the memory figures must be readable.
    pub fn usage(&self) -> Result<CgroupUsage, CgroupError> {
        let read = |dir: &Path, file: &str| {
            let path = dir.join(file);
            std::fs::read_to_string(&path).map_err(|source| CgroupError::Io {
                action: "reading",
                path,
                source,
            })
        };
        let number = |text: &str| text.trim().parse::<u64>().ok();
        let memory_dir = self.memory_dir();
        let stat = read(memory_dir, "memory.stat")?;
        let (usage_file, limit_file, inactive_key, cache_key) = match self.host {
            CgroupHost::V2 { .. } => ("memory.current", "memory.max", "inactive_file", "file"),
            CgroupHost::V1 { .. } => (
                "memory.usage_in_bytes",
                "memory.limit_in_bytes",
                "total_inactive_file",
                "total_cache",
            ),
        };
        let usage = number(&read(memory_dir, usage_file)?).unwrap_or(0);
        let inactive = stat_value(&stat, inactive_key).unwrap_or(0);
        // "max" on v2, and a page-rounded i64::MAX on v1, mean no limit.
        let memory_limit = read(memory_dir, limit_file)
            .ok()
            .and_then(|text| number(&text))
            .filter(|limit| *limit < 1 << 62);
        let cpu_ns = match &self.host {
            CgroupHost::V2 { .. } => read(memory_dir, "cpu.stat")
                .ok()
                .and_then(|text| stat_value(&text, "usage_usec"))
                .map(|usec| usec.saturating_mul(1000)),
            CgroupHost::V1 { mounts } => mounts
                .contains_key("cpuacct")
                .then(|| read(self.controller_dir("cpuacct"), "cpuacct.usage").ok())
                .flatten()
                .and_then(|text| number(&text)),
        };
        let pids = read(self.controller_dir("pids"), "pids.current")
            .ok()
            .and_then(|text| number(&text))
            .unwrap_or(0);
        Ok(CgroupUsage {
            cpu_ns: cpu_ns.unwrap_or(0),
            memory_used: usage.saturating_sub(inactive),
            memory_cache: stat_value(&stat, cache_key).unwrap_or(0),
            memory_limit,
            pids,
        })
    }

    /// The most memory charged to the cgroup at any moment since it was made (v1 `memory.max_usage_in_bytes`, v2
    /// `memory.peak`, which kernels before 5.19 lack).
    pub fn memory_peak(&self) -> Option<u64> {
        let file = match self.host {
            CgroupHost::V1 { .. } => "memory.max_usage_in_bytes",
            CgroupHost::V2 { .. } => "memory.peak",
        };
        std::fs::read_to_string(self.memory_dir().join(file))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    }

    /// Removes the cgroup's directories. The kernel refuses while processes remain, so this waits briefly for
    /// killed processes to finish exiting before giving up with [`CgroupError::Busy`].
    pub fn remove(&self) -> Result<(), CgroupError> {
        for attempt in 0..50 {
            match self.remove_dirs() {
                Ok(()) => return Ok(()),
                Err(CgroupError::Io { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                    if attempt == 49 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => return Err(error),
            }
        }
        Err(CgroupError::Busy(self.memory_dir().to_path_buf()))
    }

    fn remove_dirs(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CgroupError::Io {
                        action: "removing cgroup",
                        path: dir.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// The file that freezes the cgroup, and what it says when frozen or thawed (v1: `freezer.state`, v2:
    /// `cgroup.freeze`, whose state `cgroup.events` reports).
    fn freezer(&self) -> Result<Freezer, CgroupError> {
        match &self.host {
            CgroupHost::V2 { .. } => Ok(Freezer::V2(self.dirs[0].clone())),
            CgroupHost::V1 { mounts } if mounts.contains_key("freezer") => {
                Ok(Freezer::V1(self.controller_dir("freezer").to_path_buf()))
            }
            CgroupHost::V1 { .. } => Err(CgroupError::NoFreezer),
        }
    }

    /// Freezes (`true`) or thaws every process of the cgroup; returns once the kernel reports the whole cgroup in
    /// that state. A freeze that does not complete in time is undone.
    pub async fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let freezer = self.freezer()?;
        freezer.request(frozen)?;
        let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
        let mut pause = Duration::from_micros(100);
        while !freezer.reached(frozen)? {
            if tokio::time::Instant::now() >= deadline {
                if frozen {
                    let _ = freezer.request(false);
                    return Err(CgroupError::FreezeTimedOut);
                }
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Asks the kernel to thaw the cgroup without waiting (before killing what is in it: a frozen process dies of
    /// SIGKILL only once thawed). Nothing happens where the host has no freezer.
    pub fn thaw(&self) {
        if let Ok(freezer) = self.freezer() {
            let _ = freezer.request(false);
        }
    }

    /// Whether the cgroup is frozen (false where the host has no freezer).
    pub fn is_frozen(&self) -> bool {
        self.freezer()
            .and_then(|freezer| freezer.reached(true))
            .unwrap_or(false)
    }

    /// Starts watching for OOM kills; the returned watcher wakes on every memory event of the cgroup.
    pub fn watch_oom(&self) -> Result<OomWatcher, CgroupError> {
        match self.host {
            CgroupHost::V1 { .. } => OomWatcher::v1(self.memory_dir()),
            CgroupHost::V2 { .. } => OomWatcher::v2(self.memory_dir()),
        }
    }
}

/// Whether these limits let the memory limit grow on its own.
fn auto_grows(resources: &Resources) -> bool {
    resources
        .memory_max_mb
        .is_some_and(|ceiling| ceiling > resources.memory_mb)
}

/// What a sandbox's cgroup accounts now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time used by its processes, in nanoseconds.
    pub cpu_ns: u64,
    /// Memory charged, less the inactive file pages the kernel would reclaim first.
    pub memory_used: u64,
    /// Page cache charged (file-backed pages).
    pub memory_cache: u64,
    /// The memory limit, when one is set.
    pub memory_limit: Option<u64>,
    /// Processes and threads.
    pub pids: u64,
}

/// The value of `key` in a flat-keyed cgroup file (`memory.stat`, `cpu.stat`).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok()).flatten()
    })
}

/// A sandbox cgroup's freezer.
enum Freezer {
    /// The v1 freezer controller's directory.
    V1(PathBuf),
    /// The v2 cgroup's directory.
    V2(PathBuf),
}

impl Freezer {
    /// Asks the kernel to freeze or thaw.
    fn request(&self, frozen: bool) -> Result<(), CgroupError> {
        match self {
            Self::V1(dir) => write(dir, "freezer.state", if frozen { "FROZEN" } else { "THAWED" }),
            Self::V2(dir) => write(dir, "cgroup.freeze", if frozen { "1" } else { "0" }),
        }
    }

    /// Whether the whole cgroup is in the state asked for.
    fn reached(&self, frozen: bool) -> Result<bool, CgroupError> {
        let (file, text) = match self {
            Self::V1(dir) => (dir.join("freezer.state"), if frozen { "FROZEN" } else { "THAWED" }),
            Self::V2(dir) => (dir.join("cgroup.events"), if frozen { "frozen 1" } else { "frozen 0" }),
        };
        let state = std::fs::read_to_string(&file).map_err(|source| CgroupError::Io {
            action: "reading",
            path: file,
            source,
        })?;
        Ok(state.lines().any(|line| line.trim() == text))
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| CgroupError::Io {
        action: "writing",
        path,
        source,
    })
}

fn write_if_present(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    if dir.join(file).exists() {
        write(dir, file, value)
    } else {
        Ok(())
    }
}

/// Wakes when the kernel reports memory events (v1: eventfd on `memory.oom_control`; v2: inotify on
/// `memory.events`). Holds only file descriptors; drop it to stop watching.
pub struct OomWatcher {
    fd: AsyncFd<OwnedFd>,
    /// v1 keeps `memory.oom_control` open for as long as the eventfd is registered.
    _control: Option<std::fs::File>,
}

impl OomWatcher {
    fn v1(dir: &Path) -> Result<Self, CgroupError> {
        let control_path = dir.join("memory.oom_control");
        let control = std::fs::File::open(&control_path).map_err(io_error("opening", &control_path))?;
        // SAFETY: eventfd with valid flags returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(CgroupError::Io {
                action: "creating an eventfd for",
                path: control_path,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        let registration = format!("{} {}", eventfd.as_raw_fd(), control.as_raw_fd());
        write(dir, "cgroup.event_control", &registration)?;
        let fd = crate::container::register_fd(eventfd, tokio::io::Interest::READABLE)
            .map_err(io_error("registering eventfd for", &control_path))?;
        Ok(Self {
            fd,
            _control: Some(control),
        })
    }

    fn v2(dir: &Path) -> Result<Self, CgroupError> {
        let events = dir.join("memory.events");
        // SAFETY: inotify_init1 with valid flags returns a new descriptor or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return Err(CgroupError::Io {
                action: "creating an inotify watch for",
                path: events,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_path = std::ffi::CString::new(events.as_os_str().as_encoded_bytes()).expect("no NUL in cgroup path");
        // SAFETY: valid descriptor and NUL-terminated path.
        if unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), c_path.as_ptr(), libc::IN_MODIFY) } < 0 {
            return Err(CgroupError::Io {
                action: "watching",
                path: events,
                source: std::io::Error::last_os_error(),
            });
        }
        let fd = crate::container::register_fd(inotify, tokio::io::Interest::READABLE)
            .map_err(io_error("registering inotify for", &events))?;
        Ok(Self { fd, _control: None })
    }

    /// Waits for the next memory event. Returns an error when the descriptor fails (for example after the cgroup
    /// was removed).
    pub async fn next(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            // SAFETY: reading into a stack buffer of the given length from a descriptor we own.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(());
            }
            let error = std::io::Error::last_os_error();
            if n < 0 && error.kind() == std::io::ErrorKind::WouldBlock {
                guard.clear_ready();
                continue;
            }
            return Err(if n == 0 {
                std::io::ErrorKind::UnexpectedEof.into()
            } else {
                error
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 1 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_with_empty_v2_uses_v1_controllers() {
        let host = CgroupHost::from_mountinfo(HYBRID, |_| Some(String::new())).unwrap();
        let CgroupHost::V1 { mounts } = &host else {
            panic!("expected v1: {host:?}")
        };
        assert_eq!(mounts["memory"], Path::new("/sys/fs/cgroup/memory"));
        let dirs = host.dirs_for("sb-x");
        assert_eq!(dirs[0], Path::new("/sys/fs/cgroup/memory/nook/sb-x"));
        assert_eq!(dirs.len(), 3);
    }

    #[test]
    fn v2_with_controllers_is_preferred() {
        let host = CgroupHost::from_mountinfo(HYBRID, |_| Some("cpu memory pids io".into())).unwrap();
        assert!(matches!(host, CgroupHost::V2 { .. }));
        assert_eq!(
            host.dirs_for("sb-x"),
            vec![PathBuf::from("/sys/fs/cgroup/unified/nook/sb-x")]
        );
    }

    #[test]
    fn comounted_v1_controllers_share_one_directory() {
        let mountinfo = "\
31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";
        let host = CgroupHost::from_mountinfo(mountinfo, |_| None).unwrap();
        assert_eq!(host.dirs_for("a").len(), 3);
    }

    #[test]
    fn usage_reads_v1_and_v2_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| root.path().join(name).join(PARENT).join("sb-x");
        let mounts: BTreeMap<&'static str, PathBuf> = ["memory", "cpu", "cpuacct", "pids"]
            .into_iter()
            .map(|name| (name, root.path().join(name)))
            .collect();
        let v1 = CgroupHost::V1 { mounts }.existing("sb-x");
        for name in ["memory", "cpu", "cpuacct", "pids"] {
            std::fs::create_dir_all(dir(name)).unwrap();
        }
        std::fs::write(dir("memory").join("memory.usage_in_bytes"), "10485760\n").unwrap();
        std::fs::write(dir("memory").join("memory.limit_in_bytes"), "268435456\n").unwrap();
        std::fs::write(
            dir("memory").join("memory.stat"),
            "cache 99\ninactive_file 99\ntotal_cache 3145728\ntotal_inactive_file 2097152\n",
        )
        .unwrap();
        std::fs::write(dir("cpuacct").join("cpuacct.usage"), "1500000000\n").unwrap();
        std::fs::write(dir("pids").join("pids.current"), "3\n").unwrap();
        assert_eq!(
            v1.usage().unwrap(),
            CgroupUsage {
                cpu_ns: 1_500_000_000,
                memory_used: 8 << 20,
                memory_cache: 3 << 20,
                memory_limit: Some(256 << 20),
                pids: 3,
            }
        );
        let v2 = CgroupHost::V2 {
            root: root.path().join("unified"),
        }
        .existing("sb-x");
        let dir = root.path().join("unified").join(PARENT).join("sb-x");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("memory.stat"), "anon 4096\nfile 0\ninactive_file 0\n").unwrap();
        std::fs::write(dir.join("cpu.stat"), "usage_usec 250\nuser_usec 200\n").unwrap();
        let usage = v2.usage().unwrap();
        assert_eq!(
            (usage.cpu_ns, usage.memory_used, usage.memory_limit),
            (250_000, 4096, None)
        );
    }

    #[test]
    fn missing_controller_is_named() {
        let mountinfo = "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let error = CgroupHost::from_mountinfo(mountinfo, |_| None).unwrap_err();
        assert!(error.to_string().contains("cpu"), "{error}");
    }
}
