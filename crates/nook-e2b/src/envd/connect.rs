//! The Connect protocol, as envd speaks it: unary calls as plain bodies, and streams as enveloped messages (one
//! flags byte, a 4-byte big-endian length, the payload) that end with an end-of-stream envelope (flag `0x02`)
//! carrying `{}` or `{"error": …}`. Both of Connect's codecs: JSON (`application/json`,
//! `application/connect+json`; what E2B's SDKs send) and binary protobuf (`application/proto`,
//! `application/connect+proto`; [`super::proto`]), chosen by the request's content type and answered in kind; a
//! call of another content type is refused with 415 before its handler runs. Error bodies and the end-of-stream
//! message are JSON under both codecs, as the protocol has it.
//!
//! Stream errors, even those before the first message, are sent in the end envelope with HTTP 200 (as connect-go
//! does), because the JavaScript SDK loses the error code of a non-200 streaming answer. Unary errors are the
//! Connect status with a `{"code", "message"}` body.

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::proto;

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

/// A request message, in either codec.
pub trait RequestMessage: DeserializeOwned + proto::Decode {}
impl<T: DeserializeOwned + proto::Decode> RequestMessage for T {}

/// An answer message, in either codec.
pub trait AnswerMessage: Serialize + proto::Encode + Send + 'static {}
impl<T: Serialize + proto::Encode + Send + 'static> AnswerMessage for T {}

/// How a call's messages are encoded, from its `Content-Type`; an extractor that refuses other content types with
/// 415 Unsupported Media Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Binary protobuf rather than JSON.
    pub proto: bool,
    /// Enveloped messages (`application/connect+…`: a streaming call) rather than a plain body.
    pub enveloped: bool,
}

impl Codec {
    /// JSON without envelopes: what a call without a content type gets.
    pub const JSON: Self = Self {
        proto: false,
        enveloped: false,
    };

    /// The codec of `content_type` (parameters ignored), if Connect has it.
    pub fn of(content_type: Option<&HeaderValue>) -> Option<Self> {
        let Some(value) = content_type else {
            return Some(Self::JSON);
        };
        let media_type = value.to_str().ok()?.split(';').next()?.trim().to_ascii_lowercase();
        let (enveloped, codec) = match media_type.strip_prefix("application/connect+") {
            Some(codec) => (true, codec.to_string()),
            None => (false, media_type.strip_prefix("application/")?.to_string()),
        };
        let proto = match codec.as_str() {
            "json" => false,
            "proto" => true,
            _ => return None,
        };
        Some(Self { proto, enveloped })
    }

    /// The content type of answers: unary or streaming, in this codec.
    fn content_type(self, streaming: bool) -> &'static str {
        match (streaming, self.proto) {
            (false, false) => "application/json",
            (false, true) => "application/proto",
            (true, false) => "application/connect+json",
            (true, true) => "application/connect+proto",
        }
    }

    /// Parses one message (unknown fields ignored; an empty body is the empty message).
    pub fn decode<T: RequestMessage>(self, payload: &[u8]) -> Result<T, ConnectError> {
        let parsed = if self.proto {
            proto::decode(payload).map_err(|error| error.to_string())
        } else {
            let payload = if payload.is_empty() { b"{}".as_slice() } else { payload };
            serde_json::from_slice(payload).map_err(|error| error.to_string())
        };
        parsed.map_err(|error| ConnectError::invalid(format!("the request does not parse: {error}")))
    }

    /// Encodes one message.
    pub fn encode<T: AnswerMessage>(self, message: &T) -> Vec<u8> {
        if self.proto {
            message.to_proto()
        } else {
            serde_json::to_vec(message).expect("messages serialize")
        }
    }

    /// Reads a request body (bounded: a Connect request is one message of at most [`MAX_MESSAGE`] bytes) and
    /// parses it with [`Codec::parse`].
    pub async fn read<T: RequestMessage>(self, body: Body) -> Result<T, ConnectError> {
        let bytes = axum::body::to_bytes(body, MAX_MESSAGE + 5)
            .await
            .map_err(|error| ConnectError::invalid(format!("reading the request failed: {error}")))?;
        self.parse(&bytes)
    }

    /// Parses a request body: the whole body, or its single message envelope for a streaming call.
    pub fn parse<T: RequestMessage>(self, body: &[u8]) -> Result<T, ConnectError> {
        if !self.enveloped {
            return self.decode(body);
        }
        let mut reader = EnvelopeReader::default();
        reader.push(body);
        match reader.next_envelope()? {
            Some((flags, payload)) if flags & END_STREAM == 0 => self.decode(&payload),
            _ => Err(ConnectError::invalid("the request carries no message envelope")),
        }
    }

    /// A unary answer: the message in this codec, or the error (always JSON).
    pub fn unary<T: AnswerMessage>(self, result: Result<T, ConnectError>) -> Response {
        match result {
            Ok(message) => Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, self.content_type(false))
                .body(Body::from(self.encode(&message)))
                .expect("valid response"),
            Err(error) => error.into_response(),
        }
    }

    /// A streaming answer: every message as it comes, then the end envelope (with the error, if the stream ended
    /// with one). Always HTTP 200 with the exact content type the SDKs check.
    pub fn server_stream<S, T>(self, messages: S) -> Response
    where
        S: Stream<Item = Result<T, ConnectError>> + Send + 'static,
        T: AnswerMessage,
    {
        let body = messages
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .scan(false, move |ended, item| {
                if *ended {
                    return futures::future::ready(None);
                }
                let frame = match item {
                    Some(Ok(message)) => envelope(0, &self.encode(&message)),
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
            .header(header::CONTENT_TYPE, self.content_type(true))
            .body(Body::from_stream(body))
            .expect("valid response")
    }

    /// A streaming answer of one error.
    pub fn stream_error<T: AnswerMessage>(self, error: ConnectError) -> Response {
        self.server_stream(futures::stream::once(async move { Err::<T, _>(error) }))
    }

    /// A streaming answer whose messages a task sends into a channel; it ends when the task drops the sender.
    pub fn channel_stream<T: AnswerMessage>(
        self,
        receiver: tokio::sync::mpsc::Receiver<Result<T, ConnectError>>,
    ) -> Response {
        self.server_stream(futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        }))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Codec {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Self::of(parts.headers.get(header::CONTENT_TYPE)).ok_or_else(|| {
            let message = "send application/json or application/proto (application/connect+json or \
                           application/connect+proto for streaming calls)";
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                [("accept-post", "application/json, application/proto")],
                axum::Json(serde_json::json!({ "code": "invalid_argument", "message": message })),
            )
                .into_response()
        })
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

/// The end-of-stream envelope for a result (JSON under both codecs).
pub fn end_envelope(error: Option<&ConnectError>) -> Bytes {
    let end = match error {
        None => serde_json::json!({}),
        Some(error) => serde_json::json!({ "error": error.body() }),
    };
    envelope(END_STREAM, &serde_json::to_vec(&end).expect("json"))
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
    fn codecs_come_from_the_content_type() {
        let of = |value: &'static str| Codec::of(Some(&HeaderValue::from_static(value)));
        assert_eq!(Codec::of(None), Some(Codec::JSON));
        assert_eq!(of("application/json; charset=utf-8"), Some(Codec::JSON));
        assert_eq!(
            of("Application/Connect+Proto"),
            Some(Codec {
                proto: true,
                enveloped: true
            })
        );
        assert_eq!(
            of("application/proto"),
            Some(Codec {
                proto: true,
                enveloped: false
            })
        );
        assert_eq!(of("application/connect+json").map(|codec| codec.proto), Some(false));
        assert_eq!(of("application/xml"), None);
        assert_eq!(of("text/plain"), None);
        // The same message decodes from either codec, and a streaming call's single envelope is unwrapped.
        let streamed = Codec {
            proto: true,
            enveloped: true,
        };
        let from_proto: super::super::messages::PathRequest =
            streamed.parse(&envelope(0, &[0x0a, 0x02, b'/', b'x'])).unwrap();
        let from_json: super::super::messages::PathRequest = Codec::JSON.parse(br#"{"path":"/x"}"#).unwrap();
        assert_eq!((from_proto.path.as_str(), from_json.path.as_str()), ("/x", "/x"));
        assert_eq!(
            streamed
                .parse::<super::super::messages::PathRequest>(&envelope(END_STREAM, b"{}"))
                .unwrap_err()
                .code,
            "invalid_argument"
        );
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
