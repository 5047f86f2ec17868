//! The E2B REST API, at the root of nook's address: what `Sandbox.create`, `list`, `connect`, `kill`,
//! `set_timeout` and `get_info` of E2B's SDKs call, in all three wire generations of the 2.x SDKs
//! (`/sandboxes`, `/v2/sandboxes`, and the old `/resume`).
//!
//! Mapping onto nook: an E2B template is a nook image (`base` is nook's base image); metadata are labels; env vars
//! are the sandbox's environment. E2B knows two states: a running nook sandbox is `running`, a stopped one (files
//! kept) is reported `paused`, and `connect` starts it again. The E2B timeout is the sandbox's deadline in nook's
//! control plane (stored, so it outlives restarts): when it passes, the sandbox is deleted, as E2B kills it, or
//! stopped (files kept, reported `paused`) when it was created with `autoPause`, E2B's pause on timeout. `pause`
//! pauses a sandbox with its memory (nook's pause: its processes frozen) or, asked for no memory, stops it; a paused
//! nook sandbox is reported `paused` too, and `connect` resumes it where it was. Errors are E2B's `{"code": <status>, "message"}`. Metrics
//! ([`crate::metrics`]), logs ([`crate::logs`]), template builds ([`crate::templates`]), and snapshots and forks
//! ([`crate::snapshots`]) are routed here and served by their own modules. A snapshot's id is the name of its nook
//! image, so `Sandbox.create(<snapshot id>)` finds it as it finds any template.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use nook_api::{CreateSandboxRequest, DeadlineAction, Sandbox, SandboxState};
use nook_control::audit::Audited;
use nook_control::control::SandboxFilter;
use nook_control::error::ApiFailure;
use nook_control::tenancy::{Caller, Grant};
use serde::{Deserialize, Serialize};

use crate::{E2b, ENVD_VERSION};

/// The E2B timeout when a client gives none.
const DEFAULT_TIMEOUT_S: u64 = 300;
/// The longest timeout accepted (E2B's Pro limit: 24 h).
const MAX_TIMEOUT_S: u64 = 24 * 3600;

/// An E2B error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message.into() });
    let mut response = (status, Json(body)).into_response();
    // The Python SDK retries 502/503/504 unless told not to; nook's answers are final.
    response
        .headers_mut()
        .insert("should-retry", axum::http::HeaderValue::from_static("false"));
    response
}

/// An E2B error from a nook failure.
pub(crate) struct Failure(pub(crate) ApiFailure);

impl From<ApiFailure> for Failure {
    fn from(failure: ApiFailure) -> Self {
        Self(failure)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let message = match self.0.reason {
            Some(reason) => format!("{}: {reason}", self.0.message),
            None => self.0.message,
        };
        error(self.0.status, message)
    }
}

/// The routes.
pub fn router(e2b: E2b) -> Router {
    Router::new()
        .route("/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v2/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(connect))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/snapshots", post(crate::snapshots::create_snapshot))
        .route("/sandboxes/{id}/fork", post(crate::snapshots::fork))
        .route("/snapshots", get(crate::snapshots::list_snapshots))
        .route("/sandboxes/{id}/metrics", get(crate::metrics::metrics))
        .route("/sandboxes/{id}/logs", get(crate::logs::logs_v1))
        .route("/v2/sandboxes/{id}/logs", get(crate::logs::logs_v2))
        .route("/templates", get(list_templates))
        .route("/templates/{id}", delete(delete_template).get(get_template))
        .route("/v3/templates", post(crate::templates::request_template))
        .route("/templates/aliases/{alias}", get(crate::templates::template_by_alias))
        .route("/templates/{id}/files/{hash}", get(crate::templates::check_files))
        .route("/v2/templates/{id}/builds/{build}", post(crate::templates::start_build))
        .route(
            "/templates/{id}/builds/{build}/status",
            get(crate::templates::build_status),
        )
        .layer(axum::middleware::from_fn_with_state(e2b.clone(), authenticate))
        // Template file uploads carry no API key: their URL is signed (see `templates`).
        .route(
            "/template-files/{hash}",
            axum::routing::put(crate::templates::upload_files).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .with_state(e2b)
}

/// Checks `X-API-Key` against nook's API keys, and marks the response for the audit log with who called.
async fn authenticate(State(e2b): State<E2b>, request: Request, next: Next) -> Response {
    let key = request.headers().get("x-api-key").and_then(|value| value.to_str().ok());
    let refused = |message: &str, request: &Request| {
        Audited::of("unauthenticated".into(), None, request).mark(error(StatusCode::UNAUTHORIZED, message))
    };
    let Some(key) = key else {
        return refused("send a nook API key in the X-API-Key header", &request);
    };
    match e2b.control.authenticate(key.trim()).await {
        Ok(Some(record)) => {
            let audited = Audited::of(
                format!("{} ({})", record.id, record.name),
                Some(record.tenant.clone()),
                &request,
            );
            let caller = Caller {
                tenant: record.tenant,
                grant: Grant::Key {
                    id: record.id,
                    scope: record.scope,
                },
            };
            let route = audited
                .route
                .clone()
                .unwrap_or_else(|| request.uri().path().to_string());
            let need = nook_control::tenancy::need(request.method(), &route);
            if let Err(failure) = nook_control::tenancy::permits(&caller, need, &route) {
                return audited.mark(error(failure.status, failure.message));
            }
            audited.mark(caller.scope(next.run(request)).await)
        }
        Ok(None) => refused("the API key is not valid (or was revoked, or has expired)", &request),
        Err(failure) => Failure(failure).into_response(),
    }
}

/// Body of a create call (both generations; unknown fields ignored).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    /// Egress lists.
    #[serde(default)]
    network: Option<E2bNetwork>,
    /// Pause instead of kill when the timeout passes (the OpenAI Agents SDK's provider asks for it by default).
    #[serde(default)]
    auto_pause: Option<bool>,
}

/// E2B's network settings that nook enforces.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct E2bNetwork {
    /// Destinations (addresses, blocks, domains) allowed; they win over the denied ones.
    #[serde(default)]
    allow_out: Vec<String>,
    /// Addresses and blocks denied.
    #[serde(default)]
    deny_out: Vec<String>,
    /// Whether the sandbox's ports accept requests without its traffic access token (E2B's default: yes).
    #[serde(default)]
    allow_public_traffic: Option<bool>,
    /// The Host its servers receive (`${PORT}` for the port).
    #[serde(default)]
    mask_request_host: Option<String>,
}

/// The nook policy for E2B's settings: the allowed destinations first (they take precedence), then the denied
/// ones, then everything denied if internet access is off; any public address otherwise.
fn network_policy(internet: Option<bool>, network: Option<E2bNetwork>) -> Option<nook_api::NetworkPolicy> {
    use nook_api::{EgressAction, EgressMode, EgressRule, NetworkPolicy};
    let network = network.unwrap_or_default();
    let internet = internet.unwrap_or(true);
    if internet && network.allow_out.is_empty() && network.deny_out.is_empty() {
        return None;
    }
    let rule = |action, to: &String| EgressRule {
        action,
        to: to.clone(),
        ports: Vec::new(),
    };
    let mut rules: Vec<EgressRule> = network
        .allow_out
        .iter()
        .map(|to| rule(EgressAction::Allow, to))
        .collect();
    rules.extend(network.deny_out.iter().map(|to| rule(EgressAction::Deny, to)));
    if !internet {
        rules.push(rule(EgressAction::Deny, &"0.0.0.0/0".to_string()));
    }
    Some(NetworkPolicy {
        egress: EgressMode::AllowAll,
        rules,
        default: None,
    })
}

/// The E2B view of a sandbox: the fields every SDK generation requires, and the detail fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct E2bSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    /// Left out for callers that may only look: the token opens the sandbox's processes and files.
    #[serde(skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traffic_access_token: Option<String>,
    alias: String,
    domain: Option<String>,
    started_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
    cpu_count: u64,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
}

impl E2b {
    /// The E2B view of a sandbox.
    pub(crate) fn describe(&self, sandbox: &Sandbox) -> E2bSandbox {
        // The tokens give what a write key has; a read key's caller sees the sandbox without them.
        let may_act = Caller::current().is_none_or(
            |caller| matches!(caller.grant, Grant::Key { scope, .. } if scope >= nook_api::tenancy::Scope::Write),
        );
        E2bSandbox {
            template_id: sandbox.image.clone(),
            sandbox_id: sandbox.id.clone(),
            client_id: "nook",
            envd_version: ENVD_VERSION,
            envd_access_token: may_act.then(|| self.access_token(&sandbox.id)),
            traffic_access_token: may_act.then(|| self.traffic_access_token(&sandbox.id)),
            alias: sandbox.image.clone(),
            // With a preview domain, the SDKs' `get_host(port)` names the port's preview host.
            domain: self.previews.domain().map(str::to_string),
            started_at: sandbox.created_at,
            end_at: sandbox
                .deadline
                .unwrap_or(sandbox.created_at + chrono::Duration::seconds(MAX_TIMEOUT_S as i64)),
            cpu_count: sandbox.resources.cpu.ceil().max(1.0) as u64,
            memory_mb: sandbox.resources.memory_mb,
            disk_size_mb: 0,
            state: if sandbox.state == SandboxState::Running {
                "running"
            } else {
                "paused"
            },
            metadata: sandbox.labels.clone(),
        }
    }
}

/// A bad request's message.
pub(crate) type BadRequest = String;

/// The timeout in seconds (E2B's default when absent), within E2B's maximum.
pub(crate) fn timeout_of(seconds: Option<u64>) -> Result<u64, BadRequest> {
    let seconds = seconds.unwrap_or(DEFAULT_TIMEOUT_S);
    if seconds > MAX_TIMEOUT_S {
        return Err(format!("timeout {seconds} s is over the maximum of {MAX_TIMEOUT_S} s"));
    }
    Ok(seconds)
}

async fn create_sandbox(State(e2b): State<E2b>, body: axum::body::Bytes) -> Response {
    let request: NewSandbox = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(problem) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the request body is invalid: {problem}"),
            )
        }
    };
    let timeout = match timeout_of(request.timeout) {
        Ok(timeout) => timeout,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let public_ports = request
        .network
        .as_ref()
        .and_then(|network| network.allow_public_traffic)
        .unwrap_or(true);
    let upstream_host = request
        .network
        .as_ref()
        .and_then(|network| network.mask_request_host.clone());
    let network = network_policy(request.allow_internet_access, request.network);
    // The code-interpreter SDKs ask for their own template; nook's base image carries what it needs.
    let interpreter = crate::interpreter::TEMPLATES.contains(&request.template_id.as_str());
    let image = if interpreter {
        "base".to_string()
    } else {
        request.template_id
    };
    let create = CreateSandboxRequest {
        image: Some(image),
        labels: request.metadata.unwrap_or_default(),
        env: request.env_vars.unwrap_or_default(),
        timeout_s: Some(timeout),
        on_deadline: Some(if request.auto_pause == Some(true) {
            DeadlineAction::Stop
        } else {
            DeadlineAction::Delete
        }),
        network,
        preview: Some(nook_api::PreviewSettings {
            all_ports_public: public_ports,
            upstream_host,
            ..Default::default()
        }),
        ..Default::default()
    };
    match e2b.control.create(create).await {
        Ok(sandbox) => {
            e2b.metrics.track(&sandbox.id);
            if interpreter {
                e2b.interpreters.prestart(&e2b, &sandbox.id);
            }
            (StatusCode::CREATED, Json(e2b.describe(&sandbox))).into_response()
        }
        Err(failure) => Failure(failure).into_response(),
    }
}

async fn get_sandbox(State(e2b): State<E2b>, Path(id): Path<String>) -> Response {
    match e2b.control.resolve(&id).await {
        Ok(sandbox) => Json(e2b.describe(&sandbox)).into_response(),
        Err(failure) => not_found_or(failure, &id),
    }
}

/// A 404 in E2B's words for a missing sandbox; other failures as they are.
pub(crate) fn not_found_or(failure: ApiFailure, id: &str) -> Response {
    if failure.status == StatusCode::NOT_FOUND {
        error(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
    } else {
        Failure(failure).into_response()
    }
}

async fn list_sandboxes(State(e2b): State<E2b>, Query(query): Query<Vec<(String, String)>>) -> Response {
    let mut states: Vec<String> = Vec::new();
    let mut wanted_metadata = BTreeMap::new();
    let mut limit = None;
    let mut next_token = 0usize;
    for (key, value) in query {
        match key.as_str() {
            "state" => states.extend(value.split(',').map(str::to_string)),
            "metadata" => {
                // The SDKs URI-encode keys and values, form-encode the pairs, and the query encodes that again:
                // after the query's own decoding, each key and value is still encoded twice.
                for pair in value.split('&').filter(|pair| !pair.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    wanted_metadata.insert(percent_decode(&percent_decode(k)), percent_decode(&percent_decode(v)));
                }
            }
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=1000).contains(&n) => limit = Some(n),
                _ => return error(StatusCode::BAD_REQUEST, format!("limit {value:?} must be 1 to 1000")),
            },
            "nextToken" => match value.parse() {
                Ok(offset) => next_token = offset,
                Err(_) => return error(StatusCode::BAD_REQUEST, format!("nextToken {value:?} is not valid")),
            },
            _ => {}
        }
    }
    let filter = SandboxFilter {
        state: None,
        labels: wanted_metadata,
    };
    let sandboxes = match e2b.control.list(&filter).await {
        Ok(sandboxes) => sandboxes,
        Err(failure) => return Failure(failure).into_response(),
    };
    let mut listed: Vec<E2bSandbox> = sandboxes
        .iter()
        .filter(|sandbox| {
            matches!(
                sandbox.state,
                SandboxState::Running | SandboxState::Paused | SandboxState::Stopped
            )
        })
        .map(|sandbox| e2b.describe(sandbox))
        .filter(|sandbox| states.is_empty() || states.iter().any(|state| state == sandbox.state))
        .collect();
    listed.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.sandbox_id.cmp(&b.sandbox_id)));
    // Pages count what matched every filter, the state included.
    let matched = listed.len();
    let page: Vec<E2bSandbox> = listed
        .drain(..)
        .skip(next_token)
        .take(limit.unwrap_or(usize::MAX))
        .collect();
    let mut response = Json(&page).into_response();
    if let Some(limit) = limit {
        if matched > next_token + limit {
            let token = (next_token + limit).to_string();
            response
                .headers_mut()
                .insert("x-next-token", token.parse().expect("digits are a valid header"));
        }
    }
    response
}

/// Decodes `%XX` escapes (and `+` as a space, as forms do).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn kill_sandbox(State(e2b): State<E2b>, Path(id): Path<String>) -> Response {
    match e2b.control.delete(&id).await {
        Ok(()) => {
            e2b.metrics.forget(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(failure) => not_found_or(failure, &id),
    }
}

/// Body of timeout, connect and resume calls.
#[derive(Debug, Default, Deserialize)]
struct TimeoutBody {
    timeout: Option<u64>,
}

/// Body of `POST /sandboxes/{id}/refreshes`.
#[derive(Debug, Default, Deserialize)]
struct RefreshBody {
    duration: Option<u64>,
}

/// An optional JSON body: empty means every field at its default.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, BadRequest> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|problem| format!("the request body is invalid: {problem}"))
}

/// Moves a sandbox's deadline to `seconds` from now (the E2B default when `None`).
async fn renew(e2b: &E2b, id: &str, seconds: Option<u64>) -> Response {
    let timeout = match timeout_of(seconds) {
        Ok(timeout) => timeout,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match e2b.control.set_deadline(id, Some(timeout), None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => not_found_or(failure, id),
    }
}

async fn set_timeout(State(e2b): State<E2b>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match parse_body::<TimeoutBody>(&body) {
        Ok(TimeoutBody { timeout: Some(seconds) }) => renew(&e2b, &id, Some(seconds)).await,
        Ok(_) => error(StatusCode::BAD_REQUEST, "the body needs a timeout in seconds"),
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// `POST /sandboxes/{id}/refreshes`: moves the deadline to `duration` seconds from now (default: the E2B default).
async fn refresh(State(e2b): State<E2b>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    match parse_body::<RefreshBody>(&body) {
        Ok(body) => renew(&e2b, &id, body.duration).await,
        Err(message) => error(StatusCode::BAD_REQUEST, message),
    }
}

/// Connect (and the old resume): a running sandbox answers 200, a stopped one is started and answers 201. The
/// deadline is renewed.
async fn connect(State(e2b): State<E2b>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    let body: TimeoutBody = match parse_body(&body) {
        Ok(body) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let timeout = match timeout_of(body.timeout) {
        Ok(timeout) => timeout,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let sandbox = match e2b.control.resolve(&id).await {
        Ok(sandbox) => sandbox,
        Err(failure) => return not_found_or(failure, &id),
    };
    let resumed = match sandbox.state {
        SandboxState::Running => Ok((StatusCode::OK, sandbox)),
        // Paused with its memory: its processes continue where they were.
        SandboxState::Paused => e2b
            .control
            .resume(&sandbox.id)
            .await
            .map(|sandbox| (StatusCode::CREATED, sandbox)),
        // Paused without memory (stopped, files kept): it starts again.
        _ => e2b
            .control
            .start(&sandbox.id)
            .await
            .map(|sandbox| (StatusCode::CREATED, sandbox)),
    };
    let (status, sandbox) = match resumed {
        Ok(resumed) => resumed,
        Err(failure) => return Failure(failure).into_response(),
    };
    let sandbox = match e2b.control.set_deadline(&sandbox.id, Some(timeout), None).await {
        Ok(sandbox) => sandbox,
        Err(failure) => return not_found_or(failure, &id),
    };
    e2b.metrics.track(&sandbox.id);
    (status, Json(e2b.describe(&sandbox))).into_response()
}

/// Body of `POST /sandboxes/{id}/pause` (unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
struct PauseBody {
    /// Keep the memory (the default): the processes are frozen; `false`: stopped with the files kept.
    memory: Option<bool>,
}

/// E2B's pause: with memory (the default), nook pauses the sandbox (its processes frozen where they are); without,
/// it stops it with its files kept. Either way the timeout no longer runs, as on E2B; `connect` resumes it. A
/// sandbox already paused answers 409, as E2B's API does.
async fn pause(State(e2b): State<E2b>, Path(id): Path<String>, body: axum::body::Bytes) -> Response {
    let body: PauseBody = match parse_body(&body) {
        Ok(body) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let sandbox = match e2b.control.resolve(&id).await {
        Ok(sandbox) => sandbox,
        Err(failure) => return not_found_or(failure, &id),
    };
    if sandbox.state != SandboxState::Running {
        return error(StatusCode::CONFLICT, format!("sandbox {id} is already paused"));
    }
    let paused = if body.memory == Some(false) {
        e2b.control.stop(&sandbox.id).await
    } else {
        e2b.control.pause(&sandbox.id).await
    };
    if let Err(failure) = paused {
        return Failure(failure).into_response();
    }
    match e2b.control.set_deadline(&sandbox.id, None, None).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(failure) => Failure(failure).into_response(),
    }
}

/// E2B's view of a nook image.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Template {
    #[serde(rename = "templateID")]
    template_id: String,
    aliases: Vec<String>,
    public: bool,
    created_at: DateTime<Utc>,
    cpu_count: u64,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
}

fn template_of(image: &nook_api::Image) -> Template {
    Template {
        template_id: image.name.clone(),
        aliases: vec![image.name.clone()],
        public: false,
        created_at: image.created_at,
        cpu_count: 1,
        memory_mb: 512,
    }
}

async fn list_templates(State(e2b): State<E2b>) -> Response {
    match e2b.control.runner().list_images().await {
        Ok(images) => Json(images.iter().map(template_of).collect::<Vec<_>>()).into_response(),
        Err(problem) => Failure(ApiFailure::from(problem)).into_response(),
    }
}

async fn get_template(State(e2b): State<E2b>, Path(id): Path<String>) -> Response {
    match e2b.control.runner().image(&id).await {
        Ok(image) => Json(template_of(&image)).into_response(),
        Err(_) => error(StatusCode::NOT_FOUND, format!("template {id} not found")),
    }
}

/// `DELETE /templates/{id}`: deletes a snapshot (the SDKs' `delete_snapshot`); other templates are removed with
/// nook's own API for now. 404 when `id` is neither.
async fn delete_template(State(e2b): State<E2b>, Path(id): Path<String>) -> Response {
    if let Some(answer) = crate::snapshots::delete_snapshot(&e2b, &id).await {
        return answer;
    }
    match e2b.control.runner().image(&id).await {
        Ok(_) => error(
            StatusCode::NOT_IMPLEMENTED,
            format!("remove template {id} with `nook image rm`; E2B template management is not served yet"),
        ),
        Err(nook_runner::RunnerError::Image(nook_runner::images::ImageError::NotFound(_))) => {
            error(StatusCode::NOT_FOUND, format!("template or snapshot {id} not found"))
        }
        Err(problem) => Failure(ApiFailure::from(problem)).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies_ask_for_a_pause_on_timeout_with_auto_pause() {
        // What e2b 2.31.0 sends for the OpenAI Agents SDK provider's default lifecycle.
        let body = r#"{"templateID":"base","timeout":300,"secure":true,"allow_internet_access":true,
            "autoPause":true,"autoPauseMemory":true,"autoResume":{"enabled":true}}"#;
        let request: NewSandbox = serde_json::from_str(body).expect("a v1 create body");
        assert_eq!(request.auto_pause, Some(true));
        let request: NewSandbox = serde_json::from_str(r#"{"templateID":"base"}"#).expect("a bare create body");
        assert_eq!(request.auto_pause, None);
    }

    #[test]
    fn metadata_filters_decode_twice_encoded_pairs() {
        assert_eq!(percent_decode("user%20id"), "user id");
        assert_eq!(percent_decode("a%20b%26c"), "a b&c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
