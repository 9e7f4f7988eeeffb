//! The two error shapes the E2B SDKs read: the control plane and envd's
//! `/files` answer `{"code": <HTTP status>, "message": "…"}`; envd's
//! Connect RPC services answer `{"code": "not_found", "message": "…"}`
//! with the status the Connect protocol assigns to that code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ApiError;

/// A control-plane or `/files` error.
#[derive(Debug)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> E2bError {
        E2bError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> E2bError {
        E2bError::new(StatusCode::NOT_FOUND, message)
    }
    pub fn unauthorized() -> E2bError {
        E2bError::new(
            StatusCode::UNAUTHORIZED,
            "missing or invalid API key (send X-API-KEY: <a bhatti key>)",
        )
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> E2bError {
        let status = e.status();
        // Logged (and scrubbed) the way the native API does it.
        log(&e);
        E2bError::new(status, e.public_message())
    }
}

impl From<crate::store::StoreError> for E2bError {
    fn from(e: crate::store::StoreError) -> E2bError {
        ApiError::from(e).into()
    }
}

impl From<ConnectError> for E2bError {
    fn from(e: ConnectError) -> E2bError {
        E2bError::new(e.code.status(), e.message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({
                "code": self.status.as_u16(),
                "message": self.message,
            })),
        )
            .into_response()
    }
}

fn log(e: &ApiError) {
    let status = e.status().as_u16();
    match e {
        ApiError::Internal(_) => tracing::error!(status, "{e}"),
        ApiError::BadGateway(_) | ApiError::Timeout(_) | ApiError::InsufficientStorage(_) => {
            tracing::warn!(status, "{e}")
        }
        _ => tracing::debug!(status, "{e}"),
    }
}

/// Connect's error codes (https://connectrpc.com/docs/protocol#error-codes),
/// all of them: the protocol's vocabulary, though bhatti answers with some.
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                StatusCode::BAD_REQUEST
            }
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }

    fn from_status(s: StatusCode) -> Code {
        match s.as_u16() {
            400 | 413 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::FailedPrecondition,
            429 => Code::ResourceExhausted,
            501 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            507 => Code::ResourceExhausted,
            _ => Code::Internal,
        }
    }
}

/// An envd RPC error.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub code: Code,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: Code, message: impl Into<String>) -> ConnectError {
        ConnectError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> ConnectError {
        ConnectError::new(Code::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> ConnectError {
        ConnectError::new(Code::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> ConnectError {
        ConnectError::new(Code::Internal, message)
    }

    /// The JSON of the error: a unary body, or the `error` of a stream's
    /// end message.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl From<ApiError> for ConnectError {
    fn from(e: ApiError) -> ConnectError {
        log(&e);
        ConnectError::new(Code::from_status(e.status()), e.public_message())
    }
}

impl From<crate::store::StoreError> for ConnectError {
    fn from(e: crate::store::StoreError) -> ConnectError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for ConnectError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self.json())).into_response()
    }
}
