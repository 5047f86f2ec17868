//! `filesystem.Filesystem`: stat, list, mkdir, move, remove and watches, through nook's agent.
//!
//! Paths are resolved against the acting user's home (see [`super::resolve_path`]); directories created belong to
//! that user. Entries carry owner and group names from the sandbox's own account files. A symlink is reported as
//! `FILE_TYPE_SYMLINK` with `isSymlink` set, so both SDK languages see it as a link. Watches stream inotify events
//! named relative to the watched directory, with the entry of the path when asked (`includeEntry`); the polling
//! variant (`CreateWatcher`, used by the synchronous Python SDK) buffers them per watcher, bounded, until fetched.
//! Entries carry the path's user metadata (its `user.e2b.*` extended attributes). `allowNetworkMounts` is accepted
//! and changes nothing: a sandbox has no network file systems to refuse.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use nook_agent_proto::{FileKind, FileStat, Names, Request, WatchEventKind};

use super::connect::{self, Codec, ConnectError, RequestMessage};
use super::messages::{
    CreateWatcherResponse, Empty, EntryInfo, EntryResponse, EventType, FileType, FilesystemEvent, ListDirRequest,
    ListDirResponse, MoveRequest, PathRequest, WatchDirResponse, WatchRequest, WatcherEventsResponse, WatcherRequest,
};
use super::{account, resolve_path, target, user_of};
use crate::E2b;

/// Most events a polling watcher holds before the oldest are dropped.
const MAX_BUFFERED_EVENTS: usize = 10_000;
/// Most polling watchers at once (over all sandboxes).
const MAX_WATCHERS: usize = 1024;

/// The parts of a filesystem call: the sandbox, the acting user's account, the message.
struct Call<T> {
    sandbox: nook_api::Sandbox,
    account: nook_agent_proto::AccountInfo,
    message: T,
}

async fn call<T: RequestMessage>(
    e2b: &E2b,
    codec: Codec,
    request: axum::extract::Request,
) -> Result<Call<T>, ConnectError> {
    let (parts, body) = request.into_parts();
    let sandbox = target(&parts.extensions)?;
    let user = user_of(&parts.headers)?;
    let message = codec.read(body).await?;
    let account = account(e2b, &sandbox, &user).await?;
    Ok(Call {
        sandbox,
        account,
        message,
    })
}

/// Names of the owners of `stats`.
async fn names(e2b: &E2b, sandbox: &str, stats: &[FileStat]) -> Result<Names, ConnectError> {
    let uids: BTreeSet<u32> = stats.iter().map(|stat| stat.uid).collect();
    let gids: BTreeSet<u32> = stats.iter().map(|stat| stat.gid).collect();
    let request = Request::Names {
        uids: uids.into_iter().collect(),
        gids: gids.into_iter().collect(),
    };
    Ok(e2b.control.file_call(sandbox, request).await?)
}

/// The `-rw-r--r--` form of a mode (Go's spelling: `L` for links, `d` for directories).
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut text = String::with_capacity(10);
    text.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'L',
        FileKind::Other => '?',
        FileKind::File => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        text.push(if bits & 4 != 0 { 'r' } else { '-' });
        text.push(if bits & 2 != 0 { 'w' } else { '-' });
        text.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    text
}

/// envd's entry for a stat.
fn entry(stat: FileStat, names: &Names) -> EntryInfo {
    let kind = match stat.kind {
        FileKind::File => FileType::File,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Other => FileType::Unspecified,
    };
    EntryInfo {
        name: stat.name,
        kind,
        path: stat.path,
        size: stat.size,
        mode: stat.mode & 0o777,
        permissions: permissions(stat.kind, stat.mode),
        owner: names
            .users
            .get(&stat.uid)
            .cloned()
            .unwrap_or_else(|| stat.uid.to_string()),
        group: names
            .groups
            .get(&stat.gid)
            .cloned()
            .unwrap_or_else(|| stat.gid.to_string()),
        modified_time: chrono::DateTime::from_timestamp_millis(stat.modified_ms),
        is_symlink: stat.kind == FileKind::Symlink,
        symlink_target: stat.symlink_target,
        metadata: stat.metadata,
    }
}

/// The entry of a stat, with its owner's names.
async fn named_entry(e2b: &E2b, sandbox: &str, stat: FileStat) -> Result<EntryInfo, ConnectError> {
    let names = names(e2b, sandbox, std::slice::from_ref(&stat)).await?;
    Ok(entry(stat, &names))
}

/// The entry of a path.
async fn stat_entry(e2b: &E2b, sandbox: &str, path: &str) -> Result<EntryInfo, ConnectError> {
    let stat: FileStat = e2b
        .control
        .file_call(sandbox, Request::Stat { path: path.to_string() })
        .await?;
    named_entry(e2b, sandbox, stat).await
}

/// `Stat`.
pub async fn stat(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<PathRequest> = call(&e2b, codec, request).await?;
            let path = resolve_path(&call.message.path, &call.account.home)?;
            Ok(EntryResponse {
                entry: stat_entry(&e2b, &call.sandbox.id, &path).await?,
            })
        }
        .await,
    )
}

/// `ListDir` (depth 0 means 1).
pub async fn list_dir(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<ListDirRequest> = call(&e2b, codec, request).await?;
            let path = resolve_path(&call.message.path, &call.account.home)?;
            let request = Request::ListDir {
                path,
                depth: call.message.depth.max(1),
            };
            let stats: Vec<FileStat> = e2b.control.file_call(&call.sandbox.id, request).await?;
            let names = names(&e2b, &call.sandbox.id, &stats).await?;
            Ok(ListDirResponse {
                entries: stats.into_iter().map(|stat| entry(stat, &names)).collect(),
            })
        }
        .await,
    )
}

/// `MakeDir`: `already_exists` when the directory exists, `invalid_argument` when something else is there; new
/// directories belong to the acting user.
pub async fn make_dir(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<PathRequest> = call(&e2b, codec, request).await?;
            let path = resolve_path(&call.message.path, &call.account.home)?;
            let existing: Result<FileStat, _> = e2b
                .control
                .file_call(&call.sandbox.id, Request::Stat { path: path.clone() })
                .await;
            match existing {
                Ok(stat) if stat.kind == FileKind::Dir => {
                    return Err(ConnectError::new("already_exists", format!("{path} already exists")))
                }
                Ok(_) => return Err(ConnectError::invalid(format!("{path} exists and is not a directory"))),
                Err(_) => {}
            }
            let request = Request::MakeDir {
                path: path.clone(),
                owner: Some((call.account.uid, call.account.gid)),
            };
            let created: FileStat = e2b.control.file_call(&call.sandbox.id, request).await?;
            Ok(EntryResponse {
                entry: named_entry(&e2b, &call.sandbox.id, created).await?,
            })
        }
        .await,
    )
}

/// `Move`: missing parents of the destination are created first (belonging to the acting user), as envd does.
pub async fn move_path(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<MoveRequest> = call(&e2b, codec, request).await?;
            let from = resolve_path(&call.message.source, &call.account.home)?;
            let to = resolve_path(&call.message.destination, &call.account.home)?;
            if let Some(parent) = std::path::Path::new(&to).parent().and_then(|parent| parent.to_str()) {
                let exists = e2b
                    .control
                    .file_call::<FileStat>(
                        &call.sandbox.id,
                        Request::Stat {
                            path: parent.to_string(),
                        },
                    )
                    .await
                    .is_ok();
                if !exists {
                    let request = Request::MakeDir {
                        path: parent.to_string(),
                        owner: Some((call.account.uid, call.account.gid)),
                    };
                    e2b.control.file_call::<FileStat>(&call.sandbox.id, request).await?;
                }
            }
            let moved: FileStat = e2b
                .control
                .file_call(&call.sandbox.id, Request::Move { from, to })
                .await?;
            Ok(EntryResponse {
                entry: named_entry(&e2b, &call.sandbox.id, moved).await?,
            })
        }
        .await,
    )
}

/// `Remove`: recursive; a missing path is not an error.
pub async fn remove(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<PathRequest> = call(&e2b, codec, request).await?;
            let path = resolve_path(&call.message.path, &call.account.home)?;
            let request = Request::Remove { path, recursive: true };
            match e2b
                .control
                .file_call::<serde_json::Value>(&call.sandbox.id, request)
                .await
            {
                Ok(_) => Ok(Empty {}),
                Err(failure) if failure.code == "not_found" => Ok(Empty {}),
                Err(failure) => Err(failure.into()),
            }
        }
        .await,
    )
}

/// Starts a watch: the agent's events as envd events named relative to `path`.
async fn start_watch(
    e2b: &E2b,
    call: &Call<WatchRequest>,
) -> Result<(String, nook_runner::agent_client::WatchEvents), ConnectError> {
    let path = resolve_path(&call.message.path, &call.account.home)?;
    let stat: FileStat = e2b
        .control
        .file_call(&call.sandbox.id, Request::Stat { path: path.clone() })
        .await?;
    if stat.kind != FileKind::Dir {
        return Err(ConnectError::invalid(format!("{path} is not a directory")));
    }
    let events = e2b
        .control
        .watch(&call.sandbox.id, &path, call.message.recursive)
        .await?;
    Ok((path, events))
}

/// Turns a watch's agent events into envd's, with the entry of each created, written or changed path when the
/// watch asked for entries (`includeEntry`): envd leaves it out for removals and renames, and for a path that is
/// gone by the time it is looked at. Owner names are looked up once per id and watch.
struct EventConverter {
    e2b: E2b,
    sandbox: String,
    root: String,
    include_entry: bool,
    names: Names,
    looked_up: (BTreeSet<u32>, BTreeSet<u32>),
}

impl EventConverter {
    fn new(e2b: &E2b, call: &Call<WatchRequest>, root: String) -> Self {
        Self {
            e2b: e2b.clone(),
            sandbox: call.sandbox.id.clone(),
            root,
            include_entry: call.message.include_entry,
            names: Names::default(),
            looked_up: Default::default(),
        }
    }

    async fn convert(&mut self, event: nook_agent_proto::WatchEvent) -> Option<FilesystemEvent> {
        let with_entry = self.include_entry
            && matches!(
                event.kind,
                WatchEventKind::Create | WatchEventKind::Write | WatchEventKind::Metadata
            );
        let path = event.path.clone();
        let mut converted = filesystem_event(&self.root, event)?;
        if with_entry {
            converted.entry = self.entry(path).await;
        }
        Some(converted)
    }

    async fn entry(&mut self, path: String) -> Option<EntryInfo> {
        let stat: FileStat = self
            .e2b
            .control
            .file_call(&self.sandbox, Request::Stat { path })
            .await
            .ok()?;
        let (uids, gids) = &mut self.looked_up;
        if uids.insert(stat.uid) | gids.insert(stat.gid) {
            if let Ok(more) = names(&self.e2b, &self.sandbox, std::slice::from_ref(&stat)).await {
                self.names.users.extend(more.users);
                self.names.groups.extend(more.groups);
            }
        }
        Some(entry(stat, &self.names))
    }
}

/// An agent event as envd's, or `None` for kinds envd does not report.
fn filesystem_event(root: &str, event: nook_agent_proto::WatchEvent) -> Option<FilesystemEvent> {
    let kind = match event.kind {
        WatchEventKind::Create => EventType::Create,
        WatchEventKind::Write => EventType::Write,
        WatchEventKind::Remove => EventType::Remove,
        WatchEventKind::RenameFrom | WatchEventKind::RenameTo => EventType::Rename,
        WatchEventKind::Metadata => EventType::Chmod,
        WatchEventKind::Overflow => return None,
    };
    let name = event
        .path
        .strip_prefix(root.trim_end_matches('/'))
        .map(|rest| rest.trim_start_matches('/').to_string())
        .unwrap_or(event.path);
    Some(FilesystemEvent {
        name,
        kind,
        entry: None,
    })
}

/// `WatchDir` (server streaming): `start{}`, then events and keepalives until the client goes away or the call's
/// `connect-timeout-ms` passes (then `deadline_exceeded`, as envd ends it).
pub async fn watch_dir(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    let keepalive = request
        .headers()
        .get("keepalive-ping-interval")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|seconds| *seconds > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(90));
    let deadline = connect::timeout(request.headers()).map(|timeout| tokio::time::Instant::now() + timeout);
    let started = async {
        let call: Call<WatchRequest> = call(&e2b, codec, request).await?;
        let (root, events) = start_watch(&e2b, &call).await?;
        Ok((EventConverter::new(&e2b, &call, root), events))
    }
    .await;
    let (mut converter, mut events) = match started {
        Ok(started) => started,
        Err(error) => return codec.stream_error::<WatchDirResponse>(error),
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        if sender.send(Ok(WatchDirResponse::Start {})).await.is_err() {
            return;
        }
        loop {
            let next = tokio::select! {
                biased;
                _ = connect::until(deadline) => {
                    let error = ConnectError::new("deadline_exceeded", "the watch's timeout passed");
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                next = tokio::time::timeout(keepalive, events.recv()) => next,
            };
            let message = match next {
                Err(_) => WatchDirResponse::Keepalive {},
                Ok(Some(Ok(event))) => match converter.convert(event).await {
                    Some(event) => WatchDirResponse::Filesystem(Box::new(event)),
                    None => continue,
                },
                Ok(Some(Err(message))) => {
                    let _ = sender.send(Err(ConnectError::internal(message))).await;
                    return;
                }
                Ok(None) => return,
            };
            if sender.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    codec.channel_stream(receiver)
}

/// Polling watchers by id.
#[derive(Debug, Default)]
pub struct Watchers {
    entries: Mutex<HashMap<String, Watcher>>,
}

#[derive(Debug)]
struct Watcher {
    sandbox: String,
    events: Arc<Mutex<WatcherBuffer>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct WatcherBuffer {
    events: Vec<FilesystemEvent>,
    failure: Option<String>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `CreateWatcher`.
pub async fn create_watcher(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<WatchRequest> = call(&e2b, codec, request).await?;
            if e2b.watchers.entries.lock().expect("watchers lock").len() >= MAX_WATCHERS {
                return Err(ConnectError::new(
                    "resource_exhausted",
                    "too many watchers: remove some first",
                ));
            }
            let (root, mut events) = start_watch(&e2b, &call).await?;
            let mut converter = EventConverter::new(&e2b, &call, root);
            let buffer = Arc::new(Mutex::new(WatcherBuffer::default()));
            let filling = buffer.clone();
            let task = tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    match event {
                        Ok(event) => {
                            if let Some(event) = converter.convert(event).await {
                                let mut buffer = filling.lock().expect("watcher buffer lock");
                                if buffer.events.len() == MAX_BUFFERED_EVENTS {
                                    buffer.events.remove(0);
                                }
                                buffer.events.push(event);
                            }
                        }
                        Err(message) => {
                            filling.lock().expect("watcher buffer lock").failure = Some(message);
                            return;
                        }
                    }
                }
            });
            let id = format!("w{:016x}", rand::random::<u64>());
            e2b.watchers.entries.lock().expect("watchers lock").insert(
                id.clone(),
                Watcher {
                    sandbox: call.sandbox.id.clone(),
                    events: buffer,
                    task,
                },
            );
            Ok(CreateWatcherResponse { watcher_id: id })
        }
        .await,
    )
}

/// `GetWatcherEvents`: the events since the last call.
pub async fn get_watcher_events(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<WatcherRequest> = call(&e2b, codec, request).await?;
            let entries = e2b.watchers.entries.lock().expect("watchers lock");
            let watcher = entries
                .get(&call.message.watcher_id)
                .filter(|watcher| watcher.sandbox == call.sandbox.id)
                .ok_or_else(|| ConnectError::not_found(format!("watcher {} not found", call.message.watcher_id)))?;
            let mut buffer = watcher.events.lock().expect("watcher buffer lock");
            if let Some(failure) = &buffer.failure {
                return Err(ConnectError::internal(failure.clone()));
            }
            Ok(WatcherEventsResponse {
                events: std::mem::take(&mut buffer.events),
            })
        }
        .await,
    )
}

/// `RemoveWatcher`.
pub async fn remove_watcher(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let call: Call<WatcherRequest> = call(&e2b, codec, request).await?;
            let mut entries = e2b.watchers.entries.lock().expect("watchers lock");
            match entries.get(&call.message.watcher_id) {
                Some(watcher) if watcher.sandbox == call.sandbox.id => {
                    entries.remove(&call.message.watcher_id);
                    Ok(Empty {})
                }
                _ => Err(ConnectError::not_found(format!(
                    "watcher {} not found",
                    call.message.watcher_id
                ))),
            }
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_spelled_like_go() {
        assert_eq!(permissions(FileKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(FileKind::Symlink, 0o777), "Lrwxrwxrwx");
    }

    #[test]
    fn watch_events_are_named_relative_to_the_root() {
        let event = nook_agent_proto::WatchEvent {
            kind: WatchEventKind::Create,
            path: "/home/user/dir/sub/a.txt".into(),
            is_dir: false,
        };
        let converted = filesystem_event("/home/user/dir/", event).unwrap();
        assert_eq!(converted.name, "sub/a.txt");
        assert_eq!(converted.kind, EventType::Create);
    }
}
