//! Tenants, API keys with scopes and expiry, and sandbox-scoped capability tokens.
//!
//! A tenant owns sandboxes; its keys see and touch only its own, and its sandbox names are its own (two tenants may
//! both have a `web`). The `default` tenant holds the keys made at first start; its admin keys are the operator's:
//! they also manage tenants (and their quotas) and the keys of every tenant. A key's scope limits what it may do:
//! `read` looks (GET), `write` also changes, `admin` also manages keys and reads the audit log. A capability token
//! is narrower still: one sandbox, the verbs chosen, until it expires; it can be handed to a sub-agent or an end
//! user.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The tenant every installation starts with.
pub const DEFAULT_TENANT: &str = "default";
/// The longest a capability token may last, in seconds (30 days).
pub const MAX_TOKEN_S: u64 = 30 * 24 * 3600;
/// The longest an API key may be made to last, in seconds (ten years); without an expiry it lasts until revoked.
pub const MAX_KEY_S: u64 = 10 * 365 * 24 * 3600;

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Look: GET requests (and searches of files).
    Read,
    /// Look and change: everything on the tenant's sandboxes and images.
    Write,
    /// Everything, and the tenant's keys and audit log; in the `default` tenant, every tenant as well.
    Admin,
}

impl Scope {
    /// The wire and store name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// What a capability token may do to its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
pub enum Verb {
    /// See the sandbox: its record, stats and events.
    #[serde(rename = "read")]
    Read,
    /// Run commands and processes, and use terminals.
    #[serde(rename = "exec")]
    Exec,
    /// Read, list, search and watch files.
    #[serde(rename = "files:read")]
    FilesRead,
    /// Write, move and remove files.
    #[serde(rename = "files:write")]
    FilesWrite,
    /// Change its state and settings: stop, start, pause, resume, resize, network, preview, snapshot, fork,
    /// archive, delete.
    #[serde(rename = "manage")]
    Manage,
}

impl Verb {
    /// Every verb.
    pub const ALL: [Verb; 5] = [Self::Read, Self::Exec, Self::FilesRead, Self::FilesWrite, Self::Manage];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Exec => "exec",
            Self::FilesRead => "files:read",
            Self::FilesWrite => "files:write",
            Self::Manage => "manage",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|verb| verb.as_str() == text)
    }
}

/// Limits on what a tenant may hold; absent limits are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantQuota {
    /// The most sandboxes it may have (in any state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxes: Option<u64>,
    /// The most cores its running and paused sandboxes may be given in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// The most memory its running and paused sandboxes may be given in all, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tenant {
    /// Its name (lowercase letters, digits and hyphens), which is also its id.
    pub name: String,
    /// Its limits.
    pub quota: TenantQuota,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Body of `POST /v1/tenants`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// Its name: 1 to 63 lowercase letters, digits and hyphens.
    pub name: String,
    /// Its limits (none when omitted).
    #[serde(default)]
    pub quota: TenantQuota,
}

/// Answer of `GET /v1/tenants`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantList {
    /// Every tenant, oldest first.
    pub tenants: Vec<Tenant>,
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiKeyInfo {
    /// Its id (`key-…`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// What it may do.
    pub scope: Scope,
    /// When it stops working, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was revoked, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it was made.
    pub created_at: DateTime<Utc>,
}

/// Body of `POST /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A name to know it by.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// Its tenant (the caller's when omitted; another only for the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Seconds until it stops working (never, until revoked, when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_s: Option<u64>,
}

/// Answer of `POST /v1/keys`: the key, shown this once (only its hash is kept).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    /// The key to send as `Authorization: Bearer …`.
    pub key: String,
    /// What was recorded of it.
    pub info: ApiKeyInfo,
}

/// Answer of `GET /v1/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// The keys, oldest first.
    pub keys: Vec<ApiKeyInfo>,
}

/// Body of `POST /v1/sandboxes/{sandbox}/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CapabilityRequest {
    /// What the token may do to the sandbox.
    pub verbs: Vec<Verb>,
    /// Seconds until it stops working: 1 to 2592000 (30 days).
    pub expires_in_s: u64,
}

/// A capability token: send it as `Authorization: Bearer …` to use the sandbox within its verbs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CapabilityToken {
    /// The token.
    pub token: String,
    /// The sandbox's id.
    pub sandbox: String,
    /// What it may do.
    pub verbs: Vec<Verb>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// Checks a tenant name: 1 to 63 lowercase letters, digits and hyphens, starting with a letter or digit.
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a tenant name: use 1 to 63 lowercase letters, digits and hyphens, not starting with a hyphen"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_scopes_and_verbs_parse() {
        assert!(check_tenant_name("acme-2").is_ok());
        for bad in ["", "-acme", "Acme", "a_b", &"a".repeat(64)] {
            assert!(check_tenant_name(bad).is_err(), "{bad}");
        }
        assert_eq!(Scope::parse("write"), Some(Scope::Write));
        assert!(Scope::Read < Scope::Write && Scope::Write < Scope::Admin);
        assert_eq!(Verb::parse("files:read"), Some(Verb::FilesRead));
        assert_eq!(serde_json::to_string(&Verb::FilesWrite).unwrap(), "\"files:write\"");
        assert_eq!(Verb::parse("files"), None);
    }
}
