//! The preview proxy: HTTP from outside to the servers a sandbox runs.
//!
//! A request reaches a sandbox's port by host, `{port}-{sandbox}.{preview domain}` (the sandbox by id, or by name
//! when the server has a preview domain), or by path, `/preview/{sandbox}/{port}/…` (the prefix is removed and
//! passed on as `X-Forwarded-Prefix`). Preview requests carry no API key, so names resolve in the `default`
//! tenant; other tenants' sandboxes are reached by id. The proxy checks who may come in ([`Previews::authorize`]): a public port,
//! the port's token, or a signed link that has neither expired nor been revoked. Tokens and link signatures are
//! HMAC-SHA256 under a secret in the data directory, over the sandbox, the port and the sandbox's token
//! generation, so nothing secret is stored and rotating the generation revokes them all. The credential is taken
//! off the request (header, query parameter, cookie) before it goes on, so the sandbox never sees it; with host
//! routing, a credential that came in the query is kept in an HttpOnly cookie for the page's later requests.
//!
//! Upstream connections are made by the runner inside the sandbox's own network namespace, to its loopback
//! ([`nook_runner::Runner::connect_port`]), and kept in a pool per sandbox and port. Requests and responses stream
//! in both directions (server-sent events arrive as they are written); the client's `Host` goes through unchanged
//! for plain requests and upgrades alike; an `Upgrade` (WebSocket) that the sandbox accepts becomes a spliced
//! connection. Clients may speak HTTP/1.1 or HTTP/2 to nook; nook speaks HTTP/1.1 to the sandbox.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nook_api::preview::{MAX_LINK_S, MIN_LINK_S, TOKEN_HEADER, TOKEN_QUERY};
use nook_api::{PortAccess, PreviewLink, PreviewSettings, PreviewSettingsRequest, Sandbox, SandboxState, StateReason};
use nook_runner::{Runner, RunnerError};

use crate::control::Control;
use crate::error::ApiFailure;
use crate::ids::same_secret;
use crate::store::Change;

/// The query parameter that carries a signed link.
pub const LINK_QUERY: &str = "nook_link";
/// The cookie that keeps a credential given in the query (host routing only).
const COOKIE: &str = "nook_preview";
/// The path prefix of path routing.
pub const PATH_PREFIX: &str = "/preview/";

/// The preview proxy and the management of who may use it.
pub struct Previews {
    control: Arc<Control>,
    secret: [u8; 32],
    /// The DNS suffix of host routing (`preview.example.com`), if the server has one.
    domain: Option<String>,
    client: Client<PortConnector, Body>,
    /// One lock per sandbox being woken, so that a burst of requests wakes it once.
    wakes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sandboxes as preview requests named them, so that a request does not read the store: an entry goes as soon
    /// as the store says its sandbox changed.
    recent: Arc<Mutex<Recent>>,
}

/// The sandboxes [`Previews`] remembers, and a count of the store's change notices: a lookup keeps what it read
/// only if no notice came in while it read (one that came in meanwhile may be about it).
#[derive(Default)]
struct Recent {
    sandboxes: HashMap<String, Sandbox>,
    notices: u64,
}

/// The most sandboxes [`Previews`] remembers.
const RECENT_SANDBOXES: usize = 4096;

/// Where a preview request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The sandbox, by id or name.
    pub sandbox: String,
    /// The port inside it.
    pub port: u16,
    /// The path prefix that named it (path routing), removed before the request goes on.
    pub prefix: Option<String>,
}

/// The scheme and host a client used to reach nook, for the URLs nook hands back.
#[derive(Debug, Clone)]
pub struct Origin {
    /// `http` or `https` (from `X-Forwarded-Proto`, when a TLS front end sets it).
    pub scheme: String,
    /// `host[:port]`.
    pub host: String,
}

impl Origin {
    /// The origin of an API request.
    pub fn of(headers: &HeaderMap, uri: &Uri) -> Self {
        let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let scheme = match text("x-forwarded-proto") {
            Some("https") => "https",
            _ => "http",
        };
        let host = text("host")
            .map(str::to_string)
            .or_else(|| uri.authority().map(|authority| authority.to_string()))
            .unwrap_or_else(|| "localhost".to_string());
        Self {
            scheme: scheme.to_string(),
            host,
        }
    }

    fn port_suffix(&self) -> &str {
        match self.host.rfind(':') {
            Some(at) if !self.host.ends_with(']') => &self.host[at..],
            _ => "",
        }
    }
}

/// A credential a request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Credential {
    Token(String),
    Link(String),
}

impl Credential {
    /// Its text, as it came (and as a cookie keeps it).
    fn text(&self) -> &str {
        match self {
            Self::Token(text) | Self::Link(text) => text,
        }
    }
}

/// Why a request may pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The port is public.
    Public,
    /// A credential the caller checked itself (E2B's traffic access token).
    Trusted,
    /// The port's token.
    Token,
    /// A signed link.
    Link,
}

/// A link's text in a URL: `{id}.{expiry as Unix seconds}.{signature}`.
fn link_text(id: &str, expires: i64, signature: &str) -> String {
    format!("{id}.{expires}.{signature}")
}

impl Previews {
    /// The proxy for `control`'s sandboxes, signing with `secret`, routing hosts under `domain`.
    pub fn new(control: Arc<Control>, secret: [u8; 32], domain: Option<String>) -> Self {
        let connector = PortConnector {
            runner: control.runner().clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(32)
            .build(connector);
        let recent: Arc<Mutex<Recent>> = Arc::default();
        let mut changes = control.store().subscribe();
        let forget = Arc::downgrade(&recent);
        tokio::spawn(async move {
            loop {
                let changed = changes.recv().await;
                let Some(recent) = forget.upgrade() else { return };
                let mut recent = recent.lock().expect("recent sandboxes");
                recent.notices += 1;
                match changed {
                    Ok(id) => recent.sandboxes.retain(|_, sandbox| sandbox.id != id),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => recent.sandboxes.clear(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Self {
            control,
            secret,
            domain: domain.map(|domain| domain.trim_matches('.').to_ascii_lowercase()),
            client,
            wakes: Mutex::default(),
            recent,
        }
    }

    /// The sandbox a preview request names, from memory when it was looked up since it last changed.
    async fn lookup(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let notices = {
            let recent = self.recent.lock().expect("recent sandboxes");
            if let Some(sandbox) = recent.sandboxes.get(key) {
                return Ok(sandbox.clone());
            }
            recent.notices
        };
        let sandbox = self.control.resolve(key).await?;
        let mut recent = self.recent.lock().expect("recent sandboxes");
        if recent.notices == notices {
            if recent.sandboxes.len() >= RECENT_SANDBOXES {
                recent.sandboxes.clear();
            }
            recent.sandboxes.insert(key.to_string(), sandbox.clone());
        }
        Ok(sandbox)
    }

    /// The preview domain, if host routing by name is on.
    pub fn domain(&self) -> Option<&str> {
        self.domain.as_deref()
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        crate::ids::signature(&self.secret, parts)
    }

    /// The token of a sandbox's port for its current token generation.
    pub fn port_token(&self, sandbox: &Sandbox, port: u16) -> String {
        let generation = sandbox.preview.token_generation.to_string();
        self.mac(&[
            b"port-token",
            sandbox.id.as_bytes(),
            port.to_string().as_bytes(),
            generation.as_bytes(),
        ])
    }

    fn link_signature(&self, sandbox: &Sandbox, port: u16, id: &str, expires: i64) -> String {
        let generation = sandbox.preview.token_generation.to_string();
        self.mac(&[
            b"link",
            id.as_bytes(),
            sandbox.id.as_bytes(),
            port.to_string().as_bytes(),
            expires.to_string().as_bytes(),
            generation.as_bytes(),
        ])
    }

    /// The URLs of a sandbox's port: by host (with a preview domain) and by path; `query` is appended to both.
    fn urls(&self, sandbox: &Sandbox, port: u16, origin: &Origin, query: &str) -> (Option<String>, String) {
        let by_host = self.domain.as_ref().map(|domain| {
            format!(
                "{}://{port}-{}.{domain}{}/{query}",
                origin.scheme,
                sandbox.id,
                origin.port_suffix()
            )
        });
        let by_path = format!(
            "{}://{}{PATH_PREFIX}{}/{port}/{query}",
            origin.scheme, origin.host, sandbox.id
        );
        (by_host, by_path)
    }

    /// How to reach a sandbox's port.
    pub async fn access(&self, key: &str, port: u16, origin: &Origin) -> Result<PortAccess, ApiFailure> {
        check_port(port)?;
        let sandbox = self.control.resolve(key).await?;
        let (url, path_url) = self.urls(&sandbox, port, origin, "");
        Ok(PortAccess {
            port,
            public: sandbox.preview.is_public(port),
            url,
            path_url,
            token: self.port_token(&sandbox, port),
        })
    }

    /// Changes who may reach a sandbox's ports; `rotate_tokens` revokes every token and link made so far.
    pub async fn configure(&self, key: &str, request: PreviewSettingsRequest) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.control.resolve(key).await?;
        let mut settings = sandbox.preview.clone();
        if let Some(ports) = request.public_ports {
            settings.public_ports = ports;
            settings.public_ports.sort_unstable();
            settings.public_ports.dedup();
        }
        if let Some(all) = request.all_ports_public {
            settings.all_ports_public = all;
        }
        if let Some(wake) = request.wake_on_request {
            settings.wake_on_request = wake;
        }
        if request.rotate_tokens {
            settings.token_generation = settings.token_generation.wrapping_add(1);
        }
        if let Some(host) = request.upstream_host {
            settings.upstream_host = (!host.is_empty()).then_some(host);
        }
        settings.check().map_err(ApiFailure::invalid)?;
        if settings == sandbox.preview {
            return Ok(sandbox);
        }
        let message = describe(&settings, request.rotate_tokens);
        let change = Change {
            preview: Some(settings),
            ..Change::default()
        };
        Ok(self
            .control
            .store()
            .note(&sandbox.id, StateReason::PreviewChanged, &message, change)
            .await?)
    }

    /// Makes a signed link to a sandbox's port that works for `expires_in_s` seconds.
    pub async fn make_link(
        &self,
        key: &str,
        port: u16,
        expires_in_s: u64,
        origin: &Origin,
    ) -> Result<PreviewLink, ApiFailure> {
        check_port(port)?;
        if !(MIN_LINK_S..=MAX_LINK_S).contains(&expires_in_s) {
            return Err(ApiFailure::invalid(format!(
                "expires_in_s {expires_in_s} is out of range: a link lasts {MIN_LINK_S} s to {MAX_LINK_S} s (24 h)"
            )));
        }
        let sandbox = self.control.resolve(key).await?;
        let now = Utc::now();
        let expires_at = chrono::DateTime::from_timestamp(now.timestamp() + expires_in_s as i64, 0).expect("in range");
        let id = crate::ids::random_id("lnk-");
        let signature = self.link_signature(&sandbox, port, &id, expires_at.timestamp());
        let query = format!("?{LINK_QUERY}={}", link_text(&id, expires_at.timestamp(), &signature));
        let (url, path_url) = self.urls(&sandbox, port, origin, &query);
        let link = PreviewLink {
            id,
            sandbox: sandbox.id.clone(),
            port,
            url,
            path_url: Some(path_url),
            expires_at,
            revoked_at: None,
            created_at: chrono::SubsecRound::trunc_subsecs(now, 6),
        };
        self.control.store().insert_preview_link(&link).await?;
        Ok(link)
    }

    /// A sandbox's signed links.
    pub async fn links(&self, key: &str) -> Result<Vec<PreviewLink>, ApiFailure> {
        let sandbox = self.control.resolve(key).await?;
        Ok(self.control.store().preview_links(&sandbox.id).await?)
    }

    /// Revokes one of a sandbox's links: it stops working at once.
    pub async fn revoke_link(&self, key: &str, link: &str) -> Result<PreviewLink, ApiFailure> {
        let sandbox = self.control.resolve(key).await?;
        self.control
            .store()
            .revoke_preview_link(&sandbox.id, link)
            .await
            .map_err(|error| match error {
                crate::store::StoreError::NotFound => {
                    ApiFailure::not_found(format!("sandbox {} has no link {link:?}", sandbox.name))
                }
                other => other.into(),
            })
    }

    /// The destination named by a request's host, if it names one ([`destination_of_host`]).
    pub fn destination_of_host(&self, host: &str) -> Option<Destination> {
        destination_of_host(self.domain.as_deref(), host)
    }

    /// Who may pass: the port is public, or the request carries a valid credential (taken off the request).
    async fn authorize(
        &self,
        sandbox: &Sandbox,
        port: u16,
        credential: Option<Credential>,
    ) -> Result<Admission, ApiFailure> {
        if sandbox.preview.is_public(port) {
            return Ok(Admission::Public);
        }
        let refused = |why: &str| {
            ApiFailure::new(
                StatusCode::UNAUTHORIZED,
                "preview_unauthorized",
                format!(
                    "port {port} of sandbox {} is private and {why}: send the port's token in the \
                     Nook-Preview-Token header or the {TOKEN_QUERY} query parameter, or use a signed link",
                    sandbox.name
                ),
            )
        };
        match credential {
            None => Err(refused("the request carries no credential")),
            Some(Credential::Token(token)) => {
                if same_secret(&token, &self.port_token(sandbox, port)) {
                    Ok(Admission::Token)
                } else {
                    Err(refused("the token is not this port's (or was rotated)"))
                }
            }
            Some(Credential::Link(text)) => {
                let mut parts = text.splitn(3, '.');
                let (Some(id), Some(expires), Some(signature)) = (parts.next(), parts.next(), parts.next()) else {
                    return Err(refused("the link is malformed"));
                };
                let Ok(expires) = expires.parse::<i64>() else {
                    return Err(refused("the link is malformed"));
                };
                if !same_secret(signature, &self.link_signature(sandbox, port, id, expires)) {
                    return Err(refused(
                        "the link's signature does not match (or its tokens were rotated)",
                    ));
                }
                if Utc::now().timestamp() >= expires {
                    let at = DateTime::from_timestamp(expires, 0).unwrap_or_default();
                    return Err(refused(&format!("the link expired at {}", at.to_rfc3339())));
                }
                match self.control.store().preview_link(id).await? {
                    Some(link) if link.revoked_at.is_none() => Ok(Admission::Link),
                    Some(_) => Err(refused("the link was revoked")),
                    None => Err(refused("the link no longer exists")),
                }
            }
        }
    }

    /// Sends a request on to a sandbox's port and its answer back. `trusted`: the caller has admitted it already.
    pub async fn forward(&self, destination: Destination, mut request: Request, trusted: bool) -> Response {
        let sandbox = match self.lookup(&destination.sandbox).await {
            Ok(sandbox) => sandbox,
            Err(failure) => return failure.into_response(),
        };
        let (credential, from_query) = take_credential(&mut request).unzip();
        let kept_in_cookie = credential.as_ref().map(Credential::text).map(str::to_string);
        let admission = if trusted {
            Admission::Trusted
        } else {
            match self.authorize(&sandbox, destination.port, credential).await {
                Ok(admission) => admission,
                Err(failure) => return failure.into_response(),
            }
        };
        let sandbox = match self.ready(sandbox).await {
            Ok(sandbox) => sandbox,
            Err(failure) => return failure.into_response(),
        };
        self.control.note_activity(&sandbox.id);
        // Path routing shares nook's origin among sandboxes: a service worker registered there could watch every
        // other sandbox's preview traffic.
        if destination.prefix.is_some()
            && request
                .headers()
                .get("service-worker")
                .is_some_and(|value| value == "script")
        {
            return ApiFailure::new(
                StatusCode::FORBIDDEN,
                "service_worker_refused",
                "service workers are refused on previews by path, which share nook's origin: use the preview's \
                 host ({port}-{sandbox}.{domain})",
            )
            .into_response();
        }
        let mut response = match self.relay(&sandbox, &destination, request).await {
            Ok(response) => response,
            Err(failure) => return failure.into_response(),
        };
        // A credential from the query is kept in a cookie of the sandbox port's own host, so that the page's later
        // requests (scripts, images, XHR) pass too. Path routing shares one origin between sandboxes: no cookie.
        if let (Some(credential), Some(true), None, Admission::Token | Admission::Link) =
            (kept_in_cookie, from_query, &destination.prefix, &admission)
        {
            let cookie = format!("{COOKIE}={credential}; Path=/; HttpOnly; SameSite=Lax");
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, value);
            }
        }
        response
    }

    /// The sandbox running, woken first if it sleeps and its settings ask for it.
    async fn ready(&self, sandbox: Sandbox) -> Result<Sandbox, ApiFailure> {
        if sandbox.state == SandboxState::Running {
            return Ok(sandbox);
        }
        let asleep = matches!(
            sandbox.state,
            SandboxState::Paused | SandboxState::Stopped | SandboxState::Archived
        );
        if !asleep || !sandbox.preview.wake_on_request {
            return Err(ApiFailure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_running",
                format!(
                    "sandbox {} is {}; start or resume it (or turn on preview.wake_on_request)",
                    sandbox.name, sandbox.state
                ),
            ));
        }
        let lock = self
            .wakes
            .lock()
            .expect("wake locks")
            .entry(sandbox.id.clone())
            .or_default()
            .clone();
        let _waking = lock.lock().await;
        let current = self.control.resolve(&sandbox.id).await?;
        let woken = match current.state {
            SandboxState::Running => return Ok(current),
            SandboxState::Paused => self.control.resume(&sandbox.id).await?,
            _ => self.control.start(&sandbox.id).await?,
        };
        tracing::info!(sandbox = %woken.id, from = %current.state, "a preview request woke the sandbox");
        let _ = self
            .control
            .store()
            .note(
                &woken.id,
                StateReason::WokenByRequest,
                &format!("a preview request woke it (it was {})", current.state),
                Change::default(),
            )
            .await;
        self.wakes.lock().expect("wake locks").remove(&sandbox.id);
        Ok(woken)
    }

    /// The request on its way to the sandbox and the answer on its way back.
    async fn relay(
        &self,
        sandbox: &Sandbox,
        destination: &Destination,
        mut request: Request,
    ) -> Result<Response, ApiFailure> {
        let upgrade = upgrade_protocol(request.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let client_address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers);
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        if let Some(mask) = &sandbox.preview.upstream_host {
            let masked = mask.replace("${PORT}", &destination.port.to_string());
            if let Ok(value) = HeaderValue::from_str(&masked) {
                headers.insert(header::HOST, value);
            }
        }
        if let Some(protocol) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, protocol.clone());
        }
        if let Some(address) = client_address {
            let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(earlier) => format!("{earlier}, {address}"),
                None => address.to_string(),
            };
            if let Ok(value) = HeaderValue::from_str(&forwarded) {
                headers.insert(HeaderName::from_static("x-forwarded-for"), value);
            }
        }
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert(
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static("http"),
            );
        }
        let mut path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();
        if let Some(prefix) = &destination.prefix {
            path = path.strip_prefix(prefix.as_str()).unwrap_or("").to_string();
            if !path.starts_with('/') {
                path.insert(0, '/');
            }
            if let Ok(value) = HeaderValue::from_str(prefix) {
                headers.insert(HeaderName::from_static("x-forwarded-prefix"), value);
            }
        }
        let uri: Uri = format!("http://{}:{}{path}", sandbox.id, destination.port)
            .parse()
            .map_err(|_| ApiFailure::invalid("the request's path is not valid"))?;
        let mut upstream = hyper::Request::builder()
            .method(parts.method)
            .uri(uri)
            .version(Version::HTTP_11)
            .body(body)
            .expect("a request from parts");
        *upstream.headers_mut() = headers;
        let mut answer = self.client.request(upstream).await.map_err(|error| {
            let cause = std::error::Error::source(&error)
                .map(|source| source.to_string())
                .unwrap_or_else(|| error.to_string());
            ApiFailure::new(
                StatusCode::BAD_GATEWAY,
                "port_closed",
                format!(
                    "port {} of sandbox {} did not answer: {cause}",
                    destination.port, sandbox.name
                ),
            )
        })?;
        if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let sandbox_upgrade = hyper::upgrade::on(&mut answer);
                let name = sandbox.id.clone();
                tokio::spawn(async move {
                    match futures::future::try_join(client_upgrade, sandbox_upgrade).await {
                        Ok((client, inside)) => {
                            let (mut client, mut inside) = (TokioIo::new(client), TokioIo::new(inside));
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut inside).await;
                        }
                        Err(error) => tracing::debug!(sandbox = %name, %error, "a preview upgrade failed"),
                    }
                });
            }
            let (parts, _) = answer.into_parts();
            return Ok(Response::from_parts(parts, Body::empty()));
        }
        let (mut parts, body) = answer.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(prefix) = &destination.prefix {
            confine_to_prefix(&mut parts.headers, prefix);
        }
        Ok(Response::from_parts(parts, Body::new(body)))
    }
}

/// Middleware: requests whose host names a sandbox's port go to it; all others go on.
pub async fn route_by_host(State(previews): State<Arc<Previews>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|authority| authority.to_string()));
    match host.and_then(|host| previews.destination_of_host(&host)) {
        Some(destination) => previews.forward(destination, request, false).await,
        None => next.run(request).await,
    }
}

/// Handler of path routing: `/preview/{sandbox}/{port}/…`.
pub async fn route_by_path(State(previews): State<Arc<Previews>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let rest = path.strip_prefix(PATH_PREFIX).unwrap_or_default();
    let mut segments = rest.splitn(3, '/');
    let (Some(sandbox), Some(port)) = (segments.next(), segments.next()) else {
        return ApiFailure::not_found("a preview path is /preview/{sandbox}/{port}/…").into_response();
    };
    let Some(port) = port.parse::<u16>().ok().filter(|port| *port != 0) else {
        return ApiFailure::invalid(format!("{port:?} is not a port number (1 to 65535)")).into_response();
    };
    let destination = Destination {
        sandbox: sandbox.to_string(),
        port,
        prefix: Some(format!("{PATH_PREFIX}{sandbox}/{port}")),
    };
    previews.forward(destination, request, false).await
}

/// The destination named by a host `{port}-{sandbox}.{domain}[:port]`. Under the preview domain a sandbox may be
/// named by id or name; without one (or under another domain) only sandbox ids are recognised, under any domain,
/// as E2B's SDKs address sandboxes.
pub fn destination_of_host(domain: Option<&str>, host: &str) -> Option<Destination> {
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.to_ascii_lowercase();
    let (label, rest) = host.split_once('.')?;
    let (port, sandbox) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|port| *port != 0)?;
    let valid = if domain == Some(rest) {
        nook_api::names::check_sandbox_name(sandbox).is_ok() || nook_api::names::is_sandbox_id(sandbox)
    } else {
        nook_api::names::is_sandbox_id(sandbox)
    };
    valid.then(|| Destination {
        sandbox: sandbox.to_string(),
        port,
        prefix: None,
    })
}

fn check_port(port: u16) -> Result<(), ApiFailure> {
    if port == 0 {
        return Err(ApiFailure::invalid("port 0 is not a port a server listens on"));
    }
    Ok(())
}

/// "public ports 3000, 8080; wake on request on; tokens rotated".
fn describe(settings: &PreviewSettings, rotated: bool) -> String {
    let ports = if settings.all_ports_public {
        "every port public".to_string()
    } else if settings.public_ports.is_empty() {
        "every port private".to_string()
    } else {
        let list: Vec<String> = settings.public_ports.iter().map(u16::to_string).collect();
        format!("public ports {}", list.join(", "))
    };
    let wake = if settings.wake_on_request { "on" } else { "off" };
    let mut text = format!("preview: {ports}; wake on request {wake}");
    if let Some(host) = &settings.upstream_host {
        text.push_str(&format!("; servers see Host {host}"));
    }
    if rotated {
        text.push_str("; tokens and links rotated (all earlier ones revoked)");
    }
    text
}

/// Keeps a path-routed answer within its prefix: no `Service-Worker-Allowed` widening a worker's scope, and
/// cookies set for the prefix (a cookie's `Path=/app` becomes `Path=/preview/{sandbox}/{port}/app`) so that one
/// sandbox cannot set or read another's.
fn confine_to_prefix(headers: &mut HeaderMap, prefix: &str) {
    headers.remove("service-worker-allowed");
    let cookies: Vec<HeaderValue> = headers.get_all(header::SET_COOKIE).iter().cloned().collect();
    if cookies.is_empty() {
        return;
    }
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        let Ok(text) = cookie.to_str() else { continue };
        let mut path = "/".to_string();
        let mut attributes = Vec::new();
        for (index, part) in text.split(';').enumerate() {
            let trimmed = part.trim();
            match trimmed.split_once('=') {
                Some((name, value)) if index > 0 && name.trim().eq_ignore_ascii_case("path") => {
                    path = value.trim().to_string();
                }
                // A cookie for a parent domain would reach other previews' hosts too.
                Some((name, _)) if index > 0 && name.trim().eq_ignore_ascii_case("domain") => {}
                _ => attributes.push(trimmed.to_string()),
            }
        }
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        attributes.push(format!("Path={prefix}{path}"));
        if let Ok(value) = HeaderValue::from_str(&attributes.join("; ")) {
            headers.append(header::SET_COOKIE, value);
        }
    }
}

/// The pairs of a query string other than preview credentials, and the first credential among them.
fn split_query(query: &str) -> (Vec<&str>, Option<Credential>) {
    let mut kept = Vec::new();
    let mut found = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some((key, value)) if key == TOKEN_QUERY => {
                found = found.or(Some(Credential::Token(value.to_string())));
            }
            Some((key, value)) if key == LINK_QUERY => {
                found = found.or(Some(Credential::Link(value.to_string())));
            }
            _ => kept.push(pair),
        }
    }
    (kept, found)
}

/// `base` with the query pairs `kept` (none: no `?`).
fn with_query(base: &str, kept: &[&str]) -> String {
    if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// Takes the preview credential off a request (header, query parameter, cookie; the Referer's query too) and
/// returns the one it carries, and whether it came in the query: the sandbox never sees it.
fn take_credential(request: &mut Request) -> Option<(Credential, bool)> {
    let mut found = None;
    if let Some(value) = request.headers_mut().remove(TOKEN_HEADER) {
        found = value
            .to_str()
            .ok()
            .map(|token| (Credential::Token(token.trim().to_string()), false));
    }
    if let Some(query) = request.uri().query() {
        let (kept, in_query) = split_query(query);
        found = found.or(in_query.map(|credential| (credential, true)));
        let rebuilt = with_query(request.uri().path(), &kept);
        let mut parts = request.uri().clone().into_parts();
        if let Ok(path_and_query) = rebuilt.parse() {
            parts.path_and_query = Some(path_and_query);
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
            }
        }
    }
    // A page opened with a credential in its URL sends that URL as the Referer of its later requests.
    let referer = request
        .headers()
        .get(header::REFERER)
        .and_then(|value| value.to_str().ok())
        .and_then(|referer| referer.split_once('?'))
        .map(|(base, query)| with_query(base, &split_query(query).0));
    if let Some(value) = referer.and_then(|cleaned| HeaderValue::from_str(&cleaned).ok()) {
        request.headers_mut().insert(header::REFERER, value);
    }
    let cookies: Vec<HeaderValue> = request.headers_mut().remove(header::COOKIE).into_iter().collect();
    for value in cookies {
        let Ok(text) = value.to_str() else { continue };
        let mut kept = Vec::new();
        for cookie in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            match cookie.split_once('=') {
                Some((name, value)) if name == COOKIE => {
                    let credential = if value.contains('.') {
                        Credential::Link(value.to_string())
                    } else {
                        Credential::Token(value.to_string())
                    };
                    found = found.or(Some((credential, false)));
                }
                _ => kept.push(cookie),
            }
        }
        if !kept.is_empty() {
            if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
                request.headers_mut().append(header::COOKIE, value);
            }
        }
    }
    found
}

/// The protocol of an HTTP/1.1 `Upgrade` request (`Connection: upgrade` with an `Upgrade` header).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrades = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrades
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// Removes the headers that belong to one connection, not to the message (RFC 9110 7.6.1), and the ones the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .filter(|token| !token.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// Connects the pool's connections: the URI's host is a sandbox id, its port the port inside.
#[derive(Clone)]
struct PortConnector {
    runner: Arc<dyn Runner>,
}

impl tower::Service<Uri> for PortConnector {
    type Response = TokioIo<tokio::net::TcpStream>;
    type Error = RunnerError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let runner = self.runner.clone();
        Box::pin(async move {
            let sandbox = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            Ok(TokioIo::new(runner.connect_port(&sandbox, port).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_taken_off_the_request() {
        let mut request = Request::builder()
            .uri("/app?x=1&nook_token=abc&y=2")
            .header("cookie", "a=1; nook_preview=lnk-1.2.sig; b=2")
            .header("nook-preview-token", "fromheader")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            take_credential(&mut request),
            Some((Credential::Token("fromheader".into()), false))
        );
        assert_eq!(request.uri().to_string(), "/app?x=1&y=2");
        assert_eq!(request.headers()["cookie"], "a=1; b=2");
        assert!(request.headers().get("nook-preview-token").is_none());

        let mut request = Request::builder()
            .uri("/?nook_link=lnk-1.99.sig")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            take_credential(&mut request),
            Some((Credential::Link("lnk-1.99.sig".into()), true))
        );
        assert_eq!(request.uri().to_string(), "/");
    }

    #[test]
    fn path_routed_answers_stay_within_their_prefix() {
        let mut headers = HeaderMap::new();
        headers.insert("service-worker-allowed", "/".parse().unwrap());
        headers.append("set-cookie", "session=1; Path=/app; HttpOnly".parse().unwrap());
        headers.append("set-cookie", "theme=dark; Domain=example.test".parse().unwrap());
        confine_to_prefix(&mut headers, "/preview/sb-1/8000");
        assert!(headers.get("service-worker-allowed").is_none());
        let cookies: Vec<&str> = headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            vec![
                "session=1; HttpOnly; Path=/preview/sb-1/8000/app",
                "theme=dark; Path=/preview/sb-1/8000/"
            ]
        );
        let mut request = Request::builder()
            .uri("/next")
            .header("referer", "http://x.test/page?nook_token=secret&a=1")
            .body(Body::empty())
            .unwrap();
        take_credential(&mut request);
        assert_eq!(request.headers()["referer"], "http://x.test/page?a=1");
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_are_seen() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        assert!(upgrade_protocol(&headers).is_none());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        let mut headers = HeaderMap::new();
        headers.insert("connection", "Upgrade".parse().unwrap());
        headers.insert("upgrade", "websocket".parse().unwrap());
        assert_eq!(upgrade_protocol(&headers).unwrap(), "websocket");
    }

    #[test]
    fn hosts_name_a_sandbox_port() {
        let id = "sb-abcdefghij0123456789";
        let found = destination_of_host(None, &format!("8080-{id}.nook.test:7070")).unwrap();
        assert_eq!((found.sandbox.as_str(), found.port), (id, 8080));
        assert!(destination_of_host(None, "8080-myapp.nook.test").is_none());
        let found = destination_of_host(Some("preview.test"), "3000-MyApp.preview.test:80").unwrap();
        assert_eq!((found.sandbox.as_str(), found.port), ("myapp", 3000));
        assert!(destination_of_host(Some("preview.test"), "api.preview.test").is_none());
        assert!(destination_of_host(Some("preview.test"), "0-myapp.preview.test").is_none());
        assert!(destination_of_host(Some("preview.test"), "127.0.0.1:7070").is_none());
        assert!(destination_of_host(Some("preview.test"), "localhost").is_none());
    }

    #[test]
    fn settings_are_described() {
        let settings = PreviewSettings {
            public_ports: vec![3000, 8080],
            wake_on_request: true,
            ..Default::default()
        };
        assert_eq!(
            describe(&settings, true),
            "preview: public ports 3000, 8080; wake on request on; tokens and links rotated (all earlier ones revoked)"
        );
    }
}
