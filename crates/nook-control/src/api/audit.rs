//! Audit routes: the recorded API calls and egress decisions, by page or as one JSON-lines export.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nook_api::audit::{AuditPage, AuditQuery, MAX_AUDIT_PAGE};
use nook_api::ApiError;

use super::{ApiQuery, AppState};
use crate::error::ApiFailure;
use crate::tenancy::Caller;

/// The query limited to the caller's tenant, unless the caller is the operator (who may name one, or see all).
fn within_tenant(mut query: AuditQuery) -> AuditQuery {
    match Caller::current() {
        Some(caller) if caller.is_operator() => {}
        Some(caller) => query.tenant = Some(caller.tenant),
        None => {}
    }
    query
}

/// Events per store read while exporting.
const EXPORT_PAGE: u32 = 1000;

#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "Audit events, oldest first", body = AuditPage),
              (status = 400, description = "A malformed filter", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn list_audit(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiFailure> {
    let query = within_tenant(query);
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_AUDIT_PAGE {
        return Err(ApiFailure::invalid(format!(
            "limit {limit} is out of range: a page holds 1 to {MAX_AUDIT_PAGE} events"
        )));
    }
    let events = state.control.store().audit_events(&query, limit).await?;
    let next = (events.len() == limit as usize)
        .then(|| events.last().map(|event| event.seq))
        .flatten();
    Ok(Json(AuditPage { events, next }))
}

#[utoipa::path(get, path = "/v1/audit/export", tag = "audit", params(AuditQuery),
    responses((status = 200, description = "Every matching event as JSON lines (one `AuditEvent` per line), streamed \
               from the store a page at a time", content_type = "application/x-ndjson"),
              (status = 400, description = "A malformed filter", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn export_audit(State(state): State<AppState>, ApiQuery(query): ApiQuery<AuditQuery>) -> Response {
    let query = within_tenant(query);
    let store = state.control.store().clone();
    let mut remaining = query.limit.map(u64::from);
    let lines = futures::stream::unfold(Some(query), move |cursor| {
        let store = store.clone();
        async move {
            let mut query = cursor?;
            let page = match remaining {
                Some(0) => return None,
                Some(left) => left.min(u64::from(EXPORT_PAGE)) as u32,
                None => EXPORT_PAGE,
            };
            let events = match store.audit_events(&query, page).await {
                Ok(events) => events,
                Err(error) => return Some((Err(std::io::Error::other(error)), None)),
            };
            if events.is_empty() {
                return None;
            }
            if let Some(left) = remaining.as_mut() {
                *left -= events.len() as u64;
            }
            let mut text = String::new();
            for event in &events {
                text.push_str(&serde_json::to_string(event).expect("an audit event serializes"));
                text.push('\n');
            }
            let full = events.len() == page as usize;
            let last = events.last().map(|event| event.seq);
            if query.newest_first {
                query.before = last;
            } else {
                query.after = last;
            }
            Some((Ok::<_, std::io::Error>(text), full.then_some(query)))
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}
