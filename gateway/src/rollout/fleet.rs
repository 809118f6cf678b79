//! Rollouts judged by a fleet: several gateways serving one policy, with
//! no leader of their own, judge each rollout from the same data, the
//! tallies every replica exports (`gateway_gate_*`, see
//! `telemetry::tally`, and each version's `gateway_feature_value`
//! histograms) as one Prometheus server scraped them, so every replica
//! makes the same decisions at the same moments.
//!
//! Time is cut into boundaries, multiples of the evaluation interval since
//! the Unix epoch (every replica must use the same interval). A rollout
//! starts at its *anchor*: the first boundary after a replica first served
//! it, the earliest a replica serving it publishes
//! (`gateway_rollout_anchor_seconds`). From there the rollout's state is a
//! fold over the boundaries, each read once its data has settled (the
//! delay after it): at each boundary the operator's actions published
//! since the last one are carried out (`gateway_rollout_action_seconds`,
//! the newest of each kind, in the order they were asked), then each
//! version's counts since the boundary before are added to the step's
//! window (counter resets, a replica restarting, count from zero) and a
//! running step is judged by the same gates as on one machine
//! ([`super::judge`]), at the boundary's time. A step a decision begins
//! is judged from [`Fleet::lag`] after that boundary: the replicas learn
//! the decision only after the delay, and what they served until then,
//! under the old split, stays out of the new step's window.
//!
//! A replica that starts, or restarts with its state folder gone, reads
//! the anchor and folds again from it: it recomputes where the rollout
//! stands. Each replica serves the split of the last boundary it folded,
//! so the fleet serves the same split within one interval of each other.
//! Prometheus unreachable or refusing a query leaves the split where it
//! is (nothing is decided without data), and says so once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use super::prometheus::{Prometheus, Series};
use super::{Action, Figures, Reads, Rollouts, Side, State, Status, apply, at, judge, unix};
use crate::http_url::HttpUrl;
use crate::policy::{ModelPolicy, Rollout};
use crate::telemetry::{BUCKETS, CONTROL_TALLY, Counts, bucket_of_bound};

/// Boundaries read by one range query at most (Prometheus refuses more
/// than 11,000 points per series).
const MAX_POINTS: usize = 1000;

/// The oldest anchor a fold starts from (a rollout older than this, on
/// a replica with nothing of it, starts again).
const MAX_FOLD_SECONDS: f64 = 30.0 * 86_400.0;

/// How far back an operator's action is looked for at each boundary.
const ACTION_LOOKBACK: &str = "10m";

/// How rollouts are judged in a fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Prometheus's address (the query API is under it).
    pub prometheus: HttpUrl,
    /// The evaluation interval: boundaries are its multiples since the
    /// Unix epoch. The same on every replica.
    pub every: Duration,
    /// How long after a boundary its data is read: at least a scrape
    /// interval and a scrape's time, so every replica's samples are in.
    pub delay: Duration,
    /// Label matchers added to every query, so that only this fleet's
    /// series count (`job="gateway-prod"`); empty for none.
    pub matchers: Matchers,
}

/// Label matchers as PromQL writes them inside braces, checked:
/// `name="value"` pairs (also `!=`, `=~`, `!~`), comma-separated. The
/// labels a rollout selects by itself (`model`, `version`, `rollout`,
/// `__name__`) are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Matchers(String);

impl Matchers {
    pub fn parse(text: &str) -> Result<Matchers, String> {
        let mut out = Vec::new();
        let mut rest = text.trim();
        while !rest.is_empty() {
            let name_len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..name_len];
            if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
                return Err(format!("`{text}`: expected a label name at `{rest}`"));
            }
            if matches!(name, "__name__" | "model" | "version" | "rollout") {
                return Err(format!(
                    "`{text}`: `{name}` is a label the rollout selects by itself"
                ));
            }
            rest = rest[name_len..].trim_start();
            let Some(op) = ["=~", "!~", "!=", "="]
                .into_iter()
                .find(|op| rest.starts_with(op))
            else {
                return Err(format!("`{text}`: expected =, !=, =~ or !~ after `{name}`"));
            };
            rest = rest[op.len()..].trim_start();
            let Some(body) = rest.strip_prefix('"') else {
                return Err(format!(
                    "`{text}`: the value of `{name}` must be in double quotes"
                ));
            };
            let mut end = None;
            let mut escaped = false;
            for (i, c) in body.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(end) = end else {
                return Err(format!(
                    "`{text}`: the value of `{name}` has no closing quote"
                ));
            };
            out.push(format!("{name}{op}\"{}\"", &body[..end]));
            rest = body[end + 1..].trim_start();
            if let Some(next) = rest.strip_prefix(',') {
                rest = next.trim_start();
            } else if !rest.is_empty() {
                return Err(format!("`{text}`: expected a comma at `{rest}`"));
            }
        }
        Ok(Matchers(out.join(",")))
    }

    /// The matchers after a selector's own, with their comma.
    fn suffix(&self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!(",{}", self.0)
        }
    }
}

impl std::fmt::Display for Matchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The queries a rollout is judged by, generated from the policy (shown
/// by `GET /admin/rollouts` and in the README).
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct Queries {
    pub(crate) anchor: String,
    pub(crate) tallies: String,
    pub(crate) actions: String,
}

/// The `rollout` label of a rollout's series: its fingerprint, shortened.
pub(crate) fn rollout_label(fingerprint: &str) -> &str {
    fingerprint.get(..16).unwrap_or(fingerprint)
}

pub(crate) fn queries(
    model: &str,
    fingerprint: &str,
    champion: &str,
    candidate: &str,
    matchers: &Matchers,
) -> Queries {
    let model = crate::telemetry::label(model);
    let more = matchers.suffix();
    let rollout = rollout_label(fingerprint);
    // The two versions and the control group, as a regular expression.
    let literal = |v: &str| -> String {
        v.chars()
            .flat_map(|c| {
                let special = ".+*?()|[]{}^$\\".contains(c);
                [special.then_some('\\'), Some(c)].into_iter().flatten()
            })
            .collect()
    };
    let versions = crate::telemetry::label(&format!(
        "{}|{}|{CONTROL_TALLY}",
        literal(champion),
        literal(candidate)
    ));
    Queries {
        anchor: format!(
            "min(gateway_rollout_anchor_seconds{{model=\"{model}\",rollout=\"{rollout}\"{more}}})"
        ),
        tallies: format!(
            "{{__name__=~\"gateway_gate_(requests_total|errors_total|duration_seconds_bucket|shadow_total|truth_total|predictions_total)|gateway_feature_value_bucket\",model=\"{model}\",version=~\"{versions}\"{more}}}"
        ),
        actions: format!(
            "max by (action) (max_over_time(gateway_rollout_action_seconds{{model=\"{model}\",rollout=\"{rollout}\"{more}}}[{ACTION_LOOKBACK}]))"
        ),
    }
}

/// Judges every rollout from Prometheus; owned by the server's rollout
/// task.
pub(crate) struct Fleet {
    prometheus: Prometheus,
    every: f64,
    delay: f64,
    matchers: Matchers,
    folds: HashMap<String, Fold>,
    /// Models whose last update failed (said once, until one succeeds).
    failing: HashMap<String, String>,
}

/// One rollout folded up to a boundary.
struct Fold {
    fingerprint: String,
    anchor: f64,
    /// The last boundary folded; `None` before the anchor's counts are
    /// read (the counts every later window starts from).
    at: Option<f64>,
    state: State,
    /// The step's counts so far.
    window: Reads,
    /// Every tally series' value at the last boundary it had one.
    last: HashMap<String, f64>,
    /// The time of the newest operator's action of each kind carried out.
    applied: BTreeMap<&'static str, f64>,
}

/// What one tally series counts.
#[derive(Clone)]
enum Field {
    Requests,
    Errors,
    /// Cumulative, up to this bucket.
    Bucket(usize),
    Agree,
    Disagree,
    Correct,
    Wrong,
    /// Rows predicted this label.
    Predicted,
    /// Values of a monitored feature (`input/feature`), cumulative up to
    /// this upper bin edge.
    Feature(String, f64),
}

impl Fleet {
    /// How long after the boundary that decided it a new step starts
    /// being judged: the delay, rounded up to a boundary, and one more
    /// interval for every replica to serve its split. What was served
    /// before it, under the old split, is left out of the step's window.
    fn lag(&self) -> f64 {
        ((self.delay / self.every).ceil() + 1.0) * self.every
    }

    pub(crate) fn new(settings: &Settings) -> Self {
        Fleet {
            prometheus: Prometheus::new(settings.prometheus.clone()),
            every: settings.every.as_secs_f64().max(0.001),
            delay: settings.delay.as_secs_f64(),
            matchers: settings.matchers.clone(),
            folds: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    /// Moves every rollout of `policies` on (see the module docs). True
    /// when a model's split may have changed.
    pub(crate) async fn tick(
        &mut self,
        rollouts: &Rollouts,
        policies: &[&ModelPolicy],
        now: SystemTime,
    ) -> bool {
        let mut changed = rollouts.take_dirty() | rollouts.retire(policies.iter().copied());
        self.folds.retain(|model, _| {
            policies
                .iter()
                .any(|p| &p.model == model && p.rollout.is_some())
        });
        for policy in policies {
            let Some(r) = &policy.rollout else { continue };
            let (ours, made) = rollouts.claim(&policy.model, r, now, self.every);
            changed |= made;
            match self
                .update(&policy.model, r, policy.control.is_some(), &ours, now)
                .await
            {
                Ok(Some(state)) => {
                    changed |= rollouts.adopt(state);
                    if self.failing.remove(&policy.model).is_some() {
                        tracing::info!(model = %policy.model, "the fleet's rollout is judged from Prometheus again");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    if self.failing.get(&policy.model) != Some(&e) {
                        tracing::warn!(model = %policy.model, error = %e, "the fleet's rollout cannot be judged: its split stays where it is");
                        self.failing.insert(policy.model.clone(), e);
                    }
                }
            }
        }
        changed
    }

    /// Folds `model`'s rollout up to the last settled boundary: its state
    /// when it moved, `None` when it did not.
    async fn update(
        &mut self,
        model: &str,
        r: &Rollout,
        control: bool,
        ours: &State,
        now: SystemTime,
    ) -> Result<Option<State>, String> {
        // A promotion or a rollback is where a fleet's rollout ends: kept
        // as it is (a promotion outlives gate edits, as on one machine),
        // never folded again from data Prometheus may no longer hold.
        if matches!(ours.status, Status::Promoted | Status::Failed) && ours.belongs_to(r) {
            return Ok(None);
        }
        let fingerprint = r.fingerprint();
        let now_unix = unix(now);
        let settled = ((now_unix - self.delay) / self.every).floor() * self.every;
        // Nothing to read before the next boundary settles.
        if let Some(f) = self.folds.get(model)
            && f.fingerprint == fingerprint
            && f.window.control.is_some() == control
            && f.at.is_some_and(|at| at >= settled - 1e-6)
        {
            return Ok(None);
        }
        let q = queries(
            model,
            &fingerprint,
            &r.champion,
            &r.candidate,
            &self.matchers,
        );
        let claimed = ours.anchor_unix.unwrap_or(now_unix);
        // The earliest anchor a replica serving the rollout publishes now:
        // a boundary, not in the future, not before the oldest a fold
        // goes back to.
        let published = self
            .prometheus
            .instant(&q.anchor, now_unix)
            .await?
            .first()
            .and_then(|s| s.points.first())
            .map(|p| p.1)
            .filter(|a| {
                a.is_finite()
                    && *a <= claimed
                    && *a >= now_unix - MAX_FOLD_SECONDS
                    && ((a / self.every).round() * self.every - a).abs() < 1e-3
            });
        let anchor = published.unwrap_or(claimed);
        let mut moved = false;
        let mut fold = match self.folds.remove(model) {
            Some(f)
                if f.fingerprint == fingerprint
                    && f.window.control.is_some() == control
                    && f.anchor <= anchor + 1e-3 =>
            {
                f
            }
            _ => {
                moved = true;
                Fold::new(model, r, &fingerprint, anchor, control)
            }
        };
        let mut first = fold.at.map_or(fold.anchor, |a| a + self.every);
        // At most this many boundaries a tick: a long fold goes on at the
        // next tick.
        let settled = settled.min(first + self.every * (MAX_POINTS * 10 - 1) as f64);
        let result = async {
            while first <= settled + 1e-6 {
                let last = settled.min(first + self.every * (MAX_POINTS - 1) as f64);
                let tallies = self
                    .prometheus
                    .range(&q.tallies, first, last, self.every)
                    .await?;
                let actions = self
                    .prometheus
                    .range(&q.actions, first, last, self.every)
                    .await?;
                fold.advance(
                    r,
                    &tallies,
                    &actions,
                    (first, last),
                    (self.every, self.lag()),
                );
                moved = true;
                if last + self.every <= first {
                    break;
                }
                first = last + self.every;
            }
            Ok::<(), String>(())
        }
        .await;
        let state = moved.then(|| fold.state.clone());
        self.folds.insert(model.to_string(), fold);
        result.map(|()| state)
    }
}

impl Fold {
    fn new(model: &str, r: &Rollout, fingerprint: &str, anchor: f64, control: bool) -> Fold {
        let state = State::anchored(model, r, anchor, super::start_reason(r, false));
        Fold {
            fingerprint: fingerprint.to_string(),
            anchor,
            at: None,
            state,
            window: empty(control),
            last: HashMap::new(),
            applied: BTreeMap::new(),
        }
    }

    /// Folds the boundaries from `first` to `last`, `every` apart, given
    /// the tallies' and the actions' series over them; a step begun
    /// starts `lag` after the boundary that began it (see [`Fleet::lag`]).
    fn advance(
        &mut self,
        r: &Rollout,
        tallies: &[Series],
        actions: &[Series],
        (first, last): (f64, f64),
        (every, lag): (f64, f64),
    ) {
        let control = self.window.control.is_some();
        let slots: Vec<Option<(usize, Field)>> =
            tallies.iter().map(|s| slot(&s.labels, r)).collect();
        let keys: Vec<String> = tallies.iter().map(|s| key(&s.labels)).collect();
        let mut cursors = vec![0usize; tallies.len()];
        let mut action_cursors = vec![0usize; actions.len()];
        let count = ((last - first) / every).round() as usize + 1;
        for i in 0..count {
            let boundary = first + every * i as f64;
            let value_at = |series: &Series, cursor: &mut usize| {
                while *cursor < series.points.len() && series.points[*cursor].0 < boundary - 1e-3 {
                    *cursor += 1;
                }
                series
                    .points
                    .get(*cursor)
                    .filter(|p| (p.0 - boundary).abs() < 1e-3)
                    .map(|p| p.1)
            };
            // Each version's counts since the boundary before.
            let mut deltas: [Counts; 3] = std::array::from_fn(|_| Counts::default());
            let mut cumulative = [[0u64; BUCKETS]; 3];
            let mut features: [BTreeMap<String, Vec<(f64, u64)>>; 3] = Default::default();
            for (s, series) in tallies.iter().enumerate() {
                let Some(value) = value_at(series, &mut cursors[s]).filter(|v| v.is_finite())
                else {
                    continue;
                };
                // A count is never negative.
                let value = value.max(0.0);
                let before = self.last.insert(keys[s].clone(), value);
                if self.at.is_none() {
                    continue;
                }
                let delta = match before {
                    Some(b) if value >= b => value - b,
                    _ => value,
                }
                .round() as u64;
                let Some((side, field)) = &slots[s] else {
                    continue;
                };
                let side = *side;
                let d = &mut deltas[side];
                let add = |to: &mut u64| *to = to.saturating_add(delta);
                match field {
                    Field::Requests => add(&mut d.requests),
                    Field::Errors => add(&mut d.errors),
                    Field::Bucket(b) => add(&mut cumulative[side][*b]),
                    Field::Agree => add(&mut d.agree),
                    Field::Disagree => add(&mut d.disagree),
                    Field::Correct => add(&mut d.correct),
                    Field::Wrong => add(&mut d.wrong),
                    Field::Predicted if delta > 0 => {
                        let label = series.labels.get("label").cloned().unwrap_or_default();
                        add(d.predicted.entry(label).or_default());
                    }
                    Field::Predicted => {}
                    // Every edge, zeros included: the bins are told apart
                    // by their edges.
                    Field::Feature(key, le) => {
                        features[side]
                            .entry(key.clone())
                            .or_default()
                            .push((*le, delta));
                    }
                }
            }
            let mut requested: Vec<(f64, Action)> = actions
                .iter()
                .enumerate()
                .filter_map(|(a, series)| {
                    let time = value_at(series, &mut action_cursors[a])?;
                    let action = Action::parse(series.labels.get("action")?)?;
                    let done = self
                        .applied
                        .get(action.as_str())
                        .copied()
                        .unwrap_or(self.anchor);
                    (time > done && time <= boundary + 1e-3).then_some((time, action))
                })
                .collect();
            if self.at.is_none() {
                self.at = Some(boundary);
                continue;
            }
            self.at = Some(boundary);
            for (side, d) in deltas.iter_mut().enumerate() {
                let mut below = 0;
                for (b, n) in cumulative[side].iter().enumerate() {
                    d.latency[b] = n.saturating_sub(below);
                    below = below.max(*n);
                }
                for (key, mut edges) in std::mem::take(&mut features[side]) {
                    // Every replica's series of one edge add up first.
                    edges.sort_by(|a, b| a.0.total_cmp(&b.0));
                    edges.dedup_by(|later, first| {
                        let same = later.0 == first.0;
                        if same {
                            first.1 = first.1.saturating_add(later.1);
                        }
                        same
                    });
                    let mut below = 0;
                    let bins = edges
                        .iter()
                        .map(|(_, n)| {
                            let bin = n.saturating_sub(below);
                            below = below.max(*n);
                            bin
                        })
                        .collect();
                    d.inputs.insert(key, bins);
                }
            }
            // Counts before the step's start (the old split still being
            // served) stay out of its window.
            if boundary > self.state.step_started_unix + 1e-3 {
                add(&mut self.window.champion, &deltas[0]);
                add(&mut self.window.candidate, &deltas[1]);
                if let Some(c) = self.window.control.as_mut() {
                    add(c, &deltas[2]);
                }
            }
            let now = at(boundary);
            let started = self.state.step_started_unix;
            requested.sort_by(|a, b| a.0.total_cmp(&b.0));
            for (time, action) in requested {
                self.applied.insert(action.as_str(), time);
                if let Err(why) = self.state.act(action, now, "operator") {
                    tracing::debug!(model = %self.state.model, action = action.as_str(), why, "an operator's action does not apply");
                }
            }
            if self.state.status == Status::Running
                && let Some(verdict) = judge(r, &self.state, &self.window, now)
            {
                apply(&mut self.state, r, verdict, now);
            }
            if self.state.step_started_unix != started {
                self.window = empty(control);
                let start = boundary + lag;
                self.state.step_started_unix = start;
                self.state.step_started = crate::decisions::rfc3339(at(start));
            }
        }
        self.state.fleet_window = Some(Figures {
            seconds: (self.at.unwrap_or(self.anchor) - self.state.step_started_unix).max(0.0),
            champion: Side::of(&self.window.champion),
            candidate: Side::of(&self.window.candidate),
            control: self.window.control.as_ref().map(Side::of),
        });
        self.state.fleet_at = self.at;
    }
}

fn empty(control: bool) -> Reads {
    Reads {
        champion: Counts::default(),
        candidate: Counts::default(),
        control: control.then(Counts::default),
    }
}

fn add(to: &mut Counts, d: &Counts) {
    let sum = |t: &mut u64, n: u64| *t = t.saturating_add(n);
    sum(&mut to.requests, d.requests);
    sum(&mut to.errors, d.errors);
    for (t, n) in to.latency.iter_mut().zip(d.latency) {
        sum(t, n);
    }
    sum(&mut to.agree, d.agree);
    sum(&mut to.disagree, d.disagree);
    sum(&mut to.correct, d.correct);
    sum(&mut to.wrong, d.wrong);
    for (label, n) in &d.predicted {
        sum(to.predicted.entry(label.clone()).or_default(), *n);
    }
    for (feature, bins) in &d.inputs {
        let to = to.inputs.entry(feature.clone()).or_default();
        // A feature whose bins changed (its reference edited) starts again.
        if to.len() != bins.len() {
            *to = vec![0; bins.len()];
        }
        for (t, n) in to.iter_mut().zip(bins) {
            sum(t, *n);
        }
    }
}

/// A series' identity: its labels.
fn key(labels: &BTreeMap<String, String>) -> String {
    let mut key = String::new();
    for (k, v) in labels {
        key.push_str(k);
        key.push('\u{1}');
        key.push_str(v);
        key.push('\u{2}');
    }
    key
}

/// Which side (0 champion, 1 candidate, 2 control group) and what a tally
/// series counts; `None` for another version's.
fn slot(labels: &BTreeMap<String, String>, r: &Rollout) -> Option<(usize, Field)> {
    let version = labels.get("version")?;
    let side = if *version == r.champion {
        0
    } else if *version == r.candidate {
        1
    } else if version == CONTROL_TALLY {
        2
    } else {
        return None;
    };
    let result = labels.get("result").map(String::as_str);
    let field = match (labels.get("__name__")?.as_str(), result) {
        ("gateway_gate_requests_total", _) => Field::Requests,
        ("gateway_gate_errors_total", _) => Field::Errors,
        ("gateway_gate_duration_seconds_bucket", _) => Field::Bucket(bucket_of_bound(le(labels)?)?),
        ("gateway_gate_shadow_total", Some("agree")) => Field::Agree,
        ("gateway_gate_shadow_total", Some("disagree")) => Field::Disagree,
        ("gateway_gate_truth_total", Some("correct")) => Field::Correct,
        ("gateway_gate_truth_total", Some("wrong")) => Field::Wrong,
        ("gateway_gate_predictions_total", _) if labels.contains_key("label") => Field::Predicted,
        // Inputs count for the gate that judges them only.
        ("gateway_feature_value_bucket", _) if r.gates.max_input_psi.is_some() => Field::Feature(
            format!("{}/{}", labels.get("input")?, labels.get("feature")?),
            le(labels)?,
        ),
        _ => return None,
    };
    Some((side, field))
}

/// A histogram bucket's upper edge (`le`).
fn le(labels: &BTreeMap<String, String>) -> Option<f64> {
    match labels.get("le")?.as_str() {
        "+Inf" => Some(f64::INFINITY),
        le => le.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Gates;

    /// The rollout of the module's tests, with 2 s steps, no accuracy
    /// gate, and an input gate that never fails (its inputs are counted).
    fn rollout() -> Rollout {
        let r = super::super::tests::rollout();
        Rollout {
            step_time: Duration::from_secs(2),
            gates: Gates {
                min_accuracy_change: None,
                max_input_psi: Some(100.0),
                ..r.gates
            },
            ..r
        }
    }

    fn series(labels: &[(&str, &str)], points: &[(f64, f64)]) -> Series {
        Series {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            points: points.to_vec(),
        }
    }

    fn requests(version: &str, instance: &str, points: &[(f64, f64)]) -> Series {
        series(
            &[
                ("__name__", "gateway_gate_requests_total"),
                ("model", "m"),
                ("version", version),
                ("instance", instance),
            ],
            points,
        )
    }

    #[test]
    fn a_fold_counts_every_replica_across_resets_and_applies_actions_in_order() {
        let r = rollout();
        let mut fold = Fold::new("m", &r, &r.fingerprint(), 1000.0, false);
        let tallies = [
            // Replica a restarts after 1001: its counter starts again.
            requests("v1", "a", &[(1000.0, 50.0), (1001.0, 60.0), (1002.0, 4.0)]),
            requests("v2", "a", &[(1000.0, 5.0), (1001.0, 9.0), (1002.0, 1.0)]),
            // Replica b is scraped for the first time at 1001.
            requests("v1", "b", &[(1001.0, 7.0), (1002.0, 17.0)]),
            requests("v2", "b", &[(1001.0, 3.0), (1002.0, 9.0)]),
            series(
                &[
                    ("__name__", "gateway_gate_duration_seconds_bucket"),
                    ("model", "m"),
                    ("version", "v2"),
                    ("le", "+Inf"),
                ],
                &[(1001.0, 3.0)],
            ),
            // Another model's version is not counted.
            requests("v9", "a", &[(1001.0, 100.0)]),
        ];
        let feature = |le: &str, points: &[(f64, f64)]| {
            series(
                &[
                    ("__name__", "gateway_feature_value_bucket"),
                    ("model", "m"),
                    ("version", "v2"),
                    ("input", "x"),
                    ("feature", "f"),
                    ("le", le),
                ],
                points,
            )
        };
        let tallies: Vec<Series> = tallies
            .into_iter()
            .chain([
                feature("+Inf", &[(1000.0, 1.0), (1001.0, 6.0)]),
                feature("1.5", &[(1000.0, 1.0), (1001.0, 3.0)]),
            ])
            .chain(
                // A second replica's.
                [("+Inf", 4.0), ("1.5", 1.0)].map(|(le, n)| {
                    let mut s = feature(le, &[(1000.0, 0.0), (1001.0, n)]);
                    s.labels.insert("instance".into(), "b".into());
                    s
                }),
            )
            .collect();
        fold.advance(&r, &tallies, &[], (1000.0, 1001.0), (1.0, 3.0));
        // 1000 is the anchor: its values are where the counts start.
        assert_eq!(fold.window.champion.requests, 10 + 7);
        assert_eq!(fold.window.candidate.requests, 4 + 3);
        assert_eq!(fold.window.candidate.latency[BUCKETS - 1], 3);
        // Cumulative bins, in any order, become each bin's values.
        assert_eq!(fold.window.candidate.inputs["x/f"], [2 + 1, 3 + 3]);
        assert_eq!(fold.state.status, Status::Running);
        fold.advance(&r, &tallies, &[], (1002.0, 1002.0), (1.0, 3.0));
        // 1002: 4 after the restart, 10 more on b; the step is 2 s old
        // and the candidate has 7 + 1 + 6 = 14 requests: it advances, and
        // the next step is judged from 1002 + 3.
        assert_eq!(fold.state.step, 1);
        assert_eq!(fold.state.step_started_unix, 1005.0);
        assert_eq!(
            fold.state.decisions[1]
                .figures
                .as_ref()
                .unwrap()
                .candidate
                .requests,
            14
        );
        assert_eq!(
            fold.state.decisions[1]
                .figures
                .as_ref()
                .unwrap()
                .champion
                .requests,
            31
        );
        assert_eq!(fold.state.decisions[1].at, "1970-01-01T00:16:42.000000Z");
        // A pause then a resume, asked between two boundaries, seen at the
        // second: both, in the order asked; an action already carried out
        // is not carried out again.
        let action = |name: &str, points: &[(f64, f64)]| series(&[("action", name)], points);
        let actions = [
            action("resume", &[(1004.0, 1003.6)]),
            action("pause", &[(1004.0, 1003.2), (1005.0, 1003.2)]),
        ];
        fold.advance(&r, &[], &actions, (1003.0, 1005.0), (1.0, 3.0));
        let outcomes: Vec<_> = fold.state.decisions.iter().map(|d| d.outcome).collect();
        assert_eq!(
            outcomes,
            [
                super::super::Outcome::Started,
                super::super::Outcome::Advanced,
                super::super::Outcome::Paused,
                super::super::Outcome::Resumed
            ]
        );
        assert_eq!(fold.state.status, Status::Running);
        assert_eq!(fold.applied["resume"], 1003.6);
    }

    #[test]
    fn queries_name_the_model_and_the_rollout() {
        let q = queries(
            "a\"b",
            "0123456789abcdef0123",
            "v1",
            "v2.1",
            &Matchers::default(),
        );
        // A regular expression in a PromQL string: the dot escaped, and
        // the escape escaped.
        assert!(
            q.tallies.ends_with(r#",version=~"v1|v2\\.1|@control"}"#),
            "{}",
            q.tallies
        );
        assert!(
            q.anchor
                .contains("model=\"a\\\"b\",rollout=\"0123456789abcdef\"")
        );
        assert!(q.tallies.contains("gateway_gate_(requests_total|"));
        assert!(q.actions.starts_with("max by (action) (max_over_time("));
        let only = Matchers::parse(r#" job = "prod" ,env=~"a|b\"c" "#).unwrap();
        assert_eq!(only.to_string(), r#"job="prod",env=~"a|b\"c""#);
        let q = queries("m", "f", "v1", "v2", &only);
        for query in [&q.anchor, &q.tallies] {
            assert!(query.contains(r#",job="prod",env=~"a|b\"c"}"#), "{query}");
        }
        assert!(
            q.actions.ends_with(r#",job="prod",env=~"a|b\"c"}[10m]))"#),
            "{}",
            q.actions
        );
        for bad in [
            "job",
            "job=prod",
            "model=\"m\"",
            "job=\"a",
            "a=\"b\" c=\"d\"",
            "1a=\"b\"",
        ] {
            assert!(Matchers::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Matchers::parse("").unwrap(), Matchers::default());
    }
}
