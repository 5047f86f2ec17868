//! Preview access routes: who may reach a sandbox's ports, their tokens and signed links, and the path-routed
//! proxy itself (`/preview/{sandbox}/{port}/…`, outside bearer auth: its requests carry preview credentials).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Json;
use nook_api::{
    ApiError, PortAccess, PreviewLink, PreviewLinkList, PreviewLinkRequest, PreviewSettingsRequest, Sandbox,
};

use super::{reported, ApiJson, AppState};
use crate::error::ApiFailure;
use crate::preview::Origin;

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/preview", tag = "preview",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = PreviewSettingsRequest,
    responses((status = 200, description = "The settings are in force for the next preview request; the sandbox as it \
               is now (recorded as a `preview_changed` event)", body = Sandbox),
              (status = 400, description = "Invalid settings", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn set_preview(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<PreviewSettingsRequest>,
) -> Result<Json<Sandbox>, ApiFailure> {
    reported(&state, state.previews.configure(&key, request).await).await
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/ports/{port}", tag = "preview",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("port" = u16, Path, description = "Port inside the sandbox")),
    responses((status = 200, description = "The port's preview URLs and token", body = PortAccess),
              (status = 400, description = "Port 0", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn port_access(
    State(state): State<AppState>,
    Path((key, port)): Path<(String, u16)>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<PortAccess>, ApiFailure> {
    let origin = Origin::of(&headers, &uri);
    Ok(Json(state.previews.access(&key, port, &origin).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/ports/{port}/links", tag = "preview",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("port" = u16, Path, description = "Port inside the sandbox")),
    request_body = PreviewLinkRequest,
    responses((status = 201, description = "A signed link that works until it expires or is revoked", body = PreviewLink),
              (status = 400, description = "A life outside 1 s to 24 h, or port 0", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn make_link(
    State(state): State<AppState>,
    Path((key, port)): Path<(String, u16)>,
    headers: HeaderMap,
    uri: Uri,
    ApiJson(request): ApiJson<PreviewLinkRequest>,
) -> Result<(StatusCode, Json<PreviewLink>), ApiFailure> {
    let origin = Origin::of(&headers, &uri);
    let link = state
        .previews
        .make_link(&key, port, request.expires_in_s, &origin)
        .await?;
    Ok((StatusCode::CREATED, Json(link)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/links", tag = "preview",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The sandbox's signed links, newest first", body = PreviewLinkList),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn list_links(
    State(state): State<AppState>,
    Path(key): Path<String>,
) -> Result<Json<PreviewLinkList>, ApiFailure> {
    Ok(Json(PreviewLinkList {
        links: state.previews.links(&key).await?,
    }))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox}/links/{link}", tag = "preview",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("link" = String, Path, description = "Link id")),
    responses((status = 200, description = "Revoked: the link stops working at once", body = PreviewLink),
              (status = 404, description = "No such sandbox or link", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn revoke_link(
    State(state): State<AppState>,
    Path((key, link)): Path<(String, String)>,
) -> Result<Json<PreviewLink>, ApiFailure> {
    Ok(Json(state.previews.revoke_link(&key, &link).await?))
}
