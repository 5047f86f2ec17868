//! `nook-bench`: measures nook's create→first exec and exec round trip against runc and runsc running the same
//! root filesystem on the same machine, plus nook's background process start→first output and file upload and
//! download throughput, image push and pull through a registry on loopback, Dockerfile builds and cached rebuilds,
//! fork, snapshot and live resize times against the data a sandbox wrote, and prints a markdown report of figures and
//! ratios (never pass/fail).
//!
//! Flow: make a work directory under `--work-dir`; start the bench's own `nook serve` there (fresh data directory,
//! free loopback port, random admin key) and wait for its health check; run the nook series through the Rust client
//! (sampling the server's peak resident memory before and after the file transfers);
//! find the base image's unpacked layer in the server's data directory and run the peer series on it; then delete
//! every sandbox, stop the server, remove the work directory and print the report on stdout. Progress goes to
//! stderr. The exit status is non-zero only when setup or a nook call failed; peers that cannot run are reported as
//! unavailable.

mod builds;
mod egress;
mod images;
mod interpreter;
mod interrupt;
mod machine;
mod nook;
mod peers;
mod preview;
mod report;
mod server;
mod stateful;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use nix::mount::{umount2, MntFlags};
use nook_client::Client;
use rand::Rng as _;

use crate::builds::BuildFigures;
use crate::images::ImageFigures;
use crate::interpreter::InterpreterFigures;
use crate::interrupt::Interrupt;
use crate::machine::MachineFacts;
use crate::nook::{CreateFigures, FileFigures, PauseFigures, Sandboxes};
use crate::peers::{PeerFigures, PeerOptions};
use crate::server::{MemoryAroundFiles, NookServer, ServerOptions};
use crate::stats::Summary;

/// Benchmarks nook against runc and runsc on this machine and prints a markdown report.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The nook binary.
    #[arg(long, default_value = "target/release/nook")]
    nook: PathBuf,
    /// The static nook-agent binary.
    #[arg(long, default_value = "target/x86_64-unknown-linux-gnu/release/nook-agent")]
    agent: PathBuf,
    /// The base rootfs tar (scripts/build-base-image.sh prints its path).
    #[arg(long, env = "NOOK_BASE_IMAGE_TAR")]
    base_image_tar: PathBuf,
    /// Timed create→first exec samples (sandboxes created one after another).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    sandboxes: u32,
    /// Timed exec round trips in one sandbox.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    execs: u32,
    /// Timed background processes (`echo ready`, timed to the first output line) in one sandbox.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    processes: u32,
    /// Timed keystrokes echoed by a terminal over the WebSocket.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    keystrokes: u32,
    /// Timed code-interpreter sandboxes (E2B API, create → first `1+1` result).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    interpreter_sandboxes: u32,
    /// Timed code-interpreter executions (`1+1`) in one warm kernel.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    interpreter_runs: u32,
    /// Size of the file uploaded and downloaded in the file throughput series, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    file_mib: u32,
    /// Timed upload+download runs in the file throughput series.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    file_runs: u32,
    /// Pause+resume pairs timed in the pause series.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pauses: u32,
    /// Unchanged rebuilds timed in the Dockerfile build series.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    rebuilds: u32,
    /// Timed runs per peer series (runc run, runc exec, runsc run).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    peer_runs: u32,
    /// The runc binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
    /// The runsc binary [default: `runsc` on PATH, if any].
    #[arg(long)]
    runsc: Option<PathBuf>,
    /// Do not run runsc; report it as not installed.
    #[arg(long, conflicts_with = "runsc")]
    no_runsc: bool,
    /// Timed requests each way (straight to a sandbox, through the preview proxy) in the preview series.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    preview_requests: u32,
    /// Timed requests each way (new connection, kept-alive) in the egress proxy series.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    egress_requests: u32,
    /// Timed live resizes (CPU and memory, alternately up and down).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    resizes: u32,
    /// Where the bench makes its work directory (server data, bundles, runtime state); removed at the end.
    #[arg(long, default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// How long the server may take to import the base image and answer its health check.
    #[arg(long, default_value_t = 180)]
    ready_timeout_s: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nook-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let interrupt = Interrupt::install()?;
    let machine = MachineFacts::gather();
    for (what, path) in [
        ("nook binary", &args.nook),
        ("nook-agent binary", &args.agent),
        ("base image tar", &args.base_image_tar),
    ] {
        if !path.is_file() {
            bail!(
                "the {what} {} does not exist (run scripts/build.sh and scripts/build-base-image.sh)",
                path.display()
            );
        }
    }
    let runc = find_on_path(&args.runc).with_context(|| format!("runc not found: {}", args.runc.display()))?;
    let runsc = match (&args.runsc, args.no_runsc) {
        (_, true) => Err("runsc is not installed (bench/run.sh could not install a current one)".to_string()),
        (Some(path), false) => find_on_path(path).ok_or_else(|| format!("runsc not found at {}", path.display())),
        (None, false) => find_on_path(Path::new("runsc")).ok_or_else(|| "runsc is not on PATH".to_string()),
    };

    let work = make_work_dir(&args.work_dir)?;
    eprintln!("work directory: {}", work.display());
    let measured = measure(args, &work, runc, runsc, &interrupt);
    let removed = remove_work_dir(&work);
    let figures = measured?;
    removed?;
    print!(
        "{}",
        report::render(&report::Report {
            machine: &machine,
            nook_version: &figures.nook.version,
            create: &figures.nook.create,
            create_no_network: &figures.nook.create_no_network,
            exec: &figures.nook.exec,
            pauses: &figures.nook.pauses,
            processes: &figures.nook.processes,
            keystrokes: &figures.nook.keystrokes,
            interpreter: &figures.nook.interpreter,
            files: &figures.nook.files,
            server_memory: &figures.nook.server_memory,
            images: &figures.nook.images,
            builds: &figures.nook.builds,
            stateful: &figures.nook.stateful,
            preview: &figures.nook.preview,
            egress: &figures.nook.egress,
            peers: &figures.peers,
        })
    );
    Ok(())
}

/// What [`measure`] returns.
struct Figures {
    nook: NookFigures,
    peers: PeerFigures,
}

/// The nook series' figures.
struct NookFigures {
    version: String,
    /// The base image's unpacked layer, which the peers run on.
    base_layer: PathBuf,
    create: CreateFigures,
    create_no_network: CreateFigures,
    exec: Summary,
    pauses: PauseFigures,
    processes: Summary,
    keystrokes: Summary,
    interpreter: InterpreterFigures,
    files: FileFigures,
    server_memory: MemoryAroundFiles,
    images: ImageFigures,
    builds: BuildFigures,
    stateful: stateful::StatefulFigures,
    preview: preview::PreviewFigures,
    egress: egress::EgressFigures,
}

/// Starts the server, runs every series, then deletes the sandboxes and stops the server whatever happened.
fn measure(
    args: &Args,
    work: &Path,
    runc: PathBuf,
    runsc: Result<PathBuf, String>,
    interrupt: &Interrupt,
) -> anyhow::Result<Figures> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let data_dir = work.join("data");
    let config = work.join("config.toml");
    std::fs::write(&config, egress::server_config()).context("writing the server's config")?;
    let mut server = NookServer::spawn(&ServerOptions {
        nook: args.nook.clone(),
        agent: args.agent.clone(),
        base_image_tar: args.base_image_tar.clone(),
        data_dir: data_dir.clone(),
        log: work.join("server.log"),
        storage_image: work.join("storage.img"),
        config,
    })?;
    let client = Client::new(&server.url, &server.key).context("making the nook client")?;
    let mut sandboxes = Sandboxes::default();

    let result = (|| {
        eprintln!(
            "starting nook serve at {} (the first start imports the base image)...",
            server.url
        );
        let nook = runtime.block_on(async {
            server
                .wait_ready(&client, Duration::from_secs(args.ready_timeout_s), interrupt)
                .await?;
            let version = client.health().await.context("asking nook for its version")?.version;
            let base_layer = base_layer_dir(&client, &data_dir).await?;
            let create =
                nook::create_to_first_exec(&client, args.sandboxes as usize, None, &mut sandboxes, interrupt).await?;
            eprintln!("the same without a network interface...");
            let create_no_network = nook::create_to_first_exec(
                &client,
                args.sandboxes as usize,
                Some(nook_api::NetworkPolicy::none()),
                &mut sandboxes,
                interrupt,
            )
            .await?;
            let exec = nook::exec_round_trip(&client, args.execs as usize, &mut sandboxes, interrupt).await?;
            let pauses = nook::pause_resume(&client, args.pauses as usize, &mut sandboxes, interrupt).await?;
            let processes =
                nook::background_first_output(&client, args.processes as usize, &mut sandboxes, interrupt).await?;
            let keystrokes = nook::terminal_echo(&client, args.keystrokes as usize, &mut sandboxes, interrupt).await?;
            let interpreter = interpreter::code_interpreter(
                &client,
                &server.url,
                &server.key,
                args.interpreter_sandboxes as usize,
                args.interpreter_runs as usize,
                &mut sandboxes,
                interrupt,
            )
            .await?;
            let before = server
                .memory()
                .context("reading the server's memory before the file transfers")?;
            let files = nook::file_throughput(
                &client,
                u64::from(args.file_mib),
                args.file_runs as usize,
                &mut sandboxes,
                interrupt,
            )
            .await?;
            let after = server
                .memory()
                .context("reading the server's memory after the file transfers")?;
            eprintln!(
                "nook serve peak RSS: {} MiB before the file transfers, {} MiB after",
                before.peak_kib / 1024,
                after.peak_kib / 1024
            );
            let images = images::image_transfers(&client, work, &mut sandboxes, interrupt).await?;
            let builds = builds::build_series(&client, args.rebuilds as usize, interrupt).await?;
            let stateful = stateful::stateful_series(&client, args.resizes as usize, &mut sandboxes, interrupt).await?;
            let preview = preview::preview_series(
                &client,
                &server.url,
                args.preview_requests as usize,
                &mut sandboxes,
                interrupt,
            )
            .await?;
            let egress = egress::egress_series(&client, args.egress_requests as usize, &mut sandboxes).await?;
            anyhow::Ok(NookFigures {
                version,
                base_layer,
                create,
                create_no_network,
                exec,
                pauses,
                processes,
                keystrokes,
                interpreter,
                files,
                server_memory: MemoryAroundFiles { before, after },
                images,
                builds,
                stateful,
                preview,
                egress,
            })
        })?;
        let peers = peers::bench(
            &PeerOptions {
                runc,
                runsc,
                base_layer: nook.base_layer.clone(),
                work: work.join("peers"),
                runs: args.peer_runs as usize,
            },
            interrupt,
        )?;
        anyhow::Ok(Figures { nook, peers })
    })();

    if result.is_err() {
        eprintln!("the server's log ends with:\n{}", server.log_tail(20));
    }
    let left = runtime.block_on(sandboxes.delete_all(&client));
    for failure in &left {
        eprintln!("could not delete sandbox {failure}");
    }
    eprintln!("stopping nook serve...");
    server.stop()?;
    let figures = result?;
    if !left.is_empty() {
        bail!("{} sandbox(es) could not be deleted: {}", left.len(), left.join("; "));
    }
    Ok(figures)
}

/// The unpacked directory of the `base` image's (only) layer in the server's data directory.
async fn base_layer_dir(client: &Client, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let images = client.list_images().await.context("listing nook's images")?;
    let base = images
        .iter()
        .find(|image| image.name == "base")
        .context("nook has no image named `base` (was NOOK_BASE_IMAGE_TAR imported?)")?;
    let layer = base.layers.first().context("image `base` has no layers")?;
    let hex = layer
        .strip_prefix("sha256:")
        .with_context(|| format!("layer digest {layer} is not a sha256 digest"))?;
    let dir = data_dir.join("runner/layers/sha256").join(hex);
    if !dir.is_dir() {
        bail!("the base layer's directory {} does not exist", dir.display());
    }
    Ok(dir)
}

/// `program` if it names a file, else the first match on `PATH`.
fn find_on_path(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Creates `parent/nook-bench-<pid>-<random>`.
fn make_work_dir(parent: &Path) -> anyhow::Result<PathBuf> {
    let dir = parent.join(format!(
        "nook-bench-{}-{:08x}",
        std::process::id(),
        rand::thread_rng().gen::<u32>()
    ));
    std::fs::create_dir(&dir).with_context(|| format!("creating the work directory {}", dir.display()))?;
    Ok(dir)
}

/// Removes the work directory after detaching anything still mounted below it, so removal never reaches into a
/// mounted filesystem.
fn remove_work_dir(dir: &Path) -> anyhow::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut mounted: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|mount_point| mount_point.starts_with(dir))
        .collect();
    mounted.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
    for mount_point in &mounted {
        eprintln!("unmounting leftover mount {}...", mount_point.display());
        umount2(mount_point, MntFlags::MNT_DETACH).with_context(|| {
            format!(
                "unmounting {} before removing the work directory",
                mount_point.display()
            )
        })?;
    }
    eprintln!("removing {}...", dir.display());
    std::fs::remove_dir_all(dir).with_context(|| format!("removing the work directory {}", dir.display()))
}
