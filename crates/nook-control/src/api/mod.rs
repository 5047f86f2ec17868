//! The native v1 HTTP API.
//!
//! Request flow: axum routes a request → [`auth`] checks the bearer key (every route but `/v1/health`) → the
//! handler parses its body with [`ApiJson`] (unknown fields and malformed JSON become `invalid_request` errors in
//! nook's JSON error shape, never axum's plain-text rejections) → [`Control`] does the work → the result or an
//! [`ApiFailure`] is serialised. The OpenAPI document ([`ApiDoc`]) is derived from these handlers and the types in
//! `nook-api`, and checked in under `openapi/`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use nook_api::limits::MAX_EXEC_CAPTURE;
use nook_api::{
    ApiError, ChmodRequest, ChownRequest, CreateSandboxRequest, ExecEvent, ExecRequest, ExecResult, ExitStatus,
    ExportRequest, FileInfo, FileList, FindResult, ForkRequest, ForkResult, Health, Image, ImageList, ImagePruneResult,
    MakeDirRequest, MoveRequest, ProcessInfo, ProcessList, PtySize, PullRequest, PushRequest, ReplaceRequest,
    ReplaceResult, ReplacedFile, ResourceRequest, Sandbox, SandboxEventLine, SandboxEventList, SandboxList,
    SandboxState, SandboxStats, SearchMatch, SearchRequest, SearchResult, SetDeadlineRequest, SignalRequest,
    SnapshotRequest, TagRequest, TransferEvent, WatchEvent, WatchEventKind,
};
use nook_runner::ExecOutput;
use serde::de::DeserializeOwned;
use utoipa::OpenApi;

use crate::audit::Audited;
use crate::control::{Control, SandboxFilter};
use crate::error::ApiFailure;
use crate::tenancy::Caller;

mod audit;
mod builds;
mod preview;
mod tenancy;
mod terminal;
mod transfer;

pub use transfer::write_form_part;

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct AppState {
    /// The operations.
    pub control: Arc<Control>,
    /// The preview proxy and its access settings.
    pub previews: Arc<crate::preview::Previews>,
    /// Capability tokens.
    pub tokens: Arc<crate::tenancy::Tokens>,
}

/// The wire form of one item of a runner's output stream (`None`: the stream ended without a final item).
/// `offset` tracks the position in a background process's combined output; `offsets` says whether chunks carry it.
fn exec_event(output: Option<ExecOutput>, offset: &mut u64, offsets: bool) -> ExecEvent {
    match output {
        Some(ExecOutput::Started { pid }) => ExecEvent::Started { pid },
        Some(ExecOutput::Attached { offset: start, missed }) => {
            *offset = start;
            ExecEvent::Attached { offset: start, missed }
        }
        Some(ExecOutput::Stdout(chunk)) => {
            let at = offsets.then_some(*offset);
            *offset += chunk.len() as u64;
            ExecEvent::Stdout {
                data: base64_of(&chunk),
                offset: at,
            }
        }
        Some(ExecOutput::Stderr(chunk)) => {
            let at = offsets.then_some(*offset);
            *offset += chunk.len() as u64;
            ExecEvent::Stderr {
                data: base64_of(&chunk),
                offset: at,
            }
        }
        Some(ExecOutput::Exit(exit)) => ExecEvent::Exit {
            status: ExitStatus {
                exit_code: exit.code,
                signal: exit.signal,
                timed_out: exit.timed_out,
            },
            duration_ms: exit.duration_ms,
        },
        Some(ExecOutput::End { offset }) => ExecEvent::End { offset },
        Some(ExecOutput::Error { code, message }) => ExecEvent::Error { code, message },
        None => ExecEvent::Error {
            code: "exec_failed".into(),
            message: "the output stream ended unexpectedly".into(),
        },
    }
}

/// Largest JSON request body (exec stdin is the big one).
const MAX_JSON_BODY: usize = 2 * nook_api::limits::MAX_EXEC_STDIN;

/// Builds the router.
pub fn router(state: AppState) -> Router {
    let authenticated = Router::new()
        .route("/v1/sandboxes", post(create_sandbox).get(list_sandboxes))
        .route("/v1/sandboxes/{sandbox}", get(get_sandbox).delete(delete_sandbox))
        .route("/v1/sandboxes/{sandbox}/stop", post(stop_sandbox))
        .route("/v1/sandboxes/{sandbox}/deadline", axum::routing::put(set_deadline))
        .route("/v1/sandboxes/{sandbox}/lifecycle", axum::routing::put(set_lifecycle))
        .route("/v1/sandboxes/{sandbox}/network", axum::routing::put(set_network))
        .route(
            "/v1/sandboxes/{sandbox}/preview",
            axum::routing::put(preview::set_preview),
        )
        .route("/v1/sandboxes/{sandbox}/ports/{port}", get(preview::port_access))
        .route("/v1/sandboxes/{sandbox}/ports/{port}/links", post(preview::make_link))
        .route("/v1/sandboxes/{sandbox}/links", get(preview::list_links))
        .route(
            "/v1/sandboxes/{sandbox}/links/{link}",
            axum::routing::delete(preview::revoke_link),
        )
        .route("/v1/sandboxes/{sandbox}/start", post(start_sandbox))
        .route("/v1/sandboxes/{sandbox}/pause", post(pause_sandbox))
        .route("/v1/sandboxes/{sandbox}/resume", post(resume_sandbox))
        .route(
            "/v1/sandboxes/{sandbox}/resources",
            axum::routing::patch(update_resources),
        )
        .route("/v1/sandboxes/{sandbox}/snapshot", post(snapshot_sandbox))
        .route("/v1/sandboxes/{sandbox}/archive", post(archive_sandbox))
        .route("/v1/sandboxes/{sandbox}/fork", post(fork_sandbox))
        .route("/v1/sandboxes/{sandbox}/events", get(sandbox_events))
        .route("/v1/sandboxes/{sandbox}/events/stream", get(sandbox_event_stream))
        .route("/v1/sandboxes/{sandbox}/stats", get(sandbox_stats))
        .route("/v1/sandboxes/{sandbox}/exec", post(exec))
        .route("/v1/sandboxes/{sandbox}/exec/stream", post(exec_stream))
        .route(
            "/v1/sandboxes/{sandbox}/processes",
            post(start_process).get(list_processes),
        )
        .route("/v1/sandboxes/{sandbox}/processes/{pid}", get(get_process))
        .route("/v1/sandboxes/{sandbox}/processes/{pid}/output", get(process_output))
        .route("/v1/sandboxes/{sandbox}/processes/{pid}/wait", post(wait_process))
        .route("/v1/sandboxes/{sandbox}/processes/{pid}/stdin", post(process_stdin))
        .route("/v1/sandboxes/{sandbox}/processes/{pid}/signal", post(signal_process))
        .route("/v1/sandboxes/{sandbox}/processes/{pid}/resize", post(resize_process))
        .route(
            "/v1/sandboxes/{sandbox}/processes/{pid}/terminal",
            get(terminal::process_terminal),
        )
        .route("/v1/sandboxes/{sandbox}/files/stat", get(stat_file))
        .route("/v1/sandboxes/{sandbox}/files/list", get(list_files))
        .route("/v1/sandboxes/{sandbox}/files/mkdir", post(make_dir))
        .route("/v1/sandboxes/{sandbox}/files/move", post(move_file))
        .route("/v1/sandboxes/{sandbox}/files/find", get(find_files))
        .route("/v1/sandboxes/{sandbox}/files/watch", get(watch_files))
        .route("/v1/sandboxes/{sandbox}/files/search", post(search_files))
        .route("/v1/sandboxes/{sandbox}/files/replace", post(replace_in_files))
        .route("/v1/sandboxes/{sandbox}/files/chmod", post(chmod_file))
        .route("/v1/sandboxes/{sandbox}/files/chown", post(chown_file))
        .route("/metrics", get(metrics))
        .route("/v1/tenants", post(tenancy::create_tenant).get(tenancy::list_tenants))
        .route("/v1/tenants/{tenant}/quota", axum::routing::put(tenancy::set_quota))
        .route("/v1/keys", post(tenancy::create_key).get(tenancy::list_keys))
        .route("/v1/keys/{key}", axum::routing::delete(tenancy::revoke_key))
        .route("/v1/sandboxes/{sandbox}/tokens", post(tenancy::make_token))
        .route("/v1/audit", get(audit::list_audit))
        .route("/v1/audit/export", get(audit::export_audit))
        .route("/v1/images", get(list_images))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/push", post(push_image))
        .route("/v1/images/prune", post(prune_images))
        .route("/v1/images/tag", post(tag_image))
        .route("/v1/images/export", post(export_image))
        .route("/v1/builds/{build}", get(builds::get_build))
        .route("/v1/builds/{build}/events", get(builds::build_events))
        .route("/v1/builds/{build}/cancel", post(builds::cancel_build))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(
            // Streamed bodies of any size: file uploads, image imports and build contexts.
            Router::new()
                .route(
                    "/v1/sandboxes/{sandbox}/files",
                    get(transfer::download_file)
                        .put(transfer::upload_file)
                        .post(transfer::upload_multipart)
                        .delete(remove_file),
                )
                .route(
                    "/v1/sandboxes/{sandbox}/files/archive",
                    get(transfer::download_archive).put(transfer::upload_archive),
                )
                .route(
                    "/v1/images/{*name}",
                    get(get_image).put(import_image).delete(remove_image),
                )
                .route("/v1/builds", post(builds::start_build).get(builds::list_builds))
                .layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    // Sandbox ports by path; by host, ahead of every route (any path may be a sandbox app's).
    let previews = Router::new()
        .route("/preview/{*rest}", axum::routing::any(crate::preview::route_by_path))
        .with_state(state.previews.clone());
    Router::new()
        .route("/v1/health", get(health))
        .merge(authenticated)
        .fallback(|| async { ApiFailure::not_found("no such API route") })
        .with_state(state.clone())
        .merge(previews)
        .layer(axum::middleware::from_fn_with_state(
            state.previews.clone(),
            crate::preview::route_by_host,
        ))
}

/// Authenticates `Authorization: Bearer <API key or capability token>`, checks that the matched route is within
/// the caller's grant, serves the request as that caller ([`Caller::scope`]), and marks the response for the audit
/// log with who called.
async fn auth(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let credential = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let refused = |message: &str, request: &Request| {
        Audited::of("unauthenticated".into(), None, request)
            .mark(ApiFailure::new(StatusCode::UNAUTHORIZED, "unauthenticated", message).into_response())
    };
    let Some(credential) = credential else {
        return refused("this API needs an `Authorization: Bearer <API key>` header", &request);
    };
    let (caller, actor) = if credential.starts_with(crate::tenancy::TOKEN_PREFIX) {
        match state.tokens.verify(credential) {
            Ok(caller) => {
                let crate::tenancy::Grant::Sandbox { id, .. } = &caller.grant else {
                    unreachable!("a token grants a sandbox")
                };
                let actor = format!("capability token for {id}");
                (caller, actor)
            }
            Err(why) => return refused(why, &request),
        }
    } else {
        match state.control.authenticate(credential).await {
            Ok(Some(record)) => (
                Caller {
                    tenant: record.tenant.clone(),
                    grant: crate::tenancy::Grant::Key {
                        id: record.id.clone(),
                        scope: record.scope,
                    },
                },
                format!("{} ({})", record.id, record.name),
            ),
            Ok(None) => return refused("the API key is not valid (or was revoked, or has expired)", &request),
            Err(failure) => return failure.into_response(),
        }
    };
    let audited = Audited::of(actor, Some(caller.tenant.clone()), &request);
    let route = audited
        .route
        .clone()
        .unwrap_or_else(|| request.uri().path().to_string());
    let need = crate::tenancy::need(request.method(), &route);
    if let Err(failure) = crate::tenancy::permits(&caller, need, &route) {
        return audited.mark(failure.into_response());
    }
    audited.mark(caller.scope(next.run(request)).await)
}

/// A query string whose rejections use nook's error shape.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiFailure::invalid(format!(
                "the query string is not valid: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// A JSON body whose rejections use nook's error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiFailure;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::JsonDataError(error) => {
                    ApiFailure::invalid(format!("the request body has the wrong shape: {}", error.body_text()))
                }
                JsonRejection::JsonSyntaxError(error) => {
                    ApiFailure::invalid(format!("the request body is not valid JSON: {}", error.body_text()))
                }
                JsonRejection::MissingJsonContentType(_) => ApiFailure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the request body as JSON with `Content-Type: application/json`",
                ),
                other => ApiFailure::new(other.status(), "invalid_request", other.body_text()),
            }),
        }
    }
}

#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, description = "The server answers", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandboxRequest,
    responses(
        (status = 201, description = "Created and running", body = Sandbox),
        (status = 400, description = "Invalid request", body = ApiError),
        (status = 404, description = "Unknown image", body = ApiError),
        (status = 409, description = "Name taken", body = ApiError),
    ),
    security(("bearer" = [])))]
async fn create_sandbox(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateSandboxRequest>,
) -> Result<(StatusCode, Json<Sandbox>), ApiFailure> {
    Ok((
        StatusCode::CREATED,
        reported(&state, state.control.create(request).await).await?,
    ))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    params(
        ("state" = Option<SandboxState>, Query, description = "Only sandboxes in this state"),
        ("label" = Option<Vec<String>>, Query, description = "`key=value`; repeat to require several labels"),
    ),
    responses((status = 200, description = "Matching sandboxes", body = SandboxList),
              (status = 400, description = "Invalid filter", body = ApiError)),
    security(("bearer" = [])))]
async fn list_sandboxes(
    State(state): State<AppState>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Json<SandboxList>, ApiFailure> {
    let mut filter = SandboxFilter::default();
    for (key, value) in pairs {
        match key.as_str() {
            "state" => {
                filter.state = Some(
                    SandboxState::parse(&value)
                        .ok_or_else(|| ApiFailure::invalid(format!("unknown state {value:?}")))?,
                )
            }
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| ApiFailure::invalid(format!("label filter {value:?} must be key=value")))?;
                filter.labels.insert(k.to_string(), v.to_string());
            }
            other => return Err(ApiFailure::invalid(format!("unknown query parameter {other:?}"))),
        }
    }
    let mut sandboxes = Vec::new();
    for sandbox in state.control.list(&filter).await? {
        sandboxes.push(state.control.with_address(sandbox).await);
    }
    Ok(Json(SandboxList { sandboxes }))
}

/// A sandbox as the API reports it: with its address while it has one (an in-memory lookup, done only for answers
/// that carry a sandbox, never on the way to an exec or a file call).
async fn reported(state: &AppState, sandbox: Result<Sandbox, ApiFailure>) -> Result<Json<Sandbox>, ApiFailure> {
    Ok(Json(state.control.with_address(sandbox?).await))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The sandbox", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn get_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.resolve(&key).await).await
}

#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 204, description = "Deleted with all its files"),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn delete_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<StatusCode, ApiFailure> {
    state.control.delete(&key).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/stop", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Stopped; files kept", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "Cannot be stopped in its state", body = ApiError)),
    security(("bearer" = [])))]
async fn stop_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.stop(&key).await).await
}

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/deadline", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = SetDeadlineRequest,
    responses((status = 200, description = "The deadline is set (or removed); the sandbox as it is now", body = Sandbox),
              (status = 400, description = "A timeout over ten years", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn set_deadline(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<SetDeadlineRequest>,
) -> Result<Json<Sandbox>, ApiFailure> {
    Ok(Json(
        state
            .control
            .set_deadline(&key, request.timeout_s, request.on_deadline)
            .await?,
    ))
}

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/lifecycle", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = nook_api::Lifecycle,
    responses((status = 200, description = "The policy is set (the fields given; 0 turns one off); the sandbox as it \
               is now", body = Sandbox),
              (status = 400, description = "A time over ten years", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn set_lifecycle(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<nook_api::Lifecycle>,
) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.set_lifecycle(&key, request).await).await
}

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/network", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = nook_api::NetworkPolicy,
    responses((status = 200, description = "The policy replaces the old one, in force for a running sandbox's next \
               packet; the sandbox as it is now", body = Sandbox),
              (status = 400, description = "A malformed rule (the message names it)", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is being created or deleted", body = ApiError)),
    security(("bearer" = [])))]
async fn set_network(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<nook_api::NetworkPolicy>,
) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.set_network(&key, request).await).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/pause", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Paused: every process frozen where it is, using no CPU (its memory stays); \
               commands and file calls answer 409 `paused` until it is resumed", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "Not running", body = ApiError)),
    security(("bearer" = [])))]
async fn pause_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.pause(&key).await).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/resume", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Running again: every process continues where it was", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "Not paused (a stopped sandbox is started instead)", body = ApiError)),
    security(("bearer" = [])))]
async fn resume_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.resume(&key).await).await
}

#[utoipa::path(patch, path = "/v1/sandboxes/{sandbox}/resources", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = ResourceRequest,
    responses((status = 200, description = "The new limits are in force (a running or paused sandbox got them without a \
               restart); the fields left out are unchanged, `disk_mb: 0` removes the disk quota", body = Sandbox),
              (status = 400, description = "A limit out of range, or a disk quota where the storage has none", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "`below_usage`: the sandbox uses more than the new limit now; or a state \
               that cannot be resized", body = ApiError)),
    security(("bearer" = [])))]
async fn update_resources(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ResourceRequest>,
) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.update_resources(&key, request).await).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/archive", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Archived: its writable layer is in the archive store (checksummed) and off \
               local disk; starting it brings the layer back", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "Not stopped", body = ApiError),
              (status = 500, description = "The archive store failed; the sandbox stays stopped with its files", body = ApiError)),
    security(("bearer" = [])))]
async fn archive_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.archive(&key).await).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/snapshot", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = SnapshotRequest,
    responses((status = 200, description = "The image made of the sandbox's image and one more layer with what it \
               changed; a running sandbox was frozen only while its files were captured", body = Image),
              (status = 400, description = "A malformed image name", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "A state that cannot be snapshotted", body = ApiError)),
    security(("bearer" = [])))]
async fn snapshot_sandbox(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<SnapshotRequest>,
) -> Result<Json<Image>, ApiFailure> {
    Ok(Json(state.control.snapshot(&key, request).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/fork", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = ForkRequest,
    responses((status = 200, description = "The forks, running, each with the source's files as they were (copy-on-write) \
               and `parent` naming the source; the source goes on", body = ForkResult),
              (status = 400, description = "A count or name out of range", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "A name taken, or a state that cannot be forked", body = ApiError)),
    security(("bearer" = [])))]
async fn fork_sandbox(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ForkRequest>,
) -> Result<Json<ForkResult>, ApiFailure> {
    Ok(Json(state.control.fork(&key, request).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/start", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Running again with its files", body = Sandbox),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "Cannot be started in its state", body = ApiError)),
    security(("bearer" = [])))]
async fn start_sandbox(State(state): State<AppState>, Path(key): Path<String>) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.control.start(&key).await).await
}

#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition: sandboxes by state, and each running or paused \
               sandbox's CPU seconds, memory (now, peak, average, limit), disk, network bytes and processes",
               body = String, content_type = "text/plain; version=0.0.4")),
    security(("bearer" = [])))]
async fn metrics(State(state): State<AppState>) -> Result<Response, ApiFailure> {
    let sandboxes = state.control.store().sandboxes().await?;
    let meters = state.control.runner().meters().await;
    let text = crate::metrics::render(&sandboxes, &meters);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response())
}

/// Query of `GET /v1/sandboxes/{sandbox}/events/stream`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct EventStreamQuery {
    /// Only events after the one with this number (0, the default: from the first).
    #[serde(default)]
    after: u64,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/events/stream", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), EventStreamQuery),
    responses((status = 200, description = "NDJSON: the sandbox's events from `after` on, then each new one as it is \
               recorded, keepalives when quiet, and `deleted` at the end if the sandbox is deleted",
               body = SandboxEventLine, content_type = "application/x-ndjson"),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn sandbox_event_stream(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<EventStreamQuery>,
) -> Result<Response, ApiFailure> {
    let sandbox = state.control.resolve(&key).await?;
    let store = state.control.store().clone();
    // Subscribed before the first read, so that nothing recorded in between is missed.
    let changes = store.subscribe();
    let id = sandbox.id;
    let lines = futures::stream::unfold(
        (Some(changes), query.after, true),
        move |(changes, after, mut read_now)| {
            let store = store.clone();
            let id = id.clone();
            async move {
                let mut changes = changes?;
                loop {
                    if read_now {
                        let events = store.events_after(&id, after).await.ok()?;
                        if let Some((last, _)) = events.last() {
                            let next = *last;
                            let lines: Vec<SandboxEventLine> = events
                                .into_iter()
                                .map(|(seq, event)| SandboxEventLine::Event { seq, event })
                                .collect();
                            return Some((lines, (Some(changes), next, false)));
                        }
                        if store.sandbox(&id).await.ok()?.is_none() {
                            return Some((vec![SandboxEventLine::Deleted], (None, after, false)));
                        }
                    }
                    read_now = match tokio::time::timeout(KEEPALIVE, changes.recv()).await {
                        Err(_) => return Some((vec![SandboxEventLine::Keepalive], (Some(changes), after, false))),
                        Ok(Ok(changed)) => changed == id,
                        // Missed notices: read again to be sure.
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => true,
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return None,
                    };
                }
            }
        },
    );
    Ok(ndjson_lines(futures::StreamExt::flat_map(lines, futures::stream::iter)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/events", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "State changes and notable events, oldest first", body = SandboxEventList),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
async fn sandbox_events(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<SandboxEventList>, ApiFailure> {
    let sandbox = state.control.resolve(&key).await?;
    Ok(Json(SandboxEventList {
        events: state.control.store().events(&sandbox.id).await?,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/stats", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "What the sandbox uses now, read when asked", body = SandboxStats),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is not running", body = ApiError)),
    security(("bearer" = [])))]
async fn sandbox_stats(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<SandboxStats>, ApiFailure> {
    Ok(Json(state.control.stats(&key).await?))
}

/// Maps an agent-reported failure to an HTTP error.
fn exec_failure(code: String, message: String) -> ApiFailure {
    let code: &'static str = match code.as_str() {
        "spawn_failed" => "spawn_failed",
        "no_such_user" => "no_such_user",
        "bad_cwd" => "bad_cwd",
        "bad_request" => "invalid_request",
        _ => {
            return ApiFailure::new(StatusCode::BAD_GATEWAY, "exec_failed", message);
        }
    };
    ApiFailure::new(StatusCode::BAD_REQUEST, code, message)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/exec", tag = "exec", request_body = ExecRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The process ran to its end", body = ExecResult),
              (status = 400, description = "Invalid request, or the process could not start", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is not running", body = ApiError)),
    security(("bearer" = [])))]
async fn exec(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Json<ExecResult>, ApiFailure> {
    let mut stream = state.control.exec(&key, request).await?;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut stdout_truncated, mut stderr_truncated) = (false, false);
    let keep = |buffer: &mut Vec<u8>, truncated: &mut bool, chunk: &[u8]| {
        let room = MAX_EXEC_CAPTURE.saturating_sub(buffer.len());
        buffer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        *truncated |= chunk.len() > room;
    };
    while let Some(event) = stream.events.recv().await {
        match event {
            ExecOutput::Started { .. } | ExecOutput::Attached { .. } | ExecOutput::End { .. } => {}
            ExecOutput::Stdout(chunk) => keep(&mut stdout, &mut stdout_truncated, &chunk),
            ExecOutput::Stderr(chunk) => keep(&mut stderr, &mut stderr_truncated, &chunk),
            ExecOutput::Exit(exit) => {
                return Ok(Json(ExecResult {
                    exit_code: exit.code,
                    signal: exit.signal,
                    timed_out: exit.timed_out,
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    stdout_truncated,
                    stderr_truncated,
                    duration_ms: exit.duration_ms,
                }))
            }
            ExecOutput::Error { code, message } => return Err(exec_failure(code, message)),
        }
    }
    Err(ApiFailure::new(
        StatusCode::BAD_GATEWAY,
        "exec_failed",
        "the exec stream ended without an exit status",
    ))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/exec/stream", tag = "exec", request_body = ExecRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "NDJSON: one ExecEvent per line, ending with exactly one `exit` or `error`",
               body = ExecEvent, content_type = "application/x-ndjson"),
              (status = 400, description = "Invalid request", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is not running", body = ApiError)),
    security(("bearer" = [])))]
async fn exec_stream(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Response, ApiFailure> {
    let stream = state.control.exec(&key, request).await?;
    Ok(ndjson_events(stream, false))
}

/// How often an idle event stream sends a keepalive line.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// Streams exec or attach output as NDJSON [`ExecEvent`] lines, with a keepalive line whenever the stream has been
/// quiet for [`KEEPALIVE`]. With `offsets`, output lines carry their offset in the combined output (attach streams).
/// The stream's input sender lives as long as the body, so the process keeps its stdin until the client goes.
fn ndjson_events(stream: nook_runner::ExecStream, offsets: bool) -> Response {
    let body = futures::stream::unfold((Some(stream), 0u64), move |(state, mut offset)| async move {
        let mut stream = state?;
        let event = match tokio::time::timeout(KEEPALIVE, stream.events.recv()).await {
            Err(_) => ExecEvent::Keepalive,
            Ok(event) => exec_event(event, &mut offset, offsets),
        };
        let last = matches!(
            event,
            ExecEvent::Exit { .. } | ExecEvent::End { .. } | ExecEvent::Error { .. }
        );
        Some((event, (if last { None } else { Some(stream) }, offset)))
    });
    ndjson_lines(body)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/processes", tag = "processes", request_body = ExecRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 201, description = "Started in the background; it outlives this request", body = ProcessInfo),
              (status = 400, description = "Invalid request, or the process could not start", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is not running", body = ApiError)),
    security(("bearer" = [])))]
async fn start_process(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<(StatusCode, Json<ProcessInfo>), ApiFailure> {
    Ok((StatusCode::CREATED, Json(state.control.spawn(&key, request).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/processes", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Running and recently ended background processes", body = ProcessList),
              (status = 404, description = "No such sandbox", body = ApiError),
              (status = 409, description = "The sandbox is not running", body = ApiError)),
    security(("bearer" = [])))]
async fn list_processes(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<ProcessList>, ApiFailure> {
    Ok(Json(ProcessList {
        processes: state.control.processes(&key).await?,
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/processes/{pid}", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 200, description = "The process", body = ProcessInfo),
              (status = 404, description = "No such sandbox or process", body = ApiError)),
    security(("bearer" = [])))]
async fn get_process(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
) -> Result<Json<ProcessInfo>, ApiFailure> {
    let processes = state.control.processes(&key).await?;
    let process = processes.into_iter().find(|process| process.pid == pid);
    process
        .map(Json)
        .ok_or_else(|| ApiFailure::not_found(format!("no background process with pid {pid}")))
}

/// Query of the output stream.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct OutputQuery {
    /// Offset in the combined output to start from (the `offset` after the last byte already seen); 0 by default.
    #[serde(default)]
    offset: u64,
    /// Keep streaming until the process exits; otherwise stop once caught up.
    #[serde(default)]
    follow: bool,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/processes/{pid}/output", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox"), OutputQuery),
    responses((status = 200, description = "NDJSON: `attached`, output chunks with offsets, keepalives, then one \
               `exit` (or, without follow, `end`)", body = ExecEvent, content_type = "application/x-ndjson"),
              (status = 404, description = "No such sandbox or process", body = ApiError)),
    security(("bearer" = [])))]
async fn process_output(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
    Query(query): Query<OutputQuery>,
) -> Result<Response, ApiFailure> {
    let stream = state.control.attach(&key, pid, query.offset, query.follow).await?;
    Ok(ndjson_events(stream, true))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/processes/{pid}/wait", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 200, description = "The process ended", body = ExitStatus),
              (status = 404, description = "No such sandbox or process", body = ApiError)),
    security(("bearer" = [])))]
async fn wait_process(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
) -> Result<Json<ExitStatus>, ApiFailure> {
    Ok(Json(state.control.wait(&key, pid).await?))
}

/// Query of the stdin call.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct StdinQuery {
    /// Close standard input after writing the body (with an empty body, closing a closed input succeeds).
    #[serde(default)]
    close: bool,
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/processes/{pid}/stdin", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox"), StdinQuery),
    request_body(content = Vec<u8>, description = "Raw bytes for standard input", content_type = "application/octet-stream"),
    responses((status = 204, description = "Written"),
              (status = 404, description = "No such sandbox or process", body = ApiError),
              (status = 409, description = "Standard input is closed", body = ApiError)),
    security(("bearer" = [])))]
async fn process_stdin(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
    Query(query): Query<StdinQuery>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiFailure> {
    state.control.input(&key, pid, body.to_vec(), query.close).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/processes/{pid}/resize", tag = "processes",
    request_body = PtySize,
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 204, description = "Resized; the terminal's foreground process group got SIGWINCH"),
              (status = 404, description = "No such sandbox or process", body = ApiError),
              (status = 409, description = "The process has no terminal", body = ApiError)),
    security(("bearer" = [])))]
async fn resize_process(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
    ApiJson(size): ApiJson<PtySize>,
) -> Result<StatusCode, ApiFailure> {
    state.control.resize(&key, pid, size).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/processes/{pid}/signal", tag = "processes",
    request_body = SignalRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox")),
    responses((status = 204, description = "Sent (a no-op once the process has ended)"),
              (status = 400, description = "Invalid signal", body = ApiError),
              (status = 404, description = "No such sandbox or process", body = ApiError)),
    security(("bearer" = [])))]
async fn signal_process(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
    ApiJson(request): ApiJson<SignalRequest>,
) -> Result<StatusCode, ApiFailure> {
    state.control.signal(&key, pid, request.signal).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query naming one path.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct PathQuery {
    /// Absolute path inside the sandbox.
    path: String,
}

/// Query of a removal.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    /// Absolute path inside the sandbox.
    path: String,
    /// Remove a directory with everything in it.
    #[serde(default)]
    recursive: bool,
}

#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox}/files", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), RemoveQuery),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such sandbox or path", body = ApiError),
              (status = 409, description = "A non-empty directory without `recursive`", body = ApiError)),
    security(("bearer" = [])))]
async fn remove_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<RemoveQuery>,
) -> Result<StatusCode, ApiFailure> {
    let request = nook_agent_proto::Request::Remove {
        path: query.path,
        recursive: query.recursive,
    };
    let _: serde_json::Value = state.control.file_call(&key, request).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files/stat", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), PathQuery),
    responses((status = 200, description = "The path's metadata (a final symlink is not followed)", body = FileInfo),
              (status = 404, description = "No such sandbox or path", body = ApiError)),
    security(("bearer" = [])))]
async fn stat_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Json<FileInfo>, ApiFailure> {
    let stat: nook_agent_proto::FileStat = state
        .control
        .file_call(&key, nook_agent_proto::Request::Stat { path: query.path })
        .await?;
    Ok(Json(crate::control::file_info(stat)))
}

/// Query of a listing.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Absolute path of a directory.
    path: String,
    /// Levels to descend (1 = the directory's entries; at most 32).
    #[serde(default = "one")]
    depth: u32,
}

fn one() -> u32 {
    1
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files/list", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), ListQuery),
    responses((status = 200, description = "Entries sorted by path; symlinked directories are not descended", body = FileList),
              (status = 400, description = "Not a directory", body = ApiError),
              (status = 404, description = "No such sandbox or directory", body = ApiError)),
    security(("bearer" = [])))]
async fn list_files(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<FileList>, ApiFailure> {
    let request = nook_agent_proto::Request::ListDir {
        path: query.path,
        depth: query.depth,
    };
    let entries: Vec<nook_agent_proto::FileStat> = state.control.file_call(&key, request).await?;
    Ok(Json(FileList {
        entries: entries.into_iter().map(crate::control::file_info).collect(),
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/mkdir", tag = "files", request_body = MakeDirRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The directory (created with its parents, or already there)", body = FileInfo),
              (status = 400, description = "Invalid path, or a file is in the way", body = ApiError)),
    security(("bearer" = [])))]
async fn make_dir(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<MakeDirRequest>,
) -> Result<Json<FileInfo>, ApiFailure> {
    let stat: nook_agent_proto::FileStat = state
        .control
        .file_call(
            &key,
            nook_agent_proto::Request::MakeDir {
                path: request.path,
                owner: None,
            },
        )
        .await?;
    Ok(Json(crate::control::file_info(stat)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/move", tag = "files", request_body = MoveRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The destination after the move", body = FileInfo),
              (status = 404, description = "No such sandbox or source", body = ApiError)),
    security(("bearer" = [])))]
async fn move_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<MoveRequest>,
) -> Result<Json<FileInfo>, ApiFailure> {
    let request = nook_agent_proto::Request::Move {
        from: request.from,
        to: request.to,
    };
    let stat: nook_agent_proto::FileStat = state.control.file_call(&key, request).await?;
    Ok(Json(crate::control::file_info(stat)))
}

/// Query of a find.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct FindQuery {
    /// Absolute directory to search.
    path: String,
    /// Glob matched against file names, e.g. `*.py`.
    pattern: String,
    /// Most matches to return (1000 by default).
    max_results: Option<u32>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files/find", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), FindQuery),
    responses((status = 200, description = "Paths whose name matches, sorted (symlinks are not followed)", body = FindResult),
              (status = 400, description = "Invalid path or glob", body = ApiError)),
    security(("bearer" = [])))]
async fn find_files(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<FindQuery>,
) -> Result<Json<FindResult>, ApiFailure> {
    let request = nook_agent_proto::Request::Find {
        path: query.path,
        pattern: query.pattern,
        max_results: query.max_results.unwrap_or(1000),
    };
    let found: nook_agent_proto::FindResult = state.control.file_call(&key, request).await?;
    Ok(Json(FindResult {
        matches: found.matches.into_iter().map(crate::control::file_info).collect(),
        truncated: found.truncated,
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/search", tag = "files", request_body = SearchRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Matching lines, like grep -rn", body = SearchResult),
              (status = 400, description = "Invalid path or pattern", body = ApiError)),
    security(("bearer" = [])))]
async fn search_files(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<SearchRequest>,
) -> Result<Json<SearchResult>, ApiFailure> {
    let request = nook_agent_proto::Request::Search {
        path: request.path,
        regex: request.regex,
        include: request.include,
        max_results: request.max_results.unwrap_or(1000),
        timeout_ms: request.timeout_ms.unwrap_or(10_000).min(600_000),
    };
    let found: nook_agent_proto::SearchResult = state.control.file_call(&key, request).await?;
    Ok(Json(SearchResult {
        matches: found
            .matches
            .into_iter()
            .map(|m| SearchMatch {
                path: m.path,
                line_number: m.line_number,
                line: m.line,
            })
            .collect(),
        truncated: found.truncated,
        files_searched: found.files_searched,
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/replace", tag = "files", request_body = ReplaceRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "Each file rewritten atomically, with its count", body = ReplaceResult),
              (status = 400, description = "Invalid pattern, or a path that is not a text file", body = ApiError)),
    security(("bearer" = [])))]
async fn replace_in_files(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ReplaceRequest>,
) -> Result<Json<ReplaceResult>, ApiFailure> {
    if request.paths.is_empty() || request.paths.len() > 10_000 {
        return Err(ApiFailure::invalid("give between 1 and 10000 paths"));
    }
    let request = nook_agent_proto::Request::Replace {
        paths: request.paths,
        regex: request.regex,
        replacement: request.replacement,
    };
    let replaced: Vec<nook_agent_proto::Replaced> = state.control.file_call(&key, request).await?;
    Ok(Json(ReplaceResult {
        files: replaced
            .into_iter()
            .map(|r| ReplacedFile {
                path: r.path,
                replacements: r.replacements,
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/chmod", tag = "files", request_body = ChmodRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The path after the change", body = FileInfo),
              (status = 404, description = "No such path", body = ApiError)),
    security(("bearer" = [])))]
async fn chmod_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ChmodRequest>,
) -> Result<Json<FileInfo>, ApiFailure> {
    let request = nook_agent_proto::Request::Chmod {
        path: request.path,
        mode: request.mode,
    };
    let stat: nook_agent_proto::FileStat = state.control.file_call(&key, request).await?;
    Ok(Json(crate::control::file_info(stat)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files/chown", tag = "files", request_body = ChownRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The path after the change (a symlink itself, not its target)", body = FileInfo),
              (status = 404, description = "No such path", body = ApiError)),
    security(("bearer" = [])))]
async fn chown_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ChownRequest>,
) -> Result<Json<FileInfo>, ApiFailure> {
    let request = nook_agent_proto::Request::Chown {
        path: request.path,
        uid: request.uid,
        gid: request.gid,
    };
    let stat: nook_agent_proto::FileStat = state.control.file_call(&key, request).await?;
    Ok(Json(crate::control::file_info(stat)))
}

/// Query of a watch.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
struct WatchQuery {
    /// Absolute directory.
    path: String,
    /// Watch subdirectories too, including ones created later.
    #[serde(default)]
    recursive: bool,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files/watch", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), WatchQuery),
    responses((status = 200, description = "NDJSON: one WatchEvent per change (the watch is in place when the \
               response starts), keepalives while idle, until the client disconnects",
               body = WatchEvent, content_type = "application/x-ndjson"),
              (status = 400, description = "Not a directory", body = ApiError),
              (status = 404, description = "No such sandbox or directory", body = ApiError)),
    security(("bearer" = [])))]
async fn watch_files(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<WatchQuery>,
) -> Result<Response, ApiFailure> {
    let events = state.control.watch(&key, &query.path, query.recursive).await?;
    let body = futures::stream::unfold(Some(events), |state| async move {
        let mut events = state?;
        let (event, last) = match tokio::time::timeout(KEEPALIVE, events.recv()).await {
            Err(_) => (
                WatchEvent {
                    kind: WatchEventKind::Keepalive,
                    path: String::new(),
                    is_dir: false,
                },
                false,
            ),
            Ok(Some(Ok(event))) => (crate::control::watch_event(event), false),
            Ok(Some(Err(reason))) => (
                WatchEvent {
                    kind: WatchEventKind::Error,
                    path: reason,
                    is_dir: false,
                },
                true,
            ),
            Ok(None) => return None,
        };
        Some((event, if last { None } else { Some(events) }))
    });
    Ok(ndjson_lines(body))
}

fn base64_of(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "All images", body = ImageList)),
    security(("bearer" = [])))]
async fn list_images(State(state): State<AppState>) -> Result<Json<ImageList>, ApiFailure> {
    Ok(Json(ImageList {
        images: state.control.images().await?,
    }))
}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name (may contain `/`)")),
    responses((status = 200, description = "The image", body = Image),
              (status = 404, description = "No such image", body = ApiError)),
    security(("bearer" = [])))]
async fn get_image(State(state): State<AppState>, Path(name): Path<String>) -> Result<Json<Image>, ApiFailure> {
    Ok(Json(state.control.image(&name).await?))
}

#[utoipa::path(put, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name (may contain `/`)")),
    request_body(content = Vec<u8>, description = "An OCI image layout or `docker save` archive, or a root filesystem, as a tar stream (plain, gzip or zstd)",
                 content_type = "application/x-tar"),
    responses((status = 201, description = "Imported", body = Image),
              (status = 400, description = "Invalid name or archive", body = ApiError)),
    security(("bearer" = [])))]
async fn import_image(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<(StatusCode, Json<Image>), ApiFailure> {
    nook_api::names::check_image_name(&name).map_err(ApiFailure::invalid)?;
    state.control.claim_image_name(&name).await?;
    let image = state
        .control
        .runner()
        .import_image(&name, transfer::body_stream(body))
        .await?;
    state
        .control
        .record_image(&name, &crate::tenancy::current_tenant())
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = PullRequest,
    responses((status = 200, description = "The pull's progress, one JSON event per line, ending with `done` or \
               `error`", body = TransferEvent, content_type = "application/x-ndjson"),
              (status = 400, description = "Invalid reference or name", body = ApiError),
              (status = 403, description = "The registry refused access", body = ApiError),
              (status = 404, description = "No such image in the registry", body = ApiError),
              (status = 502, description = "The registry failed", body = ApiError)),
    security(("bearer" = [])))]
async fn pull_image(State(state): State<AppState>, Json(request): Json<PullRequest>) -> Result<Response, ApiFailure> {
    if let Some(name) = &request.name {
        nook_api::names::check_image_name(name).map_err(ApiFailure::invalid)?;
    }
    let name = match &request.name {
        Some(name) => name.clone(),
        None => state.control.runner().image_name_for(&request.reference)?,
    };
    state.control.claim_image_name(&name).await?;
    // The pull goes on in a task of its own (outside this request's caller): the tenant is taken along.
    let (control, tenant) = (state.control.clone(), crate::tenancy::current_tenant());
    transfer(move |events| async move {
        let image = control
            .runner()
            .pull_image(&request.reference, Some(&name), events)
            .await?;
        if let Err(failure) = control.record_image(&image.name, &tenant).await {
            tracing::error!(image = %image.name, message = %failure.message, "a pulled image's owner was not recorded");
        }
        Ok(image)
    })
    .await
}

#[utoipa::path(post, path = "/v1/images/tag", tag = "images", request_body = TagRequest,
    responses((status = 201, description = "The image under its new name", body = Image),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such image", body = ApiError)),
    security(("bearer" = [])))]
async fn tag_image(
    State(state): State<AppState>,
    Json(request): Json<TagRequest>,
) -> Result<(StatusCode, Json<Image>), ApiFailure> {
    state.control.image(&request.source).await?;
    state.control.claim_image_name(&request.target).await?;
    let image = state
        .control
        .runner()
        .tag_image(&request.source, &request.target)
        .await?;
    state
        .control
        .record_image(&request.target, &crate::tenancy::current_tenant())
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

#[utoipa::path(post, path = "/v1/images/prune", tag = "images",
    responses((status = 200, description = "What was removed", body = ImagePruneResult)),
    security(("bearer" = [])))]
async fn prune_images(State(state): State<AppState>) -> Result<Json<ImagePruneResult>, ApiFailure> {
    let pruned = state.control.runner().prune_images().await?;
    state.control.forget_missing_images().await?;
    Ok(Json(pruned))
}

#[utoipa::path(post, path = "/v1/images/push", tag = "images", request_body = PushRequest,
    responses((status = 200, description = "The push's progress, one JSON event per line, ending with `done` or \
               `error`", body = TransferEvent, content_type = "application/x-ndjson"),
              (status = 400, description = "Invalid reference", body = ApiError),
              (status = 403, description = "The registry refused access", body = ApiError),
              (status = 404, description = "No such image", body = ApiError),
              (status = 502, description = "The registry failed", body = ApiError)),
    security(("bearer" = [])))]
async fn push_image(State(state): State<AppState>, Json(request): Json<PushRequest>) -> Result<Response, ApiFailure> {
    state.control.image(&request.name).await?;
    let runner = state.control.runner().clone();
    transfer(move |events| async move { runner.push_image(&request.name, &request.reference, events).await }).await
}

#[utoipa::path(post, path = "/v1/images/export", tag = "images", request_body = ExportRequest,
    responses((status = 200, description = "The image as the tar of an OCI image layout (`oci-layout`, blobs, \
               `index.json` naming it), streamed as its layers are written out; `PUT /v1/images/{name}` imports it \
               again", content_type = "application/x-tar"),
              (status = 404, description = "No such image", body = ApiError)),
    security(("bearer" = [])))]
async fn export_image(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ExportRequest>,
) -> Result<Response, ApiFailure> {
    state.control.image(&request.name).await?;
    let archive = state.control.runner().export_image(&request.name).await?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(Body::from_stream(tokio_util::io::ReaderStream::new(archive)))
        .expect("valid response"))
}

/// Runs a pull or push and answers with its events as NDJSON, ending with `done` or `error`. The transfer runs to its
/// end even when the client goes away (so that a pull's layers are not fetched twice); one that fails before its
/// first event answers with a plain HTTP error instead.
async fn transfer<F, Fut>(run: F) -> Result<Response, ApiFailure>
where
    F: FnOnce(tokio::sync::mpsc::Sender<TransferEvent>) -> Fut,
    Fut: std::future::Future<Output = Result<Image, nook_runner::RunnerError>> + Send + 'static,
{
    let (events, mut received) = tokio::sync::mpsc::channel::<TransferEvent>(64);
    let task = tokio::spawn(run(events));
    let Some(first) = received.recv().await else {
        let image = task.await.expect("a transfer does not panic")?;
        return Ok(ndjson_lines(futures::stream::iter([TransferEvent::Done {
            image: Box::new(image),
        }])));
    };
    let rest = futures::stream::unfold((received, Some(task)), |(mut received, task)| async move {
        let task = task?;
        if let Some(event) = received.recv().await {
            return Some((event, (received, Some(task))));
        }
        let last = match task.await.expect("a transfer does not panic") {
            Ok(image) => TransferEvent::Done { image: Box::new(image) },
            Err(error) => TransferEvent::Error {
                error: ApiFailure::from(error).body(),
            },
        };
        Some((last, (received, None)))
    });
    Ok(ndjson_lines(futures::StreamExt::chain(
        futures::stream::iter([first]),
        rest,
    )))
}

/// Answers with one JSON line per item of `items` (exec and attach output, watch events, pull and push progress).
fn ndjson_lines<T: serde::Serialize + Send + 'static>(
    items: impl futures::Stream<Item = T> + Send + 'static,
) -> Response {
    let body = futures::StreamExt::map(items, |item| {
        let mut line = serde_json::to_vec(&item).expect("events serialize");
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(body))
        .expect("valid response")
}

#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "Image name (may contain `/`)")),
    responses((status = 204, description = "Removed"),
              (status = 404, description = "No such image", body = ApiError)),
    security(("bearer" = [])))]
async fn remove_image(State(state): State<AppState>, Path(name): Path<String>) -> Result<StatusCode, ApiFailure> {
    state.control.remove_image(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of the native v1 API.
#[derive(OpenApi)]
#[openapi(
    info(title = "nook API", description = "Sandboxes for AI agents: native v1 API."),
    paths(
        health, metrics, create_sandbox, list_sandboxes, get_sandbox, delete_sandbox, stop_sandbox, start_sandbox, pause_sandbox, resume_sandbox, update_resources, snapshot_sandbox, archive_sandbox, fork_sandbox, set_deadline, set_lifecycle, set_network,
        audit::list_audit, audit::export_audit,
        tenancy::create_tenant, tenancy::list_tenants, tenancy::set_quota, tenancy::create_key, tenancy::list_keys,
        tenancy::revoke_key, tenancy::make_token,
        preview::set_preview, preview::port_access, preview::make_link, preview::list_links, preview::revoke_link,
        sandbox_events, sandbox_event_stream, sandbox_stats, exec, exec_stream, start_process, list_processes, get_process, process_output, wait_process,
        process_stdin, signal_process, resize_process, terminal::process_terminal, transfer::download_file, transfer::upload_file, transfer::upload_multipart, transfer::download_archive, transfer::upload_archive, remove_file, stat_file, list_files, make_dir,
        move_file, watch_files, find_files, search_files, replace_in_files, chmod_file, chown_file, list_images, get_image, import_image, pull_image, push_image, prune_images, tag_image, remove_image, export_image,
        builds::start_build, builds::list_builds, builds::get_build, builds::cancel_build, builds::build_events
    ),
    components(schemas(nook_api::TerminalCommand, ExecEvent)),
    modifiers(&BearerAuth),
    tags(
        (name = "system", description = "Server status"),
        (name = "sandboxes", description = "Sandbox lifecycle"),
        (name = "exec", description = "Running processes in sandboxes"),
        (name = "processes", description = "Background processes that outlive connections, with output replay"),
        (name = "files", description = "Files in sandboxes, streamed both ways"),
        (name = "tenants", description = "Tenants and their quotas (the operator's)"),
        (name = "keys", description = "API keys with scopes and expiry, and sandbox-scoped capability tokens"),
        (name = "audit", description = "Every API call and egress decision, recorded"),
        (name = "preview", description = "Reaching sandboxes' ports from outside: tokens, signed links, public ports"),
        (name = "images", description = "Images in the content-addressed store"),
        (name = "builds", description = "Images built from Dockerfiles, with cached steps and live logs"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document as pretty JSON, as checked in under `openapi/`.
pub fn openapi_json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}
