//! E2B sandbox logs (`GET /sandboxes/{id}/logs` and `GET /v2/sandboxes/{id}/logs`), built from the events nook
//! records for every sandbox: each state change (created, running, stopped, started again, failed) and each notable
//! event (an OOM kill, the init exiting) with its reason and a sentence. No SDK method calls these endpoints; they
//! serve E2B's REST clients and dashboards.
//!
//! Levels: failures to create or start and the `error` state are `error`; OOM kills, inits that exited on their own
//! and sandboxes lost on a restart are `warn`; everything else is `info`. Every entry carries its fields
//! (`sandboxID`, `fromState`, `toState`, `reason`). Timestamps in queries are Unix milliseconds, as in E2B's API.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use nook_api::{SandboxEvent, SandboxState, StateReason};
use serde::Serialize;

use crate::rest::{error, not_found_or};
use crate::E2b;

/// Entries answered when the query gives no limit (E2B's default).
const DEFAULT_LIMIT: usize = 1000;

/// A log line of the v1 answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LogLine {
    timestamp: DateTime<Utc>,
    line: String,
}

/// A structured log entry (v1 `logEntries`, v2 `logs`).
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LogEntry {
    timestamp: DateTime<Utc>,
    message: String,
    level: Level,
    fields: BTreeMap<&'static str, String>,
}

/// E2B's log levels, least severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" => Self::Warn,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

fn entry_of(sandbox_id: &str, event: &SandboxEvent) -> LogEntry {
    let level = match event.reason {
        StateReason::CreateFailed | StateReason::StartFailed => Level::Error,
        _ if event.to_state == SandboxState::Error => Level::Error,
        StateReason::Oom | StateReason::InitExited | StateReason::LostOnRestart => Level::Warn,
        StateReason::Requested
        | StateReason::DeadlinePassed
        | StateReason::Resized
        | StateReason::NetworkChanged
        | StateReason::PreviewChanged
        | StateReason::WokenByRequest
        | StateReason::Forked
        | StateReason::Snapshotted
        | StateReason::MemoryGrown
        | StateReason::Idle
        | StateReason::AutoArchived => Level::Info,
    };
    let mut fields = BTreeMap::from([
        ("sandboxID", sandbox_id.to_string()),
        ("toState", event.to_state.to_string()),
        ("reason", event.reason.as_str().to_string()),
    ]);
    if let Some(from) = event.from_state {
        fields.insert("fromState", from.to_string());
    }
    LogEntry {
        timestamp: event.at,
        message: format!("{} ({}): {}", event.to_state, event.reason.as_str(), event.message),
        level,
        fields,
    }
}

/// The query parameters, taken as text so that a bad value gets E2B's error shape.
type Params = HashMap<String, String>;

fn number<T: std::str::FromStr>(params: &Params, name: &str, what: &str) -> Result<Option<T>, String> {
    params
        .get(name)
        .map(|text| text.parse().map_err(|_| format!("{name} {text:?} is not {what}")))
        .transpose()
}

/// A sandbox's entries, oldest first, or the E2B error answer.
async fn entries(e2b: &E2b, id: &str) -> Result<Vec<LogEntry>, Response> {
    let sandbox = e2b
        .control
        .resolve(id)
        .await
        .map_err(|failure| not_found_or(failure, id))?;
    let events = e2b
        .control
        .store()
        .events(&sandbox.id)
        .await
        .map_err(|failure| not_found_or(failure.into(), id))?;
    Ok(events.iter().map(|event| entry_of(&sandbox.id, event)).collect())
}

/// The v1 answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SandboxLogs {
    logs: Vec<LogLine>,
    log_entries: Vec<LogEntry>,
}

/// `GET /sandboxes/{id}/logs?start=&limit=`: entries from `start` (Unix ms) on, oldest first, at most `limit`.
pub async fn logs_v1(State(e2b): State<E2b>, Path(id): Path<String>, Query(params): Query<Params>) -> Response {
    let start = match number::<i64>(&params, "start", "a Unix time in milliseconds") {
        Ok(start) => start,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let limit = match number::<usize>(&params, "limit", "a count") {
        Ok(limit) => limit.unwrap_or(DEFAULT_LIMIT),
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let entries = match entries(&e2b, &id).await {
        Ok(entries) => entries,
        Err(response) => return response,
    };
    let log_entries: Vec<LogEntry> = entries
        .into_iter()
        .filter(|entry| start.is_none_or(|start| entry.timestamp.timestamp_millis() >= start))
        .take(limit)
        .collect();
    let logs = log_entries
        .iter()
        .map(|entry| LogLine {
            timestamp: entry.timestamp,
            line: entry.message.clone(),
        })
        .collect();
    Json(SandboxLogs { logs, log_entries }).into_response()
}

/// The v2 answer.
#[derive(Debug, Serialize)]
struct SandboxLogsV2 {
    logs: Vec<LogEntry>,
}

/// `GET /v2/sandboxes/{id}/logs?cursor=&limit=&direction=&level=&search=`: entries of at least `level` whose
/// message contains `search`; `forward` (the default) from `cursor` (Unix ms) on, oldest first; `backward` up to
/// `cursor`, newest first; at most `limit` (up to 1000).
pub async fn logs_v2(State(e2b): State<E2b>, Path(id): Path<String>, Query(params): Query<Params>) -> Response {
    let cursor = match number::<i64>(&params, "cursor", "a Unix time in milliseconds") {
        Ok(cursor) => cursor,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let limit = match number::<usize>(&params, "limit", "a count") {
        Ok(Some(limit)) if limit > DEFAULT_LIMIT => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("limit {limit} is over the maximum of {DEFAULT_LIMIT}"),
            )
        }
        Ok(limit) => limit.unwrap_or(DEFAULT_LIMIT),
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let backward = match params.get("direction").map(String::as_str) {
        None | Some("forward") => false,
        Some("backward") => true,
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("direction {other:?} is neither forward nor backward"),
            )
        }
    };
    let level = match params.get("level").map(|text| (text, Level::parse(text))) {
        None => Level::Debug,
        Some((_, Some(level))) => level,
        Some((text, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("level {text:?} is not one of debug, info, warn, error"),
            )
        }
    };
    let search = params.get("search").filter(|text| !text.is_empty());
    let mut entries = match entries(&e2b, &id).await {
        Ok(entries) => entries,
        Err(response) => return response,
    };
    if backward {
        entries.reverse();
    }
    let logs = entries
        .into_iter()
        .filter(|entry| {
            cursor.is_none_or(|cursor| {
                let at = entry.timestamp.timestamp_millis();
                if backward {
                    at <= cursor
                } else {
                    at >= cursor
                }
            })
        })
        .filter(|entry| entry.level >= level)
        .filter(|entry| search.is_none_or(|search| entry.message.contains(search.as_str())))
        .take(limit)
        .collect();
    Json(SandboxLogsV2 { logs }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_entries_with_levels_and_fields() {
        let event = SandboxEvent {
            at: DateTime::from_timestamp(1_700_000_000, 5_000_000).unwrap(),
            from_state: Some(SandboxState::Running),
            to_state: SandboxState::Running,
            reason: StateReason::Oom,
            message: "the kernel OOM-killed a process".into(),
        };
        let entry = entry_of("sb-x", &event);
        assert_eq!(entry.level, Level::Warn);
        assert_eq!(entry.message, "running (oom): the kernel OOM-killed a process");
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["level"], "warn");
        assert_eq!(json["fields"]["fromState"], "running");
        assert_eq!(json["fields"]["sandboxID"], "sb-x");
        let failed = SandboxEvent {
            reason: StateReason::CreateFailed,
            to_state: SandboxState::Error,
            from_state: None,
            ..event
        };
        assert_eq!(entry_of("sb-x", &failed).level, Level::Error);
        assert!(Level::Error > Level::Warn && Level::Info > Level::Debug);
    }
}
