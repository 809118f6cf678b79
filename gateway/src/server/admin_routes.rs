//! `/admin/*`: reload the policies and show the effective routing. Every
//! admin endpoint needs `Authorization: Bearer <--admin-token>`; without a
//! configured token the admin API is off.

use http::{HeaderMap, header};
use serde::Serialize;

use super::State;
use super::routes::{HttpResponse, to_json};
use crate::pipeline::Error;

/// Checks the bearer token in constant time; the scheme is
/// case-insensitive (RFC 9110).
pub(super) fn authorize(state: &State, headers: &HeaderMap) -> Result<(), Error> {
    let Some(token) = &state.config.admin_token else {
        return Err(Error::AdminDisabled);
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(Error::Unauthorized),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `POST /admin/reload`: what changed, or 422 with every problem.
pub(super) async fn reload(state: &State) -> Result<HttpResponse, Error> {
    match state.reloader.reload("admin").await {
        Ok(report) => to_json(&report),
        Err(problems) => Err(Error::ReloadRefused {
            generation: state.reloader.snapshot().generation,
            problems: problems.iter().map(ToString::to_string).collect(),
        }),
    }
}

/// `GET /admin/policies`: the effective routing of every model.
pub(super) fn policies(state: &State) -> Result<HttpResponse, Error> {
    to_json(&state.reloader.view())
}

/// `GET /admin/monitoring`: per model, version and feature, what the
/// version has seen and how far it drifted from the reference.
pub(super) fn monitoring(state: &State) -> Result<HttpResponse, Error> {
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
