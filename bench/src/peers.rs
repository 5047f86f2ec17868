//! The peers: runc and gVisor's runsc running `/bin/true` from the same root filesystem nook's sandboxes use.
//!
//! The base image's unpacked layer (owned by the nook server) is never written: it is the read-only lower layer of
//! an overlayfs mounted in the bench's work directory, and the OCI bundles point `root.path` at that mount (with
//! `root.readonly` set; the upper layer only receives the mount points a runtime may create). Each bundle's
//! `config.json` is made by `runc spec` and then edited.
//!
//! Series, each after one untimed warm-up:
//! * `runc run`: the whole create+start+wait+delete of a container running `/bin/true`.
//! * `runc exec`: one detached container running `sleep infinity`, then `runc exec <id> /bin/true` repeatedly — the
//!   path docker-exec-like peers take.
//! * `runsc run`: like `runc run`, under `runsc --platform=systrap --network=none`; a few flag sets are probed and the
//!   first that works is used. When none does, runsc is reported unavailable with the reasons.
//!
//! Each runtime keeps its state under its own `--root` in the work directory, so every container listed there at the
//! end is the bench's, and is deleted.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::interrupt::Interrupt;
use crate::server::tail;
use crate::stats::Summary;

/// How long one runtime invocation may take before it is killed and counted as a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Extra runsc flag sets tried in order; the first one under which `/bin/true` runs is used.
const RUNSC_FLAG_SETS: &[&[&str]] = &[&[], &["--ignore-cgroups"], &["--ignore-cgroups", "--overlay2=none"]];

/// What the peer benchmarks need.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// The runc binary.
    pub runc: PathBuf,
    /// The runsc binary, or why there is none.
    pub runsc: Result<PathBuf, String>,
    /// The unpacked base layer (read-only lower layer of the peers' root filesystem).
    pub base_layer: PathBuf,
    /// A directory of the bench's own for bundles, overlay layers and runtime state.
    pub work: PathBuf,
    /// Timed runs per series.
    pub runs: usize,
}

/// A series' result: its figures, or why it could not be measured.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The series ran.
    Measured(Summary),
    /// The runtime is missing or failed; the text says why.
    Unavailable(String),
}

impl Outcome {
    fn from_result(name: &str, result: anyhow::Result<Summary>) -> Self {
        match result {
            Ok(summary) => Self::Measured(summary),
            Err(error) => {
                eprintln!("{name} is unavailable: {error:#}");
                Self::Unavailable(format!("{error:#}"))
            }
        }
    }

    /// The figures, when measured.
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            Self::Measured(summary) => Some(summary),
            Self::Unavailable(_) => None,
        }
    }
}

/// Everything measured on the peers.
#[derive(Debug, Clone)]
pub struct PeerFigures {
    /// `runc run` of `/bin/true`.
    pub runc_run: Outcome,
    /// `runc exec` of `/bin/true` into a running container.
    pub runc_exec: Outcome,
    /// `runsc run` of `/bin/true`.
    pub runsc_run: Outcome,
    /// `runc --version`, first line.
    pub runc_version: String,
    /// `runsc --version`, first line, when runsc is installed.
    pub runsc_version: Option<String>,
    /// The full runsc global flags used, when runsc ran.
    pub runsc_flags: Option<String>,
}

/// Runs every peer series.
pub fn bench(options: &PeerOptions, interrupt: &Interrupt) -> anyhow::Result<PeerFigures> {
    let rootfs = Overlay::mount(&options.base_layer, &options.work.join("rootfs-overlay"))?;
    let runc = Runtime::new(
        &options.runc,
        options.work.join("runc-state"),
        &[],
        options.work.join("runc.log"),
    );
    let runc_version = version(&options.runc);

    let true_bundle = options.work.join("bundle-true");
    let sleep_bundle = options.work.join("bundle-sleep");
    make_bundle(&options.runc, &true_bundle, rootfs.merged(), &["/bin/true"])?;
    make_bundle(
        &options.runc,
        &sleep_bundle,
        rootfs.merged(),
        &["/bin/sleep", "infinity"],
    )?;

    let runc_run = Outcome::from_result(
        "runc run",
        run_series("runc run", &runc, &true_bundle, options.runs, interrupt),
    );
    interrupt.check()?;
    let runc_exec = Outcome::from_result("runc exec", exec_series(&runc, &sleep_bundle, options.runs, interrupt));
    runc.delete_leftovers();
    interrupt.check()?;

    let (runsc_run, runsc_version, runsc_flags) = match &options.runsc {
        Err(reason) => (Outcome::Unavailable(reason.clone()), None, None),
        Ok(binary) => {
            let version = version(binary);
            match probe_runsc(binary, &options.work, &true_bundle, interrupt) {
                Ok(runsc) => {
                    let flags = runsc.global.join(" ");
                    let result = run_series("runsc run", &runsc, &true_bundle, options.runs, interrupt);
                    runsc.delete_leftovers();
                    (Outcome::from_result("runsc run", result), Some(version), Some(flags))
                }
                Err(error) => (Outcome::from_result("runsc run", Err(error)), Some(version), None),
            }
        }
    };
    drop(rootfs);
    Ok(PeerFigures {
        runc_run,
        runc_exec,
        runsc_run,
        runc_version,
        runsc_version,
        runsc_flags,
    })
}

/// `name`: `n` timed `RUNTIME run --bundle BUNDLE <unique id>` calls after one warm-up.
fn run_series(
    name: &str,
    runtime: &Runtime,
    bundle: &Path,
    n: usize,
    interrupt: &Interrupt,
) -> anyhow::Result<Summary> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..=n {
        interrupt.check()?;
        if i == 0 {
            eprintln!("{name}: warm-up run (not timed)...");
        } else if i % 10 == 0 || i == n {
            eprintln!("{name} {i}/{n}...");
        }
        let id = format!("nook-bench-{}-{i}", std::process::id());
        let took = runtime.call(&["run", "--bundle", &bundle.to_string_lossy(), &id])?;
        if i > 0 {
            samples.push(took);
        }
    }
    Summary::of(&samples).context("no samples: pass --peer-runs 1 or more")
}

/// A detached `sleep infinity` container, then `n` timed `runc exec <id> /bin/true` after one warm-up; the container
/// is deleted at the end.
fn exec_series(runtime: &Runtime, bundle: &Path, n: usize, interrupt: &Interrupt) -> anyhow::Result<Summary> {
    let id = format!("nook-bench-{}-sleep", std::process::id());
    eprintln!("runc exec: starting a detached `sleep infinity` container...");
    runtime.call(&["run", "--detach", "--bundle", &bundle.to_string_lossy(), &id])?;
    let result = (|| {
        let mut samples = Vec::with_capacity(n);
        for i in 0..=n {
            interrupt.check()?;
            if i > 0 && (i % 10 == 0 || i == n) {
                eprintln!("runc exec {i}/{n}...");
            }
            let took = runtime.call(&["exec", &id, "/bin/true"])?;
            if i > 0 {
                samples.push(took);
            }
        }
        Summary::of(&samples).context("no samples: pass --peer-runs 1 or more")
    })();
    if let Err(error) = runtime.call(&["delete", "--force", &id]) {
        eprintln!("could not delete runc container {id}: {error:#}");
    }
    result
}

/// Finds runsc global flags under which the `/bin/true` bundle runs, trying [`RUNSC_FLAG_SETS`] in order.
fn probe_runsc(binary: &Path, work: &Path, bundle: &Path, interrupt: &Interrupt) -> anyhow::Result<Runtime> {
    let mut reasons = Vec::new();
    for (i, extra) in RUNSC_FLAG_SETS.iter().enumerate() {
        interrupt.check()?;
        let mut global = vec!["--platform=systrap", "--network=none"];
        global.extend_from_slice(extra);
        let runtime = Runtime::new(
            binary,
            work.join(format!("runsc-state-{i}")),
            &global,
            work.join("runsc.log"),
        );
        eprintln!("runsc: trying {}...", runtime.global.join(" "));
        let id = format!("nook-bench-{}-probe-{i}", std::process::id());
        match runtime.call(&["run", "--bundle", &bundle.to_string_lossy(), &id]) {
            Ok(_) => return Ok(runtime),
            Err(error) => {
                eprintln!("runsc with `{}` failed: {error:#}", runtime.global.join(" "));
                reasons.push(format!("with `{}`: {error:#}", runtime.global.join(" ")));
                runtime.delete_leftovers();
            }
        }
    }
    bail!("runsc could not run /bin/true: {}", reasons.join("; "))
}

/// An OCI runtime binary with its global flags, its own state directory and a log file for its stderr.
#[derive(Debug)]
struct Runtime {
    binary: PathBuf,
    /// Global flags other than `--root`, as shown in the report.
    global: Vec<String>,
    state: PathBuf,
    log: PathBuf,
}

impl Runtime {
    fn new(binary: &Path, state: PathBuf, global: &[&str], log: PathBuf) -> Self {
        Self {
            binary: binary.to_path_buf(),
            global: global.iter().map(|flag| flag.to_string()).collect(),
            state,
            log,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.arg("--root").arg(&self.state).args(&self.global).args(args);
        command
    }

    /// Runs one invocation and returns its wall time (spawn to reap). Fails, with the end of its stderr, when it
    /// exits non-zero or takes longer than [`CALL_TIMEOUT`].
    fn call(&self, args: &[&str]) -> anyhow::Result<Duration> {
        let log = File::create(&self.log).with_context(|| format!("creating {}", self.log.display()))?;
        let mut command = self.command(args);
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let shown = format!("{} {}", self.binary.display(), args.join(" "));
        let t0 = Instant::now();
        let mut child = command.spawn().with_context(|| format!("starting `{shown}`"))?;
        let watchdog = Watchdog::arm(child.id(), CALL_TIMEOUT);
        let status = child.wait().with_context(|| format!("waiting for `{shown}`"));
        let took = t0.elapsed();
        let killed = watchdog.disarm();
        let status = status?;
        if killed {
            bail!("`{shown}` took longer than {} s and was killed", CALL_TIMEOUT.as_secs());
        }
        if !status.success() {
            bail!("`{shown}` failed ({status}): {}", tail(&self.log, 5).trim());
        }
        Ok(took)
    }

    /// Force-deletes every container left in this runtime's state directory (all of them are the bench's).
    fn delete_leftovers(&self) {
        let Ok(output) = self.command(&["list", "--quiet"]).stdin(Stdio::null()).output() else {
            return;
        };
        for id in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            eprintln!("deleting leftover container {id}...");
            let deleted = self
                .command(&["delete", "--force", id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(deleted, Ok(status) if status.success()) {
                eprintln!("could not delete container {id} under {}", self.state.display());
            }
        }
    }
}

/// Kills a child process with SIGKILL if it is still running after a timeout.
struct Watchdog {
    done: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    fn arm(pid: u32, timeout: Duration) -> Self {
        let (done, wait) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || match wait.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(pid) = i32::try_from(pid) {
                    // The child is reaped only just before `disarm`; with a timeout this long, a kill landing
                    // on a reused pid would need the call to end within microseconds of the deadline.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                true
            }
            _ => false,
        });
        Self { done, thread }
    }

    /// Stops watching; true when the watchdog killed the child.
    fn disarm(self) -> bool {
        let _ = self.done.send(());
        self.thread.join().unwrap_or(false)
    }
}

/// `BINARY --version`, first line, or a note that it did not answer.
fn version(binary: &Path) -> String {
    match Command::new(binary).arg("--version").stdin(Stdio::null()).output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Ok(output) => format!("(`{} --version` failed: {})", binary.display(), output.status),
        Err(error) => format!("(cannot run {}: {error})", binary.display()),
    }
}

/// Writes an OCI bundle in `dir`: `runc spec`'s default config, edited to run `args` without a terminal on the
/// read-only root `rootfs`.
fn make_bundle(runc: &Path, dir: &Path, rootfs: &Path, args: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("config.json");
    let output = Command::new(runc)
        .arg("spec")
        .arg("--bundle")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} spec", runc.display()))?;
    if !output.status.success() {
        bail!(
            "`{} spec --bundle {}` failed ({}): {}",
            runc.display(),
            dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let mut config: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config_path.display()))?;
    edit_config(&mut config, rootfs, args)?;
    let text = serde_json::to_string_pretty(&config).context("serialising the edited config.json")?;
    std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))
}

/// Sets the process arguments, turns the terminal off and points the read-only root at `rootfs`.
fn edit_config(config: &mut Value, rootfs: &Path, args: &[&str]) -> anyhow::Result<()> {
    let process = config
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .context("runc spec's config.json has no process object")?;
    process.insert("args".into(), json!(args));
    process.insert("terminal".into(), json!(false));
    let root = config
        .as_object_mut()
        .context("runc spec's config.json is not an object")?
        .entry("root")
        .or_insert_with(|| json!({}));
    let root = root
        .as_object_mut()
        .context("runc spec's config.json root is not an object")?;
    root.insert("path".into(), json!(rootfs.to_string_lossy()));
    root.insert("readonly".into(), json!(true));
    Ok(())
}

/// An overlayfs mount whose lower layer is a directory the bench must not write; unmounted on drop.
#[derive(Debug)]
struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    /// Mounts `lower` (read-only lower layer) with a fresh upper layer under `dir`, at `dir/merged`.
    fn mount(lower: &Path, dir: &Path) -> anyhow::Result<Self> {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let merged = dir.join("merged");
        for path in [&upper, &work, &merged] {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        }
        for path in [lower, &upper, &work] {
            let text = path.to_string_lossy();
            if text.contains([',', ':']) {
                bail!(
                    "{} contains ',' or ':', which overlayfs options cannot carry",
                    path.display()
                );
            }
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .with_context(|| format!("mounting an overlay of {} at {}", lower.display(), merged.display()))?;
        Ok(Self { merged })
    }

    fn merged(&self) -> &Path {
        &self.merged
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if umount2(&self.merged, MntFlags::empty()).is_err() {
            if let Err(error) = umount2(&self.merged, MntFlags::MNT_DETACH) {
                eprintln!("could not unmount {}: {error}", self.merged.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_config_sets_args_terminal_and_read_only_root() {
        let mut config = json!({
            "process": {"terminal": true, "args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "runc"
        });
        edit_config(&mut config, Path::new("/b/rootfs"), &["/bin/true"]).unwrap();
        assert_eq!(config["process"]["args"], json!(["/bin/true"]));
        assert_eq!(config["process"]["terminal"], json!(false));
        assert_eq!(config["process"]["cwd"], json!("/"));
        assert_eq!(config["root"], json!({"path": "/b/rootfs", "readonly": true}));
        assert_eq!(config["hostname"], json!("runc"));
    }

    #[test]
    fn edit_config_rejects_a_config_without_process() {
        let mut config = json!({"root": {}});
        assert!(edit_config(&mut config, Path::new("/r"), &["/bin/true"]).is_err());
    }
}
