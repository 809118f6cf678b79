//! Data monitoring: what each version sees, per declared feature.
//!
//! For every feature the policy names, per version: count, mean, standard
//! deviation (Welford), min and max over all values; with a reference
//! distribution from the policy, a histogram over the reference's bins, the
//! population stability index (PSI) of a sliding window of recent values
//! against the reference, and counts of outliers (outside the reference's
//! range, or beyond `outlier_sigma` reference standard deviations).
//!
//! Memory is constant per feature; the request path takes one uncontended
//! lock per feature and does no allocation. Rendering (for `/metrics` and
//! `/admin/monitoring`) happens on scrape.

use std::fmt::Write as _;
use std::sync::Mutex;

use serde::Serialize;

use crate::policy::{Monitoring, Reference, Schema};
use crate::tensor::{self, Tensor};

/// Sub-windows the sliding window moves by.
const SLICES: usize = 4;

/// Smallest proportion used in the PSI, so an empty bin does not make it
/// infinite.
const EPSILON: f64 = 1e-4;

/// What one version has seen.
pub struct Monitor {
    features: Vec<FeatureMonitor>,
    config: Monitoring,
}

struct FeatureMonitor {
    input: String,
    feature: String,
    column: usize,
    columns: usize,
    reference: Option<Reference>,
    stats: Mutex<Stats>,
}

#[derive(Clone)]
struct Stats {
    count: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
    /// Values that were NaN or infinite (kept out of the moments).
    non_finite: u64,
    out_of_range: u64,
    beyond_sigma: u64,
    /// All-time counts per reference bin.
    bins: Vec<u64>,
    /// The sliding window: `SLICES` rings of bin counts.
    window: Vec<Vec<u64>>,
    slice: usize,
    in_slice: usize,
}

/// Values recorded per acquisition of a feature's lock.
const PER_LOCK: usize = 256;

impl Monitor {
    /// Monitors for every named feature of `schema`; `None` when there are none.
    pub fn new(schema: &Schema, config: &Monitoring) -> Option<Self> {
        let mut features = Vec::new();
        for input in &schema.inputs {
            let columns = input.features.len();
            for (column, f) in input.features.iter().enumerate() {
                let bins = f.reference.as_ref().map_or(0, |r| r.proportions.len());
                features.push(FeatureMonitor {
                    input: input.name.clone(),
                    feature: f.name.clone(),
                    column,
                    columns,
                    reference: f.reference.clone(),
                    stats: Mutex::new(Stats {
                        count: 0,
                        mean: 0.0,
                        m2: 0.0,
                        min: f64::INFINITY,
                        max: f64::NEG_INFINITY,
                        non_finite: 0,
                        out_of_range: 0,
                        beyond_sigma: 0,
                        bins: vec![0; bins],
                        window: vec![vec![0; bins]; SLICES],
                        slice: 0,
                        in_slice: 0,
                    }),
                });
            }
        }
        (!features.is_empty()).then(|| Monitor {
            features,
            config: config.clone(),
        })
    }

    /// Records the values of a served request. A feature's lock is held
    /// for at most [`PER_LOCK`] values at a time: a large request is
    /// observed on a low-priority thread (the bulk pool), which must not
    /// keep the lock from the small requests' threads for long.
    pub fn observe(&self, inputs: &[Tensor]) {
        let slice_size = (self.config.window / SLICES).max(1);
        for f in &self.features {
            let Some(t) = inputs.iter().find(|t| t.name == f.input) else {
                continue;
            };
            let record = |values: &[f64]| {
                let mut stats = f.stats.lock().unwrap_or_else(|e| e.into_inner());
                for &v in values {
                    stats.observe(
                        v,
                        f.reference.as_ref(),
                        self.config.outlier_sigma,
                        slice_size,
                    );
                }
            };
            let mut buffer = [0.0; PER_LOCK];
            let mut held = 0;
            tensor::each_number(t, f.column, f.columns, |_, v| {
                buffer[held] = v;
                held += 1;
                if held == PER_LOCK {
                    record(&buffer);
                    held = 0;
                }
            });
            if held > 0 {
                record(&buffer[..held]);
            }
        }
    }

    /// A snapshot of every feature, for rendering.
    pub fn summaries(&self) -> Vec<FeatureSummary> {
        self.features
            .iter()
            .map(|f| {
                let s = f.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let (finite, psi) = (s.count > 0, f.reference.as_ref().and_then(|r| s.psi(r)));
                FeatureSummary {
                    input: f.input.clone(),
                    feature: f.feature.clone(),
                    count: s.count,
                    mean: finite.then_some(s.mean),
                    stddev: (s.count > 1).then(|| (s.m2 / (s.count - 1) as f64).sqrt()),
                    min: finite.then_some(s.min),
                    max: finite.then_some(s.max),
                    non_finite: s.non_finite,
                    out_of_range: s.out_of_range,
                    beyond_sigma: s.beyond_sigma,
                    psi,
                    drifting: psi.is_some_and(|p| p > self.config.drift_threshold),
                    histogram: f.reference.as_ref().map(|r| Histogram {
                        edges: r.edges.clone(),
                        reference: r.proportions.clone(),
                        counts: s.bins.clone(),
                    }),
                }
            })
            .collect()
    }

    /// Every feature with a reference: `input/feature` and the values
    /// seen in each of the reference's bins, all time.
    pub(crate) fn bins(&self) -> Vec<(String, Vec<u64>)> {
        self.features
            .iter()
            .filter(|f| f.reference.is_some())
            .map(|f| {
                let stats = f.stats.lock().unwrap_or_else(|e| e.into_inner());
                (format!("{}/{}", f.input, f.feature), stats.bins.clone())
            })
            .collect()
    }

    pub fn config(&self) -> &Monitoring {
        &self.config
    }
}

impl Stats {
    fn observe(&mut self, v: f64, reference: Option<&Reference>, sigma: f64, slice_size: usize) {
        if !v.is_finite() {
            self.non_finite += 1;
            return;
        }
        self.count += 1;
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        let Some(r) = reference else { return };
        let (lo, hi) = (r.edges[0], r.edges[r.edges.len() - 1]);
        if v < lo || v > hi {
            self.out_of_range += 1;
        }
        if let (Some(mean), Some(std)) = (r.mean, r.std)
            && std > 0.0
            && (v - mean).abs() > sigma * std
        {
            self.beyond_sigma += 1;
        }
        // Bin i holds [edges[i], edges[i + 1]); values outside the reference
        // range go to the first or last bin.
        let bin = r.edges[1..r.edges.len() - 1].partition_point(|&e| e <= v);
        self.bins[bin] += 1;
        if self.in_slice == slice_size {
            self.slice = (self.slice + 1) % SLICES;
            self.window[self.slice].iter_mut().for_each(|c| *c = 0);
            self.in_slice = 0;
        }
        self.window[self.slice][bin] += 1;
        self.in_slice += 1;
    }

    /// PSI of the sliding window against the reference; `None` until the
    /// window holds a full slice.
    fn psi(&self, r: &Reference) -> Option<f64> {
        let counts: Vec<u64> = (0..r.proportions.len())
            .map(|b| self.window.iter().map(|w| w[b]).sum())
            .collect();
        let total: u64 = counts.iter().sum();
        let filled = self
            .window
            .iter()
            .filter(|w| w.iter().sum::<u64>() > 0)
            .count();
        if total == 0 || (filled < 2 && self.in_slice < 8) {
            return None;
        }
        Some(psi(&counts, &r.proportions))
    }
}

/// Population stability index of observed counts against expected
/// proportions: sum of (a - e) ln(a / e), with proportions floored at 1e-4.
pub(crate) fn psi(counts: &[u64], expected: &[f64]) -> f64 {
    let total = counts.iter().sum::<u64>().max(1) as f64;
    counts
        .iter()
        .zip(expected)
        .map(|(&c, &e)| {
            let a = (c as f64 / total).max(EPSILON);
            let e = e.max(EPSILON);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// One feature's numbers.
#[derive(Serialize, Clone, Debug)]
pub struct FeatureSummary {
    pub input: String,
    pub feature: String,
    pub count: u64,
    pub mean: Option<f64>,
    pub stddev: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub non_finite: u64,
    pub out_of_range: u64,
    pub beyond_sigma: u64,
    /// PSI of the recent window against the reference.
    pub psi: Option<f64>,
    /// `psi` above the policy's `drift_threshold`.
    pub drifting: bool,
    pub histogram: Option<Histogram>,
}

#[derive(Serialize, Clone, Debug)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub reference: Vec<f64>,
    pub counts: Vec<u64>,
}

/// One version's summaries, for rendering.
pub(crate) struct VersionSummaries<'a> {
    pub model: &'a str,
    pub version: &'a str,
    pub features: Vec<FeatureSummary>,
}

/// Appends the Prometheus exposition of every version's features to `out`,
/// one metric family at a time (the text format wants each family's lines
/// together).
pub(crate) fn render(out: &mut String, versions: &[VersionSummaries<'_>]) {
    let rows: Vec<(String, &FeatureSummary)> = versions
        .iter()
        .flat_map(|v| {
            v.features.iter().map(move |s| {
                let labels = format!(
                    "model=\"{}\",version=\"{}\",input=\"{}\",feature=\"{}\"",
                    escape(v.model),
                    escape(v.version),
                    escape(&s.input),
                    escape(&s.feature)
                );
                (labels, s)
            })
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(
        out,
        "gateway_feature_observations_total",
        "counter",
        "Finite values seen per model, version, input and feature",
    );
    for (labels, s) in &rows {
        let _ = writeln!(
            out,
            "gateway_feature_observations_total{{{labels}}} {}",
            s.count
        );
    }
    type Gauge = (
        &'static str,
        &'static str,
        fn(&FeatureSummary) -> Option<f64>,
    );
    let gauges: [Gauge; 5] = [
        ("gateway_feature_mean", "Mean of the values seen", |s| {
            s.mean
        }),
        (
            "gateway_feature_stddev",
            "Sample standard deviation of the values seen",
            |s| s.stddev,
        ),
        ("gateway_feature_min", "Smallest value seen", |s| s.min),
        ("gateway_feature_max", "Largest value seen", |s| s.max),
        (
            "gateway_feature_drift_psi",
            "Population stability index of the recent window against the policy's reference",
            |s| s.psi,
        ),
    ];
    for (name, help, get) in gauges {
        header(out, name, "gauge", help);
        for (labels, s) in &rows {
            if let Some(v) = get(s) {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    }
    header(
        out,
        "gateway_feature_outliers_total",
        "counter",
        "Values outside the reference range, beyond outlier_sigma reference deviations, or not finite",
    );
    for (labels, s) in &rows {
        for (reason, n) in [
            ("non_finite", s.non_finite),
            ("out_of_range", s.out_of_range),
            ("beyond_sigma", s.beyond_sigma),
        ] {
            let _ = writeln!(
                out,
                "gateway_feature_outliers_total{{{labels},reason=\"{reason}\"}} {n}"
            );
        }
    }
    header(
        out,
        "gateway_feature_value",
        "histogram",
        "Values seen, over the reference's bins",
    );
    for (labels, s) in &rows {
        let Some(h) = &s.histogram else { continue };
        let mut cumulative = 0;
        for (i, c) in h.counts.iter().enumerate() {
            cumulative += c;
            let le = if i + 1 == h.counts.len() {
                "+Inf".to_string()
            } else {
                h.edges[i + 1].to_string()
            };
            let _ = writeln!(
                out,
                "gateway_feature_value_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "gateway_feature_value_sum{{{labels}}} {}",
            s.mean.unwrap_or(0.0) * s.count as f64
        );
        let _ = writeln!(out, "gateway_feature_value_count{{{labels}}} {cumulative}");
    }
}

use crate::telemetry::label as escape;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psi_is_zero_for_the_reference_and_grows_with_shift() {
        let expected = [0.25, 0.25, 0.25, 0.25];
        assert!(psi(&[250, 250, 250, 250], &expected).abs() < 1e-12);
        let mild = psi(&[300, 250, 250, 200], &expected);
        let strong = psi(&[0, 0, 100, 900], &expected);
        assert!(mild > 0.0 && mild < 0.1, "{mild}");
        assert!(strong > 1.0, "{strong}");
    }
}
