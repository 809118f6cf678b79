//! The series a version updates on every answered request.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use super::Route;
use crate::telemetry::{Telemetry, status_label};
use crate::tensor::Tensor;

/// The label value standing for labels past [`MAX_LABELS`] (the same
/// name and number as a rollout's tally counts with).
pub(super) const OTHER: &str = crate::telemetry::OTHER_LABEL;

/// Distinct label values one version may add to the metrics.
pub(super) const MAX_LABELS: usize = crate::telemetry::LABELS;

/// The series a version updates on every answered request, registered on
/// first use and then only updated. Registering allocates every label and
/// looks the series up in the registry: done per request, it was 4 % of
/// all CPU at 64 connections (`cargo bench --bench load`).
pub struct VersionMetrics {
    /// The server's metrics the handles are registered with.
    telemetry: Arc<Telemetry>,
    /// `gateway_requests_total{status="200"}` and the request histogram,
    /// by route (in [`Route`] order).
    answered: [OnceLock<(Counter, Histogram)>; 5],
    plugin_duration: OnceLock<Histogram>,
    /// `gateway_predictions_total`, by label: the first [`MAX_LABELS`]
    /// distinct labels, lock-free to read; later ones count as [`OTHER`].
    labels: arc_swap::ArcSwap<Vec<(Box<str>, Counter)>>,
    other: OnceLock<Counter>,
    /// What a rollout judges the version on.
    tally: Arc<crate::telemetry::Tally>,
    /// The model's control group's (whichever version holds it).
    control_tally: Arc<crate::telemetry::Tally>,
}

impl VersionMetrics {
    pub(crate) fn new(
        telemetry: Arc<Telemetry>,
        tally: Arc<crate::telemetry::Tally>,
        control_tally: Arc<crate::telemetry::Tally>,
    ) -> Self {
        VersionMetrics {
            telemetry,
            tally,
            control_tally,
            answered: Default::default(),
            plugin_duration: OnceLock::new(),
            labels: Default::default(),
            other: OnceLock::new(),
        }
    }

    /// The server's metrics.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// What a rollout judges the version on.
    pub(crate) fn tally(&self) -> &crate::telemetry::Tally {
        &self.tally
    }

    /// One request this version answered with `status`: a 200 through the
    /// version's own handles, anything else through [`record_request`].
    pub fn request(
        &self,
        model: &str,
        version: &str,
        route: Route,
        status: u16,
        fault: bool,
        elapsed: Duration,
    ) {
        match route {
            Route::Champion | Route::Canary => self.tally.request(status, fault, elapsed),
            Route::Control => self.control_tally.request(status, fault, elapsed),
            Route::Pinned | Route::Shadow => {}
        }
        if status != 200 {
            return self
                .telemetry
                .record_request(model, version, route.as_str(), status, elapsed);
        }
        let at = match route {
            Route::Champion => 0,
            Route::Canary => 1,
            Route::Pinned => 2,
            Route::Shadow => 3,
            Route::Control => 4,
        };
        let (count, duration) = self.answered[at].get_or_init(|| {
            self.telemetry.with(|| {
                let labels = [
                    ("model", model.to_string()),
                    ("version", version.to_string()),
                    ("route", route.as_str().to_string()),
                ];
                let count = metrics::counter!(
                    "gateway_requests_total",
                    &[
                        labels[0].clone(),
                        labels[1].clone(),
                        labels[2].clone(),
                        ("status", status_label(200).to_string()),
                    ]
                );
                (
                    count,
                    metrics::histogram!("gateway_request_duration_seconds", &labels),
                )
            })
        });
        count.increment(1);
        duration.record(elapsed.as_secs_f64());
    }

    /// One plugin call's time, successful or not.
    pub fn plugin_call(&self, model: &str, version: &str, elapsed: Duration) {
        self.plugin_duration
            .get_or_init(|| {
                self.telemetry.with(|| {
                    metrics::histogram!(
                        "gateway_plugin_duration_seconds",
                        "model" => model.to_string(),
                        "version" => version.to_string()
                    )
                })
            })
            .record(elapsed.as_secs_f64());
    }

    /// Counts the predicted labels (a BYTES tensor) by value: linear in the
    /// rows whatever the plugin returns. At most [`MAX_LABELS`] distinct
    /// values are told apart per call (the series a version may have);
    /// the rest count as [`OTHER`] without a lookup.
    pub fn predictions(&self, model: &str, version: &str, route: Route, labels: &Tensor) {
        let tally = match route {
            Route::Champion | Route::Canary => Some(&self.tally),
            Route::Control => Some(&self.control_tally),
            Route::Pinned | Route::Shadow => None,
        };
        let mut counts: Vec<(&[u8], u64)> = Vec::new();
        let mut other = 0u64;
        for element in crate::tensor::bytes_elements(&labels.data).map_while(Result::ok) {
            match counts.iter().position(|(l, _)| *l == element) {
                Some(at) => counts[at].1 += 1,
                None if counts.len() < MAX_LABELS => counts.push((element, 1)),
                None => other += 1,
            }
        }
        for (label, n) in counts {
            let label = String::from_utf8_lossy(label);
            self.label_counter(model, version, &label).increment(n);
            if let Some(tally) = tally {
                tally.predicted(&label, n);
            }
        }
        if other > 0 {
            self.other_counter(model, version).increment(other);
            if let Some(tally) = tally {
                tally.predicted(OTHER, other);
            }
        }
    }

    fn other_counter(&self, model: &str, version: &str) -> &Counter {
        self.other.get_or_init(|| {
            self.telemetry.with(|| {
                metrics::counter!(
                    "gateway_predictions_total",
                    "model" => model.to_string(),
                    "version" => version.to_string(),
                    "label" => OTHER
                )
            })
        })
    }

    fn label_counter(&self, model: &str, version: &str, label: &str) -> Counter {
        let register = |label: &str| {
            self.telemetry.with(|| {
                metrics::counter!(
                    "gateway_predictions_total",
                    "model" => model.to_string(),
                    "version" => version.to_string(),
                    "label" => label.to_string()
                )
            })
        };
        let known = self.labels.load();
        if let Some((_, counter)) = known.iter().find(|(l, _)| &**l == label) {
            return counter.clone();
        }
        if known.len() < MAX_LABELS {
            let counter = register(label);
            self.labels.rcu(|old| {
                let mut next = Vec::clone(old);
                if next.len() < MAX_LABELS && !next.iter().any(|(l, _)| &**l == label) {
                    next.push((label.into(), counter.clone()));
                }
                next
            });
            if let Some((_, counter)) = self.labels.load().iter().find(|(l, _)| &**l == label) {
                return counter.clone();
            }
        }
        self.other_counter(model, version).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_labels_are_bounded() {
        let m = VersionMetrics::new(Telemetry::new(), Default::default(), Default::default());
        for i in 0..MAX_LABELS {
            let _ = m.label_counter("m", "v", &format!("l{i}"));
        }
        let _ = m.label_counter("m", "v", "l0");
        let _ = m.label_counter("m", "v", "one-too-many");
        let labels = m.labels.load();
        assert_eq!(labels.len(), MAX_LABELS);
        assert!(labels.iter().any(|(l, _)| &**l == "l0"));
        assert!(!labels.iter().any(|(l, _)| &**l == "one-too-many"));
        assert!(m.other.get().is_some());
    }

    #[test]
    fn many_distinct_labels_are_counted_in_linear_time() {
        let m = VersionMetrics::new(Telemetry::new(), Default::default(), Default::default());
        let names: Vec<String> = (0..200_000u32).map(|i| i.to_string()).collect();
        let labels = crate::tensor::bytes_tensor("label", &names);
        m.predictions("m", "v", Route::Champion, &labels);
        assert_eq!(m.labels.load().len(), MAX_LABELS);
    }
}
