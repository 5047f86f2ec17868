//! The control plane's operations on sandboxes, independent of HTTP.
//!
//! [`Control`] validates requests, records every state change in the [`Store`] and drives the [`Runner`]. Create is
//! written so that a failure at any step leaves no trace on the runner: the record is written first (state
//! `creating`), the runner undoes its own partial work on failure, and the record then carries `error` with the
//! step that failed. On start, [`Control::reconcile`] brings the store in line with what the runner actually runs,
//! and [`Control::watch_runner`] turns runner events (OOM kills, inits exiting) into recorded transitions.
//! [`Control::keep_deadlines`] acts on sandboxes' deadlines (delete, or stop with the files kept) as they pass; they
//! are stored, so a restart keeps them, and one that passed while the server was down acts at start.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{SubsecRound as _, Utc};
use nook_api::limits::*;
use nook_api::names::{check_env_name, check_image_name, check_label_key, check_sandbox_name, is_sandbox_id};
use nook_api::{
    CreateSandboxRequest, DeadlineAction, ExecRequest, ExitStatus, FileInfo, FileKind, Isolation, ProcessInfo,
    Resources, Sandbox, SandboxState, StateReason, MAX_TIMEOUT_S,
};
use nook_runner::{ExecInput, ExecOptions, ExecOutput, ExecStream, Runner, RunnerError, RunnerEvent, SandboxSpec};

use crate::builds::Builds;
use crate::deadlines::DeadlineTimer;
use crate::error::ApiFailure;
use crate::ids;
use crate::store::{Change, Store, StoreError, Transition};
use crate::tenancy::{current_tenant, Caller};

/// Filters for listing sandboxes.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    /// Only sandboxes in this state.
    pub state: Option<SandboxState>,
    /// Only sandboxes carrying all these labels.
    pub labels: BTreeMap<String, String>,
}

/// The control plane's sandbox operations.
pub struct Control {
    store: Arc<dyn Store>,
    runner: Arc<dyn Runner>,
    host_cpus: f64,
    host_memory_mb: u64,
    deadlines: DeadlineTimer,
    lifecycles: crate::lifecycle::Lifecycles,
    audit: Arc<crate::audit::AuditLog>,
    /// One lock per tenant with a quota: a quota check and the change it admits happen under it.
    quota_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    builds: Builds,
}

/// What a change adds to a tenant's holdings, for its quota.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// New sandboxes.
    sandboxes: u64,
    /// Cores of running (or paused) sandboxes.
    cpu: f64,
    /// Memory of running (or paused) sandboxes, MiB.
    memory_mb: u64,
}

impl Usage {
    /// `count` new live sandboxes with `resources` each.
    fn live(count: u64, resources: &Resources) -> Self {
        Self {
            sandboxes: 0,
            cpu: resources.cpu * count as f64,
            memory_mb: resources.memory_mb * count,
        }
    }
}

/// How long a deadline that could not act yet (a sandbox still being created, a runner error) waits to try again.
const DEADLINE_RETRY: chrono::Duration = chrono::Duration::seconds(5);

/// Checks a lifecycle policy's bounds; 0 means off.
fn check_lifecycle(lifecycle: nook_api::Lifecycle) -> Result<nook_api::Lifecycle, ApiFailure> {
    let check = |name: &str, value: Option<u64>| match value {
        Some(0) | None => Ok(None),
        Some(seconds) if seconds > MAX_TIMEOUT_S => Err(ApiFailure::invalid(format!(
            "{name} {seconds} is over the most it can be set to, {MAX_TIMEOUT_S} s (ten years)"
        ))),
        Some(seconds) => Ok(Some(seconds)),
    };
    Ok(nook_api::Lifecycle {
        idle_stop_s: check("idle_stop_s", lifecycle.idle_stop_s)?,
        stopped_delete_s: check("stopped_delete_s", lifecycle.stopped_delete_s)?,
        stopped_archive_s: check("stopped_archive_s", lifecycle.stopped_archive_s)?,
    })
}

/// "cpu 1 → 2, memory 512 → 1024 MiB": what a resize changed.
fn describe_resize(old: &Resources, new: &Resources) -> String {
    let mut changes = Vec::new();
    if old.cpu != new.cpu {
        changes.push(format!("cpu {} → {} cores", old.cpu, new.cpu));
    }
    if old.memory_mb != new.memory_mb {
        changes.push(format!("memory {} → {} MiB", old.memory_mb, new.memory_mb));
    }
    if old.memory_max_mb != new.memory_max_mb {
        let ceiling = |mb: Option<u64>| mb.map_or_else(|| "off".to_string(), |mb| format!("{mb} MiB"));
        changes.push(format!(
            "memory auto-grow ceiling {} → {}",
            ceiling(old.memory_max_mb),
            ceiling(new.memory_max_mb)
        ));
    }
    if old.pids != new.pids {
        changes.push(format!("pids {} → {}", old.pids, new.pids));
    }
    if old.disk_mb != new.disk_mb {
        let disk = |disk: Option<u64>| disk.map_or_else(|| "none".to_string(), |mb| format!("{mb} MiB"));
        changes.push(format!("disk quota {} → {}", disk(old.disk_mb), disk(new.disk_mb)));
    }
    format!("resized: {}", changes.join(", "))
}

/// The moment `timeout_s` seconds from now, checked against [`MAX_TIMEOUT_S`].
fn deadline_in(timeout_s: u64) -> Result<chrono::DateTime<Utc>, ApiFailure> {
    if timeout_s > MAX_TIMEOUT_S {
        return Err(ApiFailure::invalid(format!(
            "timeout_s {timeout_s} is over the most a deadline can be set to, {MAX_TIMEOUT_S} s (ten years); \
             leave it out for a sandbox without a deadline"
        )));
    }
    // Microseconds, as the store keeps it: the answer then equals what a later read returns.
    Ok((Utc::now() + chrono::Duration::seconds(timeout_s as i64)).trunc_subsecs(6))
}

impl Control {
    /// Ties a store to a runner.
    pub fn new(store: Arc<dyn Store>, runner: Arc<dyn Runner>) -> Self {
        let host_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
        let host_memory_mb = host_memory_mb().unwrap_or(MAX_MEMORY_MB);
        Self {
            store,
            builds: Builds::new(runner.clone(), host_cpus, host_memory_mb),
            runner,
            host_cpus,
            host_memory_mb,
            deadlines: DeadlineTimer::default(),
            lifecycles: crate::lifecycle::Lifecycles::default(),
            audit: Arc::default(),
            quota_locks: Default::default(),
        }
    }

    /// The image builds.
    pub fn builds(&self) -> &Builds {
        &self.builds
    }

    /// The runner (for image operations).
    pub fn runner(&self) -> &Arc<dyn Runner> {
        &self.runner
    }

    /// The API key `key` is, if it is one (only their hashes are stored).
    /// Revoked and expired keys are not keys.
    pub async fn authenticate(&self, key: &str) -> Result<Option<crate::store::ApiKeyRecord>, ApiFailure> {
        let record = self.store.api_key_by_hash(&crate::ids::hash_key(key)).await?;
        Ok(record.filter(|record| {
            record.revoked_at.is_none() && record.expires_at.is_none_or(|expires| expires > Utc::now())
        }))
    }

    /// The audit log.
    pub fn audit(&self) -> &Arc<crate::audit::AuditLog> {
        &self.audit
    }

    /// Starts storing the audit log (kept `retention_days`), egress decisions included.
    pub fn start_audit(self: &Arc<Self>, retention_days: u32) {
        self.audit.start(self.store.clone(), retention_days);
        let Some(mut decisions) = self.runner.egress_decisions() else {
            return;
        };
        let (audit, store) = (self.audit.clone(), self.store.clone());
        tokio::spawn(async move {
            // Each sandbox's tenant, so that its admins see its traffic (read once per sandbox, not per decision).
            let mut tenants: std::collections::HashMap<String, String> = Default::default();
            loop {
                match decisions.recv().await {
                    Ok(decision) => {
                        let mut event = crate::audit::egress_event(&decision);
                        if !tenants.contains_key(&decision.sandbox_id) {
                            if tenants.len() >= 100_000 {
                                tenants.clear();
                            }
                            if let Ok(Some(sandbox)) = store.sandbox(&decision.sandbox_id).await {
                                tenants.insert(decision.sandbox_id.clone(), sandbox.tenant);
                            }
                        }
                        event.tenant = tenants.get(&decision.sandbox_id).cloned();
                        audit.record(event);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => audit.note_dropped(missed),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// Notes work on a sandbox on a client's behalf (a preview request), which keeps its idle timer from firing.
    pub fn note_activity(&self, id: &str) {
        self.lifecycles.touch(id);
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Validates a create request and returns the resources it resolves to.
    fn check_create(&self, request: &CreateSandboxRequest) -> Result<Resources, ApiFailure> {
        if let Some(name) = &request.name {
            check_sandbox_name(name).map_err(ApiFailure::invalid)?;
        }
        if let Some(image) = &request.image {
            check_image_name(image).map_err(ApiFailure::invalid)?;
        }
        check_labels(&request.labels)?;
        check_env(&request.env)?;
        if let Some(policy) = &request.network {
            policy.check().map_err(ApiFailure::invalid)?;
        }
        if let Some(preview) = &request.preview {
            preview.check().map_err(ApiFailure::invalid)?;
        }
        let wanted = request.resources.clone().unwrap_or_default();
        let resources = Resources {
            cpu: wanted.cpu.unwrap_or(DEFAULT_CPU.min(self.host_cpus)),
            memory_mb: wanted.memory_mb.unwrap_or(DEFAULT_MEMORY_MB),
            memory_max_mb: wanted.memory_max_mb,
            pids: wanted.pids.unwrap_or(DEFAULT_PIDS),
            disk_mb: wanted.disk_mb,
        };
        self.check_resources(&resources)?;
        Ok(resources)
    }

    /// Checks limits against the bounds and this host.
    fn check_resources(&self, resources: &Resources) -> Result<(), ApiFailure> {
        let max_cpu = MAX_CPU.min(self.host_cpus);
        if !resources.cpu.is_finite() || resources.cpu < MIN_CPU || resources.cpu > max_cpu {
            return Err(ApiFailure::invalid(format!(
                "cpu {} is out of range: this host offers {MIN_CPU} to {max_cpu} cores",
                resources.cpu
            )));
        }
        let max_memory = MAX_MEMORY_MB.min(self.host_memory_mb);
        if resources.memory_mb < MIN_MEMORY_MB || resources.memory_mb > max_memory {
            return Err(ApiFailure::invalid(format!(
                "memory_mb {} is out of range: this host offers {MIN_MEMORY_MB} to {max_memory} MiB",
                resources.memory_mb
            )));
        }
        if let Some(ceiling) = resources.memory_max_mb {
            if ceiling < resources.memory_mb || ceiling > max_memory {
                return Err(ApiFailure::invalid(format!(
                    "memory_max_mb {ceiling} is out of range: it must be at least memory_mb ({}) and at most {max_memory} \
                     MiB",
                    resources.memory_mb
                )));
            }
        }
        if resources.pids < MIN_PIDS || resources.pids > MAX_PIDS {
            return Err(ApiFailure::invalid(format!(
                "pids {} is out of range: use {MIN_PIDS} to {MAX_PIDS}",
                resources.pids
            )));
        }
        if let Some(disk) = resources.disk_mb {
            if !(MIN_DISK_MB..=MAX_DISK_MB).contains(&disk) {
                return Err(ApiFailure::invalid(format!(
                    "disk_mb {disk} is out of range: use {MIN_DISK_MB} to {MAX_DISK_MB} MiB"
                )));
            }
        }
        Ok(())
    }

    /// Checks that `tenant` may add `adding` (its live sandboxes other than `except` counted as they are) and
    /// returns the lock under which the change must be made, or a 403 `quota_exceeded` naming the limit. A tenant
    /// without a quota takes no lock.
    async fn admit(
        &self,
        tenant: &str,
        adding: Usage,
        except: Option<&str>,
    ) -> Result<Option<tokio::sync::OwnedMutexGuard<()>>, ApiFailure> {
        let quota = match self.store.tenant(tenant).await? {
            Some(record) => record.quota,
            None => return Err(ApiFailure::not_found(format!("tenant {tenant:?} does not exist"))),
        };
        if quota == nook_api::tenancy::TenantQuota::default() {
            return Ok(None);
        }
        let lock = self
            .quota_locks
            .lock()
            .expect("quota locks")
            .entry(tenant.to_string())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        let held: Vec<Sandbox> = self
            .store
            .sandboxes()
            .await?
            .into_iter()
            .filter(|sandbox| sandbox.tenant == tenant)
            .collect();
        let live = held.iter().filter(|sandbox| {
            Some(sandbox.id.as_str()) != except
                && matches!(
                    sandbox.state,
                    SandboxState::Creating | SandboxState::Running | SandboxState::Paused
                )
        });
        let cpu: f64 = live.clone().map(|sandbox| sandbox.resources.cpu).sum();
        let memory_mb: u64 = live.map(|sandbox| sandbox.resources.memory_mb).sum();
        let exceeded = |what: String| {
            Err(ApiFailure::new(
                axum::http::StatusCode::FORBIDDEN,
                "quota_exceeded",
                format!("tenant {tenant}'s quota is exceeded: {what}; stop or delete sandboxes, or ask the operator for a larger quota"),
            ))
        };
        if let Some(limit) = quota.sandboxes {
            if held.len() as u64 + adding.sandboxes > limit {
                return exceeded(format!(
                    "it may have {limit} sandboxes, has {} and asked for {} more",
                    held.len(),
                    adding.sandboxes
                ));
            }
        }
        if let Some(limit) = quota.cpu {
            if cpu + adding.cpu > limit + 1e-9 {
                return exceeded(format!(
                    "its running sandboxes may have {limit} cores in all, have {cpu} and would add {}",
                    adding.cpu
                ));
            }
        }
        if let Some(limit) = quota.memory_mb {
            if memory_mb + adding.memory_mb > limit {
                return exceeded(format!(
                    "its running sandboxes may have {limit} MiB in all, have {memory_mb} MiB and would add {} MiB",
                    adding.memory_mb
                ));
            }
        }
        Ok(Some(guard))
    }

    /// Creates and starts a sandbox.
    pub async fn create(&self, request: CreateSandboxRequest) -> Result<Sandbox, ApiFailure> {
        let resources = self.check_create(&request)?;
        let deadline = request.timeout_s.map(deadline_in).transpose()?;
        let image_name = request.image.clone().unwrap_or_else(|| "base".to_string());
        let image = self.image(&image_name).await?;
        let tenant = current_tenant();
        let adding = Usage {
            sandboxes: 1,
            ..Usage::live(1, &resources)
        };
        let admitted = self.admit(&tenant, adding, None).await?;
        let id = ids::sandbox_id();
        let name = request.name.clone().unwrap_or_else(|| id.clone());
        let now = Utc::now();
        let sandbox = Sandbox {
            id: id.clone(),
            name: name.clone(),
            image: image_name.clone(),
            image_digest: image.digest,
            isolation: request.isolation.unwrap_or(Isolation::Container),
            state: SandboxState::Creating,
            state_reason: StateReason::Requested,
            state_message: "a client asked for this sandbox".into(),
            labels: request.labels,
            env: request.env.clone(),
            resources,
            oom_kills: 0,
            deadline,
            on_deadline: request.on_deadline.unwrap_or_default(),
            lifecycle: check_lifecycle(request.lifecycle.unwrap_or_default())?,
            parent: None,
            network: request.network.clone().unwrap_or_default(),
            address: None,
            preview: request.preview.clone().unwrap_or_default(),
            tenant,
            created_at: now,
            updated_at: now,
        };
        self.store.insert_sandbox(&sandbox).await?;
        drop(admitted);
        self.deadlines.schedule(&id, deadline);
        let spec = spec_of(&sandbox);
        // The runner's part and its record run to their end in a task of their own, so that a client that goes away
        // mid-create (a template's readiness check can take a while) leaves no sandbox stuck in `creating`.
        let (store, runner) = (self.store.clone(), self.runner.clone());
        tokio::spawn(async move {
            match runner.create_sandbox(spec).await {
                Ok(()) => {
                    let started = transition(CREATING, SandboxState::Running, StateReason::Requested, "started");
                    match store.transition(&id, started).await {
                        Ok(sandbox) => Ok(sandbox),
                        Err(error) => {
                            // The record changed under us (a delete while creating): remove what the runner built.
                            let _ = runner.delete_sandbox(&id).await;
                            Err(
                                ApiFailure::conflict(format!("sandbox {id} was deleted while it was being created"))
                                    .with_reason(&error),
                            )
                        }
                    }
                }
                Err(error) => {
                    let message = crate::error::chain(&error);
                    let failed = transition(CREATING, SandboxState::Error, StateReason::CreateFailed, &message);
                    let _ = store.transition(&id, failed).await;
                    Err(ApiFailure::from(error))
                }
            }
        })
        .await
        .expect("creating a sandbox does not panic")
    }

    /// Finds a sandbox by id or name, among those the caller may see ([`Caller::current`]): another tenant's
    /// sandbox is "not found", exactly as one that does not exist.
    pub async fn resolve(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let caller = Caller::current();
        let found = if is_sandbox_id(key) {
            self.store.sandbox(key).await?
        } else if check_sandbox_name(key).is_ok() {
            self.store.sandbox_by_name(&current_tenant(), key).await?
        } else {
            return Err(ApiFailure::invalid(format!(
                "{key:?} is neither a sandbox id nor a valid sandbox name"
            )));
        };
        found
            .filter(|sandbox| {
                caller
                    .as_ref()
                    .is_none_or(|caller| caller.sees(&sandbox.tenant, &sandbox.id))
            })
            .ok_or_else(|| ApiFailure::not_found(format!("no sandbox has the id or name {key:?}")))
    }

    /// The sandbox with its address filled in while it has one (an in-memory lookup on the runner).
    pub async fn with_address(&self, mut sandbox: Sandbox) -> Sandbox {
        if matches!(sandbox.state, SandboxState::Running | SandboxState::Paused) {
            sandbox.address = self
                .runner
                .address(&sandbox.id)
                .await
                .map(|address| address.to_string());
        }
        sandbox
    }

    /// Lists sandboxes matching a filter.
    pub async fn list(&self, filter: &SandboxFilter) -> Result<Vec<Sandbox>, ApiFailure> {
        let all = self.store.sandboxes().await?;
        let caller = Caller::current();
        Ok(all
            .into_iter()
            .filter(|sandbox| {
                caller
                    .as_ref()
                    .is_none_or(|caller| caller.sees(&sandbox.tenant, &sandbox.id))
            })
            .filter(|sandbox| filter.state.is_none_or(|state| sandbox.state == state))
            .filter(|sandbox| filter.labels.iter().all(|(k, v)| sandbox.labels.get(k) == Some(v)))
            .collect())
    }

    /// Stops a running sandbox; its files stay.
    pub async fn stop(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        match sandbox.state {
            SandboxState::Stopped => return Ok(sandbox),
            SandboxState::Running | SandboxState::Paused => {}
            other => {
                return Err(ApiFailure::conflict(format!(
                    "sandbox {} is {other} and cannot be stopped",
                    sandbox.name
                )))
            }
        }
        self.stop_running(&sandbox.id, StateReason::Requested, "stopped by a client")
            .await
    }

    /// Stops a running or paused sandbox's processes and records the stop with `reason`.
    async fn stop_running(&self, id: &str, reason: StateReason, message: &str) -> Result<Sandbox, ApiFailure> {
        self.runner.stop_sandbox(id).await?;
        let stopped = transition(LIVE, SandboxState::Stopped, reason, message);
        Ok(self.store.transition(id, stopped).await?)
    }

    /// Pauses a running sandbox: its processes are frozen where they are and use no CPU; its memory stays. Pausing
    /// a paused sandbox answers it as it is.
    pub async fn pause(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        self.set_paused(key, true).await
    }

    /// Resumes a paused sandbox: its processes continue where they were. Resuming a running sandbox answers it as it
    /// is.
    pub async fn resume(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        self.set_paused(key, false).await
    }

    /// Pauses (`true`) or resumes a sandbox and records the change.
    async fn set_paused(&self, key: &str, pause: bool) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        let (from, to, message, refusal) = if pause {
            (
                RUNNING,
                SandboxState::Paused,
                "paused by a client",
                "only a running sandbox can be paused",
            )
        } else {
            (
                PAUSED,
                SandboxState::Running,
                "resumed by a client",
                "only a paused sandbox can be resumed (start a stopped one)",
            )
        };
        if sandbox.state == to {
            return Ok(sandbox);
        }
        if !from.contains(&sandbox.state) {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is {}; {refusal}",
                sandbox.name, sandbox.state
            )));
        }
        if pause {
            self.runner.pause_sandbox(&sandbox.id).await?;
        } else {
            self.runner.resume_sandbox(&sandbox.id).await?;
        }
        let change = transition(from, to, StateReason::Requested, message);
        Ok(self.store.transition(&sandbox.id, change).await?)
    }

    /// Changes a sandbox's limits: the fields given, the others kept (`disk_mb: 0` removes its disk quota). A running
    /// or paused sandbox gets them at once, without a restart; going below what it uses now is refused.
    pub async fn update_resources(&self, key: &str, request: nook_api::ResourceRequest) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        if !matches!(
            sandbox.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Stopped
        ) {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is {} and cannot be resized",
                sandbox.name, sandbox.state
            )));
        }
        let old = sandbox.resources;
        let new = Resources {
            cpu: request.cpu.unwrap_or(old.cpu),
            memory_mb: request.memory_mb.unwrap_or(old.memory_mb),
            memory_max_mb: match request.memory_max_mb {
                Some(0) => None,
                Some(ceiling) => Some(ceiling),
                None => old.memory_max_mb,
            },
            pids: request.pids.unwrap_or(old.pids),
            disk_mb: match request.disk_mb {
                Some(0) => None,
                Some(disk) => Some(disk),
                None => old.disk_mb,
            },
        };
        self.check_resources(&new)?;
        if new == old {
            return Ok(sandbox);
        }
        // A live sandbox's new limits count against its tenant's quota (in place of its old ones).
        let _admitted = if matches!(sandbox.state, SandboxState::Running | SandboxState::Paused) {
            self.admit(&sandbox.tenant, Usage::live(1, &new), Some(&sandbox.id))
                .await?
        } else {
            None
        };
        self.runner.update_resources(&sandbox.id, new).await?;
        let message = describe_resize(&old, &new);
        Ok(self
            .store
            .note(
                &sandbox.id,
                StateReason::Resized,
                &message,
                Change {
                    resources: Some(new),
                    ..Change::default()
                },
            )
            .await?)
    }

    /// Sets a sandbox's network policy: a running or paused sandbox's is in force at once (a switch to or from
    /// `none` removes or adds its interface); a stopped one's at its next start.
    pub async fn set_network(&self, key: &str, policy: nook_api::NetworkPolicy) -> Result<Sandbox, ApiFailure> {
        policy.check().map_err(ApiFailure::invalid)?;
        let sandbox = self.resolve(key).await?;
        if !matches!(
            sandbox.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Stopped | SandboxState::Archived
        ) {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is {}; its network policy cannot change now",
                sandbox.name, sandbox.state
            )));
        }
        if policy == sandbox.network {
            return Ok(sandbox);
        }
        if sandbox.state != SandboxState::Archived {
            self.runner.update_network(&sandbox.id, policy.clone()).await?;
        }
        let message = format!("network policy: {}", policy.summary());
        let change = Change {
            network: Some(policy),
            ..Change::default()
        };
        Ok(self
            .store
            .note(&sandbox.id, StateReason::NetworkChanged, &message, change)
            .await?)
    }

    /// Makes image `request.image` from a sandbox's files (a running one is frozen for the moment of the capture).
    pub async fn snapshot(&self, key: &str, request: nook_api::SnapshotRequest) -> Result<nook_api::Image, ApiFailure> {
        check_image_name(&request.image).map_err(ApiFailure::invalid)?;
        let sandbox = self.resolve(key).await?;
        if !matches!(
            sandbox.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Stopped
        ) {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is {}; only a running, paused or stopped sandbox can be snapshotted",
                sandbox.name, sandbox.state
            )));
        }
        self.claim_image_name(&request.image).await?;
        let image = self.runner.snapshot_sandbox(&sandbox.id, &request.image).await?;
        self.record_image(&image.name, &sandbox.tenant).await?;
        let message = format!("snapshot taken as image {} ({})", image.name, image.digest);
        self.store
            .note(&sandbox.id, StateReason::Snapshotted, &message, Change::default())
            .await?;
        Ok(image)
    }

    /// Makes `count` new sandboxes from a sandbox's files as they are now (copy-on-write), each started and
    /// independent afterwards; the source goes on (frozen only while its files are copied). All are made or none.
    pub async fn fork(&self, key: &str, request: nook_api::ForkRequest) -> Result<nook_api::ForkResult, ApiFailure> {
        let count = request.count.unwrap_or(request.names.len().max(1) as u32);
        if count == 0 || count > MAX_FORKS {
            return Err(ApiFailure::invalid(format!(
                "count {count} is out of range: one request makes 1 to {MAX_FORKS} forks"
            )));
        }
        if !request.names.is_empty() && request.names.len() != count as usize {
            return Err(ApiFailure::invalid(format!(
                "{} names were given for {count} forks; give one per fork, or none",
                request.names.len()
            )));
        }
        for name in &request.names {
            check_sandbox_name(name).map_err(ApiFailure::invalid)?;
        }
        let deadline = request.timeout_s.map(deadline_in).transpose()?;
        if let Some(labels) = &request.labels {
            check_labels(labels)?;
        }
        let source = self.resolve(key).await?;
        if !matches!(
            source.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Stopped
        ) {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is {}; only a running, paused or stopped sandbox can be forked",
                source.name, source.state
            )));
        }
        let message = format!("forked from {} ({})", source.name, source.id);
        let adding = Usage {
            sandboxes: u64::from(count),
            ..Usage::live(u64::from(count), &source.resources)
        };
        let admitted = self.admit(&source.tenant, adding, None).await?;
        let now = Utc::now();
        let mut forks: Vec<Sandbox> = Vec::new();
        for index in 0..count as usize {
            let id = ids::sandbox_id();
            let fork = Sandbox {
                name: request.names.get(index).cloned().unwrap_or_else(|| id.clone()),
                id,
                image: source.image.clone(),
                image_digest: source.image_digest.clone(),
                isolation: source.isolation,
                state: SandboxState::Creating,
                state_reason: StateReason::Forked,
                state_message: message.clone(),
                labels: request.labels.clone().unwrap_or_else(|| source.labels.clone()),
                env: source.env.clone(),
                resources: source.resources,
                oom_kills: 0,
                deadline,
                on_deadline: request.on_deadline.unwrap_or_default(),
                lifecycle: source.lifecycle,
                parent: Some(source.id.clone()),
                network: source.network.clone(),
                address: None,
                preview: source.preview.clone(),
                tenant: source.tenant.clone(),
                created_at: now,
                updated_at: now,
            };
            if let Err(error) = self.store.insert_sandbox(&fork).await {
                for made in &forks {
                    let _ = self.store.delete_sandbox(&made.id).await;
                }
                return Err(error.into());
            }
            self.deadlines.schedule(&fork.id, deadline);
            forks.push(fork);
        }
        drop(admitted);
        let specs: Vec<SandboxSpec> = forks.iter().map(spec_of).collect();
        // To its end and recorded even if the client goes away, as for a create.
        let (store, runner) = (self.store.clone(), self.runner.clone());
        let source_id = source.id.clone();
        tokio::spawn(async move {
            match runner.fork_sandbox(&source_id, specs).await {
                Ok(frozen) => {
                    let mut sandboxes = Vec::new();
                    for fork in &forks {
                        let started = transition(CREATING, SandboxState::Running, StateReason::Forked, &message);
                        match store.transition(&fork.id, started).await {
                            Ok(sandbox) => sandboxes.push(sandbox),
                            // Deleted while it was being made (as in a create): what the runner built goes too, and
                            // the other forks are recorded all the same.
                            Err(error) => {
                                tracing::warn!(sandbox = %fork.id, error = %crate::error::chain(&error), "a fork changed while it was made");
                                let _ = runner.delete_sandbox(&fork.id).await;
                            }
                        }
                    }
                    let names: Vec<&str> = forks.iter().map(|fork| fork.name.as_str()).collect();
                    let note = format!("forked into {}", names.join(", "));
                    let _ = store
                        .note(&source_id, StateReason::Forked, &note, Change::default())
                        .await;
                    Ok(nook_api::ForkResult {
                        sandboxes,
                        frozen_us: frozen.as_micros() as u64,
                    })
                }
                Err(error) => {
                    let reason = crate::error::chain(&error);
                    for fork in &forks {
                        let failed = transition(CREATING, SandboxState::Error, StateReason::CreateFailed, &reason);
                        let _ = store.transition(&fork.id, failed).await;
                    }
                    Err(ApiFailure::from(error))
                }
            }
        })
        .await
        .expect("forking does not panic")
    }

    /// Moves a stopped sandbox's writable layer to the archive store, freeing its local disk; starting it brings the
    /// layer back. Archiving an archived sandbox answers it as it is.
    pub async fn archive(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        match sandbox.state {
            SandboxState::Archived => return Ok(sandbox),
            SandboxState::Stopped => {}
            other => {
                return Err(ApiFailure::conflict(format!(
                    "sandbox {} is {other}; stop it before archiving it",
                    sandbox.name
                )))
            }
        }
        self.archive_stopped(&sandbox.id, StateReason::Requested, "archived")
            .await
    }

    /// Archives a stopped sandbox and records it, the event's message starting with `what`.
    async fn archive_stopped(&self, id: &str, reason: StateReason, what: &str) -> Result<Sandbox, ApiFailure> {
        let archived = self.runner.archive_sandbox(id).await?;
        let message = format!(
            "{what}: its writable layer ({:.1} MiB compressed, {}) is in the archive store; start it to bring it back",
            archived.bytes as f64 / (1 << 20) as f64,
            archived.sha256
        );
        let change = transition(STOPPED, SandboxState::Archived, reason, &message);
        Ok(self.store.transition(id, change).await?)
    }

    /// Starts a stopped sandbox.
    pub async fn start(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        let from = match sandbox.state {
            SandboxState::Running => return Ok(sandbox),
            SandboxState::Stopped => STOPPED,
            // Its writable layer comes back from the archive first.
            SandboxState::Archived => ARCHIVED,
            other => {
                return Err(ApiFailure::conflict(format!(
                    "sandbox {} is {other} and cannot be started",
                    sandbox.name
                )))
            }
        };
        // Its own record is left out of the count: a second start racing this one does not count it twice.
        let admitted = self
            .admit(&sandbox.tenant, Usage::live(1, &sandbox.resources), Some(&sandbox.id))
            .await?;
        let message = if from == ARCHIVED {
            "restored from its archive and started by a client"
        } else {
            "started by a client"
        };
        // As for a create: to its end and recorded even if the client goes away.
        let (store, runner) = (self.store.clone(), self.runner.clone());
        tokio::spawn(async move {
            // A quota's lock is held until the started sandbox is recorded running.
            let _admitted = admitted;
            match runner.start_sandbox(&sandbox.id).await {
                Ok(()) | Err(RunnerError::AlreadyRunning(_)) => {
                    let started = transition(from, SandboxState::Running, StateReason::Requested, message);
                    Ok(store.transition(&sandbox.id, started).await?)
                }
                Err(error) => {
                    let message = crate::error::chain(&error);
                    // A failed restore leaves it archived; once restored, a failed boot leaves it stopped.
                    let state = match error {
                        RunnerError::Archive(_) => sandbox.state,
                        _ => SandboxState::Stopped,
                    };
                    let failed = transition(from, state, StateReason::StartFailed, &message);
                    let _ = store.transition(&sandbox.id, failed).await;
                    Err(ApiFailure::from(error))
                }
            }
        })
        .await
        .expect("starting a sandbox does not panic")
    }

    /// Deletes a sandbox and all its files, whatever its state (except while it is still being created).
    pub async fn delete(&self, key: &str) -> Result<(), ApiFailure> {
        let sandbox = self.resolve(key).await?;
        if sandbox.state == SandboxState::Creating {
            return Err(ApiFailure::conflict(format!(
                "sandbox {} is still being created; delete it once it is running or has failed",
                sandbox.name
            )));
        }
        self.runner.delete_sandbox(&sandbox.id).await?;
        self.store.delete_sandbox(&sandbox.id).await?;
        self.deadlines.schedule(&sandbox.id, None);
        self.lifecycles.forget(&sandbox.id);
        Ok(())
    }

    /// Sets a sandbox's deadline to `timeout_s` seconds from now, or removes it (`None`); `on_deadline` changes what
    /// it does (kept when `None`).
    pub async fn set_deadline(
        &self,
        key: &str,
        timeout_s: Option<u64>,
        on_deadline: Option<DeadlineAction>,
    ) -> Result<Sandbox, ApiFailure> {
        let deadline = timeout_s.map(deadline_in).transpose()?;
        let sandbox = self.resolve(key).await?;
        let action = on_deadline.unwrap_or(sandbox.on_deadline);
        let updated = self.store.set_deadline(&sandbox.id, deadline, action).await?;
        self.deadlines.schedule(&sandbox.id, deadline);
        Ok(updated)
    }

    /// Sets a sandbox's lifecycle policy: the fields given (0 turns one off), the others kept.
    pub async fn set_lifecycle(&self, key: &str, request: nook_api::Lifecycle) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        let merge = |new: Option<u64>, old: Option<u64>| match new {
            Some(0) => None,
            Some(seconds) => Some(seconds),
            None => old,
        };
        let lifecycle = check_lifecycle(nook_api::Lifecycle {
            idle_stop_s: merge(request.idle_stop_s, sandbox.lifecycle.idle_stop_s),
            stopped_delete_s: merge(request.stopped_delete_s, sandbox.lifecycle.stopped_delete_s),
            stopped_archive_s: merge(request.stopped_archive_s, sandbox.lifecycle.stopped_archive_s),
        })?;
        // The store's change notice re-plans the sandbox's checks.
        Ok(self.store.set_lifecycle(&sandbox.id, lifecycle).await?)
    }

    /// Plans every sandbox's lifecycle checks and keeps them planned: a sandbox's next check is planned again each
    /// time the store says its record changed, and each check acts or plans the next.
    pub async fn keep_lifecycles(self: &Arc<Self>) -> Result<(), ApiFailure> {
        let mut changes = self.store.subscribe();
        for sandbox in self.store.sandboxes().await? {
            self.plan_lifecycle(&sandbox);
        }
        let control = self.clone();
        tokio::spawn(async move {
            loop {
                match changes.recv().await {
                    Ok(id) => match control.store.sandbox(&id).await {
                        Ok(Some(sandbox)) => control.plan_lifecycle(&sandbox),
                        Ok(None) => control.lifecycles.forget(&id),
                        Err(_) => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if let Ok(sandboxes) = control.store.sandboxes().await {
                            for sandbox in sandboxes {
                                control.plan_lifecycle(&sandbox);
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let control = self.clone();
        tokio::spawn(async move {
            let acting = control.clone();
            control
                .lifecycles
                .timer
                .run(move |id| {
                    let control = acting.clone();
                    tokio::spawn(async move { control.lifecycle_due(&id).await });
                    std::future::ready(())
                })
                .await
        });
        Ok(())
    }

    /// When a sandbox's lifecycle policy next needs a look, from its record and its last activity.
    fn plan_lifecycle(&self, sandbox: &Sandbox) {
        let seconds = |s: u64| chrono::Duration::seconds(s.min(MAX_TIMEOUT_S) as i64);
        let next = match sandbox.state {
            SandboxState::Running => sandbox.lifecycle.idle_stop_s.map(|idle| {
                let last = self
                    .lifecycles
                    .last_call(&sandbox.id)
                    .map_or(sandbox.updated_at, |call| call.max(sandbox.updated_at));
                last + seconds(idle)
            }),
            SandboxState::Stopped => [sandbox.lifecycle.stopped_delete_s, sandbox.lifecycle.stopped_archive_s]
                .into_iter()
                .flatten()
                .min()
                .map(|after| sandbox.updated_at + seconds(after)),
            // Counted from the stop before the archive, which only the events know: the check finds it and plans
            // the delete.
            SandboxState::Archived => sandbox.lifecycle.stopped_delete_s.map(|_| sandbox.updated_at),
            _ => None,
        };
        self.lifecycles.timer.schedule(&sandbox.id, next);
    }

    /// When a stopped or archived sandbox stopped: its last change of state, or for an archived one (archiving is a
    /// change of state too) the stop before it, from its events.
    async fn stopped_since(&self, sandbox: &Sandbox) -> chrono::DateTime<Utc> {
        if sandbox.state != SandboxState::Archived {
            return sandbox.updated_at;
        }
        self.store
            .events(&sandbox.id)
            .await
            .ok()
            .and_then(|events| {
                events
                    .iter()
                    .rev()
                    .find(|event| {
                        event.to_state == SandboxState::Stopped && event.from_state != Some(SandboxState::Stopped)
                    })
                    .map(|event| event.at)
            })
            .unwrap_or(sandbox.updated_at)
    }

    /// A sandbox's lifecycle check: stops it when idle, deletes it when stopped long enough, or plans the next look.
    pub async fn lifecycle_due(&self, id: &str) {
        let Ok(Some(sandbox)) = self.store.sandbox(id).await else {
            return;
        };
        let now = Utc::now();
        match (sandbox.state, sandbox.lifecycle) {
            (
                SandboxState::Running,
                nook_api::Lifecycle {
                    idle_stop_s: Some(idle),
                    ..
                },
            ) => {
                let idle = chrono::Duration::seconds(idle.min(MAX_TIMEOUT_S) as i64);
                let last = self
                    .lifecycles
                    .last_call(id)
                    .map_or(sandbox.updated_at, |call| call.max(sandbox.updated_at));
                if now < last + idle {
                    self.lifecycles.timer.schedule(id, Some(last + idle));
                    return;
                }
                // No call for the whole window: busy only if its processes worked. The first look takes a reading
                // and looks again a little later.
                let cpu = match self.runner.cpu_time(id).await {
                    Ok(cpu) => cpu,
                    Err(error) => {
                        // Stopped meanwhile (the store's notice re-plans it), or a read that failed: look again.
                        tracing::debug!(sandbox = %id, error = %crate::error::chain(&error), "no CPU reading");
                        self.lifecycles.timer.schedule(id, Some(now + DEADLINE_RETRY));
                        return;
                    }
                };
                match self.lifecycles.cpu_since_last(id, now, cpu) {
                    None => {
                        let window = idle.min(crate::lifecycle::CPU_WINDOW);
                        self.lifecycles.timer.schedule(id, Some(now + window));
                    }
                    Some(cores) if cores >= crate::lifecycle::BUSY_CPU => {
                        self.lifecycles
                            .timer
                            .schedule(id, Some(now + idle.min(crate::lifecycle::CPU_WINDOW)));
                    }
                    Some(cores) => {
                        let message = format!(
                            "stopped after {} s without activity (no API call working on it, {:.1}% of a core used \
                             meanwhile); its files are kept, start it to go on",
                            idle.num_seconds(),
                            cores * 100.0
                        );
                        if let Err(failure) = self.stop_running(id, StateReason::Idle, &message).await {
                            tracing::warn!(sandbox = %id, message = %failure.message, "an idle stop failed");
                        } else {
                            tracing::info!(sandbox = %id, "stopped an idle sandbox");
                        }
                    }
                }
            }
            (
                SandboxState::Stopped,
                nook_api::Lifecycle {
                    stopped_archive_s: Some(after),
                    stopped_delete_s,
                    ..
                },
            ) if stopped_delete_s.is_none_or(|delete| after < delete) => {
                let due = sandbox.updated_at + chrono::Duration::seconds(after.min(MAX_TIMEOUT_S) as i64);
                if now < due {
                    self.lifecycles.timer.schedule(id, Some(due));
                    return;
                }
                let what = format!("archived after {after} s stopped");
                if let Err(failure) = self.archive_stopped(id, StateReason::AutoArchived, &what).await {
                    tracing::warn!(sandbox = %id, message = %failure.message, "a lifecycle archive failed");
                    self.lifecycles.timer.schedule(id, Some(now + DEADLINE_RETRY));
                }
            }
            (
                SandboxState::Stopped | SandboxState::Archived,
                nook_api::Lifecycle {
                    stopped_delete_s: Some(after),
                    ..
                },
            ) => {
                let due =
                    self.stopped_since(&sandbox).await + chrono::Duration::seconds(after.min(MAX_TIMEOUT_S) as i64);
                if now < due {
                    self.lifecycles.timer.schedule(id, Some(due));
                    return;
                }
                match self.delete(id).await {
                    Ok(()) => {
                        tracing::info!(sandbox = %id, stopped_for_s = after, "deleted a sandbox stopped past its lifecycle")
                    }
                    Err(failure) => {
                        tracing::warn!(sandbox = %id, message = %failure.message, "a lifecycle delete failed");
                        self.lifecycles.timer.schedule(id, Some(now + DEADLINE_RETRY));
                    }
                }
            }
            _ => {}
        }
    }

    /// Schedules the stored deadlines and acts on them as they pass, from now on (those already passed at once).
    pub async fn keep_deadlines(self: &Arc<Self>) -> Result<(), ApiFailure> {
        for sandbox in self.store.sandboxes().await? {
            self.deadlines.schedule(&sandbox.id, sandbox.deadline);
        }
        let control = self.clone();
        tokio::spawn(async move {
            let acting = control.clone();
            control
                .deadlines
                .run(move |id| {
                    // Each on its own task: a slow delete does not hold back the next deadline.
                    let control = acting.clone();
                    tokio::spawn(async move { control.deadline_passed(&id).await });
                    std::future::ready(())
                })
                .await
        });
        Ok(())
    }

    /// Acts on a sandbox whose deadline the timer says has passed: deletes it, or stops it with its files kept
    /// (recorded with the reason `deadline_passed`), and clears the deadline. A deadline moved meanwhile is
    /// rescheduled instead; one that cannot act yet is tried again shortly.
    pub async fn deadline_passed(&self, id: &str) {
        let sandbox = match self.store.sandbox(id).await {
            Ok(Some(sandbox)) => sandbox,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(sandbox = %id, error = %crate::error::chain(&error), "reading a sandbox whose deadline passed failed");
                self.deadlines.schedule(id, Some(Utc::now() + DEADLINE_RETRY));
                return;
            }
        };
        let Some(deadline) = sandbox.deadline else { return };
        if deadline > Utc::now() {
            self.deadlines.schedule(id, Some(deadline));
            return;
        }
        let acted = match sandbox.on_deadline {
            DeadlineAction::Delete => self.delete(id).await,
            DeadlineAction::Stop => self.stop_at_deadline(&sandbox).await,
        };
        match acted {
            Ok(()) => {
                tracing::info!(sandbox = %id, action = sandbox.on_deadline.as_str(), "the sandbox's deadline passed")
            }
            Err(failure) => {
                tracing::warn!(sandbox = %id, message = %failure.message, "a passed deadline could not act yet");
                self.deadlines.schedule(id, Some(Utc::now() + DEADLINE_RETRY));
            }
        }
    }

    async fn stop_at_deadline(&self, sandbox: &Sandbox) -> Result<(), ApiFailure> {
        match sandbox.state {
            SandboxState::Running | SandboxState::Paused => {
                let message = "its deadline passed: stopped, with its files kept; start it to go on";
                self.stop_running(&sandbox.id, StateReason::DeadlinePassed, message)
                    .await?;
            }
            SandboxState::Creating => {
                return Err(ApiFailure::conflict("the sandbox is still being created"));
            }
            // Not running: nothing to stop.
            _ => {}
        }
        self.store.set_deadline(&sandbox.id, None, sandbox.on_deadline).await?;
        Ok(())
    }

    /// Starts a process in a running sandbox. `stdin` text, if any, is written and closed at once.
    pub async fn exec(&self, key: &str, request: ExecRequest) -> Result<ExecStream, ApiFailure> {
        if request.pty.is_some() || request.output_buffer_bytes.is_some() {
            return Err(ApiFailure::invalid(
                "`pty` and `output_buffer_bytes` apply to background processes: POST .../processes, then attach",
            ));
        }
        let options = check_exec(&request)?;
        let sandbox = self.running(key).await?;
        let stream = self.runner.exec(&sandbox.id, options).await?;
        if let Some(stdin) = request.stdin {
            let _ = stream.input.send(ExecInput::Stdin(stdin.into_bytes())).await;
            let _ = stream.input.send(ExecInput::CloseStdin).await;
        }
        Ok(stream)
    }

    /// The sandbox if it is running (processes exist only in running sandboxes).
    async fn running(&self, key: &str) -> Result<Sandbox, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        if sandbox.state == SandboxState::Paused {
            return Err(ApiFailure::new(
                axum::http::StatusCode::CONFLICT,
                "paused",
                format!("sandbox {} is paused; resume it before running commands", sandbox.name),
            ));
        }
        if sandbox.state != SandboxState::Running {
            return Err(ApiFailure::new(
                axum::http::StatusCode::CONFLICT,
                "not_running",
                format!(
                    "sandbox {} is {}; start it before running commands",
                    sandbox.name, sandbox.state
                ),
            ));
        }
        self.lifecycles.touch(&sandbox.id);
        Ok(sandbox)
    }

    /// What a running sandbox uses now (CPU time, memory, processes, disk of its writable layer).
    pub async fn stats(&self, key: &str) -> Result<nook_api::SandboxStats, ApiFailure> {
        let sandbox = self.resolve(key).await?;
        if !LIVE.contains(&sandbox.state) {
            return Err(ApiFailure::new(
                axum::http::StatusCode::CONFLICT,
                "not_running",
                format!("sandbox {} is {}; it uses nothing", sandbox.name, sandbox.state),
            ));
        }
        Ok(self.runner.stats(&sandbox.id).await?)
    }

    /// Starts a background process; `stdin` text, if any, is written and the pipe stays open for more.
    pub async fn spawn(&self, key: &str, request: ExecRequest) -> Result<ProcessInfo, ApiFailure> {
        let mut options = check_exec(&request)?;
        if options.timeout_ms.is_some() {
            return Err(ApiFailure::invalid(
                "timeout_ms applies to exec; signal a background process to end it",
            ));
        }
        options.stdin = true;
        let sandbox = self.running(key).await?;
        let command = options.argv.clone();
        let terminal = options.pty.is_some();
        let pid = self.runner.spawn(&sandbox.id, options).await?;
        if let Some(stdin) = request.stdin {
            self.runner.input(&sandbox.id, pid, stdin.into_bytes(), false).await?;
        }
        Ok(ProcessInfo {
            pid,
            command,
            started_at: Utc::now(),
            output_bytes: 0,
            running: true,
            terminal,
            exit: None,
        })
    }

    /// The sandbox's background processes.
    pub async fn processes(&self, key: &str) -> Result<Vec<ProcessInfo>, ApiFailure> {
        let sandbox = self.running(key).await?;
        let processes = self.runner.processes(&sandbox.id).await?;
        Ok(processes
            .into_iter()
            .map(|process| ProcessInfo {
                pid: process.pid,
                command: process.argv,
                started_at: chrono::DateTime::from_timestamp_millis(process.started_at_ms as i64).unwrap_or_default(),
                output_bytes: process.output_bytes,
                running: process.exit.is_none(),
                terminal: process.terminal,
                exit: process.exit.map(exit_status),
            })
            .collect())
    }

    /// Streams a background process's output from `offset`.
    pub async fn attach(&self, key: &str, pid: u32, offset: u64, follow: bool) -> Result<ExecStream, ApiFailure> {
        self.attach_with(key, pid, offset, follow, false).await
    }

    /// Follows a background process's output from `offset` without ever missing a byte: while this reader lags a
    /// whole replay buffer behind, the process is held back (it blocks writing its output) instead of the buffer
    /// dropping what the reader has not been sent. For clients that expect a pipe's semantics (E2B's envd).
    pub async fn follow_held(&self, key: &str, pid: u32, offset: u64) -> Result<ExecStream, ApiFailure> {
        self.attach_with(key, pid, offset, true, true).await
    }

    async fn attach_with(
        &self,
        key: &str,
        pid: u32,
        offset: u64,
        follow: bool,
        hold: bool,
    ) -> Result<ExecStream, ApiFailure> {
        let sandbox = self.running(key).await?;
        let mut stream = self.runner.attach(&sandbox.id, pid, offset, follow, hold).await?;
        // An unknown pid is answered with an error as the first item: turn it into an HTTP error.
        match stream.events.recv().await {
            Some(ExecOutput::Error { code, message }) => Err(process_failure(code, message)),
            Some(first) => {
                let (sender, events) = tokio::sync::mpsc::channel(64);
                let _ = sender.try_send(first);
                let input = stream.input.clone();
                tokio::spawn(async move {
                    while let Some(event) = stream.events.recv().await {
                        if sender.send(event).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(nook_runner::exec_stream(events, input))
            }
            None => Err(process_failure(
                "agent_disconnected".into(),
                "the agent closed the stream".into(),
            )),
        }
    }

    /// Waits until a background process ends.
    pub async fn wait(&self, key: &str, pid: u32) -> Result<ExitStatus, ApiFailure> {
        let sandbox = self.running(key).await?;
        Ok(exit_status(self.runner.wait(&sandbox.id, pid).await?))
    }

    /// Writes to a background process's standard input.
    pub async fn input(&self, key: &str, pid: u32, data: Vec<u8>, close: bool) -> Result<(), ApiFailure> {
        if data.len() > MAX_EXEC_STDIN {
            return Err(ApiFailure::invalid(format!(
                "send at most {MAX_EXEC_STDIN} bytes of input per request"
            )));
        }
        let sandbox = self.running(key).await?;
        Ok(self.runner.input(&sandbox.id, pid, data, close).await?)
    }

    /// Resizes a background process's terminal.
    pub async fn resize(&self, key: &str, pid: u32, size: nook_api::PtySize) -> Result<(), ApiFailure> {
        check_pty_size(size)?;
        let sandbox = self.running(key).await?;
        let size = nook_agent_proto::PtySize {
            cols: size.cols,
            rows: size.rows,
        };
        Ok(self.runner.resize(&sandbox.id, pid, size).await?)
    }

    /// Signals a background process.
    pub async fn signal(&self, key: &str, pid: u32, signal: i32) -> Result<(), ApiFailure> {
        if !(1..=64).contains(&signal) {
            return Err(ApiFailure::invalid(format!(
                "signal {signal} is not a signal number (1 to 64)"
            )));
        }
        let sandbox = self.running(key).await?;
        Ok(self.runner.signal(&sandbox.id, pid, signal).await?)
    }

    /// Reads a file: its metadata and its bytes as a stream.
    pub async fn read_file(
        &self,
        key: &str,
        path: &str,
    ) -> Result<(FileInfo, nook_runner::agent_client::FileChunks), ApiFailure> {
        let sandbox = self.running(key).await?;
        let (stat, chunks) = self.runner.read_file(&sandbox.id, path).await?;
        Ok((file_info(stat), chunks))
    }

    /// Writes a file from a stream.
    pub async fn write_file(
        &self,
        key: &str,
        path: &str,
        mode: Option<u32>,
        parents: bool,
        owner: Option<(u32, u32)>,
        body: nook_runner::ByteStream,
    ) -> Result<FileInfo, ApiFailure> {
        let write = nook_agent_proto::FileWrite {
            path: path.to_string(),
            mode,
            parents,
            owner,
            metadata: None,
        };
        Ok(file_info(self.write_file_with(key, write, body).await?))
    }

    /// Writes a file from a stream as `write` says, user metadata included; answers with the agent's stat of the
    /// written file (which carries the metadata read back from it).
    pub async fn write_file_with(
        &self,
        key: &str,
        write: nook_agent_proto::FileWrite,
        body: nook_runner::ByteStream,
    ) -> Result<nook_agent_proto::FileStat, ApiFailure> {
        if write.mode.is_some_and(|mode| mode > 0o7777) {
            return Err(ApiFailure::invalid("mode must be permission bits (at most 0o7777)"));
        }
        if let Some(Err(message)) = write.metadata.as_ref().map(nook_agent_proto::check_metadata) {
            return Err(ApiFailure::invalid(message));
        }
        let sandbox = self.running(key).await?;
        Ok(self.runner.write_file(&sandbox.id, write, body).await?)
    }

    /// Packs a file or directory tree as a tar stream.
    pub async fn read_archive(
        &self,
        key: &str,
        path: &str,
    ) -> Result<(FileInfo, nook_runner::agent_client::FileChunks), ApiFailure> {
        let sandbox = self.running(key).await?;
        let (stat, chunks) = self.runner.read_archive(&sandbox.id, path).await?;
        Ok((file_info(stat), chunks))
    }

    /// Unpacks a tar stream into a directory.
    pub async fn write_archive(
        &self,
        key: &str,
        path: &str,
        parents: bool,
        owner: Option<(u32, u32)>,
        body: nook_runner::ByteStream,
    ) -> Result<nook_api::ArchiveResult, ApiFailure> {
        let sandbox = self.running(key).await?;
        let written = self
            .runner
            .write_archive(&sandbox.id, path, parents, owner, body)
            .await?;
        Ok(nook_api::ArchiveResult {
            entries: written.entries,
            bytes: written.bytes,
        })
    }

    /// Watches a directory until the receiver is dropped.
    pub async fn watch(
        &self,
        key: &str,
        path: &str,
        recursive: bool,
    ) -> Result<nook_runner::agent_client::WatchEvents, ApiFailure> {
        let sandbox = self.running(key).await?;
        Ok(self.runner.watch(&sandbox.id, path, recursive).await?)
    }

    /// A file operation with a JSON answer, decoded as `T`.
    pub async fn file_call<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        request: nook_agent_proto::Request,
    ) -> Result<T, ApiFailure> {
        let sandbox = self.running(key).await?;
        let value = self.runner.file_call(&sandbox.id, request).await?;
        serde_json::from_value(value).map_err(|error| ApiFailure::internal("the agent's answer did not parse", &error))
    }

    /// Brings the store in line with what the runner runs (after a restart of the server, or when runner events
    /// were missed).
    pub async fn reconcile(&self) -> Result<(), ApiFailure> {
        let running = self.runner.running_sandboxes().await;
        let sandboxes = self.store.sandboxes().await?;
        for sandbox in &sandboxes {
            let is_running = running.contains(&sandbox.id);
            let change = match (sandbox.state, is_running) {
                (SandboxState::Creating, _) => {
                    let _ = self.runner.delete_sandbox(&sandbox.id).await;
                    Some(transition(
                        CREATING,
                        SandboxState::Error,
                        StateReason::CreateFailed,
                        "the server stopped while this sandbox was being created; delete it and create it again",
                    ))
                }
                (SandboxState::Running | SandboxState::Paused, false) => Some(transition(
                    LIVE,
                    SandboxState::Stopped,
                    StateReason::LostOnRestart,
                    "the sandbox's processes were gone when the server looked (for example after a host reboot); \
                     its files are kept and it can be started again",
                )),
                (SandboxState::Stopped | SandboxState::Error, true) => {
                    let _ = self.runner.stop_sandbox(&sandbox.id).await;
                    None
                }
                _ => None,
            };
            if let Some(change) = change {
                match self.store.transition(&sandbox.id, change).await {
                    // Another request changed the sandbox meanwhile: its outcome stands.
                    Ok(_) | Err(StoreError::WrongState(_)) | Err(StoreError::NotFound) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        for id in running {
            if !sandboxes.iter().any(|sandbox| sandbox.id == id) {
                tracing::warn!(sandbox = %id, "removing a sandbox the store does not know");
                let _ = self.runner.delete_sandbox(&id).await;
            }
        }
        Ok(())
    }

    /// Records what the runner reports on its own: OOM kills and inits that exited.
    pub fn watch_runner(self: &Arc<Self>) {
        let control = self.clone();
        let mut events = self.runner.subscribe();
        tokio::spawn(async move {
            loop {
                let event = match events.recv().await {
                    Ok(event) => event,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "runner events were dropped; reconciling with the runner");
                        if let Err(failure) = control.reconcile().await {
                            tracing::error!(message = %failure.message, "reconciling with the runner failed");
                        }
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let result = match &event {
                    RunnerEvent::Oom {
                        sandbox_id,
                        oom_kills,
                        victim,
                    } => {
                        let (limit, ceiling) = match control.store.sandbox(sandbox_id).await {
                            Ok(Some(sandbox)) => (sandbox.resources.memory_mb, sandbox.resources.memory_max_mb),
                            _ => (0, None),
                        };
                        let process = victim
                            .as_deref()
                            .map_or_else(|| "a process".to_string(), |name| format!("the process {name:?}"));
                        let limit = match ceiling {
                            Some(ceiling) if ceiling <= limit => {
                                format!("{limit} MiB memory limit, the most its memory_max_mb lets it grow to")
                            }
                            _ => format!("{limit} MiB memory limit"),
                        };
                        let message = format!(
                            "the kernel killed {process}, which exceeded the sandbox's {limit} ({oom_kills} OOM \
                             kill(s) so far)"
                        );
                        control
                            .store
                            .note(
                                sandbox_id,
                                StateReason::Oom,
                                &message,
                                Change {
                                    oom_kills: Some(*oom_kills),
                                    ..Change::default()
                                },
                            )
                            .await
                            .map(|_| ())
                    }
                    RunnerEvent::MemoryGrown {
                        sandbox_id,
                        from_mb,
                        to_mb,
                        ceiling_mb,
                    } => {
                        let message = format!(
                            "the sandbox reached its {from_mb} MiB memory limit; raised to {to_mb} MiB instead of \
                             killing a process (it may grow up to {ceiling_mb} MiB)"
                        );
                        let change = Change {
                            memory_mb: Some(*to_mb),
                            ..Change::default()
                        };
                        match control
                            .store
                            .note(sandbox_id, StateReason::MemoryGrown, &message, change)
                            .await
                        {
                            Ok(_) | Err(StoreError::NotFound) => Ok(()),
                            Err(error) => Err(error),
                        }
                    }
                    RunnerEvent::InitExited { sandbox_id } => control
                        .store
                        .transition(
                            sandbox_id,
                            transition(
                                LIVE,
                                SandboxState::Stopped,
                                StateReason::InitExited,
                                "the sandbox's init process exited on its own; its files are kept",
                            ),
                        )
                        .await
                        .map(|_| ()),
                };
                if let Err(error) = result {
                    tracing::warn!(?event, error = %crate::error::chain(&error), "could not record a runner event");
                }
            }
        });
    }
}

const CREATING: &[SandboxState] = &[SandboxState::Creating];
const RUNNING: &[SandboxState] = &[SandboxState::Running];
const PAUSED: &[SandboxState] = &[SandboxState::Paused];
/// States in which a sandbox's processes exist (running, or frozen).
const LIVE: &[SandboxState] = &[SandboxState::Running, SandboxState::Paused];
const STOPPED: &[SandboxState] = &[SandboxState::Stopped];
const ARCHIVED: &[SandboxState] = &[SandboxState::Archived];

fn transition(from: &'static [SandboxState], to: SandboxState, reason: StateReason, message: &str) -> Transition {
    Transition {
        from,
        to,
        reason,
        message: message.to_string(),
    }
}

/// The API's form of the agent's file metadata.
pub fn file_info(stat: nook_agent_proto::FileStat) -> FileInfo {
    FileInfo {
        path: stat.path,
        name: stat.name,
        kind: match stat.kind {
            nook_agent_proto::FileKind::File => FileKind::File,
            nook_agent_proto::FileKind::Dir => FileKind::Dir,
            nook_agent_proto::FileKind::Symlink => FileKind::Symlink,
            nook_agent_proto::FileKind::Other => FileKind::Other,
        },
        size: stat.size,
        mode: stat.mode,
        uid: stat.uid,
        gid: stat.gid,
        modified_at: chrono::DateTime::from_timestamp_millis(stat.modified_ms).unwrap_or_default(),
        symlink_target: stat.symlink_target,
    }
}

/// The API's form of the agent's watch event.
pub fn watch_event(event: nook_agent_proto::WatchEvent) -> nook_api::WatchEvent {
    use nook_agent_proto::WatchEventKind as Agent;
    use nook_api::WatchEventKind as Api;
    let kind = match event.kind {
        Agent::Create => Api::Create,
        Agent::Write => Api::Write,
        Agent::Remove => Api::Remove,
        Agent::RenameFrom => Api::RenameFrom,
        Agent::RenameTo => Api::RenameTo,
        Agent::Metadata => Api::Metadata,
        Agent::Overflow => Api::Overflow,
    };
    nook_api::WatchEvent {
        kind,
        path: event.path,
        is_dir: event.is_dir,
    }
}

fn exit_status(exit: nook_agent_proto::Exit) -> ExitStatus {
    ExitStatus {
        exit_code: exit.code,
        signal: exit.signal,
        timed_out: exit.timed_out,
    }
}

/// Maps the agent's refusal of a process operation to an HTTP error.
pub fn process_failure(code: String, message: String) -> ApiFailure {
    use axum::http::StatusCode;
    let (status, code) = match code.as_str() {
        "no_such_process" | "not_found" => (StatusCode::NOT_FOUND, "not_found"),
        "already_exists" => (StatusCode::CONFLICT, "already_exists"),
        "permission_denied" => (StatusCode::FORBIDDEN, "permission_denied"),
        "not_a_directory" => (StatusCode::BAD_REQUEST, "not_a_directory"),
        "is_a_directory" => (StatusCode::BAD_REQUEST, "is_a_directory"),
        "not_empty" => (StatusCode::CONFLICT, "not_empty"),
        "invalid_path" => (StatusCode::BAD_REQUEST, "invalid_path"),
        "too_many_entries" => (StatusCode::BAD_REQUEST, "too_many_entries"),
        "invalid_archive" => (StatusCode::BAD_REQUEST, "invalid_archive"),
        "incomplete" => (StatusCode::BAD_REQUEST, "incomplete"),
        "invalid_pattern" => (StatusCode::BAD_REQUEST, "invalid_pattern"),
        "not_a_file" => (StatusCode::BAD_REQUEST, "not_a_file"),
        "too_large" => (StatusCode::BAD_REQUEST, "too_large"),
        "not_text" => (StatusCode::BAD_REQUEST, "not_text"),
        "stdin_closed" => (StatusCode::CONFLICT, "stdin_closed"),
        "spawn_failed" => (StatusCode::BAD_REQUEST, "spawn_failed"),
        "no_such_user" => (StatusCode::BAD_REQUEST, "no_such_user"),
        "bad_cwd" => (StatusCode::BAD_REQUEST, "bad_cwd"),
        "bad_request" => (StatusCode::BAD_REQUEST, "invalid_request"),
        "no_terminal" => (StatusCode::CONFLICT, "no_terminal"),
        _ => (StatusCode::BAD_GATEWAY, "exec_failed"),
    };
    ApiFailure::new(status, code, message)
}

fn check_value(what: &str, key: &str, value: &str) -> Result<(), ApiFailure> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ApiFailure::invalid(format!(
            "{what} {key:?} is longer than {MAX_VALUE_LEN} bytes"
        )));
    }
    if value.contains('\0') {
        return Err(ApiFailure::invalid(format!("{what} {key:?} contains a NUL byte")));
    }
    Ok(())
}

/// What the runner needs to build a sandbox recorded in the store.
fn spec_of(sandbox: &Sandbox) -> SandboxSpec {
    SandboxSpec {
        id: sandbox.id.clone(),
        hostname: sandbox.name.clone(),
        image: sandbox.image.clone(),
        resources: sandbox.resources,
        env: sandbox.env.clone(),
        network: sandbox.network.clone(),
    }
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiFailure> {
    if labels.len() > MAX_LABELS {
        return Err(ApiFailure::invalid(format!("at most {MAX_LABELS} labels are allowed")));
    }
    for (key, value) in labels {
        check_label_key(key).map_err(ApiFailure::invalid)?;
        check_value("label", key, value)?;
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiFailure> {
    if env.len() > MAX_ENV {
        return Err(ApiFailure::invalid(format!(
            "at most {MAX_ENV} environment variables are allowed"
        )));
    }
    for (key, value) in env {
        check_env_name(key).map_err(ApiFailure::invalid)?;
        check_value("environment variable", key, value)?;
    }
    Ok(())
}

/// Validates an exec request and turns it into runner options.
fn check_exec(request: &ExecRequest) -> Result<ExecOptions, ApiFailure> {
    let argv = match (&request.shell, request.command.is_empty()) {
        (Some(shell), true) => vec!["/bin/sh".to_string(), "-c".to_string(), shell.clone()],
        (None, false) => request.command.clone(),
        (Some(_), false) => return Err(ApiFailure::invalid("give either `command` or `shell`, not both")),
        (None, true) => {
            return Err(ApiFailure::invalid(
                "give the command to run in `command` (argv) or `shell`",
            ))
        }
    };
    if argv[0].is_empty() {
        return Err(ApiFailure::invalid("the program name is empty"));
    }
    if argv.len() > MAX_ARGS {
        return Err(ApiFailure::invalid(format!("at most {MAX_ARGS} arguments are allowed")));
    }
    if argv.iter().map(String::len).sum::<usize>() > MAX_COMMAND_BYTES {
        return Err(ApiFailure::invalid(format!(
            "the command is longer than {MAX_COMMAND_BYTES} bytes"
        )));
    }
    if argv.iter().any(|arg| arg.contains('\0')) {
        return Err(ApiFailure::invalid("the command contains a NUL byte"));
    }
    check_env(&request.env)?;
    if let Some(cwd) = &request.cwd {
        if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > 4096 {
            return Err(ApiFailure::invalid(format!("cwd {cwd:?} must be an absolute path")));
        }
    }
    if let Some(user) = &request.user {
        // A name or uid, optionally `:group` (a group name or gid).
        let valid_part = |part: &str| {
            !part.is_empty()
                && part.len() <= 64
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        let valid = match user.split_once(':') {
            Some((name, group)) => valid_part(name) && valid_part(group),
            None => valid_part(user),
        };
        if !valid {
            return Err(ApiFailure::invalid(format!(
                "user {user:?} is not a valid user name or uid (optionally with :group)"
            )));
        }
    }
    if request.stdin.as_ref().is_some_and(|stdin| stdin.len() > MAX_EXEC_STDIN) {
        return Err(ApiFailure::invalid(format!(
            "stdin is longer than {MAX_EXEC_STDIN} bytes"
        )));
    }
    if request.timeout_ms.is_some_and(|ms| ms == 0 || ms > MAX_EXEC_TIMEOUT_MS) {
        return Err(ApiFailure::invalid(format!(
            "timeout_ms must be between 1 and {MAX_EXEC_TIMEOUT_MS}"
        )));
    }
    if let Some(size) = request.pty {
        check_pty_size(size)?;
    }
    if let Some(bytes) = request.output_buffer_bytes {
        if !(4096..=64 << 20).contains(&bytes) {
            return Err(ApiFailure::invalid(
                "output_buffer_bytes must be between 4096 and 67108864",
            ));
        }
    }
    Ok(ExecOptions {
        argv,
        env: request.env.clone(),
        cwd: request.cwd.clone(),
        user: request.user.clone(),
        timeout_ms: request.timeout_ms,
        stdin: request.stdin.is_some(),
        pty: request.pty.map(|size| nook_agent_proto::PtySize {
            cols: size.cols,
            rows: size.rows,
        }),
        output_buffer: request.output_buffer_bytes,
    })
}

fn check_pty_size(size: nook_api::PtySize) -> Result<(), ApiFailure> {
    if !(1..=1000).contains(&size.cols) || !(1..=1000).contains(&size.rows) {
        return Err(ApiFailure::invalid(format!(
            "terminal size {}x{} is out of range: use 1 to 1000 columns and rows",
            size.cols, size.rows
        )));
    }
    Ok(())
}

fn host_memory_mb() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_requests_are_checked() {
        let shell = ExecRequest {
            shell: Some("echo hi".into()),
            ..Default::default()
        };
        assert_eq!(check_exec(&shell).unwrap().argv, ["/bin/sh", "-c", "echo hi"]);
        let both = ExecRequest {
            shell: Some("x".into()),
            command: vec!["y".into()],
            ..Default::default()
        };
        assert!(check_exec(&both).is_err());
        assert!(check_exec(&ExecRequest::default()).is_err());
        let relative = ExecRequest {
            command: vec!["ls".into()],
            cwd: Some("tmp".into()),
            ..Default::default()
        };
        assert!(check_exec(&relative).is_err());
        let bad_user = ExecRequest {
            command: vec!["ls".into()],
            user: Some("a b".into()),
            ..Default::default()
        };
        assert!(check_exec(&bad_user).is_err());
        let zero = ExecRequest {
            command: vec!["ls".into()],
            timeout_ms: Some(0),
            ..Default::default()
        };
        assert!(check_exec(&zero).is_err());
    }
}
