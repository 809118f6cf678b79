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
