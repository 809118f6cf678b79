//! The one place where errors become HTTP responses: status, `Retry-After`
//! and kind come from [`Error`] itself; this writes `{"error": "..."}`
//! with the headers the status needs (`Allow` on 405, `WWW-Authenticate`
//! on 401, `Connection: close` when the body was not read).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::pipeline::Error;
use crate::protocol::ErrorBody;

/// The response for `error`.
pub(super) fn respond(error: &Error) -> Response<Full<Bytes>> {
    let message = error.to_string();
    let body = match error {
        Error::ReloadRefused { problems, .. } => {
            #[derive(serde::Serialize)]
            struct Refused<'a> {
                error: &'a str,
                problems: &'a [String],
            }
            serde_json::to_vec(&Refused {
                error: &message,
                problems,
            })
        }
        _ => serde_json::to_vec(&ErrorBody { error: &message }),
    }
    .unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
    let mut response = json_response(error.status(), body);
    let headers = response.headers_mut();
    if let Some(seconds) = error.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    match error {
        Error::Unauthorized { .. } => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        Error::MethodNotAllowed { allow, .. } => {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        _ => {}
    }
    if error.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A JSON response with the given status.
pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
