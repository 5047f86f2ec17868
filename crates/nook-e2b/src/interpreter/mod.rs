//! E2B's code interpreter (port 49999): `POST /execute` streams the output of code run in a real Jupyter kernel as
//! JSON lines; `/contexts` creates, lists, restarts and removes kernels. The `e2b-code-interpreter` SDKs talk to it
//! through the same sandbox-traffic routing as envd.
//!
//! The kernels run inside the sandbox, started and driven by [`bridge`] with `jupyter_client` (the Jupyter messaging
//! protocol), so state persists between executions, matplotlib figures come back as PNG results and every installed
//! Jupyter kernel is a language. This module only speaks HTTP: it checks the request, hands it to the sandbox's
//! bridge and turns the replies into E2B's answers. An execution's response starts (status and headers) as soon as
//! the bridge has accepted it, carries a `keepalive` line after each 5 s without output, always ends with
//! `end_of_execution`, and interrupts the kernel when the client goes away before the end.
//!
//! Requests must carry the sandbox's `X-Access-Token` (the SDKs send it on `/execute`) or its
//! `E2B-Traffic-Access-Token` (sent on every request once the API handed one out, which nook's does).

use nook_control::audit::Audited;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Extension;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::envd::Target;
use crate::{same_secret, E2b};

pub mod bridge;

pub use bridge::{Bridge, BridgeFailure, Bridges};

/// The port of the code interpreter inside an E2B sandbox.
pub const INTERPRETER_PORT: u16 = 49999;
/// Quiet time after which an execution's stream carries a `keepalive` line.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Largest `/execute` or `/contexts` request body.
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// Templates of E2B's code-interpreter SDKs; nook's `base` image has what they need.
pub const TEMPLATES: [&str; 2] = ["code-interpreter-v1", "code-interpreter"];

/// The routes of port 49999.
pub fn router(e2b: E2b) -> Router {
    Router::new()
        .route("/execute", post(execute))
        .route("/contexts", get(list_contexts).post(create_context))
        .route("/contexts/{context}", delete(remove_context))
        .route("/contexts/{context}/restart", post(restart_context))
        .layer(axum::middleware::from_fn_with_state(e2b.clone(), check_token))
        .route("/health", get(|| async { axum::Json("OK") }))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "no such code interpreter route".into()) })
        .with_state(e2b)
}

/// A plain-text answer, as the reference server gives for its errors.
fn text(status: StatusCode, message: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

fn failure_response(failure: BridgeFailure) -> Response {
    let status = StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    text(status, failure.message)
}

/// Requires the sandbox's envd access token or traffic access token.
async fn check_token(State(e2b): State<E2b>, request: Request, next: Next) -> Response {
    let sandbox = request
        .extensions()
        .get::<Target>()
        .map(|target| target.sandbox.clone());
    match (token_given(&e2b, &request), sandbox) {
        (Some(true), Some(sandbox)) => {
            let audited = Audited::for_sandbox("sandbox access token", &request, &sandbox);
            audited.mark(next.run(request).await)
        }
        (Some(false), Some(sandbox)) => Audited::for_sandbox("unauthenticated", &request, &sandbox).mark(text(
            StatusCode::UNAUTHORIZED,
            "unauthorized: send the sandbox's X-Access-Token or E2B-Traffic-Access-Token".into(),
        )),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Whether the request carries one of its sandbox's tokens; `None` when it names no sandbox.
fn token_given(e2b: &E2b, request: &Request) -> Option<bool> {
    let id = &request.extensions().get::<Target>()?.sandbox.id;
    let given = |name: &str, expected: String| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|token| same_secret(token, &expected))
    };
    Some(
        given("x-access-token", e2b.access_token(id))
            || given("e2b-traffic-access-token", e2b.traffic_access_token(id)),
    )
}

/// The sandbox's bridge, or the answer to give instead.
async fn bridge_of(e2b: &E2b, target: &Target) -> Result<std::sync::Arc<Bridge>, Response> {
    if target.sandbox.state != nook_api::SandboxState::Running {
        return Err(crate::rest::error(
            StatusCode::BAD_GATEWAY,
            format!("sandbox {} is not running", target.sandbox.id),
        ));
    }
    e2b.interpreters
        .get(e2b, &target.sandbox.id)
        .await
        .map_err(failure_response)
}

/// A request body that cannot be served, answered 422 as FastAPI (E2B's reference server) does.
struct Unprocessable(String);

impl IntoResponse for Unprocessable {
    fn into_response(self) -> Response {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"detail": [{"type": "invalid", "msg": self.0}]})),
        )
            .into_response()
    }
}

/// A request's JSON body.
fn json_body(bytes: &Bytes) -> Result<Value, Unprocessable> {
    let value = if bytes.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice::<Value>(bytes)
            .map_err(|problem| Unprocessable(format!("the body is not JSON: {problem}")))?
    };
    if !value.is_object() {
        return Err(Unprocessable("the body must be a JSON object".into()));
    }
    Ok(value)
}

/// An optional string field: absent and null are `None`; another type is refused.
fn optional_string(body: &Value, field: &str) -> Result<Option<String>, Unprocessable> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(Unprocessable(format!("`{field}` must be a string"))),
    }
}

/// Sends a one-answer request and turns the answer into a response.
async fn ask(bridge: &Bridge, request: Value) -> Response {
    let (_, mut replies) = match bridge.call(request).await {
        Ok(call) => call,
        Err(failure) => return failure_response(failure),
    };
    match replies.recv().await {
        Some(reply) => match (reply.get("ok"), reply.get("error")) {
            (Some(ok), _) => axum::Json(ok.clone()).into_response(),
            (None, Some(error)) => failure_response(reply_failure(error)),
            (None, None) => failure_response(BridgeFailure {
                status: 500,
                message: "the code interpreter answered nothing".into(),
            }),
        },
        None => failure_response(BridgeFailure {
            status: 502,
            message: "the code interpreter went away".into(),
        }),
    }
}

fn reply_failure(error: &Value) -> BridgeFailure {
    BridgeFailure {
        status: error.get("status").and_then(Value::as_u64).unwrap_or(500) as u16,
        message: error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the code interpreter failed")
            .to_string(),
    }
}

/// `POST /contexts` `{language?, cwd?}`.
async fn create_context(State(e2b): State<E2b>, Extension(target): Extension<Target>, body: Bytes) -> Response {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let (language, cwd) = match (optional_string(&body, "language"), optional_string(&body, "cwd")) {
        (Ok(language), Ok(cwd)) => (language, cwd),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    match bridge_of(&e2b, &target).await {
        Ok(bridge) => ask(&bridge, json!({"op": "create", "language": language, "cwd": cwd})).await,
        Err(response) => response,
    }
}

/// `GET /contexts`.
async fn list_contexts(State(e2b): State<E2b>, Extension(target): Extension<Target>) -> Response {
    match bridge_of(&e2b, &target).await {
        Ok(bridge) => ask(&bridge, json!({"op": "list"})).await,
        Err(response) => response,
    }
}

/// `DELETE /contexts/{id}`.
async fn remove_context(
    State(e2b): State<E2b>,
    Extension(target): Extension<Target>,
    Path(context): Path<String>,
) -> Response {
    match bridge_of(&e2b, &target).await {
        Ok(bridge) => ask(&bridge, json!({"op": "remove", "context_id": context})).await,
        Err(response) => response,
    }
}

/// `POST /contexts/{id}/restart`.
async fn restart_context(
    State(e2b): State<E2b>,
    Extension(target): Extension<Target>,
    Path(context): Path<String>,
) -> Response {
    match bridge_of(&e2b, &target).await {
        Ok(bridge) => ask(&bridge, json!({"op": "restart", "context_id": context})).await,
        Err(response) => response,
    }
}

/// `POST /execute` `{code, context_id?, language?, env_vars?}`.
async fn execute(State(e2b): State<E2b>, Extension(target): Extension<Target>, body: Bytes) -> Response {
    let body = match json_body(&body) {
        Ok(body) => body,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(code) = body.get("code").and_then(Value::as_str) else {
        return Unprocessable("`code` is required and must be a string".into()).into_response();
    };
    let (context_id, language) = match (optional_string(&body, "context_id"), optional_string(&body, "language")) {
        (Ok(context_id), Ok(language)) => (context_id, language),
        (Err(refusal), _) | (_, Err(refusal)) => return refusal.into_response(),
    };
    if context_id.is_some() && language.is_some() {
        return text(
            StatusCode::BAD_REQUEST,
            "Only one of context_id or language can be provided".into(),
        );
    }
    let env_vars = match body.get("env_vars") {
        None | Some(Value::Null) => json!({}),
        Some(Value::Object(vars)) if vars.values().all(Value::is_string) => {
            if let Some(bad) = vars.keys().find(|name| !valid_env_name(name)) {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("{bad:?} is not an environment variable name"),
                );
            }
            Value::Object(vars.clone())
        }
        Some(_) => return Unprocessable("`env_vars` must map names to strings".into()).into_response(),
    };
    let bridge = match bridge_of(&e2b, &target).await {
        Ok(bridge) => bridge,
        Err(response) => return response,
    };
    let call = json!({
        "op": "execute",
        "code": code,
        "context_id": context_id,
        "language": language,
        "env_vars": env_vars,
    });
    let (id, mut replies) = match bridge.call(call).await {
        Ok(call) => call,
        Err(failure) => return failure_response(failure),
    };
    match replies.recv().await {
        Some(reply) if reply.get("accepted").is_some() => {}
        Some(reply) => {
            return failure_response(reply.get("error").map(reply_failure).unwrap_or(BridgeFailure {
                status: 500,
                message: "the code interpreter did not accept the execution".into(),
            }))
        }
        None => {
            return failure_response(BridgeFailure {
                status: 502,
                message: "the code interpreter went away".into(),
            })
        }
    }
    let stream = ExecutionStream {
        bridge,
        id,
        replies,
        finished: false,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(futures::stream::unfold(stream, next_line)))
        .expect("static response parts")
}

/// Names a shell and the kernels' env statements accept.
fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One execution's reply lines, becoming the response body; interrupts the execution if dropped before its end.
struct ExecutionStream {
    bridge: std::sync::Arc<Bridge>,
    id: u64,
    replies: mpsc::Receiver<Value>,
    finished: bool,
}

impl Drop for ExecutionStream {
    fn drop(&mut self) {
        if !self.finished {
            let (bridge, id) = (self.bridge.clone(), self.id);
            tokio::spawn(async move { bridge.notify(&json!({"op": "interrupt", "target": id})).await });
        }
    }
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).expect("JSON values serialise");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn next_line(mut stream: ExecutionStream) -> Option<(Result<Bytes, std::io::Error>, ExecutionStream)> {
    if stream.finished {
        return None;
    }
    let reply = match tokio::time::timeout(KEEPALIVE, stream.replies.recv()).await {
        Err(_) => return Some((Ok(line(&json!({"type": "keepalive"}))), stream)),
        Ok(reply) => reply,
    };
    let end = json!({"type": "end_of_execution"});
    let bytes = match reply {
        Some(reply) => {
            if let Some(output) = reply.get("line") {
                line(output)
            } else if reply.get("done").is_some() {
                stream.finished = true;
                line(&end)
            } else {
                // The bridge failed under the execution: say so, then end as every execution ends.
                stream.finished = true;
                let message = reply
                    .get("error")
                    .map(reply_failure)
                    .map(|failure| failure.message)
                    .unwrap_or_else(|| "the code interpreter failed".into());
                unexpected_end(&message, &end)
            }
        }
        None => {
            stream.finished = true;
            unexpected_end(
                "the code interpreter stopped answering (too slow a reader, or it ended)",
                &end,
            )
        }
    };
    Some((Ok(bytes), stream))
}

fn unexpected_end(message: &str, end: &Value) -> Bytes {
    let error = json!({
        "type": "error",
        "name": "UnexpectedEndOfExecution",
        "value": message,
        "traceback": "",
    });
    let mut bytes = line(&error).to_vec();
    bytes.extend_from_slice(&line(end));
    Bytes::from(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_are_identifiers() {
        assert!(valid_env_name("PATH") && valid_env_name("_x1"));
        assert!(!valid_env_name("") && !valid_env_name("1A") && !valid_env_name("A B") && !valid_env_name("A;rm"));
    }
}
