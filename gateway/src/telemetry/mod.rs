//! Metrics and the events that feed them. Owns the Prometheus recorder (one
//! per process) and the metric names; every metric is recorded through a
//! function here so names and labels stay consistent.
//!
//! Label values come from policies (model, version) or from a fixed set
//! (route, status, kind), never from request text: a client naming unknown
//! models cannot grow the number of series.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Label value for requests that never reached a known model.
pub const UNKNOWN: &str = "_unknown";

const DURATION_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(DURATION_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a host embedding the
        // library); then this one only renders what it is given.
        let _ = metrics::set_global_recorder(recorder);
        let upkeep = handle.clone();
        let _ = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
        describe();
        handle.clone()
    })
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    handle().render()
}

fn describe() {
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
}

/// Sets the build-info gauge.
pub fn record_build_info() {
    metrics::gauge!("gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// One answered inference request.
pub fn record_request(
    model: &str,
    version: &str,
    route: &'static str,
    status: u16,
    elapsed: Duration,
) {
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
    metrics::histogram!("gateway_request_duration_seconds", &labels).record(elapsed.as_secs_f64());
}

/// One plugin call's time, successful or not.
pub fn record_plugin_call(model: &str, version: &str, elapsed: Duration) {
    metrics::histogram!(
        "gateway_plugin_duration_seconds",
        "model" => model.to_string(),
        "version" => version.to_string()
    )
    .record(elapsed.as_secs_f64());
}

/// One failed plugin call.
pub fn record_plugin_error(model: &str, version: &str, kind: &'static str) {
    metrics::counter!(
        "gateway_plugin_errors_total",
        "model" => model.to_string(),
        "version" => version.to_string(),
        "kind" => kind
    )
    .increment(1);
}

/// A request refused before it reached a model.
pub fn record_http_error(status: u16) {
    metrics::counter!("gateway_http_errors_total", "status" => status_label(status)).increment(1);
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

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Status codes as static strings (no allocation per request).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
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
    fn log_limiter_lets_one_line_through_per_interval() {
        let limiter = LogLimiter::default();
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        // Pretend the interval has passed.
        limiter.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(limiter.check(), Some(2));
    }
}
