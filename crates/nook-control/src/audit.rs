//! The audit log: every API call and every egress decision, stored and queryable.
//!
//! Recording never waits on the database: [`AuditLog::record`] puts the event on a bounded queue, and one writer
//! task takes whatever has queued up and stores it in a single transaction, so a burst of calls costs one commit.
//! If the queue is ever full, the events that did not fit are counted and a `dropped` event says how many. Events
//! older than the retention period are removed as the writer goes (at most once an hour).
//!
//! API calls are recorded by [`record_calls`], a middleware around the whole router: an authentication layer (the
//! native API's bearer check, the E2B layers' key and token checks) marks its response with [`Audited`] (who, and
//! the route), and the middleware turns each marked response into an event. Responses without the mark (the
//! health check, preview traffic) are not API calls and are not recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use chrono::Utc;
use nook_api::audit::{AuditEvent, AuditKind};
use tokio::sync::mpsc;

use crate::store::Store;

/// How many events may wait for the writer.
const QUEUE: usize = 16 * 1024;
/// The most events one write stores.
const BATCH: usize = 1024;
/// How often old events are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How long events are kept by default.
pub const DEFAULT_RETENTION_DAYS: u32 = 30;

/// The response mark an authentication layer leaves: who made the call, and to which route.
#[derive(Debug, Clone)]
pub struct Audited {
    /// The API key (`key-… (name)`), the sandbox token, or `unauthenticated`.
    pub actor: String,
    /// The route template (`/v1/sandboxes/{sandbox}/exec`), when the router matched one.
    pub route: Option<String>,
    /// The sandbox the call named, when it named one.
    pub sandbox: Option<String>,
    /// The caller's tenant, once known.
    pub tenant: Option<String>,
}

impl Audited {
    /// The mark for a request to `route` (its template, matched against the request's path for the sandbox).
    pub fn of(actor: String, tenant: Option<String>, request: &Request) -> Self {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map(|path| path.as_str().to_string());
        // Native routes name it `{sandbox}`; E2B's, `/sandboxes/{id}`.
        let sandbox = route.as_deref().and_then(|template| {
            let parameter = if template.contains("sandboxes/{id}") {
                "{id}"
            } else {
                "{sandbox}"
            };
            path_parameter(template, request.uri().path(), parameter)
        });
        Self {
            actor,
            route,
            sandbox,
            tenant,
        }
    }

    /// The mark for a call to a sandbox known by other means (E2B's in-sandbox protocols, addressed by host),
    /// in the sandbox's tenant.
    pub fn for_sandbox(actor: &str, request: &Request, sandbox: &nook_api::Sandbox) -> Self {
        Self {
            sandbox: Some(sandbox.id.clone()),
            ..Self::of(actor.to_string(), Some(sandbox.tenant.clone()), request)
        }
    }

    /// Marks `response` with this.
    pub fn mark(self, mut response: Response) -> Response {
        response.extensions_mut().insert(self);
        response
    }
}

/// The value of `parameter` (such as `{sandbox}`) in `path`, by its place in `template`.
fn path_parameter(template: &str, path: &str, parameter: &str) -> Option<String> {
    template
        .split('/')
        .zip(path.split('/'))
        .find(|(segment, _)| *segment == parameter)
        .map(|(_, value)| value.to_string())
        .filter(|value| !value.is_empty())
}

/// What the writer is given.
enum Queued {
    /// An event to store (boxed: the queue holds thousands, most of them small).
    Event(Box<AuditEvent>),
    /// Answer once everything queued before has been stored.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The audit log's queue and its writer.
pub struct AuditLog {
    queue: mpsc::Sender<Queued>,
    waiting: Mutex<Option<mpsc::Receiver<Queued>>>,
    dropped: AtomicU64,
}

impl Default for AuditLog {
    fn default() -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        Self {
            queue,
            waiting: Mutex::new(Some(waiting)),
            dropped: AtomicU64::new(0),
        }
    }
}

impl AuditLog {
    /// Queues an event (its number and time are given when it is stored).
    pub fn record(&self, event: AuditEvent) {
        if self.queue.try_send(Queued::Event(Box::new(event))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (at most `limit`) until everything recorded so far is stored: at shutdown, so that the last calls are
    /// not lost with the process.
    pub async fn flush(&self, limit: Duration) {
        let (done, stored) = tokio::sync::oneshot::channel();
        if self.queue.send(Queued::Flush(done)).await.is_ok() && tokio::time::timeout(limit, stored).await.is_err() {
            tracing::warn!("the audit log was not written out before shutdown");
        }
    }

    /// Counts events that never reached the queue (the runner's decisions outran its channel).
    pub fn note_dropped(&self, count: u64) {
        self.dropped.fetch_add(count, Ordering::Relaxed);
    }

    /// Starts the writer (once): it stores queued events and removes those older than `retention_days`.
    pub fn start(self: &Arc<Self>, store: Arc<dyn Store>, retention_days: u32) {
        let Some(mut waiting) = self.waiting.lock().expect("audit queue").take() else {
            return;
        };
        let log = self.clone();
        tokio::spawn(async move {
            let mut pruned_at: Option<Instant> = None;
            let mut queued = Vec::with_capacity(BATCH);
            while waiting.recv_many(&mut queued, BATCH).await > 0 {
                let mut batch = Vec::with_capacity(queued.len());
                let mut flushes = Vec::new();
                for item in queued.drain(..) {
                    match item {
                        Queued::Event(event) => batch.push(*event),
                        Queued::Flush(done) => flushes.push(done),
                    }
                }
                let dropped = log.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    batch.push(event(
                        AuditKind::Api,
                        "dropped",
                        "dropped",
                        false,
                        Some(format!("{dropped} events were not recorded: the audit queue was full")),
                    ));
                }
                if !batch.is_empty() {
                    if let Err(error) = store.insert_audit(&batch).await {
                        tracing::error!(%error, events = batch.len(), "audit events could not be stored");
                        // Said in the next batch that gets through.
                        log.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                }
                for done in flushes {
                    let _ = done.send(());
                }
                if pruned_at.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
                    pruned_at = Some(Instant::now());
                    let before = Utc::now() - chrono::Duration::days(i64::from(retention_days));
                    match store.prune_audit(before).await {
                        Ok(0) => {}
                        Ok(removed) => tracing::info!(removed, "removed audit events past their retention"),
                        Err(error) => tracing::warn!(%error, "old audit events could not be removed"),
                    }
                }
            }
        });
    }
}

/// An event with the fields every kind has; the store numbers it.
pub fn event(kind: AuditKind, action: &str, outcome: &str, allowed: bool, reason: Option<String>) -> AuditEvent {
    AuditEvent {
        seq: 0,
        at: Utc::now(),
        kind,
        actor: None,
        client: None,
        sandbox: None,
        action: action.to_string(),
        target: None,
        outcome: outcome.to_string(),
        allowed,
        rule: None,
        reason,
        duration_ms: None,
        tenant: None,
    }
}

/// The event for a runner's egress decision.
pub fn egress_event(decision: &nook_runner::network::EgressDecision) -> AuditEvent {
    let outcome = if decision.allowed { "allowed" } else { "denied" };
    let mut event = event(
        AuditKind::Egress,
        decision.by,
        outcome,
        decision.allowed,
        Some(decision.reason.clone()),
    );
    event.sandbox = Some(decision.sandbox_id.clone());
    event.target = Some(match decision.port {
        Some(port) => format!("{}:{port}", decision.host),
        None => decision.host.clone(),
    });
    event.rule = decision.rule.map(|rule| rule as u32);
    event
}

/// Middleware: records each call an authentication layer marked.
pub async fn record_calls(State(log): State<Arc<AuditLog>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip().to_string());
    let mut response = next.run(request).await;
    if let Some(audited) = response.extensions_mut().remove::<Audited>() {
        let status = response.status();
        let route = audited.route.unwrap_or(path);
        let mut event = event(
            AuditKind::Api,
            &format!("{method} {route}"),
            status.as_str(),
            status.as_u16() < 400,
            None,
        );
        event.actor = Some(audited.actor);
        event.client = client;
        event.sandbox = audited.sandbox;
        event.tenant = audited.tenant;
        event.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        log.record(event);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_is_read_from_the_path_by_the_template() {
        assert_eq!(
            path_parameter("/v1/sandboxes/{sandbox}/exec", "/v1/sandboxes/web/exec", "{sandbox}").as_deref(),
            Some("web")
        );
        assert_eq!(path_parameter("/v1/images", "/v1/images", "{sandbox}"), None);
        assert_eq!(path_parameter("/sandboxes/{sandbox}", "/sandboxes/", "{sandbox}"), None);
    }
}
