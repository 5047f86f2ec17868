//! The agent protocol as the runner speaks it.
//!
//! Each request opens a new connection to the sandbox's agent socket (a Unix socket that only exists on the host
//! side). An exec becomes an [`ExecStream`]: a channel of [`ExecOutput`] fed by a task that reads the agent's frames,
//! and a channel of [`ExecInput`] that the same task writes to the agent. The stream's last item is always either
//! [`ExecOutput::Exit`] or [`ExecOutput::Error`]; if the connection breaks before the agent reported an exit, the
//! stream ends with an error, never with an invented exit status.

use std::path::Path;

use nook_agent_proto::{
    read_frame, write_frame, write_json, AgentError, ExecSpec, Exit, FileStat, FrameKind, Pong, ProtocolError, Request,
    SignalRequest, Started,
};
use serde::de::DeserializeOwned;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Output of a running process.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecOutput {
    /// The process started with this pid (inside the sandbox).
    Started {
        /// Pid inside the sandbox.
        pid: u32,
    },
    /// Bytes from standard output.
    Stdout(Vec<u8>),
    /// Bytes from standard error.
    Stderr(Vec<u8>),
    /// The process ended (final).
    Exit(Exit),
    /// An attach starts replaying at `offset`; `missed` bytes before it were dropped from the bounded buffer.
    Attached {
        /// Offset of the next byte.
        offset: u64,
        /// Bytes no longer held.
        missed: u64,
    },
    /// An attach without follow caught up at `offset` (final).
    End {
        /// Offset just past the last byte sent.
        offset: u64,
    },
    /// The process could not be started or its end could not be observed (final).
    Error {
        /// Stable code.
        code: String,
        /// What went wrong.
        message: String,
    },
}

/// Input to a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    /// Bytes for standard input.
    Stdin(Vec<u8>),
    /// Close standard input.
    CloseStdin,
    /// Send a signal.
    Signal(i32),
}

/// A running process: its output, and a way to talk to it. Dropping the stream disconnects, and the agent then
/// kills the process.
#[derive(Debug)]
pub struct ExecStream {
    /// Output, ending with exactly one `Exit` or `Error`.
    pub events: mpsc::Receiver<ExecOutput>,
    /// Input; dropping it leaves the process's standard input open until the process ends.
    pub input: mpsc::Sender<ExecInput>,
}

/// Asks the agent whether it is alive.
pub async fn ping(socket: &Path) -> Result<Pong, ProtocolError> {
    let mut stream = UnixStream::connect(socket).await?;
    write_json(&mut stream, FrameKind::Request, &Request::Ping).await?;
    match read_frame(&mut stream).await? {
        Some(frame) if frame.kind == FrameKind::Pong => frame.parse(),
        Some(frame) => Err(ProtocolError::Unexpected(frame.kind)),
        None => Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// Starts a process through the agent.
pub async fn exec(socket: &Path, spec: ExecSpec) -> Result<ExecStream, ProtocolError> {
    stream(socket, &Request::Exec(spec)).await
}

/// Sends a request answered by a stream of output frames (exec, attach).
pub async fn stream(socket: &Path, request: &Request) -> Result<ExecStream, ProtocolError> {
    let stream = UnixStream::connect(socket).await?;
    let (reader, mut writer) = stream.into_split();
    write_json(&mut writer, FrameKind::Request, request).await?;
    let (event_sender, events) = mpsc::channel(64);
    let (input, input_receiver) = mpsc::channel::<ExecInput>(64);
    // Reading and writing run side by side in one task and neither waits on the other, so input can flow while
    // output waits for a slow consumer. Neither future is ever cancelled mid-frame.
    tokio::spawn(async move {
        let reading = forward_output(reader, event_sender);
        let writing = forward_input(writer, input_receiver);
        tokio::pin!(reading, writing);
        let mut writer_kept = None;
        let mut writing_done = false;
        loop {
            tokio::select! {
                () = &mut reading => break,
                writer = &mut writing, if !writing_done => {
                    writing_done = true;
                    // Keep the write half open: dropping it would shut the socket down, which the agent reads as
                    // the client leaving.
                    writer_kept = writer;
                }
            }
        }
        drop(writer_kept);
    });
    Ok(ExecStream { events, input })
}

/// Forwards the agent's frames as output items until the final one, the consumer leaves, or the connection fails.
async fn forward_output(mut reader: OwnedReadHalf, events: mpsc::Sender<ExecOutput>) {
    loop {
        let frame = tokio::select! {
            // Abandoning a half-read frame is fine here: the consumer is gone and the connection is dropped, which
            // makes the agent kill the process.
            () = events.closed() => return,
            frame = read_frame(&mut reader) => frame,
        };
        let (event, last) = match frame {
            Ok(Some(frame)) => match decode(frame) {
                Ok(decoded) => decoded,
                Err(error) => (broken(&error), true),
            },
            Ok(None) => (
                ExecOutput::Error {
                    code: "agent_disconnected".into(),
                    message: "the agent closed the connection before the process's exit was reported \
                              (the sandbox may have stopped)"
                        .into(),
                },
                true,
            ),
            Err(error) => (broken(&error), true),
        };
        if events.send(event).await.is_err() || last {
            return;
        }
    }
}

/// Writes the caller's input to the agent until the caller drops its sender; returns the write half (to keep the
/// connection open) unless writing failed.
async fn forward_input(mut writer: OwnedWriteHalf, mut input: mpsc::Receiver<ExecInput>) -> Option<OwnedWriteHalf> {
    while let Some(item) = input.recv().await {
        let result = match item {
            ExecInput::Stdin(bytes) => {
                let mut result = Ok(());
                for chunk in bytes.chunks(nook_agent_proto::MAX_FRAME_LEN) {
                    result = write_frame(&mut writer, FrameKind::Stdin, chunk).await;
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
            ExecInput::CloseStdin => write_frame(&mut writer, FrameKind::StdinClose, &[]).await,
            ExecInput::Signal(signal) => write_json(&mut writer, FrameKind::Signal, &SignalRequest { signal }).await,
        };
        // A failed write means the agent is gone; the reading side reports it.
        if result.is_err() {
            return None;
        }
    }
    Some(writer)
}

/// The answer to a request that is not a stream.
#[derive(Debug)]
pub enum Answer<T> {
    /// The agent did it.
    Done(T),
    /// The agent refused, with its code and message.
    Refused {
        /// Stable code such as `no_such_process`.
        code: String,
        /// What went wrong.
        message: String,
    },
}

/// Sends a request and reads its single answer: a [`FrameKind::Reply`] or [`FrameKind::Exit`] payload as `T`, or
/// the agent's refusal.
pub async fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> Result<Answer<T>, ProtocolError> {
    let mut stream = UnixStream::connect(socket).await?;
    write_json(&mut stream, FrameKind::Request, request).await?;
    read_answer(&mut stream).await
}

/// Reads the single answer frame of a request: a [`FrameKind::Reply`] or [`FrameKind::Exit`] payload as `T`, or the
/// agent's refusal.
async fn read_answer<T: serde::de::DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Answer<T>, ProtocolError> {
    match read_frame(reader).await? {
        Some(frame) if matches!(frame.kind, FrameKind::Reply | FrameKind::Exit) => Ok(Answer::Done(frame.parse()?)),
        Some(frame) if frame.kind == FrameKind::Error => {
            let error: AgentError = frame.parse()?;
            Ok(Answer::Refused {
                code: error.code,
                message: error.message,
            })
        }
        Some(frame) => Err(ProtocolError::Unexpected(frame.kind)),
        None => Err(ProtocolError::Io(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// File bytes as they arrive from the agent; an `Err` item ends the stream early.
pub type FileChunks = mpsc::Receiver<Result<Vec<u8>, String>>;

/// Reads a file ([`Request::ReadFile`]) or a tar archive of a tree ([`Request::ReadArchive`]) through the agent:
/// the path's metadata at once, the bytes as a bounded stream (a failure part-way arrives as an `Err` item).
pub async fn read_stream(socket: &Path, request: &Request) -> Result<Answer<(FileStat, FileChunks)>, ProtocolError> {
    let mut stream = UnixStream::connect(socket).await?;
    write_json(&mut stream, FrameKind::Request, request).await?;
    let stat: FileStat = match read_answer(&mut stream).await? {
        Answer::Done(stat) => stat,
        Answer::Refused { code, message } => return Ok(Answer::Refused { code, message }),
    };
    let (sender, chunks) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let item = match read_frame(&mut stream).await {
                Ok(Some(frame)) if frame.kind == FrameKind::FileData => Ok(frame.payload),
                Ok(Some(frame)) if frame.kind == FrameKind::End => return,
                Ok(Some(frame)) if frame.kind == FrameKind::Error => Err(frame
                    .parse::<AgentError>()
                    .map(|error| error.message)
                    .unwrap_or_else(|error| format!("the agent's error did not parse: {error}"))),
                Ok(Some(frame)) => Err(format!("unexpected {:?} frame from the agent", frame.kind)),
                Ok(None) => Err("the agent closed the connection before the end of the file".to_string()),
                Err(error) => Err(format!("reading from the agent failed: {error}")),
            };
            let failed = item.is_err();
            if sender.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Answer::Done((stat, chunks)))
}

/// Sends a byte stream to the agent in bounded chunks, for [`Request::WriteFile`] (the file appears only if the
/// whole stream arrived) or [`Request::WriteArchive`]; returns the agent's answer.
pub async fn write_stream<T: DeserializeOwned>(
    socket: &Path,
    request: Request,
    mut body: crate::ByteStream,
) -> Result<Answer<T>, ProtocolError> {
    use tokio::io::AsyncReadExt as _;
    let stream = UnixStream::connect(socket).await?;
    let (mut reader, mut writer) = stream.into_split();
    write_json(&mut writer, FrameKind::Request, &request).await?;
    let mut buffer = vec![0u8; 256 * 1024];
    let sent = loop {
        let n = match body.read(&mut buffer).await {
            Ok(n) => n,
            // The upload broke: drop the connection without closing the input, so the agent discards the file.
            Err(error) => return Err(ProtocolError::Io(error)),
        };
        let result = if n == 0 {
            write_frame(&mut writer, FrameKind::StdinClose, &[]).await
        } else {
            write_frame(&mut writer, FrameKind::Stdin, &buffer[..n]).await
        };
        // A failed write usually means the agent refused early and closed: its answer says why.
        if result.is_err() || n == 0 {
            break result;
        }
    };
    match read_answer(&mut reader).await {
        // No answer at all: if our own write had failed, that is the better explanation.
        Err(ProtocolError::Io(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(sent.err().unwrap_or(ProtocolError::Io(error)))
        }
        answer => answer,
    }
}

/// Watches a directory through the agent: the watch is in place when this returns; events follow on the channel
/// until it is dropped (which closes the connection and the agent's watch).
pub async fn watch(socket: &Path, path: String, recursive: bool) -> Result<Answer<WatchEvents>, ProtocolError> {
    let mut stream = UnixStream::connect(socket).await?;
    write_json(&mut stream, FrameKind::Request, &Request::Watch { path, recursive }).await?;
    if let Answer::Refused { code, message } = read_answer::<serde_json::Value, _>(&mut stream).await? {
        return Ok(Answer::Refused { code, message });
    }
    let (sender, events) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                () = sender.closed() => return,
                frame = read_frame(&mut stream) => frame,
            };
            let event = match frame {
                Ok(Some(frame)) if frame.kind == FrameKind::WatchEvent => frame.parse().map_err(|e| e.to_string()),
                Ok(Some(frame)) => Err(format!("unexpected {:?} frame from the agent", frame.kind)),
                Ok(None) => Err("the agent ended the watch (the sandbox may have stopped)".to_string()),
                Err(error) => Err(format!("reading from the agent failed: {error}")),
            };
            let failed = event.is_err();
            if sender.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Answer::Done(events))
}

/// Changes under a watched directory; an `Err` item ends the stream.
pub type WatchEvents = mpsc::Receiver<Result<nook_agent_proto::WatchEvent, String>>;

fn broken(error: &ProtocolError) -> ExecOutput {
    ExecOutput::Error {
        code: "agent_protocol".into(),
        message: format!("the connection to the agent failed: {error}"),
    }
}

/// Turns a frame into an output item and whether it is the last one.
fn decode(frame: nook_agent_proto::Frame) -> Result<(ExecOutput, bool), ProtocolError> {
    Ok(match frame.kind {
        FrameKind::Started => (
            ExecOutput::Started {
                pid: frame.parse::<Started>()?.pid,
            },
            false,
        ),
        FrameKind::Stdout => (ExecOutput::Stdout(frame.payload), false),
        FrameKind::Stderr => (ExecOutput::Stderr(frame.payload), false),
        FrameKind::Exit => (ExecOutput::Exit(frame.parse::<Exit>()?), true),
        FrameKind::Attached => {
            let attached: nook_agent_proto::Attached = frame.parse()?;
            (
                ExecOutput::Attached {
                    offset: attached.offset,
                    missed: attached.missed,
                },
                false,
            )
        }
        FrameKind::End => (
            ExecOutput::End {
                offset: frame.parse::<nook_agent_proto::End>()?.offset,
            },
            true,
        ),
        FrameKind::Error => {
            let error: AgentError = frame.parse()?;
            (
                ExecOutput::Error {
                    code: error.code,
                    message: error.message,
                },
                true,
            )
        }
        other => return Err(ProtocolError::Unexpected(other)),
    })
}
