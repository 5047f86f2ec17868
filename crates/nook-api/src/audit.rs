//! The audit log's wire types: every API call (who, what, which sandbox, the result) and every egress decision of
//! the runners' resolvers and egress proxies (allowed or denied, the destination, the rule, why).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The most events one page of `GET /v1/audit` returns.
pub const MAX_AUDIT_PAGE: u32 = 1000;

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A call to the API (native, E2B REST, or E2B's in-sandbox protocols).
    Api,
    /// A decision on a sandbox's outbound traffic by name (the resolver, or the egress proxy).
    Egress,
}

impl AuditKind {
    /// The wire and store name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Egress => "egress",
        }
    }

    /// Parses a wire name.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "api" => Some(Self::Api),
            "egress" => Some(Self::Egress),
            _ => None,
        }
    }
}

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    /// Its number: increasing, unique; pages continue after it.
    pub seq: u64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// What kind of event it is.
    pub kind: AuditKind,
    /// Who: the API key's id and name (`key-… (name)`), a sandbox token, or `unauthenticated`. Absent for egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The client's address (API calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The sandbox concerned: as the call named it (id or name), or the sandbox whose traffic was judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// What: `METHOD /route/{template}` for API calls; `dns` or `proxy` for egress.
    pub action: String,
    /// The destination (`host` or `host:port`) of an egress decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The result: the HTTP status of an API call; `allowed` or `denied` for egress.
    pub outcome: String,
    /// Whether it succeeded (status below 400) or was let through.
    pub allowed: bool,
    /// The rule (1-based) of the sandbox's policy that decided; absent when its default did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<u32>,
    /// Why, in a few words (egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long an API call took to answer, in milliseconds (streams: until their headers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// The tenant the caller or the sandbox belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// The query of `GET /v1/audit` and `GET /v1/audit/export`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<AuditKind>,
    /// Only events about this sandbox (as recorded: the id, or the name a call used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Only events of this tenant (the operator's keys only; other keys see their own tenant's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Only allowed (`true`) or only refused and failed (`false`) events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    /// Only events at or after this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Only events numbered after this one (to page forwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Only events numbered before this one (to page backwards, with `newest_first`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    /// The newest events first (the default is oldest first).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub newest_first: bool,
    /// The most events to return (default 100, at most 1000; export: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Answer of `GET /v1/audit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// The events, oldest first (newest first with `newest_first`).
    pub events: Vec<AuditEvent>,
    /// The cursor of the next page: pass it as `after` (or as `before` with `newest_first`); absent when this
    /// page is the last so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}
