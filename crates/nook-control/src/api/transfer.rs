//! Streamed file transfers: download and upload of single files (raw body or multipart form), and tar archives of
//! whole trees (what `nook cp` of a directory uses).
//!
//! Nothing here holds a whole file: request bodies are read chunk by chunk into the runner's byte stream, and
//! downloads are the runner's chunk channel turned into the response body. A multipart part is moved the same way,
//! through a small bounded channel, while the next part waits. An upload that breaks part-way leaves no file behind
//! (the agent renames a file into place only once it is complete); an archive unpacks entry by entry, so a broken
//! one leaves the entries before the break.

use axum::body::{Body, Bytes};
use axum::extract::multipart::Field;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::StreamExt;
use nook_api::{ApiError, ArchiveResult, FileInfo, FileKind, FileList};
use tokio::sync::mpsc;
use tokio_util::io::StreamReader;

use super::{AppState, PathQuery};
use crate::control::Control;
use crate::error::ApiFailure;

/// Most files one multipart upload may carry.
const MAX_MULTIPART_FILES: usize = 1000;

/// The request body as the runner's byte stream.
pub(super) fn body_stream(body: Body) -> nook_runner::ByteStream {
    let stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    Box::pin(StreamReader::new(stream))
}

/// The runner's chunk channel as a response body. A failure part-way aborts the response, so the client sees a
/// broken transfer, never a short file that looks whole.
fn chunk_body(chunks: nook_runner::agent_client::FileChunks) -> Body {
    let stream = futures::stream::unfold(chunks, |mut chunks| async move {
        let item = chunks.recv().await?;
        if let Err(message) = &item {
            tracing::warn!(%message, "a download failed part-way");
        }
        Some((item.map(Bytes::from).map_err(std::io::Error::other), chunks))
    });
    Body::from_stream(stream)
}

/// Parses an octal mode like `644`.
fn parse_mode(text: Option<&str>) -> Result<Option<u32>, ApiFailure> {
    text.map(|text| {
        u32::from_str_radix(text, 8)
            .map_err(|_| ApiFailure::invalid(format!("mode {text:?} is not an octal number like 644")))
    })
    .transpose()
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), PathQuery),
    responses((status = 200, description = "The file's bytes, streamed; `X-Nook-File-Size` and `X-Nook-File-Mode` \
               give its size and mode when reading started", content_type = "application/octet-stream"),
              (status = 400, description = "Invalid path, or a directory", body = ApiError),
              (status = 404, description = "No such sandbox or file", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn download_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiFailure> {
    let (info, chunks) = state.control.read_file(&key, &query.path).await?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("x-nook-file-size", info.size)
        .header("x-nook-file-mode", format!("{:o}", info.mode))
        .body(chunk_body(chunks))
        .expect("valid response"))
}

/// Query of an upload.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct UploadQuery {
    /// Absolute path inside the sandbox. For a multipart upload: a directory to put the files in (by their file
    /// names), or, for a single file, its path.
    path: String,
    /// Permission bits for the file, in octal (e.g. `755`); 644 by default.
    mode: Option<String>,
    /// Create missing parent directories.
    #[serde(default)]
    parents: bool,
}

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/files", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), UploadQuery),
    request_body(content = Vec<u8>, description = "The file's bytes, streamed", content_type = "application/octet-stream"),
    responses((status = 201, description = "Written whole (it appears only once complete)", body = FileInfo),
              (status = 400, description = "Invalid path or mode, or an incomplete upload", body = ApiError),
              (status = 404, description = "No such sandbox, or a missing parent directory", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn upload_file(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<FileInfo>), ApiFailure> {
    let mode = parse_mode(query.mode.as_deref())?;
    let info = state
        .control
        .write_file(&key, &query.path, mode, query.parents, None, body_stream(body))
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/files", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), UploadQuery),
    request_body(content = Vec<u8>, description = "A `multipart/form-data` body whose file parts are streamed into \
                 the sandbox: into the directory `path` under their file names, or, when `path` is not a directory \
                 and the form has one file, to `path` itself", content_type = "multipart/form-data"),
    responses((status = 201, description = "Every file written whole, in form order", body = FileList),
              (status = 400, description = "Invalid path, mode, file name or form", body = ApiError),
              (status = 404, description = "No such sandbox, or a missing directory", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn upload_multipart(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<UploadQuery>,
    mut form: Multipart,
) -> Result<(StatusCode, Json<FileList>), ApiFailure> {
    let mode = parse_mode(query.mode.as_deref())?;
    let into_directory = query.path.ends_with('/') || is_directory(&state.control, &key, &query.path).await?;
    let mut written = Vec::new();
    while let Some(field) = form.next_field().await.map_err(bad_form)? {
        let Some(file_name) = field.file_name().map(str::to_string) else {
            // Plain form fields carry no file.
            continue;
        };
        let target = if into_directory {
            let name = safe_file_name(&file_name)?;
            format!("{}/{name}", query.path.trim_end_matches('/'))
        } else if written.is_empty() {
            query.path.clone()
        } else {
            return Err(ApiFailure::invalid(format!(
                "{} is not a directory, so the form may carry only one file",
                query.path
            )));
        };
        if written.len() == MAX_MULTIPART_FILES {
            return Err(ApiFailure::invalid(format!(
                "send at most {MAX_MULTIPART_FILES} files per upload"
            )));
        }
        let write = nook_agent_proto::FileWrite {
            path: target,
            mode,
            parents: query.parents,
            owner: None,
            metadata: None,
        };
        let stat = write_form_part(&state.control, &key, write, field).await?;
        written.push(crate::control::file_info(stat));
    }
    if written.is_empty() {
        return Err(ApiFailure::invalid(
            "the form carries no file (a part with a file name)",
        ));
    }
    Ok((StatusCode::CREATED, Json(FileList { entries: written })))
}

/// Whether `path` is an existing directory in the sandbox.
async fn is_directory(control: &Control, key: &str, path: &str) -> Result<bool, ApiFailure> {
    let request = nook_agent_proto::Request::Stat { path: path.to_string() };
    match control.file_call::<nook_agent_proto::FileStat>(key, request).await {
        Ok(stat) => Ok(crate::control::file_info(stat).kind == FileKind::Dir),
        Err(failure) if failure.status == StatusCode::NOT_FOUND && failure.code == "not_found" => Ok(false),
        Err(failure) => Err(failure),
    }
}

/// A form's file name as one path component: its last component, never `.`, `..` or empty.
fn safe_file_name(name: &str) -> Result<&str, ApiFailure> {
    let last = name.rsplit(['/', '\\']).next().unwrap_or_default();
    if last.is_empty() || last == "." || last == ".." || last.contains('\0') || last.len() > 255 {
        return Err(ApiFailure::invalid(format!("{name:?} is not a usable file name")));
    }
    Ok(last)
}

fn bad_form(error: axum::extract::multipart::MultipartError) -> ApiFailure {
    ApiFailure::new(
        error.status(),
        "invalid_request",
        format!("the multipart form is malformed: {}", error.body_text()),
    )
}

/// Streams one form part into a file as `write` says, through a bounded channel (the part borrows the form, the
/// runner wants an owned stream); answers with the agent's stat of the written file.
pub async fn write_form_part(
    control: &Control,
    key: &str,
    write: nook_agent_proto::FileWrite,
    mut field: Field<'_>,
) -> Result<nook_agent_proto::FileStat, ApiFailure> {
    let (sender, receiver) = mpsc::channel::<std::io::Result<Bytes>>(4);
    let chunks = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    let pump = async move {
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            let broken = chunk.is_err();
            // A failed send means the write already ended (refused): its result says why.
            if sender.send(chunk).await.is_err() || broken {
                return;
            }
        }
    };
    let write = control.write_file_with(key, write, Box::pin(StreamReader::new(chunks)));
    let ((), result) = tokio::join!(pump, write);
    result
}

/// Query of an archive upload.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ArchiveUploadQuery {
    /// Absolute path of the directory to unpack into.
    path: String,
    /// Create the directory (and its parents) when missing.
    #[serde(default)]
    parents: bool,
    /// Owner uid for everything unpacked (with `gid`); root by default. Owners recorded in the archive are ignored.
    uid: Option<u32>,
    /// Owner gid for everything unpacked (with `uid`).
    gid: Option<u32>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/files/archive", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), PathQuery),
    responses((status = 200, description = "A tar stream of the file or directory tree, named from the path's last \
               component (symlinks archived as links); `X-Nook-File-Kind` says what the path is",
               content_type = "application/x-tar"),
              (status = 400, description = "Invalid path", body = ApiError),
              (status = 404, description = "No such sandbox or path", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn download_archive(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<PathQuery>,
) -> Result<Response, ApiFailure> {
    let (info, chunks) = state.control.read_archive(&key, &query.path).await?;
    let kind = serde_json::to_value(info.kind).expect("kinds serialize");
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header("x-nook-file-kind", kind.as_str().unwrap_or_default())
        .body(chunk_body(chunks))
        .expect("valid response"))
}

#[utoipa::path(put, path = "/v1/sandboxes/{sandbox}/files/archive", tag = "files",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), ArchiveUploadQuery),
    request_body(content = Vec<u8>, description = "A tar stream, unpacked as it arrives", content_type = "application/x-tar"),
    responses((status = 200, description = "Unpacked", body = ArchiveResult),
              (status = 400, description = "Invalid path or archive (an entry that would land outside the \
               directory is refused, and nothing after it is unpacked)", body = ApiError),
              (status = 404, description = "No such sandbox or directory", body = ApiError)),
    security(("bearer" = [])))]
pub(super) async fn upload_archive(
    State(state): State<AppState>,
    Path(key): Path<String>,
    Query(query): Query<ArchiveUploadQuery>,
    body: Body,
) -> Result<Json<ArchiveResult>, ApiFailure> {
    let owner = match (query.uid, query.gid) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        (None, None) => None,
        _ => return Err(ApiFailure::invalid("give both uid and gid, or neither")),
    };
    let result = state
        .control
        .write_archive(&key, &query.path, query.parents, owner, body_stream(body))
        .await?;
    Ok(Json(result))
}
