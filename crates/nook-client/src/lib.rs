//! Rust client for nook's native v1 API, used by the CLI and the tests.
//!
//! Each method is one HTTP call. Errors from the server arrive as [`ClientError::Api`] with nook's stable error
//! `code`, so callers can match on it; transport failures keep their cause. Streaming exec returns the NDJSON
//! events one by one as the server sends them.

mod terminal;

use std::collections::BTreeMap;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use nook_api::{
    ApiError, ArchiveResult, Build, BuildEvent, BuildList, BuildRequest, ChmodRequest, ChownRequest,
    CreateSandboxRequest, ExecEvent, ExecRequest, ExecResult, ExitStatus, FileInfo, FileKind, FileList, FindResult,
    Health, Image, ImageList, ImagePruneResult, MakeDirRequest, MoveRequest, ProcessInfo, ProcessList, PullRequest,
    PushRequest, ReplaceRequest, ReplaceResult, Sandbox, SandboxEvent, SandboxEventList, SandboxList, SandboxState,
    SandboxStats, SearchRequest, SearchResult, SignalRequest, TagRequest, TransferEvent, WatchEvent,
};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
pub use terminal::{Terminal, TerminalOutput, TerminalReader, TerminalWriter};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{}{} ({status})", error.message, error.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// nook's error body.
        error: ApiError,
    },
    /// The server could not be reached or the transfer failed.
    #[error("cannot reach the nook server at {url}")]
    Transport {
        /// The server URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A WebSocket (terminal) could not be opened or broke.
    #[error("the terminal connection to {url} failed")]
    WebSocket {
        /// The server URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// The server's answer did not parse.
    #[error("the server's answer is not what this client expects: {0}")]
    Decode(String),
    /// The URL is malformed.
    #[error("invalid server URL {0:?}")]
    BadUrl(String),
}

impl ClientError {
    /// The server's error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A stream of exec events.
pub type ExecEvents = Pin<Box<dyn Stream<Item = Result<ExecEvent, ClientError>> + Send>>;

/// A body of bytes, chunk by chunk, as it arrives.
pub type ByteChunks = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, ClientError>> + Send>>;

/// A connection to one nook server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    key: String,
}

impl Client {
    /// A client for the server at `url` (e.g. `http://127.0.0.1:7070`) using API key `key`.
    pub fn new(url: &str, key: &str) -> Result<Self, ClientError> {
        let base = Url::parse(url).map_err(|_| ClientError::BadUrl(url.to_string()))?;
        if base.cannot_be_a_base() {
            return Err(ClientError::BadUrl(url.to_string()));
        }
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|source| ClientError::Transport {
                url: url.to_string(),
                source,
            })?;
        Ok(Self {
            http,
            base,
            key: key.to_string(),
        })
    }

    /// The server URL.
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    fn url_for(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("checked in new");
            path.pop_if_empty();
            for segment in segments {
                path.push(segment);
            }
        }
        url
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&self.key)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let response = request.send().await.map_err(|source| ClientError::Transport {
            url: self.base.to_string(),
            source,
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        let error = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
            code: "http_error".into(),
            message: format!("the server answered {status}: {}", String::from_utf8_lossy(&bytes)),
            reason: None,
        });
        Err(ClientError::Api { status, error })
    }

    async fn json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        let bytes = response.bytes().await.map_err(|source| ClientError::Transport {
            url: self.base.to_string(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode(error.to_string()))
    }

    /// `GET /v1/health` (needs no key).
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json(self.http.get(self.url_for(&["v1", "health"]))).await
    }

    /// Creates and starts a sandbox.
    pub async fn create_sandbox(&self, request: &CreateSandboxRequest) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes"]))
                .json(request),
        )
        .await
    }

    /// A sandbox by id or name.
    pub async fn sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key])))
            .await
    }

    /// Sandboxes, optionally only those in `state` and carrying all `labels`.
    pub async fn list_sandboxes(
        &self,
        state: Option<SandboxState>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<Sandbox>, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(state) = state {
                query.append_pair("state", state.as_str());
            }
            for (key, value) in labels {
                query.append_pair("label", &format!("{key}={value}"));
            }
        }
        let list: SandboxList = self.json(self.request(Method::GET, url)).await?;
        Ok(list.sandboxes)
    }

    /// Stops a sandbox.
    pub async fn stop_sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "stop"])))
            .await
    }

    /// Sets, moves or removes a sandbox's deadline.
    pub async fn set_deadline(
        &self,
        key: &str,
        request: &nook_api::SetDeadlineRequest,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PUT, self.url_for(&["v1", "sandboxes", key, "deadline"]))
                .json(request),
        )
        .await
    }

    /// Sets a sandbox's lifecycle policy (the fields given; 0 turns one off).
    pub async fn set_lifecycle(&self, key: &str, request: &nook_api::Lifecycle) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PUT, self.url_for(&["v1", "sandboxes", key, "lifecycle"]))
                .json(request),
        )
        .await
    }

    /// Replaces a sandbox's network policy (in force at once for a running sandbox).
    pub async fn set_network(&self, key: &str, policy: &nook_api::NetworkPolicy) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PUT, self.url_for(&["v1", "sandboxes", key, "network"]))
                .json(policy),
        )
        .await
    }

    /// Changes who may reach a sandbox's ports.
    pub async fn set_preview(
        &self,
        key: &str,
        request: &nook_api::PreviewSettingsRequest,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PUT, self.url_for(&["v1", "sandboxes", key, "preview"]))
                .json(request),
        )
        .await
    }

    /// A port's preview URLs and token.
    pub async fn port_access(&self, key: &str, port: u16) -> Result<nook_api::PortAccess, ClientError> {
        let port = port.to_string();
        self.json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "ports", &port])))
            .await
    }

    /// Makes a signed link to a port that works for `expires_in_s` seconds.
    pub async fn make_preview_link(
        &self,
        key: &str,
        port: u16,
        expires_in_s: u64,
    ) -> Result<nook_api::PreviewLink, ClientError> {
        let port = port.to_string();
        self.json(
            self.request(
                Method::POST,
                self.url_for(&["v1", "sandboxes", key, "ports", &port, "links"]),
            )
            .json(&nook_api::PreviewLinkRequest { expires_in_s }),
        )
        .await
    }

    /// A sandbox's signed links.
    pub async fn preview_links(&self, key: &str) -> Result<nook_api::PreviewLinkList, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "links"])))
            .await
    }

    /// Revokes a signed link.
    pub async fn revoke_preview_link(&self, key: &str, link: &str) -> Result<nook_api::PreviewLink, ClientError> {
        self.json(self.request(Method::DELETE, self.url_for(&["v1", "sandboxes", key, "links", link])))
            .await
    }

    /// Pauses a running sandbox (its processes frozen where they are).
    pub async fn pause_sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "pause"])))
            .await
    }

    /// Changes a sandbox's limits (the fields given; `disk_mb: 0` removes the disk quota).
    pub async fn update_resources(
        &self,
        key: &str,
        request: &nook_api::ResourceRequest,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            self.request(Method::PATCH, self.url_for(&["v1", "sandboxes", key, "resources"]))
                .json(request),
        )
        .await
    }

    /// Archives a stopped sandbox (its writable layer goes to the archive store).
    pub async fn archive_sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "archive"])))
            .await
    }

    /// Makes an image from a sandbox's files.
    pub async fn snapshot_sandbox(&self, key: &str, image: &str) -> Result<nook_api::Image, ClientError> {
        let request = nook_api::SnapshotRequest {
            image: image.to_string(),
        };
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "snapshot"]))
                .json(&request),
        )
        .await
    }

    /// Forks a sandbox into new ones.
    pub async fn fork_sandbox(
        &self,
        key: &str,
        request: &nook_api::ForkRequest,
    ) -> Result<nook_api::ForkResult, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "fork"]))
                .json(request),
        )
        .await
    }

    /// Resumes a paused sandbox.
    pub async fn resume_sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "resume"])))
            .await
    }

    /// Starts a stopped sandbox.
    pub async fn start_sandbox(&self, key: &str) -> Result<Sandbox, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "start"])))
            .await
    }

    /// Deletes a sandbox and its files.
    pub async fn delete_sandbox(&self, key: &str) -> Result<(), ClientError> {
        self.send(self.request(Method::DELETE, self.url_for(&["v1", "sandboxes", key])))
            .await?;
        Ok(())
    }

    /// A sandbox's recorded events.
    pub async fn sandbox_events(&self, key: &str) -> Result<Vec<SandboxEvent>, ClientError> {
        let list: SandboxEventList = self
            .json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "events"])))
            .await?;
        Ok(list.events)
    }

    /// What a running sandbox uses now.
    pub async fn sandbox_stats(&self, key: &str) -> Result<SandboxStats, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "stats"])))
            .await
    }

    /// Runs a process to its end and returns its output.
    pub async fn exec(&self, key: &str, request: &ExecRequest) -> Result<ExecResult, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "exec"]))
                .json(request),
        )
        .await
    }

    /// Runs a process and streams its events as they happen.
    pub async fn exec_stream(&self, key: &str, request: &ExecRequest) -> Result<ExecEvents, ClientError> {
        let response = self
            .send(
                self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "exec", "stream"]))
                    .json(request),
            )
            .await?;
        Ok(self.ndjson(response))
    }

    /// Parses an NDJSON body into events as lines arrive.
    /// A response body as a stream of byte chunks (a download, an export), transport failures as errors.
    fn byte_chunks(&self, response: reqwest::Response) -> ByteChunks {
        let url = self.base.to_string();
        Box::pin(response.bytes_stream().map(move |chunk| {
            chunk.map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })
        }))
    }

    fn ndjson<T: DeserializeOwned + Send + 'static>(
        &self,
        response: reqwest::Response,
    ) -> Pin<Box<dyn Stream<Item = Result<T, ClientError>> + Send>> {
        let url = self.base.to_string();
        let bytes = response.bytes_stream();
        let lines = futures::stream::unfold(
            (bytes, Vec::<u8>::new(), false),
            move |(mut bytes, mut buffer, done)| {
                let url = url.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buffer.drain(..=end).collect();
                            let parsed = serde_json::from_slice::<T>(&line[..line.len() - 1])
                                .map_err(|error| ClientError::Decode(error.to_string()));
                            return Some((parsed, (bytes, buffer, false)));
                        }
                        match bytes.next().await {
                            Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                            Some(Err(source)) => {
                                return Some((Err(ClientError::Transport { url, source }), (bytes, buffer, true)))
                            }
                            None if buffer.is_empty() => return None,
                            None => {
                                let error = ClientError::Decode("the stream ended inside a line".into());
                                return Some((Err(error), (bytes, Vec::new(), true)));
                            }
                        }
                    }
                }
            },
        );
        Box::pin(lines)
    }

    /// Starts a background process that outlives this call.
    pub async fn start_process(&self, key: &str, request: &ExecRequest) -> Result<ProcessInfo, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "processes"]))
                .json(request),
        )
        .await
    }

    /// A sandbox's background processes.
    pub async fn processes(&self, key: &str) -> Result<Vec<ProcessInfo>, ClientError> {
        let list: ProcessList = self
            .json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "processes"])))
            .await?;
        Ok(list.processes)
    }

    /// One background process.
    pub async fn process(&self, key: &str, pid: u32) -> Result<ProcessInfo, ClientError> {
        let pid = pid.to_string();
        self.json(self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "processes", &pid])))
            .await
    }

    /// A background process's output from `offset` (0 for all that is still buffered); with `follow`, live until
    /// it exits. Reconnect with the offset after the last byte received to continue without loss or repetition.
    pub async fn process_output(
        &self,
        key: &str,
        pid: u32,
        offset: u64,
        follow: bool,
    ) -> Result<ExecEvents, ClientError> {
        let pid = pid.to_string();
        let mut url = self.url_for(&["v1", "sandboxes", key, "processes", &pid, "output"]);
        url.query_pairs_mut()
            .append_pair("offset", &offset.to_string())
            .append_pair("follow", &follow.to_string());
        let response = self.send(self.request(Method::GET, url)).await?;
        Ok(self.ndjson(response))
    }

    /// Waits until a background process ends.
    pub async fn wait_process(&self, key: &str, pid: u32) -> Result<ExitStatus, ClientError> {
        let pid = pid.to_string();
        self.json(self.request(
            Method::POST,
            self.url_for(&["v1", "sandboxes", key, "processes", &pid, "wait"]),
        ))
        .await
    }

    /// Writes bytes to a background process's standard input, closing it after when `close`.
    pub async fn process_stdin(&self, key: &str, pid: u32, data: Vec<u8>, close: bool) -> Result<(), ClientError> {
        let pid = pid.to_string();
        let mut url = self.url_for(&["v1", "sandboxes", key, "processes", &pid, "stdin"]);
        url.query_pairs_mut().append_pair("close", &close.to_string());
        self.send(
            self.request(Method::POST, url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(data),
        )
        .await?;
        Ok(())
    }

    /// Resizes a background process's terminal.
    pub async fn resize_process(&self, key: &str, pid: u32, cols: u16, rows: u16) -> Result<(), ClientError> {
        let pid = pid.to_string();
        let url = self.url_for(&["v1", "sandboxes", key, "processes", &pid, "resize"]);
        self.send(self.request(Method::POST, url).json(&nook_api::PtySize { cols, rows }))
            .await?;
        Ok(())
    }

    /// Sends a signal to a background process.
    pub async fn signal_process(&self, key: &str, pid: u32, signal: i32) -> Result<(), ClientError> {
        let pid = pid.to_string();
        let url = self.url_for(&["v1", "sandboxes", key, "processes", &pid, "signal"]);
        self.send(self.request(Method::POST, url).json(&SignalRequest { signal }))
            .await?;
        Ok(())
    }

    /// Downloads a file as a stream of byte chunks (nothing is buffered whole).
    pub async fn download_file(&self, key: &str, path: &str) -> Result<ByteChunks, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files"]);
        url.query_pairs_mut().append_pair("path", path);
        let response = self.send(self.request(Method::GET, url)).await?;
        Ok(self.byte_chunks(response))
    }

    /// Uploads a file from a body (a stream, for large files); it appears only once complete. `mode` is permission
    /// bits (0o644 when `None`); `parents` creates missing directories.
    pub async fn upload_file(
        &self,
        key: &str,
        path: &str,
        body: reqwest::Body,
        mode: Option<u32>,
        parents: bool,
    ) -> Result<FileInfo, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files"]);
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("path", path)
                .append_pair("parents", &parents.to_string());
            if let Some(mode) = mode {
                query.append_pair("mode", &format!("{mode:o}"));
            }
        }
        self.json(
            self.request(Method::PUT, url)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body),
        )
        .await
    }

    /// Uploads a `multipart/form-data` form (POST): its file parts go into the directory `path` under their file
    /// names, or to `path` itself when it is not a directory and the form has one file. Answers the files written.
    pub async fn upload_multipart(
        &self,
        key: &str,
        path: &str,
        form: reqwest::multipart::Form,
        parents: bool,
    ) -> Result<Vec<FileInfo>, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("parents", &parents.to_string());
        let list: FileList = self.json(self.request(Method::POST, url).multipart(form)).await?;
        Ok(list.entries)
    }

    /// Downloads a file or directory tree as a tar stream (entries named from the path's last component), with the
    /// path's kind.
    pub async fn download_archive(&self, key: &str, path: &str) -> Result<(FileKind, ByteChunks), ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "archive"]);
        url.query_pairs_mut().append_pair("path", path);
        let response = self.send(self.request(Method::GET, url)).await?;
        let kind = response
            .headers()
            .get("x-nook-file-kind")
            .and_then(|value| value.to_str().ok())
            .and_then(|kind| serde_json::from_value(serde_json::Value::String(kind.to_string())).ok())
            .ok_or_else(|| ClientError::Decode("the archive response has no valid X-Nook-File-Kind".into()))?;
        Ok((kind, self.byte_chunks(response)))
    }

    /// Unpacks a tar stream into the directory `path` (created with `parents`), owned by root unless `owner`
    /// (uid, gid) is given.
    pub async fn upload_archive(
        &self,
        key: &str,
        path: &str,
        body: reqwest::Body,
        parents: bool,
        owner: Option<(u32, u32)>,
    ) -> Result<ArchiveResult, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "archive"]);
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("path", path)
                .append_pair("parents", &parents.to_string());
            if let Some((uid, gid)) = owner {
                query
                    .append_pair("uid", &uid.to_string())
                    .append_pair("gid", &gid.to_string());
            }
        }
        self.json(
            self.request(Method::PUT, url)
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(body),
        )
        .await
    }

    /// A path's metadata.
    pub async fn stat_file(&self, key: &str, path: &str) -> Result<FileInfo, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "stat"]);
        url.query_pairs_mut().append_pair("path", path);
        self.json(self.request(Method::GET, url)).await
    }

    /// A directory's entries, `depth` levels deep.
    pub async fn list_files(&self, key: &str, path: &str, depth: u32) -> Result<Vec<FileInfo>, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "list"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("depth", &depth.to_string());
        let list: FileList = self.json(self.request(Method::GET, url)).await?;
        Ok(list.entries)
    }

    /// `mkdir -p`.
    pub async fn make_dir(&self, key: &str, path: &str) -> Result<FileInfo, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "mkdir"]);
        self.json(
            self.request(Method::POST, url)
                .json(&MakeDirRequest { path: path.into() }),
        )
        .await
    }

    /// Renames or moves a path.
    pub async fn move_file(&self, key: &str, from: &str, to: &str) -> Result<FileInfo, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "move"]);
        self.json(self.request(Method::POST, url).json(&MoveRequest {
            from: from.into(),
            to: to.into(),
        }))
        .await
    }

    /// Removes a path (directories with their contents when `recursive`).
    pub async fn remove_file(&self, key: &str, path: &str, recursive: bool) -> Result<(), ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("recursive", &recursive.to_string());
        self.send(self.request(Method::DELETE, url)).await?;
        Ok(())
    }

    /// Watches a directory: the watch is in place when this returns; events arrive until the stream is dropped.
    pub async fn watch_files(
        &self,
        key: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<WatchEvent, ClientError>> + Send>>, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "watch"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("recursive", &recursive.to_string());
        let response = self.send(self.request(Method::GET, url)).await?;
        let base = self.base.to_string();
        let lines = futures::stream::unfold(
            (response.bytes_stream(), Vec::<u8>::new()),
            move |(mut bytes, mut buffer)| {
                let base = base.clone();
                async move {
                    loop {
                        if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buffer.drain(..=end).collect();
                            let parsed = serde_json::from_slice::<WatchEvent>(&line[..line.len() - 1])
                                .map_err(|error| ClientError::Decode(error.to_string()));
                            return Some((parsed, (bytes, buffer)));
                        }
                        match bytes.next().await? {
                            Ok(chunk) => buffer.extend_from_slice(&chunk),
                            Err(source) => {
                                return Some((Err(ClientError::Transport { url: base, source }), (bytes, Vec::new())))
                            }
                        }
                    }
                }
            },
        );
        Ok(Box::pin(lines))
    }

    /// Paths under `path` whose name matches a glob.
    pub async fn find_files(&self, key: &str, path: &str, pattern: &str) -> Result<FindResult, ClientError> {
        let mut url = self.url_for(&["v1", "sandboxes", key, "files", "find"]);
        url.query_pairs_mut()
            .append_pair("path", path)
            .append_pair("pattern", pattern);
        self.json(self.request(Method::GET, url)).await
    }

    /// Lines matching a regular expression in the files under a path.
    pub async fn search_files(&self, key: &str, request: &SearchRequest) -> Result<SearchResult, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "search"]);
        self.json(self.request(Method::POST, url).json(request)).await
    }

    /// Replaces every match of a regular expression in the given files.
    pub async fn replace_in_files(&self, key: &str, request: &ReplaceRequest) -> Result<ReplaceResult, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "replace"]);
        self.json(self.request(Method::POST, url).json(request)).await
    }

    /// Changes permission bits.
    pub async fn chmod_file(&self, key: &str, path: &str, mode: u32) -> Result<FileInfo, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "chmod"]);
        self.json(self.request(Method::POST, url).json(&ChmodRequest {
            path: path.into(),
            mode,
        }))
        .await
    }

    /// Changes owner and group.
    pub async fn chown_file(&self, key: &str, path: &str, uid: u32, gid: u32) -> Result<FileInfo, ClientError> {
        let url = self.url_for(&["v1", "sandboxes", key, "files", "chown"]);
        self.json(self.request(Method::POST, url).json(&ChownRequest {
            path: path.into(),
            uid,
            gid,
        }))
        .await
    }

    /// All images.
    pub async fn list_images(&self) -> Result<Vec<Image>, ClientError> {
        let list: ImageList = self
            .json(self.request(Method::GET, self.url_for(&["v1", "images"])))
            .await?;
        Ok(list.images)
    }

    /// One image.
    pub async fn image(&self, name: &str) -> Result<Image, ClientError> {
        let mut segments = vec!["v1", "images"];
        segments.extend(name.split('/'));
        self.json(self.request(Method::GET, self.url_for(&segments))).await
    }

    /// Imports a rootfs tar stream (plain or gzip) as image `name`.
    pub async fn import_image(&self, name: &str, body: reqwest::Body) -> Result<Image, ClientError> {
        let mut segments = vec!["v1", "images"];
        segments.extend(name.split('/'));
        self.json(
            self.request(Method::PUT, self.url_for(&segments))
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(body),
        )
        .await
    }

    /// Pulls an image from a registry, handing each progress event to `on_event`; returns the stored image.
    pub async fn pull_image(
        &self,
        request: &PullRequest,
        on_event: impl FnMut(&TransferEvent),
    ) -> Result<Image, ClientError> {
        self.transfer("pull", request, on_event).await
    }

    /// Pushes a stored image to a registry, handing each progress event to `on_event`; returns the image.
    pub async fn push_image(
        &self,
        request: &PushRequest,
        on_event: impl FnMut(&TransferEvent),
    ) -> Result<Image, ClientError> {
        self.transfer("push", request, on_event).await
    }

    async fn transfer(
        &self,
        verb: &str,
        request: &impl serde::Serialize,
        mut on_event: impl FnMut(&TransferEvent),
    ) -> Result<Image, ClientError> {
        let response = self
            .send(
                self.request(Method::POST, self.url_for(&["v1", "images", verb]))
                    .json(request),
            )
            .await?;
        let mut events = self.ndjson::<TransferEvent>(response);
        while let Some(event) = events.next().await {
            let event = event?;
            on_event(&event);
            match event {
                TransferEvent::Done { image } => return Ok(*image),
                // Failures after the transfer started arrive in the stream; they are the registry's or the image's.
                TransferEvent::Error { error } => {
                    return Err(ClientError::Api {
                        status: StatusCode::BAD_GATEWAY,
                        error,
                    })
                }
                _ => {}
            }
        }
        Err(ClientError::Decode(format!(
            "the {verb}'s stream ended without a result"
        )))
    }

    /// Gives an image an additional name.
    pub async fn tag_image(&self, source: &str, target: &str) -> Result<Image, ClientError> {
        let request = TagRequest {
            source: source.into(),
            target: target.into(),
        };
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "images", "tag"]))
                .json(&request),
        )
        .await
    }

    /// Removes unnamed images and unused layers.
    pub async fn prune_images(&self) -> Result<ImagePruneResult, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "images", "prune"])))
            .await
    }

    /// Removes an image name.
    pub async fn remove_image(&self, name: &str) -> Result<(), ClientError> {
        let mut segments = vec!["v1", "images"];
        segments.extend(name.split('/'));
        self.send(self.request(Method::DELETE, self.url_for(&segments))).await?;
        Ok(())
    }

    /// Exports an image as the tar of an OCI image layout, as a stream of byte chunks.
    pub async fn export_image(&self, name: &str) -> Result<ByteChunks, ClientError> {
        let request = nook_api::ExportRequest { name: name.into() };
        let response = self
            .send(
                self.request(Method::POST, self.url_for(&["v1", "images", "export"]))
                    .json(&request),
            )
            .await?;
        Ok(self.byte_chunks(response))
    }

    /// Starts a build of `request.name` from the build context `context` (a tar stream holding the Dockerfile);
    /// returns once the server has unpacked the context and parsed the Dockerfile.
    pub async fn start_build(&self, request: &BuildRequest, context: reqwest::Body) -> Result<Build, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "builds"]))
                .query(request)
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .body(context),
        )
        .await
    }

    /// Running builds and the most recent finished ones.
    pub async fn builds(&self) -> Result<Vec<Build>, ClientError> {
        let list: BuildList = self
            .json(self.request(Method::GET, self.url_for(&["v1", "builds"])))
            .await?;
        Ok(list.builds)
    }

    /// One build.
    pub async fn build(&self, id: &str) -> Result<Build, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "builds", id])))
            .await
    }

    /// Cancels a build; returns it once it has stopped.
    pub async fn cancel_build(&self, id: &str) -> Result<Build, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "builds", id, "cancel"])))
            .await
    }

    /// A sandbox's events from after event number `after` (0: all), then each new one as it is recorded.
    pub async fn follow_sandbox_events(
        &self,
        key: &str,
        after: u64,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<nook_api::SandboxEventLine, ClientError>> + Send>>, ClientError> {
        let response = self
            .send(
                self.request(Method::GET, self.url_for(&["v1", "sandboxes", key, "events", "stream"]))
                    .query(&[("after", after.to_string())]),
            )
            .await?;
        Ok(self.ndjson::<nook_api::SandboxEventLine>(response))
    }

    /// Makes a tenant (operator only).
    pub async fn create_tenant(
        &self,
        request: &nook_api::tenancy::CreateTenantRequest,
    ) -> Result<nook_api::tenancy::Tenant, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "tenants"]))
                .json(request),
        )
        .await
    }

    /// Every tenant (operator only).
    pub async fn tenants(&self) -> Result<nook_api::tenancy::TenantList, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "tenants"])))
            .await
    }

    /// Replaces a tenant's quota (operator only).
    pub async fn set_tenant_quota(
        &self,
        tenant: &str,
        quota: &nook_api::tenancy::TenantQuota,
    ) -> Result<nook_api::tenancy::Tenant, ClientError> {
        self.json(
            self.request(Method::PUT, self.url_for(&["v1", "tenants", tenant, "quota"]))
                .json(quota),
        )
        .await
    }

    /// Makes an API key (shown once in the answer).
    pub async fn create_key(
        &self,
        request: &nook_api::tenancy::CreateKeyRequest,
    ) -> Result<nook_api::tenancy::CreatedKey, ClientError> {
        self.json(self.request(Method::POST, self.url_for(&["v1", "keys"])).json(request))
            .await
    }

    /// The keys this caller administers.
    pub async fn keys(&self) -> Result<nook_api::tenancy::KeyList, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "keys"])))
            .await
    }

    /// Revokes a key.
    pub async fn revoke_key(&self, id: &str) -> Result<nook_api::tenancy::ApiKeyInfo, ClientError> {
        self.json(self.request(Method::DELETE, self.url_for(&["v1", "keys", id])))
            .await
    }

    /// Makes a capability token for some verbs on one sandbox.
    pub async fn capability_token(
        &self,
        key: &str,
        request: &nook_api::tenancy::CapabilityRequest,
    ) -> Result<nook_api::tenancy::CapabilityToken, ClientError> {
        self.json(
            self.request(Method::POST, self.url_for(&["v1", "sandboxes", key, "tokens"]))
                .json(request),
        )
        .await
    }

    /// One page of the audit log.
    pub async fn audit(&self, query: &nook_api::audit::AuditQuery) -> Result<nook_api::audit::AuditPage, ClientError> {
        self.json(self.request(Method::GET, self.url_for(&["v1", "audit"])).query(query))
            .await
    }

    /// Every matching audit event, streamed as the server reads them.
    pub async fn export_audit(
        &self,
        query: &nook_api::audit::AuditQuery,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<nook_api::audit::AuditEvent, ClientError>> + Send>>, ClientError> {
        let response = self
            .send(
                self.request(Method::GET, self.url_for(&["v1", "audit", "export"]))
                    .query(query),
            )
            .await?;
        Ok(self.ndjson::<nook_api::audit::AuditEvent>(response))
    }

    /// A build's events from `offset` (log events already seen); with `follow`, until the build ends.
    pub async fn build_events(
        &self,
        id: &str,
        offset: u64,
        follow: bool,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<BuildEvent, ClientError>> + Send>>, ClientError> {
        let response = self
            .send(
                self.request(Method::GET, self.url_for(&["v1", "builds", id, "events"]))
                    .query(&[("offset", offset.to_string()), ("follow", follow.to_string())]),
            )
            .await?;
        Ok(self.ndjson::<BuildEvent>(response))
    }
}
