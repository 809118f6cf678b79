//! The one error type of the request path. Every step, from reading the
//! body to checking a plugin's outputs, fails with an [`Error`]; its
//! status, its metric kind and its `Retry-After` are decided here, in one
//! `match` each, and `server/error.rs` is the only place that turns it into
//! a response.

use std::fmt;

use http::StatusCode;

use crate::contract::PluginError;
use crate::protocol::DecodeError;
use crate::router::{AdmissionError, RouteError};
use crate::validate::ValidationError;

/// What went wrong with a request, and whose fault it was.
#[derive(Debug)]
pub(crate) enum Error {
    /// No endpoint at the path.
    NoEndpoint { path: String },
    /// A known path asked with the wrong method.
    MethodNotAllowed {
        method: String,
        path: String,
        allow: &'static str,
    },
    /// The admin API is off (no token configured).
    AdminDisabled,
    /// An endpoint behind a bearer token was asked without it.
    Unauthorized { guarded: Guarded },
    /// Too many wrong tokens from this peer lately.
    TooManyAttempts {
        guarded: Guarded,
        retry_in_secs: u32,
    },
    /// An admin path asked on the inference listener while the admin
    /// API has a listener of its own (or none).
    AdminNotHere { path: String },
    /// A request header breaks a rule (too long, not a number, ...);
    /// `detail` names it.
    Header { detail: String, too_large: bool },
    /// The body could not be read.
    Body(BodyError),
    /// The body's `Content-Encoding` is not one the gateway decodes.
    Encoding(String),
    /// The body is not a valid V2 inference request.
    Decode(DecodeError),
    /// No such model or version.
    Route(RouteError),
    /// The inputs break the model's declaration or the policy's rules.
    Validation(ValidationError),
    /// The version cannot take the request now: retry later.
    Unavailable {
        model: String,
        version: String,
        why: Unavailable,
    },
    /// The plugin (or ONNX model) failed.
    Plugin {
        model: String,
        version: String,
        backend: String,
        error: PluginError,
    },
    /// The plugin answered, but the answer cannot be sent.
    Output {
        model: String,
        version: String,
        backend: String,
        problem: OutputProblem,
    },
    /// A policy reload was refused; the old policies keep serving.
    ReloadRefused {
        generation: u64,
        problems: Vec<String>,
    },
    /// A ground-truth body that is not one (what is wrong, and where).
    Feedback(String),
    /// An operator's action that the rollout's state does not allow.
    RolloutConflict(String),
    /// The gateway itself failed.
    Internal(String),
}

/// Why a version refused a request without running it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Unavailable {
    /// Its concurrency limit and queue are full, or the queue timed out.
    Admission(AdmissionError),
    /// Its circuit breaker is open after repeated failures.
    CircuitOpen { failures: u32, retry_in_secs: u32 },
    /// The process's budget of sandbox memory is taken by running calls.
    SandboxMemory { needed: usize, budget: usize },
    /// The process's budget of request and response bytes is taken.
    Bytes { needed: usize, budget: usize },
    /// The pool for large requests has no room for the version (it may
    /// fill half the queue), or did not start its job within the version's
    /// timeout.
    Bulk { queue: usize },
}

/// Why an answer the plugin gave cannot go to the client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OutputProblem {
    /// The outputs are larger than the version's `max_output_mebibytes`.
    TooLarge { bytes: usize, limit: usize },
    /// A requested output is missing from the answer.
    MissingRequested(String),
    /// Encoding failed.
    Encode(String),
}

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BodyError {
    TooLarge { limit: usize },
    Timeout { seconds: u64 },
    Read(String),
}

/// What a bearer token guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guarded {
    /// `/admin/*`.
    Admin,
    /// `POST /v2/models/{model}/feedback`.
    Feedback,
}

impl Guarded {
    fn what(self) -> &'static str {
        match self {
            Guarded::Admin => "admin API",
            Guarded::Feedback => "feedback endpoint",
        }
    }

    fn token(self) -> &'static str {
        match self {
            Guarded::Admin => "admin",
            Guarded::Feedback => "feedback",
        }
    }
}

impl Error {
    /// The HTTP status. 4xx: the client's request; 5xx: the gateway or the
    /// plugin failed, or is overloaded.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Error::NoEndpoint { .. } | Error::AdminNotHere { .. } | Error::Route(_) => {
                StatusCode::NOT_FOUND
            }
            Error::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::AdminDisabled => StatusCode::FORBIDDEN,
            Error::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Error::Header {
                too_large: true, ..
            } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Error::Header { .. } => StatusCode::BAD_REQUEST,
            Error::Body(BodyError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Body(BodyError::Timeout { .. }) => StatusCode::REQUEST_TIMEOUT,
            Error::Body(BodyError::Read(_)) => StatusCode::BAD_REQUEST,
            Error::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Decode(
                DecodeError::TooManyElements { .. } | DecodeError::TooManyInputs { .. },
            ) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Decode(_) | Error::Validation(_) | Error::Feedback(_) => StatusCode::BAD_REQUEST,
            Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Plugin { error, .. } => match error {
                PluginError::Rejected(_) => StatusCode::BAD_REQUEST,
                PluginError::Deadline { .. } => StatusCode::GATEWAY_TIMEOUT,
                PluginError::Exhausted(_) | PluginError::Starved { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                PluginError::Failed(_)
                | PluginError::MemoryLimit { .. }
                | PluginError::Panic(_)
                | PluginError::StackOverflow
                | PluginError::NotGranted(_)
                | PluginError::Trap(_)
                | PluginError::MalformedOutput(_)
                | PluginError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Error::ReloadRefused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::RolloutConflict(_) => StatusCode::CONFLICT,
            Error::Output { .. } | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `kind` label of the error metrics: a fixed set, never request text.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Error::NoEndpoint { .. } | Error::AdminNotHere { .. } => "no_endpoint",
            Error::TooManyAttempts { .. } => "unauthorized",
            Error::MethodNotAllowed { .. } => "method",
            Error::AdminDisabled | Error::Unauthorized { .. } => "unauthorized",
            Error::Header { .. } => "header",
            Error::Body(BodyError::TooLarge { .. }) => "body_too_large",
            Error::Body(BodyError::Timeout { .. }) => "body_timeout",
            Error::Body(BodyError::Read(_)) => "body_read",
            Error::Encoding(_) => "encoding",
            Error::Decode(_) => "decode",
            Error::Route(_) => "unknown_model",
            Error::Validation(_) => "validation",
            Error::Unavailable { why, .. } => match why {
                Unavailable::Admission(AdmissionError::QueueFull { .. }) => "queue_full",
                Unavailable::Admission(AdmissionError::QueueTimeout { .. }) => "queue_timeout",
                Unavailable::CircuitOpen { .. } => "circuit_open",
                Unavailable::SandboxMemory { .. } => "sandbox_memory",
                Unavailable::Bytes { .. } => "bytes_in_flight",
                Unavailable::Bulk { .. } => "bulk_queue",
            },
            Error::Plugin { error, .. } => plugin_kind(error),
            Error::Output { problem, .. } => match problem {
                OutputProblem::TooLarge { .. } => "output_too_large",
                OutputProblem::MissingRequested(_) => "malformed_output",
                OutputProblem::Encode(_) => "encode",
            },
            Error::ReloadRefused { .. } => "reload_refused",
            Error::RolloutConflict(_) => "rollout_conflict",
            Error::Feedback(_) => "feedback",
            Error::Internal(_) => "internal",
        }
    }

    /// Seconds after which a retry may succeed (503s only).
    pub(crate) fn retry_after(&self) -> Option<u32> {
        match self {
            Error::TooManyAttempts { retry_in_secs, .. } => Some((*retry_in_secs).max(1)),
            Error::Unavailable {
                why: Unavailable::CircuitOpen { retry_in_secs, .. },
                ..
            } => Some((*retry_in_secs).max(1)),
            Error::Unavailable { .. }
            | Error::Plugin {
                error: PluginError::Exhausted(_) | PluginError::Starved { .. },
                ..
            } => Some(1),
            _ => None,
        }
    }

    /// Whether the plugin (or its model) is to blame: counted in
    /// `gateway_plugin_errors_total` and by the circuit breaker when it is
    /// the plugin's own failure (not a request it rejected).
    pub(crate) fn plugin_failure(&self) -> Option<&'static str> {
        match self {
            Error::Plugin { error, .. } => Some(plugin_kind(error)),
            Error::Output { .. } => Some(self.kind()),
            _ => None,
        }
    }

    /// Whether the connection must close after the response: the body was
    /// not read to its end.
    pub(crate) fn closes_connection(&self) -> bool {
        matches!(
            self,
            Error::Body(BodyError::TooLarge { .. } | BodyError::Timeout { .. })
        )
    }
}

fn plugin_kind(error: &PluginError) -> &'static str {
    match error {
        PluginError::Rejected(_) => "rejected",
        PluginError::Deadline { .. } => "deadline",
        PluginError::Exhausted(_) => "exhausted",
        PluginError::Starved { .. } => "starved",
        PluginError::Failed(_) => "failed",
        PluginError::MemoryLimit { .. } => "memory",
        PluginError::Panic(_) => "panic",
        PluginError::StackOverflow => "stack_overflow",
        PluginError::NotGranted(_) => "not_granted",
        PluginError::Trap(_) => "trap",
        PluginError::MalformedOutput(_) => "malformed_output",
        PluginError::Internal(_) => "internal",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoEndpoint { path } => write!(f, "no endpoint at {path}"),
            Error::MethodNotAllowed {
                method,
                path,
                allow,
            } => write!(f, "{method} is not allowed on {path}; use {allow}"),
            Error::AdminDisabled => f.write_str(
                "the admin API is off: give the gateway a token with --admin-token-file or GATEWAY_ADMIN_TOKEN",
            ),
            Error::AdminNotHere { path } => write!(
                f,
                "no endpoint at {path} on this listener: the admin API is served on the admin listener (--admin-listen)"
            ),
            Error::TooManyAttempts {
                guarded,
                retry_in_secs,
            } => write!(
                f,
                "too many wrong {} tokens from this address; try again in {retry_in_secs} s",
                guarded.token()
            ),
            Error::Unauthorized { guarded } => write!(
                f,
                "the {} needs `Authorization: Bearer <{} token>`",
                guarded.what(),
                guarded.token()
            ),
            Error::Header { detail, .. } => f.write_str(detail),
            Error::Body(BodyError::TooLarge { limit }) => {
                write!(f, "request body exceeds the limit of {limit} bytes")
            }
            Error::Body(BodyError::Timeout { seconds }) => {
                write!(f, "request body not received within {seconds} s")
            }
            Error::Body(BodyError::Read(e)) => write!(f, "could not read the request body: {e}"),
            Error::Encoding(detail) => f.write_str(detail),
            Error::Decode(e) => e.fmt(f),
            Error::Route(e) => e.fmt(f),
            Error::Validation(e) => write!(f, "invalid inputs: {e}"),
            Error::Unavailable {
                model,
                version,
                why,
            } => {
                if version.is_empty() {
                    // Not a version's call: a body read for the model.
                    write!(f, "model `{model}`: ")?;
                } else {
                    write!(f, "model `{model}` version `{version}` ")?;
                }
                match why {
                    Unavailable::Admission(e) => e.fmt(f),
                    Unavailable::CircuitOpen {
                        failures,
                        retry_in_secs,
                    } => write!(
                        f,
                        "is taken out of service after {failures} failures in a row (circuit breaker open); retry in {retry_in_secs} s"
                    ),
                    Unavailable::SandboxMemory { needed, budget } => write!(
                        f,
                        "needs {} of sandbox memory, and the gateway's budget of {} is taken by running calls",
                        mebibytes(*needed),
                        mebibytes(*budget)
                    ),
                    Unavailable::Bytes { needed, budget } => write!(
                        f,
                        "cannot take {} more bytes: the gateway's budget of {} for requests in flight is taken",
                        needed,
                        mebibytes(*budget)
                    ),
                    Unavailable::Bulk { queue } => write!(
                        f,
                        "cannot be served now: the pool that decodes and checks large requests (queue of {queue}, at most half of it per version) has no room for it, or did not start its work within 5 s; retry later"
                    ),
                }
            }
            Error::Plugin {
                model,
                version,
                backend,
                error,
            } => write!(f, "model `{model}` version `{version}`: {backend} {error}"),
            Error::Output {
                model,
                version,
                backend,
                problem,
            } => {
                write!(f, "model `{model}` version `{version}`: {backend} ")?;
                match problem {
                    OutputProblem::TooLarge { bytes, limit } => write!(
                        f,
                        "returned {} of outputs, over the version's limit of {} (limits.max_output_mebibytes)",
                        mebibytes(*bytes),
                        mebibytes(*limit)
                    ),
                    OutputProblem::MissingRequested(name) => {
                        write!(f, "did not return the requested output `{name}`")
                    }
                    OutputProblem::Encode(e) => write!(f, "gave outputs that cannot be encoded: {e}"),
                }
            }
            Error::RolloutConflict(why) => f.write_str(why),
            Error::ReloadRefused {
                generation,
                problems,
            } => write!(
                f,
                "reload refused, {} problem(s); still serving generation {generation}: {}",
                problems.len(),
                problems.join("; ")
            ),
            Error::Feedback(e) => write!(f, "invalid feedback: {e}"),
            Error::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

pub(crate) fn mebibytes(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::Decode(e)
    }
}

impl From<RouteError> for Error {
    fn from(e: RouteError) -> Self {
        Error::Route(e)
    }
}

impl From<BodyError> for Error {
    fn from(e: BodyError) -> Self {
        Error::Body(e)
    }
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        Error::Validation(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's mistakes are 4xx, the gateway's and plugins' 5xx.
    #[test]
    fn statuses_blame_the_right_party() {
        let plugin = |error| Error::Plugin {
            model: "m".into(),
            version: "v".into(),
            backend: "plugin `p`".into(),
            error,
        };
        assert_eq!(plugin(PluginError::Rejected("x".into())).status(), 400);
        assert_eq!(
            plugin(PluginError::Deadline {
                limit: std::time::Duration::from_millis(5)
            })
            .status(),
            504
        );
        assert_eq!(plugin(PluginError::Trap("t".into())).status(), 500);
        // A deadline that passed while the call waited for the cores.
        let ms = std::time::Duration::from_millis;
        let starved = plugin(PluginError::past_deadline(ms(100), ms(49)));
        assert_eq!(
            (
                starved.status().as_u16(),
                starved.retry_after(),
                starved.kind()
            ),
            (503, Some(1), "starved")
        );
        let late = plugin(PluginError::past_deadline(ms(100), ms(50)));
        assert_eq!((late.status().as_u16(), late.kind()), (504, "deadline"));
        let open = Error::Unavailable {
            model: "m".into(),
            version: "v".into(),
            why: Unavailable::CircuitOpen {
                failures: 5,
                retry_in_secs: 7,
            },
        };
        assert_eq!((open.status().as_u16(), open.retry_after()), (503, Some(7)));
        assert_eq!(open.kind(), "circuit_open");
        assert!(open.plugin_failure().is_none());
        assert_eq!(
            Error::Body(BodyError::TooLarge { limit: 1 }).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
