//! The endpoints: V2 health, metadata, readiness and inference, plus
//! `/metrics`. One function per step of an inference request, in the order
//! of the request path: route, read, decode, validate, admit, invoke, respond.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::error::{ApiError, BodyError, admission_error, json_response, plugin_error};
use super::{State, admin_routes};
use crate::protocol::{self, InferRequest, InferResponse, ModelMetadata, ServerMetadata, SpecJson};
use std::sync::Arc;

use crate::router::{Model, Route, Version};
use crate::runtime::CallLimits;
use crate::shadow;
use crate::telemetry;
use crate::tensor::Tensor;
use crate::validate;

pub(super) type HttpResponse = Response<Full<Bytes>>;

/// The header naming the version that answered.
pub const MODEL_VERSION_HEADER: &str = "x-model-version";

/// Dispatches one request.
pub async fn handle(state: &State, request: Request<Incoming>) -> HttpResponse {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let get = request.method() == Method::GET;
    let post = request.method() == Method::POST;
    let result = match segments.as_slice() {
        ["v2", "models", model, "infer"] if post => {
            return infer(state, model, None, request).await;
        }
        ["v2", "models", model, "versions", version, "infer"] if post => {
            return infer(state, model, Some(version), request).await;
        }
        ["v2"] if get => server_metadata(),
        ["v2", "health", "live"] if get => Ok(json_ok(br#"{"live":true}"#.to_vec())),
        ["v2", "health", "ready"] if get => Ok(server_ready(state)),
        ["v2", "models", model] if get => model_metadata(state, model, None),
        ["v2", "models", model, "ready"] if get => model_ready(state, model, None),
        ["v2", "models", model, "versions", version] if get => {
            model_metadata(state, model, Some(version))
        }
        ["v2", "models", model, "versions", version, "ready"] if get => {
            model_ready(state, model, Some(version))
        }
        ["metrics"] if get => Ok(metrics(state)),
        ["admin", "reload"] if post => match admin_routes::authorize(state, request.headers()) {
            Ok(()) => admin_routes::reload(state).await,
            Err(e) => Err(e),
        },
        ["admin", "policies"] if get => admin_routes::authorize(state, request.headers())
            .and_then(|()| admin_routes::policies(state)),
        ["admin", "monitoring"] if get => admin_routes::authorize(state, request.headers())
            .and_then(|()| admin_routes::monitoring(state)),
        other => Err(match allowed_method(other) {
            Some(allowed) => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {path}; use {allowed}",
                    request.method()
                ),
            ),
            None => ApiError::new(StatusCode::NOT_FOUND, format!("no endpoint at {path}")),
        }),
    };
    result.unwrap_or_else(|e| {
        telemetry::record_http_error(e.status.as_u16());
        e.into_response()
    })
}

/// The method a known path takes, for 405s; `None` for unknown paths.
fn allowed_method(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["v2", "models", _, "infer"]
        | ["v2", "models", _, "versions", _, "infer"]
        | ["admin", "reload"] => Some("POST"),
        ["v2"]
        | ["v2", "health", "live" | "ready"]
        | ["v2", "models", _]
        | ["v2", "models", _, "ready"]
        | ["v2", "models", _, "versions", _]
        | ["v2", "models", _, "versions", _, "ready"]
        | ["metrics"]
        | ["admin", "policies"]
        | ["admin", "monitoring"] => Some("GET"),
        _ => None,
    }
}

fn json_ok(body: Vec<u8>) -> HttpResponse {
    json_response(StatusCode::OK, body)
}

pub(super) fn to_json(value: &impl serde::Serialize) -> Result<HttpResponse, ApiError> {
    serde_json::to_vec(value).map(json_ok).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode the response: {e}"),
        )
    })
}

fn server_metadata() -> Result<HttpResponse, ApiError> {
    to_json(&ServerMetadata {
        name: "wasm-model-gateway",
        version: env!("CARGO_PKG_VERSION"),
        extensions: &["binary_tensor_data"],
    })
}

fn server_ready(state: &State) -> HttpResponse {
    if state.shutting_down.load(Ordering::Acquire) {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"ready":false}"#.to_vec(),
        )
    } else {
        json_ok(br#"{"ready":true}"#.to_vec())
    }
}

fn model_metadata(
    state: &State,
    model: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let snapshot = state.reloader.snapshot();
    let model: &Model = snapshot.model(model)?;
    let (versions, serving): (Vec<&str>, &Version) = match version {
        Some(v) => {
            let version = model.version(v)?;
            (vec![version.name.as_str()], version)
        }
        None => (
            model.versions.keys().map(String::as_str).collect(),
            &model.champion,
        ),
    };
    let info = serving.backend.info();
    to_json(&ModelMetadata {
        name: &model.name,
        versions,
        platform: serving.backend.platform(),
        inputs: info.inputs.iter().map(SpecJson::from).collect(),
        outputs: info.outputs.iter().map(SpecJson::from).collect(),
    })
}

fn model_ready(
    state: &State,
    model: &str,
    version: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let snapshot = state.reloader.snapshot();
    let model = snapshot.model(model)?;
    if let Some(v) = version {
        model.version(v)?;
    }
    #[derive(serde::Serialize)]
    struct Ready<'a> {
        name: &'a str,
        ready: bool,
    }
    to_json(&Ready {
        name: &model.name,
        ready: true,
    })
}

fn metrics(state: &State) -> HttpResponse {
    let mut text = telemetry::render();
    let snapshot = state.reloader.snapshot();
    let versions: Vec<crate::monitor::VersionSummaries<'_>> = snapshot
        .models()
        .flat_map(|m| {
            m.monitors
                .iter()
                .map(move |(version, monitor)| crate::monitor::VersionSummaries {
                    model: &m.name,
                    version,
                    features: monitor.summaries(),
                })
        })
        .collect();
    crate::monitor::render(&mut text, &versions);
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `POST .../infer`: the request path of DESIGN.md, step by step.
async fn infer(
    state: &State,
    model: &str,
    pinned: Option<&str>,
    request: Request<Incoming>,
) -> HttpResponse {
    let start = Instant::now();
    let busy = shadow::Busy::enter(&state.load);
    let snapshot = state.reloader.snapshot();
    let (model, version, route) = match snapshot.route(model, pinned, request.headers()) {
        Ok(found) => found,
        Err(e) => {
            let error = ApiError::from(e);
            telemetry::record_request(
                telemetry::UNKNOWN,
                telemetry::UNKNOWN,
                "none",
                error.status.as_u16(),
                start.elapsed(),
            );
            return error.into_response();
        }
    };
    let result = infer_version(state, model, version, request, start).await;
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    let result = result.map(|answered| {
        if route != Route::Pinned {
            shadow::dispatch(
                model,
                version,
                Arc::new(answered.inputs),
                Arc::new(answered.outputs),
                &busy,
            );
        }
        answered.response
    });
    if let Err(ApiError {
        plugin_failure: Some(kind),
        ..
    }) = &result
    {
        telemetry::record_plugin_error(&version.model, &version.name, kind);
    }
    version.metrics.request(
        &version.model,
        &version.name,
        route,
        status.as_u16(),
        start.elapsed(),
    );
    let mut response = result.unwrap_or_else(|e| {
        if e.status.is_server_error()
            && let Some(suppressed) = version.error_log.check()
        {
            tracing::warn!(
                model = %version.model,
                version = %version.name,
                status = e.status.as_u16(),
                error = %e.message,
                suppressed,
                "inference failed"
            );
        }
        e.into_response()
    });
    if let Ok(name) = HeaderValue::from_str(&version.name) {
        response.headers_mut().insert(MODEL_VERSION_HEADER, name);
    }
    response
}

/// A successful answer, and what shadows need to be compared with it.
struct Answered {
    response: HttpResponse,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

async fn infer_version(
    state: &State,
    model: &Model,
    version: &Version,
    request: Request<Incoming>,
    start: Instant,
) -> Result<Answered, ApiError> {
    let json_length = json_length(request.headers())?;
    let body = read_body(
        request,
        state.config.max_body_bytes,
        state.config.body_read_timeout,
    )
    .await?;
    let request = protocol::decode_infer_request(&body, json_length, state.config.decode)?;
    drop(body);
    validate_request(model, version, &request)?;
    if let Some(monitor) = model.monitors.get(&version.name) {
        monitor.observe(&request.inputs);
    }

    let deadline = start + version.limits.timeout;
    let _slot = version
        .admit(deadline)
        .await
        .map_err(|e| admission_error(version, e))?;
    let limits = CallLimits {
        deadline,
        timeout: version.limits.timeout,
        memory_bytes: version.limits.memory_bytes,
    };
    let called = Instant::now();
    let outputs = version.infer(&request.inputs, limits).await;
    version
        .metrics
        .plugin_call(&version.model, &version.name, called.elapsed());
    let outputs = outputs.map_err(|e| plugin_error(version, e))?;
    let allow_nan = model.schema.as_ref().is_some_and(|s| s.allow_nan_outputs);
    validate::check_outputs(&outputs, version.backend.info(), allow_nan)
        .map_err(|e| plugin_error(version, crate::runtime::PluginError::MalformedOutput(e)))?;
    if let Some(labels) = version
        .label_output
        .as_ref()
        .and_then(|name| outputs.iter().find(|t| &t.name == name))
    {
        version
            .metrics
            .predictions(&version.model, &version.name, labels);
    }

    let selected = select_outputs(&outputs, &request, version)?;
    let (body, json_length) = InferResponse {
        model_name: &version.model,
        model_version: &version.name,
        id: request.id.as_deref(),
        outputs: &selected,
    }
    .encode()
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "model `{}` version `{}`: could not encode the outputs: {e}",
                version.model, version.name
            ),
        )
    })?;
    drop(selected);
    let mut response = json_ok(body);
    if let Some(n) = json_length {
        let headers = response.headers_mut();
        headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    Ok(Answered {
        response,
        inputs: request.inputs,
        outputs,
    })
}

/// Checks the request against the plugin's declared inputs, then against the
/// policy's schema; counts every violation. Refuses structural violations
/// always and value violations unless the schema is in `flag` mode.
fn validate_request(
    model: &Model,
    version: &Version,
    request: &InferRequest,
) -> Result<(), ApiError> {
    let violations = match validate::check_request(request, version.backend.info()) {
        Err(e) => e.violations,
        Ok(()) => match &model.schema {
            Some(schema) => validate::schema_violations(schema, &request.inputs),
            None => return Ok(()),
        },
    };
    if violations.is_empty() {
        return Ok(());
    }
    for v in &violations {
        telemetry::record_validation_failure(
            &version.model,
            &version.name,
            &v.input,
            &v.feature,
            v.rule,
        );
    }
    let flagged = model
        .schema
        .as_ref()
        .is_some_and(|s| s.mode == crate::policy::Mode::Flag)
        && violations.iter().all(validate::Violation::is_value_rule);
    let error = validate::ValidationError { violations };
    if flagged {
        if let Some(suppressed) = version.error_log.check() {
            tracing::warn!(model = %version.model, version = %version.name, suppressed, "served a request that breaks the input rules (flag mode): {error}");
        }
        return Ok(());
    }
    Err(error.into())
}

/// The outputs the client asked for, in its order (all when it named none),
/// each with whether it goes back in binary.
fn select_outputs<'a>(
    outputs: &'a [Tensor],
    request: &InferRequest,
    version: &Version,
) -> Result<Vec<(&'a Tensor, bool)>, ApiError> {
    let Some(requested) = &request.outputs else {
        return Ok(outputs
            .iter()
            .map(|t| (t, request.binary_outputs))
            .collect());
    };
    requested
        .iter()
        .map(|wanted| {
            let tensor = outputs
                .iter()
                .find(|t| t.name == wanted.name)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "model `{}` version `{}`: {} did not return the requested output `{}`",
                            version.model,
                            version.name,
                            version.backend.describe(),
                            wanted.name
                        ),
                    )
                })?;
            Ok((tensor, request.wants_binary(&wanted.name)))
        })
        .collect()
}

/// The binary tensor extension's header: the length of the JSON part.
const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

fn json_length(headers: &http::HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(INFERENCE_HEADER_CONTENT_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("Inference-Header-Content-Length is not a byte count: {value:?}"),
            )
        })
}

/// How long an over-limit body is drained before the 413 is sent.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(250);

/// Reads the whole body, refusing more than `limit` bytes and giving up
/// after `timeout`.
///
/// A body over the limit is still read, and discarded, for up to
/// [`DRAIN_TIME`] and another `limit` bytes before the 413 goes out: closing
/// a socket with unread data makes the kernel send a reset, which can
/// destroy the 413 before the client reads it. A body declared larger than
/// that is refused unread.
async fn read_body(
    request: Request<Incoming>,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, BodyError> {
    let drain_limit = limit.saturating_mul(2);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut deadline = tokio::time::Instant::now() + timeout;
    let mut body = request.into_body();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    let mut draining = false;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if draining => break,
            Err(_) => {
                return Err(BodyError::Timeout {
                    seconds: timeout.as_secs(),
                });
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(data.len());
        if received > drain_limit {
            break;
        }
        if received <= limit {
            chunks.push(data);
        } else if !draining {
            draining = true;
            chunks = Vec::new();
            deadline = deadline.min(tokio::time::Instant::now() + DRAIN_TIME);
        }
    }
    if received > limit {
        return Err(BodyError::TooLarge { limit });
    }
    Ok(match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    })
}
