//! `/admin/*`: reload the policies and show the effective routing. Every
//! admin endpoint needs `Authorization: Bearer <--admin-token>`; without a
//! configured token the admin API is off.

use http::{HeaderMap, StatusCode, header};
use serde::Serialize;

use super::State;
use super::error::{ApiError, json_response};
use super::routes::{HttpResponse, to_json};

/// Checks the bearer token in constant time.
pub(super) fn authorize(state: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = &state.config.admin_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: start the gateway with --admin-token or GATEWAY_ADMIN_TOKEN",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError {
            challenge: true,
            ..ApiError::new(
                StatusCode::UNAUTHORIZED,
                "the admin API needs `Authorization: Bearer <admin token>`",
            )
        }),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/reload`: what changed, or 422 with every problem.
pub(super) async fn reload(state: &State) -> Result<HttpResponse, ApiError> {
    match state.reloader.reload("admin").await {
        Ok(report) => to_json(&report),
        Err(problems) => {
            #[derive(Serialize)]
            struct Refused<'a> {
                error: String,
                problems: &'a [String],
            }
            let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let body = Refused {
                error: format!(
                    "reload refused, {} problem(s); still serving generation {}: {}",
                    problems.len(),
                    state.reloader.snapshot().generation,
                    problems.join("; ")
                ),
                problems: &problems,
            };
            let body = serde_json::to_vec(&body).unwrap_or_default();
            Ok(json_response(StatusCode::UNPROCESSABLE_ENTITY, body))
        }
    }
}

/// `GET /admin/policies`: the effective routing of every model.
pub(super) fn policies(state: &State) -> Result<HttpResponse, ApiError> {
    to_json(&state.reloader.view())
}

/// `GET /admin/monitoring`: per model, version and feature, what the
/// version has seen and how far it drifted from the reference.
pub(super) fn monitoring(state: &State) -> Result<HttpResponse, ApiError> {
    #[derive(Serialize)]
    struct VersionMonitoring<'a> {
        model: &'a str,
        version: &'a str,
        window: usize,
        drift_threshold: f64,
        drifting: Vec<String>,
        features: Vec<crate::monitor::FeatureSummary>,
    }
    #[derive(Serialize)]
    struct View<'a> {
        generation: u64,
        versions: Vec<VersionMonitoring<'a>>,
    }
    let snapshot = state.reloader.snapshot();
    let mut versions = Vec::new();
    for model in snapshot.models() {
        for (version, monitor) in &model.monitors {
            let features = monitor.summaries();
            versions.push(VersionMonitoring {
                model: &model.name,
                version,
                window: monitor.config().window,
                drift_threshold: monitor.config().drift_threshold,
                drifting: features
                    .iter()
                    .filter(|f| f.drifting)
                    .map(|f| format!("{}.{}", f.input, f.feature))
                    .collect(),
                features,
            });
        }
    }
    to_json(&View {
        generation: snapshot.generation,
        versions,
    })
}
