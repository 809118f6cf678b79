//! Progressive delivery: a policy's `[rollout]` takes its candidate
//! through a list of percents, judging each step against the champion on
//! the same window (error rate, p99 latency, shadow agreement, accuracy on
//! ground truth), and promotes it after the last step or takes its share
//! back to 0 at the first failed gate.
//!
//! The state of every rollout (step, when it started, every decision with
//! its figures) lives here, is written atomically to the state folder at
//! each change, and is read back at start: a restart resumes the same
//! step. The policy file stays the operator's: the state applies to a
//! model while the file's `[rollout]` (and champion) are the ones it
//! started from ([`policy::Rollout::fingerprint`]); an edit of either
//! restarts the rollout at its first step, and a file without `[rollout]`
//! ends it. A promotion serves the candidate as champion while the file
//! still names the old one; the operator makes it permanent by naming the
//! candidate as `champion` and removing `[rollout]`.
//!
//! [`Rollouts`] is the snapshot builder's [`policy::Route`]: every build
//! (start, reload, a step's change) sets the champion and canary of a
//! model with a rollout from its state, so every way a snapshot is made
//! serves the same split. The loop that ticks rollouts and rebuilds the
//! snapshot when one moves is the server's.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::policy::{self, Canary, ModelPolicy, Rollout};
use crate::telemetry::{CONTROL_TALLY, Counts, Telemetry};

pub mod fleet;
mod prometheus;

/// Decisions a rollout keeps (the oldest go first).
const MAX_DECISIONS: usize = 256;

/// The state file's format.
const SCHEMA: u32 = 1;

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// The candidate serves its step's percent; gates are judged.
    Running,
    /// Held at its step's percent by the operator; nothing is judged.
    Paused,
    /// Rolled back: the candidate serves nothing.
    Failed,
    /// The candidate serves as champion.
    Promoted,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Failed => "failed",
            Status::Promoted => "promoted",
        }
    }
}

/// What a decision did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// The rollout began (or began again) at its first step.
    Started,
    /// The step's gates passed: on to the next step.
    Advanced,
    /// The last step's gates passed, or the operator promoted.
    Promoted,
    /// A gate failed, or the operator rolled back.
    RolledBack,
    Paused,
    Resumed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Started => "started",
            Outcome::Advanced => "advanced",
            Outcome::Promoted => "promoted",
            Outcome::RolledBack => "rolled_back",
            Outcome::Paused => "paused",
            Outcome::Resumed => "resumed",
        }
    }
}

/// One decision of a rollout, with why and on what figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Decision {
    /// RFC 3339, UTC.
    pub(crate) at: String,
    pub(crate) outcome: Outcome,
    /// `rollout` (its gates), `operator` (the admin API) or `policy` (the
    /// file changed, or the state could not be read).
    pub(crate) by: String,
    /// The step and percent the decision led to.
    pub(crate) step: usize,
    pub(crate) percent: f64,
    /// The gate that failed, for a rollback by the gates.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) gate: Option<String>,
    pub(crate) reason: String,
    /// The step's window, for a decision of the gates.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) figures: Option<Figures>,
}

/// The champion, the candidate and the control group over one window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Figures {
    pub(crate) seconds: f64,
    pub(crate) champion: Side,
    pub(crate) candidate: Side,
    /// The model's control group, when it has one: the accuracy gate's
    /// reference then.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) control: Option<Side>,
}

/// The counts a rollout is judged on, read at one moment (or the
/// difference of two reads: a window).
#[derive(Clone, Debug, PartialEq)]
struct Reads {
    champion: Counts,
    candidate: Counts,
    control: Option<Counts>,
}

impl Reads {
    fn since(&self, earlier: &Reads) -> Reads {
        Reads {
            champion: self.champion.since(&earlier.champion),
            candidate: self.candidate.since(&earlier.candidate),
            control: self
                .control
                .as_ref()
                .map(|c| c.since(earlier.control.as_ref().unwrap_or(&Counts::default()))),
        }
    }
}

/// One version over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Side {
    /// Requests it served (2xx and 5xx).
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) error_rate: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    /// Shadow copies compared with the champion's answer.
    pub(crate) compared: u64,
    pub(crate) agreement: Option<f64>,
    /// Rows judged on ground truth.
    pub(crate) judged: u64,
    pub(crate) accuracy: Option<f64>,
    /// Rows of its answers, by the label predicted.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub(crate) predicted: BTreeMap<String, u64>,
    /// Values of each monitored feature it saw, by the reference's bins.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub(crate) inputs: BTreeMap<String, Vec<u64>>,
}

impl Side {
    fn of(c: &Counts) -> Side {
        Side {
            requests: c.requests,
            errors: c.errors,
            error_rate: c.error_rate(),
            p99_ms: c.p99().map(|d| d.as_secs_f64() * 1e3),
            compared: c.compared(),
            agreement: c.agreement(),
            judged: c.judged(),
            accuracy: c.accuracy(),
            predicted: c.predicted.clone(),
            inputs: c.inputs.clone(),
        }
    }
}

/// One model's rollout, as the state file holds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct State {
    pub(crate) schema: u32,
    pub(crate) model: String,
    /// The policy's rollout it belongs to ([`Rollout::fingerprint`], and
    /// for a promoted one [`Rollout::identity`]).
    pub(crate) fingerprint: String,
    pub(crate) identity: String,
    pub(crate) candidate: String,
    pub(crate) champion: String,
    pub(crate) steps: Vec<f64>,
    pub(crate) status: Status,
    pub(crate) step: usize,
    pub(crate) percent: f64,
    /// When the current step started (RFC 3339), and as seconds since
    /// the Unix epoch.
    pub(crate) step_started: String,
    pub(crate) step_started_unix: f64,
    pub(crate) decisions: VecDeque<Decision>,
    /// Both versions' counts when the window began (at the step's start,
    /// or at the first tick after a restart: the counts start again).
    #[serde(skip)]
    baseline: Option<Reads>,
    /// The control group's version when the window began.
    #[serde(skip)]
    control_of: Option<String>,
    /// In a fleet: the boundary the rollout started at, as every replica
    /// agrees on it (see [`fleet`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub(crate) anchor_unix: Option<f64>,
    /// In a fleet: the operator's actions this gateway was asked for, by
    /// name, with when (seconds since the Unix epoch); the fleet carries
    /// each out at the first boundary after Prometheus has it.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub(crate) requested: BTreeMap<String, f64>,
    /// In a fleet: the step's window so far, every replica's counts, as
    /// of the last boundary judged.
    #[serde(skip)]
    fleet_window: Option<Figures>,
    /// In a fleet: the last boundary judged.
    #[serde(skip)]
    fleet_at: Option<f64>,
}

impl State {
    fn start(model: &str, r: &Rollout, now: SystemTime, by: &str, reason: String) -> State {
        let mut state = State {
            schema: SCHEMA,
            model: model.to_string(),
            fingerprint: r.fingerprint(),
            identity: r.identity(),
            candidate: r.candidate.clone(),
            champion: r.champion.clone(),
            steps: r.steps.clone(),
            status: Status::Running,
            step: 0,
            percent: r.steps[0],
            step_started: String::new(),
            step_started_unix: 0.0,
            decisions: VecDeque::new(),
            baseline: None,
            control_of: None,
            anchor_unix: None,
            requested: BTreeMap::new(),
            fleet_window: None,
            fleet_at: None,
        };
        state.begin_step(0, now);
        state.decide(now, Outcome::Started, by, None, reason, None);
        state
    }

    /// A fleet's rollout, started at its anchor (a boundary).
    fn anchored(model: &str, r: &Rollout, anchor: f64, reason: String) -> State {
        let mut state = State::start(model, r, at(anchor), "policy", reason);
        state.anchor_unix = Some(anchor);
        state
    }

    fn begin_step(&mut self, step: usize, now: SystemTime) {
        self.step = step;
        self.percent = self.steps.get(step).copied().unwrap_or(0.0);
        self.step_started = crate::decisions::rfc3339(now);
        self.step_started_unix = unix(now);
        self.baseline = None;
    }

    fn decide(
        &mut self,
        now: SystemTime,
        outcome: Outcome,
        by: &str,
        gate: Option<&str>,
        reason: String,
        figures: Option<Figures>,
    ) {
        while self.decisions.len() >= MAX_DECISIONS {
            self.decisions.pop_front();
        }
        self.decisions.push_back(Decision {
            at: crate::decisions::rfc3339(now),
            outcome,
            by: by.to_string(),
            step: self.step,
            percent: self.percent,
            gate: gate.map(str::to_string),
            reason,
            figures,
        });
    }

    /// Carries out an operator's action at `now`, or says why it cannot
    /// be from where the rollout stands.
    fn act(&mut self, action: Action, now: SystemTime, by: &str) -> Result<(), String> {
        let from = self.status;
        let conflict = |what: &str| Err(format!("the rollout is {}; {what}", from.as_str()));
        match (action, from) {
            (Action::Pause, Status::Running) => {
                self.status = Status::Paused;
                self.decide(
                    now,
                    Outcome::Paused,
                    by,
                    None,
                    "paused by the operator".into(),
                    None,
                );
            }
            (Action::Pause, _) => return conflict("only a running rollout pauses"),
            (Action::Resume, Status::Paused) => {
                self.status = Status::Running;
                // The step starts over: its window must not mix what was
                // served while nothing was judged.
                let step = self.step;
                self.begin_step(step, now);
                self.decide(
                    now,
                    Outcome::Resumed,
                    by,
                    None,
                    "resumed by the operator; the step starts over".into(),
                    None,
                );
            }
            (Action::Resume, _) => return conflict("only a paused rollout resumes"),
            (Action::Promote, Status::Running | Status::Paused) => {
                self.status = Status::Promoted;
                self.percent = 100.0;
                self.decide(
                    now,
                    Outcome::Promoted,
                    by,
                    None,
                    format!("`{}` promoted to champion by the operator", self.candidate),
                    None,
                );
            }
            (Action::Promote, _) => {
                return conflict("only a running or paused rollout is promoted");
            }
            (Action::Rollback, Status::Running | Status::Paused) => {
                self.status = Status::Failed;
                self.percent = 0.0;
                self.decide(
                    now,
                    Outcome::RolledBack,
                    by,
                    None,
                    "rolled back by the operator".into(),
                    None,
                );
            }
            (Action::Rollback, _) => {
                return conflict("only a running or paused rollout is rolled back");
            }
        }
        Ok(())
    }

    /// Whether this is the state of the policy's rollout `r`: the same
    /// rollout, or for a promoted one the same candidate and champion.
    fn belongs_to(&self, r: &Rollout) -> bool {
        match self.status {
            Status::Promoted => self.identity == r.identity(),
            _ => self.fingerprint == r.fingerprint(),
        }
    }
}

/// Why a rollout starts: it is new, or (`again`) the policy changed the
/// one that had a state.
fn start_reason(r: &Rollout, again: bool) -> String {
    if again {
        return "the policy's [rollout] or champion changed: the rollout starts again".into();
    }
    format!(
        "`{}` against champion `{}`, steps {:?}",
        r.candidate, r.champion, r.steps
    )
}

/// The time `seconds` after the Unix epoch.
fn at(seconds: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(seconds.max(0.0))
}

fn unix(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What an operator asks of a rollout (`POST /admin/rollouts/{model}/...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Pause,
    Resume,
    Promote,
    Rollback,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
            Action::Rollback => "rollback",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Action> {
        Some(match name {
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "promote" => Action::Promote,
            "rollback" => Action::Rollback,
            _ => return None,
        })
    }
}

/// Why an operator's action was refused.
#[derive(Debug)]
pub(crate) enum ActionError {
    /// The model has no `[rollout]`.
    NoRollout,
    /// Not possible from where the rollout stands.
    Conflict(String),
}

/// Every model's rollout (see the module docs).
pub(crate) struct Rollouts {
    /// The state folder; `None` keeps the state in memory only.
    dir: Option<PathBuf>,
    states: Mutex<BTreeMap<String, State>>,
    telemetry: Arc<Telemetry>,
    /// Set when a split changed that the served snapshot may not show
    /// yet (an operator's action, or a rebuild that failed); the next
    /// tick builds again.
    dirty: std::sync::atomic::AtomicBool,
    /// The state folder's lock, held while the server lives.
    _lock: Option<std::fs::File>,
    /// Set when rollouts are judged by a fleet, from Prometheus.
    fleet: Option<fleet::Settings>,
    /// Decisions made and not yet recorded in the decision log (at most
    /// [`MAX_UNRECORDED`]: the oldest go first).
    unrecorded: Mutex<VecDeque<Unrecorded>>,
}

/// Decisions waiting for the decision log at most.
const MAX_UNRECORDED: usize = 1024;

/// The largest rollout record's body (the decision log reads back lines
/// of at most 1 MiB).
const MAX_NOTE_BYTES: usize = 256 << 10;

/// A decision for the decision log, with the rollout it belongs to.
pub(crate) struct Unrecorded {
    time: SystemTime,
    model: String,
    candidate: String,
    champion: String,
    body: serde_json::Value,
}

impl Rollouts {
    /// Reads the rollouts' state from `dir` (created if missing). A state
    /// file that cannot be read is logged and left alone: its rollout
    /// starts again at its first step (the lowest share, the safe side).
    pub(crate) fn open(
        dir: Option<PathBuf>,
        telemetry: Arc<Telemetry>,
        fleet: Option<fleet::Settings>,
    ) -> Result<Self, String> {
        let mut states = BTreeMap::new();
        let mut lock = None;
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create the state folder {}: {e}", dir.display()))?;
            lock = Some(crate::decisions::lock_folder(
                dir,
                ".rollouts.lock",
                "state folder",
                "another gateway keeps its rollouts here; give each gateway its own --state-dir",
            )?);
            let entries = std::fs::read_dir(dir)
                .map_err(|e| format!("cannot read the state folder {}: {e}", dir.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(model) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("rollout-"))
                    .and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                match read_state(&path) {
                    Ok(state) if state.model == model => {
                        states.insert(model.to_string(), state);
                    }
                    Ok(_) => {
                        tracing::error!(file = %path.display(), "rollout state names another model; ignored")
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "rollout state cannot be read; its rollout starts again")
                    }
                }
            }
        }
        Ok(Rollouts {
            dir,
            states: Mutex::new(states),
            telemetry,
            dirty: Default::default(),
            _lock: lock,
            fleet,
            unrecorded: Mutex::default(),
        })
    }

    fn states(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, State>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the next tick to build the snapshot again (a rebuild failed).
    pub(crate) fn mark_dirty(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::Release);
    }

    fn take_dirty(&self) -> bool {
        self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// The fleet's settings, when rollouts are judged by a fleet.
    pub(crate) fn fleet(&self) -> Option<&fleet::Settings> {
        self.fleet.as_ref()
    }

    /// In a fleet: the state this gateway serves `r` of `model` from, made
    /// (started at the next boundary, its anchor) if it has none yet. The
    /// second is true when it was made.
    fn claim(&self, model: &str, r: &Rollout, now: SystemTime, every: f64) -> (State, bool) {
        let mut states = self.states();
        // A finished rollout (say, from before the fleet) is kept as it is.
        if let Some(state) = states.get(model)
            && state.belongs_to(r)
            && (state.anchor_unix.is_some()
                || matches!(state.status, Status::Promoted | Status::Failed))
        {
            return (state.clone(), false);
        }
        let anchor = (unix(now) / every).ceil() * every;
        let state = State::anchored(
            model,
            r,
            anchor,
            start_reason(r, states.contains_key(model)),
        );
        self.announce(&state, 0);
        self.save(&state);
        states.insert(model.to_string(), state.clone());
        (state, true)
    }

    /// In a fleet: serves `state`, as the fleet judged it, for its model.
    /// Decisions this gateway had not made yet are logged and counted;
    /// the operator's requests it published are kept. True when the split
    /// changed.
    fn adopt(&self, mut state: State) -> bool {
        let mut states = self.states();
        let old = states.get(&state.model);
        let same_rollout = old.is_some_and(|o| {
            o.fingerprint == state.fingerprint && o.anchor_unix == state.anchor_unix
        });
        // The decisions after the last one this gateway announced (found
        // by time and outcome: both lists stop at the newest 256).
        let known = match old
            .filter(|_| same_rollout)
            .and_then(|o| o.decisions.back())
        {
            Some(last) => state
                .decisions
                .iter()
                .rposition(|d| d.at == last.at && d.outcome == last.outcome)
                .map_or(state.decisions.len(), |at| at + 1),
            None => 0,
        };
        let changed = old.is_none_or(|o| (o.status, o.percent) != (state.status, state.percent));
        if let Some(o) = old.filter(|_| same_rollout) {
            state.requested = o.requested.clone();
        }
        let saved = old.is_some_and(|o| {
            same_rollout && o.decisions == state.decisions && o.step == state.step
        });
        self.announce(&state, known);
        if !saved {
            self.save(&state);
        }
        states.insert(state.model.clone(), state);
        changed
    }

    /// Forgets the rollouts of models served without a `[rollout]`. True
    /// when one was forgotten.
    fn retire<'a>(&self, policies: impl Iterator<Item = &'a ModelPolicy>) -> bool {
        let mut states = self.states();
        let ended: Vec<String> = policies
            .filter(|p| p.rollout.is_none() && states.contains_key(&p.model))
            .map(|p| p.model.clone())
            .collect();
        for model in &ended {
            states.remove(model);
            self.forget(model);
        }
        !ended.is_empty()
    }

    /// Writes the decisions made since the last call to the decision log
    /// (`kind: "rollout"`, found as request `rollout:<model>`), each with
    /// the files both versions are made of as `snapshot` serves them.
    /// Without a log they are let go.
    pub(crate) fn record(
        &self,
        log: Option<&crate::decisions::DecisionLog>,
        snapshot: &crate::router::Snapshot,
    ) {
        let taken: Vec<Unrecorded> = self
            .unrecorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let Some(log) = log else { return };
        for u in taken {
            let mut body = u.body;
            // A record stays well below what the log reads back of a
            // line: figures past that are left out, and it says so.
            if body.to_string().len() > MAX_NOTE_BYTES
                && let Some(decision) = body.get_mut("decision").and_then(|d| d.as_object_mut())
            {
                decision.remove("figures");
                decision.insert(
                    "figures_omitted".into(),
                    format!("the figures were over {MAX_NOTE_BYTES} bytes").into(),
                );
            }
            if let Ok(model) = snapshot.model(&u.model)
                && let Some(object) = body.as_object_mut()
            {
                let artifacts: serde_json::Map<String, serde_json::Value> =
                    [&u.champion, &u.candidate]
                        .into_iter()
                        .filter_map(|v| {
                            let version = model.versions.get(v)?;
                            Some((v.clone(), crate::decisions::artifacts_of(version)))
                        })
                        .collect();
                object.insert("artifacts".into(), artifacts.into());
                object.insert(
                    "policy_sha256".into(),
                    model.policy.sha256.to_string().into(),
                );
            }
            log.note(crate::decisions::Note {
                time: u.time,
                kind: "rollout",
                id: format!("rollout:{}", u.model).into(),
                model: u.model,
                body,
            });
        }
    }

    /// In a fleet: the series every replica reads to agree on a rollout
    /// (its anchor, and the operator's requests this gateway published).
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        if self.fleet.is_none() {
            return;
        }
        let states = self.states();
        let _ = writeln!(
            out,
            "# HELP gateway_rollout_anchor_seconds When a rollout started, as the fleet agrees on it\n# TYPE gateway_rollout_anchor_seconds gauge"
        );
        for s in states.values() {
            if let Some(anchor) = s.anchor_unix {
                let _ = writeln!(
                    out,
                    "gateway_rollout_anchor_seconds{{model=\"{}\",rollout=\"{}\"}} {anchor}",
                    crate::telemetry::label(&s.model),
                    fleet::rollout_label(&s.fingerprint)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP gateway_rollout_action_seconds When the operator last asked this gateway for an action on a rollout\n# TYPE gateway_rollout_action_seconds gauge"
        );
        for s in states.values() {
            for (action, time) in &s.requested {
                let _ = writeln!(
                    out,
                    "gateway_rollout_action_seconds{{model=\"{}\",rollout=\"{}\",action=\"{action}\"}} {time}",
                    crate::telemetry::label(&s.model),
                    fleet::rollout_label(&s.fingerprint)
                );
            }
        }
    }

    /// Moves every rollout of `policies` (the snapshot being served) on:
    /// starts new ones, restarts edited ones, judges the running ones whose
    /// step is over, and forgets those whose model is served without a
    /// `[rollout]` (a model that is not served at all, say while its file
    /// is being replaced, keeps its state). True when a model's split may
    /// have changed (the snapshot must be built again).
    pub(crate) fn tick(&self, models: &[&crate::router::Model], now: SystemTime) -> bool {
        let mut changed = self.take_dirty() | self.retire(models.iter().map(|m| &m.policy));
        let mut states = self.states();
        for model in models {
            let policy = &model.policy;
            let Some(r) = &policy.rollout else {
                continue;
            };
            let mut counts = self.read(
                &policy.model,
                &r.champion,
                &r.candidate,
                policy.control.is_some(),
            );
            // The inputs each version saw, as its monitor binned them, for
            // the gate that judges them (read only then: the monitor's
            // locks are the request path's).
            for (version, side) in [
                (&r.champion, &mut counts.champion),
                (&r.candidate, &mut counts.candidate),
            ] {
                if r.gates.max_input_psi.is_some()
                    && let Some(monitor) = model.monitors.get(version)
                {
                    side.inputs = monitor.bins().into_iter().collect();
                }
            }
            if states.get(&policy.model).is_none_or(|s| !s.belongs_to(r)) {
                let reason = start_reason(r, states.contains_key(&policy.model));
                let state = State::start(&policy.model, r, now, "policy", reason);
                self.announce(&state, 0);
                self.save(&state);
                states.insert(policy.model.clone(), state);
                changed = true;
                continue;
            }
            let Some(state) = states.get_mut(&policy.model) else {
                continue;
            };
            // A control group added, removed or moved to another version
            // starts the window again: its counts would mix.
            let control = policy.control.as_ref().map(|c| c.version.clone());
            if state.control_of != control {
                state.control_of = control;
                state.baseline = None;
            }
            let baseline = state.baseline.get_or_insert_with(|| counts.clone());
            if state.status != Status::Running {
                continue;
            }
            let window = counts.since(baseline);
            if let Some(verdict) = judge(r, state, &window, now) {
                apply(state, r, verdict, now);
                self.announce(state, state.decisions.len() - 1);
                self.save(state);
                changed = true;
            }
        }
        changed
    }

    /// Carries out an operator's action on `policy`'s rollout. The state
    /// it leads to, or why not.
    pub(crate) fn act(
        &self,
        policy: &ModelPolicy,
        action: Action,
        now: SystemTime,
    ) -> Result<State, ActionError> {
        let r = policy.rollout.as_ref().ok_or(ActionError::NoRollout)?;
        let mut states = self.states();
        let state = states
            .get_mut(&policy.model)
            .filter(|s| s.belongs_to(r))
            .ok_or_else(|| {
                ActionError::Conflict(
                    "the rollout has not started yet (it starts at the gateway's next tick)".into(),
                )
            })?;
        if self.fleet.is_some() {
            // A fleet carries it out at its next boundary, every replica
            // alike; here it is only checked and published.
            state
                .clone()
                .act(action, now, "operator")
                .map_err(ActionError::Conflict)?;
            state
                .requested
                .insert(action.as_str().to_string(), unix(now));
            self.save(state);
            return Ok(state.clone());
        }
        state
            .act(action, now, "operator")
            .map_err(ActionError::Conflict)?;
        self.announce(state, state.decisions.len() - 1);
        self.save(state);
        self.mark_dirty();
        Ok(state.clone())
    }

    /// Every rollout's state, with the current step's window so far (in a
    /// fleet, every replica's counts up to the last boundary judged, and
    /// the queries they come from).
    pub(crate) fn view(&self) -> Vec<serde_json::Value> {
        let states = self.states();
        states
            .values()
            .map(|s| {
                let window = match &self.fleet {
                    Some(_) => s.fleet_window.clone(),
                    None => s.baseline.as_ref().map(|baseline| {
                        let now = self
                            .read(
                                &s.model,
                                &s.champion,
                                &s.candidate,
                                baseline.control.is_some(),
                            )
                            .since(baseline);
                        Figures {
                            seconds: (unix(SystemTime::now()) - s.step_started_unix).max(0.0),
                            champion: Side::of(&now.champion),
                            candidate: Side::of(&now.candidate),
                            control: now.control.as_ref().map(Side::of),
                        }
                    }),
                };
                let mut value = serde_json::to_value(s).unwrap_or_default();
                if let Some(object) = value.as_object_mut() {
                    object.insert(
                        "window".into(),
                        serde_json::to_value(window).unwrap_or_default(),
                    );
                    if let Some(f) = &self.fleet {
                        object.insert(
                            "fleet".into(),
                            serde_json::json!({
                                "prometheus": f.prometheus.to_string(),
                                "interval_seconds": f.every.as_secs_f64(),
                                "delay_seconds": f.delay.as_secs_f64(),
                                "judged_until": s.fleet_at.map(|t| crate::decisions::rfc3339(at(t))),
                                "queries": fleet::queries(&s.model, &s.fingerprint, &s.champion, &s.candidate, &f.matchers),
                            }),
                        );
                    }
                }
                value
            })
            .collect()
    }

    /// The counts of a rollout's champion and candidate, and of the
    /// model's control group if it has one, now.
    fn read(&self, model: &str, champion: &str, candidate: &str, control: bool) -> Reads {
        Reads {
            champion: self.telemetry.tally(model, champion).read(),
            candidate: self.telemetry.tally(model, candidate).read(),
            control: control.then(|| self.telemetry.tally(model, CONTROL_TALLY).read()),
        }
    }

    /// Logs and counts a state's decisions from the `from`th on, and sets
    /// its gauges.
    fn announce(&self, state: &State, from: usize) {
        for d in state.decisions.iter().skip(from) {
            tracing::info!(
                model = %state.model,
                candidate = %state.candidate,
                outcome = d.outcome.as_str(),
                by = %d.by,
                step = d.step,
                percent = d.percent,
                gate = d.gate.as_deref().unwrap_or(""),
                at = %d.at,
                figures = %d.figures.as_ref().map(|f| serde_json::to_string(f).unwrap_or_default()).unwrap_or_default(),
                "rollout: {}",
                d.reason
            );
            self.telemetry.count_rollout(
                &state.model,
                d.outcome.as_str(),
                d.gate.as_deref().unwrap_or(""),
            );
            let mut unrecorded = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
            while unrecorded.len() >= MAX_UNRECORDED {
                unrecorded.pop_front();
            }
            unrecorded.push_back(Unrecorded {
                time: SystemTime::now(),
                model: state.model.clone(),
                candidate: state.candidate.clone(),
                champion: state.champion.clone(),
                body: serde_json::json!({
                    "candidate": state.candidate,
                    "champion": state.champion,
                    "fingerprint": state.fingerprint,
                    "status": state.status,
                    "decision": d,
                }),
            });
        }
        self.telemetry.set_rollout(
            &state.model,
            state.step as f64 + 1.0,
            state.percent,
            Some(state.status.as_str()),
        );
    }

    fn file(&self, model: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("rollout-{model}.json")))
    }

    /// Writes a state atomically (a new file renamed over the old); a
    /// failure is logged, and the rollout goes on in memory.
    fn save(&self, state: &State) {
        let Some(path) = self.file(&state.model) else {
            return;
        };
        if let Err(e) = write_atomically(&path, state) {
            tracing::error!(file = %path.display(), error = %e, "cannot write the rollout state; a restart would not resume this step");
        }
    }

    fn forget(&self, model: &str) {
        if let Some(path) = self.file(model)
            && let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove an ended rollout's state");
        }
        self.telemetry.end_rollout(model);
        tracing::info!(model, "rollout ended: the policy has no [rollout]");
    }
}

impl policy::Route for Rollouts {
    /// Serves a model with a rollout as its state says: the file's
    /// champion, and the candidate at the step's percent; the candidate as
    /// champion once promoted; no canary once rolled back. A rollout not
    /// started yet (or edited) serves its first step.
    fn apply(&self, policy: &mut ModelPolicy) {
        let Some(r) = &policy.rollout else { return };
        let states = self.states();
        let state = states.get(&policy.model).filter(|s| s.belongs_to(r));
        let (status, percent) =
            state.map_or((Status::Running, r.steps[0]), |s| (s.status, s.percent));
        policy.champion = r.champion.clone();
        policy.canary = None;
        match status {
            Status::Promoted => policy.champion = r.candidate.clone(),
            Status::Failed => {}
            Status::Running | Status::Paused => {
                policy.canary = Some(Canary {
                    version: r.candidate.clone(),
                    percent,
                    sticky_header: r.sticky_header.clone(),
                });
            }
        }
    }
}

/// What the gates decided about a step.
enum Verdict {
    Pass(Figures),
    Fail {
        gate: &'static str,
        reason: String,
        figures: Figures,
    },
}

/// Judges a running step: `None` while it must go on (too short, too few
/// requests, comparisons or judged rows). At a step where the champion
/// serves nothing (100 %), it is compared with the champion's figures of
/// the step before, and there are no shadow copies to judge.
fn judge(r: &Rollout, state: &State, window: &Reads, now: SystemTime) -> Option<Verdict> {
    let seconds = (unix(now) - state.step_started_unix).max(0.0);
    let g = &r.gates;
    let candidate = Side::of(&window.candidate);
    let control = window.control.as_ref().map(Side::of);
    let champion_serves = state.percent < 100.0;
    let champion = if champion_serves {
        Side::of(&window.champion)
    } else {
        state
            .decisions
            .iter()
            .rev()
            .find_map(|d| d.figures.as_ref().map(|f| f.champion.clone()))
            .unwrap_or_else(|| Side::of(&window.champion))
    };
    // Accuracy is compared with the control group when there is one.
    let reference = control.clone().unwrap_or_else(|| champion.clone());
    if seconds < r.step_time.as_secs_f64() || candidate.requests < r.step_requests {
        return None;
    }
    let shadow_gate = g.min_shadow_agreement.filter(|_| champion_serves);
    if shadow_gate.is_some() && candidate.compared < r.step_requests {
        return None;
    }
    if g.min_accuracy_change.is_some()
        && (candidate.judged < g.min_feedback || reference.judged < g.min_feedback)
    {
        return None;
    }
    let fail = |gate, reason| {
        Some(Verdict::Fail {
            gate,
            reason,
            figures: Figures {
                seconds,
                champion: champion.clone(),
                candidate: candidate.clone(),
                control: control.clone(),
            },
        })
    };
    let rate = |s: &Side| s.error_rate.unwrap_or(0.0);
    if rate(&candidate) - rate(&champion) > g.max_error_rate_increase {
        return fail(
            "error_rate",
            format!(
                "the candidate failed {:.2} % of its requests, the champion {:.2} %: more than {:.2} points worse",
                rate(&candidate) * 100.0,
                rate(&champion) * 100.0,
                g.max_error_rate_increase * 100.0
            ),
        );
    }
    // The candidate's p99 over the limit means more than 1 % of its
    // requests took longer: counted, so that one slow request among a
    // few dozen (whose p99 is their slowest) never fails the gate.
    if let Some(theirs) = champion.p99_ms {
        let limit_ms = g.max_p99_ratio * theirs.max(1.0);
        let slow = window
            .candidate
            .slower_than(std::time::Duration::from_secs_f64(limit_ms / 1e3));
        if slow >= 2 && slow as f64 > 0.01 * candidate.requests as f64 {
            return fail(
                "p99_latency",
                format!(
                    "{slow} of the candidate's {} requests took longer than {limit_ms:.1} ms ({}x the champion's p99 of {theirs:.1} ms): its p99 is {:.1} ms",
                    candidate.requests,
                    g.max_p99_ratio,
                    candidate.p99_ms.unwrap_or(0.0)
                ),
            );
        }
    }
    if let (Some(min), Some(agreement)) = (shadow_gate, candidate.agreement)
        && agreement < min
    {
        return fail(
            "shadow_agreement",
            format!(
                "the candidate agreed with the champion on {:.1} % of the shadow copies, below {:.1} %",
                agreement * 100.0,
                min * 100.0
            ),
        );
    }
    if let (Some(min), Some(ours), Some(theirs)) = (
        g.min_accuracy_change,
        candidate.accuracy,
        reference.accuracy,
    ) && ours - theirs < min
    {
        return fail(
            "accuracy",
            format!(
                "the candidate's accuracy on ground truth is {:.1} %, the {}'s {:.1} %: a change of {:+.1} points, below {:+.1}",
                ours * 100.0,
                if control.is_some() {
                    "control group"
                } else {
                    "champion"
                },
                theirs * 100.0,
                (ours - theirs) * 100.0,
                min * 100.0
            ),
        );
    }
    if let Some(max) = g.max_prediction_psi
        && let Some(psi) = prediction_psi(&candidate.predicted, &champion.predicted)
        && psi > max
    {
        return fail(
            "prediction_drift",
            format!(
                "the labels the candidate predicted are distributed unlike the champion's: a population stability index of {psi:.3}, above {max}"
            ),
        );
    }
    if let Some(max) = g.max_input_psi
        && let Some((feature, psi)) = candidate
            .inputs
            .iter()
            .filter_map(|(feature, bins)| {
                let theirs = champion.inputs.get(feature)?;
                Some((feature, psi(bins, theirs)?))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1))
        && psi > max
    {
        return fail(
            "input_drift",
            format!(
                "the candidate's inputs are distributed unlike the champion's: `{feature}` has a population stability index of {psi:.3}, above {max}"
            ),
        );
    }
    Some(Verdict::Pass(Figures {
        seconds,
        champion,
        candidate,
        control,
    }))
}

/// Carries out the gates' verdict on a running rollout.
fn apply(state: &mut State, r: &Rollout, verdict: Verdict, now: SystemTime) {
    match verdict {
        Verdict::Fail {
            gate,
            reason,
            figures,
        } => {
            state.status = Status::Failed;
            state.percent = 0.0;
            state.decide(
                now,
                Outcome::RolledBack,
                "rollout",
                Some(gate),
                reason,
                Some(figures),
            );
        }
        Verdict::Pass(figures) if state.step + 1 < r.steps.len() => {
            let from = state.percent;
            let next = state.step + 1;
            state.begin_step(next, now);
            let reason = format!("every gate passed at {from} %: on to {} %", state.percent);
            state.decide(
                now,
                Outcome::Advanced,
                "rollout",
                None,
                reason,
                Some(figures),
            );
        }
        Verdict::Pass(figures) => {
            state.status = Status::Promoted;
            state.percent = 100.0;
            let reason = format!(
                "every gate passed at the last step: `{}` is the champion",
                r.candidate
            );
            state.decide(
                now,
                Outcome::Promoted,
                "rollout",
                None,
                reason,
                Some(figures),
            );
        }
    }
}

/// The population stability index of the labels a candidate predicted
/// against the reference's, over the labels either predicted; `None`
/// unless both predicted something.
fn prediction_psi(ours: &BTreeMap<String, u64>, reference: &BTreeMap<String, u64>) -> Option<f64> {
    let labels: std::collections::BTreeSet<&String> = ours.keys().chain(reference.keys()).collect();
    let count = |m: &BTreeMap<String, u64>| -> Vec<u64> {
        labels
            .iter()
            .map(|l| m.get(*l).copied().unwrap_or(0))
            .collect()
    };
    psi(&count(ours), &count(reference))
}

/// The population stability index of the candidate's counts against the
/// reference's, on the same bins (a feature's, or the labels both
/// predicted); `None` unless both counted something.
fn psi(ours: &[u64], theirs: &[u64]) -> Option<f64> {
    let total: u64 = theirs.iter().sum();
    if total == 0 || ours.iter().sum::<u64>() == 0 || ours.len() != theirs.len() {
        return None;
    }
    let expected: Vec<f64> = theirs.iter().map(|n| *n as f64 / total as f64).collect();
    Some(crate::monitor::psi(ours, &expected))
}

fn read_state(path: &Path) -> Result<State, String> {
    let text = std::fs::read(path).map_err(|e| e.to_string())?;
    let state: State = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    if state.schema != SCHEMA {
        return Err(format!(
            "schema {} (this gateway reads {SCHEMA})",
            state.schema
        ));
    }
    if state.steps.is_empty() {
        return Err("no steps".into());
    }
    Ok(state)
}

fn write_atomically(path: &Path, state: &State) -> std::io::Result<()> {
    use std::io::Write as _;
    let temp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Gates;

    pub(super) fn rollout() -> Rollout {
        Rollout {
            candidate: "v2".into(),
            champion: "v1".into(),
            steps: vec![50.0, 100.0],
            step_time: std::time::Duration::from_secs(1),
            step_requests: 10,
            sticky_header: "x-routing-key".into(),
            gates: Gates {
                max_error_rate_increase: 0.01,
                max_p99_ratio: 2.0,
                min_accuracy_change: Some(-0.02),
                min_feedback: 5,
                min_shadow_agreement: None,
                max_prediction_psi: None,
                max_input_psi: None,
            },
        }
    }

    fn reads(champion: Counts, candidate: Counts) -> Reads {
        Reads {
            champion,
            candidate,
            control: None,
        }
    }

    fn counts(requests: u64, errors: u64, correct: u64, wrong: u64) -> Counts {
        let mut c = Counts {
            requests,
            errors,
            correct,
            wrong,
            ..Counts::default()
        };
        c.latency[0] = requests;
        c
    }

    #[test]
    fn steps_wait_for_their_time_requests_and_truth_then_judge_against_the_champion() {
        let r = rollout();
        let start = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let mut state = State::start("m", &r, start, "policy", "test".into());
        let later = start + std::time::Duration::from_secs(2);
        let healthy = reads(counts(100, 0, 90, 10), counts(20, 0, 18, 2));
        // Too early, too few requests, too little truth: the step goes on.
        assert!(judge(&r, &state, &healthy, start).is_none());
        assert!(
            judge(
                &r,
                &state,
                &reads(counts(100, 0, 9, 1), counts(9, 0, 9, 0)),
                later
            )
            .is_none()
        );
        assert!(
            judge(
                &r,
                &state,
                &reads(counts(100, 0, 90, 10), counts(20, 0, 3, 1)),
                later
            )
            .is_none()
        );
        let Some(Verdict::Pass(figures)) = judge(&r, &state, &healthy, later) else {
            panic!("a healthy step passes");
        };
        apply(&mut state, &r, Verdict::Pass(figures), later);
        assert_eq!(
            (state.step, state.percent, state.status),
            (1, 100.0, Status::Running)
        );
        // At 100 % the champion serves nothing: the candidate is judged
        // against the champion's figures of the step before.
        let end = later + std::time::Duration::from_secs(2);
        let worse = reads(Counts::default(), counts(20, 0, 16, 4));
        match judge(&r, &state, &worse, end) {
            Some(Verdict::Fail { gate, figures, .. }) => {
                assert_eq!(gate, "accuracy");
                assert_eq!(figures.champion.accuracy, Some(0.9));
            }
            _ => panic!("80 % against the champion's 90 % fails"),
        }
        let failing = reads(counts(100, 0, 90, 10), counts(20, 1, 18, 2));
        match judge(&r, &state, &failing, end) {
            Some(Verdict::Fail { gate, .. }) => assert_eq!(gate, "error_rate"),
            _ => panic!("5 % errors against none fails"),
        }
        // With a control group, accuracy is compared with it instead.
        let with_control = Reads {
            control: Some(counts(50, 0, 50, 0)),
            ..healthy.clone()
        };
        match judge(&r, &state, &with_control, end) {
            Some(Verdict::Fail { gate, reason, .. }) => {
                assert_eq!(gate, "accuracy");
                assert!(reason.contains("the control group's 100.0 %"), "{reason}");
            }
            _ => panic!("90 % against the control group's 100 % fails"),
        }
        let verdict = judge(&r, &state, &healthy, end).unwrap();
        apply(&mut state, &r, verdict, end);
        assert_eq!((state.status, state.percent), (Status::Promoted, 100.0));
        let outcomes: Vec<_> = state.decisions.iter().map(|d| d.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Started, Outcome::Advanced, Outcome::Promoted]
        );
    }
}
