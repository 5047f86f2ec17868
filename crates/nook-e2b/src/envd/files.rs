//! envd's `/files`: download (`GET`) and upload (`POST`, multipart or raw body) of whole files, streamed through
//! nook's agent without holding them in memory.
//!
//! The user is the `username` parameter (else `user`); relative paths are under their home, and uploads (with any
//! directories created for them) belong to them. A multipart part's file name is the destination path, unless the
//! `path` parameter names it. Errors are `{"code": <status>, "message"}`, as envd sends them.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::io::StreamReader;

use super::{account, resolve_path, target};
use crate::{E2b, DEFAULT_USER};

/// Query of `/files`.
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
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, info.size)
        .header(header::CONTENT_DISPOSITION, format!("inline; filename=\"{name}\""))
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// `POST /files`: multipart (field `file`, the file name being the path) or a raw body to `path`.
pub async fn upload(
    State(e2b): State<E2b>,
    Query(query): Query<FilesQuery>,
    request: axum::extract::Request,
) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if request
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|value| value != "identity")
    {
        return failure(
            StatusCode::BAD_REQUEST,
            "compressed uploads are not supported: send the bytes as they are",
        );
    }
    let (sandbox, account, fixed_path) = match prepare(&e2b, request.extensions(), &query, query.path.as_deref()).await
    {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let owner = Some((account.uid, account.gid));
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
                    return failure(
                        StatusCode::BAD_REQUEST,
                        format!("the form is malformed: {}", error.body_text()),
                    )
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
            let result =
                nook_control::api::write_form_part(&e2b.control, &sandbox.id, &path, None, true, owner, field).await;
            match result {
                Ok(info) => written.push(WrittenFile {
                    name: info.name,
                    path: info.path,
                    kind: "file",
                }),
                Err(error) => return from_api(error),
            }
        }
    } else if content_type.is_empty() || content_type.starts_with("application/octet-stream") {
        let Some(path) = fixed_path else {
            return failure(StatusCode::BAD_REQUEST, "a raw upload needs the path parameter");
        };
        let stream = request
            .into_body()
            .into_data_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other));
        match e2b
            .control
            .write_file(
                &sandbox.id,
                &path,
                None,
                true,
                owner,
                Box::pin(StreamReader::new(stream)),
            )
            .await
        {
            Ok(info) => written.push(WrittenFile {
                name: info.name,
                path: info.path,
                kind: "file",
            }),
            Err(error) => return from_api(error),
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
