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
use std::time::Duration;

use super::{Offline, compare, elements, recorded_inputs};
use crate::decisions::read::{Recorded, scan};
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
    /// Pinned to a version the new policies do not have.
    unknown_version: u64,
    /// Records that keep their inputs (and were replayed).
    replayed: u64,
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
    /// Replayed latencies, per version.
    latency: BTreeMap<String, Vec<Duration>>,
    /// Recorded latencies of the served version, per version (ms).
    recorded_latency: BTreeMap<String, Vec<f64>>,
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
    let mut records: Vec<Recorded> = Vec::new();
    let skipped = scan(log, |record| {
        if record.is_served() {
            records.push(record);
        }
        std::ops::ControlFlow::Continue(())
    })?;
    let mut reports: BTreeMap<String, ModelReport> = BTreeMap::new();
    let mut other_models: BTreeMap<String, u64> = BTreeMap::new();
    for record in records {
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
            .push(replayed.latency);
        match &replayed.outputs {
            Err(e) if record.status == 200 => {
                *report.newly_failed.entry(e.kind().to_string()).or_default() += 1;
            }
            Ok(_) if record.status != 200 => report.newly_answered += 1,
            _ => {}
        }
        if let Ok(outputs) = &replayed.outputs
            && record.status == 200
            && !compare(&record, &replayed).is_empty()
        {
            report.changed_outputs += 1;
            match transition(&record, outputs, version.label_output.as_deref()) {
                Some(Some(change)) => {
                    report.labelled = true;
                    report.changed_labels += 1;
                    *report.transitions.entry(change).or_default() += 1;
                }
                Some(None) => report.labelled = true,
                None => {}
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
    }
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
    label: Option<&str>,
) -> Option<Option<String>> {
    let label = label?;
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
    let changed = percent(changed_answers, r.replayed);
    let what = if r.labelled { "labels" } else { "answers" };
    let mut line = format!(
        "  {:<15}{changed_answers} of {} would change ({changed:.1} %)",
        format!("{what}:"),
        r.replayed
    );
    if !r.transitions.is_empty() {
        let list: Vec<String> = r
            .transitions
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = write!(line, "; {}", list.join(", "));
    }
    let _ = writeln!(out, "{line}");
    if r.labelled {
        let _ = writeln!(
            out,
            "  outputs:       {} of {} would differ in some value ({:.1} %)",
            r.changed_outputs,
            r.replayed,
            percent(r.changed_outputs, r.replayed)
        );
    }
    let failed: u64 = r.newly_failed.values().sum();
    let failed_percent = percent(failed, r.replayed);
    let kinds: Vec<String> = r
        .newly_failed
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  refused/failed: {failed} answered before would be refused or fail now ({failed_percent:.1} %){}{}",
        if kinds.is_empty() {
            String::new()
        } else {
            format!("; {}", kinds.join(", "))
        },
        if r.newly_answered > 0 {
            format!("; {} refused before would be answered", r.newly_answered)
        } else {
            String::new()
        }
    );
    for (version, times) in &r.latency {
        let mut sorted = times.clone();
        sorted.sort();
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e3);
        let mut line = format!(
            "  latency {version}: replayed p50 {:.3} ms, p99 {:.3} ms ({} calls)",
            ms(quantile(&sorted, 0.5)),
            ms(quantile(&sorted, 0.99)),
            sorted.len()
        );
        if let Some(recorded) = r.recorded_latency.get(version) {
            let mut recorded = recorded.clone();
            recorded.sort_by(f64::total_cmp);
            let _ = write!(
                line,
                "; served p50 {:.3} ms, p99 {:.3} ms ({} requests)",
                quantile(&recorded, 0.5).unwrap_or(0.0),
                quantile(&recorded, 0.99).unwrap_or(0.0),
                recorded.len()
            );
        }
        let _ = writeln!(out, "{line}");
    }
    let mut crossed = false;
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
