//! envd, E2B's in-sandbox daemon protocol (port 49983), served by nook from outside the sandbox on top of its own
//! agent: Connect-RPC `process.Process` and `filesystem.Filesystem` (JSON codec, [`connect`]), `GET`/`POST /files`
//! and `GET /health`.
//!
//! Every request here was addressed to one sandbox (the dispatcher in the crate root put a [`Target`] in its
//! extensions) and must carry that sandbox's `X-Access-Token`, except `/health`. The acting user is the
//! `Authorization: Basic base64("name:")` of the request (for `/files`, the `username` parameter), else `user`, as
//! in E2B's base template; relative paths and `~` are that user's home, and what is created belongs to them.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use nook_agent_proto::AccountInfo;
use nook_api::Sandbox;

use crate::{same_secret, E2b, DEFAULT_USER};
use connect::ConnectError;

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod messages;
pub mod process;

/// The sandbox a request is addressed to.
#[derive(Debug, Clone)]
pub struct Target {
    /// The sandbox.
    pub sandbox: Sandbox,
}

/// The routes of port 49983.
pub fn router(e2b: E2b) -> Router {
    Router::new()
        .route("/process.Process/Start", post(process::start))
        .route("/process.Process/Connect", post(process::connect))
        .route("/process.Process/List", post(process::list))
        .route("/process.Process/SendInput", post(process::send_input))
        .route("/process.Process/StreamInput", post(process::stream_input))
        .route("/process.Process/CloseStdin", post(process::close_stdin))
        .route("/process.Process/SendSignal", post(process::send_signal))
        .route("/process.Process/Update", post(process::update))
        .route("/filesystem.Filesystem/Stat", post(filesystem::stat))
        .route("/filesystem.Filesystem/ListDir", post(filesystem::list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(filesystem::make_dir))
        .route("/filesystem.Filesystem/Move", post(filesystem::move_path))
        .route("/filesystem.Filesystem/Remove", post(filesystem::remove))
        .route("/filesystem.Filesystem/WatchDir", post(filesystem::watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(filesystem::create_watcher))
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(filesystem::get_watcher_events),
        )
        .route("/filesystem.Filesystem/RemoveWatcher", post(filesystem::remove_watcher))
        .route("/files", get(files::download).post(files::upload))
        .layer(axum::middleware::from_fn_with_state(e2b.clone(), check_access_token))
        .route("/health", get(health))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"code": 404, "message": "no such envd route"})),
            )
        })
        .with_state(e2b)
}

/// `GET /health`: 204 while the sandbox runs, 502 otherwise (how the SDKs tell a stopped sandbox).
async fn health(request: Request) -> Response {
    match request.extensions().get::<Target>() {
        Some(target) if target.sandbox.state == nook_api::SandboxState::Running => {
            StatusCode::NO_CONTENT.into_response()
        }
        Some(target) => crate::rest::error(
            StatusCode::BAD_GATEWAY,
            format!("sandbox {} is not running", target.sandbox.id),
        ),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Requires the sandbox's `X-Access-Token`.
async fn check_access_token(
    axum::extract::State(e2b): axum::extract::State<E2b>,
    request: Request,
    next: Next,
) -> Response {
    let Some(target) = request.extensions().get::<Target>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let expected = e2b.access_token(&target.sandbox.id);
    let given = request
        .headers()
        .get("x-access-token")
        .and_then(|value| value.to_str().ok());
    match given {
        Some(token) if same_secret(token, &expected) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "code": 401,
                "message": "unauthorized access: send the sandbox's envdAccessToken in X-Access-Token",
            })),
        )
            .into_response(),
    }
}

/// The acting user named by `Authorization: Basic base64("name:")`, else the default.
pub fn user_of(headers: &HeaderMap) -> Result<String, ConnectError> {
    let Some(value) = headers.get("authorization") else {
        return Ok(DEFAULT_USER.to_string());
    };
    let text = value
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Basic "))
        .ok_or_else(|| ConnectError::new("unauthenticated", "the Authorization header is not Basic"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ConnectError::new("unauthenticated", "the Authorization header does not decode"))?;
    let name = decoded.split(':').next().unwrap_or_default();
    if name.is_empty() {
        return Ok(DEFAULT_USER.to_string());
    }
    Ok(name.to_string())
}

/// Resolves a user in the sandbox's own account database.
pub async fn account(e2b: &E2b, sandbox: &Sandbox, user: &str) -> Result<AccountInfo, ConnectError> {
    let request = nook_agent_proto::Request::Account { user: user.to_string() };
    e2b.control
        .file_call::<AccountInfo>(&sandbox.id, request)
        .await
        .map_err(|failure| {
            if failure.code == "no_such_user" {
                ConnectError::new("unauthenticated", format!("invalid username: {user:?}"))
            } else {
                ConnectError::from(failure)
            }
        })
}

/// A path as envd reads it: empty or `~` is the home directory, `~/x` and relative paths are under it.
pub fn resolve_path(path: &str, home: &str) -> Result<String, ConnectError> {
    let home = home.trim_end_matches('/');
    let resolved = if path.is_empty() || path == "~" {
        home.to_string()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{home}/{rest}")
    } else if path.starts_with('~') {
        return Err(ConnectError::invalid(format!(
            "{path:?}: only the acting user's own home (~) can be named"
        )));
    } else if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{home}/{path}")
    };
    Ok(if resolved.is_empty() { "/".into() } else { resolved })
}

/// The target of a request (set by the dispatcher).
pub fn target(request_extensions: &axum::http::Extensions) -> Result<Sandbox, ConnectError> {
    request_extensions
        .get::<Target>()
        .map(|target| target.sandbox.clone())
        .ok_or_else(|| ConnectError::not_found("no sandbox addressed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_against_the_home_directory() {
        assert_eq!(resolve_path("", "/home/user").unwrap(), "/home/user");
        assert_eq!(resolve_path("~", "/home/user").unwrap(), "/home/user");
        assert_eq!(resolve_path("~/a/b", "/home/user/").unwrap(), "/home/user/a/b");
        assert_eq!(resolve_path("a.txt", "/home/user").unwrap(), "/home/user/a.txt");
        assert_eq!(resolve_path("/etc/x", "/home/user").unwrap(), "/etc/x");
        assert_eq!(
            resolve_path("~root/x", "/home/user").unwrap_err().code,
            "invalid_argument"
        );
    }

    #[test]
    fn users_come_from_basic_authorization() {
        let mut headers = HeaderMap::new();
        assert_eq!(user_of(&headers).unwrap(), "user");
        headers.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(user_of(&headers).unwrap(), "root");
        headers.insert("authorization", "Bearer x".parse().unwrap());
        assert_eq!(user_of(&headers).unwrap_err().code, "unauthenticated");
    }
}
