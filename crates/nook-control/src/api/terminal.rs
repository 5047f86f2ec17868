//! Terminals over WebSocket: `GET /v1/sandboxes/{sandbox}/processes/{pid}/terminal`.
//!
//! One socket carries both directions of a background process (usually one started with a pseudo-terminal):
//! binary messages from the client are written to the process's standard input, binary messages to the client are
//! its standard output, and text messages are control: [`TerminalCommand`] JSON from the client (resize, signal,
//! close stdin), [`ExecEvent`] JSON from the server (`attached` first, `stderr` chunks, a final `exit` or `error`).
//! The output side is an attach to the process's replay log, so a client that reconnects with `?offset=` gets
//! exactly what it missed, and any number of viewers can watch one terminal. Closing the socket only detaches.
//!
//! Input is applied by its own task, in order, so that a process that does not read its input never stalls the
//! output going the other way. The server pings every 15 s while idle so that proxies do not cut quiet terminals.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use nook_api::{ExecEvent, PtySize, TerminalCommand};
use nook_runner::ExecOutput;
use tokio::sync::mpsc;

use super::{exec_event, AppState, KEEPALIVE};
use crate::control::Control;
use crate::error::ApiFailure;

/// Largest message a client may send (input is applied in pieces of at most this size).
const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Query of a terminal attach.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct TerminalQuery {
    /// Replay output from this byte offset (0: from the start, as far as the buffer still holds it).
    #[serde(default)]
    offset: u64,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/processes/{pid}/terminal", tag = "processes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"),
           ("pid" = u32, Path, description = "Process id inside the sandbox"), TerminalQuery),
    responses((status = 101, description = "Switched to a WebSocket. Client → server: binary = standard input, \
               text = `TerminalCommand` JSON. Server → client: binary = standard output, text = `ExecEvent` JSON \
               (`attached`, `stderr`, then a final `exit` or `error`, after which the server closes). Closing the \
               socket detaches; the process keeps running."),
              (status = 404, description = "No such sandbox or process", body = nook_api::ApiError),
              (status = 409, description = "The sandbox is not running", body = nook_api::ApiError)),
    security(("bearer" = [])))]
pub(super) async fn process_terminal(
    State(state): State<AppState>,
    Path((key, pid)): Path<(String, u32)>,
    Query(query): Query<TerminalQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiFailure> {
    // Attach before upgrading, so that an unknown sandbox or process is a plain HTTP error. The session runs after
    // this request (outside its caller's scope), so it names the sandbox by id, which a name could not do safely.
    let output = state.control.attach(&key, pid, query.offset, true).await?;
    let id = state.control.resolve(&key).await?.id;
    let control = state.control.clone();
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| serve_terminal(socket, control, id, pid, output)))
}

/// Pumps one terminal session until the process ends or the client goes away.
async fn serve_terminal(
    socket: WebSocket,
    control: Arc<Control>,
    key: String,
    pid: u32,
    mut output: nook_runner::ExecStream,
) {
    let (mut sender, mut receiver) = socket.split();
    // The input task reports back only through this channel: a text for the client when an input failed.
    let (notices, mut notices_rx) = mpsc::channel::<ExecEvent>(4);
    let input = tokio::spawn(async move {
        while let Some(Ok(message)) = receiver.next().await {
            let result = match message {
                Message::Binary(data) => control.input(&key, pid, data.to_vec(), false).await,
                Message::Text(text) => match serde_json::from_str::<TerminalCommand>(text.as_str()) {
                    Ok(command) => apply(&control, &key, pid, command).await,
                    Err(error) => Err(ApiFailure::invalid(format!("unknown terminal command: {error}"))),
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if let Err(failure) = result {
                let notice = ExecEvent::Notice {
                    code: failure.code.to_string(),
                    message: failure.message,
                };
                if notices.send(notice).await.is_err() {
                    break;
                }
            }
        }
    });

    let mut offset = 0u64;
    loop {
        // Each turn sends one message; the process's end (exit or error) is the last.
        let (message, last) = tokio::select! {
            event = output.events.recv() => match event {
                Some(ExecOutput::Stdout(chunk)) => {
                    offset += chunk.len() as u64;
                    (Message::Binary(chunk.into()), false)
                }
                other => {
                    let event = exec_event(other, &mut offset, true);
                    let last = matches!(event, ExecEvent::Exit { .. } | ExecEvent::End { .. } | ExecEvent::Error { .. });
                    (text(&event), last)
                }
            },
            notice = notices_rx.recv() => match notice {
                Some(notice) => (text(&notice), false),
                // The client closed its side: detach.
                None => break,
            },
            _ = tokio::time::sleep(KEEPALIVE) => (Message::Ping(Default::default()), false),
        };
        if sender.send(message).await.is_err() || last {
            break;
        }
    }
    let _ = sender.close().await;
    input.abort();
}

/// Applies one control message from the client.
async fn apply(control: &Control, key: &str, pid: u32, command: TerminalCommand) -> Result<(), ApiFailure> {
    match command {
        TerminalCommand::Resize { cols, rows } => control.resize(key, pid, PtySize { cols, rows }).await,
        TerminalCommand::Signal { signal } => control.signal(key, pid, signal).await,
        TerminalCommand::CloseStdin => control.input(key, pid, Vec::new(), true).await,
    }
}

/// A text message carrying an event.
fn text(event: &ExecEvent) -> Message {
    Message::Text(serde_json::to_string(event).expect("events serialize").into())
}
