//! Terminals: a WebSocket to a background process (`GET /v1/sandboxes/{sandbox}/processes/{pid}/terminal`).
//!
//! [`Client::terminal`] connects and returns a [`Terminal`], which splits into a [`TerminalWriter`] (input bytes,
//! resize, signal, close stdin) and a [`TerminalReader`] (output bytes and events) so that a caller can type and
//! read at the same time. Dropping both detaches; the process keeps running and can be attached again.

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use nook_api::{ApiError, ExecEvent, TerminalCommand};
use reqwest::StatusCode;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Client, ClientError};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What arrives from a terminal.
#[derive(Debug, Clone, PartialEq)]
pub enum TerminalOutput {
    /// Bytes of standard output (for a terminal: what it shows).
    Stdout(Bytes),
    /// Everything else: `attached` first, `stderr` chunks, `notice`s, and a final `exit` or `error`.
    Event(ExecEvent),
}

/// A connected terminal.
#[derive(Debug)]
pub struct Terminal {
    socket: Socket,
}

/// The sending half of a terminal.
#[derive(Debug)]
pub struct TerminalWriter {
    sink: SplitSink<Socket, Message>,
}

/// The receiving half of a terminal.
#[derive(Debug)]
pub struct TerminalReader {
    stream: SplitStream<Socket>,
}

impl Client {
    /// Attaches to a background process over a WebSocket, replaying its output from `offset`.
    pub async fn terminal(&self, key: &str, pid: u32, offset: u64) -> Result<Terminal, ClientError> {
        let pid = pid.to_string();
        let mut url = self.url_for(&["v1", "sandboxes", key, "processes", &pid, "terminal"]);
        url.query_pairs_mut().append_pair("offset", &offset.to_string());
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .map_err(|()| ClientError::BadUrl(url.to_string()))?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|error| self.websocket_error(error))?;
        let bearer = format!("Bearer {}", self.key)
            .parse()
            .map_err(|_| ClientError::Decode("the API key is not a valid header value".into()))?;
        request.headers_mut().insert(reqwest::header::AUTHORIZATION, bearer);
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|error| self.websocket_error(error))?;
        Ok(Terminal { socket })
    }

    /// Turns a failed WebSocket connection into a client error; an HTTP answer keeps nook's error body.
    fn websocket_error(&self, error: tungstenite::Error) -> ClientError {
        match error {
            tungstenite::Error::Http(response) => {
                let status = StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = response.body().as_deref().unwrap_or_default();
                let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| ApiError {
                    code: "http_error".into(),
                    message: format!("the server answered {status}: {}", String::from_utf8_lossy(body)),
                    reason: None,
                });
                ClientError::Api { status, error }
            }
            other => ClientError::WebSocket {
                url: self.base.to_string(),
                source: Box::new(other),
            },
        }
    }
}

impl Terminal {
    /// Splits into a writer and a reader that can be used from different tasks.
    pub fn split(self) -> (TerminalWriter, TerminalReader) {
        let (sink, stream) = self.socket.split();
        (TerminalWriter { sink }, TerminalReader { stream })
    }
}

impl TerminalWriter {
    /// Writes bytes to the process's standard input.
    pub async fn input(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        self.send(Message::Binary(data.into())).await
    }

    /// Sets the terminal size.
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), ClientError> {
        self.command(TerminalCommand::Resize { cols, rows }).await
    }

    /// Sends a signal to the process.
    pub async fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.command(TerminalCommand::Signal { signal }).await
    }

    /// Closes the process's standard input.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.command(TerminalCommand::CloseStdin).await
    }

    /// Detaches: closes the socket; the process keeps running.
    pub async fn detach(mut self) -> Result<(), ClientError> {
        self.sink.close().await.map_err(|error| ClientError::WebSocket {
            url: String::new(),
            source: Box::new(error),
        })
    }

    async fn command(&mut self, command: TerminalCommand) -> Result<(), ClientError> {
        let text = serde_json::to_string(&command).expect("commands serialize");
        self.send(Message::Text(text.into())).await
    }

    async fn send(&mut self, message: Message) -> Result<(), ClientError> {
        self.sink.send(message).await.map_err(|error| ClientError::WebSocket {
            url: String::new(),
            source: Box::new(error),
        })
    }
}

impl TerminalReader {
    /// The next output chunk or event; `None` once the server closed the socket (after the final event).
    pub async fn next(&mut self) -> Option<Result<TerminalOutput, ClientError>> {
        loop {
            let message = match self.stream.next().await? {
                Ok(message) => message,
                Err(error) => {
                    return Some(Err(ClientError::WebSocket {
                        url: String::new(),
                        source: Box::new(error),
                    }))
                }
            };
            return Some(match message {
                Message::Binary(data) => Ok(TerminalOutput::Stdout(data)),
                Message::Text(text) => serde_json::from_str(text.as_str())
                    .map(TerminalOutput::Event)
                    .map_err(|error| ClientError::Decode(format!("terminal event: {error}"))),
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            });
        }
    }
}
