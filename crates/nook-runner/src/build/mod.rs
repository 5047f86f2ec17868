//! Dockerfile builds on the local runner.
//!
//! A build receives a context (a tar stream) and a Dockerfile in it, and produces an image in the store:
//!
//! 1. The context is unpacked with the store's safe unpacker into `builds/<build id>/context` ([`context`]), its
//!    `.dockerignore` read ([`ignore`]) and the Dockerfile parsed ([`dockerfile`]).
//! 2. `FROM` takes an image from the store (pulled from its registry first when the store lacks it).
//! 3. Instructions that only change the image's config (`ENV`, `WORKDIR`, `USER`, `LABEL`, `EXPOSE`, `CMD`,
//!    `ENTRYPOINT`, `ARG`, `SHELL`) change it in memory. `RUN`, `COPY` and `ADD` each run in a step sandbox: a
//!    sandbox of the container class made from the layers so far and the config so far, in which the agent runs the
//!    command (output streamed as events) or unpacks the selected context files. The step sandbox is stopped, its
//!    writable layer becomes a new layer of the store ([`crate::LocalRunner::commit_upper`]: already in the store's
//!    overlayfs form, so it is only hashed and moved, never copied), and the sandbox is deleted. A `WORKDIR` that
//!    the image lacks is created by the next step (or by a last step of its own).
//! 4. Every step has a cache key: the previous step's key, the instruction after expansion, and for `COPY`/`ADD`
//!    the hash of the files it copies. A key whose layer is still in the store (`build-cache/<key>`) is a cache
//!    hit, and the step is skipped: rebuilding an unchanged Dockerfile runs nothing.
//! 5. The image is committed under its name only when every step succeeded; a failed, cancelled or timed-out build
//!    names nothing, and its step sandbox and scratch directory are removed. New layers stay pinned against garbage
//!    collection until the image is committed.
//!
//! Step sandboxes have ids starting with [`BUILD_SANDBOX_PREFIX`]; the runner keeps them out of
//! [`crate::Runner::running_sandboxes`] (they are no sandbox of the control plane's) and removes any that a crash
//! left behind when it opens.

pub mod context;
pub mod dockerfile;
pub mod ignore;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use nook_api::{BuildEvent, Image, ImageConfig, OutputStream, Resources, TemplateStart};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::images::tar_stream::TarError;
use crate::images::{ImageError, LayerPin};
use crate::{ExecOptions, ExecOutput, LocalRunner, Runner, RunnerError, SandboxSpec};
use context::{Context, Selected};
use dockerfile::{Command, Instruction, Step, Variables};

/// Ids of step sandboxes start with this.
pub const BUILD_SANDBOX_PREFIX: &str = "build-";

/// The most a build context may hold, unpacked: a context is for sources, not for data sets.
pub const MAX_CONTEXT_BYTES: u64 = 16 << 30;

/// Lines of a failed step's output quoted in its error.
const TAIL_LINES: usize = 20;

/// The shell of shell-form commands unless `SHELL` says otherwise.
const DEFAULT_SHELL: [&str; 2] = ["/bin/sh", "-c"];

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// The build's id (short: it is part of step sandbox ids and socket paths).
    pub id: String,
    /// Name of the image to produce.
    pub name: String,
    /// The instructions.
    pub recipe: Recipe,
    /// Values for the Dockerfile's `ARG`s.
    pub build_args: BTreeMap<String, String>,
    /// Steps from this one on (1-based) run again instead of taking cached layers (`Some(1)`: no cache at all).
    pub no_cache_from: Option<u32>,
    /// A template's start command, recorded in the image's config.
    pub start: Option<TemplateStart>,
    /// Limits of the step sandboxes.
    pub resources: Resources,
}

/// Where a build's instructions come from.
#[derive(Debug, Clone)]
pub enum Recipe {
    /// The Dockerfile at this path of the context.
    Dockerfile(String),
    /// Instructions made by the caller (E2B's template steps), over the context's files.
    Instructions(Vec<Instruction>),
}

/// Why a build failed (besides the runner's own errors).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The context is not a tar stream that can be unpacked safely.
    #[error("the build context cannot be unpacked")]
    Context(#[source] crate::images::unpack::UnpackError),
    /// The context lacks the Dockerfile, or something in it cannot be used.
    #[error("{0}")]
    BadContext(String),
    /// The Dockerfile does not parse.
    #[error(transparent)]
    Dockerfile(#[from] dockerfile::DockerfileError),
    /// An instruction cannot be carried out as written (a variable, a source, an owner).
    #[error("step {step} (line {line}): {message}")]
    Step {
        /// 1-based instruction number.
        step: u32,
        /// Dockerfile line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A `RUN` command failed.
    #[error("step {step} (line {line}) `{instruction}` failed: {how}{tail}")]
    RunFailed {
        /// 1-based instruction number.
        step: u32,
        /// Dockerfile line.
        line: usize,
        /// The instruction.
        instruction: String,
        /// "exit code 3" or "killed by signal 9".
        how: String,
        /// The exit code, when it exited.
        exit_code: Option<i32>,
        /// The output's last lines, starting with a newline (empty when there was none).
        tail: String,
    },
    /// A client cancelled the build, or its time ran out.
    #[error("the build was cancelled")]
    Cancelled,
}

impl BuildError {
    /// The step the error belongs to.
    pub fn step(&self) -> Option<u32> {
        match self {
            Self::Step { step, .. } | Self::RunFailed { step, .. } => Some(*step),
            _ => None,
        }
    }
}

/// Writes the tar stream of what a `COPY` or `ADD` puts into the image (on a blocking thread).
type TarProducer = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send>;

/// What a step sandbox does before it is committed.
enum Action {
    /// Nothing but the pending `WORKDIR`.
    None,
    /// Run a command.
    Run {
        /// The command.
        argv: Vec<String>,
        /// The build arguments visible to it.
        env: BTreeMap<String, String>,
        /// Its user, when not the image's.
        user: Option<String>,
    },
    /// Unpack a tar stream (produced on a blocking thread) into a directory.
    Unpack {
        /// Destination directory inside the image.
        dir: String,
        /// Owner of what is unpacked.
        owner: Option<String>,
        /// Writes the tar.
        produce: TarProducer,
    },
}

/// One build in progress.
struct Builder<'a> {
    runner: &'a LocalRunner,
    spec: &'a BuildSpec,
    events: &'a mpsc::Sender<BuildEvent>,
    cancel: &'a CancellationToken,
    context: Context,
    layers: Vec<String>,
    config: ImageConfig,
    shell: Vec<String>,
    args: BTreeMap<String, String>,
    /// Build arguments declared before `FROM`: only `FROM` sees them, and an `ARG` after it may take their value.
    args_before_from: BTreeMap<String, String>,
    key: String,
    pending_workdir: Option<String>,
    pins: Vec<LayerPin>,
    cached_steps: u32,
}

/// Runs a build: the context is read from `context` (a tar stream on a blocking reader), events go to `events`.
pub async fn build(
    runner: &LocalRunner,
    spec: &BuildSpec,
    context: crate::ByteStream,
    events: &mpsc::Sender<BuildEvent>,
    cancel: &CancellationToken,
) -> Result<Image, RunnerError> {
    let scratch = runner.build_scratch_dir(&spec.id);
    let result = build_in(runner, spec, context, events, cancel, &scratch).await;
    let cleanup = scratch.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(cleanup)).await;
    result
}

async fn build_in(
    runner: &LocalRunner,
    spec: &BuildSpec,
    context: crate::ByteStream,
    events: &mpsc::Sender<BuildEvent>,
    cancel: &CancellationToken,
    scratch: &Path,
) -> Result<Image, RunnerError> {
    let started = Instant::now();
    let context_dir = scratch.join("context");
    // A cancel (or the time limit) ends the upload too: the blocked read wakes with an error.
    let reader = tokio_util::io::SyncIoBridge::new(context::Cancellable::new(context, cancel.clone()));
    let unpack_into = context_dir.clone();
    let unpacked = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&unpack_into).map_err(|source| RunnerError::Io {
            action: "creating",
            path: unpack_into.clone(),
            source,
        })?;
        let plain = crate::images::unpack::decompressed(reader)
            .map_err(|error| RunnerError::Build(BuildError::Context(TarError::Io(error).into())))?;
        // Unpacked by the layer store's safe unpacker, without the digest a layer needs (a context is no layer).
        let mut tar = crate::images::tar_stream::TarStream::new(context::Limited::new(plain, MAX_CONTEXT_BYTES));
        crate::images::unpack::unpack_entries(&mut tar, None, &unpack_into)
            .map_err(|error| RunnerError::Build(BuildError::Context(error)))?;
        let context =
            Context::open(&unpack_into).map_err(|message| RunnerError::Build(BuildError::BadContext(message)))?;
        let size = context.size().map_err(|source| RunnerError::Io {
            action: "reading the build context in",
            path: unpack_into.clone(),
            source,
        })?;
        Ok::<_, RunnerError>((context, size))
    })
    .await
    .expect("unpacking the context does not panic");
    if cancel.is_cancelled() {
        return Err(BuildError::Cancelled.into());
    }
    let (context, (context_files, context_bytes)) = unpacked?;
    let instructions = match &spec.recipe {
        Recipe::Dockerfile(path) => {
            let text = context
                .dockerfile(path)
                .map_err(|message| RunnerError::Build(BuildError::BadContext(message)))?;
            dockerfile::parse(&text).map_err(BuildError::from)?
        }
        Recipe::Instructions(instructions) => instructions.clone(),
    };
    let _ = events
        .send(BuildEvent::Started {
            build: spec.id.clone(),
            steps: instructions.len() as u32,
            context_files,
            context_bytes,
        })
        .await;
    let mut builder = Builder {
        runner,
        spec,
        events,
        cancel,
        context,
        layers: Vec::new(),
        config: ImageConfig::default(),
        shell: DEFAULT_SHELL.iter().map(|s| s.to_string()).collect(),
        args: BTreeMap::new(),
        args_before_from: BTreeMap::new(),
        key: String::new(),
        pending_workdir: None,
        pins: Vec::new(),
        cached_steps: 0,
    };
    for (index, instruction) in instructions.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(BuildError::Cancelled.into());
        }
        let step = index as u32 + 1;
        let _ = events
            .send(BuildEvent::Step {
                step,
                instruction: instruction.text.clone(),
            })
            .await;
        let step_started = Instant::now();
        let (cached, layer) = builder.apply(step, instruction).await?;
        let _ = events
            .send(BuildEvent::StepDone {
                step,
                cached,
                layer,
                seconds: step_started.elapsed().as_secs_f64(),
            })
            .await;
    }
    if let Some(dir) = builder.pending_workdir.clone() {
        let step = instructions.len() as u32;
        builder
            .notice(step, format!("creating the working directory {dir}"))
            .await;
        let key = chain(&builder.key, "create the working directory");
        builder.layer_step(step, 0, key, Action::None).await?;
    }
    builder.config.start = spec.start.clone();
    let image = runner.commit_built_image(&spec.name, builder.layers.clone(), builder.config.clone())?;
    drop(builder.pins);
    let _ = events
        .send(BuildEvent::Done {
            image: Box::new(image.clone()),
            seconds: started.elapsed().as_secs_f64(),
            cached_steps: builder.cached_steps,
        })
        .await;
    Ok(image)
}

/// An instruction that cannot be carried out as written.
fn step_error(step: u32, instruction: &Instruction, message: impl Into<String>) -> RunnerError {
    BuildError::Step {
        step,
        line: instruction.line,
        message: message.into(),
    }
    .into()
}

/// The next cache key: a hash of the previous one and what the step does.
fn chain(previous: &str, what: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update([0]);
    hasher.update(what.as_bytes());
    hex::encode(hasher.finalize())
}

impl Builder<'_> {
    async fn notice(&self, step: u32, message: String) {
        let _ = self.events.send(BuildEvent::Notice { step, message }).await;
    }

    /// What variables an instruction sees: the build arguments, then the image's environment over them.
    fn variables(&self) -> Variables {
        let mut vars = self.args.clone();
        for entry in &self.config.env {
            if let Some((key, value)) = entry.split_once('=') {
                vars.insert(key.to_string(), value.to_string());
            }
        }
        vars
    }

    fn command_argv(&self, command: &Command) -> Vec<String> {
        match command {
            Command::Exec(argv) => argv.clone(),
            Command::Shell(text) => {
                let mut argv = self.shell.clone();
                argv.push(text.clone());
                argv
            }
        }
    }

    /// Carries out one instruction; returns whether it was cached and the layer it added.
    async fn apply(&mut self, step: u32, instruction: &Instruction) -> Result<(bool, Option<String>), RunnerError> {
        let vars = self.variables();
        let expand = |text: &str| dockerfile::expand(text, &vars).map_err(|m| step_error(step, instruction, m));
        match &instruction.step {
            Step::Arg { name, default } => {
                // As in Docker: a build argument given wins, then the default written here, then (for an ARG
                // declared again after FROM) the value it had before FROM.
                let value = match (self.spec.build_args.get(name), default) {
                    (Some(value), _) => Some(value.clone()),
                    (None, Some(default)) => Some(expand(default)?),
                    (None, None) => self.args_before_from.get(name).cloned(),
                };
                let text = format!("ARG {name}={}", value.as_deref().unwrap_or(""));
                self.args.insert(name.clone(), value.unwrap_or_default());
                self.key = chain(&self.key, &text);
            }
            Step::From { image } => {
                let reference = expand(image)?;
                self.from(step, instruction, &reference).await?;
            }
            Step::Env(text) => {
                let pairs = dockerfile::key_values(text, &vars).map_err(|m| step_error(step, instruction, m))?;
                for (key, value) in &pairs {
                    if !dockerfile::is_variable_name(key) {
                        return Err(step_error(step, instruction, format!("{key:?} is not a variable name")));
                    }
                    self.config
                        .env
                        .retain(|entry| entry.split_once('=').map(|(k, _)| k) != Some(key));
                    self.config.env.push(format!("{key}={value}"));
                }
                self.key = chain(&self.key, &format!("ENV {pairs:?}"));
            }
            Step::Label(text) => {
                let pairs = dockerfile::key_values(text, &vars).map_err(|m| step_error(step, instruction, m))?;
                self.key = chain(&self.key, &format!("LABEL {pairs:?}"));
                self.config.labels.extend(pairs);
            }
            Step::Workdir(text) => {
                let path = expand(text)?;
                let base = self.config.working_dir.clone().unwrap_or_else(|| "/".into());
                let dir = normalise_in_image(&base, &path);
                self.key = chain(&self.key, &format!("WORKDIR {dir}"));
                self.config.working_dir = Some(dir.clone());
                self.pending_workdir = Some(dir);
            }
            Step::User(text) => {
                let user = expand(text)?;
                if user.is_empty() {
                    return Err(step_error(step, instruction, "USER names no user"));
                }
                self.key = chain(&self.key, &format!("USER {user}"));
                self.config.user = Some(user);
            }
            Step::Expose(text) => {
                for word in dockerfile::words(text, &vars).map_err(|m| step_error(step, instruction, m))? {
                    let port = exposed_port(&word).map_err(|m| step_error(step, instruction, m))?;
                    if !self.config.exposed_ports.contains(&port) {
                        self.config.exposed_ports.push(port);
                    }
                }
                self.key = chain(&self.key, &instruction.text);
            }
            Step::Cmd(command) => {
                self.config.cmd = self.command_argv(command);
                self.key = chain(&self.key, &format!("CMD {:?}", self.config.cmd));
            }
            Step::Entrypoint(command) => {
                // As in Docker, a new entrypoint drops the command inherited from the base image.
                self.config.entrypoint = self.command_argv(command);
                self.config.cmd.clear();
                self.key = chain(&self.key, &format!("ENTRYPOINT {:?}", self.config.entrypoint));
            }
            Step::Shell(argv) => {
                self.shell = argv.clone();
                self.key = chain(&self.key, &format!("SHELL {argv:?}"));
            }
            Step::Ignored(what) => {
                self.notice(step, format!("{what} has no effect in nook and is ignored"))
                    .await;
            }
            Step::Run { command, user } => {
                let argv = self.command_argv(command);
                // Build arguments are environment variables of RUN, unless ENV set the same name.
                let visible: BTreeMap<String, String> = self
                    .args
                    .iter()
                    .filter(|(name, _)| {
                        !self
                            .config
                            .env
                            .iter()
                            .any(|e| e.split_once('=').map(|(k, _)| k) == Some(name))
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let user = user.as_deref().map(expand).transpose()?;
                let key = match &user {
                    Some(user) => chain(&self.key, &format!("RUN as {user} {argv:?}")),
                    None => chain(&self.key, &format!("RUN {argv:?}")),
                };
                let action = Action::Run {
                    argv,
                    env: visible,
                    user,
                };
                return self.layer_step(step, instruction.line, key, action).await;
            }
            Step::Copy {
                sources,
                dest,
                chown,
                chmod,
                add,
            } => {
                return self
                    .copy(step, instruction, &vars, sources, dest, chown.as_deref(), *chmod, *add)
                    .await;
            }
        }
        Ok((false, None))
    }

    async fn from(&mut self, step: u32, instruction: &Instruction, reference: &str) -> Result<(), RunnerError> {
        if reference == "scratch" {
            return Err(step_error(
                step,
                instruction,
                "FROM scratch is not supported yet: start from an image (nook image import can make one of a \
                 directory)",
            ));
        }
        let image = match self.runner.image(reference).await {
            Ok(image) => image,
            Err(RunnerError::Image(ImageError::NotFound(_))) => {
                self.notice(step, format!("{reference} is not in the store: pulling it"))
                    .await;
                let (sender, mut received) = mpsc::channel(64);
                let forward = async {
                    while let Some(event) = received.recv().await {
                        if let nook_api::TransferEvent::Resolved { layers, .. } = event {
                            let missing = layers.iter().filter(|layer| !layer.present).count();
                            self.notice(step, format!("{missing} of {} layers to fetch", layers.len()))
                                .await;
                        }
                    }
                };
                let pull = self.runner.pull_image(reference, None, sender);
                let (pulled, ()) = tokio::select! {
                    both = async { tokio::join!(pull, forward) } => both,
                    _ = self.cancel.cancelled() => return Err(BuildError::Cancelled.into()),
                };
                pulled.map_err(|error| {
                    step_error(
                        step,
                        instruction,
                        format!("pulling {reference} failed: {}", crate::error_chain(&error)),
                    )
                })?
            }
            Err(error) => return Err(error),
        };
        self.pins = image.layers.iter().map(|layer| self.runner.pin_layer(layer)).collect();
        self.args_before_from = std::mem::take(&mut self.args);
        self.layers = image.layers.clone();
        self.config = image.config.clone();
        self.config.start = None;
        self.key = chain("", &format!("FROM {}", image.digest));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &mut self,
        step: u32,
        instruction: &Instruction,
        vars: &Variables,
        sources: &[String],
        dest: &str,
        chown: Option<&str>,
        chmod: Option<u32>,
        add: bool,
    ) -> Result<(bool, Option<String>), RunnerError> {
        let expand = |text: &str| dockerfile::expand(text, vars).map_err(|m| step_error(step, instruction, m));
        let sources: Vec<String> = sources.iter().map(|s| expand(s)).collect::<Result<_, _>>()?;
        let dest = expand(dest)?;
        let owner = chown.map(expand).transpose()?;
        let selected = self
            .context
            .select(&sources)
            .map_err(|m| step_error(step, instruction, m))?;
        let base = self.config.working_dir.clone().unwrap_or_else(|| "/".into());
        let dest_path = normalise_in_image(&base, &dest);
        // A destination is a directory when it says so, or when several files or a directory go there.
        let into_dir = dest.ends_with('/')
            || dest == "."
            || selected.len() > 1
            || selected.iter().any(|s| s.is_dir)
            || sources.iter().any(|s| s.contains(['*', '?', '[']));
        let archives: Vec<&Selected> = if add {
            selected
                .iter()
                // Only regular files are unpacked: a link named like an archive is copied as the link it is.
                .filter(|s| !s.is_dir && is_archive_name(&s.path) && self.context.is_regular_file(s))
                .collect()
        } else {
            Vec::new()
        };
        if add && !archives.is_empty() {
            if archives.len() != selected.len() {
                return Err(step_error(
                    step,
                    instruction,
                    "ADD unpacks archives one at a time: give one archive per ADD",
                ));
            }
            let archive = self.context.host_path(archives[0]);
            let hash = tokio::task::spawn_blocking({
                let archive = archive.clone();
                move || file_hash(&archive)
            })
            .await
            .expect("hashing does not panic")
            .map_err(|e| step_error(step, instruction, format!("reading {} failed: {e}", archives[0].path)))?;
            let key = chain(&self.key, &format!("ADD archive {hash} {dest_path} {owner:?}"));
            let produce: TarProducer = Box::new(move |out| {
                let file = context::open_no_follow(&archive)?;
                std::io::copy(&mut crate::images::unpack::decompressed(file)?, out).map(drop)
            });
            let action = Action::Unpack {
                dir: dest_path,
                owner,
                produce,
            };
            return self.layer_step(step, instruction.line, key, action).await;
        }
        let (dir, file_name) = if into_dir {
            (dest_path, None)
        } else {
            let path = Path::new(&dest_path);
            let parent = path.parent().map_or("/".into(), |p| p.to_string_lossy().into_owned());
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (parent, name)
        };
        let members = self
            .context
            .members(&selected, file_name.as_deref())
            .map_err(|e| step_error(step, instruction, format!("reading the build context failed: {e}")))?;
        let hashed = members.clone();
        let hash = tokio::task::spawn_blocking(move || context::hash_selection(&hashed, chmod))
            .await
            .expect("hashing does not panic")
            .map_err(|e| step_error(step, instruction, format!("reading the build context failed: {e}")))?;
        let key = chain(&self.key, &format!("COPY {hash} into {dir} {owner:?}"));
        let produce: TarProducer = Box::new(move |out| context::write_tar(&members, chmod, out));
        self.layer_step(step, instruction.line, key, Action::Unpack { dir, owner, produce })
            .await
    }

    /// A step that adds a layer: taken from the cache when its key is there, else run in a step sandbox.
    async fn layer_step(
        &mut self,
        step: u32,
        line: usize,
        key: String,
        action: Action,
    ) -> Result<(bool, Option<String>), RunnerError> {
        self.key = key.clone();
        if self.spec.no_cache_from.is_none_or(|from| step < from) {
            if let Some(cached) = self.runner.cached_layer(&key) {
                self.pending_workdir = None;
                self.cached_steps += 1;
                let layer = cached.map(|(layer, pin)| {
                    self.pins.push(pin);
                    self.layers.push(layer.clone());
                    layer
                });
                return Ok((true, layer));
            }
        }
        let sandbox = format!("{BUILD_SANDBOX_PREFIX}{}-{step}", self.spec.id);
        let spec = SandboxSpec {
            id: sandbox.clone(),
            hostname: "build".into(),
            image: format!("build of {}", self.spec.name),
            resources: self.spec.resources,
            env: BTreeMap::new(),
            // Steps reach what any sandbox may by default (package mirrors, registries), nothing private.
            network: Default::default(),
        };
        self.runner
            .create_from_layers(spec, &self.layers, self.config.clone())
            .await?;
        let acted = self.act(step, line, &sandbox, action).await;
        let committed = match acted {
            Ok(()) => match self.runner.stop_sandbox(&sandbox).await {
                Ok(()) => self.runner.commit_upper(&sandbox).await,
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        if let Err(error) = self.runner.delete_sandbox(&sandbox).await {
            tracing::error!(sandbox = %sandbox, error = %crate::error_chain(&error), "removing a step sandbox failed");
        }
        let committed = committed?;
        self.pending_workdir = None;
        let layer = committed.map(|(layer, pin)| {
            self.pins.push(pin);
            self.layers.push(layer.clone());
            layer
        });
        self.runner.remember_layer(&key, layer.as_deref());
        Ok((false, layer))
    }

    /// Does what a step sandbox is for; the pending `WORKDIR` first.
    async fn act(&self, step: u32, line: usize, sandbox: &str, action: Action) -> Result<(), RunnerError> {
        if let Some(dir) = &self.pending_workdir {
            let request = nook_agent_proto::Request::MakeDir {
                path: dir.clone(),
                owner: None,
            };
            self.runner.file_call(sandbox, request).await?;
        }
        match action {
            Action::None => Ok(()),
            Action::Run { argv, env, user } => {
                let options = ExecOptions {
                    argv,
                    env,
                    user,
                    ..ExecOptions::default()
                };
                self.run(step, line, sandbox, options).await
            }
            Action::Unpack { dir, owner, produce } => {
                let owner = match owner {
                    Some(owner) => Some(self.owner(step, line, sandbox, &owner).await?),
                    None => None,
                };
                let (reader, writer) = tokio::io::duplex(1 << 16);
                let writer = tokio_util::io::SyncIoBridge::new(writer);
                let producer = tokio::task::spawn_blocking(move || {
                    let mut writer = writer;
                    produce(&mut writer)
                });
                let body: crate::ByteStream = Box::pin(reader);
                let written = tokio::select! {
                    written = self.runner.write_archive(sandbox, &dir, true, owner, body) => written,
                    _ = self.cancel.cancelled() => return Err(BuildError::Cancelled.into()),
                };
                let produced = producer.await.expect("writing the tar does not panic");
                written?;
                produced.map_err(|error| {
                    BuildError::Step {
                        step,
                        line,
                        message: format!("reading the files to copy failed: {error}"),
                    }
                    .into()
                })
            }
        }
    }

    /// Resolves `user[:group]` of `--chown` inside the step sandbox: names through its `/etc/passwd`, numbers as
    /// they are; a user without a group takes the user's primary group.
    async fn owner(&self, step: u32, line: usize, sandbox: &str, owner: &str) -> Result<(u32, u32), RunnerError> {
        let fail = |message: String| -> RunnerError { BuildError::Step { step, line, message }.into() };
        let (user, group) = match owner.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (owner, None),
        };
        let (uid, primary_gid) = match user.parse::<u32>() {
            Ok(uid) => (uid, uid),
            Err(_) => {
                let request = nook_agent_proto::Request::Account { user: user.to_string() };
                let account: nook_agent_proto::AccountInfo = serde_json::from_value(
                    self.runner
                        .file_call(sandbox, request)
                        .await
                        .map_err(|error| fail(format!("--chown={owner}: {}", crate::error_chain(&error))))?,
                )
                .map_err(|error| fail(format!("--chown={owner}: the agent's answer is unreadable: {error}")))?;
                (account.uid, account.gid)
            }
        };
        let gid = match group {
            None => primary_gid,
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) if group == user => primary_gid,
                Err(_) => {
                    return Err(fail(format!(
                        "--chown={owner}: name the group by its number (group names other than the user's are not \
                         looked up)"
                    )))
                }
            },
        };
        Ok((uid, gid))
    }

    /// Runs a `RUN` command, streaming its output; fails unless it exits 0.
    async fn run(&self, step: u32, line: usize, sandbox: &str, options: ExecOptions) -> Result<(), RunnerError> {
        let instruction = options.argv.last().cloned().unwrap_or_default();
        let mut stream = self.runner.exec(sandbox, options).await?;
        drop(stream.input);
        let mut stdout = Utf8Lines::default();
        let mut stderr = Utf8Lines::default();
        let mut tail = Tail::default();
        loop {
            let event = tokio::select! {
                event = stream.events.recv() => event,
                _ = self.cancel.cancelled() => return Err(BuildError::Cancelled.into()),
            };
            let (kind, decoder, bytes) = match event {
                Some(ExecOutput::Stdout(bytes)) => (OutputStream::Stdout, &mut stdout, bytes),
                Some(ExecOutput::Stderr(bytes)) => (OutputStream::Stderr, &mut stderr, bytes),
                Some(ExecOutput::Exit(exit)) => {
                    if exit.code == Some(0) {
                        return Ok(());
                    }
                    let how = match (exit.code, exit.signal) {
                        (Some(code), _) => format!("exit code {code}"),
                        (None, Some(signal)) => format!("killed by signal {signal}"),
                        _ => "it ended abnormally".into(),
                    };
                    return Err(BuildError::RunFailed {
                        step,
                        line,
                        instruction,
                        how,
                        exit_code: exit.code,
                        tail: tail.render(),
                    }
                    .into());
                }
                Some(ExecOutput::Error { code, message }) => {
                    return Err(RunnerError::Process { code, message });
                }
                Some(_) => continue,
                None => {
                    return Err(RunnerError::Process {
                        code: "agent_disconnected".into(),
                        message: "the step's output ended before the command did".into(),
                    })
                }
            };
            let text = decoder.push(&bytes);
            if !text.is_empty() {
                tail.push(&text);
                let _ = self
                    .events
                    .send(BuildEvent::Output {
                        step,
                        stream: kind,
                        text,
                    })
                    .await;
            }
        }
    }
}

/// An absolute, normal path inside the image: `path` on its own when absolute, else joined to `base`.
fn normalise_in_image(base: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{base}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// `80` → `80/tcp`; `53/udp` stays; anything else is refused.
fn exposed_port(word: &str) -> Result<String, String> {
    let (port, protocol) = word.split_once('/').unwrap_or((word, "tcp"));
    let protocol = protocol.to_ascii_lowercase();
    match (port.parse::<u16>(), protocol.as_str()) {
        (Ok(port), "tcp" | "udp" | "sctp") if port > 0 => Ok(format!("{port}/{protocol}")),
        _ => Err(format!("EXPOSE {word:?} is not a port (such as 8080 or 53/udp)")),
    }
}

/// Whether `ADD` unpacks a file of this name.
fn is_archive_name(path: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"]
        .iter()
        .any(|suffix| path.ends_with(suffix))
}

fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut context::open_no_follow(path)?, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Decodes a byte stream as UTF-8 across chunk boundaries (a character split between chunks is kept for the next).
#[derive(Default)]
struct Utf8Lines {
    carry: Vec<u8>,
}

impl Utf8Lines {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.carry.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.carry) {
            Ok(_) => self.carry.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            Err(_) => self.carry.len(),
        };
        let rest = self.carry.split_off(valid);
        let text = String::from_utf8_lossy(&self.carry).into_owned();
        self.carry = rest;
        text
    }
}

/// The last lines of a step's output, for its error.
#[derive(Default)]
struct Tail {
    lines: std::collections::VecDeque<String>,
    partial: String,
}

impl Tail {
    fn push(&mut self, text: &str) {
        self.partial.push_str(text);
        while let Some(at) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=at).collect();
            self.lines.push_back(line.trim_end().to_string());
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
        }
        if self.partial.len() > 4096 {
            let line = std::mem::take(&mut self.partial);
            self.lines.push_back(line);
            if self.lines.len() > TAIL_LINES {
                self.lines.pop_front();
            }
        }
    }

    fn render(&self) -> String {
        let mut lines: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        if !self.partial.is_empty() {
            lines.push(&self.partial);
        }
        let start = lines.len().saturating_sub(TAIL_LINES);
        lines[start..].iter().map(|line| format!("\n  {line}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_inside_the_image() {
        assert_eq!(normalise_in_image("/", "app"), "/app");
        assert_eq!(normalise_in_image("/app", "src/../lib/"), "/app/lib");
        assert_eq!(normalise_in_image("/app", "/abs"), "/abs");
        assert_eq!(normalise_in_image("/", "../.."), "/");
    }

    #[test]
    fn ports_archives_and_keys() {
        assert_eq!(exposed_port("8080").unwrap(), "8080/tcp");
        assert_eq!(exposed_port("53/UDP").unwrap(), "53/udp");
        assert!(exposed_port("0").is_err());
        assert!(exposed_port("http").is_err());
        assert!(is_archive_name("vendor/deps.tar.gz") && !is_archive_name("notes.txt"));
        assert_ne!(chain("", "RUN a"), chain("", "RUN b"));
        assert_ne!(chain(&chain("", "x"), "RUN a"), chain("", "RUN a"));
    }

    #[test]
    fn output_is_decoded_across_chunks_and_its_tail_kept() {
        let mut decoder = Utf8Lines::default();
        let snowman = "☃".as_bytes();
        assert_eq!(decoder.push(&snowman[..1]), "");
        assert_eq!(decoder.push(&snowman[1..]), "☃");
        assert_eq!(decoder.push(b"\xff ok"), "\u{fffd} ok");
        let mut tail = Tail::default();
        for n in 0..30 {
            tail.push(&format!("line {n}\n"));
        }
        tail.push("partial");
        let rendered = tail.render();
        assert!(
            rendered.starts_with("\n  line 11") && rendered.ends_with("\n  partial"),
            "{rendered}"
        );
    }
}
