//! What a rollout judges a version on, counted in the process: the
//! requests it served (as champion or canary), its failures, its latency
//! distribution, its shadow comparisons and its ground truth. Plain atomic
//! counters that only grow; a rollout takes the difference of two reads
//! as the window of a step. One [`Tally`] per model and version, kept by
//! [`super::Telemetry`] across reloads, so a rebuilt version keeps
//! counting where it was.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets: bucket `i` holds latencies up to `FIRST_US * GROWTH^i`
/// microseconds, the last one everything longer (about 100 µs to 30 s).
pub(crate) const BUCKETS: usize = 48;
const FIRST_US: f64 = 100.0;
const GROWTH: f64 = 1.3;

/// One version's counts (see the module docs).
#[derive(Debug)]
pub(crate) struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    /// Every latency counted, added up in microseconds (for the exported
    /// histogram's `_sum`).
    latency_us: AtomicU64,
    agree: AtomicU64,
    disagree: AtomicU64,
    correct: AtomicU64,
    wrong: AtomicU64,
    /// The labels it predicted: the first [`LABELS`] distinct ones by
    /// name (append-only, so a read's counts line up with an earlier
    /// read's), the rest together as [`OTHER_LABEL`].
    label_names: arc_swap::ArcSwap<Vec<Box<str>>>,
    label_counts: [AtomicU64; LABELS + 1],
}

/// Distinct predicted labels a tally tells apart.
pub(crate) const LABELS: usize = 32;

/// The longest label told apart; longer ones count as [`OTHER_LABEL`].
pub(crate) const MAX_LABEL_BYTES: usize = 128;

/// The name the labels past [`LABELS`] are counted under.
pub(crate) const OTHER_LABEL: &str = "_other";

impl Default for Tally {
    fn default() -> Self {
        Tally {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_us: AtomicU64::new(0),
            agree: AtomicU64::new(0),
            disagree: AtomicU64::new(0),
            correct: AtomicU64::new(0),
            wrong: AtomicU64::new(0),
            label_names: Default::default(),
            label_counts: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A read of a [`Tally`], or the difference of two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Requests answered, but for 4xx of the client's own.
    pub(crate) requests: u64,
    /// Of them, the ones the version failed (5xx, or a plugin that
    /// refused its inputs).
    pub(crate) errors: u64,
    pub(crate) latency: [u64; BUCKETS],
    pub(crate) agree: u64,
    pub(crate) disagree: u64,
    pub(crate) correct: u64,
    pub(crate) wrong: u64,
    /// Rows predicted, by label.
    pub(crate) predicted: std::collections::BTreeMap<String, u64>,
    /// Values of each monitored feature (`input/feature`) in each bin of
    /// its reference (filled by the reader from the version's monitor).
    pub(crate) inputs: std::collections::BTreeMap<String, Vec<u64>>,
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
            agree: 0,
            disagree: 0,
            correct: 0,
            wrong: 0,
            predicted: Default::default(),
            inputs: Default::default(),
        }
    }
}

impl Tally {
    /// A served request (champion or canary route) answered with `status`
    /// in `elapsed`; `fault` when the version failed it (a 5xx, or a
    /// plugin that refused its inputs). A 4xx of the client's own (its
    /// request broke a rule before any version saw it) judges no version.
    pub(crate) fn request(&self, status: u16, fault: bool, elapsed: Duration) {
        if (400..500).contains(&status) && !fault {
            return;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        if fault {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.latency_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A shadow copy compared with the served answer (one that failed
    /// counts as not agreeing).
    pub(crate) fn compared(&self, agreed: bool) {
        let counter = if agreed { &self.agree } else { &self.disagree };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Rows of served answers judged against their ground truth.
    pub(crate) fn judged(&self, correct: u64, wrong: u64) {
        self.correct.fetch_add(correct, Ordering::Relaxed);
        self.wrong.fetch_add(wrong, Ordering::Relaxed);
    }

    /// `n` rows predicted `label` by a served answer.
    pub(crate) fn predicted(&self, label: &str, n: u64) {
        // A label is named by a plugin: a long one counts with the rest.
        if label == OTHER_LABEL || label.len() > MAX_LABEL_BYTES {
            self.label_counts[LABELS].fetch_add(n, Ordering::Relaxed);
            return;
        }
        let slot = |names: &[Box<str>]| names.iter().position(|l| &**l == label);
        let mut at = slot(&self.label_names.load());
        if at.is_none() && self.label_names.load().len() < LABELS {
            self.label_names.rcu(|old| {
                let mut next = Vec::clone(old);
                if next.len() < LABELS && !next.iter().any(|l| &**l == label) {
                    next.push(label.into());
                }
                next
            });
            at = slot(&self.label_names.load());
        }
        self.label_counts[at.unwrap_or(LABELS)].fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) -> Counts {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let names = self.label_names.load();
        let mut predicted: std::collections::BTreeMap<String, u64> = names
            .iter()
            .zip(&self.label_counts)
            .map(|(name, n)| (name.to_string(), load(n)))
            .collect();
        let other = load(&self.label_counts[LABELS]);
        if other > 0 {
            predicted.insert(OTHER_LABEL.into(), other);
        }
        Counts {
            requests: load(&self.requests),
            errors: load(&self.errors),
            latency: std::array::from_fn(|i| load(&self.latency[i])),
            agree: load(&self.agree),
            disagree: load(&self.disagree),
            correct: load(&self.correct),
            wrong: load(&self.wrong),
            predicted,
            inputs: Default::default(),
        }
    }
}

/// Appends every tally to a Prometheus text exposition, one family at a
/// time, for a fleet's rollouts to judge from Prometheus (see
/// `rollout::fleet`): `gateway_gate_requests_total`, `_errors_total`,
/// `gateway_gate_duration_seconds` (a histogram on the tally's own
/// buckets), `gateway_gate_shadow_total{result}` and
/// `gateway_gate_truth_total{result}`, by model and version (the control
/// group as `@control`).
pub(crate) fn render(out: &mut String, tallies: &[(String, String, Arc<Tally>)]) {
    use std::fmt::Write as _;
    if tallies.is_empty() {
        return;
    }
    let reads: Vec<(String, Counts, u64)> = tallies
        .iter()
        .map(|(model, version, tally)| {
            let labels = format!(
                "model=\"{}\",version=\"{}\"",
                super::label(model),
                super::label(version)
            );
            (
                labels,
                tally.read(),
                tally.latency_us.load(Ordering::Relaxed),
            )
        })
        .collect();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(
        out,
        "gateway_gate_requests_total",
        "counter",
        "Requests a rollout judges the version on: every answer it served but a client's own 4xx",
    );
    for (labels, c, _) in &reads {
        let _ = writeln!(
            out,
            "gateway_gate_requests_total{{{labels}}} {}",
            c.requests
        );
    }
    header(
        out,
        "gateway_gate_errors_total",
        "counter",
        "Of those, the ones the version failed (a 5xx, or a plugin that refused its inputs)",
    );
    for (labels, c, _) in &reads {
        let _ = writeln!(out, "gateway_gate_errors_total{{{labels}}} {}", c.errors);
    }
    header(
        out,
        "gateway_gate_duration_seconds",
        "histogram",
        "Latency of the requests a rollout judges the version on",
    );
    for (labels, c, sum_us) in &reads {
        let mut cumulative = 0;
        for (i, n) in c.latency.iter().enumerate() {
            cumulative += n;
            match bound(i) {
                Some(le) => {
                    let _ = writeln!(
                        out,
                        "gateway_gate_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "gateway_gate_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "gateway_gate_duration_seconds_sum{{{labels}}} {}",
            *sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "gateway_gate_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
    header(
        out,
        "gateway_gate_shadow_total",
        "counter",
        "Shadow copies of the version compared with the served answer, by whether they agreed",
    );
    for (labels, c, _) in &reads {
        let _ = writeln!(
            out,
            "gateway_gate_shadow_total{{{labels},result=\"agree\"}} {}",
            c.agree
        );
        let _ = writeln!(
            out,
            "gateway_gate_shadow_total{{{labels},result=\"disagree\"}} {}",
            c.disagree
        );
    }
    header(
        out,
        "gateway_gate_predictions_total",
        "counter",
        "Rows the version predicted in the answers it served, by label",
    );
    for (labels, c, _) in &reads {
        for (label, n) in &c.predicted {
            let _ = writeln!(
                out,
                "gateway_gate_predictions_total{{{labels},label=\"{}\"}} {n}",
                super::label(label)
            );
        }
    }
    header(
        out,
        "gateway_gate_truth_total",
        "counter",
        "Rows the version answered, judged on ground truth, by whether they were right",
    );
    for (labels, c, _) in &reads {
        let _ = writeln!(
            out,
            "gateway_gate_truth_total{{{labels},result=\"correct\"}} {}",
            c.correct
        );
        let _ = writeln!(
            out,
            "gateway_gate_truth_total{{{labels},result=\"wrong\"}} {}",
            c.wrong
        );
    }
}

/// The upper bound of latency bucket `i`, in seconds; `None` for the
/// last, which holds everything longer.
pub(crate) fn bound(i: usize) -> Option<f64> {
    (i + 1 < BUCKETS).then(|| FIRST_US * GROWTH.powi(i as i32) / 1e6)
}

/// The bucket whose upper bound is `le` seconds (as [`bound`] gives it,
/// printed and read back), the last for infinity; `None` for a bound that
/// is none of them.
pub(crate) fn bucket_of_bound(le: f64) -> Option<usize> {
    if le.is_infinite() && le > 0.0 {
        return Some(BUCKETS - 1);
    }
    let i = (le * 1e6 / FIRST_US).ln() / GROWTH.ln();
    let rounded = i.round();
    ((i - rounded).abs() < 1e-6 && rounded >= 0.0 && (rounded as usize) + 1 < BUCKETS)
        .then_some(rounded as usize)
}

/// The bucket of a latency.
fn bucket(elapsed: Duration) -> usize {
    let us = elapsed.as_secs_f64() * 1e6;
    if us <= FIRST_US {
        return 0;
    }
    ((us / FIRST_US).ln() / GROWTH.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

impl Counts {
    /// What was counted after `earlier` (a read of the same tally; a
    /// counter that went backwards counts from zero).
    pub(crate) fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
            agree: self.agree.saturating_sub(earlier.agree),
            disagree: self.disagree.saturating_sub(earlier.disagree),
            correct: self.correct.saturating_sub(earlier.correct),
            wrong: self.wrong.saturating_sub(earlier.wrong),
            predicted: self
                .predicted
                .iter()
                .map(|(label, n)| {
                    let before = earlier.predicted.get(label).copied().unwrap_or(0);
                    (label.clone(), n.saturating_sub(before))
                })
                .collect(),
            inputs: self
                .inputs
                .iter()
                .map(|(feature, bins)| {
                    let before = earlier.inputs.get(feature);
                    let bins = bins
                        .iter()
                        .enumerate()
                        .map(|(i, n)| {
                            n.saturating_sub(before.and_then(|b| b.get(i)).copied().unwrap_or(0))
                        })
                        .collect();
                    (feature.clone(), bins)
                })
                .collect(),
        }
    }

    /// The share of requests that failed, if there were requests.
    pub(crate) fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// The 99th percentile latency (the upper bound of its bucket, within
    /// 30 %), if there were requests.
    pub(crate) fn p99(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total as f64 * 0.99).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_secs_f64(
                    FIRST_US * GROWTH.powi(i as i32) / 1e6,
                ));
            }
        }
        None
    }

    /// Requests that certainly took longer than `limit` (their bucket
    /// starts at or above it).
    pub(crate) fn slower_than(&self, limit: Duration) -> u64 {
        let limit_us = limit.as_secs_f64() * 1e6;
        self.latency
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(i, _)| FIRST_US * GROWTH.powi(*i as i32 - 1) >= limit_us)
            .map(|(_, n)| n)
            .sum()
    }

    /// Judged rows.
    pub(crate) fn judged(&self) -> u64 {
        self.correct + self.wrong
    }

    /// The share of judged rows that were right, if any were judged.
    pub(crate) fn accuracy(&self) -> Option<f64> {
        (self.judged() > 0).then(|| self.correct as f64 / self.judged() as f64)
    }

    /// Compared shadow copies.
    pub(crate) fn compared(&self) -> u64 {
        self.agree + self.disagree
    }

    /// The share of compared shadow copies that agreed, if any were.
    pub(crate) fn agreement(&self) -> Option<f64> {
        (self.compared() > 0).then(|| self.agree as f64 / self.compared() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_what_came_after_and_find_the_p99() {
        let tally = Tally::default();
        tally.request(200, false, Duration::from_millis(5));
        let start = tally.read();
        for _ in 0..97 {
            tally.request(200, false, Duration::from_micros(50));
        }
        tally.request(400, true, Duration::from_micros(50));
        tally.request(503, true, Duration::from_millis(20));
        tally.request(200, false, Duration::from_millis(20));
        tally.request(404, false, Duration::from_secs(1));
        tally.judged(3, 1);
        tally.compared(true);
        let window = tally.read().since(&start);
        assert_eq!((window.requests, window.errors), (100, 2));
        assert_eq!(window.error_rate(), Some(0.02));
        // 98 of 100 are at most 100 µs: the 99th is one of the 20 ms ones.
        let p99 = window.p99().unwrap();
        assert!(
            p99 >= Duration::from_millis(20) && p99 < Duration::from_millis(27),
            "{p99:?}"
        );
        assert_eq!(window.accuracy(), Some(0.75));
        assert_eq!(window.agreement(), Some(1.0));
        assert_eq!(Counts::default().p99(), None);
        // Two took 20 ms: certainly longer than 10 ms, maybe not than 19.
        assert_eq!(window.slower_than(Duration::from_millis(10)), 2);
        assert_eq!(window.slower_than(Duration::from_millis(25)), 0);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
