//! `/admin/*`: reload the policies and show the effective routing, on the
//! admin listener only. Every admin endpoint needs
//! `Authorization: Bearer <token>` (the scheme in any case, RFC 9110); the
//! token is compared in constant time, and a peer that sends too many
//! wrong ones is refused for a while (429), before its token is looked at.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{Request, header};
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::State;
use super::routes::{HttpResponse, to_json};
use crate::pipeline::Error;

/// Wrong tokens a peer may send per window.
const MAX_FAILURES: u32 = 10;
/// The window: a peer's count restarts this long after its first failure.
const WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at most; past it the oldest windows are forgotten.
const MAX_PEERS: usize = 10_000;

/// Recent failed logins per peer address.
#[derive(Default)]
pub(crate) struct Failures(Mutex<HashMap<IpAddr, (Instant, u32)>>);

impl Failures {
    /// Seconds until `ip` may try again, if it is over its failures.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u32> {
        let failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (since, count) = failures.get(&ip)?;
        let left = WINDOW.checked_sub(now.duration_since(*since))?;
        (*count >= MAX_FAILURES).then(|| left.as_secs_f64().ceil() as u32)
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_PEERS {
            failures.retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
            if failures.len() >= MAX_PEERS {
                failures.clear();
            }
        }
        let entry = failures.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// Checks the bearer token of `request` from `peer`.
pub(super) fn authorize<B>(
    state: &State,
    peer: SocketAddr,
    request: &Request<B>,
) -> Result<(), Error> {
    let Some(token) = &state.config.admin_token else {
        return Err(Error::AdminDisabled);
    };
    let now = Instant::now();
    if let Some(retry_in_secs) = state.admin_failures.blocked(peer.ip(), now) {
        state
            .pipeline
            .telemetry()
            .record_admin_auth_failure("rate_limited");
        return Err(Error::TooManyAttempts { retry_in_secs });
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(given) if bool::from(given.as_bytes().ct_eq(token.as_bytes())) => Ok(()),
        _ => {
            state.admin_failures.failed(peer.ip(), now);
            state
                .pipeline
                .telemetry()
                .record_admin_auth_failure("wrong_token");
            Err(Error::Unauthorized)
        }
    }
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
