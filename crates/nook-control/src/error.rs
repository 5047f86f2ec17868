//! The control plane's error type and its HTTP form.
//!
//! Every failure a client can see is an [`ApiFailure`]: an HTTP status, a stable `code`, a sentence, and the cause
//! chain flattened into `reason`. Internal errors are logged with their full chain once, here, at the edge.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nook_api::ApiError;
use nook_runner::build::BuildError;
use nook_runner::images::registry::RegistryError;
use nook_runner::images::unpack::UnpackError;
use nook_runner::images::ImageError;
use nook_runner::RunnerError;

use crate::store::StoreError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// A sentence.
    pub message: String,
    /// Cause chain, if any.
    pub reason: Option<String>,
}

impl ApiFailure {
    /// A failure without a cause.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            reason: None,
        }
    }

    /// 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 500 `internal`, with the cause chain.
    pub fn internal(message: impl Into<String>, error: &(dyn std::error::Error + 'static)) -> Self {
        let message = message.into();
        let reason = chain(error);
        tracing::error!(%message, %reason, "request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message,
            reason: Some(reason),
        }
    }

    /// Attaches a cause.
    pub fn with_reason(mut self, error: &(dyn std::error::Error + 'static)) -> Self {
        self.reason = Some(chain(error));
        self
    }
}

pub use nook_runner::error_chain as chain;

impl ApiFailure {
    /// The JSON body this failure answers with.
    pub fn body(&self) -> ApiError {
        ApiError {
            code: self.code.to_string(),
            message: self.message.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiFailure {
    fn from(error: StoreError) -> Self {
        match &error {
            StoreError::NameTaken(name) => {
                Self::conflict(format!("a sandbox named {name:?} already exists; choose another name"))
            }
            StoreError::NotFound => Self::not_found("the sandbox no longer exists"),
            StoreError::WrongState(state) => {
                Self::conflict(format!("another request changed the sandbox first; it is now {state}"))
            }
            _ => Self::internal("the control plane's database failed", &error),
        }
    }
}

impl From<RunnerError> for ApiFailure {
    fn from(error: RunnerError) -> Self {
        match &error {
            RunnerError::NoSuchSandbox(_) => Self::not_found(error.to_string()),
            RunnerError::NotRunning(_) => Self::new(StatusCode::CONFLICT, "not_running", error.to_string()),
            RunnerError::AlreadyRunning(_) => Self::new(StatusCode::CONFLICT, "already_running", error.to_string()),
            RunnerError::Paused(_) => Self::new(StatusCode::CONFLICT, "paused", error.to_string()),
            RunnerError::Archive(nook_runner::archive::ArchiveError::Corrupt { .. }) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "archive_corrupt", error.to_string())
            }
            RunnerError::Archive(nook_runner::archive::ArchiveError::Io { .. }) => {
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "archive_failed", chain(&error))
            }
            RunnerError::Archive(nook_runner::archive::ArchiveError::Store { .. }) => {
                Self::new(StatusCode::BAD_GATEWAY, "archive_store_failed", chain(&error))
            }
            RunnerError::PortClosed { .. } => Self::new(StatusCode::BAD_GATEWAY, "port_closed", error.to_string()),
            RunnerError::BelowUsage(message) => Self::new(StatusCode::CONFLICT, "below_usage", message.clone()),
            RunnerError::Network(nook_runner::network::NetworkError::Disabled) => {
                Self::new(StatusCode::BAD_REQUEST, "unsupported", error.to_string())
            }
            RunnerError::Network(nook_runner::network::NetworkError::Exhausted(_)) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "network_exhausted", error.to_string())
            }
            RunnerError::Network(_) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, "network_failed", chain(&error)),
            RunnerError::Storage(nook_runner::storage::StorageError::NoQuotas { .. }) => {
                Self::new(StatusCode::BAD_REQUEST, "unsupported", error.to_string())
            }
            RunnerError::Image(ImageError::NotFound(name)) => Self::not_found(format!(
                "image {name:?} does not exist; `nook image ls` lists the images"
            )),
            RunnerError::Image(ImageError::InvalidName(message)) => Self::invalid(message.clone()),
            RunnerError::Process { code, message } => crate::control::process_failure(code.clone(), message.clone()),
            RunnerError::Build(build) => match build {
                BuildError::Context(_) => Self::invalid("the build context cannot be unpacked").with_reason(&error),
                BuildError::BadContext(message) => Self::invalid(message.clone()),
                BuildError::Dockerfile(_) => {
                    Self::new(StatusCode::BAD_REQUEST, "invalid_dockerfile", build.to_string())
                }
                BuildError::Step { .. } => Self::new(StatusCode::BAD_REQUEST, "build_step_invalid", build.to_string()),
                BuildError::RunFailed { .. } => {
                    Self::new(StatusCode::UNPROCESSABLE_ENTITY, "build_step_failed", build.to_string())
                }
                BuildError::Cancelled => Self::new(StatusCode::CONFLICT, "build_cancelled", build.to_string()),
            },
            RunnerError::NotReady { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "template_not_ready",
                error.to_string(),
            ),
            RunnerError::Boot { .. } | RunnerError::Agent { .. } => {
                let failure = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "boot_failed", chain(&error));
                tracing::error!(message = %failure.message, "a sandbox failed to boot");
                failure
            }
            RunnerError::Image(ImageError::Unpack(UnpackError::Write { .. })) => {
                Self::internal("the runner could not write the image's layers", &error)
            }
            RunnerError::Image(ImageError::Unpack(_)) => {
                Self::invalid("the image's layers could not be unpacked").with_reason(&error)
            }
            RunnerError::Image(ImageError::Format(_) | ImageError::UnusableLayer { .. }) => {
                Self::invalid("the image archive is not a valid image").with_reason(&error)
            }
            RunnerError::Image(ImageError::Registry(registry)) => match registry {
                RegistryError::InvalidReference(message) => Self::invalid(message.clone()),
                RegistryError::NotFound { .. } => Self::not_found(registry.to_string()),
                RegistryError::Unauthorized { .. } => {
                    Self::new(StatusCode::FORBIDDEN, "registry_denied", registry.to_string())
                }
                RegistryError::BadImage { .. } => {
                    Self::new(StatusCode::BAD_GATEWAY, "bad_image", registry.to_string()).with_reason(&error)
                }
                _ => Self::new(StatusCode::BAD_GATEWAY, "registry_failed", "the image registry failed")
                    .with_reason(&error),
            },
            _ => Self::internal("the runner failed", &error),
        }
    }
}
