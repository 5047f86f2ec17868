//! E2B compatibility: code written for E2B's SDKs runs against `nook serve` by setting `E2B_API_URL` and
//! `E2B_SANDBOX_URL` to nook's address and `E2B_API_KEY` to a nook API key.
//!
//! Three surfaces share nook's listen address:
//! - the E2B REST API at the root (`/sandboxes`, `/v2/sandboxes`, …; [`rest`]), authenticated by `X-API-Key`;
//! - sandbox traffic, recognised by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers the SDKs send when
//!   `E2B_SANDBOX_URL` is set, or by a `{port}-{sandboxId}.{domain}` Host: port 49983 is envd ([`envd`]), served by
//!   nook on top of its own agent; port 49999 is the code interpreter ([`interpreter`]), Jupyter kernels driven
//!   inside the sandbox; every other port goes to nook's preview proxy, admitted by the sandbox's traffic access
//!   token (`e2b-traffic-access-token`) or by nook's own preview rules (E2B sandboxes' ports are public unless
//!   created with `allowPublicTraffic: false`);
//!   a signed `/files` URL (the SDKs' `download_url` / `upload_url`) that carries neither is addressed to the
//!   sandbox whose access token made its signature;
//! - nook's native API under `/v1/`, untouched.
//!
//! Everything goes through [`nook_control::control::Control`], so E2B calls see the same sandboxes, limits and
//! checks as native ones. Sandbox traffic is authenticated by a per-sandbox access token (`X-Access-Token`), which
//! the REST API hands out with each sandbox; it is derived from a secret kept in the data directory, so it
//! survives restarts and is never stored.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use nook_control::control::Control;
use nook_control::ids::same_secret;
use sha2::{Digest, Sha256};
use tower::ServiceExt as _;

pub mod envd;
pub mod interpreter;
pub mod logs;
pub mod metrics;
pub mod rest;
pub mod snapshots;
pub mod templates;

/// The envd version nook reports, which the SDKs gate features on: every feature gated at or below it is
/// implemented (default user 0.4.0, stdin off 0.3.0, CloseStdin 0.5.2, raw and gzip uploads 0.5.7, file metadata
/// 0.6.2, entry info in watch events 0.6.3, `allowNetworkMounts` on watches 0.6.4).
pub const ENVD_VERSION: &str = "0.6.4";
/// The port of envd inside an E2B sandbox.
pub const ENVD_PORT: u16 = 49983;
/// The header that carries a sandbox's traffic access token to its ports.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// The default user of E2B sandboxes, as in E2B's base template.
pub const DEFAULT_USER: &str = "user";

/// Shared state of the E2B surfaces.
#[derive(Clone)]
pub struct E2b {
    /// nook's operations.
    pub control: Arc<Control>,
    /// nook's preview proxy, which serves every sandbox port but envd's and the interpreter's.
    pub previews: Arc<nook_control::preview::Previews>,
    /// Secret the per-sandbox access tokens are derived from.
    secret: Arc<[u8; 32]>,
    /// Polling file watchers of envd's `CreateWatcher`.
    pub watchers: Arc<envd::filesystem::Watchers>,
    /// The code interpreter's bridges into sandboxes.
    pub interpreters: Arc<interpreter::Bridges>,
    /// Usage samples of the sandboxes E2B clients know.
    pub metrics: Arc<metrics::Metrics>,
    /// Template builds E2B clients asked for.
    pub templates: Arc<templates::TemplateBuilds>,
    /// Snapshots E2B clients made.
    pub snapshots: Arc<snapshots::Snapshots>,
}

/// Why the E2B layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum E2bError {
    /// The token secret could not be read or created.
    #[error("cannot read or create the E2B token secret at {path}")]
    Secret {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The snapshot records could not be read.
    #[error("cannot load the E2B snapshot records")]
    Snapshots(#[from] snapshots::SnapshotsError),
}

impl E2b {
    /// The E2B layer over `control`, keeping its token secret in `data_dir`.
    pub fn new(
        control: Arc<Control>,
        previews: Arc<nook_control::preview::Previews>,
        data_dir: &Path,
    ) -> Result<Self, E2bError> {
        let path = data_dir.join("e2b-token-secret");
        let secret =
            nook_control::ids::load_or_create_secret(&path).map_err(|source| E2bError::Secret { path, source })?;
        let snapshots = snapshots::Snapshots::open(data_dir)?;
        Ok(Self {
            control: control.clone(),
            previews,
            secret: Arc::new(secret),
            metrics: Arc::new(metrics::Metrics::new(control.runner().clone())),
            watchers: Arc::new(envd::filesystem::Watchers::default()),
            interpreters: Arc::new(interpreter::Bridges::default()),
            templates: Arc::new(templates::TemplateBuilds::new(data_dir)),
            snapshots: Arc::new(snapshots),
        })
    }

    /// The envd access token of a sandbox.
    pub fn access_token(&self, sandbox_id: &str) -> String {
        self.derive_token(b"envd-access-token:", sandbox_id)
    }

    /// The traffic access token of a sandbox (sent by the SDKs to every port but envd).
    pub fn traffic_access_token(&self, sandbox_id: &str) -> String {
        self.derive_token(b"traffic-access-token:", sandbox_id)
    }

    fn derive_token(&self, purpose: &[u8], sandbox_id: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.secret.as_slice());
        hasher.update(purpose);
        hasher.update(sandbox_id.as_bytes());
        hex::encode(hasher.finalize())
    }

    /// Adds the E2B surfaces to nook's router.
    pub fn wrap(self, native: Router) -> Router {
        let sandbox_traffic = SandboxPorts {
            envd: envd::router(self.clone()),
            interpreter: interpreter::router(self.clone()),
        };
        native
            .merge(rest::router(self.clone()))
            .layer(axum::middleware::from_fn_with_state(
                (self, sandbox_traffic),
                route_sandbox_traffic,
            ))
    }
}

/// The services nook serves on a sandbox's behalf, by port.
#[derive(Clone)]
struct SandboxPorts {
    envd: Router,
    interpreter: Router,
}

/// Sends requests addressed to a sandbox's port to that port's service; everything else goes on.
async fn route_sandbox_traffic(
    State((e2b, ports)): State<(E2b, SandboxPorts)>,
    mut request: Request,
    next: Next,
) -> Response {
    let target = match sandbox_target(request.headers()) {
        Some(target) => target,
        None if request.uri().path() == "/files" && request.uri().query().is_some_and(|q| q.contains("signature=")) => {
            match signed_target(&e2b, request.method().clone(), request.uri().clone()).await {
                Some(target) => target,
                None => {
                    let refused = rest::error(
                        axum::http::StatusCode::UNAUTHORIZED,
                        "invalid signature: it was made for no running sandbox (or for another path, user or \
                         operation)",
                    );
                    return envd::refuse_unread(request, refused).await;
                }
            }
        }
        None => return next.run(request).await,
    };
    let service = match target.port {
        ENVD_PORT => ports.envd,
        interpreter::INTERPRETER_PORT => ports.interpreter,
        port => {
            let token = request.headers_mut().remove(TRAFFIC_TOKEN_HEADER);
            let trusted = token
                .as_ref()
                .and_then(|token| token.to_str().ok())
                .is_some_and(|token| same_secret(token, &e2b.traffic_access_token(&target.sandbox)));
            let destination = nook_control::preview::Destination {
                sandbox: target.sandbox,
                port,
                prefix: None,
            };
            return e2b.previews.forward(destination, request, trusted).await;
        }
    };
    let sandbox = match e2b.control.resolve(&target.sandbox).await {
        Ok(sandbox) => sandbox,
        Err(_) => {
            return rest::error(
                axum::http::StatusCode::BAD_GATEWAY,
                format!("sandbox {} was not found", target.sandbox),
            )
        }
    };
    request.extensions_mut().insert(envd::Target { sandbox });
    match service.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// The sandbox a signed `/files` URL without sandbox routing was made for: the running sandbox whose access token
/// made its signature. The SDKs build these URLs on `E2B_SANDBOX_URL`, which names only nook's address, so the
/// signature is what names the sandbox (two SHA-256 hashes per running sandbox to find it).
async fn signed_target(e2b: &E2b, method: axum::http::Method, uri: axum::http::Uri) -> Option<SandboxTarget> {
    let filter = nook_control::control::SandboxFilter {
        state: Some(nook_api::SandboxState::Running),
        labels: Default::default(),
    };
    let sandboxes = e2b.control.list(&filter).await.ok()?;
    sandboxes
        .into_iter()
        .find(|sandbox| envd::signed_with(&method, &uri, &e2b.access_token(&sandbox.id)))
        .map(|sandbox| SandboxTarget {
            sandbox: sandbox.id,
            port: ENVD_PORT,
        })
}

/// A sandbox port a request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SandboxTarget {
    sandbox: String,
    port: u16,
}

/// The sandbox and port from `E2b-Sandbox-Id` / `E2b-Sandbox-Port`, or from a `{port}-{id}.{domain}` Host.
fn sandbox_target(headers: &HeaderMap) -> Option<SandboxTarget> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(sandbox) = header("e2b-sandbox-id") {
        let port = header("e2b-sandbox-port")
            .and_then(|port| port.parse().ok())
            .unwrap_or(ENVD_PORT);
        return Some(SandboxTarget {
            sandbox: sandbox.to_string(),
            port,
        });
    }
    let host = header("host")?;
    let first = host.split('.').next()?;
    if !host.contains('.') {
        return None;
    }
    let (port, sandbox) = first.split_once('-')?;
    let port = port.parse().ok()?;
    sandbox.starts_with("sb-").then(|| SandboxTarget {
        sandbox: sandbox.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_traffic_is_recognised_by_headers_or_host() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:7070".parse().unwrap());
        assert_eq!(sandbox_target(&headers), None);
        headers.insert("e2b-sandbox-id", "sb-abc".parse().unwrap());
        headers.insert("e2b-sandbox-port", "49999".parse().unwrap());
        assert_eq!(
            sandbox_target(&headers),
            Some(SandboxTarget {
                sandbox: "sb-abc".into(),
                port: 49999
            })
        );
        let mut headers = HeaderMap::new();
        headers.insert("host", "49983-sb-xyz.nook.test:7070".parse().unwrap());
        assert_eq!(
            sandbox_target(&headers),
            Some(SandboxTarget {
                sandbox: "sb-xyz".into(),
                port: 49983
            })
        );
        headers.insert("host", "api.nook.test".parse().unwrap());
        assert_eq!(sandbox_target(&headers), None);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }
}
