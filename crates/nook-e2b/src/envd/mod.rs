//! envd, E2B's in-sandbox daemon protocol (port 49983), served by nook from outside the sandbox on top of its own
//! agent: Connect-RPC `process.Process` and `filesystem.Filesystem` (JSON and binary protobuf codecs, [`connect`]),
//! `GET`/`POST /files` and `GET /health`.
//!
//! Every request here was addressed to one sandbox (the dispatcher in the crate root put a [`Target`] in its
//! extensions) and must carry that sandbox's `X-Access-Token`, except `/health`, and `/files` with a valid
//! signature instead (the signed URLs of the SDKs' `download_url` / `upload_url`, handed to third parties). The
//! acting user is the `Authorization: Basic base64("name:")` of the request (for `/files`, the `username`
//! parameter), else `user`, as in E2B's base template; relative paths and `~` are that user's home, and what is
//! created belongs to them.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use nook_agent_proto::AccountInfo;
use nook_api::Sandbox;
use nook_control::audit::Audited;
use sha2::Digest as _;

use crate::{same_secret, E2b, DEFAULT_USER};
use connect::ConnectError;

pub mod connect;
pub mod files;
pub mod filesystem;
pub mod messages;
pub mod process;
pub mod proto;

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

/// Requires the sandbox's `X-Access-Token`; `/files` may instead carry a signed URL's `signature` (checked only
/// when the header is absent: a header that does not match is refused, as envd does).
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
        // A header that is not text cannot match; an empty one counts as absent, as in envd.
        .map(|value| value.to_str().unwrap_or("\0"))
        .filter(|token| !token.is_empty());
    let verdict = match given {
        Some(token) if same_secret(token, &expected) => Ok(()),
        Some(_) => Err("unauthorized access: the X-Access-Token does not match the sandbox's envdAccessToken".into()),
        None if request.uri().path() == "/files" => {
            check_signature(&request, &expected, chrono::Utc::now().timestamp())
        }
        None => Err("unauthorized access: send the sandbox's envdAccessToken in X-Access-Token".into()),
    };
    let sandbox = target.sandbox.clone();
    match verdict {
        Ok(()) => {
            let audited = Audited::for_sandbox("envd access token", &request, &sandbox);
            audited.mark(next.run(request).await)
        }
        Err(message) => {
            let audited = Audited::for_sandbox("unauthenticated", &request, &sandbox);
            let response = (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({ "code": 401, "message": message })),
            );
            audited.mark(refuse_unread(request, response.into_response()).await)
        }
    }
}

/// Most bytes of a refused request's body read before answering.
const MAX_DRAINED: usize = 256 * 1024;

/// Answers `response` to a request refused before its body was read, after reading (and dropping) up to 256 KiB of
/// that body for at most a second, as Go's HTTP server (envd's) does: a client still sending a small upload then
/// gets the answer, where closing at once would leave it a broken pipe instead.
pub(crate) async fn refuse_unread(request: Request, response: Response) -> Response {
    use futures::StreamExt as _;
    let mut body = request.into_body().into_data_stream();
    let drain = async {
        let mut read = 0;
        while let Some(Ok(chunk)) = body.next().await {
            read += chunk.len();
            if read > MAX_DRAINED {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
    response
}

/// The query parameters of a signed `/files` URL.
#[derive(Debug, serde::Deserialize)]
struct SignedQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<String>,
}

/// A `/files` URL's signature, as the SDKs' `download_url` / `upload_url` make it.
struct Signed {
    signature: Option<String>,
    path: String,
    operation: &'static str,
    username: String,
    expiration: Option<i64>,
}

impl Signed {
    /// The signature parameters of `request`; a query that does not parse, or an expiration that is no number, is
    /// refused with the reason.
    fn of(method: &axum::http::Method, uri: &axum::http::Uri) -> Result<Self, String> {
        let query = axum::extract::Query::<SignedQuery>::try_from_uri(uri)
            .map_err(|rejection| {
                format!(
                    "unauthorized access: the query does not parse: {}",
                    rejection.body_text()
                )
            })?
            .0;
        let expiration = query
            .signature_expiration
            .map(|text| {
                text.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("signature_expiration {text:?} is not a unix time in seconds"))
            })
            .transpose()?;
        Ok(Self {
            signature: query.signature,
            path: query.path.unwrap_or_default(),
            operation: if method == axum::http::Method::GET {
                "read"
            } else {
                "write"
            },
            username: query.username.unwrap_or_default(),
            expiration,
        })
    }

    /// Whether the signature was made with `token` (compared in constant time), whatever its expiration.
    fn made_with(&self, token: &str) -> bool {
        let expected = file_signature(&self.path, self.operation, &self.username, token, self.expiration);
        self.signature
            .as_deref()
            .is_some_and(|signature| same_secret(signature, &expected))
    }
}

/// Whether a `/files` request carries a signature made with `token` (its expiration is checked later, by the
/// access check): how a signed URL without sandbox routing names its sandbox.
pub(crate) fn signed_with(method: &axum::http::Method, uri: &axum::http::Uri, token: &str) -> bool {
    uri.path() == "/files" && Signed::of(method, uri).is_ok_and(|signed| signed.made_with(token))
}

/// Checks the `signature` of a `/files` URL made by the SDKs' `download_url` / `upload_url`: `v1_` and the unpadded
/// base64 of SHA-256 over `path:operation:username:token[:expiration]`, the operation being `read` for `GET` and
/// `write` otherwise, the username empty for the default user. Compared in constant time; an expiration (unix
/// seconds) in the past is refused even with a valid signature.
fn check_signature(request: &Request, token: &str, now: i64) -> Result<(), String> {
    let signed = Signed::of(request.method(), request.uri())?;
    if signed.signature.is_none() {
        return Err(
            "unauthorized access: send the sandbox's envdAccessToken in X-Access-Token, or use a signed URL".into(),
        );
    }
    if !signed.made_with(token) {
        return Err(format!(
            "unauthorized access: invalid signature (for a {} of this path as this user)",
            signed.operation
        ));
    }
    if signed.expiration.is_some_and(|expiration| expiration < now) {
        return Err("unauthorized access: the signature has expired".into());
    }
    Ok(())
}

/// The `v1` signature of a file operation, as the SDKs compute it.
fn file_signature(path: &str, operation: &str, username: &str, token: &str, expiration: Option<i64>) -> String {
    let mut signed = format!("{path}:{operation}:{username}:{token}");
    if let Some(expiration) = expiration {
        signed.push_str(&format!(":{expiration}"));
    }
    let digest = sha2::Sha256::digest(signed.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
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
    fn signed_urls_are_checked_like_the_sdks_sign_them() {
        let token = "secret-token";
        let request = |method: &str, query: &str| {
            Request::builder()
                .method(method)
                .uri(format!("/files?{query}"))
                .body(axum::body::Body::empty())
                .unwrap()
        };
        // What the Python SDK's get_signature gives for ("/home/user/a b.txt", "read", None, token, None).
        let signature = file_signature("/home/user/a b.txt", "read", "", token, None);
        assert_eq!(signature, "v1_lozv6j01VnldBDPitO1nazDREEF8qbXaLTrymdfZbWQ");
        let query = format!("path=%2Fhome%2Fuser%2Fa%20b.txt&signature={signature}");
        assert_eq!(check_signature(&request("GET", &query), token, 0), Ok(()));
        // Another operation, path, user or token does not match.
        assert!(check_signature(&request("POST", &query), token, 0).is_err());
        assert!(check_signature(&request("GET", &query.replace("a%20b", "c")), token, 0).is_err());
        assert!(check_signature(&request("GET", &format!("{query}&username=root")), token, 0).is_err());
        assert!(check_signature(&request("GET", &query), "other", 0).is_err());
        assert!(check_signature(&request("GET", "path=%2Fx"), token, 0).is_err());

        let signature = file_signature("x", "write", "root", token, Some(1000));
        // Standard base64 has `+` and `/`: the SDKs percent-encode them.
        let encoded = signature.replace('+', "%2B").replace('/', "%2F");
        let query = format!("path=x&username=root&signature={encoded}&signature_expiration=1000");
        assert_eq!(check_signature(&request("POST", &query), token, 999), Ok(()));
        assert!(check_signature(&request("POST", &query), token, 1001)
            .unwrap_err()
            .contains("expired"));
        // The expiration is signed: moving it breaks the signature.
        let moved = query.replace("expiration=1000", "expiration=5000");
        assert!(check_signature(&request("POST", &moved), token, 999)
            .unwrap_err()
            .contains("invalid signature"));
        assert!(file_signature("p", "read", "", token, None).starts_with("v1_"));
        assert!(!file_signature("p", "read", "", token, None).ends_with('='));
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
