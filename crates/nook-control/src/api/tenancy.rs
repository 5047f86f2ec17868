//! Tenant, key and capability-token routes. Tenants are the operator's (an admin key of the `default` tenant);
//! keys are each tenant's admins' (the operator's for any tenant); capability tokens are made by any key that may
//! change the sandbox.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use nook_api::tenancy::{
    check_tenant_name, ApiKeyInfo, CapabilityRequest, CapabilityToken, CreateKeyRequest, CreateTenantRequest,
    CreatedKey, KeyList, Tenant, TenantList, TenantQuota, MAX_KEY_S, MAX_TOKEN_S,
};
use nook_api::ApiError;

use super::{ApiJson, AppState};
use crate::error::ApiFailure;
use crate::store::{NewApiKey, StoreError};
use crate::tenancy::Caller;

/// The caller (every route here runs behind authentication).
fn caller() -> Result<Caller, ApiFailure> {
    Caller::current().ok_or_else(|| ApiFailure::new(StatusCode::UNAUTHORIZED, "unauthenticated", "no caller"))
}

fn check_quota(quota: &TenantQuota) -> Result<(), ApiFailure> {
    if quota.cpu.is_some_and(|cpu| !cpu.is_finite() || cpu < 0.0) {
        return Err(ApiFailure::invalid("quota.cpu must be a number of cores, 0 or more"));
    }
    Ok(())
}

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = CreateTenantRequest,
    responses((status = 201, description = "Made", body = Tenant),
              (status = 400, description = "A bad name or quota", body = ApiError),
              (status = 403, description = "Not the operator", body = ApiError),
              (status = 409, description = "The name is taken", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn create_tenant(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateTenantRequest>,
) -> Result<(StatusCode, Json<Tenant>), ApiFailure> {
    check_tenant_name(&request.name).map_err(ApiFailure::invalid)?;
    check_quota(&request.quota)?;
    let tenant = Tenant {
        name: request.name,
        quota: request.quota,
        created_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 6),
    };
    state
        .control
        .store()
        .insert_tenant(&tenant)
        .await
        .map_err(|error| match error {
            StoreError::NameTaken(name) => ApiFailure::conflict(format!("a tenant named {name:?} exists")),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(get, path = "/v1/tenants", tag = "tenants",
    responses((status = 200, description = "Every tenant", body = TenantList),
              (status = 403, description = "Not the operator", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn list_tenants(State(state): State<AppState>) -> Result<Json<TenantList>, ApiFailure> {
    Ok(Json(TenantList {
        tenants: state.control.store().tenants().await?,
    }))
}

#[utoipa::path(put, path = "/v1/tenants/{tenant}/quota", tag = "tenants",
    params(("tenant" = String, Path, description = "Tenant name")),
    request_body = TenantQuota,
    responses((status = 200, description = "The quota replaces the old one; it judges the next change", body = Tenant),
              (status = 403, description = "Not the operator", body = ApiError),
              (status = 404, description = "No such tenant", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn set_quota(
    State(state): State<AppState>,
    Path(tenant): Path<String>,
    ApiJson(quota): ApiJson<TenantQuota>,
) -> Result<Json<Tenant>, ApiFailure> {
    check_quota(&quota)?;
    let updated = state
        .control
        .store()
        .set_tenant_quota(&tenant, quota)
        .await
        .map_err(|error| match error {
            StoreError::NotFound => ApiFailure::not_found(format!("no tenant is named {tenant:?}")),
            other => other.into(),
        })?;
    Ok(Json(updated))
}

#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 201, description = "The key, shown this once", body = CreatedKey),
              (status = 400, description = "A bad expiry", body = ApiError),
              (status = 403, description = "Not an admin, or another tenant's key without being the operator", body = ApiError),
              (status = 404, description = "No such tenant", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn create_key(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiFailure> {
    let caller = caller()?;
    let tenant = request.tenant.unwrap_or_else(|| caller.tenant.clone());
    if tenant != caller.tenant && !caller.is_operator() {
        return Err(ApiFailure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the operator makes keys for other tenants",
        ));
    }
    if state.control.store().tenant(&tenant).await?.is_none() {
        return Err(ApiFailure::not_found(format!("no tenant is named {tenant:?}")));
    }
    if request.name.trim().is_empty() || request.name.len() > 128 {
        return Err(ApiFailure::invalid("a key's name is 1 to 128 characters"));
    }
    let expires_at = match request.expires_in_s {
        Some(seconds) if (1..=MAX_KEY_S).contains(&seconds) => {
            Some(chrono::SubsecRound::trunc_subsecs(Utc::now(), 6) + chrono::Duration::seconds(seconds as i64))
        }
        Some(seconds) => {
            return Err(ApiFailure::invalid(format!(
                "expires_in_s {seconds} is out of range: 1 to {MAX_KEY_S} (ten years), or leave it out"
            )))
        }
        None => None,
    };
    let key = crate::ids::api_key();
    let info = state
        .control
        .store()
        .insert_api_key(&NewApiKey {
            name: request.name,
            hash: crate::ids::hash_key(&key),
            tenant,
            scope: request.scope,
            expires_at,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { key, info })))
}

#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = "The tenant's keys (every tenant's for the operator), never the keys \
               themselves", body = KeyList),
              (status = 403, description = "Not an admin", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn list_keys(State(state): State<AppState>) -> Result<Json<KeyList>, ApiFailure> {
    let caller = caller()?;
    let tenant = (!caller.is_operator()).then_some(caller.tenant.as_str());
    Ok(Json(KeyList {
        keys: state.control.store().api_keys(tenant).await?,
    }))
}

#[utoipa::path(delete, path = "/v1/keys/{key}", tag = "keys",
    params(("key" = String, Path, description = "Key id (`key-…`)")),
    responses((status = 200, description = "Revoked: it stops working at once", body = ApiKeyInfo),
              (status = 403, description = "Not an admin", body = ApiError),
              (status = 404, description = "No such key in the caller's tenant", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ApiKeyInfo>, ApiFailure> {
    let caller = caller()?;
    let missing = || ApiFailure::not_found(format!("no key has the id {id:?}"));
    let visible = state
        .control
        .store()
        .api_keys((!caller.is_operator()).then_some(caller.tenant.as_str()))
        .await?
        .into_iter()
        .any(|key| key.id == id);
    if !visible {
        return Err(missing());
    }
    Ok(Json(state.control.store().revoke_api_key(&id).await.map_err(
        |error| match error {
            StoreError::NotFound => missing(),
            other => other.into(),
        },
    )?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/tokens", tag = "keys",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    request_body = CapabilityRequest,
    responses((status = 201, description = "A token for these verbs on this sandbox only, until it expires",
               body = CapabilityToken),
              (status = 400, description = "No verbs, or a life outside 1 s to 30 days", body = ApiError),
              (status = 404, description = "No such sandbox", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn make_token(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<CapabilityRequest>,
) -> Result<(StatusCode, Json<CapabilityToken>), ApiFailure> {
    if request.verbs.is_empty() {
        return Err(ApiFailure::invalid(
            "verbs is empty: name what the token may do (read, exec, files:read, files:write, manage)",
        ));
    }
    if !(1..=MAX_TOKEN_S).contains(&request.expires_in_s) {
        return Err(ApiFailure::invalid(format!(
            "expires_in_s {} is out of range: a token lasts 1 s to {MAX_TOKEN_S} s (30 days)",
            request.expires_in_s
        )));
    }
    let sandbox = state.control.resolve(&key).await?;
    let mut verbs = request.verbs;
    verbs.sort();
    verbs.dedup();
    let expires_at =
        chrono::DateTime::from_timestamp(Utc::now().timestamp() + request.expires_in_s as i64, 0).expect("in range");
    let token = state.tokens.issue(&sandbox.tenant, &sandbox.id, &verbs, expires_at);
    Ok((
        StatusCode::CREATED,
        Json(CapabilityToken {
            token,
            sandbox: sandbox.id,
            verbs,
            expires_at,
        }),
    ))
}
