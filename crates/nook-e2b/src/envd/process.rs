//! `process.Process`: commands and terminals, as nook background processes.
//!
//! `Start` spawns a background process (on a terminal when asked) as the acting user and follows its output: the
//! stream is `start{pid}` first, then `data` and `keepalive` events, then exactly one `end` built from the reaper's
//! real exit. `connect-timeout-ms` on `Start` is the process's lifetime, as in envd: it is killed when it passes
//! and the stream ends with `deadline_exceeded` (on `Connect` it only bounds the stream). Commands see E2B's default
//! variables (`E2B_SANDBOX`, `E2B_SANDBOX_ID`, `E2B_TEMPLATE_ID`) under their own; a relative or `~` working
//! directory is under the acting user's home.
//!
//! Output is followed without loss: a client that reads slowly holds the process back (it blocks writing), as
//! envd's pipes do, rather than nook's bounded replay buffer dropping output. Disconnecting never kills a process;
//! `Connect` follows it again from its current output (envd keeps no replay; nook could, but the SDKs expect only new
//! output). Processes are selected by pid; tags exist only for template start commands, which nook does not have yet.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::StreamExt;
use nook_api::ExecRequest;
use nook_runner::ExecOutput;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::connect::{self, Codec, ConnectError, RequestMessage};
use super::messages::{
    DataEvent, Empty, EndEvent, ListResponse, ProcessConfig, ProcessEvent, ProcessEventMessage, ProcessInfo,
    ProcessSelector, SelectorRequest, SendInputRequest, SendSignalRequest, StartRequest, StreamInputRequest,
    UpdateRequest,
};
use super::{account, resolve_path, target, user_of};
use crate::E2b;

/// Keepalive interval when the client names none (envd's default).
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// The keepalive interval a client asks for in `Keepalive-Ping-Interval` (seconds).
fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|seconds| *seconds > 0)
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_KEEPALIVE)
}

fn pid_of(selector: &ProcessSelector) -> Result<u32, ConnectError> {
    match (selector.pid, &selector.tag) {
        (Some(pid), _) => Ok(pid),
        (None, Some(tag)) => Err(ConnectError::not_found(format!("no process with tag {tag:?}"))),
        (None, None) => Err(ConnectError::invalid("name the process by pid")),
    }
}

/// The `end` event of an exit.
fn end_event(exit: &nook_agent_proto::Exit) -> EndEvent {
    match (exit.code, exit.signal) {
        (Some(code), _) => {
            let status = format!("exit status {code}");
            EndEvent {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| status.clone()),
                status,
            }
        }
        (None, Some(signal)) => {
            let status = format!("signal: {}", signal_name(signal));
            EndEvent {
                exit_code: -1,
                exited: false,
                error: Some(status.clone()),
                status,
            }
        }
        (None, None) => EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some("the process's end could not be observed".into()),
        },
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        1 => "hangup".into(),
        2 => "interrupt".into(),
        3 => "quit".into(),
        6 => "aborted".into(),
        9 => "killed".into(),
        11 => "segmentation fault".into(),
        13 => "broken pipe".into(),
        15 => "terminated".into(),
        other => format!("signal {other}"),
    }
}

/// When a stream must end: the `connect-timeout-ms` deadline, and whether the process dies with it.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    kills: bool,
}

/// How a process stream is sent: its codec, how often a quiet stream gets a keepalive, when it ends.
#[derive(Debug, Clone, Copy)]
struct StreamShape {
    codec: Codec,
    keepalive: Duration,
    deadline: Option<Deadline>,
}

/// Follows `pid`'s output from `offset`, sending `start` first and ending with its `end`, or with
/// `deadline_exceeded` when the stream's deadline passes first, or with an error.
fn follow(e2b: E2b, sandbox: String, pid: u32, offset: u64, terminal: bool, shape: StreamShape) -> Response {
    let StreamShape {
        codec,
        keepalive,
        deadline,
    } = shape;
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        let start = ProcessEventMessage {
            event: ProcessEvent::Start { pid },
        };
        if sender.send(Ok(start)).await.is_err() {
            return;
        }
        let mut output = match e2b.control.follow_held(&sandbox, pid, offset).await {
            Ok(output) => output,
            Err(failure) => {
                let _ = sender.send(Err(ConnectError::from(failure))).await;
                return;
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = connect::until(deadline.map(|deadline| deadline.at)) => {
                    let message = if deadline.is_some_and(|deadline| deadline.kills) {
                        "the command's timeout passed: it was killed"
                    } else {
                        "the stream's timeout passed (the process keeps running)"
                    };
                    let _ = sender.send(Err(ConnectError::new("deadline_exceeded", message))).await;
                    return;
                }
                next = tokio::time::timeout(keepalive, output.events.recv()) => next,
            };
            let event = match next {
                Err(_) => Some(ProcessEvent::Keepalive {}),
                Ok(None) => {
                    let _ = sender
                        .send(Err(ConnectError::new(
                            "unavailable",
                            "the process's output stream ended early",
                        )))
                        .await;
                    return;
                }
                Ok(Some(ExecOutput::Stdout(bytes))) if terminal => Some(ProcessEvent::Data(DataEvent::Pty(bytes))),
                Ok(Some(ExecOutput::Stdout(bytes))) => Some(ProcessEvent::Data(DataEvent::Stdout(bytes))),
                Ok(Some(ExecOutput::Stderr(bytes))) => Some(ProcessEvent::Data(DataEvent::Stderr(bytes))),
                Ok(Some(ExecOutput::Exit(exit))) => {
                    let end = ProcessEventMessage {
                        event: ProcessEvent::End(end_event(&exit)),
                    };
                    let _ = sender.send(Ok(end)).await;
                    return;
                }
                Ok(Some(ExecOutput::Error { code, message })) => {
                    let _ = sender
                        .send(Err(ConnectError::internal(format!("{message} ({code})"))))
                        .await;
                    return;
                }
                Ok(Some(ExecOutput::Started { .. } | ExecOutput::Attached { .. } | ExecOutput::End { .. })) => None,
            };
            if let Some(event) = event {
                if sender.send(Ok(ProcessEventMessage { event })).await.is_err() {
                    // The client went away: the process keeps running.
                    return;
                }
            }
        }
    });
    codec.channel_stream(receiver)
}

/// `Start` (server streaming).
pub async fn start(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let prepared = async {
        let sandbox = target(&parts.extensions)?;
        let user = user_of(&parts.headers)?;
        let start: StartRequest = codec.read(body).await?;
        if start.process.cmd.is_empty() {
            return Err(ConnectError::invalid("the command is empty"));
        }
        let mut command = vec![start.process.cmd.clone()];
        command.extend(start.process.args.iter().cloned());
        let cwd = match start.process.cwd.as_deref().filter(|cwd| !cwd.is_empty()) {
            Some(cwd) if !cwd.starts_with('/') => {
                let home = account(&e2b, &sandbox, &user).await?.home;
                Some(resolve_path(cwd, &home)?)
            }
            cwd => cwd.map(str::to_string),
        };
        let mut env = e2b_environment(&sandbox);
        env.extend(start.process.envs.clone());
        let pty = start.pty.and_then(|pty| pty.size).map(|size| nook_api::PtySize {
            cols: size.cols.clamp(1, 1000) as u16,
            rows: size.rows.clamp(1, 1000) as u16,
        });
        let request = ExecRequest {
            command,
            env,
            cwd,
            user: Some(user),
            pty: pty.or(start.pty.map(|_| nook_api::PtySize { cols: 80, rows: 24 })),
            ..Default::default()
        };
        let terminal = request.pty.is_some();
        let process = e2b.control.spawn(&sandbox.id, request).await?;
        if start.stdin == Some(false) {
            e2b.control.input(&sandbox.id, process.pid, Vec::new(), true).await?;
        }
        Ok::<_, ConnectError>((sandbox, process.pid, terminal))
    }
    .await;
    let (sandbox, pid, terminal) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => return codec.stream_error::<ProcessEventMessage>(error),
    };
    let deadline = connect::timeout(&parts.headers).map(|lifetime| {
        let control = e2b.control.clone();
        let sandbox = sandbox.id.clone();
        let at = Instant::now() + lifetime;
        // The process dies at its deadline even when no client follows it any more.
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            // A no-op once the process has ended.
            let _ = control.signal(&sandbox, pid, 9).await;
        });
        Deadline { at, kills: true }
    });
    let shape = StreamShape {
        codec,
        keepalive: keepalive_interval(&parts.headers),
        deadline,
    };
    follow(e2b, sandbox.id, pid, 0, terminal, shape)
}

/// E2B's default variables of every command, which the request's own override.
fn e2b_environment(sandbox: &nook_api::Sandbox) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("E2B_SANDBOX".to_string(), "true".to_string()),
        ("E2B_SANDBOX_ID".to_string(), sandbox.id.clone()),
        ("E2B_TEMPLATE_ID".to_string(), sandbox.image.clone()),
    ])
}

/// `Connect` (server streaming): follows a process from its current output on.
pub async fn connect(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let prepared = async {
        let sandbox = target(&parts.extensions)?;
        let request: SelectorRequest = codec.read(body).await?;
        let pid = pid_of(&request.process)?;
        let processes = e2b.control.processes(&sandbox.id).await?;
        let process = processes
            .iter()
            .find(|process| process.pid == pid)
            .ok_or_else(|| ConnectError::not_found(format!("process with pid {pid} not found")))?;
        let offset = if process.running { process.output_bytes } else { 0 };
        Ok::<_, ConnectError>((sandbox, pid, offset, process.terminal))
    }
    .await;
    match prepared {
        Ok((sandbox, pid, offset, terminal)) => {
            let deadline = connect::timeout(&parts.headers).map(|timeout| Deadline {
                at: Instant::now() + timeout,
                kills: false,
            });
            let shape = StreamShape {
                codec,
                keepalive: keepalive_interval(&parts.headers),
                deadline,
            };
            follow(e2b, sandbox.id, pid, offset, terminal, shape)
        }
        Err(error) => codec.stream_error::<ProcessEventMessage>(error),
    }
}

/// A unary handler's common start: the sandbox and the parsed message.
async fn unary_request<T: RequestMessage>(
    codec: Codec,
    request: axum::extract::Request,
) -> Result<(nook_api::Sandbox, T), ConnectError> {
    let (parts, body) = request.into_parts();
    let sandbox = target(&parts.extensions)?;
    Ok((sandbox, codec.read(body).await?))
}

/// `List`: running processes.
pub async fn list(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let (sandbox, _): (_, Empty) = unary_request(codec, request).await?;
            let processes = e2b.control.processes(&sandbox.id).await?;
            let processes = processes
                .into_iter()
                .filter(|process| process.running)
                .map(|process| {
                    let mut argv = process.command.into_iter();
                    ProcessInfo {
                        config: ProcessConfig {
                            cmd: argv.next().unwrap_or_default(),
                            args: argv.collect(),
                            ..Default::default()
                        },
                        pid: process.pid,
                    }
                })
                .collect();
            Ok(ListResponse { processes })
        }
        .await,
    )
}

/// `SendInput`.
pub async fn send_input(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let (sandbox, request): (_, SendInputRequest) = unary_request(codec, request).await?;
            let pid = pid_of(&request.process)?;
            let data = match (request.input.stdin, request.input.pty) {
                (Some(data), None) | (None, Some(data)) => data,
                _ => return Err(ConnectError::new("unimplemented", "send either stdin or pty input")),
            };
            e2b.control.input(&sandbox.id, pid, data, false).await?;
            Ok(Empty {})
        }
        .await,
    )
}

/// `StreamInput` (client streaming): a `start` naming the process, then input chunks, applied in order.
pub async fn stream_input(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let result = async {
        let sandbox = target(&parts.extensions)?;
        let mut reader = connect::EnvelopeReader::default();
        let mut chunks = body.into_data_stream();
        let mut pid = None;
        loop {
            while let Some((_, payload)) = reader.next_envelope()? {
                let message: StreamInputRequest = codec.decode(&payload)?;
                if let Some(start) = message.start {
                    pid = Some(pid_of(&start.process)?);
                } else if let Some(data) = message.data {
                    let pid = pid.ok_or_else(|| ConnectError::invalid("input before the start message"))?;
                    if let Some(bytes) = data.input.stdin.or(data.input.pty) {
                        e2b.control.input(&sandbox.id, pid, bytes, false).await?;
                    }
                }
            }
            match chunks.next().await {
                Some(Ok(chunk)) => reader.push(&chunk),
                Some(Err(error)) => return Err(ConnectError::new("canceled", format!("the input broke: {error}"))),
                None if reader.has_partial() => return Err(ConnectError::invalid("the input ends mid-message")),
                None => return Ok(()),
            }
        }
    }
    .await;
    let messages = match result {
        Ok(()) => vec![Ok(Empty {})],
        Err(error) => vec![Err(error)],
    };
    codec.server_stream(futures::stream::iter(messages))
}

/// `CloseStdin`.
pub async fn close_stdin(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let (sandbox, request): (_, SelectorRequest) = unary_request(codec, request).await?;
            let pid = pid_of(&request.process)?;
            e2b.control.input(&sandbox.id, pid, Vec::new(), true).await?;
            Ok(Empty {})
        }
        .await,
    )
}

/// `SendSignal`: SIGTERM or SIGKILL.
pub async fn send_signal(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let (sandbox, request): (_, SendSignalRequest) = unary_request(codec, request).await?;
            let pid = pid_of(&request.process)?;
            let names = [("SIGNAL_SIGTERM", 15), ("SIGNAL_SIGKILL", 9)];
            let signal = request
                .signal
                .and_then(|signal| signal.number(&names))
                .filter(|number| *number == 9 || *number == 15)
                .ok_or_else(|| ConnectError::new("unimplemented", "send SIGNAL_SIGTERM or SIGNAL_SIGKILL"))?;
            // An ended process is `not_found`, as envd answers (the SDK's kill() then returns false).
            let running = e2b
                .control
                .processes(&sandbox.id)
                .await?
                .iter()
                .any(|process| process.pid == pid && process.running);
            if !running {
                return Err(ConnectError::not_found(format!("process with pid {pid} not found")));
            }
            e2b.control.signal(&sandbox.id, pid, signal as i32).await?;
            Ok(Empty {})
        }
        .await,
    )
}

/// `Update`: resizes a terminal.
pub async fn update(State(e2b): State<E2b>, codec: Codec, request: axum::extract::Request) -> Response {
    codec.unary(
        async {
            let (sandbox, request): (_, UpdateRequest) = unary_request(codec, request).await?;
            let pid = pid_of(&request.process)?;
            if let Some(size) = request.pty.and_then(|pty| pty.size) {
                let size = nook_api::PtySize {
                    cols: size.cols.clamp(1, 1000) as u16,
                    rows: size.rows.clamp(1, 1000) as u16,
                };
                e2b.control.resize(&sandbox.id, pid, size).await?;
            }
            Ok(Empty {})
        }
        .await,
    )
}
