//! Image builds as the control plane tracks them: started, followed, cancelled and timed out.
//!
//! [`Builds::start`] checks a request and [`Builds::launch`] (which E2B's template builds call too) takes one of
//! [`MAX_RUNNING_BUILDS`] slots — before the context is read, so uploads count — lists the build, and hands the
//! runner the build context (the request body, streamed) and a channel for its events. A driver task records every
//! event in the build's log and, when the runner is done, the final `done` or `error` event and the build's state.
//! The start returns once the runner has unpacked the context and parsed the Dockerfile (its `started` event): a
//! context or Dockerfile that is wrong fails the request itself, with its reason, and leaves no build listed. A
//! client that goes away before then leaves the build running, listed and cancellable.
//!
//! Each build's log is a bounded replay buffer addressed by event offset: `GET /v1/builds/{build}/events?offset=N`
//! replays from event N and, when following, waits for new events through a watch channel (no polling). A log past
//! [`MAX_LOG_BYTES`] forgets its oldest events (a finished one keeps [`MAX_FINISHED_LOG_BYTES`]), and a reader that
//! asks for them is told how many it missed. Builds are kept in memory: the last [`MAX_FINISHED_BUILDS`] finished
//! ones stay listed; a restart of the server forgets them (the images they built stay in the store, and the runner
//! removes what an interrupted build left).
//!
//! A build's time limit and its cancellation are one mechanism: both fire the cancellation token the runner
//! watches, which ends the context's upload or the running step, removes its step sandbox and names no image.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use chrono::DateTime;
use chrono::Utc;
use nook_api::{
    Build, BuildEvent, BuildRequest, BuildState, Resources, TemplateStart, DEFAULT_BUILD_TIMEOUT_S,
    DEFAULT_READY_TIMEOUT_S, MAX_BUILD_TIMEOUT_S, MAX_READY_TIMEOUT_S,
};
use nook_runner::build::{BuildError, BuildSpec, Recipe};
use nook_runner::{ByteStream, Runner, RunnerError};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::ApiFailure;

/// Finished builds kept for listing and for their logs; older ones are forgotten.
pub const MAX_FINISHED_BUILDS: usize = 100;
/// What a running build's log may hold for replay, in bytes (output text, and [`EVENT_OVERHEAD`] per event);
/// beyond it the oldest events are dropped.
pub const MAX_LOG_BYTES: usize = 16 << 20;
/// What a finished build's log keeps (its most recent events), in the same bytes.
pub const MAX_FINISHED_LOG_BYTES: usize = 1 << 20;
/// What one event costs in the log besides its text.
const EVENT_OVERHEAD: usize = 64;
/// Builds running at once; another is refused until one ends.
pub const MAX_RUNNING_BUILDS: usize = 8;
/// Memory of a build's step sandboxes (or the host's, when it has less), in MiB.
const STEP_MEMORY_MB: u64 = 4096;
/// Process limit of a build's step sandboxes.
const STEP_PIDS: u32 = 4096;
/// Build arguments accepted in one request.
const MAX_BUILD_ARGS: usize = 256;

/// A build as the control plane starts it: what a native build request and E2B's template steps both become.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    /// Name of the image it produces.
    pub name: String,
    /// More names the image gets once built.
    pub also_named: Vec<String>,
    /// The instructions.
    pub recipe: Recipe,
    /// Values for the Dockerfile's `ARG`s.
    pub build_args: BTreeMap<String, String>,
    /// Steps from this one on (1-based) run instead of taking cached layers.
    pub no_cache_from: Option<u32>,
    /// A template's start command.
    pub start: Option<TemplateStart>,
    /// Seconds the build may take.
    pub timeout_s: u64,
}

/// One entry of a build's log: an event and when it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedEvent {
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// What happened.
    pub event: BuildEvent,
}

/// The builds of this control plane.
pub struct Builds {
    runner: Arc<dyn Runner>,
    step_resources: Resources,
    builds: Mutex<Vec<Arc<Tracked>>>,
    /// One permit per build that may run (its upload included).
    slots: Arc<tokio::sync::Semaphore>,
}

/// One build: what the API shows, its log, and what stops it.
struct Tracked {
    cancel: CancellationToken,
    state: Mutex<TrackedState>,
    /// How many events the log has had (kept or not); followers wait on it.
    recorded: watch::Sender<u64>,
}

struct TrackedState {
    build: Build,
    log: VecDeque<LoggedEvent>,
    /// Offset of `log[0]`.
    first: u64,
    /// What `log` holds, as [`kept_size`] counts it.
    kept_bytes: usize,
    timed_out: Option<u64>,
}

/// A batch of a build's events read from an offset.
pub struct EventBatch {
    /// Events dropped from the log that the reader asked for (they come before `events`).
    pub missed: u64,
    /// The events from the offset (or from the oldest one kept).
    pub events: Vec<LoggedEvent>,
    /// Offset after the last event returned.
    pub next: u64,
    /// Whether the build has ended (no event will follow `events`).
    pub finished: bool,
}

impl Builds {
    /// Builds run by `runner`, whose step sandboxes get at most `host_cpus` cores and `host_memory_mb` of memory.
    pub fn new(runner: Arc<dyn Runner>, host_cpus: f64, host_memory_mb: u64) -> Self {
        Self {
            runner,
            step_resources: Resources {
                cpu: host_cpus.clamp(nook_api::limits::MIN_CPU, nook_api::limits::MAX_CPU),
                memory_mb: STEP_MEMORY_MB.min(host_memory_mb),
                memory_max_mb: None,
                pids: STEP_PIDS,
                disk_mb: None,
            },
            builds: Mutex::new(Vec::new()),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING_BUILDS)),
        }
    }

    /// Checks a request and starts its build on the context `context`; returns once the build has started.
    pub async fn start(&self, request: BuildRequest, context: ByteStream) -> Result<Build, ApiFailure> {
        self.launch(check_request(&request)?, context).await
    }

    /// Starts a checked build on the context `context` (a tar stream); returns once the build has started.
    pub async fn launch(&self, plan: BuildPlan, context: ByteStream) -> Result<Build, ApiFailure> {
        // A slot is taken before the context is read, so uploads in progress count too.
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiFailure::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_builds",
                format!("{MAX_RUNNING_BUILDS} builds are running, the most this server runs at once; try again when one ends"),
            )
        })?;
        let id = crate::ids::build_id();
        let spec = BuildSpec {
            id: id.clone(),
            name: plan.name.clone(),
            recipe: plan.recipe,
            build_args: plan.build_args,
            no_cache_from: plan.no_cache_from,
            start: plan.start,
            resources: self.step_resources,
        };
        let tracked = Arc::new(Tracked::new(id.clone(), plan.name));
        // Listed (and cancellable) from now on, even if the client goes away before the build has started.
        self.remember(tracked.clone());
        let (started_sender, started) = oneshot::channel();
        let (events, received) = mpsc::channel(256);
        let (runner, cancel, also_named) = (self.runner.clone(), tracked.cancel.clone(), plan.also_named);
        let build = tokio::spawn(async move {
            let image = runner.build_image(spec, context, events, cancel).await?;
            for name in &also_named {
                runner.tag_image(&image.name, name).await?;
            }
            Ok::<_, RunnerError>(image)
        });
        tokio::spawn(drive(
            tracked.clone(),
            build,
            received,
            plan.timeout_s,
            started_sender,
            slot,
        ));
        match started.await {
            Ok(Ok(())) => Ok(tracked.snapshot()),
            Ok(Err(failure)) => {
                // Nothing ran: the request fails, and no build is kept.
                self.builds
                    .lock()
                    .expect("builds")
                    .retain(|kept| !Arc::ptr_eq(kept, &tracked));
                Err(failure)
            }
            Err(_) => Err(ApiFailure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the build ended without a result",
            )),
        }
    }

    /// Every build kept, oldest first.
    pub fn list(&self) -> Vec<Build> {
        self.builds
            .lock()
            .expect("builds")
            .iter()
            .map(|tracked| tracked.snapshot())
            .collect()
    }

    /// One build.
    pub fn get(&self, id: &str) -> Result<Build, ApiFailure> {
        Ok(self.find(id)?.snapshot())
    }

    /// Cancels a running build and returns it once it has ended; a finished build is returned as it is.
    pub async fn cancel(&self, id: &str) -> Result<Build, ApiFailure> {
        let tracked = self.find(id)?;
        tracked.cancel.cancel();
        let mut recorded = tracked.recorded.subscribe();
        while tracked.snapshot().state == BuildState::Building {
            if recorded.changed().await.is_err() {
                break;
            }
        }
        Ok(tracked.snapshot())
    }

    /// The events of a build from `offset`; with `wait`, waits until there is at least one new event or the build
    /// has ended.
    pub async fn events(&self, id: &str, offset: u64, wait: bool) -> Result<EventBatch, ApiFailure> {
        let tracked = self.find(id)?;
        let mut recorded = tracked.recorded.subscribe();
        loop {
            let batch = tracked.read(offset);
            if !wait || !batch.events.is_empty() || batch.missed > 0 || batch.finished {
                return Ok(batch);
            }
            if recorded.changed().await.is_err() {
                return Ok(tracked.read(offset));
            }
        }
    }

    fn find(&self, id: &str) -> Result<Arc<Tracked>, ApiFailure> {
        self.builds
            .lock()
            .expect("builds")
            .iter()
            .find(|tracked| tracked.state.lock().expect("build").build.id == id)
            .cloned()
            .ok_or_else(|| ApiFailure::not_found(format!("build {id:?} does not exist (or finished long ago)")))
    }

    /// Adds a build to the list, forgetting the oldest finished builds beyond [`MAX_FINISHED_BUILDS`].
    fn remember(&self, tracked: Arc<Tracked>) {
        let mut builds = self.builds.lock().expect("builds");
        builds.push(tracked);
        let finished = builds
            .iter()
            .filter(|b| b.snapshot().state != BuildState::Building)
            .count();
        let mut excess = finished.saturating_sub(MAX_FINISHED_BUILDS);
        builds.retain(|build| {
            let forget = excess > 0 && build.snapshot().state != BuildState::Building;
            if forget {
                excess -= 1;
            }
            !forget
        });
    }
}

impl Tracked {
    /// A build that has just started.
    fn new(id: String, name: String) -> Self {
        Self {
            cancel: CancellationToken::new(),
            state: Mutex::new(TrackedState {
                build: Build {
                    id,
                    name,
                    state: BuildState::Building,
                    started_at: Utc::now(),
                    finished_at: None,
                    image: None,
                    error: None,
                    failed_step: None,
                    events: 0,
                },
                log: VecDeque::new(),
                first: 0,
                kept_bytes: 0,
                timed_out: None,
            }),
            recorded: watch::Sender::new(0),
        }
    }

    fn snapshot(&self) -> Build {
        self.state.lock().expect("build").build.clone()
    }

    /// Appends an event to the log, dropping the oldest when the log grows past [`MAX_LOG_BYTES`].
    fn record(&self, event: BuildEvent) {
        let mut state = self.state.lock().expect("build");
        state.kept_bytes += kept_size(&event);
        state.log.push_back(LoggedEvent { at: Utc::now(), event });
        state.trim(MAX_LOG_BYTES);
        state.build.events += 1;
        let total = state.build.events;
        drop(state);
        self.recorded.send_replace(total);
    }

    fn read(&self, offset: u64) -> EventBatch {
        let state = self.state.lock().expect("build");
        let end = state.first + state.log.len() as u64;
        let from = offset.clamp(state.first, end);
        EventBatch {
            missed: from - offset.min(from),
            events: state.log.range((from - state.first) as usize..).cloned().collect(),
            next: end,
            finished: state.build.state != BuildState::Building,
        }
    }
}

impl TrackedState {
    /// Drops the oldest events until the log holds at most `limit` bytes.
    fn trim(&mut self, limit: usize) {
        while self.kept_bytes > limit {
            let Some(dropped) = self.log.pop_front() else { break };
            self.kept_bytes -= kept_size(&dropped.event);
            self.first += 1;
        }
    }
}

/// What an event costs the log: its output text and a fixed overhead.
fn kept_size(event: &BuildEvent) -> usize {
    EVENT_OVERHEAD
        + match event {
            BuildEvent::Output { text, .. } => text.len(),
            _ => 0,
        }
}

fn check_request(request: &BuildRequest) -> Result<BuildPlan, ApiFailure> {
    nook_api::names::check_image_name(&request.name).map_err(ApiFailure::invalid)?;
    let dockerfile = request.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into());
    if dockerfile.is_empty() || dockerfile.len() > 4096 || dockerfile.contains('\0') {
        return Err(ApiFailure::invalid(
            "dockerfile must be a path inside the build context",
        ));
    }
    let build_args: BTreeMap<String, String> = match &request.build_args {
        None => BTreeMap::new(),
        Some(text) => serde_json::from_str(text).map_err(|error| {
            ApiFailure::invalid(format!(
                "build_args must be a JSON object of strings, such as {{\"VERSION\":\"1.2\"}}: {error}"
            ))
        })?,
    };
    if build_args.len() > MAX_BUILD_ARGS {
        return Err(ApiFailure::invalid(format!(
            "at most {MAX_BUILD_ARGS} build arguments are allowed"
        )));
    }
    if let Some(name) = build_args
        .keys()
        .find(|name| !nook_runner::build::dockerfile::is_variable_name(name))
    {
        return Err(ApiFailure::invalid(format!(
            "build argument {name:?} is not a variable name"
        )));
    }
    let timeout_s = request.timeout_s.unwrap_or(DEFAULT_BUILD_TIMEOUT_S);
    if timeout_s == 0 || timeout_s > MAX_BUILD_TIMEOUT_S {
        return Err(ApiFailure::invalid(format!(
            "timeout_s must be between 1 and {MAX_BUILD_TIMEOUT_S} seconds"
        )));
    }
    let start = match (&request.start_command, &request.ready_command, request.ready_timeout_s) {
        (None, None, None) => None,
        (None, _, _) => {
            return Err(ApiFailure::invalid(
                "ready_command and ready_timeout_s need a start_command to check",
            ))
        }
        (Some(command), ready, ready_timeout_s) => {
            if command.trim().is_empty() {
                return Err(ApiFailure::invalid("start_command is empty"));
            }
            if ready_timeout_s.is_some_and(|s| s == 0 || s > MAX_READY_TIMEOUT_S) {
                return Err(ApiFailure::invalid(format!(
                    "ready_timeout_s must be between 1 and {MAX_READY_TIMEOUT_S} seconds (default \
                     {DEFAULT_READY_TIMEOUT_S})"
                )));
            }
            Some(TemplateStart {
                command: command.clone(),
                ready_command: ready.clone().filter(|ready| !ready.trim().is_empty()),
                ready_timeout_s,
            })
        }
    };
    Ok(BuildPlan {
        name: request.name.clone(),
        also_named: Vec::new(),
        recipe: Recipe::Dockerfile(dockerfile),
        build_args,
        no_cache_from: request.no_cache.then_some(1),
        start,
        timeout_s,
    })
}

/// Records what the runner's `build` reports on `received`, stops it at its time limit, and records how it ended;
/// tells `started` once the runner has started it (or why it could not). Holds the build's slot until then.
async fn drive(
    tracked: Arc<Tracked>,
    build: tokio::task::JoinHandle<Result<nook_api::Image, RunnerError>>,
    mut received: mpsc::Receiver<BuildEvent>,
    timeout_s: u64,
    started: oneshot::Sender<Result<(), ApiFailure>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let timer = {
        let tracked = tracked.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(timeout_s)) => {
                    tracked.state.lock().expect("build").timed_out = Some(timeout_s);
                    tracked.cancel.cancel();
                }
                () = tracked.cancel.cancelled() => {}
            }
        })
    };
    let mut started = Some(started);
    while let Some(event) = received.recv().await {
        tracked.record(event);
        if let Some(started) = started.take() {
            let _ = started.send(Ok(()));
        }
    }
    let result = build.await.unwrap_or_else(|panic| {
        Err(RunnerError::Process {
            code: "internal".into(),
            message: format!("the build task failed: {panic}"),
        })
    });
    timer.abort();
    let timed_out = tracked.state.lock().expect("build").timed_out;
    let (state, image, failure) = match result {
        Ok(image) => (BuildState::Succeeded, Some(image), None),
        Err(error) => {
            let step = match &error {
                RunnerError::Build(build) => build.step(),
                _ => None,
            };
            let exit_code = match &error {
                RunnerError::Build(BuildError::RunFailed { exit_code, .. }) => *exit_code,
                _ => None,
            };
            let cancelled = matches!(error, RunnerError::Build(BuildError::Cancelled));
            let failure = match timed_out {
                Some(timeout_s) if cancelled => ApiFailure::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "build_timed_out",
                    format!("the build ran past its timeout of {timeout_s} s and was stopped"),
                ),
                _ => ApiFailure::from(error),
            };
            let state = if cancelled && timed_out.is_none() {
                BuildState::Cancelled
            } else {
                BuildState::Failed
            };
            (state, None, Some((failure, step, exit_code)))
        }
    };
    if let Some((failure, step, exit_code)) = &failure {
        tracked.record(BuildEvent::Error {
            error: failure.body(),
            step: *step,
            exit_code: *exit_code,
        });
    }
    let mut guard = tracked.state.lock().expect("build");
    guard.build.state = state;
    guard.build.finished_at = Some(Utc::now());
    guard.build.image = image;
    guard.build.failed_step = failure.as_ref().and_then(|(_, step, _)| *step);
    guard.build.error = failure.as_ref().map(|(failure, ..)| failure.body());
    guard.trim(MAX_FINISHED_LOG_BYTES);
    let total = guard.build.events;
    drop(guard);
    // Wake followers: the build has ended.
    tracked.recorded.send_replace(total);
    if let Some(started) = started.take() {
        // It ended before it started (a context or Dockerfile that is wrong): the request itself fails with the
        // reason, and the request's handler forgets the build.
        if let Some((failure, ..)) = failure {
            let _ = started.send(Err(failure));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> BuildRequest {
        BuildRequest {
            name: name.into(),
            ..BuildRequest::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(check_request(&request("app:1")).is_ok());
        for (bad, part) in [
            (request("Bad Name"), "name"),
            (
                BuildRequest {
                    build_args: Some("[1]".into()),
                    ..request("a")
                },
                "JSON object",
            ),
            (
                BuildRequest {
                    build_args: Some(r#"{"1x":"v"}"#.into()),
                    ..request("a")
                },
                "variable name",
            ),
            (
                BuildRequest {
                    timeout_s: Some(0),
                    ..request("a")
                },
                "timeout_s",
            ),
            (
                BuildRequest {
                    ready_command: Some("true".into()),
                    ..request("a")
                },
                "start_command",
            ),
            (
                BuildRequest {
                    start_command: Some("serve".into()),
                    ready_timeout_s: Some(MAX_READY_TIMEOUT_S + 1),
                    ..request("a")
                },
                "ready_timeout_s",
            ),
        ] {
            let failure = check_request(&bad).expect_err("refused");
            assert!(failure.message.contains(part), "{}", failure.message);
        }
        let checked = check_request(&BuildRequest {
            start_command: Some("python3 -m http.server".into()),
            ready_command: Some("  ".into()),
            build_args: Some(r#"{"V":"1"}"#.into()),
            ..request("a")
        })
        .unwrap();
        assert_eq!(checked.build_args["V"], "1");
        assert_eq!(checked.start.unwrap().ready_command, None);
    }

    #[test]
    fn the_log_replays_by_offset_and_forgets_its_oldest_output() {
        let tracked = Tracked::new("bld-x".into(), "x".into());
        let chunk = "x".repeat(MAX_LOG_BYTES / 4 - EVENT_OVERHEAD);
        for step in 0..6 {
            tracked.record(BuildEvent::Output {
                step,
                stream: nook_api::OutputStream::Stdout,
                text: chunk.clone(),
            });
        }
        let all = tracked.read(0);
        assert_eq!((all.missed, all.events.len(), all.next), (2, 4, 6));
        let tail = tracked.read(5);
        assert_eq!((tail.missed, tail.events.len()), (0, 1));
        assert!(matches!(tail.events[0].event, BuildEvent::Output { step: 5, .. }));
        let beyond = tracked.read(9);
        assert_eq!((beyond.missed, beyond.events.len(), beyond.next), (0, 0, 6));
        assert_eq!(*tracked.recorded.borrow(), 6);
    }
}
