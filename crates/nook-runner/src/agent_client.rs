//! The agent protocol as the runner speaks it.
//!
//! Each request opens a new connection to the sandbox's agent socket (a Unix socket that only exists on the host
//! side). An exec becomes an [`ExecStream`]: a channel of [`ExecOutput`] fed by a task that reads the agent's frames,
//! and a channel of [`ExecInput`] that the same task writes to the agent. The stream's last item is always either
//! [`ExecOutput::Exit`] or [`ExecOutput::Error`]; if the connection breaks before the agent reported an exit, the
//! stream ends with an error, never with an invented exit status.

use std::path::Path;

use nook_agent_proto::{
    read_frame, write_frame, write_json, AgentError, ExecSpec, Exit, FrameKind, Pong, ProtocolError, Request,
    SignalRequest, Started,
};
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
    match read_frame(&mut stream).await? {
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
