//! `gateway what-if`: a decision log run against a proposed policy folder,
//! without serving it. Every request the log recorded as served is routed
//! as the new policies would route it (a canary's draw point is in the
//! record; a request recorded without one gets a point from its id), and
//! every request whose record keeps its inputs runs through the new
//! version: the report says, per model, the share each version would get,
//! how many answers would change and to what, what the new rules would
//! refuse, and the latency per version.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::{Offline, compare, elements, not_comparable, recorded_inputs};
use crate::decisions::read::{Recorded, Records};
use crate::router::sticky_point;
use crate::server::ServeOptions;

/// Limits past which `what-if` exits non-zero, in percent of the replayed
/// requests of any one model.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Thresholds {
    /// Answers that would change (another label, other outputs).
    pub max_changed_percent: Option<f64>,
    /// Requests answered before that the new policies would refuse or fail.
    pub max_failed_percent: Option<f64>,
}

/// What the new policies would do with one model's recorded traffic.
#[derive(Default)]
struct ModelReport {
    file: String,
    /// Served records of the model.
    requests: u64,
    /// Of those, routed by a point the log did not record.
    estimated_points: u64,
    /// Requests per version: as recorded, and as the new policies route.
    recorded_share: BTreeMap<String, u64>,
    new_share: BTreeMap<String, u64>,
    /// "old -> new" version, for requests the new policies route elsewhere.
    moved: BTreeMap<String, u64>,
    /// Pinned to a version the new policies do not have.
    unknown_version: u64,
    /// Records that keep their inputs (and were replayed).
    replayed: u64,
    /// Of those, whose record has an outcome to compare with (not 499,
    /// 429 or 503).
    compared: u64,
    not_comparable: u64,
    /// Replayed requests whose outputs would differ from the recorded ones.
    changed_outputs: u64,
    /// Of those, whose label would change (the version's label output).
    changed_labels: u64,
    /// Whether the answers have a label to compare (the version's label
    /// output is in the records).
    labelled: bool,
    /// "old -> new" of the label, for changed labels.
    transitions: BTreeMap<String, u64>,
    /// Answered when recorded, refused or failed now: by error kind.
    newly_failed: BTreeMap<String, u64>,
    /// Refused when recorded, answered now.
    newly_answered: u64,
    /// Replayed latencies, per version (ms).
    latency: BTreeMap<String, Sample>,
    /// Recorded latencies of the served version, per version (ms).
    recorded_latency: BTreeMap<String, Sample>,
}

/// At most this many latencies are kept per version: quantiles over a
/// uniform sample of them (a log can hold millions of requests).
const SAMPLE: usize = 100_000;

/// A uniform sample of at most [`SAMPLE`] values (reservoir sampling).
#[derive(Default)]
struct Sample {
    values: Vec<f64>,
    seen: u64,
}

impl Sample {
    fn push(&mut self, value: f64) {
        self.seen += 1;
        if self.values.len() < SAMPLE {
            self.values.push(value);
        } else {
            let slot = (crate::router::random_point() / 100.0 * self.seen as f64) as usize;
            if let Some(v) = self.values.get_mut(slot) {
                *v = value;
            }
        }
    }

    /// The 50th and 99th percentiles.
    fn p50_p99(&self) -> (f64, f64) {
        let mut sorted = self.values.clone();
        sorted.sort_by(f64::total_cmp);
        (
            quantile(&sorted, 0.5).unwrap_or(0.0),
            quantile(&sorted, 0.99).unwrap_or(0.0),
        )
    }
}

/// Distinct keys a count map keeps (labels come from plugins: as many as
/// they like); the rest count under one key.
const MAX_KEYS: usize = 1000;

/// The longest key kept, in characters.
const MAX_KEY_CHARS: usize = 80;

/// Counts one more of `key` in `map`, within [`MAX_KEYS`] keys of at most
/// [`MAX_KEY_CHARS`].
fn count(map: &mut BTreeMap<String, u64>, key: String) {
    let key = if key.chars().count() > MAX_KEY_CHARS {
        let mut cut: String = key.chars().take(MAX_KEY_CHARS).collect();
        cut.push('…');
        cut
    } else {
        key
    };
    if map.len() >= MAX_KEYS && !map.contains_key(&key) {
        *map.entry("(others)".into()).or_default() += 1;
    } else {
        *map.entry(key).or_default() += 1;
    }
}

/// Runs the served requests of `log` against the policies of `options`
/// and writes the report to `out`; true when a threshold was crossed.
pub(crate) async fn what_if(
    options: &ServeOptions,
    log: &Path,
    thresholds: Thresholds,
    out: &mut String,
) -> Result<bool, String> {
    let offline = Offline::load(options).await?;
    let mut records = Records::open(log)?;
    let mut reports: BTreeMap<String, ModelReport> = BTreeMap::new();
    let mut other_models: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(record) = records.next_record() {
        let record = record?;
        if !record.is_served() {
            continue;
        }
        let Ok(model) = offline.snapshot.model(&record.model) else {
            *other_models.entry(record.model.clone()).or_default() += 1;
            continue;
        };
        let report = reports
            .entry(model.name.clone())
            .or_insert_with(|| ModelReport {
                file: model.policy.file.display().to_string(),
                ..ModelReport::default()
            });
        report.requests += 1;
        let recorded_version = record.version.clone().unwrap_or_default();
        *report
            .recorded_share
            .entry(recorded_version.clone())
            .or_default() += 1;
        report
            .recorded_latency
            .entry(recorded_version.clone())
            .or_default()
            .push(record.latency_ms);
        let version = if record.route == "pinned" {
            match model.version(&recorded_version) {
                Ok(v) => v,
                Err(_) => {
                    report.unknown_version += 1;
                    continue;
                }
            }
        } else {
            let point = match record.canary {
                Some(draw) => draw.point,
                None => {
                    report.estimated_points += 1;
                    sticky_point(&model.name, record.request_id.as_bytes())
                }
            };
            model.choose_at(point).0
        };
        *report.new_share.entry(version.name.clone()).or_default() += 1;
        if version.name != recorded_version {
            count(
                &mut report.moved,
                format!("{recorded_version} -> {}", version.name),
            );
        }
        let Ok(inputs) = recorded_inputs(&record) else {
            continue;
        };
        report.replayed += 1;
        let replayed = offline
            .pipeline
            .replay(
                &offline.snapshot,
                &model.name,
                &version.name,
                inputs,
                &record.request_id,
            )
            .await
            .map_err(|e| e.to_string())?;
        report
            .latency
            .entry(version.name.clone())
            .or_default()
            .push(replayed.latency.as_secs_f64() * 1e3);
        if not_comparable(&record).is_some() {
            report.not_comparable += 1;
            continue;
        }
        report.compared += 1;
        match &replayed.outputs {
            Err(e) if record.status == 200 => count(&mut report.newly_failed, e.kind().into()),
            Ok(_) if record.status != 200 => report.newly_answered += 1,
            _ => {}
        }
        report.labelled |= version.label_output.is_some();
        if let Ok(outputs) = &replayed.outputs
            && record.status == 200
            && !compare(&record, &replayed).is_empty()
        {
            report.changed_outputs += 1;
            if let Some(label) = version.label_output.as_deref() {
                match transition(&record, outputs, label) {
                    Some(None) => {}
                    Some(Some(change)) => {
                        report.changed_labels += 1;
                        count(&mut report.transitions, change);
                    }
                    // The record keeps no label to compare: counted as
                    // changed, to err on the side of the gate.
                    None => {
                        report.changed_labels += 1;
                        count(&mut report.transitions, "(label not recorded)".into());
                    }
                }
            }
        }
    }

    let mut crossed = false;
    if reports.is_empty() {
        let _ = writeln!(
            out,
            "no served request of the log is for a model of {}",
            options.policies.display()
        );
    }
    for (name, r) in &reports {
        crossed |= write_report(out, name, r, thresholds);
    }
    for (name, n) in &other_models {
        let _ = writeln!(
            out,
            "model `{name}`: {n} recorded request(s), but the new policies have no such model (they would be 404)"
        );
        if let Some(max) = thresholds.max_failed_percent {
            let _ = writeln!(
                out,
                "  THRESHOLD: 100.0 % would be refused or fail, over --max-failed-percent {max}"
            );
            crossed = true;
        }
    }
    let skipped = records.skipped;
    if skipped.count > 0 {
        let _ = writeln!(
            out,
            "{} line(s) of the log are not records this gateway reads; the first: {}",
            skipped.count,
            skipped.first.unwrap_or_default()
        );
    }
    Ok(crossed)
}

/// The "old -> new" of the first element that changed in the version's
/// label output (`Some(None)`: the label is the same), when both the
/// record and the replay have that output.
fn transition(
    record: &Recorded,
    outputs: &[crate::tensor::Tensor],
    label: &str,
) -> Option<Option<String>> {
    let recorded = record
        .outputs
        .as_ref()?
        .iter()
        .find(|t| t.name == label)?
        .tensor()
        .ok()?;
    let now = outputs.iter().find(|t| t.name == label)?;
    let (a, b) = (elements(&recorded), elements(now));
    Some(
        a.iter()
            .zip(&b)
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("{x} -> {y}")),
    )
}

/// The most shown of a list of counts.
const SHOWN: usize = 6;

/// `key: n` pairs, the largest counts first, at most [`SHOWN`] of them.
fn most_first(counts: &BTreeMap<String, u64>) -> String {
    let mut sorted: Vec<(&String, &u64)> = counts.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let mut list: Vec<String> = sorted
        .iter()
        .take(SHOWN)
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if sorted.len() > SHOWN {
        let rest: u64 = sorted[SHOWN..].iter().map(|(_, n)| **n).sum();
        list.push(format!("{rest} more in {} other(s)", sorted.len() - SHOWN));
    }
    list.join(", ")
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn shares(counts: &BTreeMap<String, u64>, whole: u64) -> String {
    counts
        .iter()
        .map(|(v, n)| format!("{v} {:.1} % ({n})", percent(*n, whole)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `q` quantile of sorted values.
fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(((last as f64) * q).round() as usize).copied()
}

/// Writes one model's part of the report; true when it crosses a
/// threshold.
fn write_report(out: &mut String, name: &str, r: &ModelReport, t: Thresholds) -> bool {
    let _ = writeln!(
        out,
        "model `{name}` ({}): {} recorded request(s), {} with inputs (replayed)",
        r.file, r.requests, r.replayed
    );
    let _ = writeln!(
        out,
        "  share now:     {}",
        shares(&r.recorded_share, r.requests)
    );
    let routed = r.requests - r.unknown_version;
    let mut line = format!("  share new:     {}", shares(&r.new_share, routed));
    if r.estimated_points > 0 {
        let _ = write!(
            line,
            " ({} request(s) recorded without a canary draw: placed by their request id)",
            r.estimated_points
        );
    }
    let _ = writeln!(out, "{line}");
    if !r.moved.is_empty() {
        let _ = writeln!(out, "  moved:         {}", most_first(&r.moved));
    }
    if r.unknown_version > 0 {
        let _ = writeln!(
            out,
            "  pinned to a version the new policies do not have: {} (404)",
            r.unknown_version
        );
    }
    // An answer changes when its label does (a model with a label output),
    // else when any output does.
    let changed_answers = if r.labelled {
        r.changed_labels
    } else {
        r.changed_outputs
    };
    let changed = percent(changed_answers, r.compared);
    let what = if r.labelled { "labels" } else { "answers" };
    let mut line = format!(
        "  {:<15}{changed_answers} of {} would change ({changed:.1} %)",
        format!("{what}:"),
        r.compared
    );
    if !r.transitions.is_empty() {
        let _ = write!(line, "; {}", most_first(&r.transitions));
    }
    let _ = writeln!(out, "{line}");
    if r.labelled {
        let _ = writeln!(
            out,
            "  outputs:       {} of {} would differ in some value ({:.1} %)",
            r.changed_outputs,
            r.compared,
            percent(r.changed_outputs, r.compared)
        );
    }
    // Pinned to a version that is gone: a 404, a failure like any other.
    let failed: u64 = r.newly_failed.values().sum::<u64>() + r.unknown_version;
    let failed_percent = percent(failed, r.compared + r.unknown_version);
    let kinds = most_first(&r.newly_failed);
    let _ = writeln!(
        out,
        "  refused/failed: {failed} answered before would be refused or fail now ({failed_percent:.1} %){}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!("; {kinds}")
        },
        if r.newly_answered > 0 {
            format!("; {} refused before would be answered", r.newly_answered)
        } else {
            String::new()
        }
    );
    for (version, times) in &r.latency {
        let (p50, p99) = times.p50_p99();
        let mut line = format!(
            "  latency {version}: replayed p50 {p50:.3} ms, p99 {p99:.3} ms ({} calls)",
            times.seen
        );
        if let Some(recorded) = r.recorded_latency.get(version) {
            let (p50, p99) = recorded.p50_p99();
            let _ = write!(
                line,
                "; served p50 {p50:.3} ms, p99 {p99:.3} ms ({} requests)",
                recorded.seen
            );
        }
        let _ = writeln!(out, "{line}");
    }
    if r.not_comparable > 0 {
        let _ = writeln!(
            out,
            "  not compared:  {} replayed request(s) had no answer when recorded (499, 429, 503)",
            r.not_comparable
        );
    }
    let mut crossed = false;
    if (t.max_changed_percent.is_some() || t.max_failed_percent.is_some()) && r.compared == 0 {
        let _ = writeln!(
            out,
            "  THRESHOLD: no recorded request of this model can be compared (none keeps its inputs: see `[record] sample_percent`); nothing to judge the change by"
        );
        crossed = true;
    }
    if let Some(max) = t.max_changed_percent
        && changed > max
    {
        let _ = writeln!(
            out,
            "  THRESHOLD: {changed:.1} % of the answers would change, over --max-changed-percent {max}"
        );
        crossed = true;
    }
    if let Some(max) = t.max_failed_percent
        && failed_percent > max
    {
        let _ = writeln!(
            out,
            "  THRESHOLD: {failed_percent:.1} % would be refused or fail, over --max-failed-percent {max}"
        );
        crossed = true;
    }
    crossed
}
