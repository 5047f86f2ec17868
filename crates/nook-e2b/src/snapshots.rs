//! E2B snapshots and forks (what `create_snapshot`, `list_snapshots`, `delete_snapshot` and `fork` of the 2.x SDKs
//! call) on nook's own snapshot and fork.
//!
//! - `POST /sandboxes/{id}/snapshots` (`{"name"?, "memory"?}`) makes a nook image from the sandbox's files with
//!   [`Control::snapshot`](nook_control::control::Control::snapshot): the sandbox is frozen only while its files are
//!   captured and keeps running. The snapshot id is the image's name (the given name, or `snapshot-` and 20 random
//!   hex digits), so `Sandbox.create(<snapshot id>)` makes a sandbox from it through the ordinary template path. An
//!   existing name of an earlier snapshot is moved to the new one, as E2B assigns a new build to an existing snapshot
//!   template; a name held by an image that is not an E2B snapshot (`base`, a built template) is refused.
//!   nook's container sandboxes have no memory checkpoints, so a `full` snapshot (E2B's default, `memory: true`) is
//!   the filesystem snapshot too: sandboxes made from it boot fresh, without the source's processes.
//! - `GET /snapshots?sandboxID=&name=&limit=&nextToken=` lists them, newest first, paged by `x-next-token`.
//! - `DELETE /templates/{id}` (the SDK's `delete_snapshot`) removes a snapshot's image name; layers still used by
//!   sandboxes stay until nothing uses them. 404 when the id is no snapshot, so the SDK answers `False`.
//! - `POST /sandboxes/{id}/fork` (`{"count"?, "timeout"?}`) is [`Control::fork`](nook_control::control::Control::fork):
//!   `count` (1 to 20) new running sandboxes with the source's files, copy-on-write; the source keeps running. Each
//!   fork gets the timeout (E2B's default when absent) as a create does. nook makes all forks or none, so the answer
//!   lists every fork as made, or the whole request fails; a fork whose deadline cannot be set is deleted again and
//!   reported as that fork's error, as E2B reports forks one by one.
//!
//! Which sandbox each snapshot came from, and when, is kept in `e2b-snapshots.json` in the data directory (written
//! whole to a temporary file and renamed over the old one), with the digest of the image made: a record whose name
//! no longer names that image (removed or replaced through nook's own API) is no snapshot any more and is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use nook_api::{ForkRequest, SnapshotRequest};
use nook_control::error::ApiFailure;
use serde::{Deserialize, Serialize};

use crate::rest::{error, not_found_or, parse_body, timeout_of, E2bSandbox, Failure};
use crate::E2b;

/// Most forks one request makes (E2B's documented limit).
pub const MAX_FORK_COUNT: i64 = 20;
/// Most snapshots kept; beyond it a new one is refused until some are deleted.
const MAX_SNAPSHOTS: usize = 10_000;
/// Largest page of the list (the SDK asks for 100 unless told otherwise).
const MAX_PAGE: usize = 1000;
/// Longest filter value accepted in the list's query.
const MAX_FILTER_LEN: usize = 255;
/// Prefix of the ids of snapshots made without a name.
const GENERATED_PREFIX: &str = "snapshot-";
/// Version of the record file's layout.
const FILE_VERSION: u32 = 1;

/// What could go wrong with the snapshot records.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotsError {
    /// The record file could not be read.
    #[error("cannot read the E2B snapshot records at {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The record file is not what nook writes.
    #[error("the E2B snapshot records at {path} are not valid")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The record file could not be written.
    #[error("cannot write the E2B snapshot records at {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One snapshot an E2B client made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRecord {
    /// The snapshot id: the name of the nook image.
    id: String,
    /// The sandbox it was made from.
    sandbox_id: String,
    /// The digest of the image it made (the name is this snapshot's only while it names that image).
    digest: String,
    /// When it was made.
    created_at: DateTime<Utc>,
}

/// The record file.
#[derive(Debug, Serialize, Deserialize)]
struct RecordFile {
    version: u32,
    snapshots: Vec<SnapshotRecord>,
}

/// The snapshots E2B clients made, kept in the data directory.
pub struct Snapshots {
    path: PathBuf,
    /// The records, in the order they were made; the file is rewritten whole under this lock.
    records: tokio::sync::Mutex<Vec<SnapshotRecord>>,
    /// Held while a name is checked, snapshotted and recorded, or deleted, so that the record of a name always
    /// names the image that holds it.
    naming: tokio::sync::Mutex<()>,
}

impl Snapshots {
    /// The records in `data_dir/e2b-snapshots.json` (none when the file does not exist yet).
    pub fn open(data_dir: &Path) -> Result<Self, SnapshotsError> {
        let path = data_dir.join("e2b-snapshots.json");
        let records = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: RecordFile = serde_json::from_slice(&bytes).map_err(|source| SnapshotsError::Parse {
                    path: path.clone(),
                    source,
                })?;
                file.snapshots
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(SnapshotsError::Read { path, source }),
        };
        Ok(Self {
            path,
            records: tokio::sync::Mutex::new(records),
            naming: tokio::sync::Mutex::new(()),
        })
    }

    async fn get(&self, id: &str) -> Option<SnapshotRecord> {
        self.records.lock().await.iter().find(|record| record.id == id).cloned()
    }

    async fn all(&self) -> Vec<SnapshotRecord> {
        self.records.lock().await.clone()
    }

    async fn count(&self) -> usize {
        self.records.lock().await.len()
    }

    /// Records a snapshot, replacing an earlier record of the same id.
    async fn record(&self, record: SnapshotRecord) -> Result<(), SnapshotsError> {
        self.change(|records| {
            records.retain(|old| old.id != record.id);
            records.push(record);
        })
        .await
    }

    /// Forgets the snapshots with these ids.
    async fn forget(&self, ids: &[&str]) -> Result<(), SnapshotsError> {
        self.change(|records| records.retain(|record| !ids.contains(&record.id.as_str())))
            .await
    }

    /// Applies `change` to the records once the changed records are on disk.
    async fn change(&self, change: impl FnOnce(&mut Vec<SnapshotRecord>)) -> Result<(), SnapshotsError> {
        let mut records = self.records.lock().await;
        let mut changed = records.clone();
        change(&mut changed);
        if changed == *records {
            return Ok(());
        }
        self.write(&changed).await?;
        *records = changed;
        Ok(())
    }

    async fn write(&self, records: &[SnapshotRecord]) -> Result<(), SnapshotsError> {
        use tokio::io::AsyncWriteExt as _;
        let file = RecordFile {
            version: FILE_VERSION,
            snapshots: records.to_vec(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("records serialize");
        let partial = self.path.with_extension("json.partial");
        let written = async {
            let mut out = tokio::fs::File::create(&partial).await?;
            out.write_all(&bytes).await?;
            out.sync_all().await?;
            tokio::fs::rename(&partial, &self.path).await
        }
        .await;
        written.map_err(|source| {
            let _ = std::fs::remove_file(&partial);
            SnapshotsError::Write {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// A failure to keep the records, as an E2B error.
fn records_failed(problem: &SnapshotsError) -> Response {
    Failure(ApiFailure::internal("the snapshot records could not be kept", problem)).into_response()
}

/// Body of `POST /sandboxes/{id}/snapshots` (unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
struct SnapshotBody {
    /// The snapshot's name (an existing snapshot's name moves to the new one).
    name: Option<String>,
    /// `true`: memory and files (`full`, the default); `false`: files only (`filesystem`).
    memory: Option<bool>,
    /// The same as `mode`, as some clients send it: `full` or `filesystem`.
    mode: Option<String>,
}

impl SnapshotBody {
    /// Whether memory was asked for (E2B's default: yes).
    fn wants_memory(&self) -> Result<bool, String> {
        let mode = match self.mode.as_deref() {
            None => None,
            Some("full") => Some(true),
            Some("filesystem") => Some(false),
            Some(other) => return Err(format!("mode {other:?} must be \"full\" or \"filesystem\"")),
        };
        match (mode, self.memory) {
            (Some(a), Some(b)) if a != b => Err("mode and memory disagree; give one of them".into()),
            (mode, memory) => Ok(mode.or(memory).unwrap_or(true)),
        }
    }
}

/// Answer of the create and list calls.
#[derive(Debug, Serialize)]
struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    snapshot_id: String,
    names: Vec<String>,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "createdAt")]
    created_at: DateTime<Utc>,
}

impl From<&SnapshotRecord> for SnapshotInfo {
    fn from(record: &SnapshotRecord) -> Self {
        Self {
            snapshot_id: record.id.clone(),
            names: vec![record.id.clone()],
            sandbox_id: record.sandbox_id.clone(),
            created_at: record.created_at,
        }
    }
}

/// A new id for a snapshot made without a name.
fn generated_id() -> String {
    nook_control::ids::random_id(GENERATED_PREFIX)
}

/// Checks a snapshot name given by a client.
fn check_name(name: &str) -> Result<(), String> {
    nook_api::names::check_image_name(name).map_err(|message| format!("the snapshot name is not valid: {message}"))?;
    if crate::interpreter::TEMPLATES.contains(&name) {
        return Err(format!(
            "{name:?} is the code interpreter's template; choose another snapshot name"
        ));
    }
    Ok(())
}

/// `POST /sandboxes/{id}/snapshots`.
pub(crate) async fn create_snapshot(
    State(e2b): State<E2b>,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let body: SnapshotBody = match parse_body(&body) {
        Ok(body) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let memory = match body.wants_memory() {
        Ok(memory) => memory,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(name) = &body.name {
        if let Err(message) = check_name(name) {
            return error(StatusCode::BAD_REQUEST, message);
        }
    }
    let sandbox = match e2b.control.resolve(&id).await {
        Ok(sandbox) => sandbox,
        Err(failure) => return not_found_or(failure, &id),
    };
    if memory {
        // nook's container sandboxes have no memory checkpoints: a full snapshot keeps the files only, and
        // sandboxes made from it start fresh (without the source's processes), as a filesystem snapshot's do.
        tracing::debug!(sandbox = %sandbox.id, "full snapshot asked for; nook snapshots the filesystem only");
    }
    // A name may be taken by a snapshot made meanwhile; a generated id is new.
    let _naming = match &body.name {
        Some(_) => Some(e2b.snapshots.naming.lock().await),
        None => None,
    };
    let snapshot_id = match &body.name {
        Some(name) => {
            match e2b.control.runner().image(name).await {
                Ok(image) => {
                    let ours = e2b
                        .snapshots
                        .get(name)
                        .await
                        .is_some_and(|record| record.digest == image.digest);
                    if !ours {
                        return error(
                            StatusCode::CONFLICT,
                            format!("the name {name:?} belongs to a template that is not a snapshot; choose another"),
                        );
                    }
                }
                Err(problem) => {
                    let failure = ApiFailure::from(problem);
                    if failure.status != StatusCode::NOT_FOUND {
                        return Failure(failure).into_response();
                    }
                }
            }
            name.clone()
        }
        None => {
            let mut id = generated_id();
            while e2b.control.runner().image(&id).await.is_ok() {
                id = generated_id();
            }
            id
        }
    };
    if e2b.snapshots.get(&snapshot_id).await.is_none() && e2b.snapshots.count().await >= MAX_SNAPSHOTS {
        return error(
            StatusCode::CONFLICT,
            format!("there are {MAX_SNAPSHOTS} snapshots already; delete some first"),
        );
    }
    let image = match e2b
        .control
        .snapshot(
            &sandbox.id,
            SnapshotRequest {
                image: snapshot_id.clone(),
            },
        )
        .await
    {
        Ok(image) => image,
        Err(failure) => return not_found_or(failure, &id),
    };
    let record = SnapshotRecord {
        id: snapshot_id,
        sandbox_id: sandbox.id,
        digest: image.digest,
        created_at: Utc::now(),
    };
    if let Err(problem) = e2b.snapshots.record(record.clone()).await {
        if body.name.is_none() {
            // Unrecorded, the new image would be no snapshot: it goes again (a named one keeps its name, as a
            // snapshot's name would have moved either way).
            let _ = e2b.control.runner().remove_image(&record.id).await;
        }
        return records_failed(&problem);
    }
    (StatusCode::CREATED, Json(SnapshotInfo::from(&record))).into_response()
}

/// Whether snapshot `id` answers to the list's `name` filter: the id itself, or, for a filter without a tag, any
/// tag of it.
fn name_matches(id: &str, wanted: &str) -> bool {
    if id == wanted {
        return true;
    }
    let (repository, tag) = crate::templates::split_tag(wanted);
    tag.is_none() && crate::templates::split_tag(id).0 == repository
}

/// `GET /snapshots`.
pub(crate) async fn list_snapshots(State(e2b): State<E2b>, Query(query): Query<Vec<(String, String)>>) -> Response {
    let mut sandbox_id = None;
    let mut name = None;
    let mut limit = None;
    let mut next_token = 0usize;
    for (key, value) in query {
        let too_long = value.len() > MAX_FILTER_LEN;
        match key.as_str() {
            "sandboxID" | "name" if too_long => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{key} is longer than {MAX_FILTER_LEN} characters"),
                )
            }
            "sandboxID" => sandbox_id = Some(value),
            "name" => name = Some(value),
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = Some(n),
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("limit {value:?} must be 1 to {MAX_PAGE}"),
                    )
                }
            },
            "nextToken" => match value.parse() {
                Ok(offset) => next_token = offset,
                Err(_) => return error(StatusCode::BAD_REQUEST, format!("nextToken {value:?} is not valid")),
            },
            _ => {}
        }
    }
    let images = match e2b.control.runner().list_images().await {
        Ok(images) => images,
        Err(problem) => return Failure(ApiFailure::from(problem)).into_response(),
    };
    let digests: HashMap<&str, &str> = images
        .iter()
        .map(|image| (image.name.as_str(), image.digest.as_str()))
        .collect();
    let (mut live, stale): (Vec<SnapshotRecord>, Vec<SnapshotRecord>) = e2b
        .snapshots
        .all()
        .await
        .into_iter()
        .partition(|record| digests.get(record.id.as_str()) == Some(&record.digest.as_str()));
    if !stale.is_empty() {
        // Gone or replaced through nook's own API: no snapshots any more. Checked again under the naming lock, so
        // a snapshot made meanwhile is not forgotten.
        let _naming = e2b.snapshots.naming.lock().await;
        let mut gone = Vec::new();
        for record in &stale {
            let current = e2b.snapshots.get(&record.id).await;
            let image = e2b.control.runner().image(&record.id).await;
            let still_ours = image.is_ok_and(|image| image.digest == record.digest);
            let still_stale = current.as_ref() == Some(record) && !still_ours;
            if still_stale {
                gone.push(record.id.as_str());
            }
        }
        if let Err(problem) = e2b.snapshots.forget(&gone).await {
            tracing::warn!(error = %problem, "forgetting removed E2B snapshots failed");
        }
    }
    live.retain(|record| {
        sandbox_id.as_ref().is_none_or(|wanted| &record.sandbox_id == wanted)
            && name.as_ref().is_none_or(|wanted| name_matches(&record.id, wanted))
    });
    live.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
    let matched = live.len();
    let page: Vec<SnapshotInfo> = live
        .iter()
        .skip(next_token)
        .take(limit.unwrap_or(usize::MAX))
        .map(SnapshotInfo::from)
        .collect();
    let mut response = Json(&page).into_response();
    if let Some(limit) = limit {
        if matched > next_token.saturating_add(limit) {
            let token = (next_token + limit).to_string();
            response
                .headers_mut()
                .insert("x-next-token", token.parse().expect("digits are a valid header"));
        }
    }
    response
}

/// `DELETE /templates/{id}` for a snapshot: `None` when `id` was never recorded as one (the caller answers for
/// templates).
pub(crate) async fn delete_snapshot(e2b: &E2b, id: &str) -> Option<Response> {
    let _naming = e2b.snapshots.naming.lock().await;
    let record = e2b.snapshots.get(id).await?;
    let not_found = || error(StatusCode::NOT_FOUND, format!("snapshot {id} not found"));
    let ours = match e2b.control.runner().image(id).await {
        Ok(image) => image.digest == record.digest,
        Err(_) => false,
    };
    let answer = if ours {
        match e2b.control.runner().remove_image(id).await {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(problem) => {
                let failure = ApiFailure::from(problem);
                if failure.status != StatusCode::NOT_FOUND {
                    return Some(Failure(failure).into_response());
                }
                not_found()
            }
        }
    } else {
        // Removed or replaced through nook's own API: the snapshot is gone, and what holds the name now stays.
        not_found()
    };
    if let Err(problem) = e2b.snapshots.forget(&[id]).await {
        return Some(records_failed(&problem));
    }
    Some(answer)
}

/// Body of `POST /sandboxes/{id}/fork` (unknown fields ignored).
#[derive(Debug, Default, Deserialize)]
struct ForkBody {
    /// Timeout of each fork in seconds (E2B's default when absent).
    timeout: Option<u64>,
    /// How many forks (1 when absent).
    count: Option<i64>,
}

/// One entry of the fork answer (E2B's shape also has entries for forks that failed; nook makes all or none).
#[derive(Debug, Serialize)]
struct ForkOutcome {
    sandbox: Box<E2bSandbox>,
}

/// `POST /sandboxes/{id}/fork`.
pub(crate) async fn fork(State(e2b): State<E2b>, UrlPath(id): UrlPath<String>, body: axum::body::Bytes) -> Response {
    let body: ForkBody = match parse_body(&body) {
        Ok(body) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let count = body.count.unwrap_or(1);
    if !(1..=MAX_FORK_COUNT).contains(&count) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("count {count} must be between 1 and {MAX_FORK_COUNT}"),
        );
    }
    let timeout = match timeout_of(body.timeout) {
        Ok(timeout) => timeout,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    let source = match e2b.control.resolve(&id).await {
        Ok(source) => source,
        Err(failure) => return not_found_or(failure, &id),
    };
    // A fork lives as long as a sandbox created with this timeout, and ends as its source would.
    let request = ForkRequest {
        count: Some(count as u32),
        timeout_s: Some(timeout),
        on_deadline: Some(source.on_deadline),
        ..Default::default()
    };
    match e2b.control.fork(&source.id, request).await {
        Ok(forked) => {
            let outcomes: Vec<ForkOutcome> = forked
                .sandboxes
                .iter()
                .map(|fork| {
                    e2b.metrics.track(&fork.id);
                    ForkOutcome {
                        sandbox: Box::new(e2b.describe(fork)),
                    }
                })
                .collect();
            (StatusCode::CREATED, Json(outcomes)).into_response()
        }
        Err(failure) => not_found_or(failure, &id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_bodies_ask_for_full_or_filesystem() {
        let parse = |text: &str| parse_body::<SnapshotBody>(text.as_bytes()).expect("a snapshot body");
        assert_eq!(parse("").wants_memory(), Ok(true));
        assert_eq!(parse(r#"{"name":"s1"}"#).wants_memory(), Ok(true));
        assert_eq!(parse(r#"{"memory":false}"#).wants_memory(), Ok(false));
        assert_eq!(parse(r#"{"mode":"filesystem"}"#).wants_memory(), Ok(false));
        assert_eq!(parse(r#"{"mode":"full","memory":true}"#).wants_memory(), Ok(true));
        assert!(parse(r#"{"mode":"full","memory":false}"#).wants_memory().is_err());
        assert!(parse(r#"{"mode":"disk"}"#).wants_memory().is_err());
    }

    #[test]
    fn names_filter_by_id_or_untagged_name() {
        assert!(name_matches("my-snap", "my-snap"));
        assert!(name_matches("my-snap:v1", "my-snap"));
        assert!(name_matches("my-snap:v1", "my-snap:v1"));
        assert!(!name_matches("my-snap:v1", "my-snap:v2"));
        assert!(!name_matches("my-snapshot", "my-snap"));
        assert!(name_matches("team/my-snap:v2", "team/my-snap"));
    }

    #[test]
    fn names_are_checked_and_ids_generated() {
        assert!(check_name("my-snap:v1").is_ok());
        assert!(check_name("My-Snap").is_err());
        assert!(check_name("../x").is_err());
        assert!(check_name("code-interpreter-v1").is_err());
        let id = generated_id();
        assert!(id.starts_with(GENERATED_PREFIX) && id.len() == GENERATED_PREFIX.len() + 20);
        assert!(check_name(&id).is_ok());
    }

    #[tokio::test]
    async fn records_survive_a_reopen_and_a_name_moves() {
        let dir = std::env::temp_dir().join(format!("nook-e2b-snapshots-{}", generated_id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let record = |id: &str, digest: &str| SnapshotRecord {
            id: id.into(),
            sandbox_id: "sb-abcdefghij0123456789".into(),
            digest: digest.into(),
            created_at: Utc::now(),
        };
        let snapshots = Snapshots::open(&dir).expect("no records yet");
        snapshots.record(record("one", "sha256:1")).await.expect("recorded");
        snapshots.record(record("two", "sha256:2")).await.expect("recorded");
        snapshots.record(record("one", "sha256:3")).await.expect("moved");
        let reopened = Snapshots::open(&dir).expect("the records");
        let all = reopened.all().await;
        assert_eq!(all.len(), 2);
        assert_eq!(
            reopened.get("one").await.map(|record| record.digest),
            Some("sha256:3".into())
        );
        reopened.forget(&["two"]).await.expect("forgotten");
        assert_eq!(Snapshots::open(&dir).expect("the records").count().await, 1);
        std::fs::write(dir.join("e2b-snapshots.json"), b"{not json").expect("written");
        assert!(matches!(Snapshots::open(&dir), Err(SnapshotsError::Parse { .. })));
        std::fs::remove_dir_all(&dir).expect("cleaned up");
    }
}
