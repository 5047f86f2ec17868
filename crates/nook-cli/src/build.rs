//! `nook image build`: sends a directory as a build context and follows the build's log until it ends.
//!
//! The context is packed on a blocking thread and streamed (never held whole), leaving out what the context's
//! `.dockerignore` excludes, as `docker build` does (the server applies the same rules again, so this only saves the
//! upload). Symbolic links travel as links. The build's events are printed as they come: a line per step, the
//! steps' output as written, whether a step came from the cache. A dropped connection picks the log up again from
//! the last event seen; Ctrl-C cancels the build on the server, which then names no image.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::StreamExt;
use nook_api::{Build, BuildEvent, BuildRequest, BuildState, OutputStream};
use nook_client::Client;
use nook_runner::build::ignore::IgnoreRules;
use tokio::sync::mpsc;

use crate::commands::{append_tree, Visit};
use crate::copy::ChunkWriter;
use crate::table;

/// What `nook image build` was asked.
#[derive(Debug)]
pub struct BuildArgs {
    /// The context directory.
    pub context: PathBuf,
    /// The image name.
    pub name: String,
    /// The Dockerfile, relative to the context (or a path inside it).
    pub dockerfile: Option<PathBuf>,
    /// `--build-arg`s.
    pub build_args: Vec<(String, String)>,
    /// Run every step again.
    pub no_cache: bool,
    /// Seconds the build may take.
    pub timeout: Option<u64>,
    /// A template's start command.
    pub start_command: Option<String>,
    /// Its readiness check.
    pub ready_command: Option<String>,
    /// Seconds the readiness check may take.
    pub ready_timeout: Option<u64>,
    /// Print the finished build as JSON.
    pub json: bool,
}

/// How many times a broken event stream is picked up again before giving up.
const RECONNECTS: u32 = 5;

/// Runs `nook image build`; returns the exit code (0 built, 1 failed, 130 cancelled by Ctrl-C).
pub async fn build(client: &Client, args: BuildArgs) -> anyhow::Result<u8> {
    let context = args.context.clone();
    let metadata = std::fs::metadata(&context).with_context(|| format!("reading {}", context.display()))?;
    if !metadata.is_dir() {
        bail!(
            "{} is not a directory: the build context is a directory",
            context.display()
        );
    }
    let dockerfile = dockerfile_in_context(&context, args.dockerfile.as_deref())?;
    let request = BuildRequest {
        name: args.name.clone(),
        dockerfile: Some(dockerfile.clone()),
        build_args: (!args.build_args.is_empty())
            .then(|| {
                serde_json::to_string(
                    &args
                        .build_args
                        .iter()
                        .cloned()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
            })
            .transpose()?,
        no_cache: args.no_cache,
        timeout_s: args.timeout,
        start_command: args.start_command.clone(),
        ready_command: args.ready_command.clone(),
        ready_timeout_s: args.ready_timeout,
    };
    let sent = Arc::new(AtomicU64::new(0));
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let packing = {
        let context = context.clone();
        let sent = sent.clone();
        tokio::task::spawn_blocking(move || pack_context(&context, &dockerfile, sender, sent))
    };
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let started = client.start_build(&request, reqwest::Body::wrap_stream(chunks)).await;
    let packed = packing.await.context("the packing thread failed")?;
    let started = started?;
    let files = packed?;
    eprintln!(
        "sent the build context: {files} entries, {} ({})",
        table::bytes(sent.load(Ordering::Relaxed)),
        started.id
    );
    let finished = tokio::select! {
        finished = follow(client, &started.id) => finished?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ncancelling build {}", started.id);
            let build = client.cancel_build(&started.id).await?;
            eprintln!("build {} {}", build.id, state_word(build.state));
            return Ok(130);
        }
    };
    if args.json {
        crate::commands::print_json(&finished)?;
    }
    match (&finished.state, &finished.image) {
        (BuildState::Succeeded, Some(image)) => {
            if !args.json {
                println!("{}", image.digest);
            }
            Ok(0)
        }
        _ => Ok(1),
    }
}

/// The Dockerfile's path inside the context, `/`-separated (the server reads it from there).
fn dockerfile_in_context(context: &Path, dockerfile: Option<&Path>) -> anyhow::Result<String> {
    let Some(path) = dockerfile else {
        return Ok("Dockerfile".into());
    };
    let root = context
        .canonicalize()
        .with_context(|| format!("resolving {}", context.display()))?;
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    let full = full
        .canonicalize()
        .with_context(|| format!("the Dockerfile {} cannot be read", path.display()))?;
    let relative = full.strip_prefix(&root).map_err(|_| {
        anyhow::anyhow!(
            "the Dockerfile {} is not inside the build context {}",
            path.display(),
            context.display()
        )
    })?;
    relative
        .to_str()
        .map(str::to_string)
        .context("the Dockerfile's path is not UTF-8")
}

/// Packs the context as a tar into `sender`, leaving out what `.dockerignore` excludes (but never the Dockerfile or
/// `.dockerignore` itself); returns the number of entries.
fn pack_context(
    root: &Path,
    dockerfile: &str,
    sender: mpsc::Sender<std::io::Result<Bytes>>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let rules = match std::fs::read_to_string(root.join(".dockerignore")) {
        Ok(text) => IgnoreRules::parse(&text),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => IgnoreRules::default(),
        Err(error) => return Err(error).context("reading .dockerignore"),
    };
    let writer = ChunkWriter::counted(sender.clone(), sent);
    let mut builder = tar::Builder::new(writer);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    // Kept: what .dockerignore does not exclude, the Dockerfile and .dockerignore always, and only files,
    // directories and links. Descended into: directories not excluded, or holding something kept.
    let mut filter = |path: &Path, kind: std::fs::FileType| {
        let Some(path) = path.to_str() else {
            eprintln!("skipping {}: its name is not UTF-8", path.display());
            return Visit {
                include: false,
                descend: false,
            };
        };
        let always = path == dockerfile || path == ".dockerignore";
        let excluded = !always && rules.excludes(path);
        Visit {
            include: !excluded && (kind.is_file() || kind.is_dir() || kind.is_symlink()),
            descend: !excluded || rules.may_reinclude_below(path) || dockerfile.starts_with(&format!("{path}/")),
        }
    };
    let result = append_tree(&mut builder, root, Path::new(""), &mut filter)
        .and_then(|entries| {
            builder
                .into_inner()
                .and_then(|mut writer| writer.flush())
                .map(|()| entries)
        })
        .with_context(|| format!("packing {}", root.display()));
    if let Err(error) = &result {
        // Break the upload, so that the server sees an incomplete context rather than a short one.
        let _ = sender.blocking_send(Err(std::io::Error::other(error.to_string())));
    }
    result
}

/// Prints a build's events until it ends, picking the stream up again where it broke; returns the finished build.
async fn follow(client: &Client, id: &str) -> anyhow::Result<Build> {
    let mut offset = 0;
    let mut printer = Printer::default();
    let mut broken = 0;
    loop {
        let mut events = client.build_events(id, offset, true).await?;
        let mut failure = None;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            match &event {
                BuildEvent::Keepalive => continue,
                BuildEvent::Missed { events } => offset += events,
                _ => offset += 1,
            }
            printer.show(&event);
        }
        let build = client.build(id).await?;
        if build.state != BuildState::Building {
            return Ok(build);
        }
        broken += 1;
        if broken > RECONNECTS {
            match failure {
                Some(error) => return Err(error).context("following the build's log failed"),
                None => bail!("the build's log keeps ending while the build runs"),
            }
        }
    }
}

/// Writes build events as a human reads them: step lines and the steps' output on standard error.
#[derive(Default)]
struct Printer {
    steps: u32,
}

impl Printer {
    fn show(&mut self, event: &BuildEvent) {
        let mut err = std::io::stderr().lock();
        let _ = match event {
            BuildEvent::Started {
                steps,
                context_files,
                context_bytes,
                ..
            } => {
                self.steps = *steps;
                writeln!(
                    err,
                    "building {steps} steps from a context of {context_files} files ({})",
                    table::bytes(*context_bytes)
                )
            }
            BuildEvent::Step { step, instruction } => {
                writeln!(err, "step {step}/{}: {instruction}", self.steps)
            }
            BuildEvent::Output { stream, text, .. } => match stream {
                OutputStream::Stdout | OutputStream::Stderr => write!(err, "{text}"),
            },
            BuildEvent::Notice { message, .. } => writeln!(err, "  note: {message}"),
            BuildEvent::StepDone {
                cached, layer, seconds, ..
            } => {
                let what = match layer {
                    Some(layer) => format!("layer {}", crate::commands::short_digest(layer)),
                    None => "no layer".into(),
                };
                if *cached {
                    writeln!(err, "  cached ({what})")
                } else {
                    writeln!(err, "  done in {seconds:.1} s ({what})")
                }
            }
            BuildEvent::Done {
                image,
                seconds,
                cached_steps,
            } => writeln!(
                err,
                "built {} ({}) in {seconds:.1} s, {cached_steps} of {} steps from the cache",
                image.name,
                table::bytes(image.size_bytes),
                self.steps
            ),
            BuildEvent::Error { error, .. } => writeln!(err, "build failed: {}", error.message),
            BuildEvent::Missed { events } => writeln!(err, "  ({events} earlier events are no longer kept)"),
            BuildEvent::Keepalive => Ok(()),
        };
    }
}

fn state_word(state: BuildState) -> &'static str {
    match state {
        BuildState::Building => "is still building",
        BuildState::Succeeded => "succeeded",
        BuildState::Failed => "failed",
        BuildState::Cancelled => "was cancelled",
    }
}
