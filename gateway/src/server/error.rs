//! The one place where errors become HTTP responses. Every layer returns its
//! own typed error; the `From` impls and [`plugin_error`] below decide the
//! status code, and [`ApiError::into_response`] writes `{"error": "..."}`.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::protocol::{DecodeError, ErrorBody};
use crate::router::{AdmissionError, RouteError, Version};
use crate::runtime::PluginError;
use crate::validate::ValidationError;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds, for 503: when a retry may succeed.
    pub retry_after: Option<u32>,
    /// The `kind` label for plugin failures.
    pub plugin_failure: Option<&'static str>,
    /// Close the connection after the response (the request body was not
    /// read to its end).
    pub close_connection: bool,
    /// Ask for a bearer token (`WWW-Authenticate`, with 401).
    pub challenge: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
            plugin_failure: None,
            close_connection: false,
            challenge: false,
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::to_vec(&ErrorBody {
            error: &self.message,
        })
        .unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
        let mut response = json_response(self.status, body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.close_connection {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let status = match e {
            DecodeError::TooManyElements { .. } | DecodeError::TooManyInputs { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, e.to_string())
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid inputs: {e}"))
    }
}

/// Why a request body could not be read.
#[derive(Debug)]
pub enum BodyError {
    TooLarge { limit: usize },
    Timeout { seconds: u64 },
    Read(String),
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        let close_connection = !matches!(e, BodyError::Read(_));
        let error = match e {
            BodyError::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes"),
            ),
            BodyError::Timeout { seconds } => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within {seconds} s"),
            ),
            BodyError::Read(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {e}"),
            ),
        };
        ApiError {
            close_connection,
            ..error
        }
    }
}

/// A version that refused admission: 503, retry shortly.
pub fn admission_error(version: &Version, e: AdmissionError) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model `{}` version `{}` {e}", version.model, version.name),
        )
    }
}

/// A failed plugin call; the message names the model, version and plugin.
pub fn plugin_error(version: &Version, e: PluginError) -> ApiError {
    let (status, kind) = match &e {
        PluginError::Rejected(_) => (StatusCode::BAD_REQUEST, "rejected"),
        PluginError::Deadline { .. } => (StatusCode::GATEWAY_TIMEOUT, "deadline"),
        PluginError::Exhausted(_) => (StatusCode::SERVICE_UNAVAILABLE, "exhausted"),
        PluginError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, "failed"),
        PluginError::MemoryLimit { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "memory"),
        PluginError::Panic(_) => (StatusCode::INTERNAL_SERVER_ERROR, "panic"),
        PluginError::StackOverflow => (StatusCode::INTERNAL_SERVER_ERROR, "stack_overflow"),
        PluginError::NotGranted(_) => (StatusCode::INTERNAL_SERVER_ERROR, "not_granted"),
        PluginError::Trap(_) => (StatusCode::INTERNAL_SERVER_ERROR, "trap"),
        PluginError::MalformedOutput(_) => (StatusCode::INTERNAL_SERVER_ERROR, "malformed_output"),
        PluginError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let message = format!(
        "model `{}` version `{}`: {} {e}",
        version.model,
        version.name,
        version.backend.describe()
    );
    ApiError {
        retry_after: (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1),
        plugin_failure: Some(kind),
        ..ApiError::new(status, message)
    }
}
