//! The one error type of the HTTP API: every failure, from a malformed body
//! to a dead VMM, becomes an [`ApiError`] with a status, a stable `code`
//! and a sentence, sent as `{"error":{"code","message"}}` and logged at the
//! level its status calls for (client errors at `debug`, server errors at
//! `error`).

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use host::runtime::RuntimeError;
use serde::Serialize;
use utoipa::ToSchema;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`not_found`, `quota_exceeded`, ...).
    pub code: &'static str,
    /// What went wrong, for a human.
    pub message: String,
    /// Seconds to wait before retrying (429).
    pub retry_after_s: Option<u64>,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// The body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(
                status = self.status.as_u16(),
                code = self.code,
                "{}",
                self.message
            );
        } else {
            tracing::debug!(
                status = self.status.as_u16(),
                code = self.code,
                "{}",
                self.message
            );
        }
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

/// Chain of sources once each: "a: b: c".
pub use host::error_chain as chain;

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        use host::agent::AgentError;
        use host::clone::CloneError;
        use host::master::MasterError;
        use host::store::StoreError;
        let msg = chain(&e);
        let (status, code) = match &e {
            RuntimeError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            RuntimeError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            RuntimeError::Quota(_) => (StatusCode::FORBIDDEN, "quota_exceeded"),
            RuntimeError::Busy { retry_after_s, .. } => {
                let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "start_slots_full", msg);
                err.retry_after_s = Some(*retry_after_s);
                return err;
            }
            RuntimeError::Memory(_) => (StatusCode::CONFLICT, "insufficient_memory"),
            RuntimeError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            RuntimeError::Store(StoreError::BadName(_))
            | RuntimeError::Master(MasterError::Store(StoreError::BadName(_))) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            RuntimeError::Store(StoreError::NoMaster(_))
            | RuntimeError::Master(MasterError::Store(StoreError::NoMaster(_)))
            | RuntimeError::Clone(CloneError::Store(StoreError::NoMaster(_))) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            RuntimeError::Master(MasterError::Store(StoreError::MasterExists(_))) => {
                (StatusCode::CONFLICT, "conflict")
            }
            RuntimeError::Master(MasterError::Snapshot(_) | MasterError::BadState { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "bad_snapshot")
            }
            RuntimeError::Agent(AgentError::Remote { .. }) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "exec_refused")
            }
            RuntimeError::Agent(_) | RuntimeError::Clone(_) => {
                (StatusCode::BAD_GATEWAY, "guest_unreachable")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, msg)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_request",
        };
        let status = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::bad_request(r.body_text())
    }
}

/// The error answers every route may give, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
pub enum CommonErrors {
    /// The request is malformed or a field is invalid.
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
    /// No token, or an unknown one.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// A tenant quota would be exceeded.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such object (for this tenant).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The object's state does not allow it (or the host's memory is full).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// The body is over the size limit.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Wrong content type.
    #[response(status = 415)]
    UnsupportedMediaType(ErrorBody),
    /// Well-formed but unusable (a JSON type error, a bad snapshot, a refused command).
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// Every start slot is in use; see Retry-After.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// The guest did not answer.
    #[response(status = 502)]
    BadGateway(ErrorBody),
}
