//! Image builds over HTTP: start one with its context as the request body, list and read them, follow a build's
//! log as NDJSON from any offset, cancel one. The work is in [`crate::builds`]; these handlers only translate.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use nook_api::{ApiError, Build, BuildEvent, BuildList, BuildRequest};

use super::{ndjson_lines, transfer, AppState, KEEPALIVE};
use crate::error::ApiFailure;

#[utoipa::path(post, path = "/v1/builds", tag = "builds", params(BuildRequest),
    request_body(content = Vec<u8>, description = "The build context: a tar stream (plain, gzip or zstd) holding \
                 the Dockerfile and the files it copies; `.dockerignore` applies", content_type = "application/x-tar"),
    responses((status = 201, description = "The build has started: the context is unpacked and the Dockerfile \
               parsed; follow it at `/v1/builds/{build}/events`", body = Build),
              (status = 400, description = "Invalid request, context or Dockerfile (`invalid_dockerfile`, with the \
               line)", body = ApiError),
              (status = 429, description = "Too many builds are running", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn start_build(
    State(state): State<AppState>,
    Query(request): Query<BuildRequest>,
    body: Body,
) -> Result<(StatusCode, Json<Build>), ApiFailure> {
    let build = state
        .control
        .builds()
        .start(request, transfer::body_stream(body))
        .await?;
    Ok((StatusCode::CREATED, Json(build)))
}

#[utoipa::path(get, path = "/v1/builds", tag = "builds",
    responses((status = 200, description = "Running builds and the most recent finished ones, oldest first",
               body = BuildList)),
    security(("bearer" = [])))]
pub(super) async fn list_builds(State(state): State<AppState>) -> Json<BuildList> {
    Json(BuildList {
        builds: state.control.builds().list(),
    })
}

#[utoipa::path(get, path = "/v1/builds/{build}", tag = "builds",
    params(("build" = String, Path, description = "Build id")),
    responses((status = 200, description = "The build", body = Build),
              (status = 404, description = "No such build", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn get_build(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Build>, ApiFailure> {
    Ok(Json(state.control.builds().get(&id)?))
}

#[utoipa::path(post, path = "/v1/builds/{build}/cancel", tag = "builds",
    params(("build" = String, Path, description = "Build id")),
    responses((status = 200, description = "The build once it has stopped (a finished build as it ended); a \
               cancelled build names no image and leaves no step sandbox", body = Build),
              (status = 404, description = "No such build", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn cancel_build(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Build>, ApiFailure> {
    Ok(Json(state.control.builds().cancel(&id).await?))
}

/// Query of a build's event stream.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct BuildEventsQuery {
    /// Offset of the first event wanted (the number of log events already seen); 0 by default.
    #[serde(default)]
    offset: u64,
    /// Keep streaming until the build ends; otherwise stop once caught up.
    #[serde(default)]
    follow: bool,
}

#[utoipa::path(get, path = "/v1/builds/{build}/events", tag = "builds",
    params(("build" = String, Path, description = "Build id"), BuildEventsQuery),
    responses((status = 200, description = "NDJSON: the build's events from `offset` (`missed` first when the log \
               no longer holds them), keepalives while idle; following, the stream ends after `done` or `error`",
               body = BuildEvent, content_type = "application/x-ndjson"),
              (status = 404, description = "No such build", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn build_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<BuildEventsQuery>,
) -> Result<Response, ApiFailure> {
    // Fail before the response starts when the build does not exist.
    state.control.builds().get(&id)?;
    let follow = query.follow;
    let lines = futures::stream::unfold(Some(query.offset), move |offset| {
        let state = state.clone();
        let id = id.clone();
        async move {
            let offset = offset?;
            let read = state.control.builds().events(&id, offset, follow);
            let batch = match tokio::time::timeout(KEEPALIVE, read).await {
                Err(_) => return Some((vec![BuildEvent::Keepalive], Some(offset))),
                Ok(Err(_)) => return None,
                Ok(Ok(batch)) => batch,
            };
            let mut lines = Vec::with_capacity(batch.events.len() + 1);
            if batch.missed > 0 {
                lines.push(BuildEvent::Missed { events: batch.missed });
            }
            lines.extend(batch.events.into_iter().map(|logged| logged.event));
            // Without follow, one batch up to the present; following, batches until the one with the last event.
            let done = batch.finished || !follow;
            if lines.is_empty() && done {
                return None;
            }
            Some((lines, (!done).then_some(batch.next)))
        }
    });
    Ok(ndjson_lines(futures::StreamExt::flat_map(lines, futures::stream::iter)))
}
