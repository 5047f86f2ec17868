//! E2B template builds (what `Template.build` of the 2.x SDKs calls) on nook's image builder.
//!
//! The SDK's flow, and what each call does here:
//! 1. `POST /v3/templates` names the template (`name`, optional `tags`): nook records a waiting build and answers
//!    with a build id; the template id is the image name, so `Sandbox.create(name)` finds the image afterwards.
//! 2. For every `COPY` step, `GET /templates/{template}/files/{hash}` asks whether the files of that hash (a key the
//!    SDK computes over names, modes and contents) are already here; when not, the SDK uploads them, a tar (usually
//!    gzip), with a plain `PUT` to the URL nook answered: `/template-files/{hash}?expires=…&token=…`, signed with
//!    the E2B secret for an hour because the SDK sends no API key there. Uploads are streamed to
//!    `e2b-template-files/` in the data directory and appear only once complete, and once (a hash's files are never
//!    replaced).
//! 3. `POST /v2/templates/{template}/builds/{build}` starts it: the steps (`ENV`, `RUN` with an optional user,
//!    `COPY` with owner and mode, `WORKDIR`, `USER`) become builder instructions over a context in which each
//!    upload is unpacked under `files/{hash}/`; `fromImage`/`fromTemplate` is the `FROM` (E2B's own base,
//!    `e2bdev/base`, is nook's `base`); a step marked `force` and every later one run again instead of coming from
//!    the cache; `startCmd`/`readyCmd` become the image's start command and readiness check.
//! 4. `GET /templates/{template}/builds/{build}/status?logsOffset=N` reports `waiting`, `building`, `ready` or
//!    `error` with the log from entry N: one entry per build event, so the SDK's offset arithmetic holds.
//!
//! `GET /templates/aliases/{name}` answers whether a template exists. Values from the SDK are quoted into the
//! instructions ([`dockerfile::quote`]), so nothing in them is expanded as a variable.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use nook_api::{BuildEvent, BuildState, OutputStream, TemplateStart, DEFAULT_BUILD_TIMEOUT_S};
use nook_control::builds::{BuildPlan, LoggedEvent};
use nook_runner::build::dockerfile::{self, Command, Instruction, Step};
use nook_runner::build::Recipe as BuilderRecipe;
use serde::{Deserialize, Serialize};

use crate::rest::error;
use crate::{same_secret, E2b};

/// Largest upload of one COPY's files.
const MAX_UPLOAD_BYTES: u64 = 16 << 30;
/// Template builds remembered; beyond it the oldest requested are forgotten (their images stay).
const MAX_REMEMBERED: usize = 1000;
/// How long an upload URL works, in seconds (the SDK uploads right after asking).
const UPLOAD_URL_LIFETIME_S: i64 = 3600;
/// Most log entries one status call returns (the SDK asks for 100).
const MAX_LOG_ENTRIES: usize = 1000;
/// E2B's base template, which nook's `base` image stands for.
const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// The template builds E2B clients asked for.
pub struct TemplateBuilds {
    files_dir: PathBuf,
    /// By build id, oldest request first.
    builds: Mutex<VecDeque<(String, TemplateBuild)>>,
}

/// Where a requested template build is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    /// Requested; its steps have not come yet.
    Waiting,
    /// Its steps came and the build is being started.
    Starting,
    /// Running or done as this nook build.
    Started(String),
}

/// One requested template build.
#[derive(Debug, Clone)]
struct TemplateBuild {
    template: String,
    also_named: Vec<String>,
    /// Where it is.
    progress: Progress,
    /// Builder steps before the template's first step (the `FROM`, and the prelude of E2B's base).
    preamble: u32,
}

impl TemplateBuilds {
    /// Template builds whose uploaded files live in `data_dir/e2b-template-files`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            files_dir: data_dir.join("e2b-template-files"),
            builds: Mutex::new(VecDeque::new()),
        }
    }

    /// Remembers a new build, forgetting the oldest beyond [`MAX_REMEMBERED`].
    fn remember(&self, build_id: String, build: TemplateBuild) {
        let mut builds = self.builds.lock().expect("template builds");
        builds.push_back((build_id, build));
        if builds.len() > MAX_REMEMBERED {
            builds.pop_front();
        }
    }

    /// Runs `change` on a remembered build.
    fn with<T>(&self, build_id: &str, change: impl FnOnce(&mut TemplateBuild) -> T) -> Option<T> {
        let mut builds = self.builds.lock().expect("template builds");
        builds
            .iter_mut()
            .find(|(id, _)| id == build_id)
            .map(|(_, build)| change(build))
    }

    fn get(&self, build_id: &str, template: &str) -> Option<TemplateBuild> {
        self.with(build_id, |build| build.clone())
            .filter(|build| build.template == template)
    }

    /// Moves a waiting build to starting; false when it is not waiting (two start calls race, or it started).
    fn claim(&self, build_id: &str) -> bool {
        self.with(build_id, |build| {
            let waiting = build.progress == Progress::Waiting;
            if waiting {
                build.progress = Progress::Starting;
            }
            waiting
        })
        .unwrap_or(false)
    }

    /// Records how a start ended: the nook build, or waiting again when it failed.
    fn started(&self, build_id: &str, progress: Progress, preamble: u32) {
        self.with(build_id, |build| {
            build.progress = progress;
            build.preamble = preamble;
        });
    }

    fn files_path(&self, hash: &str) -> PathBuf {
        self.files_dir.join(hash)
    }
}

/// Body of `POST /v3/templates` (unknown fields ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TemplateRequest {
    name: Option<String>,
    alias: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// Answer of `POST /v3/templates`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TemplateRequested {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    public: bool,
    names: Vec<String>,
    tags: Vec<String>,
    aliases: Vec<String>,
}

/// `name[:tag]` → (`name`, `tag`): the tag is what follows the last `:` after the last `/`.
pub(crate) fn split_tag(name: &str) -> (&str, Option<&str>) {
    let slash = name.rfind('/').map_or(0, |at| at + 1);
    match name[slash..].rfind(':') {
        Some(at) => (&name[..slash + at], Some(&name[slash + at + 1..])),
        None => (name, None),
    }
}

pub(crate) async fn request_template(State(e2b): State<E2b>, Json(request): Json<TemplateRequest>) -> Response {
    let Some(name) = request.name.or(request.alias) else {
        return error(StatusCode::BAD_REQUEST, "name the template (`name`)");
    };
    if let Err(message) = nook_api::names::check_image_name(&name) {
        return error(StatusCode::BAD_REQUEST, message);
    }
    let (repository, tag) = split_tag(&name);
    let mut also_named = Vec::new();
    for extra in &request.tags {
        let tagged = format!("{repository}:{extra}");
        if let Err(message) = nook_api::names::check_image_name(&tagged) {
            return error(StatusCode::BAD_REQUEST, message);
        }
        if tagged != name && !also_named.contains(&tagged) {
            also_named.push(tagged);
        }
    }
    let build_id = uuid_like();
    e2b.templates.remember(
        build_id.clone(),
        TemplateBuild {
            template: name.clone(),
            also_named,
            progress: Progress::Waiting,
            preamble: 1,
        },
    );
    let mut tags: Vec<String> = tag.map(str::to_string).into_iter().collect();
    tags.extend(request.tags.iter().cloned());
    let answer = TemplateRequested {
        template_id: name.clone(),
        build_id,
        public: false,
        names: vec![name.clone()],
        tags,
        aliases: vec![repository.to_string()],
    };
    (StatusCode::ACCEPTED, Json(answer)).into_response()
}

/// A random id shaped like the UUIDs E2B hands out.
fn uuid_like() -> String {
    nook_api::names::uuid_text(rand::random())
}

fn is_files_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn build_not_found(build_id: &str, template: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("build {build_id} of template {template} not found"),
    )
}

/// Answer of the files check.
#[derive(Debug, Serialize)]
struct FilesCheck {
    present: bool,
    url: String,
}

pub(crate) async fn check_files(
    State(e2b): State<E2b>,
    UrlPath((template, hash)): UrlPath<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    if !is_files_hash(&hash) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{hash:?} is not a files hash (64 hex digits)"),
        );
    }
    // The address the client reached nook at (HTTP/1.1 Host, or the authority of an HTTP/2 request), and the scheme
    // a TLS-terminating proxy in front says it used.
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(str::to_string)
        .or_else(|| uri.authority().map(ToString::to_string));
    let Some(host) = host else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request names no host to make the upload URL from",
        );
    };
    let scheme = match headers.get("x-forwarded-proto").and_then(|proto| proto.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    let present = e2b.templates.files_path(&hash).is_file();
    tracing::debug!(%template, %hash, present, "template files checked");
    let expires = chrono::Utc::now().timestamp() + UPLOAD_URL_LIFETIME_S;
    let token = upload_token(&e2b, &hash, expires);
    let url = format!("{scheme}://{host}/template-files/{hash}?expires={expires}&token={token}");
    (StatusCode::CREATED, Json(FilesCheck { present, url })).into_response()
}

/// The signature of an upload URL: the hash it may write and until when.
fn upload_token(e2b: &E2b, hash: &str, expires: i64) -> String {
    e2b.derive_token(b"template-files:", &format!("{hash}:{expires}"))
}

/// Query of an upload.
#[derive(Debug, Deserialize)]
pub(crate) struct UploadQuery {
    expires: i64,
    token: String,
}

/// Removes a partial upload unless it was kept.
struct PartialFile(Option<PathBuf>);

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `PUT /template-files/{hash}?expires=…&token=…`: the files of one COPY, streamed to disk. They appear only once
/// complete, and once: files of a hash already here are kept (the hash names their content), so a leaked URL
/// cannot replace them, and it stops working when it expires.
pub(crate) async fn upload_files(
    State(e2b): State<E2b>,
    UrlPath(hash): UrlPath<String>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> Response {
    let fresh = query.expires >= chrono::Utc::now().timestamp();
    if !is_files_hash(&hash) || !fresh || !same_secret(&query.token, &upload_token(&e2b, &hash, query.expires)) {
        return error(
            StatusCode::FORBIDDEN,
            "the upload URL is not valid or has expired (ask for a new one)",
        );
    }
    let target = e2b.templates.files_path(&hash);
    if target.is_file() {
        // Read and dropped, so that the client's upload ends normally.
        return match drain(body).await {
            Ok(()) => StatusCode::OK.into_response(),
            Err(problem) => error(StatusCode::BAD_REQUEST, format!("the upload failed: {problem}")),
        };
    }
    let dir = e2b.templates.files_dir.clone();
    if let Err(problem) = tokio::fs::create_dir_all(&dir).await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("creating {} failed: {problem}", dir.display()),
        );
    }
    let partial = PartialFile(Some(dir.join(format!(".{hash}.{}.partial", uuid_like()))));
    let path = partial.0.clone().expect("set above");
    let written = match write_upload(&path, body).await {
        // A link never replaces what is there: when another upload of the same hash won, its files stay.
        Ok(()) => match tokio::fs::hard_link(&path, &target).await {
            Err(problem) if problem.kind() != std::io::ErrorKind::AlreadyExists => Err(problem),
            _ => Ok(()),
        },
        Err(problem) => Err(problem),
    };
    drop(partial);
    match written {
        Ok(()) => StatusCode::OK.into_response(),
        Err(problem) => error(StatusCode::BAD_REQUEST, format!("the upload failed: {problem}")),
    }
}

/// Reads a request body to its end (bounded), keeping nothing.
async fn drain(body: Body) -> std::io::Result<()> {
    let mut stream = body.into_data_stream();
    let mut read = 0u64;
    while let Some(chunk) = stream.next().await {
        read += chunk.map_err(std::io::Error::other)?.len() as u64;
        if read > MAX_UPLOAD_BYTES {
            return Err(std::io::Error::other(format!(
                "it is larger than {MAX_UPLOAD_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

async fn write_upload(path: &Path, body: Body) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut file = tokio::fs::File::create(path).await?;
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(std::io::Error::other)?;
        written += chunk.len() as u64;
        if written > MAX_UPLOAD_BYTES {
            return Err(std::io::Error::other(format!(
                "it is larger than {MAX_UPLOAD_BYTES} bytes"
            )));
        }
        file.write_all(&chunk).await?;
    }
    file.sync_all().await
}

/// Body of `POST /v2/templates/{template}/builds/{build}` (unknown fields ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BuildStart {
    from_image: Option<String>,
    from_template: Option<String>,
    from_image_registry: Option<serde_json::Value>,
    #[serde(default)]
    force: bool,
    #[serde(default)]
    steps: Vec<TemplateStep>,
    start_cmd: Option<String>,
    ready_cmd: Option<String>,
}

/// One step of a template.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateStep {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    force: bool,
    files_hash: Option<String>,
}

pub(crate) async fn start_build(
    State(e2b): State<E2b>,
    UrlPath((template, build_id)): UrlPath<(String, String)>,
    Json(start): Json<BuildStart>,
) -> Response {
    let Some(build) = e2b.templates.get(&build_id, &template) else {
        return build_not_found(&build_id, &template);
    };
    if start.from_image_registry.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "registry credentials per build are not taken: nook reads them from its server config (registries)",
        );
    }
    let Recipe {
        instructions,
        hashes,
        no_cache_from,
        preamble,
    } = match recipe(&start) {
        Ok(parts) => parts,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    for hash in &hashes {
        if !e2b.templates.files_path(hash).is_file() {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the files of a COPY step (hash {hash}) were never uploaded"),
            );
        }
    }
    let plan = BuildPlan {
        name: build.template.clone(),
        also_named: build.also_named.clone(),
        recipe: BuilderRecipe::Instructions(instructions),
        build_args: Default::default(),
        no_cache_from: if start.force { Some(1) } else { no_cache_from },
        start: start
            .start_cmd
            .filter(|command| !command.trim().is_empty())
            .map(|command| TemplateStart {
                command,
                ready_command: start.ready_cmd.filter(|ready| !ready.trim().is_empty()),
                ready_timeout_s: None,
            }),
        timeout_s: DEFAULT_BUILD_TIMEOUT_S,
    };
    if !e2b.templates.claim(&build_id) {
        return error(StatusCode::CONFLICT, format!("build {build_id} has already started"));
    }
    let context = context_stream(e2b.templates.files_dir.clone(), hashes);
    match e2b.control.builds().launch(plan, context).await {
        Ok(started) => {
            e2b.templates
                .started(&build_id, Progress::Started(started.id), preamble);
            StatusCode::ACCEPTED.into_response()
        }
        Err(failure) => {
            e2b.templates.started(&build_id, Progress::Waiting, build.preamble);
            error(failure.status, failure.message)
        }
    }
}

/// What a template's steps become for the builder.
#[derive(Debug)]
struct Recipe {
    /// The instructions: the `FROM`, a prelude for E2B's base, the template's steps.
    instructions: Vec<Instruction>,
    /// The file hashes its COPY steps use.
    hashes: Vec<String>,
    /// The first builder step that must not come from the cache.
    no_cache_from: Option<u32>,
    /// Builder steps before the template's first step.
    preamble: u32,
}

/// The user and working directory templates on E2B's base start with, as E2B's base image sets them.
const E2B_BASE_USER: &str = crate::DEFAULT_USER;
const E2B_BASE_WORKDIR: &str = "/home/user";

/// The builder's recipe for a template's steps.
fn recipe(start: &BuildStart) -> Result<Recipe, String> {
    let from = match (&start.from_template, &start.from_image) {
        (Some(template), None) => template.clone(),
        (None, Some(image)) => image.clone(),
        (None, None) => E2B_BASE_IMAGE.to_string(),
        (Some(_), Some(_)) => return Err("give fromImage or fromTemplate, not both".into()),
    };
    let e2b_base = from == E2B_BASE_IMAGE || from.starts_with(&format!("{E2B_BASE_IMAGE}:"));
    // E2B's base template: nook's base image stands for it, with E2B's default user and working directory.
    let from = if e2b_base {
        nook_control::BASE_IMAGE.to_string()
    } else {
        from
    };
    let mut out = vec![Instruction {
        line: 1,
        text: format!("FROM {from}"),
        step: Step::From {
            image: dockerfile::quote(&from),
        },
    }];
    if e2b_base {
        out.push(Instruction {
            line: 1,
            text: format!("USER {E2B_BASE_USER}"),
            step: Step::User(dockerfile::quote(E2B_BASE_USER)),
        });
        out.push(Instruction {
            line: 1,
            text: format!("WORKDIR {E2B_BASE_WORKDIR}"),
            step: Step::Workdir(dockerfile::quote(E2B_BASE_WORKDIR)),
        });
    }
    let preamble = out.len() as u32;
    let mut hashes: Vec<String> = Vec::new();
    let mut no_cache_from = None;
    for (index, step) in start.steps.iter().enumerate() {
        let number = preamble + index as u32 + 1;
        let fail = |message: &str| format!("step {} ({} {:?}): {message}", index + 1, step.kind, step.args);
        let arg = |at: usize| step.args.get(at).filter(|value| !value.is_empty());
        let parsed = match step.kind.as_str() {
            "RUN" => Step::Run {
                command: Command::Shell(arg(0).ok_or_else(|| fail("RUN needs a command"))?.clone()),
                user: arg(1).map(|user| dockerfile::quote(user)),
            },
            "ENV" => {
                if step.args.is_empty() || step.args.len() % 2 != 0 {
                    return Err(fail("ENV takes name, value pairs"));
                }
                let pairs: Vec<String> = step
                    .args
                    .chunks(2)
                    .map(|pair| format!("{}={}", pair[0], dockerfile::quote(&pair[1])))
                    .collect();
                if let Some(bad) = step.args.chunks(2).find(|pair| !dockerfile::is_variable_name(&pair[0])) {
                    return Err(fail(&format!("{:?} is not a variable name", bad[0])));
                }
                Step::Env(pairs.join(" "))
            }
            "WORKDIR" => Step::Workdir(dockerfile::quote(arg(0).ok_or_else(|| fail("WORKDIR needs a path"))?)),
            "USER" => Step::User(dockerfile::quote(arg(0).ok_or_else(|| fail("USER needs a user"))?)),
            "COPY" => {
                let hash = step
                    .files_hash
                    .clone()
                    .filter(|hash| is_files_hash(hash))
                    .ok_or_else(|| fail("COPY needs the filesHash of its uploaded files"))?;
                let source = arg(0).ok_or_else(|| fail("COPY needs a source"))?;
                let dest = arg(1).ok_or_else(|| fail("COPY needs a destination"))?;
                let chmod = match arg(3) {
                    Some(mode) => Some(
                        u32::from_str_radix(mode, 8)
                            .ok()
                            .filter(|mode| *mode <= 0o7777)
                            .ok_or_else(|| fail("the mode is not an octal mode"))?,
                    ),
                    None => None,
                };
                if !hashes.contains(&hash) {
                    hashes.push(hash.clone());
                }
                Step::Copy {
                    sources: vec![dockerfile::quote(&format!("files/{hash}/{source}"))],
                    dest: dockerfile::quote(dest),
                    chown: arg(2).map(|user| dockerfile::quote(user)),
                    chmod,
                    add: false,
                }
            }
            other => {
                return Err(format!(
                    "step {}: nook does not know the step type {other:?}",
                    index + 1
                ))
            }
        };
        if step.force && no_cache_from.is_none() {
            no_cache_from = Some(number);
        }
        out.push(Instruction {
            line: number as usize,
            text: format!("{} {}", step.kind, step.args.join(" ")),
            step: parsed,
        });
    }
    Ok(Recipe {
        instructions: out,
        hashes,
        no_cache_from,
        preamble,
    })
}

/// The build context: every upload of the template, unpacked under `files/{hash}/`, as one tar stream written on a
/// blocking thread.
fn context_stream(files_dir: PathBuf, hashes: Vec<String>) -> nook_runner::ByteStream {
    nook_runner::produced_stream(move |out| write_context(&files_dir, &hashes, out))
}

fn write_context(files_dir: &Path, hashes: &[String], out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(out);
    for hash in hashes {
        let prefix = PathBuf::from("files").join(hash);
        let file = std::fs::File::open(files_dir.join(hash))?;
        let mut archive = tar::Archive::new(nook_runner::images::unpack::decompressed(file)?);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = prefix.join(entry.path()?);
            let mut header = entry.header().clone();
            match header.entry_type() {
                tar::EntryType::Regular | tar::EntryType::Directory => {
                    builder.append_data(&mut header, &path, &mut entry)?;
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name()?.unwrap_or_default().into_owned();
                    builder.append_link(&mut header, &path, target)?;
                }
                tar::EntryType::Link => {
                    let target = prefix.join(entry.link_name()?.unwrap_or_default());
                    builder.append_link(&mut header, &path, target)?;
                }
                _ => {}
            }
        }
    }
    builder.into_inner()?.flush()
}

/// Query of the status call.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusQuery {
    #[serde(default)]
    logs_offset: u64,
    limit: Option<usize>,
}

/// One log entry.
#[derive(Debug, Serialize)]
struct LogEntry {
    timestamp: chrono::DateTime<chrono::Utc>,
    level: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Serialize)]
struct FailureReason {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

/// Answer of the status call.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct BuildStatus {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    logs: Vec<String>,
    log_entries: Vec<LogEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<FailureReason>,
}

/// E2B's name for a builder step: `base` for the `FROM` (and the prelude after it), the template step's 1-based
/// number after that.
fn step_label(step: u32, preamble: u32) -> String {
    if step <= preamble {
        "base".into()
    } else {
        (step - preamble).to_string()
    }
}

pub(crate) async fn build_status(
    State(e2b): State<E2b>,
    UrlPath((template, build_id)): UrlPath<(String, String)>,
    Query(query): Query<StatusQuery>,
) -> Response {
    let Some(build) = e2b.templates.get(&build_id, &template) else {
        return build_not_found(&build_id, &template);
    };
    let mut status = BuildStatus {
        template_id: template,
        build_id,
        status: "waiting",
        logs: Vec::new(),
        log_entries: Vec::new(),
        reason: None,
    };
    let Progress::Started(nook_build) = build.progress else {
        return Json(status).into_response();
    };
    let builds = e2b.control.builds();
    let (info, batch) = match (
        builds.get(&nook_build),
        builds.events(&nook_build, query.logs_offset, false).await,
    ) {
        (Ok(info), Ok(batch)) => (info, batch),
        (Err(failure), _) | (_, Err(failure)) => return error(failure.status, failure.message),
    };
    let limit = query.limit.unwrap_or(MAX_LOG_ENTRIES).clamp(1, MAX_LOG_ENTRIES);
    let preamble = build.preamble;
    // Entries the log no longer holds are one warning (the SDK then counts one entry where there were more, and
    // may see a few entries twice; only a build with more output than the log keeps gets there).
    let missed = (batch.missed > 0).then(|| LogEntry {
        timestamp: batch.events.first().map_or_else(chrono::Utc::now, |logged| logged.at),
        level: "warn",
        message: format!("{} earlier log entries are no longer kept", batch.missed),
        step: None,
    });
    status.log_entries = missed
        .into_iter()
        .chain(batch.events.iter().map(|logged| log_entry(logged, preamble)))
        .take(limit)
        .collect();
    status.status = match info.state {
        BuildState::Building => "building",
        BuildState::Succeeded => "ready",
        BuildState::Failed | BuildState::Cancelled => "error",
    };
    if let Some(failure) = &info.error {
        status.reason = Some(FailureReason {
            message: failure.message.clone(),
            step: info.failed_step.map(|step| step_label(step, preamble)),
        });
    }
    Json(status).into_response()
}

fn log_entry(logged: &LoggedEvent, preamble: u32) -> LogEntry {
    let label = |step: u32| step_label(step, preamble);
    let entry = |level, message: String, step: Option<u32>| LogEntry {
        timestamp: logged.at,
        level,
        message,
        step: step.map(label),
    };
    match &logged.event {
        BuildEvent::Started {
            steps, context_files, ..
        } => entry(
            "info",
            format!("building {steps} steps ({context_files} files uploaded)"),
            None,
        ),
        BuildEvent::Step { step, instruction } => {
            entry("info", format!("[{}] {instruction}", label(*step)), Some(*step))
        }
        BuildEvent::Output { step, stream, text } => {
            let level = match stream {
                OutputStream::Stdout => "info",
                OutputStream::Stderr => "warn",
            };
            entry(level, text.trim_end_matches('\n').to_string(), Some(*step))
        }
        BuildEvent::Notice { step, message } => entry("info", message.clone(), Some(*step)),
        BuildEvent::StepDone {
            step, cached, seconds, ..
        } => {
            let message = if *cached {
                "CACHED".to_string()
            } else {
                format!("done in {seconds:.1} s")
            };
            entry("debug", message, Some(*step))
        }
        BuildEvent::Done { image, seconds, .. } => entry(
            "info",
            format!("built {} ({}) in {seconds:.1} s", image.name, image.digest),
            None,
        ),
        BuildEvent::Error { error, step, .. } => entry("error", error.message.clone(), *step),
        BuildEvent::Missed { events } => {
            entry("warn", format!("{events} earlier log entries are no longer kept"), None)
        }
        BuildEvent::Keepalive => entry("debug", String::new(), None),
    }
}

/// Answer of the alias check.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AliasInfo {
    #[serde(rename = "templateID")]
    template_id: String,
    public: bool,
}

pub(crate) async fn template_by_alias(State(e2b): State<E2b>, UrlPath(alias): UrlPath<String>) -> Response {
    match e2b.control.runner().image(&alias).await {
        Ok(image) => Json(AliasInfo {
            template_id: image.name,
            public: false,
        })
        .into_response(),
        Err(_) => error(StatusCode::NOT_FOUND, format!("template {alias} not found")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_into_repository_and_tag() {
        assert_eq!(split_tag("my-tpl:v1"), ("my-tpl", Some("v1")));
        assert_eq!(split_tag("my-tpl"), ("my-tpl", None));
        assert_eq!(split_tag("host:5000/team/app:2"), ("host:5000/team/app", Some("2")));
        assert_eq!(split_tag("host:5000/team/app"), ("host:5000/team/app", None));
    }

    #[test]
    fn hashes_are_checked_and_ids_look_like_uuids() {
        assert!(is_files_hash(&"a".repeat(64)));
        assert!(!is_files_hash(&"A".repeat(64)) && !is_files_hash("../x") && !is_files_hash(&"a".repeat(63)));
        let id = uuid_like();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
    }

    #[test]
    fn step_labels_follow_the_sdk() {
        assert_eq!(step_label(1, 1), "base");
        assert_eq!(step_label(2, 1), "1");
        assert_eq!(step_label(3, 3), "base");
        assert_eq!(step_label(7, 3), "4");
    }
}
