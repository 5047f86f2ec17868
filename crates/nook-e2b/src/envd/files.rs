//! envd's `/files`: download (`GET`) and upload (`POST`, multipart or raw body) of whole files, streamed through
//! nook's agent without holding them in memory.
//!
//! The user is the `username` parameter (else `user`); relative paths are under their home, and uploads (with any
//! directories created for them) belong to them. A multipart part's file name is the destination path, unless the
//! `path` parameter names it; a raw `application/octet-stream` body needs `path`. A `Content-Encoding: gzip` body is
//! inflated while it streams, by a blocking task that reads a bounded buffer at a time: a small body that inflates
//! enormously costs disk in the sandbox, which bounds it like any other write, never memory here. `X-Metadata-<key>`
//! headers are the uploaded files' metadata (extended attributes `user.e2b.<key>`; a file written without them has
//! none), and each file's answer carries the metadata read back from it. Downloads are gzip-compressed, as they
//! stream, when the client asks for gzip by name (see [`accepts_gzip`]), and sent as they are otherwise. Errors are
//! `{"code": <status>, "message"}`, as envd sends them. Who may call (the access token, or a signed URL) is checked
//! before any of this, in [`super::check_access_token`].

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use nook_agent_proto::{FileStat, FileWrite};
use serde::{Deserialize, Serialize};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::{account, resolve_path, target};
use crate::{E2b, DEFAULT_USER};

/// Bytes an inflating upload hands on at a time (and at most four such chunks wait for the agent).
const INFLATE_CHUNK: usize = 64 * 1024;
/// The request header prefix of upload metadata.
const METADATA_HEADER: &str = "x-metadata-";

/// Query of `/files` (the `signature` parameters are read by the access check).
#[derive(Debug, Deserialize)]
pub struct FilesQuery {
    path: Option<String>,
    username: Option<String>,
}

/// One written file.
#[derive(Debug, Serialize)]
struct WrittenFile {
    path: String,
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    metadata: BTreeMap<String, String>,
}

impl From<FileStat> for WrittenFile {
    fn from(stat: FileStat) -> Self {
        Self {
            path: stat.path,
            name: stat.name,
            kind: "file",
            metadata: stat.metadata,
        }
    }
}

fn failure(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": status.as_u16(), "message": message.into() })),
    )
        .into_response()
}

fn from_api(error: nook_control::error::ApiFailure) -> Response {
    let status = match error.code {
        "not_found" => StatusCode::NOT_FOUND,
        "is_a_directory" | "not_a_directory" | "invalid_path" => StatusCode::BAD_REQUEST,
        _ if error.status.is_client_error() => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    failure(status, error.message)
}

/// The sandbox, the acting account and the resolved path of a `/files` call.
async fn prepare(
    e2b: &E2b,
    extensions: &axum::http::Extensions,
    query: &FilesQuery,
    path: Option<&str>,
) -> Result<(nook_api::Sandbox, nook_agent_proto::AccountInfo, Option<String>), Response> {
    let sandbox = target(extensions).map_err(|error| failure(StatusCode::NOT_FOUND, error.message))?;
    let user = query
        .username
        .as_deref()
        .filter(|name| !name.is_empty())
        .unwrap_or(DEFAULT_USER);
    let account = account(e2b, &sandbox, user)
        .await
        .map_err(|error| failure(StatusCode::UNAUTHORIZED, error.message))?;
    let path = match path {
        Some(path) => {
            Some(resolve_path(path, &account.home).map_err(|error| failure(StatusCode::BAD_REQUEST, error.message))?)
        }
        None => None,
    };
    Ok((sandbox, account, path))
}

/// `GET /files?path=`.
pub async fn download(
    State(e2b): State<E2b>,
    Query(query): Query<FilesQuery>,
    request: axum::extract::Request,
) -> Response {
    let Some(path) = query.path.clone() else {
        return failure(StatusCode::BAD_REQUEST, "the path parameter is required");
    };
    let gzip = match accepts_gzip(request.headers()) {
        Ok(gzip) => gzip,
        Err(message) => return failure(StatusCode::NOT_ACCEPTABLE, message),
    };
    let (sandbox, _, path) = match prepare(&e2b, request.extensions(), &query, Some(&path)).await {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let path = path.expect("a path was given");
    let (info, chunks) = match e2b.control.read_file(&sandbox.id, &path).await {
        Ok(read) => read,
        Err(error) if error.code == "not_found" => {
            return failure(StatusCode::NOT_FOUND, format!("path '{path}' does not exist"))
        }
        Err(error) => return from_api(error),
    };
    let stream = futures::stream::unfold(chunks, |mut chunks| async move {
        let item = chunks.recv().await?;
        Some((item.map(Bytes::from).map_err(std::io::Error::other), chunks))
    });
    let name = path.rsplit('/').next().unwrap_or_default().replace('"', "");
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\""))
        .header(header::VARY, "accept-encoding");
    if gzip {
        response
            .header(header::CONTENT_ENCODING, "gzip")
            .body(Body::from_stream(deflate(stream)))
    } else {
        response
            .header(header::CONTENT_LENGTH, info.size)
            .body(Body::from_stream(stream))
    }
    .expect("valid response")
}

/// Whether to send gzip, from `Accept-Encoding`: when the client names gzip as the one compression it takes (the
/// SDKs' `gzip=True` sends exactly `gzip`), or when it refuses the bytes as they are (`identity;q=0`) and takes
/// gzip. A generic list of every coding a client library decodes (httpx and fetch send `gzip, deflate` on every
/// request) gets the bytes as they are, which RFC 9110 always allows: compressing costs nook more time than it saves
/// on the short links sandboxes are usually reached over (on loopback, 100 MB of random bytes take twice as long
/// gzipped). Nothing acceptable is an error (406).
fn accepts_gzip(headers: &HeaderMap) -> Result<bool, String> {
    let Some(header) = headers.get(header::ACCEPT_ENCODING) else {
        return Ok(false);
    };
    let header = header.to_str().unwrap_or_default();
    let codings: Vec<(String, f32)> = header
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let quality = parts
                .filter_map(|parameter| {
                    let (key, value) = parameter.split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| value.trim().parse().ok())?
                })
                .next()
                .unwrap_or(1.0);
            (name, quality)
        })
        .collect();
    let listed = |names: &[&str]| {
        codings
            .iter()
            .find(|(name, _)| names.contains(&name.as_str()))
            .map(|(_, quality)| *quality)
    };
    let any = listed(&["*"]);
    let identity = listed(&["identity"]);
    let gzip = listed(&["gzip", "x-gzip"]);
    let others = codings
        .iter()
        .any(|(name, quality)| !["identity", "gzip", "x-gzip", "*"].contains(&name.as_str()) && *quality > 0.0);
    if identity.or(any).unwrap_or(1.0) <= 0.0 {
        return match gzip.or(any).unwrap_or(0.0) > 0.0 {
            true => Ok(true),
            false => Err(format!(
                "no acceptable encoding in {header:?}: nook sends gzip or the bytes as they are"
            )),
        };
    }
    Ok(gzip.is_some_and(|gzip| gzip > 0.0 && !others && identity.is_none_or(|identity| gzip >= identity)))
}

/// A byte stream gzip-compressed as it goes: each chunk is compressed when it arrives and what the encoder has
/// produced is passed on, so memory stays bounded by the chunk size.
fn deflate(
    stream: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    futures::stream::unfold(
        (Box::pin(stream), Some(encoder)),
        |(mut stream, mut encoder)| async move {
            loop {
                let active = encoder.as_mut()?;
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        if let Err(error) = active.write_all(&chunk) {
                            return Some((Err(error), (stream, None)));
                        }
                        let compressed = std::mem::take(active.get_mut());
                        if !compressed.is_empty() {
                            return Some((Ok(Bytes::from(compressed)), (stream, encoder)));
                        }
                    }
                    Some(Err(error)) => return Some((Err(error), (stream, None))),
                    None => {
                        let rest = encoder.take()?.finish().map(Bytes::from);
                        return Some((rest, (stream, None)));
                    }
                }
            }
        },
    )
}

/// Where an inflating upload notes why its body did not inflate.
#[derive(Debug, Clone, Default)]
struct InflateFailure(Arc<Mutex<Option<String>>>);

impl InflateFailure {
    fn note(&self, message: String) {
        self.0.lock().expect("inflate failure lock").get_or_insert(message);
    }

    fn get(&self) -> Option<String> {
        self.0.lock().expect("inflate failure lock").clone()
    }
}

/// The request body inflated from gzip (one member or several), read by a blocking task [`INFLATE_CHUNK`] bytes at
/// a time into a small channel: at most a few chunks are held however far the data inflates.
fn inflate(body: Body) -> (Body, InflateFailure) {
    let failure = InflateFailure::default();
    let compressed = SyncIoBridge::new(StreamReader::new(
        body.into_data_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other)),
    ));
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let noted = failure.clone();
    tokio::task::spawn_blocking(move || {
        let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(compressed));
        let mut buffer = vec![0u8; INFLATE_CHUNK];
        loop {
            match decoder.read(&mut buffer) {
                Ok(0) => return,
                Ok(n) => {
                    // A failed send means the write ended (refused): its answer says why.
                    if sender.blocking_send(Ok(Bytes::copy_from_slice(&buffer[..n]))).is_err() {
                        return;
                    }
                }
                Err(error) => {
                    noted.note(format!("the gzip body does not inflate: {error}"));
                    let _ = sender.blocking_send(Err(error));
                    return;
                }
            }
        }
    });
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    (Body::from_stream(chunks), failure)
}

/// The upload's metadata from its `X-Metadata-<key>` headers (key lowercased, the first value of a repeated header),
/// `None` when there are none; an invalid key or value is refused with the reason.
fn metadata_headers(headers: &HeaderMap) -> Result<Option<BTreeMap<String, String>>, String> {
    let mut metadata = BTreeMap::new();
    for name in headers.keys() {
        let Some(key) = name.as_str().strip_prefix(METADATA_HEADER) else {
            continue;
        };
        if key.is_empty() {
            continue;
        }
        let value = headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| format!("the value of metadata key {key:?} must be printable ASCII"))?;
        metadata.insert(key.to_ascii_lowercase(), value.to_string());
    }
    if metadata.is_empty() {
        return Ok(None);
    }
    nook_agent_proto::check_metadata(&metadata).map(|()| Some(metadata))
}

/// Whether the body is gzip (`Content-Encoding: gzip`); other codings are refused.
fn gzip_body(headers: &HeaderMap) -> Result<bool, String> {
    let Some(value) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(false);
    };
    let coding = value.to_str().unwrap_or_default().trim().to_ascii_lowercase();
    match coding.as_str() {
        "" | "identity" => Ok(false),
        "gzip" | "x-gzip" => Ok(true),
        _ => Err(format!(
            "unsupported Content-Encoding {coding:?}: send gzip or the bytes as they are"
        )),
    }
}

/// `POST /files`: multipart (field `file`, the file name being the path) or a raw body to `path`, either possibly
/// gzip-compressed as a whole.
pub async fn upload(
    State(e2b): State<E2b>,
    Query(query): Query<FilesQuery>,
    request: axum::extract::Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let checked = async {
        let gzip = gzip_body(&parts.headers).map_err(|message| failure(StatusCode::BAD_REQUEST, message))?;
        let metadata = metadata_headers(&parts.headers)
            .map_err(|message| failure(StatusCode::BAD_REQUEST, format!("invalid metadata: {message}")))?;
        let prepared = prepare(&e2b, &parts.extensions, &query, query.path.as_deref()).await?;
        Ok((gzip, metadata, prepared))
    }
    .await;
    let (gzip, metadata, (sandbox, account, fixed_path)) = match checked {
        Ok(checked) => checked,
        Err(response) => return super::refuse_unread(axum::extract::Request::from_parts(parts, body), response).await,
    };
    let (body, inflate_failure) = if gzip {
        let (body, failure) = inflate(body);
        (body, Some(failure))
    } else {
        (body, None)
    };
    // A write that failed because the body did not inflate is the client's fault, whatever the agent saw.
    let refused = |error: nook_control::error::ApiFailure| match inflate_failure.as_ref().and_then(InflateFailure::get)
    {
        Some(message) => failure(StatusCode::BAD_REQUEST, message),
        None => from_api(error),
    };
    let request = axum::extract::Request::from_parts(parts, body);
    let write = |path: String| FileWrite {
        path,
        mode: None,
        parents: true,
        owner: Some((account.uid, account.gid)),
        metadata: metadata.clone(),
    };
    let mut written = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let mut form = match Multipart::from_request(request, &()).await {
            Ok(form) => form,
            Err(rejection) => return failure(StatusCode::BAD_REQUEST, rejection.body_text()),
        };
        let mut seen = std::collections::BTreeSet::new();
        loop {
            let field = match form.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(error) => {
                    if let Some(message) = inflate_failure.as_ref().and_then(InflateFailure::get) {
                        return failure(StatusCode::BAD_REQUEST, message);
                    }
                    return failure(
                        StatusCode::BAD_REQUEST,
                        format!("the form is malformed: {}", error.body_text()),
                    );
                }
            };
            if field.name() != Some("file") {
                continue;
            }
            let path = match (&fixed_path, field.file_name()) {
                (Some(path), _) => path.clone(),
                (None, Some(name)) => match resolve_path(name, &account.home) {
                    Ok(path) => path,
                    Err(error) => return failure(StatusCode::BAD_REQUEST, error.message),
                },
                (None, None) => {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "a file part has no file name and no path was given",
                    )
                }
            };
            if !seen.insert(path.clone()) {
                return failure(StatusCode::BAD_REQUEST, format!("{path} is named twice in one upload"));
            }
            match nook_control::api::write_form_part(&e2b.control, &sandbox.id, write(path), field).await {
                Ok(stat) => written.push(WrittenFile::from(stat)),
                Err(error) => return refused(error),
            }
        }
    } else if content_type.is_empty() || content_type.starts_with("application/octet-stream") {
        let Some(path) = fixed_path else {
            return failure(
                StatusCode::BAD_REQUEST,
                "a raw (application/octet-stream) upload needs the path parameter",
            );
        };
        let stream = request
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other));
        match e2b
            .control
            .write_file_with(&sandbox.id, write(path), Box::pin(StreamReader::new(stream)))
            .await
        {
            Ok(stat) => written.push(WrittenFile::from(stat)),
            Err(error) => return refused(error),
        }
    } else {
        return failure(
            StatusCode::BAD_REQUEST,
            format!("unsupported content type {content_type:?}: send multipart/form-data or application/octet-stream"),
        );
    }
    if written.is_empty() {
        return failure(
            StatusCode::BAD_REQUEST,
            "the upload carries no file (a form part named `file`)",
        );
    }
    Json(written).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        headers
    }

    #[test]
    fn gzip_is_sent_when_the_client_asks_for_it_by_name() {
        let accepts = |value: &str| accepts_gzip(&headers(&[("accept-encoding", value)]));
        assert_eq!(accepts_gzip(&HeaderMap::new()), Ok(false));
        // What the SDKs send for gzip=True, and what their HTTP clients send on every request.
        assert_eq!(accepts("gzip"), Ok(true));
        assert_eq!(accepts("gzip, deflate"), Ok(false));
        assert_eq!(accepts("gzip, deflate, br, zstd"), Ok(false));
        assert_eq!(accepts("x-gzip;q=0.8"), Ok(true));
        assert_eq!(accepts("GZIP;q=0.5, identity"), Ok(false));
        assert_eq!(accepts("identity;q=0.1, gzip"), Ok(true));
        assert_eq!(accepts("br, deflate"), Ok(false));
        assert_eq!(accepts("gzip;q=0"), Ok(false));
        assert_eq!(accepts("*"), Ok(false));
        // Refusing identity leaves gzip, if it is acceptable at all.
        assert_eq!(accepts("identity;q=0, gzip;q=0.1"), Ok(true));
        assert_eq!(accepts("identity;q=0, br, gzip"), Ok(true));
        assert_eq!(accepts("*;q=0, gzip, br"), Ok(true));
        assert_eq!(accepts("identity;q=0, *"), Ok(true));
        assert!(accepts("br, identity;q=0").is_err());
        assert!(accepts("*;q=0").is_err());
    }

    #[test]
    fn metadata_comes_from_its_headers_lowercased_and_checked() {
        let metadata = metadata_headers(&headers(&[
            ("X-Metadata-Author", "ada"),
            ("x-metadata-author", "second value is ignored"),
            ("X-Metadata-Purpose", "a test ~"),
            ("X-Metadata-", "no key"),
            ("X-Access-Token", "not metadata"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            metadata,
            BTreeMap::from([
                ("author".to_string(), "ada".to_string()),
                ("purpose".to_string(), "a test ~".to_string())
            ])
        );
        assert_eq!(metadata_headers(&headers(&[("content-type", "x")])), Ok(None));
        assert!(metadata_headers(&headers(&[("x-metadata-k", "tab\there")])).is_err());
        let long = format!("x-metadata-{}", "k".repeat(247));
        assert!(metadata_headers(&headers(&[(long.as_str(), "v")]))
            .unwrap_err()
            .contains("246"));
        let big = "v".repeat(3000);
        assert!(metadata_headers(&headers(&[("x-metadata-a", &big), ("x-metadata-b", &big)])).is_err());
    }

    #[test]
    fn content_encodings_are_gzip_or_none() {
        assert_eq!(gzip_body(&HeaderMap::new()), Ok(false));
        assert_eq!(gzip_body(&headers(&[("content-encoding", "identity")])), Ok(false));
        assert_eq!(gzip_body(&headers(&[("content-encoding", "GZIP")])), Ok(true));
        assert!(gzip_body(&headers(&[("content-encoding", "br")])).is_err());
    }

    fn gzipped(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn gzip_bodies_inflate_in_bounded_chunks() {
        // 64 MiB of zeros are 64 KiB of gzip: each chunk handed on is at most INFLATE_CHUNK bytes.
        let plain = vec![0u8; 64 << 20];
        let mut compressed = gzipped(&plain);
        compressed.extend(gzipped(b"and a second member"));
        let pieces: Vec<Result<Bytes, std::io::Error>> = compressed
            .chunks(1000)
            .map(|piece| Ok(Bytes::copy_from_slice(piece)))
            .collect();
        let (body, failure) = inflate(Body::from_stream(futures::stream::iter(pieces)));
        let mut stream = body.into_data_stream();
        let (mut total, mut largest, mut tail) = (0usize, 0usize, Vec::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            total += chunk.len();
            largest = largest.max(chunk.len());
            tail.extend_from_slice(&chunk);
            tail.drain(..tail.len().saturating_sub(19));
        }
        assert_eq!(total, plain.len() + 19);
        assert_eq!(tail, b"and a second member");
        assert!(largest <= INFLATE_CHUNK, "{largest}");
        assert_eq!(failure.get(), None);

        let (body, failure) = inflate(Body::from("not gzip at all"));
        let mut stream = body.into_data_stream();
        assert!(stream.next().await.unwrap().is_err());
        assert!(failure.get().unwrap().contains("does not inflate"));
    }

    #[tokio::test]
    async fn downloads_compress_as_they_stream() {
        let chunks: Vec<std::io::Result<Bytes>> = (0..50u8).map(|n| Ok(Bytes::from(vec![n; 100_000]))).collect();
        let compressed: Vec<u8> = deflate(futures::stream::iter(chunks))
            .map(|chunk| chunk.unwrap().to_vec())
            .concat()
            .await;
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated.len(), 5_000_000);
        assert!(inflated[..100_000].iter().all(|byte| *byte == 0) && inflated[4_900_000..].iter().all(|b| *b == 49));
    }
}
