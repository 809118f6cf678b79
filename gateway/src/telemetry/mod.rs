//! Metrics and the events that feed them. Owns each server's Prometheus
//! recorder ([`Telemetry`]) and the metric names; every metric is recorded
//! through a method here so names and labels stay consistent.
//!
//! Label values come from policies (model, version) or from a fixed set
//! (route, status, kind), never from request text: a client naming unknown
//! models cannot grow the number of series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

mod tally;
pub(crate) use tally::{BUCKETS, Counts, LABELS, OTHER_LABEL, Tally, bucket_of_bound};

/// Label value for requests that never reached a known model.
pub(crate) const UNKNOWN: &str = "_unknown";

/// The [`Tally`] of a model's control group, whichever version holds it
/// (no version is named so: names start with a letter or digit).
pub(crate) const CONTROL_TALLY: &str = "@control";

const DURATION_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The metrics of one server: its own Prometheus recorder, so servers in
/// one process (tests, an embedding host) never see each other's counts.
/// Recording goes through its methods; hot-path series are registered once
/// in `router::VersionMetrics` and then only updated.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Each version's counts for rollouts, by (model, version): as many
    /// as the policies name.
    tallies: std::sync::Mutex<std::collections::HashMap<(String, String), Arc<Tally>>>,
}

impl Telemetry {
    /// A recorder with every metric described; a thread runs its upkeep
    /// (draining histogram buckets) every 5 s until it is dropped.
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let telemetry = Arc::new(Telemetry {
            recorder,
            handle,
            tallies: Default::default(),
        });
        telemetry.with(describe);
        telemetry.record_build_info();
        let weak = Arc::downgrade(&telemetry);
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    match weak.upgrade() {
                        Some(telemetry) => telemetry.handle.run_upkeep(),
                        None => break,
                    }
                }
            });
        telemetry
    }

    /// The counts rollouts judge `version` of `model` on (see [`Tally`]).
    pub(crate) fn tally(&self, model: &str, version: &str) -> Arc<Tally> {
        self.tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((model.to_string(), version.to_string()))
            .or_default()
            .clone()
    }

    /// Appends every version's tally to a text exposition (see
    /// [`tally::render`]), in a stable order.
    pub(crate) fn render_tallies(&self, out: &mut String) {
        let mut tallies: Vec<(String, String, Arc<Tally>)> = self
            .tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((m, v), t)| (m.clone(), v.clone(), t.clone()))
            .collect();
        tallies.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        tally::render(out, &tallies);
    }

    /// Runs `f` with this server's recorder as the one `metrics` macros use.
    pub(crate) fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.render()
    }
    /// Sets the build-info gauge.
    pub fn record_build_info(&self) {
        self.with(|| {
            metrics::gauge!("gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        })
    }

    /// One answered inference request.
    pub fn record_request(
        &self,
        model: &str,
        version: &str,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.with(|| {
            let labels = [
                ("model", model.to_string()),
                ("version", version.to_string()),
                ("route", route.to_string()),
            ];
            metrics::counter!(
                "gateway_requests_total",
                &[
                    labels[0].clone(),
                    labels[1].clone(),
                    labels[2].clone(),
                    ("status", status_label(status).to_string()),
                ]
            )
            .increment(1);
            metrics::histogram!("gateway_request_duration_seconds", &labels)
                .record(elapsed.as_secs_f64());
        })
    }

    /// One shadow call's outcome: `agree`, `disagree`, `error` or `dropped`.
    pub fn record_shadow(&self, model: &str, challenger: &str, result: &'static str) {
        self.with(|| {
            metrics::counter!(
                "gateway_shadow_comparisons_total",
                "model" => model.to_string(),
                "version" => challenger.to_string(),
                "result" => result
            )
            .increment(1);
        })
    }

    /// A rollout's decision (`outcome`, and the `gate` that failed or
    /// empty), and where it now stands.
    /// One decision of a rollout.
    pub(crate) fn count_rollout(&self, model: &str, outcome: &'static str, gate: &str) {
        self.with(|| {
            metrics::counter!(
                "gateway_rollout_decisions_total",
                "model" => model.to_string(),
                "outcome" => outcome,
                "gate" => gate.to_string()
            )
            .increment(1);
        });
    }

    /// A rollout ended: its gauges go to zero.
    pub(crate) fn end_rollout(&self, model: &str) {
        self.set_rollout(model, 0.0, 0.0, None);
    }

    /// A rollout's gauges: its step, percent, and 1 for its status.
    pub(crate) fn set_rollout(&self, model: &str, step: f64, percent: f64, status: Option<&str>) {
        self.with(|| {
            metrics::gauge!("gateway_rollout_step", "model" => model.to_string()).set(step);
            metrics::gauge!("gateway_rollout_percent", "model" => model.to_string()).set(percent);
            for s in ["running", "paused", "failed", "promoted"] {
                metrics::gauge!(
                    "gateway_rollout_status",
                    "model" => model.to_string(),
                    "status" => s
                )
                .set(if Some(s) == status { 1.0 } else { 0.0 });
            }
        })
    }

    /// `n` pieces of ground truth for `model` that came to `outcome`
    /// (`joined`, `late`, `unknown`, `duplicate`, `rows_mismatch`).
    pub(crate) fn record_feedback(&self, model: &str, outcome: &'static str, n: u64) {
        self.with(|| {
            metrics::counter!(
                "gateway_feedback_total",
                "model" => model.to_string(),
                "outcome" => outcome
            )
            .increment(n);
        })
    }

    /// Rows a version answered, judged against their true labels: how
    /// many were right and how many wrong.
    pub(crate) fn record_truth(
        &self,
        model: &str,
        version: &str,
        route: &'static str,
        correct: u64,
        wrong: u64,
    ) {
        match route {
            "champion" | "canary" => self.tally(model, version).judged(correct, wrong),
            "control" => self.tally(model, CONTROL_TALLY).judged(correct, wrong),
            _ => {}
        }
        self.with(|| {
            for (outcome, n) in [("correct", correct), ("wrong", wrong)] {
                if n > 0 {
                    metrics::counter!(
                        "gateway_ground_truth_total",
                        "model" => model.to_string(),
                        "version" => version.to_string(),
                        "route" => route,
                        "outcome" => outcome
                    )
                    .increment(n);
                }
            }
        })
    }

    /// `n` rows `version` predicted `predicted` whose truth was `actual`.
    pub(crate) fn record_confusion(
        &self,
        model: &str,
        version: &str,
        predicted: &str,
        actual: &str,
        n: u64,
    ) {
        self.with(|| {
            metrics::counter!(
                "gateway_confusion_total",
                "model" => model.to_string(),
                "version" => version.to_string(),
                "predicted" => predicted.to_string(),
                "actual" => actual.to_string()
            )
            .increment(n);
        })
    }

    /// One broken rule of a request's inputs, `n` times.
    pub fn record_validation_failure(
        &self,
        model: &str,
        version: &str,
        input: &str,
        feature: &str,
        rule: &'static str,
        n: u64,
    ) {
        self.with(|| {
            metrics::counter!(
                "gateway_validation_failures_total",
                "model" => model.to_string(),
                "version" => version.to_string(),
                "input" => input.to_string(),
                "feature" => feature.to_string(),
                "rule" => rule
            )
            .increment(n);
        })
    }

    /// A reload attempt.
    pub fn record_reload(&self, outcome: &'static str, trigger: &'static str) {
        self.with(|| {
                metrics::counter!("gateway_policy_reloads_total", "outcome" => outcome, "trigger" => trigger)
                    .increment(1);
        })
    }

    /// The snapshot now serving.
    pub fn record_generation(&self, generation: u64) {
        self.with(|| {
            metrics::gauge!("gateway_policy_generation").set(generation as f64);
        })
    }

    /// A model's canary share (0 when it has none).
    pub fn record_canary_percent(&self, model: &str, version: &str, percent: f64) {
        self.with(|| {
            metrics::gauge!(
                "gateway_canary_percent",
                "model" => model.to_string(),
                "version" => version.to_string()
            )
            .set(percent);
        })
    }

    /// A plugin compiled.
    pub fn record_plugin_compiled(&self) {
        self.with(|| {
            metrics::counter!("gateway_plugin_compilations_total").increment(1);
        })
    }

    /// A plugin's compiled form came from the compile cache.
    pub fn record_plugin_cached(&self) {
        self.with(|| {
            metrics::counter!("gateway_plugin_compile_cache_hits_total").increment(1);
        })
    }

    /// A version's circuit breaker opened (`true`) or closed.
    pub fn record_circuit(&self, model: &str, version: &str, open: bool) {
        self.with(|| {
                let (model, version) = (model.to_string(), version.to_string());
                metrics::gauge!("gateway_circuit_open", "model" => model.clone(), "version" => version.clone())
                    .set(if open { 1.0 } else { 0.0 });
                metrics::counter!(
                    "gateway_circuit_transitions_total",
                    "model" => model,
                    "version" => version,
                    "state" => if open { "open" } else { "closed" }
                )
                .increment(1);
        })
    }

    /// A request a version refused without running it.
    pub fn record_refused(&self, model: &str, version: &str, reason: &'static str) {
        self.with(|| {
            metrics::counter!(
                "gateway_refused_total",
                "model" => model.to_string(),
                "version" => version.to_string(),
                "reason" => reason
            )
            .increment(1);
        })
    }

    /// One failed plugin call.
    pub fn record_plugin_error(&self, model: &str, version: &str, kind: &'static str) {
        self.with(|| {
            metrics::counter!(
                "gateway_plugin_errors_total",
                "model" => model.to_string(),
                "version" => version.to_string(),
                "kind" => kind
            )
            .increment(1);
        })
    }

    /// A connection closed at accept: `reason` is the cap it was over.
    pub fn record_connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.with(|| {
            metrics::counter!(
                "gateway_connections_refused_total",
                "listener" => listener,
                "reason" => reason
            )
            .increment(1);
        })
    }

    /// A TLS handshake that failed or timed out.
    pub fn record_tls_handshake_failure(&self) {
        self.with(|| {
            metrics::counter!("gateway_tls_handshake_failures_total").increment(1);
        })
    }

    /// A certificate reload, loaded or refused.
    pub fn record_tls_reload(&self, ok: bool) {
        self.with(|| {
            metrics::counter!(
                "gateway_tls_reloads_total",
                "outcome" => if ok { "loaded" } else { "refused" }
            )
            .increment(1);
        })
    }

    /// Whether the policy folder is being watched.
    pub fn record_watching(&self, up: bool) {
        self.with(|| {
            metrics::gauge!("gateway_policy_watch_up").set(if up { 1.0 } else { 0.0 });
        })
    }

    /// A refused admin request: `wrong_token` or `rate_limited`.
    pub fn record_admin_auth_failure(&self, reason: &'static str) {
        self.with(|| {
            metrics::counter!("gateway_admin_auth_failures_total", "reason" => reason).increment(1);
        })
    }

    /// A request refused before it reached a model.
    pub fn record_http_error(&self, status: u16) {
        self.with(|| {
            metrics::counter!("gateway_http_errors_total", "status" => status_label(status))
                .increment(1);
        })
    }
}

fn describe() {
    metrics::describe_counter!(
        "gateway_feedback_total",
        "Ground truth received, by what became of it"
    );
    metrics::describe_counter!(
        "gateway_ground_truth_total",
        "Rows a version answered, judged against their true label"
    );
    metrics::describe_counter!(
        "gateway_confusion_total",
        "Rows a version answered, by predicted and true label"
    );
    metrics::describe_counter!(
        "gateway_rollout_decisions_total",
        "Rollout decisions, by outcome and the gate that failed"
    );
    metrics::describe_gauge!(
        "gateway_rollout_step",
        "The step a model's rollout is at (1 is the first)"
    );
    metrics::describe_gauge!(
        "gateway_rollout_percent",
        "The share of unpinned traffic a model's rollout candidate serves"
    );
    metrics::describe_gauge!(
        "gateway_rollout_status",
        "1 for the status a model's rollout is in (running, paused, failed, promoted)"
    );
    metrics::describe_gauge!(
        "gateway_policy_watch_up",
        "1 while the policy folder is watched for changes, 0 while it cannot be"
    );
    metrics::describe_counter!(
        "gateway_connections_refused_total",
        "Connections closed at accept, by listener and the cap they were over"
    );
    metrics::describe_counter!(
        "gateway_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out"
    );
    metrics::describe_counter!(
        "gateway_tls_reloads_total",
        "Certificate reloads after their files changed, by outcome"
    );
    metrics::describe_counter!(
        "gateway_admin_auth_failures_total",
        "Admin requests refused for a wrong or missing token, or rate-limited"
    );
    metrics::describe_counter!(
        "gateway_requests_total",
        "Inference requests answered, by model, version, route and HTTP status"
    );
    metrics::describe_histogram!(
        "gateway_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from receiving an inference request to its response, by model, version and route"
    );
    metrics::describe_histogram!(
        "gateway_plugin_duration_seconds",
        metrics::Unit::Seconds,
        "Time inside a plugin call (fresh sandbox plus infer), by model and version"
    );
    metrics::describe_counter!(
        "gateway_plugin_errors_total",
        "Failed plugin calls, by model, version and kind of failure"
    );
    metrics::describe_counter!(
        "gateway_http_errors_total",
        "Requests refused before reaching a model (bad path, oversized or slow body), by status"
    );
    metrics::describe_gauge!(
        "gateway_build_info",
        "Always 1; labels carry the gateway version"
    );
    metrics::describe_counter!(
        "gateway_shadow_comparisons_total",
        "Shadow calls by model, challenger version and result (agree, disagree, error, dropped)"
    );
    metrics::describe_counter!(
        "gateway_predictions_total",
        "Predicted labels by model, version and label (at most 32 labels per version; more count as _other)"
    );
    metrics::describe_counter!(
        "gateway_validation_failures_total",
        "Broken input rules (refused, or served in flag mode), by model, version, input, feature and rule"
    );
    metrics::describe_counter!(
        "gateway_policy_reloads_total",
        "Policy reloads by outcome (success, error) and trigger (file, signal, admin)"
    );
    metrics::describe_gauge!(
        "gateway_policy_generation",
        "Generation of the policies being served: 1 at start, +1 per applied reload"
    );
    metrics::describe_gauge!(
        "gateway_canary_percent",
        "Percent of a model's unpinned traffic routed to its canary version"
    );
    metrics::describe_gauge!(
        "gateway_circuit_open",
        "1 while a version's circuit breaker is open (its requests get a fast 503), else 0"
    );
    metrics::describe_counter!(
        "gateway_circuit_transitions_total",
        "Circuit breaker transitions by model, version and state entered (open, closed)"
    );
    metrics::describe_counter!(
        "gateway_refused_total",
        "Requests a version refused without running them, by model, version and reason (queue_full, queue_timeout, circuit_open, sandbox_memory, bytes_in_flight, bulk_queue)"
    );
    metrics::describe_counter!(
        "gateway_plugin_compilations_total",
        "Plugin components compiled (at start, and by reloads for changed files only)"
    );
}

/// Text from a plugin or a request, made safe for a log line or an error
/// message: control characters (line breaks included) escaped, at most
/// [`MAX_ECHOED`] bytes, so nobody can forge a log line or make the
/// gateway repeat a megabyte.
pub(crate) struct Escaped<'a>(pub &'a str);

/// Bytes of outside text echoed in one message or log field.
pub(crate) const MAX_ECHOED: usize = 4096;

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let text = self.0;
        let mut end = text.len().min(MAX_ECHOED);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for c in text[..end].chars() {
            if c.is_control() {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else {
                f.write_char(c)?;
            }
        }
        if end < text.len() {
            write!(f, "... ({} more bytes)", text.len() - end)?;
        }
        Ok(())
    }
}

/// A label value as the Prometheus text format writes it (backslash,
/// quote and line feed escaped).
pub(crate) fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// [`Escaped`] as an owned string (for errors that outlive the text).
pub(crate) fn escape(text: &str) -> String {
    Escaped(text).to_string()
}

/// Lets one log line through per second and counts the others, so a plugin
/// failing on every request cannot flood the logs.
#[derive(Default)]
pub struct LogLimiter {
    /// Milliseconds since [`epoch`] before which lines are suppressed.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

const LOG_INTERVAL_MS: u64 = 1000;

impl LogLimiter {
    /// `Some(n)` when a line may be logged now; `n` lines were suppressed
    /// since the previous one.
    pub fn check(&self) -> Option<u64> {
        let now = epoch().elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL_MS,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Lets up to `per_second` lines through in each second and counts the
/// others, which the next line let through reports (the access log).
pub(crate) struct RateLimiter {
    per_second: u64,
    /// The second (since [`epoch`]) in the upper 32 bits, the lines let
    /// through in it in the lower 32.
    window: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimiter {
    pub(crate) fn new(per_second: u32) -> Self {
        RateLimiter {
            per_second: u64::from(per_second),
            window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now; `n` lines were suppressed
    /// since the previous one.
    pub(crate) fn check(&self) -> Option<u64> {
        let second = epoch().elapsed().as_secs() & 0xffff_ffff;
        let mut window = self.window.load(Ordering::Relaxed);
        loop {
            let count = if window >> 32 == second {
                window & 0xffff_ffff
            } else {
                0
            };
            if count >= self.per_second {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.window.compare_exchange_weak(
                window,
                second << 32 | (count + 1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::AcqRel)),
                Err(now) => window = now,
            }
        }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Status codes as static strings (no allocation per request).
pub(crate) fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        431 => "431",
        429 => "429",
        500 => "500",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_text_is_escaped_and_truncated() {
        assert_eq!(escape("a\nb\r\u{1b}[31m"), "a\\nb\\r\\u{1b}[31m");
        let long = "é".repeat(3000);
        let shown = escape(&long);
        assert!(shown.len() < MAX_ECHOED + 40, "{}", shown.len());
        assert!(
            shown.ends_with("... (1904 more bytes)"),
            "{}",
            &shown[shown.len() - 30..]
        );
    }

    #[test]
    fn log_limiter_lets_one_line_through_per_interval() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        // Pretend the interval has passed.
        limiter.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limiter.check(), Some(2));
    }

    #[test]
    fn rate_limiter_lets_n_lines_through_per_second() {
        let limiter = RateLimiter::new(3);
        // Within one second (a new window is forced below).
        let now = epoch().elapsed().as_secs() & 0xffff_ffff;
        limiter.window.store(now << 32, Ordering::Relaxed);
        let seen: Vec<Option<u64>> = (0..5).map(|_| limiter.check()).collect();
        if epoch().elapsed().as_secs() & 0xffff_ffff == now {
            assert_eq!(seen, [Some(0), Some(0), Some(0), None, None]);
        }
        // The next second: the suppressed lines are reported.
        limiter.window.store(0, Ordering::Relaxed);
        assert!(limiter.check().is_some_and(|n| n <= 2));
    }
}
