//! The agent protocol: how a runner talks to `nook-agent`, PID 1 of every sandbox, over a local stream socket.
//!
//! A connection carries one request. The client sends a [`Request`] frame, then, for an exec, any number of
//! [`FrameKind::Stdin`] frames, a [`FrameKind::StdinClose`] and [`FrameKind::Signal`] frames. The agent answers with
//! [`FrameKind::Started`], output frames in the order the process wrote them, and exactly one final frame:
//! [`FrameKind::Exit`] when the process ended or [`FrameKind::Error`] when it could not be started or observed.
//!
//! Every frame is a one-byte kind, a four-byte big-endian payload length and the payload; payloads are bounded by
//! [`MAX_FRAME_LEN`] so that neither side can be made to allocate without limit by the other (the sandbox side is
//! hostile). The module [`boot`] holds the spec a runner hands to `nook-agent boot` to build a container sandbox.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod boot;

/// Largest payload of one frame.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Protocol version, reported by [`Request::Ping`].
pub const PROTOCOL_VERSION: u32 = 1;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client → agent: a JSON [`Request`].
    Request = 1,
    /// Client → agent: bytes for the process's standard input.
    Stdin = 2,
    /// Client → agent: close the process's standard input.
    StdinClose = 3,
    /// Client → agent: JSON [`SignalRequest`], deliver a signal to the process.
    Signal = 4,
    /// Agent → client: JSON [`Started`].
    Started = 10,
    /// Agent → client: bytes the process wrote to standard output.
    Stdout = 11,
    /// Agent → client: bytes the process wrote to standard error.
    Stderr = 12,
    /// Agent → client: JSON [`Exit`], final.
    Exit = 13,
    /// Agent → client: JSON [`AgentError`], final.
    Error = 14,
    /// Agent → client: JSON [`Pong`], the answer to a ping, final.
    Pong = 15,
    /// Agent → client: a JSON answer to a request that is not a stream ([`Spawned`], a process list, `{}`), final.
    Reply = 16,
    /// Agent → client: JSON [`Attached`], the first frame of an attach: where the output replay starts.
    Attached = 17,
    /// Agent → client: JSON [`End`], an attach without `follow` caught up with the output so far, final.
    End = 18,
    /// Agent → client: bytes of a file being read.
    FileData = 19,
    /// Agent → client: JSON [`WatchEvent`], one change under a watched directory.
    WatchEvent = 20,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Stdin,
            3 => Self::StdinClose,
            4 => Self::Signal,
            10 => Self::Started,
            11 => Self::Stdout,
            12 => Self::Stderr,
            13 => Self::Exit,
            14 => Self::Error,
            15 => Self::Pong,
            16 => Self::Reply,
            17 => Self::Attached,
            18 => Self::End,
            19 => Self::FileData,
            20 => Self::WatchEvent,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// The payload: raw bytes for output and input, JSON for everything else.
    pub payload: Vec<u8>,
}

impl Frame {
    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(kind: FrameKind, value: &T) -> Self {
        let payload = serde_json::to_vec(value).expect("protocol types always serialize");
        Self { kind, payload }
    }

    /// Decodes the JSON payload.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|source| ProtocolError::BadPayload {
            kind: self.kind,
            source,
        })
    }
}

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed.
    #[error("agent socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer sent a kind byte this side does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The peer announced a payload over [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// A JSON payload did not parse.
    #[error("malformed {kind:?} frame")]
    BadPayload {
        /// Kind of the frame.
        kind: FrameKind,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// The peer sent a frame that is not allowed at this point.
    #[error("unexpected {0:?} frame")]
    Unexpected(FrameKind),
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, ProtocolError> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    reader.read_exact(&mut header[1..]).await?;
    let kind = FrameKind::from_byte(header[0]).ok_or(ProtocolError::UnknownKind(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some(Frame { kind, payload }))
}

/// Writes one frame (header and payload in one write where possible).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLarge(payload.len()));
    }
    let mut buffer = Vec::with_capacity(5 + payload.len());
    buffer.push(kind as u8);
    buffer.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buffer.extend_from_slice(payload);
    writer.write_all(&buffer).await?;
    Ok(())
}

/// Writes a frame whose payload is `value` as JSON.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    kind: FrameKind,
    value: &T,
) -> Result<(), ProtocolError> {
    let payload = serde_json::to_vec(value).expect("protocol types always serialize");
    write_frame(writer, kind, &payload).await
}

/// The first frame of every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent alive? Answered with [`Pong`].
    Ping,
    /// Start a process and stream it; the process is killed if the connection closes first.
    Exec(ExecSpec),
    /// Start a background process that outlives the connection; answered with [`Spawned`] at once.
    Spawn(ExecSpec),
    /// Stream a background process's output from `offset` (replayed from the agent's bounded buffer), then, with
    /// `follow`, live output and exactly one [`Exit`]; without `follow`, an [`End`] once caught up (or the [`Exit`] if
    /// the process has ended and everything was sent).
    Attach {
        /// Process id inside the sandbox.
        pid: u32,
        /// Byte offset in the process's combined output (stdout and stderr in the order written).
        offset: u64,
        /// Keep streaming until the process exits.
        follow: bool,
        /// With `follow`: lose nothing from `offset` on. While this reader is a whole buffer behind, the agent stops
        /// reading the process's output, so the process blocks on its pipe (back-pressure) instead of the buffer
        /// dropping bytes this reader has not been sent.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hold: bool,
    },
    /// Wait for a background process to end; answered with its [`Exit`].
    Wait {
        /// Process id inside the sandbox.
        pid: u32,
    },
    /// Write to a background process's standard input, optionally closing it after; answered with `{}`.
    Input {
        /// Process id inside the sandbox.
        pid: u32,
        /// Bytes to write (at most [`MAX_FRAME_LEN`] after encoding; send more in several requests).
        #[serde(with = "bytes_as_base64")]
        data: Vec<u8>,
        /// Close standard input after writing (closing an input that is already closed, with no data, succeeds).
        close: bool,
    },
    /// Send a signal to a background process; answered with `{}`.
    Signal {
        /// Process id inside the sandbox.
        pid: u32,
        /// Signal number.
        signal: i32,
    },
    /// Read a file: answered with a [`FileStat`] ([`FrameKind::Reply`]), its bytes in [`FrameKind::FileData`] frames
    /// and an [`End`] whose offset is the number of bytes sent.
    ReadFile {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// Write a file from the [`FrameKind::Stdin`] frames that follow, ended by [`FrameKind::StdinClose`]; the file
    /// appears whole (written beside it, then renamed) and only once the input is complete. Answered with its
    /// [`FileStat`].
    WriteFile(FileWrite),
    /// Pack a file or directory tree as a tar stream (like `docker cp` out): answered with the path's [`FileStat`]
    /// ([`FrameKind::Reply`]), the archive in [`FrameKind::FileData`] frames and an [`End`] with its length; a
    /// failure part-way is an [`FrameKind::Error`] instead of the `End`. Entries are named from the path's last
    /// component; symlinks are archived as links, never followed.
    ReadArchive {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// Unpack the tar stream of the [`FrameKind::Stdin`] frames that follow (ended by [`FrameKind::StdinClose`])
    /// into the directory `path`; answered with an [`ArchiveWritten`]. Entries that would land outside `path`
    /// (`..`, absolute names, through symlinks) are refused.
    WriteArchive {
        /// Absolute path of the destination directory inside the sandbox.
        path: String,
        /// Create the destination (and its parents) when missing.
        parents: bool,
        /// Owner (uid, gid) for everything unpacked; root when absent. Owners recorded in the archive are ignored.
        owner: Option<(u32, u32)>,
    },
    /// Describe a path (symlinks are not followed); answered with a [`FileStat`].
    Stat {
        /// Absolute path inside the sandbox.
        path: String,
    },
    /// List a directory, `depth` levels deep (1 = its entries); answered with `Vec<FileStat>`.
    ListDir {
        /// Absolute path inside the sandbox.
        path: String,
        /// Levels to descend, at least 1.
        depth: u32,
    },
    /// Create a directory and its missing parents; answered with its [`FileStat`].
    MakeDir {
        /// Absolute path inside the sandbox.
        path: String,
        /// Owner (uid, gid) of every directory this creates; root when absent.
        #[serde(default)]
        owner: Option<(u32, u32)>,
    },
    /// Resolve a user (name or uid) in the sandbox's `/etc/passwd`; answered with an [`AccountInfo`].
    Account {
        /// Name or uid.
        user: String,
    },
    /// Names of uids and gids from the sandbox's `/etc/passwd` and `/etc/group`; answered with [`Names`] (ids
    /// without a name are left out).
    Names {
        /// User ids.
        uids: Vec<u32>,
        /// Group ids.
        gids: Vec<u32>,
    },
    /// Rename or move a path; answered with the [`FileStat`] of the destination.
    Move {
        /// Absolute source path.
        from: String,
        /// Absolute destination path.
        to: String,
    },
    /// Remove a file, a symlink, or (with `recursive`) a directory tree; answered with `{}`.
    Remove {
        /// Absolute path inside the sandbox.
        path: String,
        /// Remove directories with their contents.
        recursive: bool,
    },
    /// Find paths under `path` whose file name matches a glob (`*`, `?`, `[abc]`); answered with a [`FindResult`].
    Find {
        /// Absolute directory to search.
        path: String,
        /// Glob matched against each file name.
        pattern: String,
        /// Stop after this many matches.
        max_results: u32,
    },
    /// Search file contents under `path` (a file or a directory, recursively) for a regular expression, like
    /// `grep -rn`; binary files are skipped. Answered with a [`SearchResult`].
    Search {
        /// Absolute file or directory.
        path: String,
        /// Regular expression (Rust syntax, linear-time matching).
        regex: String,
        /// Only files whose name matches this glob.
        include: Option<String>,
        /// Stop after this many matching lines.
        max_results: u32,
        /// Stop after this many milliseconds.
        timeout_ms: u64,
    },
    /// Replace every match of a regular expression in the given files (each rewritten atomically, mode kept);
    /// answered with a `Vec<Replaced>`.
    Replace {
        /// Absolute paths of the files.
        paths: Vec<String>,
        /// Regular expression.
        regex: String,
        /// Replacement text (`$1`, `${name}` refer to groups).
        replacement: String,
    },
    /// Watch a directory (and, with `recursive`, its subdirectories, including ones created later): answered with
    /// `{}` once the watch is in place, then a [`FrameKind::WatchEvent`] per change until the client disconnects.
    Watch {
        /// Absolute directory.
        path: String,
        /// Watch subdirectories too.
        recursive: bool,
    },
    /// Change permission bits; answered with the [`FileStat`].
    Chmod {
        /// Absolute path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Change owner and group; answered with the [`FileStat`].
    Chown {
        /// Absolute path.
        path: String,
        /// New owner uid.
        uid: u32,
        /// New group gid.
        gid: u32,
    },
    /// Resize a background process's pseudo-terminal (its foreground process group gets SIGWINCH); answered with
    /// `{}`.
    Resize {
        /// Process id inside the sandbox.
        pid: u32,
        /// New size.
        size: PtySize,
    },
    /// List the background processes the agent knows (running, and recently ended); answered with a
    /// `Vec<ProcessInfo>`.
    List,
}

/// How [`Request::WriteFile`] writes a file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Permission bits for a new file (0644 when absent).
    pub mode: Option<u32>,
    /// Create missing parent directories.
    pub parents: bool,
    /// Owner (uid, gid) of the file and of the directories this creates; root when absent.
    #[serde(default)]
    pub owner: Option<(u32, u32)>,
    /// User metadata for the file, stored as extended attributes [`METADATA_XATTR_PREFIX`]`<key>` (see
    /// [`check_metadata`]). A written file is always a new file, so it carries exactly these, or none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The extended attribute namespace of user metadata (E2B's: `user.e2b.<key>`).
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";
/// Longest metadata key: an extended attribute name has at most 255 bytes, the prefix included.
pub const MAX_METADATA_KEY: usize = 255 - METADATA_XATTR_PREFIX.len();
/// Most bytes of metadata (keys and values together) one file carries.
pub const MAX_METADATA_TOTAL: usize = 4096;

/// Checks user metadata: keys not empty and at most [`MAX_METADATA_KEY`] bytes, keys and values printable ASCII
/// (space to `~`), keys and values at most [`MAX_METADATA_TOTAL`] bytes together. The error says which rule broke.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), String> {
    let printable = |text: &str| text.bytes().all(|byte| (0x20..=0x7e).contains(&byte));
    let mut total = 0;
    for (key, value) in metadata {
        if key.is_empty() || !printable(key) {
            return Err(format!("metadata key {key:?} must be non-empty printable ASCII"));
        }
        if key.len() > MAX_METADATA_KEY {
            return Err(format!("metadata key {key:?} is longer than {MAX_METADATA_KEY} bytes"));
        }
        if !printable(value) {
            return Err(format!("the value of metadata key {key:?} must be printable ASCII"));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(format!(
            "metadata takes {total} bytes, more than the {MAX_METADATA_TOTAL} a file may carry"
        ));
    }
    Ok(())
}

/// What kind of file system object a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, socket, FIFO).
    Other,
}

/// A user account, answering [`Request::Account`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// Names of ids, answering [`Request::Names`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    /// uid → user name.
    pub users: std::collections::BTreeMap<u32, String>,
    /// gid → group name.
    pub groups: std::collections::BTreeMap<u32, String>,
}

/// What [`Request::WriteArchive`] unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveWritten {
    /// Entries created (files, directories, links).
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// A path's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Absolute path.
    pub path: String,
    /// Last path component.
    pub name: String,
    /// Kind.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Modification time, milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Where a symlink points.
    pub symlink_target: Option<String>,
    /// User metadata: the path's [`METADATA_XATTR_PREFIX`] extended attributes, prefix stripped.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// What changed under a watched directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchEventKind {
    /// A file or directory appeared.
    Create,
    /// A file opened for writing was closed (one event per writer, not one per write).
    Write,
    /// A file or directory was removed.
    Remove,
    /// A path was renamed away from here.
    RenameFrom,
    /// A path was renamed to here.
    RenameTo,
    /// Permissions, owner or times changed.
    Metadata,
    /// The kernel dropped events (its queue overflowed): re-list the directory.
    Overflow,
}

/// Payload of [`FrameKind::WatchEvent`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchEventKind,
    /// The absolute path it happened to (the watched directory for `overflow`).
    pub path: String,
    /// Whether the path is a directory.
    pub is_dir: bool,
}

/// Answer to [`Request::Find`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindResult {
    /// Matching paths, sorted.
    pub matches: Vec<FileStat>,
    /// Whether the search stopped at `max_results`.
    pub truncated: bool,
}

/// One matching line of a [`Request::Search`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchMatch {
    /// File.
    pub path: String,
    /// Line number, from 1.
    pub line_number: u64,
    /// The line (without its newline; long lines are cut at 4096 bytes).
    pub line: String,
}

/// Answer to [`Request::Search`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchResult {
    /// Matching lines, by file then line.
    pub matches: Vec<SearchMatch>,
    /// Whether the search stopped early (result limit or time limit).
    pub truncated: bool,
    /// Files searched.
    pub files_searched: u64,
}

/// One file of a [`Request::Replace`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// File.
    pub path: String,
    /// Matches replaced.
    pub replacements: u64,
}

/// Payload of [`FrameKind::Reply`] for [`Request::Spawn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// Process id inside the sandbox.
    pub pid: u32,
}

/// Payload of [`FrameKind::Attached`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// Offset of the first byte that follows (later than the requested one when output was dropped).
    pub offset: u64,
    /// Bytes between the requested offset and `offset` that the bounded buffer no longer holds.
    pub missed: u64,
}

/// Payload of [`FrameKind::End`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// Offset just past the last byte sent.
    pub offset: u64,
}

/// A background process as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Process id inside the sandbox.
    pub pid: u32,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Milliseconds since the Unix epoch when it started.
    pub started_at_ms: u64,
    /// Total bytes of output written so far.
    pub output_bytes: u64,
    /// Whether it runs on a pseudo-terminal.
    #[serde(default)]
    pub terminal: bool,
    /// How it ended, once it has.
    pub exit: Option<Exit>,
}

/// JSON encoding of byte strings as standard padded base64.
mod bytes_as_base64 {
    use serde::{Deserialize, Deserializer, Serializer};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (index, shift) in [18, 12, 6, 0].into_iter().enumerate() {
                if index <= chunk.len() {
                    text.push(ALPHABET[((n >> shift) & 63) as usize] as char);
                } else {
                    text.push('=');
                }
            }
        }
        serializer.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        let value = |c: u8| ALPHABET.iter().position(|a| *a == c).map(|v| v as u32);
        let trimmed = text.trim_end_matches('=');
        let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
        let mut acc = 0u32;
        let mut bits = 0;
        for c in trimmed.bytes() {
            let v = value(c).ok_or_else(|| serde::de::Error::custom("invalid base64"))?;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}

/// A process to start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments; a program without `/` is looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The complete environment, `KEY=value`; the agent adds only `HOME`, `USER`, `LOGNAME` and `PATH` when absent.
    pub env: Vec<String>,
    /// Working directory; the user's home directory when absent.
    pub cwd: Option<String>,
    /// User name or numeric uid; root when absent.
    pub user: Option<String>,
    /// Kill the process after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Whether standard input is a pipe fed by [`FrameKind::Stdin`] frames (otherwise `/dev/null`).
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (background processes only): stdin, stdout and stderr are the
    /// terminal, and output arrives as stdout.
    #[serde(default)]
    pub pty: Option<PtySize>,
    /// Background processes: bytes of output kept for replay (1 MiB when absent; 4 KiB to 64 MiB).
    #[serde(default)]
    pub output_buffer: Option<u64>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// Payload of [`FrameKind::Signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// Signal number.
    pub signal: i32,
}

/// Payload of [`FrameKind::Started`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// Process id inside the sandbox.
    pub pid: u32,
}

/// Payload of [`FrameKind::Exit`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    /// Exit code of a normal exit.
    pub code: Option<i32>,
    /// Signal that killed the process.
    pub signal: Option<i32>,
    /// Whether the agent killed it for running past its timeout.
    pub timed_out: bool,
    /// Milliseconds from start to exit.
    pub duration_ms: f64,
}

/// Payload of [`FrameKind::Error`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentError {
    /// Stable code: `spawn_failed`, `bad_request`, `no_such_user`, `bad_cwd`.
    pub code: String,
    /// What failed and why.
    pub message: String,
}

/// Payload of [`FrameKind::Pong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameKind::Stdout, b"hello").await.unwrap();
        write_json(&mut wire, FrameKind::Request, &Request::Ping).await.unwrap();
        let mut reader = wire.as_slice();
        let first = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!(first.kind, FrameKind::Stdout);
        assert_eq!(first.payload, b"hello");
        let second = read_frame(&mut reader).await.unwrap().unwrap();
        assert_eq!(second.parse::<Request>().unwrap(), Request::Ping);
        assert!(read_frame(&mut reader).await.unwrap().is_none());
    }

    #[test]
    fn input_bytes_round_trip_as_base64() {
        for data in [
            b"".to_vec(),
            b"a".to_vec(),
            b"ab".to_vec(),
            b"abc".to_vec(),
            (0..=255).collect::<Vec<u8>>(),
        ] {
            let request = Request::Input {
                pid: 7,
                data: data.clone(),
                close: true,
            };
            let json = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request, "{json}");
        }
        let json = serde_json::to_string(&Request::Input {
            pid: 1,
            data: b"hi!".to_vec(),
            close: false,
        })
        .unwrap();
        assert!(json.contains("\"aGkh\""), "{json}");
    }

    #[test]
    fn file_writes_keep_their_wire_form_and_metadata_is_checked() {
        let request = Request::WriteFile(FileWrite {
            path: "/a".into(),
            mode: None,
            parents: true,
            owner: Some((1, 2)),
            metadata: None,
        });
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            json,
            r#"{"op":"write_file","path":"/a","mode":null,"parents":true,"owner":[1,2]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), request);

        let ok = BTreeMap::from([("author".to_string(), "a b ~".to_string())]);
        assert!(check_metadata(&ok).is_ok());
        for (key, value) in [("", "v"), ("k\n", "v"), ("k", "caf\u{e9}"), ("k", "tab\t")] {
            let bad = BTreeMap::from([(key.to_string(), value.to_string())]);
            assert!(check_metadata(&bad).is_err(), "{key:?}={value:?}");
        }
        let long_key = BTreeMap::from([("k".repeat(MAX_METADATA_KEY + 1), String::new())]);
        assert!(check_metadata(&long_key).unwrap_err().contains("longer than 246"));
        let longest_key = BTreeMap::from([("k".repeat(MAX_METADATA_KEY), String::new())]);
        assert!(check_metadata(&longest_key).is_ok());
        let big = BTreeMap::from([("a".to_string(), "x".repeat(3000)), ("b".to_string(), "x".repeat(1100))]);
        assert!(check_metadata(&big).unwrap_err().contains("4096"));
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_refused() {
        let mut wire = vec![FrameKind::Stdout as u8];
        wire.extend_from_slice(&((MAX_FRAME_LEN as u32) + 1).to_be_bytes());
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await,
            Err(ProtocolError::TooLarge(_))
        ));
        let wire = [99u8, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await,
            Err(ProtocolError::UnknownKind(99))
        ));
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error_not_an_end() {
        let wire = [FrameKind::Stdout as u8, 0, 0, 0, 9, b'x'];
        assert!(matches!(
            read_frame(&mut wire.as_slice()).await,
            Err(ProtocolError::Io(_))
        ));
    }
}
