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
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use crate::router::Route;
use crate::telemetry::Telemetry;
use crate::tensor::Tensor;

/// Requests whose predictions a model keeps, by default.
pub(crate) const KEEP_REQUESTS: usize = 100_000;

/// Bytes of predictions a model keeps.
pub(crate) const KEEP_BYTES: usize = 32 << 20;

/// A label longer than this is kept cut; labels are compared by their
/// first [`MAX_LABEL_BYTES`] bytes.
pub(crate) const MAX_LABEL_BYTES: usize = 128;

/// Distinct labels a model's confusion matrix tells apart: the first the
/// versions predict. The rest, and a truth none has predicted yet, count
/// as [`OTHER`].
pub(crate) const MAX_LABELS: usize = 32;

/// The label standing for labels past [`MAX_LABELS`].
pub(crate) const OTHER: &str = "_other";

/// Predictions of one request by one version.
#[derive(Clone, Debug)]
struct Prediction {
    version: Arc<str>,
    route: Route,
    /// One label per row.
    labels: Box<[Arc<str>]>,
}

struct Entry {
    /// The request's id. Entries are found by its hash: two ids with one
    /// hash (keyed, so a 2^-64 chance for any two) count as one request.
    id: Arc<str>,
    predictions: Vec<Prediction>,
    judged: bool,
    bytes: usize,
    /// The entry's place in [`Kept::order`].
    seq: u64,
}

/// A `HashMap` hasher for keys that are hashes already (the keyed hashes
/// of request ids): hashing them again would only cost time.
#[derive(Default)]
struct Hashed(u64);

impl Hasher for Hashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type ByHash = BuildHasherDefault<Hashed>;

/// One model's predictions, oldest first. Every request id is hashed once,
/// when its answer is kept; the entry, its place and the memory of it
/// once let go are all found by that hash.
#[derive(Default)]
struct Kept {
    /// Id hashes in the order their served answers came, with their place:
    /// an id answered again moves to the back (its earlier place is
    /// skipped).
    order: VecDeque<(u64, u64)>,
    next_seq: u64,
    entries: HashMap<u64, Entry, ByHash>,
    bytes: usize,
    /// Hashes of the ids let go, to tell late feedback from unknown.
    gone: VecDeque<u64>,
    gone_set: HashSet<u64, ByHash>,
    /// The labels the confusion matrix tells apart: labels the versions
    /// predicted, the first [`MAX_LABELS`] of them. A client's truth never
    /// takes one: a truth no version has predicted is [`OTHER`].
    labels: HashSet<Arc<str>>,
    /// The versions' names, shared by their predictions.
    versions: Vec<Arc<str>>,
}

/// Version names a model shares between its predictions; a name past them
/// is copied into each.
const MAX_VERSIONS: usize = 64;

/// `text` as a shared string: the one in `known` if it is there, else a
/// new one, which `known` keeps while it has fewer than `cap`.
fn shared(known: &mut Vec<Arc<str>>, cap: usize, text: &str) -> Arc<str> {
    if let Some(found) = known.iter().find(|k| ***k == *text) {
        return found.clone();
    }
    let new: Arc<str> = Arc::from(text);
    if known.len() < cap {
        known.push(new.clone());
    }
    new
}

/// The labels of an answer, one per row, cut; rows with the same label
/// share its string. Also the distinct labels, the first [`MAX_LABELS`].
fn request_labels(data: &[u8]) -> (Box<[Arc<str>]>, Vec<Arc<str>>) {
    let mut distinct: Vec<Arc<str>> = Vec::new();
    let labels = crate::tensor::bytes_elements(data)
        .map_while(Result::ok)
        .map(|raw| {
            shared(
                &mut distinct,
                MAX_LABELS,
                &cut(&String::from_utf8_lossy(raw)),
            )
        })
        .collect();
    (labels, distinct)
}

/// The entry of request `id`, whose hash is `hash`.
fn entry<'a>(
    entries: &'a mut HashMap<u64, Entry, ByHash>,
    hash: u64,
    id: &str,
) -> Option<&'a mut Entry> {
    entries.get_mut(&hash).filter(|e| &*e.id == id)
}

impl Kept {
    /// `version`'s name, shared between its predictions.
    fn version(&mut self, version: &str) -> Arc<str> {
        shared(&mut self.versions, MAX_VERSIONS, version)
    }

    /// Remembers `hash`'s id as let go, for the next `keep` ids let go.
    fn forget(&mut self, hash: u64, keep: usize) {
        if self.gone_set.insert(hash) {
            self.gone.push_back(hash);
        }
        while self.gone.len() > keep {
            if let Some(h) = self.gone.pop_front() {
                self.gone_set.remove(&h);
            }
        }
    }
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
    /// entry (replacing one of an earlier request with the same id, which
    /// moves to the back); a shadow copy's joins it, and is let go if the
    /// served answer was not kept.
    pub(crate) fn keep(
        &self,
        model: &str,
        id: &Arc<str>,
        version: &str,
        route: Route,
        labels: &Tensor,
    ) {
        // Read before the model's lock is taken: a big batch costs its own
        // request, not the model's other requests.
        let (labels, distinct) = request_labels(&labels.data);
        let bytes =
            id.len() + version.len() + labels.iter().map(|l| l.len() + 16).sum::<usize>() + 96;
        let hash = self.hash(id);
        let kept = self.model(model);
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        let kept = &mut *kept;
        if bytes > KEEP_BYTES / 64 {
            // One request may not take a sixty-fourth of the model's room:
            // its feedback will be late.
            if route != Route::Shadow {
                if let Some(entry) = entry(&mut kept.entries, hash, id) {
                    let entry_bytes = entry.bytes;
                    kept.entries.remove(&hash);
                    kept.bytes -= entry_bytes;
                }
                kept.forget(hash, self.keep);
            }
            return;
        }
        // Predicted labels take the series' label values, within the
        // model's cap.
        for label in distinct {
            if kept.labels.len() >= MAX_LABELS {
                break;
            }
            if !kept.labels.contains(&label) {
                kept.labels.insert(label);
            }
        }
        let prediction = Prediction {
            version: kept.version(version),
            route,
            labels,
        };
        match (entry(&mut kept.entries, hash, id), route) {
            (Some(entry), Route::Shadow) => {
                if entry.predictions.len() < 64 {
                    entry.predictions.push(prediction);
                    entry.bytes += bytes;
                    kept.bytes += bytes;
                }
            }
            (None, Route::Shadow) => {}
            (_, _) => {
                let seq = kept.next_seq;
                kept.next_seq += 1;
                let entry = Entry {
                    id: id.clone(),
                    predictions: vec![prediction],
                    judged: false,
                    bytes,
                    seq,
                };
                // An earlier request with this id is replaced; one with
                // another id and the same hash is let go.
                if let Some(old) = kept.entries.insert(hash, entry) {
                    kept.bytes -= old.bytes;
                    if *old.id != **id {
                        kept.forget(hash, self.keep);
                    }
                }
                kept.order.push_back((hash, seq));
                kept.bytes += bytes;
            }
        }
        while kept.order.len() > self.keep || kept.bytes > KEEP_BYTES {
            let Some((old, seq)) = kept.order.pop_front() else {
                break;
            };
            if kept.entries.get(&old).is_none_or(|e| e.seq != seq) {
                // Answered again since: its entry is further back.
                continue;
            }
            if let Some(entry) = kept.entries.remove(&old) {
                kept.bytes -= entry.bytes;
            }
            kept.forget(old, self.keep);
        }
    }

    /// Joins the true labels of request `id` (one per row) to what every
    /// version answered, counting each row right or wrong per version and
    /// in the confusion matrix. The truth must have as many rows as the
    /// served answer; a challenger that answered another number of rows
    /// is left out.
    pub(crate) fn judge(
        &self,
        telemetry: &Telemetry,
        model: &str,
        id: &str,
        truth: &[String],
    ) -> Outcome {
        let kept = self.model(model);
        let judged: Vec<Judged> = {
            let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
            let kept = &mut *kept;
            let hash = self.hash(id);
            let Some(entry) = entry(&mut kept.entries, hash, id) else {
                return if kept.gone_set.contains(&hash) {
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
                .first()
                .is_none_or(|served| served.labels.len() != truth.len())
            {
                return Outcome::RowsMismatch;
            }
            entry.judged = true;
            let predictions: Vec<&Prediction> = entry
                .predictions
                .iter()
                .filter(|p| p.labels.len() == truth.len())
                .collect();
            let names = &kept.labels;
            let name = |label: &str| -> &str { names.get(label).map_or(OTHER, |l| &**l) };
            let truth: Vec<std::borrow::Cow<'_, str>> = truth.iter().map(|t| cut(t)).collect();
            let actual: Vec<&str> = truth.iter().map(|t| name(t)).collect();
            predictions
                .iter()
                .map(|p| {
                    let mut correct = 0u64;
                    let mut cells: HashMap<(&str, &str), u64> = HashMap::new();
                    for ((label, truth), actual) in p.labels.iter().zip(&truth).zip(&actual) {
                        correct += u64::from(**label == **truth);
                        *cells.entry((name(label), actual)).or_default() += 1;
                    }
                    Judged {
                        version: p.version.clone(),
                        route: p.route,
                        correct,
                        wrong: truth.len() as u64 - correct,
                        cells: cells
                            .into_iter()
                            .map(|((p, a), n)| (p.into(), a.into(), n))
                            .collect(),
                    }
                })
                .collect()
        };
        for j in judged {
            telemetry.record_truth(model, &j.version, j.route.as_str(), j.correct, j.wrong);
            for (predicted, actual, n) in &j.cells {
                telemetry.record_confusion(model, &j.version, predicted, actual, *n);
            }
        }
        Outcome::Joined
    }
}

/// One version's answer to a request, judged: what goes to the metrics
/// once the lock is let go.
struct Judged {
    version: Arc<str>,
    route: Route,
    correct: u64,
    wrong: u64,
    /// (predicted, actual, rows) of the confusion matrix.
    cells: Vec<(Box<str>, Box<str>, u64)>,
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

/// What parsing a feedback body may take, at most, per byte of it: each
/// label of three bytes of JSON (`"",`) becomes a `String` (24 bytes) and
/// its element of the batch, and every item is capped.
pub(crate) const PARSED_BYTES_PER_BYTE: usize = 10;

/// A feedback body as a client sends it: one item's fields, or a batch.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    feedback: Option<Capped<Item, MAX_ITEMS>>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    labels: Option<Capped<String, MAX_ROWS>>,
}

/// An array of at most `N` elements: the parser stops at the one past it,
/// so a body of many tiny items never becomes a vector of them.
struct Capped<T, const N: usize>(Vec<T>);

impl<'de, T: serde::Deserialize<'de>, const N: usize> serde::Deserialize<'de> for Capped<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Elements<T, const N: usize>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for Elements<T, N> {
            type Value = Capped<T, N>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an array of at most {N} elements")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut elements = Vec::new();
                while let Some(element) = seq.next_element()? {
                    if elements.len() == N {
                        return Err(serde::de::Error::custom(format!(
                            "more than {N} elements; at most {N} in one request"
                        )));
                    }
                    elements.push(element);
                }
                Ok(Capped(elements))
            }
        }
        deserializer.deserialize_seq(Elements(std::marker::PhantomData))
    }
}

/// One request's truth.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    labels: Option<Capped<String, MAX_ROWS>>,
}

/// The most labels (rows) one feedback request may carry in all.
pub(crate) const MAX_ROWS: usize = 100_000;

/// Parses a feedback body: one item (`{"request_id": ..., "label": ...}`,
/// or `"labels": [...]`, one per row) or a batch (`{"feedback": [...]}`).
/// Every item is checked before any is applied.
pub(crate) fn parse(body: &[u8]) -> Result<Vec<(String, Vec<String>)>, String> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            "expected {\"request_id\": ..., \"label\": ...} or {\"feedback\": [...]}".into(),
        );
    }
    let body: Body =
        serde_json::from_slice(body).map_err(|e| format!("the body is not feedback: {e}"))?;
    let one = Item {
        request_id: body.request_id,
        label: body.label,
        labels: body.labels,
    };
    let (items, batch) = match body.feedback {
        Some(_) if one.request_id.is_some() || one.label.is_some() || one.labels.is_some() => {
            return Err("a batch has one field, `feedback`".into());
        }
        Some(items) => (items.0, true),
        None => (vec![one], false),
    };
    let rows: usize = items
        .iter()
        .map(|i| i.labels.as_ref().map_or(1, |l| l.0.len()))
        .sum();
    if rows > MAX_ROWS {
        return Err(format!("{rows} labels; at most {MAX_ROWS} in one request"));
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
            let Some(request_id) = item.request_id else {
                return Err(at("missing field `request_id`".into()));
            };
            crate::decisions::identity::check_request_id(&request_id)
                .map_err(|e| at(format!("`request_id`: {e}")))?;
            let labels = match (item.label, item.labels.map(|l| l.0)) {
                (Some(label), None) => vec![label],
                (None, Some(labels)) if !labels.is_empty() => labels,
                (None, Some(_)) => return Err(at("`labels` is empty".into())),
                _ => return Err(at("give `label` (one row) or `labels` (one per row)".into())),
            };
            Ok((request_id, labels))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label_tensor(rows: &[String]) -> Tensor {
        crate::tensor::bytes_tensor("label", rows)
    }

    #[test]
    fn rows_share_their_label_and_an_answer_too_big_to_keep_names_none() {
        let rows: Vec<String> = ["day", "week", "day"].map(String::from).to_vec();
        let (labels, distinct) = request_labels(&label_tensor(&rows).data);
        assert_eq!(labels.len(), 3);
        assert!(Arc::ptr_eq(&labels[0], &labels[2]));
        assert_eq!(distinct.len(), 2);

        let predictions = Predictions::new(10);
        let id: Arc<str> = Arc::from("a");
        // 5,000 labels of 120 bytes: over a sixty-fourth of the model's room.
        let huge: Vec<String> = (0..5000).map(|i| format!("{i:0>120}")).collect();
        predictions.keep("m", &id, "v1", Route::Champion, &label_tensor(&huge));
        {
            let kept = predictions.model("m");
            let kept = kept.lock().unwrap();
            assert!(kept.entries.is_empty());
            assert!(kept.labels.is_empty(), "a dropped answer named labels");
            assert!(kept.gone_set.contains(&predictions.hash("a")));
        }
        predictions.keep("m", &id, "v1", Route::Champion, &label_tensor(&rows));
        let kept = predictions.model("m");
        let kept = kept.lock().unwrap();
        assert_eq!(kept.entries.len(), 1);
        assert_eq!(kept.labels.len(), 2);
        assert_eq!(kept.bytes, 1 + 2 + (3 + 16) * 2 + (4 + 16) + 96);
    }
}
