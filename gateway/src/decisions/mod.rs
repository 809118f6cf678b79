//! The decision log: one record for every inference request, answered or
//! failed, and for every shadow call, saying which version decided, why it
//! was chosen, and the exact artifacts (plugin and model files by SHA-256,
//! the policy file by SHA-256 and generation) that made the answer.
//!
//! The request path builds a [`Decision`] (a few reference counts and two
//! digests) and hands it to [`DecisionLog::record`], which never waits: a
//! bounded queue feeds a thread that writes JSON lines (see `sink`). A full
//! queue or a failing disk drops records and counts them; it never slows or
//! fails a request. Each line carries the SHA-256 of the line before it, so
//! `gateway log verify` finds a record removed or changed.

mod forward;
pub(crate) mod identity;
pub(crate) mod read;
mod sink;
pub(crate) use sink::lock as lock_folder;
pub mod verify;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use crate::http_url::HttpUrl as SinkUrl;
pub(crate) use identity::Identity;

use crate::contract::Sha256;
use crate::router::{Draw, Model, Route, Version};
use crate::tensor::Tensor;

/// The version of the record's layout, in every record (`schema`).
pub const SCHEMA: u32 = 1;

/// Where and how decision records are kept.
#[derive(Clone, Debug)]
pub struct DecisionLogConfig {
    /// The folder of the log files (`decisions.jsonl` and rotated ones).
    pub dir: PathBuf,
    /// A file is rotated when it reaches this size.
    pub max_file_bytes: u64,
    /// Rotated files kept; the oldest is removed past it.
    pub max_files: usize,
    /// Records waiting for the writer; more are dropped and counted.
    pub buffer: usize,
    /// Recent records kept in memory for `GET /admin/decisions/{id}`.
    pub recent: usize,
    /// Where the records written are also sent, as CloudEvents.
    pub sink: Option<SinkUrl>,
}

impl DecisionLogConfig {
    pub fn new(dir: PathBuf) -> Self {
        DecisionLogConfig {
            dir,
            max_file_bytes: 64 << 20,
            max_files: 16,
            buffer: 8192,
            recent: 10_000,
            sink: None,
        }
    }
}

/// What one request (or shadow call) decided.
pub(crate) struct Decision {
    pub time: SystemTime,
    pub identity: Identity,
    pub target: Target,
    /// The generation of the policies that served it.
    pub generation: u64,
    pub route: Route,
    /// The canary's draw, for an unpinned request of a model with a canary.
    pub draw: Option<Draw>,
    pub inputs_sha256: Option<Sha256>,
    pub outputs_sha256: Option<Sha256>,
    /// The tensors themselves, for a request the policy samples.
    pub payload: Payload,
    pub validation: Validation,
    pub status: u16,
    /// The error's kind and message, for a failed request.
    pub error: Option<(&'static str, String)>,
    pub latency: Duration,
}

/// What the log writes: a request's (or shadow call's) decision, or a
/// note of another kind (a rollout's decision), each a record of the one
/// chain.
#[expect(
    clippy::large_enum_variant,
    reason = "a request's decision travels by value, as it did alone: boxing it would allocate once per request"
)]
pub(crate) enum Entry {
    Request(Decision),
    Note(Note),
}

/// A record of something other than a request: `{"kind": KIND, KIND:
/// body}` beside the chain's fields, found by `request_id` like a
/// request's (`rollout:<model>` for a rollout's decisions).
pub(crate) struct Note {
    pub time: SystemTime,
    pub kind: &'static str,
    pub id: Arc<str>,
    pub model: String,
    pub body: serde_json::Value,
}

impl Entry {
    fn id(&self) -> &Arc<str> {
        match self {
            Entry::Request(d) => &d.identity.request_id,
            Entry::Note(n) => &n.id,
        }
    }

    fn time(&self) -> SystemTime {
        match self {
            Entry::Request(d) => d.time,
            Entry::Note(n) => n.time,
        }
    }
}

/// The files a version is made of, by SHA-256, as records name them.
pub(crate) fn artifacts_of(version: &Version) -> serde_json::Value {
    serde_json::to_value(sink::Artifacts::of(&version.backend)).unwrap_or_default()
}

/// The tensors a sampled request's record keeps (the policy's
/// `[record] sample_percent`), within `record.max_kib` and the log's
/// budget for tensors waiting to be written ([`PAYLOAD_BYTES`]).
#[derive(Default)]
pub(crate) struct Payload {
    /// A served request's inputs (a shadow copy's are its request's).
    pub inputs: Option<Vec<Tensor>>,
    pub outputs: Option<Vec<Tensor>>,
    /// Why a sampled request's tensors, or some of them, are not kept.
    pub omitted: Option<String>,
    /// What the tensors hold of the log's budget, given back when the
    /// record is written (or dropped).
    held: Option<(Arc<AtomicUsize>, usize)>,
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some((budget, bytes)) = self.held.take() {
            budget.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// The bytes of tensors that records waiting to be written may hold
/// together: a stalled disk must not turn the queue of 8,192 records into
/// gigabytes.
const PAYLOAD_BYTES: usize = 64 << 20;

/// The bytes `tensors` take in a record, bounded from above: the data
/// (before base64), each name as if every character were escaped, each
/// dimension of the shape, and the fields around them.
pub(crate) fn recorded_size(tensors: &[Tensor]) -> usize {
    tensors
        .iter()
        .map(|t| t.data.len() + t.name.len() * 6 + t.shape.len() * 21 + 96)
        .sum()
}

impl Payload {
    /// Keeps `tensors` (the inputs, or the outputs) for the record if,
    /// with what it keeps already, they stay within `limit` bytes (see
    /// [`recorded_size`]) and the log's budget has room; otherwise says
    /// why in `omitted` and keeps nothing more.
    pub(crate) fn keep(
        &mut self,
        log: &DecisionLog,
        tensors: &[Tensor],
        limit: usize,
        inputs: bool,
    ) {
        if self.omitted.is_some() {
            return;
        }
        let what = if inputs { "inputs" } else { "outputs" };
        let size = recorded_size(tensors);
        let kept = self.held.as_ref().map_or(0, |(_, n)| *n);
        if kept + size > limit {
            let already = if kept > 0 {
                format!(", with {kept} kept already")
            } else {
                String::new()
            };
            self.omitted = Some(format!(
                "the {what} ({size} bytes as recorded{already}) are over the policy's record.max_kib ({limit} bytes)"
            ));
            return;
        }
        let budget = &log.payload_bytes;
        if budget.fetch_add(size, Ordering::AcqRel) + size > PAYLOAD_BYTES {
            budget.fetch_sub(size, Ordering::AcqRel);
            self.omitted = Some(format!(
                "the {what} did not fit the {} MiB the log holds for tensors waiting to be written",
                PAYLOAD_BYTES >> 20
            ));
            return;
        }
        self.held = Some((budget.clone(), kept + size));
        let copy = Some(tensors.to_vec());
        if inputs {
            self.inputs = copy;
        } else {
            self.outputs = copy;
        }
    }
}

/// A tensor as a record keeps it: its data laid out as the V2 binary
/// extension does (little-endian; each BYTES element after its 4-byte
/// length), in standard base64.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct RecordedTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data_base64: String,
}

impl RecordedTensor {
    pub(crate) fn of(tensor: &Tensor) -> Self {
        use base64::Engine as _;
        RecordedTensor {
            name: tensor.name.clone(),
            datatype: tensor.datatype.as_v2().to_string(),
            shape: tensor.shape.clone(),
            data_base64: base64::engine::general_purpose::STANDARD.encode(&tensor.data),
        }
    }

    /// The tensor back, its layout checked.
    pub(crate) fn tensor(&self) -> Result<Tensor, String> {
        use base64::Engine as _;
        let datatype = crate::contract::Datatype::from_v2(&self.datatype).ok_or_else(|| {
            format!(
                "tensor `{}`: unknown datatype `{}`",
                self.name, self.datatype
            )
        })?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(&self.data_base64)
            .map_err(|e| format!("tensor `{}`: its data is not base64: {e}", self.name))?;
        let tensor = Tensor {
            name: self.name.clone(),
            datatype,
            shape: self.shape.clone(),
            data,
        };
        crate::tensor::check_layout(&tensor).map_err(|e| format!("tensor `{}`: {e}", self.name))?;
        Ok(tensor)
    }
}

/// Who the request reached.
pub(crate) enum Target {
    /// A version of a model (and so its artifacts and policy).
    Version {
        model: Arc<Model>,
        version: Arc<Version>,
    },
    /// A model or version the policies do not have.
    Unknown {
        model: String,
        version: Option<String>,
    },
}

/// How the inputs fared against the declaration and the policy's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Validation {
    /// The request failed before its inputs were checked.
    NotReached,
    Passed,
    /// Broke value rules in `flag` mode, and was served.
    Flagged,
    Failed,
}

impl Validation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Validation::NotReached => "not_reached",
            Validation::Passed => "passed",
            Validation::Flagged => "flagged",
            Validation::Failed => "failed",
        }
    }
}

/// The longest error text a record keeps (a request's own text can be
/// megabytes: a tensor name, say).
pub(crate) const MAX_ERROR_BYTES: usize = 1024;

/// `text` cut to [`MAX_ERROR_BYTES`] at a character boundary, marked.
pub(crate) fn cut(mut text: String) -> String {
    if text.len() > MAX_ERROR_BYTES {
        let mut end = MAX_ERROR_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("... (cut)");
    }
    text
}

/// A digest of tensors: every tensor's name, datatype, shape and data, in
/// order, each length-prefixed, so two different requests never share one.
pub(crate) fn digest(tensors: &[Tensor]) -> Sha256 {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |bytes: &[u8]| {
        context.update(&(bytes.len() as u64).to_le_bytes());
        context.update(bytes);
    };
    for t in tensors {
        field(t.name.as_bytes());
        field(t.datatype.as_v2().as_bytes());
        let shape: Vec<u8> = t.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
        field(&shape);
        field(&t.data);
    }
    let mut out = [0; 32];
    out.copy_from_slice(context.finish().as_ref());
    Sha256(out)
}

/// Counts of what the log did with the records it was given.
#[derive(Default)]
pub(crate) struct Counters {
    pub written: AtomicU64,
    pub dropped_full: AtomicU64,
    pub dropped_failed: AtomicU64,
    /// Records the network sink delivered, or dropped (its queue full, or
    /// the endpoint failing); the file has them all the same.
    pub sent: AtomicU64,
    pub sink_full: AtomicU64,
    pub sink_failed: AtomicU64,
}

/// The recent records by request id, for the admin API: at most `limit`
/// of them and [`RECENT_BYTES`] together.
pub(crate) struct Recent {
    limit: usize,
    lines: Mutex<Lines>,
}

/// Request ids and their records, oldest first, and their bytes together.
type Lines = (VecDeque<(Arc<str>, String)>, usize);

/// The bytes the recent records may hold together.
const RECENT_BYTES: usize = 16 << 20;

impl Recent {
    fn push(&self, id: Arc<str>, line: String) {
        let mut guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let (lines, bytes) = &mut *guard;
        *bytes += line.len();
        lines.push_back((id, line));
        while lines.len() > self.limit || *bytes > RECENT_BYTES {
            match lines.pop_front() {
                Some((_, old)) => *bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The records of request `id` still in memory, oldest first.
    pub(crate) fn find(&self, id: &str) -> Vec<String> {
        let guard = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .0
            .iter()
            .filter(|(i, _)| &**i == id)
            .map(|(_, line)| line.clone())
            .collect()
    }
}

/// The handle the pipeline records through; cheap to share.
pub(crate) struct DecisionLog {
    /// `None` once dropped (closing the queue ends the writer).
    queue: Option<SyncSender<Entry>>,
    counters: Arc<Counters>,
    recent: Arc<Recent>,
    /// Bytes of tensors in records waiting to be written.
    payload_bytes: Arc<AtomicUsize>,
    /// Whether records are also sent to a network sink.
    forwarding: bool,
    /// Says when the writer has written everything and stopped (in a
    /// mutex only so the log is `Sync`).
    stopped: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long a server that stops waits for its last records to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

impl Drop for DecisionLog {
    /// Closes the queue and waits (at most [`FLUSH_WAIT`]) for the writer
    /// to write what it holds, so a gateway that stops keeps its last
    /// records.
    fn drop(&mut self) {
        self.queue.take();
        let stopped = self.stopped.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = stopped.recv_timeout(FLUSH_WAIT);
    }
}

impl DecisionLog {
    /// Opens the log in `config.dir` (creating it), continuing the chain
    /// of the records already there, and starts its writer thread.
    pub(crate) fn open(config: &DecisionLogConfig) -> Result<Self, String> {
        let counters = Arc::new(Counters::default());
        let recent = Arc::new(Recent {
            limit: config.recent.max(1),
            lines: Mutex::new((VecDeque::new(), 0)),
        });
        let forward = config
            .sink
            .clone()
            .map(|url| forward::Forwarder::start(url, counters.clone()))
            .transpose()?;
        let sink = sink::Sink::open(config, counters.clone(), recent.clone(), forward)?;
        let (queue, receiver) = std::sync::mpsc::sync_channel(config.buffer.max(1));
        let (done, stopped) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                sink.run(receiver);
                let _ = done.send(());
            })
            .map_err(|e| format!("cannot start the decision log's writer: {e}"))?;
        Ok(DecisionLog {
            queue: Some(queue),
            counters,
            recent,
            payload_bytes: Arc::default(),
            forwarding: config.sink.is_some(),
            stopped: Mutex::new(stopped),
        })
    }

    /// Hands a record to the writer; never waits. A full queue drops it
    /// (counted, and said in the next record written).
    pub(crate) fn record(&self, decision: Decision) {
        self.send(Entry::Request(decision));
    }

    /// Hands a note to the writer, as [`DecisionLog::record`] does.
    pub(crate) fn note(&self, note: Note) {
        self.send(Entry::Note(note));
    }

    fn send(&self, entry: Entry) {
        let sent = match &self.queue {
            Some(queue) => queue.try_send(entry),
            None => Err(TrySendError::Disconnected(entry)),
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.counters.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The records of request `id` among the recent ones.
    pub(crate) fn find(&self, id: &str) -> Vec<String> {
        self.recent.find(id)
    }

    /// Appends the log's series to a Prometheus text exposition.
    pub(crate) fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let c = &self.counters;
        let _ = write!(
            out,
            "# HELP gateway_decisions_written_total Decision records written to the log.\n\
             # TYPE gateway_decisions_written_total counter\n\
             gateway_decisions_written_total {}\n\
             # HELP gateway_decisions_dropped_total Decision records dropped: the writer's queue was full, or the disk failed.\n\
             # TYPE gateway_decisions_dropped_total counter\n\
             gateway_decisions_dropped_total{{reason=\"queue_full\"}} {}\n\
             gateway_decisions_dropped_total{{reason=\"write_failed\"}} {}\n",
            c.written.load(Ordering::Relaxed),
            c.dropped_full.load(Ordering::Relaxed),
            c.dropped_failed.load(Ordering::Relaxed),
        );
        if self.forwarding {
            let _ = write!(
                out,
                "# HELP gateway_decisions_sent_total Decision records the network sink delivered.\n\
                 # TYPE gateway_decisions_sent_total counter\n\
                 gateway_decisions_sent_total {}\n\
                 # HELP gateway_decisions_sink_dropped_total Decision records the network sink dropped (the log's files keep them): its queue was full, or the endpoint failed.\n\
                 # TYPE gateway_decisions_sink_dropped_total counter\n\
                 gateway_decisions_sink_dropped_total{{reason=\"queue_full\"}} {}\n\
                 gateway_decisions_sink_dropped_total{{reason=\"send_failed\"}} {}\n",
                c.sent.load(Ordering::Relaxed),
                c.sink_full.load(Ordering::Relaxed),
                c.sink_failed.load(Ordering::Relaxed),
            );
        }
    }
}

/// A time as RFC 3339 in UTC with microseconds: `2026-12-07T03:30:00.123456Z`.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        let at = |secs: u64, micros: u64| {
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + micros))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_796_614_200, 123_456), "2026-12-07T03:30:00.123456Z");
    }

    #[test]
    fn digests_tell_tensors_apart() {
        let t = |name: &str, shape: Vec<i64>, data: Vec<u8>| Tensor {
            name: name.into(),
            datatype: crate::contract::Datatype::Uint8,
            shape,
            data,
        };
        let a = digest(&[t("x", vec![2], vec![1, 2])]);
        assert!(a == digest(&[t("x", vec![2], vec![1, 2])]));
        assert!(a != digest(&[t("x", vec![1, 2], vec![1, 2])]));
        assert!(a != digest(&[t("y", vec![2], vec![1, 2])]));
        // Where one field ends and the next begins is part of the digest.
        assert!(
            digest(&[t("x", vec![1], vec![1]), t("", vec![], vec![])])
                != digest(&[t("x", vec![1], vec![1])])
        );
    }
}
