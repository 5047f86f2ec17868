//! The embedded SQLite store.
//!
//! One connection behind a mutex (SQLite serialises writers anyway, and each statement here takes microseconds),
//! WAL journaling with `synchronous=NORMAL`, foreign keys on. Schema changes are numbered migrations applied in a
//! transaction and tracked in `PRAGMA user_version`, so an older database is upgraded in place on start.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use nook_api::audit::{AuditEvent, AuditKind, AuditQuery};
use nook_api::{DeadlineAction, Isolation, Resources, Sandbox, SandboxEvent, SandboxState, StateReason};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{ApiKeyRecord, Change, NewApiKey, Store, StoreError, Transition};

/// Schema migrations, applied in order; never edit one that has shipped, append a new one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE sandboxes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    image         TEXT NOT NULL,
    image_digest  TEXT NOT NULL,
    isolation     TEXT NOT NULL,
    state         TEXT NOT NULL,
    state_reason  TEXT NOT NULL,
    state_message TEXT NOT NULL,
    labels        TEXT NOT NULL,
    env           TEXT NOT NULL,
    cpu           REAL NOT NULL,
    memory_mb     INTEGER NOT NULL,
    pids          INTEGER NOT NULL,
    oom_kills     INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL
);
CREATE TABLE sandbox_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX sandbox_events_by_sandbox ON sandbox_events(sandbox_id, seq);
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN deadline TEXT;
ALTER TABLE sandboxes ADD COLUMN on_deadline TEXT NOT NULL DEFAULT 'delete';
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN disk_mb INTEGER;
ALTER TABLE sandboxes ADD COLUMN memory_max_mb INTEGER;
ALTER TABLE sandboxes ADD COLUMN idle_stop_s INTEGER;
ALTER TABLE sandboxes ADD COLUMN stopped_delete_s INTEGER;
ALTER TABLE sandboxes ADD COLUMN stopped_archive_s INTEGER;
ALTER TABLE sandboxes ADD COLUMN parent_id TEXT;
CREATE INDEX sandboxes_by_parent ON sandboxes(parent_id);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN network TEXT;
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN preview TEXT;
CREATE TABLE preview_links (
    id          TEXT PRIMARY KEY,
    sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
    port        INTEGER NOT NULL,
    expires_at  TEXT NOT NULL,
    revoked_at  TEXT,
    created_at  TEXT NOT NULL
);
CREATE INDEX preview_links_by_sandbox ON preview_links(sandbox_id, created_at);
"#,
    r#"
CREATE TABLE audit_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    kind         TEXT NOT NULL,
    actor        TEXT,
    client       TEXT,
    sandbox      TEXT,
    action       TEXT NOT NULL,
    target       TEXT,
    outcome      TEXT NOT NULL,
    allowed      INTEGER NOT NULL,
    rule         INTEGER,
    reason       TEXT,
    duration_ms  REAL
);
CREATE INDEX audit_events_by_time ON audit_events(at);
CREATE INDEX audit_events_by_sandbox ON audit_events(sandbox, seq);
"#,
    // Tenants. Sandbox names become unique per tenant, which SQLite can only do by rebuilding the table (foreign
    // keys are off while migrations run, so the events and links that refer to it stay).
    r#"
CREATE TABLE tenants (
    name             TEXT PRIMARY KEY,
    quota_sandboxes  INTEGER,
    quota_cpu        REAL,
    quota_memory_mb  INTEGER,
    created_at       TEXT NOT NULL
);
INSERT INTO tenants (name, created_at) VALUES ('default', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
ALTER TABLE api_keys ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE api_keys ADD COLUMN expires_at TEXT;
ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;
ALTER TABLE audit_events ADD COLUMN tenant TEXT;
CREATE INDEX audit_events_by_tenant ON audit_events(tenant, seq);
CREATE TABLE sandboxes_by_tenant (
    id                TEXT PRIMARY KEY,
    tenant            TEXT NOT NULL DEFAULT 'default',
    name              TEXT NOT NULL,
    image             TEXT NOT NULL,
    image_digest      TEXT NOT NULL,
    isolation         TEXT NOT NULL,
    state             TEXT NOT NULL,
    state_reason      TEXT NOT NULL,
    state_message     TEXT NOT NULL,
    labels            TEXT NOT NULL,
    env               TEXT NOT NULL,
    cpu               REAL NOT NULL,
    memory_mb         INTEGER NOT NULL,
    pids              INTEGER NOT NULL,
    oom_kills         INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    deadline          TEXT,
    on_deadline       TEXT NOT NULL DEFAULT 'delete',
    disk_mb           INTEGER,
    parent_id         TEXT,
    memory_max_mb     INTEGER,
    idle_stop_s       INTEGER,
    stopped_delete_s  INTEGER,
    stopped_archive_s INTEGER,
    network           TEXT,
    preview           TEXT,
    UNIQUE (tenant, name)
);
INSERT INTO sandboxes_by_tenant (id, name, image, image_digest, isolation, state, state_reason, state_message, labels, env, cpu, memory_mb, pids, oom_kills, created_at, updated_at, deadline, on_deadline, disk_mb, parent_id, memory_max_mb, idle_stop_s, stopped_delete_s, stopped_archive_s, network, preview) SELECT id, name, image, image_digest, isolation, state, state_reason, state_message, labels, env, cpu, memory_mb, pids, oom_kills, created_at, updated_at, deadline, on_deadline, disk_mb, parent_id, memory_max_mb, idle_stop_s, stopped_delete_s, stopped_archive_s, network, preview FROM sandboxes;
DROP TABLE sandboxes;
ALTER TABLE sandboxes_by_tenant RENAME TO sandboxes;
CREATE INDEX sandboxes_by_parent ON sandboxes(parent_id);
"#,
    r#"
CREATE TABLE image_owners (
    name    TEXT PRIMARY KEY,
    tenant  TEXT NOT NULL
);
"#,
];

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    connection: Mutex<Connection>,
    /// The id of each sandbox whose events or record just changed (after the write is committed).
    changed: tokio::sync::broadcast::Sender<String>,
}

impl SqliteStore {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        Self::setup(connection)
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?)
    }

    fn setup(mut connection: Connection) -> Result<Self, StoreError> {
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        // Foreign keys are enforced once the schema is current: a migration that rebuilds a table must not cascade.
        connection.pragma_update(None, "foreign_keys", "OFF")?;
        let version: usize = connection.pragma_query_value(None, "user_version", |row| row.get(0))?;
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let transaction = connection.transaction()?;
            transaction.execute_batch(migration)?;
            transaction.pragma_update(None, "user_version", index + 1)?;
            transaction.commit()?;
        }
        connection.pragma_update(None, "foreign_keys", "ON")?;
        Ok(Self {
            connection: Mutex::new(connection),
            changed: tokio::sync::broadcast::channel(1024).0,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut connection = self.connection.lock().expect("store lock");
        f(&mut connection)
    }
}

const SANDBOX_COLUMNS: &str = "id, name, image, image_digest, isolation, state, state_reason, state_message, \
                               labels, env, cpu, memory_mb, pids, oom_kills, created_at, updated_at, deadline, \
                               on_deadline, disk_mb, parent_id, memory_max_mb, idle_stop_s, stopped_delete_s, stopped_archive_s, \
                               network, preview, tenant";

fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| StoreError::Corrupt(format!("timestamp {text:?}: {error}")))
}

fn sandbox_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Sandbox, StoreError>> {
    let state: String = row.get(5)?;
    let reason: String = row.get(6)?;
    let labels: String = row.get(8)?;
    let env: String = row.get(9)?;
    let created: String = row.get(14)?;
    let updated: String = row.get(15)?;
    let isolation: String = row.get(4)?;
    let deadline: Option<String> = row.get(16)?;
    let on_deadline: String = row.get(17)?;
    let disk_mb: Option<u64> = row.get(18)?;
    let parent: Option<String> = row.get(19)?;
    let memory_max_mb: Option<u64> = row.get(20)?;
    let lifecycle = nook_api::Lifecycle {
        idle_stop_s: row.get(21)?,
        stopped_delete_s: row.get(22)?,
        stopped_archive_s: row.get(23)?,
    };
    let network: Option<String> = row.get(24)?;
    let preview: Option<String> = row.get(25)?;
    let tenant: String = row.get(26)?;
    let build = || -> Result<Sandbox, StoreError> {
        Ok(Sandbox {
            id: row.get(0)?,
            name: row.get(1)?,
            image: row.get(2)?,
            image_digest: row.get(3)?,
            isolation: match isolation.as_str() {
                "container" => Isolation::Container,
                other => return Err(StoreError::Corrupt(format!("isolation {other:?}"))),
            },
            state: SandboxState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("state {state:?}")))?,
            state_reason: StateReason::parse(&reason)
                .ok_or_else(|| StoreError::Corrupt(format!("reason {reason:?}")))?,
            state_message: row.get(7)?,
            labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            env: serde_json::from_str(&env).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            resources: Resources {
                cpu: row.get(10)?,
                memory_mb: row.get(11)?,
                memory_max_mb,
                pids: row.get(12)?,
                disk_mb,
            },
            oom_kills: row.get(13)?,
            deadline: deadline.as_deref().map(parse_time).transpose()?,
            on_deadline: DeadlineAction::parse(&on_deadline)
                .ok_or_else(|| StoreError::Corrupt(format!("on_deadline {on_deadline:?}")))?,
            lifecycle,
            parent,
            network: match network {
                Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("network: {e}")))?,
                None => Default::default(),
            },
            address: None,
            preview: match preview {
                Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("preview: {e}")))?,
                None => Default::default(),
            },
            tenant,
            created_at: parse_time(&created)?,
            updated_at: parse_time(&updated)?,
        })
    };
    Ok(build())
}

fn select_one(connection: &Connection, column: &str, value: &str) -> Result<Option<Sandbox>, StoreError> {
    let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE {column} = ?1");
    connection
        .query_row(&sql, params![value], sandbox_from_row)
        .optional()?
        .transpose()
}

fn insert_event(
    connection: &Connection,
    id: &str,
    at: &str,
    from: Option<SandboxState>,
    to: SandboxState,
    reason: StateReason,
    message: &str,
) -> Result<(), StoreError> {
    connection.execute(
        "INSERT INTO sandbox_events (sandbox_id, at, from_state, to_state, reason, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            id,
            at,
            from.map(SandboxState::as_str),
            to.as_str(),
            reason.as_str(),
            message
        ],
    )?;
    Ok(())
}

fn now_text() -> String {
    time_text(Utc::now())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn insert_sandbox(&self, sandbox: &Sandbox) -> Result<(), StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let created = time_text(sandbox.created_at);
            let inserted = transaction.execute(
                &format!(
                    "INSERT INTO sandboxes ({SANDBOX_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                          ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27)"
                ),
                params![
                    sandbox.id,
                    sandbox.name,
                    sandbox.image,
                    sandbox.image_digest,
                    "container",
                    sandbox.state.as_str(),
                    sandbox.state_reason.as_str(),
                    sandbox.state_message,
                    serde_json::to_string(&sandbox.labels).expect("labels serialize"),
                    serde_json::to_string(&sandbox.env).expect("env serializes"),
                    sandbox.resources.cpu,
                    sandbox.resources.memory_mb,
                    sandbox.resources.pids,
                    sandbox.oom_kills,
                    created,
                    created,
                    sandbox.deadline.map(time_text),
                    sandbox.on_deadline.as_str(),
                    sandbox.resources.disk_mb,
                    sandbox.parent,
                    sandbox.resources.memory_max_mb,
                    sandbox.lifecycle.idle_stop_s,
                    sandbox.lifecycle.stopped_delete_s,
                    sandbox.lifecycle.stopped_archive_s,
                    serde_json::to_string(&sandbox.network).expect("a policy serializes"),
                    serde_json::to_string(&sandbox.preview).expect("preview settings serialize"),
                    sandbox.tenant,
                ],
            );
            match inserted {
                Ok(_) => {}
                Err(rusqlite::Error::SqliteFailure(error, Some(message)))
                    if error.code == rusqlite::ErrorCode::ConstraintViolation && message.contains("name") =>
                {
                    return Err(StoreError::NameTaken(sandbox.name.clone()));
                }
                Err(error) => return Err(error.into()),
            }
            insert_event(
                &transaction,
                &sandbox.id,
                &created,
                None,
                sandbox.state,
                sandbox.state_reason,
                &sandbox.state_message,
            )?;
            transaction.commit()?;
            let _ = self.changed.send(sandbox.id.clone());
            Ok(())
        })
    }

    async fn sandbox(&self, id: &str) -> Result<Option<Sandbox>, StoreError> {
        self.with(|connection| select_one(connection, "id", id))
    }

    async fn sandbox_by_name(&self, tenant: &str, name: &str) -> Result<Option<Sandbox>, StoreError> {
        self.with(|connection| {
            let sql = format!("SELECT {SANDBOX_COLUMNS} FROM sandboxes WHERE tenant = ?1 AND name = ?2");
            connection
                .query_row(&sql, params![tenant, name], sandbox_from_row)
                .optional()?
                .transpose()
        })
    }

    async fn sandboxes(&self) -> Result<Vec<Sandbox>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(&format!(
                "SELECT {SANDBOX_COLUMNS} FROM sandboxes ORDER BY created_at, id"
            ))?;
            let rows = statement.query_map([], sandbox_from_row)?;
            let mut sandboxes = Vec::new();
            for row in rows {
                sandboxes.push(row??);
            }
            Ok(sandboxes)
        })
    }

    async fn transition(&self, id: &str, transition: Transition) -> Result<Sandbox, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let current = select_one(&transaction, "id", id)?.ok_or(StoreError::NotFound)?;
            if !transition.from.contains(&current.state) {
                return Err(StoreError::WrongState(current.state));
            }
            let now = now_text();
            transaction.execute(
                "UPDATE sandboxes SET state = ?2, state_reason = ?3, state_message = ?4, updated_at = ?5 \
                 WHERE id = ?1",
                params![
                    id,
                    transition.to.as_str(),
                    transition.reason.as_str(),
                    transition.message,
                    now
                ],
            )?;
            insert_event(
                &transaction,
                id,
                &now,
                Some(current.state),
                transition.to,
                transition.reason,
                &transition.message,
            )?;
            let updated = select_one(&transaction, "id", id)?.ok_or(StoreError::NotFound)?;
            transaction.commit()?;
            let _ = self.changed.send(id.to_string());
            Ok(updated)
        })
    }

    async fn note(&self, id: &str, reason: StateReason, message: &str, change: Change) -> Result<Sandbox, StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let current = select_one(&transaction, "id", id)?.ok_or(StoreError::NotFound)?;
            let mut resources = change.resources.unwrap_or(current.resources);
            if let Some(memory_mb) = change.memory_mb {
                resources.memory_mb = memory_mb;
            }
            let network = change.network.as_ref().unwrap_or(&current.network);
            let preview = change.preview.as_ref().unwrap_or(&current.preview);
            transaction.execute(
                "UPDATE sandboxes SET state_reason = ?2, state_message = ?3, cpu = ?4, memory_mb = ?5, pids = ?6, \
                 disk_mb = ?7, memory_max_mb = ?8, oom_kills = ?9, network = ?10, preview = ?11 WHERE id = ?1",
                params![
                    id,
                    reason.as_str(),
                    message,
                    resources.cpu,
                    resources.memory_mb,
                    resources.pids,
                    resources.disk_mb,
                    resources.memory_max_mb,
                    change.oom_kills.unwrap_or(current.oom_kills),
                    serde_json::to_string(network).expect("a policy serializes"),
                    serde_json::to_string(preview).expect("preview settings serialize"),
                ],
            )?;
            insert_event(
                &transaction,
                id,
                &now_text(),
                Some(current.state),
                current.state,
                reason,
                message,
            )?;
            let updated = select_one(&transaction, "id", id)?.ok_or(StoreError::NotFound)?;
            transaction.commit()?;
            let _ = self.changed.send(id.to_string());
            Ok(updated)
        })
    }

    async fn set_lifecycle(&self, id: &str, lifecycle: nook_api::Lifecycle) -> Result<Sandbox, StoreError> {
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE sandboxes SET idle_stop_s = ?2, stopped_delete_s = ?3, stopped_archive_s = ?4 WHERE id = ?1",
                params![
                    id,
                    lifecycle.idle_stop_s,
                    lifecycle.stopped_delete_s,
                    lifecycle.stopped_archive_s
                ],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            let _ = self.changed.send(id.to_string());
            select_one(connection, "id", id)?.ok_or(StoreError::NotFound)
        })
    }

    async fn set_deadline(
        &self,
        id: &str,
        deadline: Option<DateTime<Utc>>,
        on_deadline: DeadlineAction,
    ) -> Result<Sandbox, StoreError> {
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE sandboxes SET deadline = ?2, on_deadline = ?3 WHERE id = ?1",
                params![id, deadline.map(time_text), on_deadline.as_str()],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            select_one(connection, "id", id)?.ok_or(StoreError::NotFound)
        })
    }

    async fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
            let _ = self.changed.send(id.to_string());
            Ok(())
        })
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changed.subscribe()
    }

    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<(u64, SandboxEvent)>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(
                "SELECT at, from_state, to_state, reason, message, seq FROM sandbox_events \
                 WHERE sandbox_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = statement.query_map(params![id, after], |row| {
                Ok((
                    row.get::<_, u64>(5)?,
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, String>(4)?,
                ))
            })?;
            let mut events = Vec::new();
            for row in rows {
                let (seq, at, from, to, reason, message) = row?;
                let corrupt = |what: &str| StoreError::Corrupt(format!("event {what}"));
                events.push((
                    seq,
                    SandboxEvent {
                        at: parse_time(&at)?,
                        from_state: match from {
                            Some(from) => Some(SandboxState::parse(&from).ok_or_else(|| corrupt("from_state"))?),
                            None => None,
                        },
                        to_state: SandboxState::parse(&to).ok_or_else(|| corrupt("to_state"))?,
                        reason: StateReason::parse(&reason).ok_or_else(|| corrupt("reason"))?,
                        message,
                    },
                ));
            }
            Ok(events)
        })
    }

    async fn insert_api_key(&self, key: &NewApiKey) -> Result<ApiKeyRecord, StoreError> {
        let record = ApiKeyRecord {
            id: crate::ids::random_id("key-"),
            name: key.name.clone(),
            tenant: key.tenant.clone(),
            scope: key.scope,
            expires_at: key.expires_at,
            revoked_at: None,
            created_at: chrono::SubsecRound::trunc_subsecs(Utc::now(), 6),
        };
        self.with(|connection| {
            connection.execute(
                "INSERT INTO api_keys (id, name, key_hash, created_at, tenant, scope, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    record.id,
                    record.name,
                    key.hash,
                    time_text(record.created_at),
                    record.tenant,
                    record.scope.as_str(),
                    record.expires_at.map(time_text)
                ],
            )?;
            Ok(())
        })?;
        Ok(record)
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?1"),
                    params![key_hash],
                    key_from_row,
                )
                .optional()?
                .transpose()
        })
    }

    async fn api_keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKeyRecord>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at, id"
            ))?;
            let rows = statement.query_map(params![tenant], key_from_row)?;
            let mut keys = Vec::new();
            for row in rows {
                keys.push(row??);
            }
            Ok(keys)
        })
    }

    async fn revoke_api_key(&self, id: &str) -> Result<ApiKeyRecord, StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_text()],
            )?;
            connection
                .query_row(
                    &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                    params![id],
                    key_from_row,
                )
                .optional()?
                .ok_or(StoreError::NotFound)?
        })
    }

    async fn image_owner(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.with(|connection| {
            Ok(connection
                .query_row(
                    "SELECT tenant FROM image_owners WHERE name = ?1",
                    params![name],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    async fn image_owners(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare("SELECT name, tenant FROM image_owners")?;
            let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    async fn set_image_owner(&self, name: &str, tenant: &str) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute(
                "INSERT INTO image_owners (name, tenant) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET tenant = excluded.tenant",
                params![name, tenant],
            )?;
            Ok(())
        })
    }

    async fn remove_image_owner(&self, name: &str) -> Result<(), StoreError> {
        self.with(|connection| {
            connection.execute("DELETE FROM image_owners WHERE name = ?1", params![name])?;
            Ok(())
        })
    }

    async fn insert_tenant(&self, tenant: &nook_api::tenancy::Tenant) -> Result<(), StoreError> {
        self.with(|connection| {
            let inserted = connection.execute(
                "INSERT INTO tenants (name, quota_sandboxes, quota_cpu, quota_memory_mb, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    tenant.name,
                    tenant.quota.sandboxes,
                    tenant.quota.cpu,
                    tenant.quota.memory_mb,
                    time_text(tenant.created_at)
                ],
            );
            match inserted {
                Err(rusqlite::Error::SqliteFailure(error, _))
                    if error.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::NameTaken(tenant.name.clone()))
                }
                other => other.map(|_| ()).map_err(StoreError::from),
            }
        })
    }

    async fn tenant(&self, name: &str) -> Result<Option<nook_api::tenancy::Tenant>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?1"),
                    params![name],
                    tenant_from_row,
                )
                .optional()?
                .transpose()
        })
    }

    async fn tenants(&self) -> Result<Vec<nook_api::tenancy::Tenant>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(&format!(
                "SELECT {TENANT_COLUMNS} FROM tenants ORDER BY created_at, name"
            ))?;
            let rows = statement.query_map([], tenant_from_row)?;
            let mut tenants = Vec::new();
            for row in rows {
                tenants.push(row??);
            }
            Ok(tenants)
        })
    }

    async fn set_tenant_quota(
        &self,
        name: &str,
        quota: nook_api::tenancy::TenantQuota,
    ) -> Result<nook_api::tenancy::Tenant, StoreError> {
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE tenants SET quota_sandboxes = ?2, quota_cpu = ?3, quota_memory_mb = ?4 WHERE name = ?1",
                params![name, quota.sandboxes, quota.cpu, quota.memory_mb],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound);
            }
            connection.query_row(
                &format!("SELECT {TENANT_COLUMNS} FROM tenants WHERE name = ?1"),
                params![name],
                tenant_from_row,
            )?
        })
    }

    async fn api_key_count(&self) -> Result<u64, StoreError> {
        self.with(|connection| Ok(connection.query_row("SELECT COUNT(*) FROM api_keys", [], |row| row.get(0))?))
    }

    async fn insert_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            {
                let mut insert = transaction.prepare_cached(&format!(
                    "INSERT INTO audit_events ({AUDIT_COLUMNS}) VALUES (NULL, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
                     ?11, ?12, ?13)"
                ))?;
                for event in events {
                    insert.execute(params![
                        time_text(event.at),
                        event.kind.as_str(),
                        event.actor,
                        event.client,
                        event.sandbox,
                        event.action,
                        event.target,
                        event.outcome,
                        event.allowed,
                        event.rule,
                        event.reason,
                        event.duration_ms,
                        event.tenant,
                    ])?;
                }
            }
            transaction.commit()?;
            Ok(())
        })
    }

    async fn audit_events(&self, query: &AuditQuery, limit: u32) -> Result<Vec<AuditEvent>, StoreError> {
        self.with(|connection| {
            let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events WHERE seq > ?1");
            let mut values: Vec<rusqlite::types::Value> = vec![(query.after.unwrap_or(0) as i64).into()];
            let mut bind = |sql: &mut String, clause: &str, value: rusqlite::types::Value| {
                values.push(value);
                sql.push_str(&format!(" AND {clause} ?{}", values.len()));
            };
            if let Some(kind) = query.kind {
                bind(&mut sql, "kind =", kind.as_str().to_string().into());
            }
            if let Some(sandbox) = &query.sandbox {
                bind(&mut sql, "sandbox =", sandbox.clone().into());
            }
            if let Some(tenant) = &query.tenant {
                bind(&mut sql, "tenant =", tenant.clone().into());
            }
            if let Some(allowed) = query.allowed {
                bind(&mut sql, "allowed =", i64::from(allowed).into());
            }
            if let Some(since) = query.since {
                bind(&mut sql, "at >=", time_text(since).into());
            }
            if let Some(before) = query.before {
                bind(&mut sql, "seq <", (before as i64).into());
            }
            let order = if query.newest_first { "DESC" } else { "ASC" };
            sql.push_str(&format!(" ORDER BY seq {order} LIMIT {limit}"));
            let mut statement = connection.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), audit_from_row)?;
            let mut events = Vec::new();
            for row in rows {
                events.push(row??);
            }
            Ok(events)
        })
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.with(|connection| {
            Ok(connection.execute("DELETE FROM audit_events WHERE at < ?1", params![time_text(before)])? as u64)
        })
    }

    async fn insert_preview_link(&self, link: &nook_api::PreviewLink) -> Result<(), StoreError> {
        self.with(|connection| {
            let transaction = connection.transaction()?;
            let stale = time_text(Utc::now() - chrono::Duration::days(1));
            transaction.execute(
                "DELETE FROM preview_links WHERE sandbox_id = ?1 AND expires_at < ?2",
                params![link.sandbox, stale],
            )?;
            transaction.execute(
                "INSERT INTO preview_links (id, sandbox_id, port, expires_at, revoked_at, created_at) \
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                params![
                    link.id,
                    link.sandbox,
                    link.port,
                    time_text(link.expires_at),
                    time_text(link.created_at)
                ],
            )?;
            transaction.commit()?;
            Ok(())
        })
    }

    async fn preview_link(&self, id: &str) -> Result<Option<nook_api::PreviewLink>, StoreError> {
        self.with(|connection| {
            connection
                .query_row(
                    &format!("SELECT {LINK_COLUMNS} FROM preview_links WHERE id = ?1"),
                    params![id],
                    link_from_row,
                )
                .optional()?
                .transpose()
        })
    }

    async fn preview_links(&self, sandbox_id: &str) -> Result<Vec<nook_api::PreviewLink>, StoreError> {
        self.with(|connection| {
            let mut statement = connection.prepare(&format!(
                "SELECT {LINK_COLUMNS} FROM preview_links WHERE sandbox_id = ?1 ORDER BY created_at DESC, id"
            ))?;
            let rows = statement.query_map(params![sandbox_id], link_from_row)?;
            let mut links = Vec::new();
            for row in rows {
                links.push(row??);
            }
            Ok(links)
        })
    }

    async fn revoke_preview_link(&self, sandbox_id: &str, id: &str) -> Result<nook_api::PreviewLink, StoreError> {
        self.with(|connection| {
            connection.execute(
                "UPDATE preview_links SET revoked_at = ?3 WHERE id = ?1 AND sandbox_id = ?2 AND revoked_at IS NULL",
                params![id, sandbox_id, now_text()],
            )?;
            connection
                .query_row(
                    &format!("SELECT {LINK_COLUMNS} FROM preview_links WHERE id = ?1 AND sandbox_id = ?2"),
                    params![id, sandbox_id],
                    link_from_row,
                )
                .optional()?
                .ok_or(StoreError::NotFound)?
        })
    }
}

const KEY_COLUMNS: &str = "id, name, created_at, tenant, scope, expires_at, revoked_at";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<Result<ApiKeyRecord, StoreError>> {
    let created: String = row.get(2)?;
    let scope: String = row.get(4)?;
    let expires: Option<String> = row.get(5)?;
    let revoked: Option<String> = row.get(6)?;
    let (id, name, tenant) = (row.get(0)?, row.get(1)?, row.get(3)?);
    let build = || -> Result<ApiKeyRecord, StoreError> {
        Ok(ApiKeyRecord {
            id,
            name,
            tenant,
            scope: nook_api::tenancy::Scope::parse(&scope)
                .ok_or_else(|| StoreError::Corrupt(format!("key scope {scope:?}")))?,
            expires_at: expires.as_deref().map(parse_time).transpose()?,
            revoked_at: revoked.as_deref().map(parse_time).transpose()?,
            created_at: parse_time(&created)?,
        })
    };
    Ok(build())
}

const TENANT_COLUMNS: &str = "name, quota_sandboxes, quota_cpu, quota_memory_mb, created_at";

fn tenant_from_row(row: &Row<'_>) -> rusqlite::Result<Result<nook_api::tenancy::Tenant, StoreError>> {
    let created: String = row.get(4)?;
    let (name, sandboxes, cpu, memory_mb) = (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
    Ok(parse_time(&created).map(|created_at| nook_api::tenancy::Tenant {
        name,
        quota: nook_api::tenancy::TenantQuota {
            sandboxes,
            cpu,
            memory_mb,
        },
        created_at,
    }))
}

const AUDIT_COLUMNS: &str =
    "seq, at, kind, actor, client, sandbox, action, target, outcome, allowed, rule, reason, duration_ms, tenant";

fn audit_from_row(row: &Row<'_>) -> rusqlite::Result<Result<AuditEvent, StoreError>> {
    let at: String = row.get(1)?;
    let kind: String = row.get(2)?;
    let event = AuditEvent {
        seq: row.get(0)?,
        at: Utc::now(),
        kind: AuditKind::Api,
        actor: row.get(3)?,
        client: row.get(4)?,
        sandbox: row.get(5)?,
        action: row.get(6)?,
        target: row.get(7)?,
        outcome: row.get(8)?,
        allowed: row.get(9)?,
        rule: row.get(10)?,
        reason: row.get(11)?,
        duration_ms: row.get(12)?,
        tenant: row.get(13)?,
    };
    let build = move || -> Result<AuditEvent, StoreError> {
        Ok(AuditEvent {
            at: parse_time(&at)?,
            kind: AuditKind::parse(&kind).ok_or_else(|| StoreError::Corrupt(format!("audit kind {kind:?}")))?,
            ..event
        })
    };
    Ok(build())
}

const LINK_COLUMNS: &str = "id, sandbox_id, port, expires_at, revoked_at, created_at";

fn link_from_row(row: &Row<'_>) -> rusqlite::Result<Result<nook_api::PreviewLink, StoreError>> {
    let expires: String = row.get(3)?;
    let revoked: Option<String> = row.get(4)?;
    let created: String = row.get(5)?;
    let (id, sandbox, port) = (row.get(0)?, row.get(1)?, row.get(2)?);
    let build = || -> Result<nook_api::PreviewLink, StoreError> {
        Ok(nook_api::PreviewLink {
            id,
            sandbox,
            port,
            url: None,
            path_url: None,
            expires_at: parse_time(&expires)?,
            revoked_at: revoked.as_deref().map(parse_time).transpose()?,
            created_at: parse_time(&created)?,
        })
    };
    Ok(build())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sandbox(id: &str, name: &str) -> Sandbox {
        let now = Utc::now();
        Sandbox {
            id: id.into(),
            name: name.into(),
            image: "base".into(),
            image_digest: "sha256:00".into(),
            isolation: Isolation::Container,
            state: SandboxState::Creating,
            state_reason: StateReason::Requested,
            state_message: "created by a client".into(),
            labels: BTreeMap::from([("team".into(), "a".into())]),
            env: BTreeMap::new(),
            resources: Resources {
                cpu: 1.0,
                memory_mb: 256,
                memory_max_mb: None,
                pids: 100,
                disk_mb: None,
            },
            oom_kills: 0,
            deadline: None,
            on_deadline: DeadlineAction::Delete,
            lifecycle: Default::default(),
            parent: None,
            network: nook_api::NetworkPolicy {
                egress: nook_api::EgressMode::Rules,
                rules: vec![nook_api::EgressRule {
                    action: nook_api::EgressAction::Allow,
                    to: "*.example.test".into(),
                    ports: vec![443],
                }],
                default: None,
            },
            address: None,
            preview: Default::default(),
            tenant: "default".into(),
            created_at: now,
            updated_at: now,
        }
    }

    #[tokio::test]
    async fn sandboxes_round_trip_with_history() {
        let store = SqliteStore::in_memory().unwrap();
        store.insert_sandbox(&sandbox("sb-1", "one")).await.unwrap();
        let running = store
            .transition(
                "sb-1",
                Transition {
                    from: &[SandboxState::Creating],
                    to: SandboxState::Running,
                    reason: StateReason::Requested,
                    message: "up".into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(running.state, SandboxState::Running);
        let oom_kills = Change {
            oom_kills: Some(2),
            ..Change::default()
        };
        let oom = store.note("sb-1", StateReason::Oom, "killed", oom_kills).await.unwrap();
        assert_eq!(
            (oom.state, oom.state_reason, oom.oom_kills),
            (SandboxState::Running, StateReason::Oom, 2)
        );
        // A note is an event, not a state change: `updated_at` stays (lifecycle clocks count from it).
        assert_eq!(oom.updated_at, running.updated_at);
        // A memory limit raised alone keeps the rest of the limits as they are in the record.
        let resized = Resources {
            cpu: 0.5,
            ..running.resources
        };
        let resize = Change {
            resources: Some(resized),
            ..Change::default()
        };
        store.note("sb-1", StateReason::Resized, "cpu", resize).await.unwrap();
        let grown = Change {
            memory_mb: Some(512),
            ..Change::default()
        };
        let grown = store
            .note("sb-1", StateReason::MemoryGrown, "grown", grown)
            .await
            .unwrap();
        assert_eq!((grown.resources.cpu, grown.resources.memory_mb), (0.5, 512));
        assert_eq!(grown.network, running.network);
        let events = store.events("sb-1").await.unwrap();
        assert_eq!(events.len(), 5);
        assert_eq!(events[1].from_state, Some(SandboxState::Creating));
        assert_eq!(
            store.sandbox_by_name("default", "one").await.unwrap().unwrap().labels["team"],
            "a"
        );
        store.delete_sandbox("sb-1").await.unwrap();
        assert!(store.sandbox("sb-1").await.unwrap().is_none());
        assert!(store.events("sb-1").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn transitions_only_apply_from_the_expected_states() {
        let store = SqliteStore::in_memory().unwrap();
        store.insert_sandbox(&sandbox("sb-1", "one")).await.unwrap();
        let from_stopped = Transition {
            from: &[SandboxState::Stopped],
            to: SandboxState::Running,
            reason: StateReason::Requested,
            message: "start".into(),
        };
        let error = store.transition("sb-1", from_stopped).await.unwrap_err();
        assert!(
            matches!(error, StoreError::WrongState(SandboxState::Creating)),
            "{error}"
        );
        assert_eq!(
            store.events("sb-1").await.unwrap().len(),
            1,
            "a refused transition recorded an event"
        );
    }

    #[tokio::test]
    async fn names_are_unique() {
        let store = SqliteStore::in_memory().unwrap();
        store.insert_sandbox(&sandbox("sb-1", "same")).await.unwrap();
        let error = store.insert_sandbox(&sandbox("sb-2", "same")).await.unwrap_err();
        assert!(matches!(error, StoreError::NameTaken(name) if name == "same"));
        assert_eq!(store.sandboxes().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn api_keys_are_found_by_hash_only() {
        let store = SqliteStore::in_memory().unwrap();
        assert_eq!(store.api_key_count().await.unwrap(), 0);
        let key = NewApiKey {
            name: "admin".into(),
            hash: "hash-a".into(),
            tenant: "default".into(),
            scope: nook_api::tenancy::Scope::Admin,
            expires_at: None,
        };
        store.insert_api_key(&key).await.unwrap();
        assert_eq!(store.api_key_by_hash("hash-a").await.unwrap().unwrap().name, "admin");
        assert!(store.api_key_by_hash("hash-b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn names_are_unique_per_tenant_and_an_upgraded_database_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nook.db");
        {
            // A database from before tenants (schema 6), with a sandbox and its first event.
            let connection = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..6] {
                connection.execute_batch(migration).unwrap();
            }
            connection.pragma_update(None, "user_version", 6).unwrap();
            connection
                .execute(
                    "INSERT INTO sandboxes (id, name, image, image_digest, isolation, state, state_reason, \
                     state_message, labels, env, cpu, memory_mb, pids, created_at, updated_at) VALUES ('sb-old', \
                     'web', 'base', 'sha256:00', 'container', 'running', 'requested', '', '{}', '{}', 1.0, 256, 100, \
                     '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
                    [],
                )
                .unwrap();
            connection
                .execute(
                    "INSERT INTO sandbox_events (sandbox_id, at, to_state, reason, message) VALUES ('sb-old', \
                     '2026-01-01T00:00:00Z', 'running', 'requested', 'made')",
                    [],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let old = store.sandbox_by_name("default", "web").await.unwrap().unwrap();
        assert_eq!((old.id.as_str(), old.tenant.as_str()), ("sb-old", "default"));
        assert_eq!(store.events("sb-old").await.unwrap().len(), 1);
        assert_eq!(store.tenants().await.unwrap()[0].name, "default");

        // Another tenant may have a `web`; the same tenant may not have two.
        let mut theirs = sandbox("sb-theirs", "web");
        theirs.tenant = "acme".into();
        store.insert_sandbox(&theirs).await.unwrap();
        assert!(matches!(
            store.insert_sandbox(&sandbox("sb-again", "web")).await,
            Err(StoreError::NameTaken(_))
        ));
        assert_eq!(
            store.sandbox_by_name("acme", "web").await.unwrap().unwrap().id,
            "sb-theirs"
        );
        // The events still belong to the sandbox: deleting it removes them (the foreign key survived).
        store.delete_sandbox("sb-old").await.unwrap();
        assert!(store.events("sb-old").await.unwrap().is_empty());
    }

    #[test]
    fn migrations_are_idempotent_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nook.db");
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap());
    }

    #[tokio::test]
    async fn deadlines_are_kept_and_a_first_version_database_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nook.db");
        {
            // A database of the first schema, with a sandbox in it.
            let connection = Connection::open(&path).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.pragma_update(None, "user_version", 1).unwrap();
            connection
                .execute(
                    "INSERT INTO sandboxes VALUES ('sb-old', 'old', 'base', 'sha256:00', 'container', 'running', \
                     'requested', '', '{}', '{}', 1.0, 256, 100, 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
                    [],
                )
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let old = store.sandbox("sb-old").await.unwrap().unwrap();
        assert_eq!((old.deadline, old.on_deadline), (None, DeadlineAction::Delete));

        let at = DateTime::parse_from_rfc3339("2030-05-06T07:08:09.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut new = sandbox("sb-new", "new");
        new.deadline = Some(at);
        store.insert_sandbox(&new).await.unwrap();
        assert_eq!(store.sandbox("sb-new").await.unwrap().unwrap().deadline, Some(at));
        let moved = store
            .set_deadline("sb-old", Some(at), DeadlineAction::Stop)
            .await
            .unwrap();
        assert_eq!((moved.deadline, moved.on_deadline), (Some(at), DeadlineAction::Stop));
        drop(store);
        let reopened = SqliteStore::open(&path).unwrap();
        let kept = reopened.sandbox("sb-old").await.unwrap().unwrap();
        assert_eq!((kept.deadline, kept.on_deadline), (Some(at), DeadlineAction::Stop));
        let cleared = reopened
            .set_deadline("sb-old", None, DeadlineAction::Stop)
            .await
            .unwrap();
        assert_eq!(cleared.deadline, None);
        assert!(matches!(
            reopened.set_deadline("sb-gone", None, DeadlineAction::Delete).await,
            Err(StoreError::NotFound)
        ));
    }
}
