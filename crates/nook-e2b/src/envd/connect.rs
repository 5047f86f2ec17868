//! The Connect protocol, as E2B's SDKs speak it to envd: JSON codec only, unary calls as plain JSON bodies, and
//! streams as enveloped messages (one flags byte, a 4-byte big-endian length, the payload) that end with an
//! end-of-stream envelope (flag `0x02`) carrying `{}` or `{"error": …}`.
//!
//! Stream errors, even those before the first message, are sent in the end envelope with HTTP 200 (as connect-go
//! does), because the JavaScript SDK loses the error code of a non-200 streaming answer. Unary errors are the
//! Connect status with a `{"code", "message"}` body.

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Envelope flag: the last envelope of a stream, carrying the end message.
const END_STREAM: u8 = 0x02;
/// Envelope flag: a compressed payload (never negotiated here).
const COMPRESSED: u8 = 0x01;
/// Largest request message accepted.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A Connect error: a code name from the protocol's fixed set and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    /// `not_found`, `invalid_argument`, …
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl ConnectError {
    /// An error with `code`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("invalid_argument", message)
    }

    /// `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new("not_found", message)
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new("internal", message)
    }

    /// The HTTP status of this code for unary answers.
    pub fn status(&self) -> StatusCode {
        match self.code {
            "canceled" => StatusCode::from_u16(499).expect("valid status"),
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "permission_denied" => StatusCode::FORBIDDEN,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> serde_json::Value {
        serde_json::json!({ "code": self.code, "message": self.message })
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

impl From<nook_control::error::ApiFailure> for ConnectError {
    fn from(failure: nook_control::error::ApiFailure) -> Self {
        let code = match (failure.status, failure.code) {
            (_, "not_found") => "not_found",
            // envd answers an unknown user as an authentication failure, whatever the call.
            (_, "no_such_user") => "unauthenticated",
            (_, "already_exists") => "already_exists",
            (_, "permission_denied") => "permission_denied",
            (_, "not_running") | (StatusCode::CONFLICT, _) => "failed_precondition",
            (StatusCode::BAD_REQUEST, _) => "invalid_argument",
            (StatusCode::NOT_FOUND, _) => "not_found",
            _ => "internal",
        };
        let message = match failure.reason {
            Some(reason) => format!("{}: {reason}", failure.message),
            None => failure.message,
        };
        Self { code, message }
    }
}

/// The call's deadline from `connect-timeout-ms`, when given and not zero.
pub fn timeout(headers: &axum::http::HeaderMap) -> Option<std::time::Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(std::time::Duration::from_millis)
}

/// Waits until `deadline`; forever when there is none.
pub async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A unary answer: the message as JSON, or the error.
pub fn unary<T: Serialize>(result: Result<T, ConnectError>) -> Response {
    match result {
        Ok(message) => axum::Json(message).into_response(),
        Err(error) => error.into_response(),
    }
}

/// Parses a unary request body (JSON; unknown fields ignored).
pub fn parse_unary<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|error| ConnectError::invalid(format!("the request does not parse: {error}")))
}

/// Parses the single enveloped message of a server-streaming request.
pub fn parse_stream_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, ConnectError> {
    let mut reader = EnvelopeReader::default();
    reader.push(body);
    match reader.next_envelope()? {
        Some((flags, payload)) if flags & END_STREAM == 0 => parse_unary(&payload),
        _ => Err(ConnectError::invalid("the request carries no message envelope")),
    }
}

/// Frames one message.
pub fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// The end-of-stream envelope for a result.
pub fn end_envelope(error: Option<&ConnectError>) -> Bytes {
    let end = match error {
        None => serde_json::json!({}),
        Some(error) => serde_json::json!({ "error": error.body() }),
    };
    envelope(END_STREAM, &serde_json::to_vec(&end).expect("json"))
}

/// A streaming answer: every message as it comes, then the end envelope (with the error, if the stream ended with
/// one). Always HTTP 200 with the exact content type the SDKs check.
pub fn server_stream<S, T>(messages: S) -> Response
where
    S: Stream<Item = Result<T, ConnectError>> + Send + 'static,
    T: Serialize + Send + 'static,
{
    let body = messages
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .scan(false, |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let frame = match item {
                Some(Ok(message)) => envelope(0, &serde_json::to_vec(&message).expect("messages serialize")),
                Some(Err(error)) => {
                    *ended = true;
                    end_envelope(Some(&error))
                }
                None => {
                    *ended = true;
                    end_envelope(None)
                }
            };
            futures::future::ready(Some(Ok::<_, std::convert::Infallible>(frame)))
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(body))
        .expect("valid response")
}

/// A streaming answer whose messages a task sends into a channel; it ends when the task drops the sender.
pub fn channel_stream<T: Serialize + Send + 'static>(
    receiver: tokio::sync::mpsc::Receiver<Result<T, ConnectError>>,
) -> Response {
    server_stream(futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    }))
}

/// Splits a byte stream into envelopes.
#[derive(Debug, Default)]
pub struct EnvelopeReader {
    buffer: Vec<u8>,
}

impl EnvelopeReader {
    /// Adds bytes read from the request body.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole envelope (flags, payload), if one has arrived.
    pub fn next_envelope(&mut self) -> Result<Option<(u8, Vec<u8>)>, ConnectError> {
        if self.buffer.len() < 5 {
            return Ok(None);
        }
        let flags = self.buffer[0];
        if flags & COMPRESSED != 0 {
            return Err(ConnectError::new(
                "unimplemented",
                "compressed messages are not supported",
            ));
        }
        let length = u32::from_be_bytes(self.buffer[1..5].try_into().expect("4 bytes")) as usize;
        if length > MAX_MESSAGE {
            return Err(ConnectError::new(
                "resource_exhausted",
                format!("a message of {length} bytes is over the limit of {MAX_MESSAGE}"),
            ));
        }
        if self.buffer.len() < 5 + length {
            return Ok(None);
        }
        let payload = self.buffer[5..5 + length].to_vec();
        self.buffer.drain(..5 + length);
        Ok(Some((flags, payload)))
    }

    /// Whether bytes of an unfinished envelope are left.
    pub fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_across_reads() {
        let first = envelope(0, br#"{"a":1}"#);
        let second = envelope(END_STREAM, b"{}");
        let mut all = first.to_vec();
        all.extend_from_slice(&second);
        let mut reader = EnvelopeReader::default();
        reader.push(&all[..3]);
        assert_eq!(reader.next_envelope().unwrap(), None);
        reader.push(&all[3..9]);
        assert_eq!(reader.next_envelope().unwrap(), None);
        reader.push(&all[9..]);
        assert_eq!(reader.next_envelope().unwrap(), Some((0, br#"{"a":1}"#.to_vec())));
        assert_eq!(reader.next_envelope().unwrap(), Some((END_STREAM, b"{}".to_vec())));
        assert!(!reader.has_partial());
    }

    #[test]
    fn oversized_and_compressed_messages_are_refused() {
        let mut reader = EnvelopeReader::default();
        reader.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(reader.next_envelope().unwrap_err().code, "resource_exhausted");
        let mut reader = EnvelopeReader::default();
        reader.push(&envelope(COMPRESSED, b"x"));
        assert_eq!(reader.next_envelope().unwrap_err().code, "unimplemented");
    }
}
