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
use crate::pipeline::{Error, Guarded};

/// Wrong tokens a peer may send per window.
const MAX_FAILURES: u32 = 10;
/// The window: a peer's count restarts this long after its first failure.
const WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at most. Past it, expired windows are dropped, and
/// if none has expired every peer shares the global count below.
const MAX_PEERS: usize = 10_000;
/// Wrong tokens from all peers together per window: many addresses (an
/// IPv6 range, a botnet) cannot guess faster than this.
const MAX_FAILURES_ALL: u32 = 1_000;

/// Recent failed logins per peer (an IPv4 address or an IPv6 /64), and
/// from all peers.
#[derive(Default)]
pub(crate) struct Failures(Mutex<FailureCounts>);

#[derive(Default)]
pub(crate) struct FailureCounts {
    peers: HashMap<IpAddr, (Instant, u32)>,
    all: Option<(Instant, u32)>,
}

/// Seconds left of a window that started at `since`, if it is over its
/// `limit`.
fn over(window: Option<&(Instant, u32)>, limit: u32, now: Instant) -> Option<u32> {
    let (since, count) = window?;
    let left = WINDOW.checked_sub(now.duration_since(*since))?;
    (*count >= limit).then(|| left.as_secs_f64().ceil() as u32)
}

fn count(window: &mut (Instant, u32), now: Instant) {
    if now.duration_since(window.0) >= WINDOW {
        *window = (now, 0);
    }
    window.1 += 1;
}

impl Failures {
    /// Seconds until `peer` may try again, if it is over its failures.
    fn blocked(&self, peer: IpAddr, now: Instant) -> Option<u32> {
        let failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        over(failures.peers.get(&peer), MAX_FAILURES, now)
            .or_else(|| over(failures.all.as_ref(), MAX_FAILURES_ALL, now))
    }

    fn failed(&self, peer: IpAddr, now: Instant) {
        let mut failures = self.0.lock().unwrap_or_else(|p| p.into_inner());
        count(failures.all.get_or_insert((now, 0)), now);
        if failures.peers.len() >= MAX_PEERS && !failures.peers.contains_key(&peer) {
            failures
                .peers
                .retain(|_, (since, _)| now.duration_since(*since) < WINDOW);
            if failures.peers.len() >= MAX_PEERS {
                // Not remembered alone: the global count holds it.
                return;
            }
        }
        count(failures.peers.entry(peer).or_insert((now, 0)), now);
    }
}

/// Compares tokens in constant time, lengths included: their SHA-256
/// digests are compared.
fn same_token(given: &str, token: &str) -> bool {
    let digest = |t: &str| ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
    bool::from(digest(given).as_ref().ct_eq(digest(token).as_ref()))
}

/// Checks the bearer token of an admin `request` from `peer`.
pub(super) fn authorize<B>(
    state: &State,
    peer: SocketAddr,
    request: &Request<B>,
) -> Result<(), Error> {
    let Some(token) = &state.config.admin_token else {
        return Err(Error::AdminDisabled);
    };
    let telemetry = state.pipeline.telemetry();
    check_bearer(
        Some(&state.admin_failures),
        Guarded::Admin,
        token,
        peer,
        request,
        |reason| telemetry.record_admin_auth_failure(reason),
    )
}

/// Checks that `request` from `peer` carries `token` as its bearer token;
/// a failure (`wrong_token`, or `rate_limited` for a peer over its
/// failures) is counted by `failed` and, when given, in `failures`, which
/// then refuses a peer (and every peer) past their limits.
pub(super) fn check_bearer<B>(
    failures: Option<&Failures>,
    guarded: Guarded,
    token: &str,
    peer: SocketAddr,
    request: &Request<B>,
    failed: impl Fn(&'static str),
) -> Result<(), Error> {
    let now = Instant::now();
    let peer = super::listener::peer_key(peer.ip());
    if let Some(retry_in_secs) = failures.and_then(|f| f.blocked(peer, now)) {
        failed("rate_limited");
        return Err(Error::TooManyAttempts {
            guarded,
            retry_in_secs,
        });
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(given) if same_token(given, token) => Ok(()),
        _ => {
            if let Some(failures) = failures {
                failures.failed(peer, now);
            }
            failed("wrong_token");
            Err(Error::Unauthorized { guarded })
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

/// `GET /admin/rollouts`: every rollout's state, decisions and the
/// current step's window.
pub(super) fn rollouts(state: &State) -> Result<HttpResponse, Error> {
    to_json(&serde_json::json!({ "rollouts": state.rollouts.view() }))
}

/// `POST /admin/rollouts/{model}/{pause|resume|promote|rollback}`: the
/// rollout's state after the action; the split serves within a tick.
pub(super) async fn rollout_action(
    state: &State,
    model: &str,
    action: &str,
) -> Result<HttpResponse, Error> {
    use crate::rollout::{Action, ActionError};
    let Some(action) = Action::parse(action) else {
        return Err(Error::NoEndpoint {
            path: format!(
                "/admin/rollouts/{model}/{action}: the actions are pause, resume, promote and rollback"
            ),
        });
    };
    let snapshot = state.reloader.snapshot();
    let found = snapshot.model(model).map_err(Error::Route)?;
    let after = state
        .rollouts
        .act(&found.policy, action, std::time::SystemTime::now())
        .map_err(|e| match e {
            ActionError::NoRollout => Error::NoEndpoint {
                path: format!("/admin/rollouts/{model}: model `{model}` has no [rollout]"),
            },
            ActionError::Conflict(why) => Error::RolloutConflict(why),
        })?;
    drop(snapshot);
    // Served now, not at the next tick (which tries again if this fails).
    if let Err(problems) = state.reloader.reapply("rollout").await {
        tracing::error!(problems = ?problems.iter().map(|e| e.to_string()).collect::<Vec<_>>(), "a rollout action cannot be served yet; retried at the next tick");
    }
    state
        .rollouts
        .record(state.pipeline.decisions(), &state.reloader.snapshot());
    to_json(&after)
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

/// `GET /admin/decisions/{id}`: the decision records of request `id` (its
/// answer and its shadow copies) among the recent ones the server keeps in
/// memory; `gateway log show ID` searches the files.
pub(super) fn decisions(state: &State, id: &str) -> Result<HttpResponse, Error> {
    let Some(log) = state.pipeline.decisions() else {
        return Err(Error::NoEndpoint {
            path: format!(
                "/admin/decisions/{id}: this gateway keeps no decision log (--decision-log)"
            ),
        });
    };
    let records = log.find(id);
    if records.is_empty() {
        return Err(Error::NoEndpoint {
            path: format!(
                "/admin/decisions/{id}: no such request among the recent decisions; `gateway log show {id}` searches the log files"
            ),
        });
    }
    // The records as written (each line is a JSON object), in order.
    let body = format!(
        "{{\"request_id\":{},\"decisions\":[{}]}}",
        serde_json::Value::from(id),
        records.join(",")
    );
    Ok(super::routes::json_ok(body.into_bytes()))
}
