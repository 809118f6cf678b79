//! The endpoints: V2 health, metadata, readiness and inference, plus
//! `/metrics` and `/admin/*`. An inference request is the REST front end of
//! the pipeline: route, refuse early what the version cannot take, read
//! and decode the body, run the pipeline, encode the answer, finish.

use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use super::error::{json_response, respond};
use super::listener::Role;
use super::{ServerConfig, State, admin_routes};
use crate::pipeline::{Answer, AnswerBytes, BodyError, Call, Error, OutputProblem};
use crate::protocol::{self, InferRequest, InferResponse, ModelMetadata, ServerMetadata, SpecJson};
use crate::router::{Model, Version};
use crate::telemetry;
use crate::tensor::{self, Datatype, Tensor};

pub(super) type HttpResponse = Response<Full<Bytes>>;

/// The header naming the version that answered.
pub(super) const MODEL_VERSION_HEADER: HeaderName = HeaderName::from_static("x-model-version");
use crate::decisions::Identity;
use crate::decisions::identity::REQUEST_ID_HEADER;

/// Dispatches one request from `peer` on a listener with `role`. `HEAD`
/// is answered as `GET` (hyper sends the headers only). An inference
/// answer comes with its bytes, counted until its body is sent.
pub(super) async fn handle(
    state: &State,
    role: Role,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> (HttpResponse, Option<AnswerBytes>) {
    // The request line counts towards the head's size too.
    let line = request.method().as_str().len()
        + request
            .uri()
            .path_and_query()
            .map_or(0, |p| p.as_str().len());
    if let Err(e) = check_headers(request.headers(), line, &state.config) {
        state
            .pipeline
            .telemetry()
            .record_http_error(e.status().as_u16());
        return (respond(&e), None);
    }
    // The request moves on to its handler: a clone of its URI shares the
    // bytes hyper read.
    let uri = request.uri().clone();
    let path = uri.path();
    let mut parts = [""; MAX_SEGMENTS];
    let mut n = 0;
    for (part, segment) in parts
        .iter_mut()
        .zip(path.trim_end_matches('/').split('/').skip(1))
    {
        *part = segment;
        n += 1;
    }
    let segments = &parts[..n];
    let get = matches!(*request.method(), Method::GET | Method::HEAD);
    let post = request.method() == Method::POST;
    let inference = matches!(role, Role::Inference { .. });
    let metrics_here = matches!(role, Role::Admin | Role::Inference { metrics: true });
    let result = match segments {
        ["v2", "models", model, "infer"] if post && inference => {
            return infer(state, model, None, request).await;
        }
        ["v2", "models", model, "versions", version, "infer"] if post && inference => {
            return infer(state, model, Some(version), request).await;
        }
        ["v2", "models", model, "feedback"] if post && inference => {
            feedback(state, peer, model, request).await
        }
        ["v2"] if get && inference => server_metadata(),
        ["v2", "health", "live"] if get => Ok(json_ok(br#"{"live":true}"#.to_vec())),
        ["v2", "health", "ready"] if get => Ok(server_ready(state)),
        ["v2", "models", model] if get && inference => model_metadata(state, model, None),
        ["v2", "models", model, "ready"] if get && inference => model_ready(state, model, None),
        ["v2", "models", model, "versions", version] if get && inference => {
            model_metadata(state, model, Some(version))
        }
        ["v2", "models", model, "versions", version, "ready"] if get && inference => {
            model_ready(state, model, Some(version))
        }
        ["metrics"] if get && metrics_here => Ok(metrics(state)),
        ["admin", ..] if inference => Err(Error::AdminNotHere { path: path.into() }),
        ["admin", "reload"] if post => match admin_routes::authorize(state, peer, &request) {
            Ok(()) => admin_routes::reload(state).await,
            Err(e) => Err(e),
        },
        ["admin", "policies"] if get => admin_routes::authorize(state, peer, &request)
            .and_then(|()| admin_routes::policies(state)),
        ["admin", "monitoring"] if get => admin_routes::authorize(state, peer, &request)
            .and_then(|()| admin_routes::monitoring(state)),
        ["admin", "decisions", id] if get => admin_routes::authorize(state, peer, &request)
            .and_then(|()| admin_routes::decisions(state, id)),
        ["admin", "rollouts"] if get => admin_routes::authorize(state, peer, &request)
            .and_then(|()| admin_routes::rollouts(state)),
        ["admin", "rollouts", model, action] if post => {
            match admin_routes::authorize(state, peer, &request) {
                Ok(()) => admin_routes::rollout_action(state, model, action).await,
                Err(e) => Err(e),
            }
        }
        other => Err(match allowed_method(other) {
            Some(allow) if on_this_listener(other, role) => Error::MethodNotAllowed {
                method: request.method().to_string(),
                path: path.into(),
                allow,
            },
            _ => Error::NoEndpoint { path: path.into() },
        }),
    };
    let response = result.unwrap_or_else(|e| {
        state
            .pipeline
            .telemetry()
            .record_http_error(e.status().as_u16());
        respond(&e)
    });
    (response, None)
}

/// Segments of a path looked at: one more than the longest route's, so a
/// longer path matches none.
const MAX_SEGMENTS: usize = 7;

/// Whether a known path is served on a listener with `role`.
fn on_this_listener(segments: &[&str], role: Role) -> bool {
    match (segments, role) {
        (["v2", "health", ..], _) => true,
        (["metrics"], Role::Inference { metrics }) => metrics,
        (["v2", ..], Role::Inference { .. }) | (["metrics" | "admin", ..], Role::Admin) => true,
        _ => false,
    }
}

/// The methods a known path takes (the `Allow` header of a 405); `None`
/// for unknown paths.
fn allowed_method(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["v2", "models", _, "infer"]
        | ["v2", "models", _, "versions", _, "infer"]
        | ["v2", "models", _, "feedback"]
        | ["admin", "reload"]
        | ["admin", "rollouts", _, _] => Some("POST"),
        ["v2"]
        | ["v2", "health", "live" | "ready"]
        | ["v2", "models", _]
        | ["v2", "models", _, "ready"]
        | ["v2", "models", _, "versions", _]
        | ["v2", "models", _, "versions", _, "ready"]
        | ["metrics"]
        | ["admin", "policies"]
        | ["admin", "monitoring"]
        | ["admin", "rollouts"]
        | ["admin", "decisions", _] => Some("GET, HEAD"),
        _ => None,
    }
}

/// The request head within its caps: the number of headers, their
/// total size (names, values and 4 bytes of separators each, as on the
/// wire) and each value's size. 431 naming the cap.
fn check_headers(headers: &HeaderMap, line: usize, config: &ServerConfig) -> Result<(), Error> {
    let too_large = |detail: String| Error::Header {
        detail,
        too_large: true,
    };
    let limits = &config.connections;
    if headers.len() > limits.max_headers {
        return Err(too_large(format!(
            "the request has {} headers; the limit is {}",
            headers.len(),
            limits.max_headers
        )));
    }
    let mut total = line;
    for (name, value) in headers {
        if value.len() > config.max_header_value_bytes {
            return Err(too_large(format!(
                "header {} is {} bytes; the limit is {} bytes per header value",
                static_header_name(name),
                value.len(),
                config.max_header_value_bytes
            )));
        }
        total += name.as_str().len() + value.len() + 4;
    }
    if total > limits.max_header_bytes {
        return Err(too_large(format!(
            "the request line and headers are {total} bytes; the limit is {} bytes",
            limits.max_header_bytes
        )));
    }
    Ok(())
}

/// A header's name for a message: the standard ones by name, any other
/// as `other` (a name chosen by the client is not echoed).
fn static_header_name(name: &header::HeaderName) -> &'static str {
    const KNOWN: [&str; 9] = [
        "authorization",
        "content-type",
        "content-length",
        "content-encoding",
        "user-agent",
        "cookie",
        "host",
        "accept",
        "x-request-id",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == name.as_str())
        .unwrap_or("(a request header)")
}

pub(super) fn json_ok(body: Vec<u8>) -> HttpResponse {
    json_response(StatusCode::OK, body)
}

pub(super) fn to_json(value: &impl serde::Serialize) -> Result<HttpResponse, Error> {
    serde_json::to_vec(value)
        .map(json_ok)
        .map_err(|e| Error::Internal(format!("could not encode the response: {e}")))
}

fn server_metadata() -> Result<HttpResponse, Error> {
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
) -> Result<HttpResponse, Error> {
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
        extra: Traceability {
            model_version: &serving.name,
            provenance: serving.backend.provenance(),
            grants: crate::admin::GrantsView::of(&serving.grants),
        },
    })
}

/// What model metadata adds to the V2 fields: which version it
/// describes, the files that serve it (with their SHA-256) and what its
/// plugin may read of random numbers and clocks.
#[derive(serde::Serialize)]
struct Traceability<'a> {
    model_version: &'a str,
    #[serde(flatten)]
    provenance: crate::runtime::Provenance,
    grants: crate::admin::GrantsView,
}

fn model_ready(state: &State, model: &str, version: Option<&str>) -> Result<HttpResponse, Error> {
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
    let mut text = state.pipeline.telemetry().render();
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
    // What a fleet's rollouts are judged from; without one, nobody reads them.
    if state.rollouts.fleet().is_some() {
        state.pipeline.telemetry().render_tallies(&mut text);
    }
    state.reloader.runtime().render_pool(&mut text);
    crate::process::render(&mut text);
    state.rollouts.render(&mut text);
    if let Some(log) = state.pipeline.decisions() {
        log.render(&mut text);
    }
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `POST /v2/models/{model}/feedback`: the true labels of answered
/// requests, joined to what every version answered (see `feedback`).
/// Late, unknown and duplicate feedback is counted and answered 200; a
/// body that is not feedback is a 400 naming the item and the problem,
/// and nothing of it is applied. With a feedback token set, only a
/// client that has it may send truth.
async fn feedback(
    state: &State,
    peer: SocketAddr,
    model: &str,
    request: Request<Incoming>,
) -> Result<HttpResponse, Error> {
    let snapshot = state.reloader.snapshot();
    if let Some(token) = &state.config.feedback_token {
        let telemetry = state.pipeline.telemetry();
        // Before the model is looked up, so a caller without the token
        // learns nothing; counted under the model only if it exists (a
        // caller cannot grow the series). No lockout: a peer address may
        // be a load balancer's, shared with the ground-truth job, and a
        // token of 16 characters or more is not guessed.
        let counted = if snapshot.model(model).is_ok() {
            model
        } else {
            crate::telemetry::UNKNOWN
        };
        admin_routes::check_bearer(
            None,
            crate::pipeline::Guarded::Feedback,
            token,
            peer,
            &request,
            |reason| telemetry.record_feedback(counted, reason, 1),
        )?;
    }
    let found = snapshot.model(model).map_err(Error::Route)?;
    if !found.versions.values().any(|v| v.label_output.is_some()) {
        return Err(Error::Feedback(format!(
            "model `{model}` answers no label (a BYTES output) to judge against the truth"
        )));
    }
    let mut held = state.pipeline.body_bytes(model);
    let limit = crate::feedback::MAX_BODY_BYTES.min(state.config.max_body_bytes);
    let body = read_body(
        &mut |n| held.hold(n),
        request,
        limit,
        state.config.body_read_timeout,
    )
    .await?;
    // What the parsed items take is held too, before they exist.
    held.hold(
        body.len()
            .saturating_mul(crate::feedback::PARSED_BYTES_PER_BYTE),
    )?;
    let items = crate::feedback::parse(&body).map_err(Error::Feedback)?;
    drop(body);
    let telemetry = state.pipeline.telemetry();
    let mut counts = [0u64; crate::feedback::Outcome::ALL.len()];
    for (id, truth) in &items {
        let outcome = state
            .pipeline
            .predictions()
            .judge(telemetry, model, id, truth);
        if let Some(at) = crate::feedback::Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
        {
            counts[at] += 1;
        }
    }
    let mut answer = serde_json::Map::new();
    for (outcome, n) in crate::feedback::Outcome::ALL.iter().zip(counts) {
        if n > 0 {
            telemetry.record_feedback(model, outcome.as_str(), n);
        }
        answer.insert(outcome.as_str().into(), n.into());
    }
    Ok(json_ok(
        serde_json::Value::Object(answer).to_string().into_bytes(),
    ))
}

/// `POST .../infer`: the REST front end of the pipeline. The answer's
/// bytes stay counted in the budget of bytes in flight until its body is
/// sent or dropped (`listener` moves them into the body).
async fn infer(
    state: &State,
    model: &str,
    pinned: Option<&str>,
    request: Request<Incoming>,
) -> (HttpResponse, Option<AnswerBytes>) {
    let snapshot = state.reloader.snapshot();
    // A request id the client sent that cannot be used is refused (its
    // decision is recorded under a new id, which the answer carries).
    let (identity, bad_id) = match Identity::of(request.headers()) {
        Ok(identity) => (identity, None),
        Err(bad) => (
            Identity {
                request_id: crate::decisions::identity::new_request_id(),
                trace: None,
            },
            Some(bad),
        ),
    };
    let id_header = HeaderValue::from_str(&identity.request_id).ok();
    let with_id = |mut response: HttpResponse| {
        if let Some(value) = id_header {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        response
    };
    let mut call = match state
        .pipeline
        .route(&snapshot, model, pinned, request.headers(), identity)
    {
        Ok(call) => call,
        Err(e) => return (with_id(respond(&e)), None),
    };
    if let Some(bad) = bad_id {
        let error = Error::Header {
            detail: bad.0,
            too_large: false,
        };
        let mut response = respond(&error);
        // Its body is left unread.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        call.finish(Err(&error));
        return (with_id(response), None);
    }
    let version = call.version.name_header.clone();
    let (mut response, kept) = match serve(state, &mut call, request).await {
        Ok((response, answer)) => {
            let length = hyper::body::Body::size_hint(response.body())
                .exact()
                .map_or(0, |n| n as usize);
            let kept = call.keep_for_answer(length);
            call.finish(Ok(answer));
            (response, Some(kept))
        }
        Err(e) => {
            let mut response = respond(&e.error);
            if e.body_unread {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            call.finish(Err(&e.error));
            (response, None)
        }
    };
    if let Some(name) = version {
        response.headers_mut().insert(MODEL_VERSION_HEADER, name);
    }
    (with_id(response), kept)
}

/// The steps of one inference request that can fail.
/// An error of [`serve`], and whether the body was left unread.
struct Failed {
    error: Error,
    body_unread: bool,
}

/// An error raised before the body was read.
struct Unread(Error);

impl From<Error> for Failed {
    fn from(error: Error) -> Self {
        Failed {
            error,
            body_unread: false,
        }
    }
}

impl From<Unread> for Failed {
    fn from(Unread(error): Unread) -> Self {
        Failed {
            error,
            body_unread: true,
        }
    }
}

async fn serve(
    state: &State,
    call: &mut Call<'_>,
    request: Request<Incoming>,
) -> Result<(HttpResponse, Answer), Failed> {
    let limit = state.config.max_body_bytes;
    // A version that would refuse costs no upload: the body is drained in
    // the background (so the refusal is not lost to a reset) and the
    // connection closed.
    let early = json_length(request.headers()).and_then(|json_length| {
        let coding = content_coding(request.headers())?;
        call.admissible()?;
        Ok((json_length, coding))
    });
    let (json_length, coding) = match early {
        Ok(found) => found,
        Err(e) => {
            drain(request.into_body(), limit);
            return Err(Unread(e).into());
        }
    };
    let body = read_body(
        &mut |n| call.hold(n),
        request,
        limit,
        state.config.body_read_timeout,
    )
    .await?;
    let received = body.len();
    let request =
        decode_request(call, body, coding, json_length, limit, state.config.decode).await?;
    call.release(received);
    let (request, outputs) = call.infer(request).await?;

    let selection = select_outputs(&outputs, &request, call)?;
    let output_bytes = selection.iter().map(|&(i, _)| outputs[i].data.len()).sum();
    let (encoded, outputs, request) = if call.is_bulk(output_bytes) {
        let version = call.version.clone();
        call.offload(move || {
            let encoded = encode(&version, &request, &outputs, &selection);
            (encoded, outputs, request)
        })
        .await?
    } else {
        let encoded = encode(call.version, &request, &outputs, &selection);
        (encoded, outputs, request)
    };
    let (body, json_length) =
        encoded.map_err(|e| call.output_error(OutputProblem::Encode(e.to_string())))?;
    call.hold(body.len())?;
    let mut response = json_ok(body);
    if let Some(n) = json_length {
        let headers = response.headers_mut();
        headers.insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    Ok((
        response,
        Answer {
            inputs: request.inputs,
            outputs,
        },
    ))
}

/// The outputs the client asked for, in its order (all when it named none),
/// each with whether it goes back in binary: a listed output as its own
/// `binary_data` says, the others as `binary_data_output` says. A BYTES
/// output that is not UTF-8 text, which JSON cannot carry, always goes in
/// binary: the plugin's answer is valid, only JSON is too narrow for it.
fn select_outputs(
    outputs: &[Tensor],
    request: &InferRequest,
    call: &Call<'_>,
) -> Result<Vec<(usize, bool)>, Error> {
    let binary = |t: &Tensor, wanted: bool| wanted || !json_can_carry(t);
    let Some(requested) = &request.outputs else {
        return Ok(outputs
            .iter()
            .enumerate()
            .map(|(i, t)| (i, binary(t, request.binary_outputs)))
            .collect());
    };
    requested
        .iter()
        .map(|wanted| {
            let at = outputs
                .iter()
                .position(|t| t.name == wanted.name)
                .ok_or_else(|| {
                    call.output_error(OutputProblem::MissingRequested(wanted.name.clone()))
                })?;
            Ok((at, binary(&outputs[at], request.wants_binary(&wanted.name))))
        })
        .collect()
}

/// Decodes a body on the request's task when it is small, on the bulk pool
/// when it is large. A small compressed body is inflated here up to the
/// bulk size; one that inflates past it, on the bulk pool within the body
/// limit. What inflating holds is in the budget of bytes in flight.
async fn decode_request(
    call: &mut Call<'_>,
    body: Bytes,
    coding: Coding,
    json_length: Option<usize>,
    limit: usize,
    decode: protocol::DecodeLimits,
) -> Result<InferRequest, Error> {
    if !call.is_bulk(body.len()) {
        if coding == Coding::Identity {
            return decode_body(body, coding, json_length, limit, decode);
        }
        let small = call.bulk_bytes();
        call.hold(small)?;
        let decoded = decode_body(body.clone(), coding, json_length, small, decode);
        call.release(small);
        if !matches!(decoded, Err(Error::Body(BodyError::TooLarge { .. }))) {
            return decoded;
        }
    }
    let inflating = if coding == Coding::Identity { 0 } else { limit };
    call.hold(inflating)?;
    let request = call
        .offload(move || decode_body(body, coding, json_length, limit, decode))
        .await?;
    call.release(inflating);
    request
}

/// A request body, inflated if it was compressed, decoded.
fn decode_body(
    body: Bytes,
    coding: Coding,
    json_length: Option<usize>,
    limit: usize,
    decode: protocol::DecodeLimits,
) -> Result<InferRequest, Error> {
    let body = match coding {
        Coding::Identity => body,
        coding => decompress(&body, coding, limit)?,
    };
    Ok(protocol::decode_infer_request(&body, json_length, decode)?)
}

/// The response body of the `selection` of `outputs` (indices, and
/// whether each goes in binary), and its JSON part's length.
fn encode(
    version: &Version,
    request: &InferRequest,
    outputs: &[Tensor],
    selection: &[(usize, bool)],
) -> Result<(Vec<u8>, Option<usize>), serde_json::Error> {
    let selected: Vec<(&Tensor, bool)> = selection
        .iter()
        .map(|&(i, binary)| (&outputs[i], binary))
        .collect();
    InferResponse {
        model_name: &version.model,
        model_version: &version.name,
        id: request.id.as_deref(),
        outputs: &selected,
    }
    .encode()
}

/// Whether a tensor can be written as JSON: BYTES elements must be UTF-8.
fn json_can_carry(t: &Tensor) -> bool {
    t.datatype != Datatype::Bytes
        || tensor::bytes_elements(&t.data)
            .map_while(Result::ok)
            .all(|e| std::str::from_utf8(e).is_ok())
}

/// The binary tensor extension's header: the length of the JSON part.
const INFERENCE_HEADER_CONTENT_LENGTH: HeaderName =
    HeaderName::from_static("inference-header-content-length");

fn json_length(headers: &HeaderMap) -> Result<Option<usize>, Error> {
    let Some(value) = headers.get(INFERENCE_HEADER_CONTENT_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| Error::Header {
            detail: format!(
                "Inference-Header-Content-Length is not a byte count: {:?}",
                telemetry::escape(&String::from_utf8_lossy(value.as_bytes()))
            ),
            too_large: false,
        })
}

/// A request body's `Content-Encoding`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
}

fn content_coding(headers: &HeaderMap) -> Result<Coding, Error> {
    let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
    let Some(value) = values.next() else {
        return Ok(Coding::Identity);
    };
    if values.next().is_some() {
        return Err(Error::Encoding(
            "more than one Content-Encoding; send the body as is, gzip or deflate".into(),
        ));
    }
    let text = value.to_str().unwrap_or("unreadable").trim();
    if text.is_empty() || text.eq_ignore_ascii_case("identity") {
        Ok(Coding::Identity)
    } else if text.eq_ignore_ascii_case("gzip") || text.eq_ignore_ascii_case("x-gzip") {
        Ok(Coding::Gzip)
    } else if text.eq_ignore_ascii_case("deflate") {
        Ok(Coding::Deflate)
    } else {
        Err(Error::Encoding(format!(
            "Content-Encoding `{}` is not supported; send the body as is, gzip or deflate",
            telemetry::escape(&String::from_utf8_lossy(value.as_bytes()))
        )))
    }
}

/// Inflates a gzip or deflate body, refusing more than `limit` bytes of
/// result (a small body can inflate a thousandfold).
fn decompress(body: &[u8], coding: Coding, limit: usize) -> Result<Bytes, Error> {
    let mut out = Vec::new();
    let read = |reader: &mut dyn std::io::Read, out: &mut Vec<u8>| {
        out.clear();
        reader.take(limit as u64 + 1).read_to_end(out)
    };
    let result = match coding {
        Coding::Gzip => read(&mut flate2::read::MultiGzDecoder::new(body), &mut out),
        // RFC 9110's deflate is zlib-wrapped; some clients send it raw.
        _ => read(&mut flate2::read::ZlibDecoder::new(body), &mut out)
            .or_else(|_| read(&mut flate2::read::DeflateDecoder::new(body), &mut out)),
    };
    if let Err(e) = result {
        return Err(Error::Body(BodyError::Read(format!(
            "the {} body cannot be decompressed: {e}",
            if coding == Coding::Gzip {
                "gzip"
            } else {
                "deflate"
            }
        ))));
    }
    if out.len() > limit {
        return Err(Error::Body(BodyError::TooLarge { limit }));
    }
    Ok(out.into())
}

/// How long, and how much of, an over-limit body is drained in the
/// background after the 413 went out: closing a socket with unread data
/// makes the kernel send a reset, which can destroy the 413 before the
/// client reads it.
const DRAIN_TIME: Duration = Duration::from_millis(250);

/// Reads the whole body, refusing more than `limit` bytes and giving up
/// after `timeout`; every byte held in the process's budget. A body that
/// declares more than the limit is refused at once, unread.
async fn read_body(
    hold: &mut (dyn FnMut(usize) -> Result<(), Error> + Send),
    request: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, Error> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = request.into_body();
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body, limit);
        return Err(Error::Body(BodyError::TooLarge { limit }));
    }
    if let Some(n) = declared {
        hold(n as usize)?;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(Error::Body(BodyError::Timeout {
                    seconds: timeout.as_secs(),
                }));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(Error::Body(BodyError::Read(e.to_string()))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received = received.saturating_add(data.len());
        if received > limit {
            drain(body, limit);
            return Err(Error::Body(BodyError::TooLarge { limit }));
        }
        if declared.is_none() {
            hold(data.len())?;
        }
        chunks.push(data);
    }
    Ok(match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
    })
}

/// Reads and discards up to `limit` more bytes of `body` for up to
/// [`DRAIN_TIME`], on a task of its own, while the response goes out.
fn drain(mut body: Incoming, limit: usize) {
    tokio::spawn(async move {
        let end = tokio::time::Instant::now() + DRAIN_TIME;
        let mut drained = 0usize;
        while drained <= limit {
            match tokio::time::timeout_at(end, body.frame()).await {
                Ok(Some(Ok(frame))) => drained += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
    });
}
