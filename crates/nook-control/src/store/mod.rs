//! The control plane's durable state: sandboxes, their event history and API keys.
//!
//! [`Store`] is the seam; [`sqlite::SqliteStore`] is the embedded default (one file, WAL, schema migrations by
//! `user_version`). A PostgreSQL implementation for clusters implements the same trait. The store is the source of
//! truth for what the API reports; runners keep their own on-disk state for what actually runs, and the server
//! reconciles the two on start.

use chrono::{DateTime, Utc};
use nook_api::{Resources, Sandbox, SandboxEvent, SandboxState, StateReason};

pub mod sqlite;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name is taken.
    #[error("the name {0:?} is already taken")]
    NameTaken(String),
    /// No row matched.
    #[error("no such record")]
    NotFound,
    /// The record is not in a state the change may start from (another request changed it first).
    #[error("the sandbox is {0}, which this change cannot start from")]
    WrongState(SandboxState),
    /// The database failed.
    #[error("the database failed")]
    Database(#[from] rusqlite::Error),
    /// A stored value did not parse.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

/// An API key as stored (only its hash is kept, and never returned).
pub type ApiKeyRecord = nook_api::tenancy::ApiKeyInfo;

/// A new API key to store.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Human name.
    pub name: String,
    /// The one-way hash of the key.
    pub hash: String,
    /// Its tenant.
    pub tenant: String,
    /// What it may do.
    pub scope: nook_api::tenancy::Scope,
    /// When it stops working, if it does.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a [`Store::note`] changes in a sandbox's record besides its reason and message.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// New limits.
    pub resources: Option<Resources>,
    /// A new memory limit alone (the runner raised it), kept with whatever else a resize set meanwhile.
    pub memory_mb: Option<u64>,
    /// The kernel's OOM-kill count.
    pub oom_kills: Option<u64>,
    /// A new network policy.
    pub network: Option<nook_api::NetworkPolicy>,
    /// New preview settings.
    pub preview: Option<nook_api::PreviewSettings>,
}

/// A state change to record. It applies only if the sandbox is in one of `from` (compare-and-set), so that two
/// requests racing on one sandbox cannot overwrite each other's outcome.
#[derive(Debug, Clone)]
pub struct Transition {
    /// States the change may start from.
    pub from: &'static [SandboxState],
    /// New state.
    pub to: SandboxState,
    /// Why.
    pub reason: StateReason,
    /// Details.
    pub message: String,
}

/// The control plane's storage.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new sandbox (in its initial state) and its first event.
    async fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<(), StoreError>;
    /// A sandbox by id.
    async fn sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError>;
    /// A tenant's sandbox by name.
    async fn sandbox_by_name(&self, tenant: &str, name: &str) -> Result<Option<Sandbox>, StoreError>;
    /// All sandboxes, oldest first.
    async fn sandboxes(&self) -> Result<Vec<Sandbox>, StoreError>;
    /// Moves a sandbox to a new state and records the event; returns the updated sandbox.
    async fn transition(&self, id: &str, transition: Transition) -> Result<Sandbox, StoreError>;
    /// Records an event that leaves the state as it is (a resize, an OOM kill, a snapshot), with its reason as the
    /// sandbox's `state_reason`, and applies `change` to the record in the same write (read and changed inside the
    /// write, so two notes never undo each other). `updated_at` stays: it says when the state last changed.
    async fn note(&self, id: &str, reason: StateReason, message: &str, change: Change) -> Result<Sandbox, StoreError>;
    /// Sets a sandbox's lifecycle policy; returns the updated sandbox.
    async fn set_lifecycle(&self, id: &str, lifecycle: nook_api::Lifecycle) -> Result<Sandbox, StoreError>;
    /// Sets (or, with `None`, removes) a sandbox's deadline and what it does; returns the updated sandbox.
    async fn set_deadline(
        &self,
        id: &str,
        deadline: Option<chrono::DateTime<chrono::Utc>>,
        on_deadline: nook_api::DeadlineAction,
    ) -> Result<Sandbox, StoreError>;
    /// Removes a sandbox and its events.
    async fn delete_sandbox(&self, id: &str) -> Result<(), StoreError>;
    /// A sandbox's events, oldest first.
    async fn events(&self, id: &str) -> Result<Vec<SandboxEvent>, StoreError> {
        Ok(self
            .events_after(id, 0)
            .await?
            .into_iter()
            .map(|(_, event)| event)
            .collect())
    }
    /// A sandbox's events after the one numbered `after` (0: all), oldest first, with their numbers (increasing,
    /// unique across sandboxes).
    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<(u64, SandboxEvent)>, StoreError>;
    /// The ids of sandboxes as their records or events change (created, changed state, noted, deleted), after the
    /// change is committed: a follower re-reads what it needs.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String>;

    /// Stores a new API key by its hash.
    async fn insert_api_key(&self, key: &NewApiKey) -> Result<ApiKeyRecord, StoreError>;
    /// Finds the key with this hash (revoked and expired ones too: the caller judges).
    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// The keys of one tenant, or of all; oldest first.
    async fn api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError>;
    /// Marks a key revoked (now, unless it already was); returns it.
    async fn revoke_api_key(&self, id: &str) -> Result<ApiKeyRecord, StoreError>;
    /// The tenant that owns an image, if one does (no owner: the shared catalogue).
    async fn image_owner(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Every owned image's tenant, by image name.
    async fn image_owners(&self) -> Result<std::collections::HashMap<String, String>, StoreError>;
    /// Records an image's owner.
    async fn set_image_owner(&self, name: &str, tenant: &str) -> Result<(), StoreError>;
    /// Forgets an image's owner (the image is gone).
    async fn remove_image_owner(&self, name: &str) -> Result<(), StoreError>;
    /// Stores a new tenant (`NameTaken` if one has its name).
    async fn insert_tenant(&self, tenant: &nook_api::tenancy::Tenant) -> Result<(), StoreError>;
    /// A tenant by name.
    async fn tenant(&self, name: &str) -> Result<Option<nook_api::tenancy::Tenant>, StoreError>;
    /// Every tenant, oldest first.
    async fn tenants(&self) -> Result<Vec<nook_api::tenancy::Tenant>, StoreError>;
    /// Replaces a tenant's quota; returns it.
    async fn set_tenant_quota(
        &self,
        name: &str,
        quota: nook_api::tenancy::TenantQuota,
    ) -> Result<nook_api::tenancy::Tenant, StoreError>;
    /// How many keys exist.
    async fn api_key_count(&self) -> Result<u64, StoreError>;

    /// Stores audit events (numbered in order by the store).
    async fn insert_audit(&self, events: &[nook_api::audit::AuditEvent]) -> Result<(), StoreError>;
    /// Audit events matching `query` (its `limit` is ignored: `limit` says how many), oldest first.
    async fn audit_events(
        &self,
        query: &nook_api::audit::AuditQuery,
        limit: u32,
    ) -> Result<Vec<nook_api::audit::AuditEvent>, StoreError>;
    /// Removes audit events older than `before`; returns how many.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Records a signed preview link (its signature is not stored: it is derived again when checked). Links of
    /// the same sandbox that expired over a day ago are dropped in the same write.
    async fn insert_preview_link(&self, link: &nook_api::PreviewLink) -> Result<(), StoreError>;
    /// A preview link by id.
    async fn preview_link(&self, id: &str) -> Result<Option<nook_api::PreviewLink>, StoreError>;
    /// A sandbox's preview links, newest first.
    async fn preview_links(&self, sandbox_id: &str) -> Result<Vec<nook_api::PreviewLink>, StoreError>;
    /// Marks a sandbox's link revoked (now, unless it already was); returns it.
    async fn revoke_preview_link(&self, sandbox_id: &str, id: &str) -> Result<nook_api::PreviewLink, StoreError>;
}
