//! Ground truth. What every version answered (the served version, and the
//! challengers on their shadow copies) is kept for a while per model, by
//! request id; the true labels that clients learn later
//! (`POST /v2/models/{model}/feedback`) are joined to it into per-version
//! accuracy and a confusion matrix. Feedback that comes too late (its
//! predictions were let go), for a request never seen, or a second time,
//! is counted, never an error.
//!
//! Bounded by construction: per model at most `--ground-truth-keep`
//! ([`KEEP_REQUESTS`] by default) requests
//! and [`KEEP_BYTES`] of predictions (the oldest go first, their ids
//! remembered as late), labels cut to [`MAX_LABEL_BYTES`], and the series
//! the confusion matrix may add capped at [`MAX_LABELS`] labels per model.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use crate::router::Route;
use crate::telemetry::Telemetry;
use crate::tensor::Tensor;

/// Requests whose predictions a model keeps, by default.
pub(crate) const KEEP_REQUESTS: usize = 100_000;

/// Bytes of predictions a model keeps.
pub(crate) const KEEP_BYTES: usize = 32 << 20;

/// A label longer than this is kept cut (and so never matches a truth).
pub(crate) const MAX_LABEL_BYTES: usize = 128;

/// Distinct labels (predicted or true) a model's confusion matrix tells
/// apart; the rest count as [`OTHER`].
pub(crate) const MAX_LABELS: usize = 32;

/// The label standing for labels past [`MAX_LABELS`].
pub(crate) const OTHER: &str = "_other";

/// Predictions of one request by one version.
#[derive(Clone, Debug)]
struct Prediction {
    version: Arc<str>,
    route: Route,
    /// One label per row.
    labels: Box<[Box<str>]>,
}

#[derive(Default)]
struct Entry {
    predictions: Vec<Prediction>,
    judged: bool,
    bytes: usize,
}

/// One model's predictions, oldest first.
#[derive(Default)]
struct Kept {
    order: VecDeque<Arc<str>>,
    entries: HashMap<Arc<str>, Entry>,
    bytes: usize,
    /// Hashes of the ids let go, to tell late feedback from unknown.
    gone: VecDeque<u64>,
    gone_set: HashSet<u64>,
    /// The labels the confusion matrix tells apart.
    labels: HashSet<Box<str>>,
}

/// What became of one piece of feedback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Joined to every version's answer to the request.
    Joined,
    /// Its request's predictions were let go (past the keep limits).
    Late,
    /// No request with that id was answered (or not since the start).
    Unknown,
    /// The request was judged already.
    Duplicate,
    /// The truth has another number of rows than the answers.
    RowsMismatch,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Joined => "joined",
            Outcome::Late => "late",
            Outcome::Unknown => "unknown",
            Outcome::Duplicate => "duplicate",
            Outcome::RowsMismatch => "rows_mismatch",
        }
    }

    pub(crate) const ALL: [Outcome; 5] = [
        Outcome::Joined,
        Outcome::Late,
        Outcome::Unknown,
        Outcome::Duplicate,
        Outcome::RowsMismatch,
    ];
}

/// Every model's kept predictions.
pub(crate) struct Predictions {
    models: RwLock<HashMap<String, Arc<Mutex<Kept>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Requests kept per model.
    keep: usize,
}

impl Predictions {
    pub(crate) fn new(keep: usize) -> Self {
        Predictions {
            models: RwLock::default(),
            hasher: std::collections::hash_map::RandomState::new(),
            keep: keep.max(1),
        }
    }

    fn model(&self, model: &str) -> Arc<Mutex<Kept>> {
        if let Some(kept) = self
            .models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return kept.clone();
        }
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(model.to_string())
            .or_default()
            .clone()
    }

    fn hash(&self, id: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(id.as_bytes());
        h.finish()
    }

    /// Keeps what `version` answered to request `id` (`labels`, the
    /// version's label output). A served answer starts the request's
    /// entry (replacing one of an earlier request with the same id);
    /// a shadow copy's joins it.
    pub(crate) fn keep(
        &self,
        model: &str,
        id: &Arc<str>,
        version: &str,
        route: Route,
        labels: &Tensor,
    ) {
        let labels: Box<[Box<str>]> = crate::tensor::bytes_elements(&labels.data)
            .map_while(Result::ok)
            .map(|l| cut(&String::from_utf8_lossy(l)).into())
            .collect();
        let bytes =
            id.len() + version.len() + labels.iter().map(|l| l.len() + 16).sum::<usize>() + 96;
        if bytes > KEEP_BYTES / 64 {
            // One request may not take a sixty-fourth of the model's room.
            return;
        }
        let prediction = Prediction {
            version: version.into(),
            route,
            labels,
        };
        let kept = self.model(model);
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        let kept = &mut *kept;
        match (kept.entries.get_mut(id), route) {
            (Some(entry), Route::Shadow) => {
                if entry.predictions.len() < 64 {
                    entry.predictions.push(prediction);
                    entry.bytes += bytes;
                    kept.bytes += bytes;
                }
            }
            (Some(entry), _) => {
                kept.bytes -= entry.bytes;
                *entry = Entry {
                    predictions: vec![prediction],
                    judged: false,
                    bytes,
                };
                kept.bytes += bytes;
            }
            (None, _) => {
                kept.entries.insert(
                    id.clone(),
                    Entry {
                        predictions: vec![prediction],
                        judged: false,
                        bytes,
                    },
                );
                kept.order.push_back(id.clone());
                kept.bytes += bytes;
            }
        }
        while kept.order.len() > self.keep || kept.bytes > KEEP_BYTES {
            let Some(old) = kept.order.pop_front() else {
                break;
            };
            if let Some(entry) = kept.entries.remove(&old) {
                kept.bytes -= entry.bytes;
            }
            let hash = self.hash(&old);
            if kept.gone_set.insert(hash) {
                kept.gone.push_back(hash);
            }
            while kept.gone.len() > self.keep {
                if let Some(h) = kept.gone.pop_front() {
                    kept.gone_set.remove(&h);
                }
            }
        }
    }

    /// Joins the true labels of request `id` (one per row) to what every
    /// version answered, counting each row right or wrong per version and
    /// in the confusion matrix.
    pub(crate) fn judge(
        &self,
        telemetry: &Telemetry,
        model: &str,
        id: &str,
        truth: &[String],
    ) -> Outcome {
        let kept = self.model(model);
        let (predictions, names) = {
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            let kept = &mut *kept;
            let Some(entry) = kept.entries.get_mut(id) else {
                return if kept.gone_set.contains(&self.hash(id)) {
                    Outcome::Late
                } else {
                    Outcome::Unknown
                };
            };
            if entry.judged {
                return Outcome::Duplicate;
            }
            if entry
                .predictions
                .iter()
                .any(|p| p.labels.len() != truth.len())
            {
                return Outcome::RowsMismatch;
            }
            entry.judged = true;
            let predictions = entry.predictions.clone();
            // The series' label values, within the model's cap.
            let mut name = |label: &str| -> String {
                if kept.labels.contains(label) {
                    label.to_string()
                } else if kept.labels.len() < MAX_LABELS {
                    kept.labels.insert(label.into());
                    label.to_string()
                } else {
                    OTHER.to_string()
                }
            };
            let names: Vec<(Vec<String>, Vec<String>)> = predictions
                .iter()
                .map(|p| {
                    let predicted = p.labels.iter().map(|l| name(l)).collect();
                    let actual = truth.iter().map(|t| name(&cut(t))).collect();
                    (predicted, actual)
                })
                .collect();
            (predictions, names)
        };
        for (p, (predicted, actual)) in predictions.iter().zip(names) {
            for ((label, truth), (predicted, actual)) in p
                .labels
                .iter()
                .zip(truth)
                .zip(predicted.iter().zip(&actual))
            {
                let correct = **label == *cut(truth);
                telemetry.record_truth(
                    model,
                    &p.version,
                    p.route.as_str(),
                    correct,
                    predicted,
                    actual,
                );
            }
        }
        Outcome::Joined
    }
}

/// `label` cut to [`MAX_LABEL_BYTES`] at a character boundary.
fn cut(label: &str) -> std::borrow::Cow<'_, str> {
    if label.len() <= MAX_LABEL_BYTES {
        return label.into();
    }
    let mut end = MAX_LABEL_BYTES;
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &label[..end]).into()
}

/// The most feedback items one request may carry.
pub(crate) const MAX_ITEMS: usize = 10_000;

/// The largest feedback body.
pub(crate) const MAX_BODY_BYTES: usize = 4 << 20;

/// One request's truth, as a client sends it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    request_id: String,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    labels: Option<Vec<String>>,
}

/// Parses a feedback body: one item (`{"request_id": ..., "label": ...}`,
/// or `"labels": [...]`, one per row) or a batch (`{"feedback": [...]}`).
/// Every item is checked before any is applied.
pub(crate) fn parse(body: &[u8]) -> Result<Vec<(String, Vec<String>)>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let (items, batch) = match value {
        serde_json::Value::Object(mut object) if object.contains_key("feedback") => {
            if object.len() > 1 {
                return Err("a batch has one field, `feedback`".into());
            }
            match object.remove("feedback") {
                Some(serde_json::Value::Array(items)) => (items, true),
                _ => return Err("`feedback` must be an array of items".into()),
            }
        }
        object @ serde_json::Value::Object(_) => (vec![object], false),
        _ => {
            return Err(
                "expected {\"request_id\": ..., \"label\": ...} or {\"feedback\": [...]}".into(),
            );
        }
    };
    if items.len() > MAX_ITEMS {
        return Err(format!(
            "{} items; at most {MAX_ITEMS} in one request",
            items.len()
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = |e: String| {
                if batch {
                    format!("feedback[{i}]: {e}")
                } else {
                    e
                }
            };
            let item: Item = serde_json::from_value(item).map_err(|e| at(e.to_string()))?;
            crate::decisions::identity::check_request_id(&item.request_id)
                .map_err(|e| at(format!("`request_id`: {e}")))?;
            let labels = match (item.label, item.labels) {
                (Some(label), None) => vec![label],
                (None, Some(labels)) if !labels.is_empty() => labels,
                (None, Some(_)) => return Err(at("`labels` is empty".into())),
                _ => return Err(at("give `label` (one row) or `labels` (one per row)".into())),
            };
            Ok((item.request_id, labels))
        })
        .collect()
}
