//! envd's protobuf messages, as Rust types with their JSON form (the codec E2B's SDKs use); their binary protobuf
//! form is in [`super::proto`].
//!
//! Output follows protobuf-JSON: lowerCamelCase names, fields at their default value left out, int64 as strings,
//! bytes as padded base64, enums by name. Input is read leniently, as protobuf-JSON parsers do: the original
//! snake_case names are accepted too, enums by name or number, and unknown fields are ignored.

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes as standard padded base64 in both directions.
pub mod base64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        // protobuf-JSON parsers accept both alphabets, padded or not.
        let trimmed = text.trim_end_matches('=');
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(trimmed)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
            .map_err(serde::de::Error::custom)
    }
}

/// An enum value given by name or number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum EnumValue {
    /// The value's name, like `SIGNAL_SIGKILL`.
    Name(String),
    /// The value's number.
    Number(i64),
}

impl EnumValue {
    /// The number, looking names up in `names` (name, number).
    pub fn number(&self, names: &[(&str, i64)]) -> Option<i64> {
        match self {
            Self::Number(number) => Some(*number),
            Self::Name(name) => names.iter().find(|(known, _)| known == name).map(|(_, n)| *n),
        }
    }
}

/// Which process a call is about.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProcessSelector {
    /// By pid.
    pub pid: Option<u32>,
    /// By tag (set only by template start commands).
    pub tag: Option<String>,
}

/// What to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessConfig {
    /// Program.
    #[serde(default)]
    pub cmd: String,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub envs: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct PtySize {
    /// Columns.
    #[serde(default)]
    pub cols: u32,
    /// Rows.
    #[serde(default)]
    pub rows: u32,
}

/// A terminal request.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct Pty {
    /// Its size.
    pub size: Option<PtySize>,
}

/// `process.Process/Start`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StartRequest {
    /// What to run.
    #[serde(default)]
    pub process: ProcessConfig,
    /// Run on a terminal.
    pub pty: Option<Pty>,
    /// A tag to find the process by.
    pub tag: Option<String>,
    /// Whether stdin stays open (absent: yes).
    pub stdin: Option<bool>,
}

/// A call naming one process.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SelectorRequest {
    /// The process.
    #[serde(default)]
    pub process: ProcessSelector,
}

/// `process.Process/Update`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct UpdateRequest {
    /// The process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// The new terminal size.
    pub pty: Option<Pty>,
}

/// Input for a process.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProcessInput {
    /// Bytes for a pipe.
    #[serde(default, with = "opt_base64")]
    pub stdin: Option<Vec<u8>>,
    /// Bytes for a terminal.
    #[serde(default, with = "opt_base64")]
    pub pty: Option<Vec<u8>>,
}

/// Optional base64 bytes.
mod opt_base64 {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "base64_bytes")] Vec<u8>);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(bytes)| bytes))
    }
}

/// `process.Process/SendInput`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SendInputRequest {
    /// The process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// The bytes.
    #[serde(default)]
    pub input: ProcessInput,
}

/// `process.Process/SendSignal`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SendSignalRequest {
    /// The process.
    #[serde(default)]
    pub process: ProcessSelector,
    /// The signal.
    pub signal: Option<EnumValue>,
}

/// One message of `process.Process/StreamInput`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamInputRequest {
    /// First message: the process.
    pub start: Option<SelectorRequest>,
    /// Later messages: input.
    pub data: Option<StreamInputData>,
}

/// Input carried by `StreamInput`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamInputData {
    /// The bytes.
    #[serde(default)]
    pub input: ProcessInput,
}

/// A process event, wrapped as `StartResponse` / `ConnectResponse`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessEventMessage {
    /// The event.
    pub event: ProcessEvent,
}

/// One event of a process stream.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessEvent {
    /// The process started.
    Start {
        /// Its pid.
        pid: u32,
    },
    /// Output.
    Data(DataEvent),
    /// It ended.
    End(EndEvent),
    /// Nothing happened for a while.
    Keepalive {},
}

/// Output of a process: exactly one member is set.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DataEvent {
    /// Standard output.
    Stdout(#[serde(with = "base64_bytes")] Vec<u8>),
    /// Standard error.
    Stderr(#[serde(with = "base64_bytes")] Vec<u8>),
    /// Terminal output.
    Pty(#[serde(with = "base64_bytes")] Vec<u8>),
}

/// How a process ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndEvent {
    /// Exit code, or -1 when a signal ended it.
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub exit_code: i32,
    /// True for a normal exit.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exited: bool,
    /// `exit status N` or `signal: NAME`.
    pub status: String,
    /// Set for anything but a clean exit 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn is_zero_i32(value: &i32) -> bool {
    *value == 0
}

/// A running process in `process.Process/List`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    /// What it runs.
    pub config: ProcessConfig,
    /// Its pid.
    pub pid: u32,
}

/// `process.Process/List`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct ListResponse {
    /// Running processes.
    pub processes: Vec<ProcessInfo>,
}

/// A request naming a path.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PathRequest {
    /// The path.
    #[serde(default)]
    pub path: String,
}

/// `filesystem.Filesystem/ListDir`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListDirRequest {
    /// The directory.
    #[serde(default)]
    pub path: String,
    /// Levels to descend (0 means 1).
    #[serde(default)]
    pub depth: u32,
}

/// `filesystem.Filesystem/Move`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MoveRequest {
    /// From.
    #[serde(default)]
    pub source: String,
    /// To.
    #[serde(default)]
    pub destination: String,
}

/// `filesystem.Filesystem/WatchDir` and `CreateWatcher`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchRequest {
    /// The directory.
    #[serde(default)]
    pub path: String,
    /// Include subdirectories.
    #[serde(default)]
    pub recursive: bool,
    /// Attach entry info to create/write/chmod events.
    #[serde(default, alias = "include_entry")]
    pub include_entry: bool,
    /// Allow watching network filesystems (a sandbox has none: accepted and without effect).
    #[serde(default, alias = "allow_network_mounts")]
    pub allow_network_mounts: bool,
}

/// A request naming a watcher.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherRequest {
    /// The watcher.
    #[serde(default, alias = "watcher_id")]
    pub watcher_id: String,
}

/// Metadata of a path.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryInfo {
    /// Last component.
    pub name: String,
    /// What the path is.
    #[serde(rename = "type")]
    pub kind: FileType,
    /// Absolute path.
    pub path: String,
    /// Size in bytes (int64: a string).
    #[serde(serialize_with = "int64_string")]
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// `-rw-r--r--` style.
    pub permissions: String,
    /// Owner name (or uid).
    pub owner: String,
    /// Group name (or gid).
    pub group: String,
    /// Modification time (RFC 3339 in JSON).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "rfc3339_millis")]
    pub modified_time: Option<DateTime<Utc>>,
    /// Where a symlink points.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symlink_target: Option<String>,
    /// User metadata (the `user.e2b.*` extended attributes, prefix stripped).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Whether the path is a symlink.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_symlink: bool,
}

fn int64_string<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&value.to_string())
}

fn rfc3339_millis<S: Serializer>(value: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(at) => serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        None => serializer.serialize_none(),
    }
}

/// `filesystem.FileType`: what a path is (protobuf enum numbers as discriminants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FileType {
    /// Anything but the three below (a device, a socket, a FIFO).
    #[serde(rename = "FILE_TYPE_UNSPECIFIED")]
    Unspecified = 0,
    /// A regular file.
    #[serde(rename = "FILE_TYPE_FILE")]
    File = 1,
    /// A directory.
    #[serde(rename = "FILE_TYPE_DIRECTORY")]
    Directory = 2,
    /// A symbolic link.
    #[serde(rename = "FILE_TYPE_SYMLINK")]
    Symlink = 3,
}

/// `filesystem.EventType`: what happened to a watched path (protobuf enum numbers as discriminants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// Created.
    #[serde(rename = "EVENT_TYPE_CREATE")]
    Create = 1,
    /// Written.
    #[serde(rename = "EVENT_TYPE_WRITE")]
    Write = 2,
    /// Removed.
    #[serde(rename = "EVENT_TYPE_REMOVE")]
    Remove = 3,
    /// Renamed (from or to).
    #[serde(rename = "EVENT_TYPE_RENAME")]
    Rename = 4,
    /// Its permissions or other metadata changed.
    #[serde(rename = "EVENT_TYPE_CHMOD")]
    Chmod = 5,
}

/// An answer carrying one entry.
#[derive(Debug, Clone, Serialize)]
pub struct EntryResponse {
    /// The entry.
    pub entry: EntryInfo,
}

/// `filesystem.Filesystem/ListDir`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct ListDirResponse {
    /// The entries.
    pub entries: Vec<EntryInfo>,
}

/// One change under a watched directory.
#[derive(Debug, Clone, Serialize)]
pub struct FilesystemEvent {
    /// Path relative to the watched directory.
    pub name: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The entry, when asked for (create, write, chmod).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryInfo>,
}

/// One message of a `WatchDir` stream.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum WatchDirResponse {
    /// The watch is in place.
    Start {},
    /// A change.
    Filesystem(Box<FilesystemEvent>),
    /// Nothing happened for a while.
    Keepalive {},
}

/// `CreateWatcher`'s answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWatcherResponse {
    /// The watcher.
    pub watcher_id: String,
}

/// `GetWatcherEvents`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct WatcherEventsResponse {
    /// Events since the last call.
    pub events: Vec<FilesystemEvent>,
}

/// An empty message (any fields of a request are ignored).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_protobuf_json() {
        let start = ProcessEventMessage {
            event: ProcessEvent::Start { pid: 7 },
        };
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"event":{"start":{"pid":7}}}"#
        );
        let data = ProcessEventMessage {
            event: ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let end = ProcessEventMessage {
            event: ProcessEvent::End(EndEvent {
                exit_code: 0,
                exited: true,
                status: "exit status 0".into(),
                error: None,
            }),
        };
        assert_eq!(
            serde_json::to_string(&end).unwrap(),
            r#"{"event":{"end":{"exited":true,"status":"exit status 0"}}}"#
        );
        let keepalive = ProcessEventMessage {
            event: ProcessEvent::Keepalive {},
        };
        assert_eq!(
            serde_json::to_string(&keepalive).unwrap(),
            r#"{"event":{"keepalive":{}}}"#
        );
    }

    #[test]
    fn requests_parse_leniently() {
        let request: SendInputRequest =
            serde_json::from_str(r#"{"process":{"pid":3},"input":{"stdin":"aGk="},"extra":1}"#).unwrap();
        assert_eq!(request.process.pid, Some(3));
        assert_eq!(request.input.stdin.as_deref(), Some(b"hi".as_slice()));
        let signal: SendSignalRequest = serde_json::from_str(r#"{"process":{"pid":3},"signal":9}"#).unwrap();
        assert_eq!(signal.signal.unwrap().number(&[]), Some(9));
        let watch: WatchRequest = serde_json::from_str(r#"{"path":"/x","include_entry":true}"#).unwrap();
        assert!(watch.include_entry);
    }
}
