//! The writer of the decision log: one thread, JSON lines appended to
//! `decisions.jsonl`, rotated by size into `decisions-<last seq>.jsonl`,
//! the oldest rotated files removed past the retention. Each record
//! carries its sequence number and the SHA-256 of the line before it
//! (`prev`), across rotations; a restart continues the chain.
//!
//! Records are written in batches (what the queue holds when the thread
//! wakes); a batch the disk refuses is dropped and counted, and the chain
//! goes on from the last record written, so the file never refers to a
//! record it does not hold. The next record written says how many were
//! dropped before it (`dropped_before`).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use super::forward::{Event, Forwarder};
use super::{
    Counters, Decision, DecisionLogConfig, Entry, Note, Recent, RecordedTensor, SCHEMA, Target,
    rfc3339,
};
use crate::contract::Sha256;

/// The file records are appended to.
pub(crate) const CURRENT: &str = "decisions.jsonl";

/// The `prev` of the first record ever written.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How long the writer gathers records before it writes them.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// A batch is written once it holds this many bytes.
const BATCH_BYTES: usize = 1 << 20;

/// The longest record read back at start (records are a few KB: an error
/// text is cut to 1 KiB before it gets here, tensors to `record.max_kib`).
const MAX_RECORD_BYTES: u64 = 1 << 20;

/// A record longer than this is written without its tensors.
const MAX_LINE_BYTES: u64 = MAX_RECORD_BYTES - (64 << 10);

pub(super) struct Sink {
    /// Held while the sink lives: one writer per folder.
    _lock: File,
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: usize,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// The last record written: its sequence number and its line's hash.
    seq: u64,
    prev: String,
    counters: Arc<Counters>,
    recent: Arc<Recent>,
    /// Where written records are also sent, if anywhere.
    forward: Option<Forwarder>,
    /// Drops already reported in a record.
    dropped_reported: u64,
    /// When a failure was last logged (at most one a minute).
    last_failure_log: Option<Instant>,
}

impl Sink {
    pub(super) fn open(
        config: &DecisionLogConfig,
        counters: Arc<Counters>,
        recent: Arc<Recent>,
        forward: Option<Forwarder>,
    ) -> Result<Self, String> {
        let dir = &config.dir;
        let problem = |e: std::io::Error| format!("decision log {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(problem)?;
        let lock = lock(
            dir,
            ".lock",
            "decision log",
            "another gateway writes to this folder; give each gateway its own --decision-log",
        )?;
        let current = dir.join(CURRENT);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&current)
            .map_err(problem)?;
        let size = drop_partial_line(&file, &current)?;
        let (seq, prev) = match last_line(&file, size, &current)? {
            Some(line) => chain_state(&line, &current)?,
            None => match super::verify::log_files(dir)
                .map_err(problem)?
                .into_iter()
                .rev()
                .find(|p| p.file_name().is_some_and(|n| n != CURRENT))
            {
                Some(rotated) => {
                    let f = File::open(&rotated).map_err(problem)?;
                    let len = f.metadata().map_err(problem)?.len();
                    match last_line(&f, len, &rotated)? {
                        Some(line) => chain_state(&line, &rotated)?,
                        None => (0, GENESIS.to_string()),
                    }
                }
                None => (0, GENESIS.to_string()),
            },
        };
        Ok(Sink {
            _lock: lock,
            dir: dir.clone(),
            max_file_bytes: config.max_file_bytes.max(1),
            max_files: config.max_files,
            file,
            size,
            seq,
            prev,
            counters,
            recent,
            forward,
            dropped_reported: 0,
            last_failure_log: None,
        })
    }

    /// Writes what arrives until every sender is gone. After the first
    /// record of a batch it waits [`BATCH_WAIT`] for more: a record then
    /// costs the request path no wake-up of this thread, and the disk one
    /// write per batch (at 11,000 requests/s, a write and a futex call per
    /// request had cost 20 % more CPU per request).
    pub(super) fn run(mut self, queue: Receiver<Entry>) {
        let mut batch = Batch::default();
        while let Ok(first) = queue.recv() {
            std::thread::sleep(BATCH_WAIT);
            self.add(&mut batch, &first);
            while batch.bytes.len() < BATCH_BYTES {
                match queue.try_recv() {
                    Ok(next) => self.add(&mut batch, &next),
                    Err(_) => break,
                }
            }
            self.write(&mut batch);
        }
    }

    /// Serializes `decision` as the next record of the chain, into the
    /// batch (rotating first when the file would pass its size).
    fn add(&mut self, batch: &mut Batch, decision: &Entry) {
        let dropped = self.dropped_total();
        let mut line = self.next_line(batch, decision, dropped);
        let pending = self.size + batch.bytes.len() as u64;
        if pending > 0 && pending + line.len() as u64 + 1 > self.max_file_bytes {
            self.write(batch);
            self.rotate();
            // Whether the write and the rotation worked or not, the record
            // follows the last one written.
            line = self.next_line(batch, decision, dropped);
        }
        batch.reported = Some(dropped);
        let hash = Sha256::of(line.as_bytes()).to_string();
        batch.bytes.extend_from_slice(line.as_bytes());
        batch.bytes.push(b'\n');
        let seq = batch.last().map_or(self.seq, |(s, _)| s) + 1;
        batch.records.push(Pending {
            request_id: decision.id().clone(),
            line,
            seq,
            hash,
            time: self.forward.is_some().then(|| rfc3339(decision.time())),
        });
    }

    /// The record that would follow what is written and batched, with
    /// `dropped` records dropped in all so far.
    fn next_line(&self, batch: &Batch, entry: &Entry, dropped: u64) -> String {
        let (seq, prev) = batch.last().unwrap_or((self.seq, self.prev.clone()));
        let reported = batch.reported.unwrap_or(self.dropped_reported);
        let dropped = dropped.saturating_sub(reported);
        let decision = match entry {
            Entry::Request(decision) => decision,
            Entry::Note(note) => return render_note(note, seq + 1, &prev, dropped),
        };
        let line = render(decision, seq + 1, &prev, dropped, true);
        if line.len() as u64 > MAX_LINE_BYTES {
            // Bounded by `record.max_kib` already; kept whatever happens,
            // so the log always reads back.
            return render(decision, seq + 1, &prev, dropped, false);
        }
        line
    }

    fn dropped_total(&self) -> u64 {
        self.counters.dropped_full.load(Ordering::Relaxed)
            + self.counters.dropped_failed.load(Ordering::Relaxed)
    }

    /// Appends the batch; on failure drops it (counted, and reported by
    /// the next record written) and keeps the chain at the last record
    /// written.
    fn write(&mut self, batch: &mut Batch) {
        if batch.records.is_empty() {
            return;
        }
        match self.file.write_all(&batch.bytes) {
            Ok(()) => {
                self.size += batch.bytes.len() as u64;
                if let Some((seq, hash)) = batch.last() {
                    self.seq = seq;
                    self.prev = hash;
                }
                if let Some(reported) = batch.reported {
                    self.dropped_reported = reported;
                }
                self.counters
                    .written
                    .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
                let mut events = Vec::new();
                for p in batch.records.drain(..) {
                    if let Some(time) = p.time {
                        events.push(Event {
                            hash: p.hash,
                            request_id: p.request_id.clone(),
                            time,
                            line: p.line.clone(),
                        });
                    }
                    self.recent.push(p.request_id, p.line);
                }
                if let Some(forward) = &self.forward {
                    forward.send(events);
                }
            }
            Err(e) => {
                self.counters
                    .dropped_failed
                    .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
                // What reached the file of a failed write is cut off again,
                // so the next record follows the last whole one. (If even
                // that fails, `gateway log verify` shows where.)
                if let Err(cut) = self.file.set_len(self.size) {
                    tracing::error!(dir = %self.dir.display(), "cannot cut a failed write off the decision log: {cut}");
                }
                if self
                    .last_failure_log
                    .is_none_or(|at| at.elapsed().as_secs() >= 60)
                {
                    self.last_failure_log = Some(Instant::now());
                    tracing::error!(
                        dir = %self.dir.display(),
                        dropped = batch.records.len(),
                        "cannot write the decision log: {e}; its records are dropped and counted (gateway_decisions_dropped_total)"
                    );
                }
                batch.records.clear();
            }
        }
        batch.bytes.clear();
        batch.reported = None;
    }

    /// Renames the current file after its last record and starts a new
    /// one; removes the oldest rotated files past the retention. False
    /// when the file could not be rotated (records go on being appended).
    fn rotate(&mut self) -> bool {
        let current = self.dir.join(CURRENT);
        let rotated = self.dir.join(format!("decisions-{:020}.jsonl", self.seq));
        let reopened = std::fs::rename(&current, &rotated).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .read(true)
                .open(&current)
        });
        match reopened {
            Ok(file) => {
                self.file = file;
                self.size = 0;
            }
            Err(e) => {
                if self
                    .last_failure_log
                    .is_none_or(|at| at.elapsed().as_secs() >= 60)
                {
                    self.last_failure_log = Some(Instant::now());
                    tracing::error!(dir = %self.dir.display(), "cannot rotate the decision log: {e}; records go on being appended");
                }
                return false;
            }
        }
        if let Ok(files) = super::verify::log_files(&self.dir) {
            let rotated: Vec<&PathBuf> = files
                .iter()
                .filter(|p| p.file_name().is_some_and(|n| n != CURRENT))
                .collect();
            let excess = rotated.len().saturating_sub(self.max_files);
            for old in &rotated[..excess] {
                if std::fs::remove_file(old).is_ok() {
                    tracing::info!(file = %old.display(), "decision log: removed past the retention");
                }
            }
        }
        true
    }
}

/// Serialized records waiting to be written.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// The drop count the batch's records have reported.
    reported: Option<u64>,
    records: Vec<Pending>,
}

/// A record serialized and waiting to be written.
struct Pending {
    request_id: Arc<str>,
    line: String,
    seq: u64,
    /// The line's SHA-256 (the next record's `prev`).
    hash: String,
    /// Its time, when it will also go to the network sink.
    time: Option<String>,
}

impl Batch {
    fn last(&self) -> Option<(u64, String)> {
        self.records.last().map(|p| (p.seq, p.hash.clone()))
    }
}

/// One record as JSON, its fields in a fixed order (see the README's
/// schema).
fn render(
    decision: &Decision,
    seq: u64,
    prev: &str,
    dropped_before: u64,
    with_payload: bool,
) -> String {
    let payload = &decision.payload;
    let tensors = |t: &Option<Vec<crate::tensor::Tensor>>| {
        t.as_ref()
            .filter(|_| with_payload)
            .map(|t| t.iter().map(RecordedTensor::of).collect())
    };
    let too_long;
    let omitted = if with_payload {
        payload.omitted.as_deref()
    } else {
        too_long = format!("the record with its tensors was over {MAX_LINE_BYTES} bytes");
        Some(too_long.as_str())
    };
    let (model, version, artifacts, policy) = match &decision.target {
        Target::Version { model, version } => (
            model.name.as_str(),
            Some(version.name.as_str()),
            Some(Artifacts::of(&version.backend)),
            Some(PolicyRef {
                generation: decision.generation,
                file: model
                    .policy
                    .file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                sha256: model.policy.sha256.to_string(),
            }),
        ),
        Target::Unknown { model, version } => (model.as_str(), version.as_deref(), None, None),
    };
    let record = Record {
        schema: SCHEMA,
        seq,
        time: rfc3339(decision.time),
        request_id: &decision.identity.request_id,
        trace_id: decision.identity.trace.map(|t| t.trace_id_hex()),
        parent_id: decision.identity.trace.map(|t| t.parent_id_hex()),
        model,
        version,
        route: match decision.target {
            Target::Version { .. } => decision.route.as_str(),
            Target::Unknown { .. } => "none",
        },
        canary: decision.draw,
        artifacts,
        policy,
        inputs_sha256: decision.inputs_sha256.map(|d| d.to_string()),
        outputs_sha256: decision.outputs_sha256.map(|d| d.to_string()),
        inputs: tensors(&payload.inputs),
        outputs: tensors(&payload.outputs),
        payload_omitted: omitted,
        validation: decision.validation.as_str(),
        status: decision.status,
        error_kind: decision.error.as_ref().map(|(kind, _)| *kind),
        error: decision.error.as_ref().map(|(_, message)| message.as_str()),
        latency_ms: (decision.latency.as_secs_f64() * 1e6).round() / 1e3,
        dropped_before: (dropped_before > 0).then_some(dropped_before),
        prev,
    };
    serde_json::to_string(&record).unwrap_or_else(|e| {
        // Plain data cannot fail to serialize; keep the chain whole anyway.
        format!(r#"{{"schema":{SCHEMA},"seq":{seq},"error":"unserializable record: {e}","prev":"{prev}"}}"#)
    })
}

/// A note as a record: the chain's fields around its kind and body, in a
/// fixed order.
fn render_note(note: &Note, seq: u64, prev: &str, dropped_before: u64) -> String {
    let text = |t: &str| serde_json::to_string(t).unwrap_or_else(|_| "\"\"".into());
    let dropped = if dropped_before > 0 {
        format!(",\"dropped_before\":{dropped_before}")
    } else {
        String::new()
    };
    format!(
        "{{\"schema\":{SCHEMA},\"seq\":{seq},\"time\":{},\"kind\":{},\"request_id\":{},\"model\":{},{}:{}{dropped},\"prev\":{}}}",
        text(&rfc3339(note.time)),
        text(note.kind),
        text(&note.id),
        text(&note.model),
        text(note.kind),
        note.body,
        text(prev),
    )
}

#[derive(serde::Serialize)]
struct Record<'a> {
    schema: u32,
    seq: u64,
    time: String,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    model: &'a str,
    version: Option<&'a str>,
    route: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary: Option<crate::router::Draw>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifacts: Option<Artifacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyRef>,
    inputs_sha256: Option<String>,
    outputs_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inputs: Option<Vec<RecordedTensor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<Vec<RecordedTensor>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_omitted: Option<&'a str>,
    validation: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    dropped_before: Option<u64>,
    prev: &'a str,
}

/// The files that made the answer, by SHA-256.
#[derive(serde::Serialize)]
pub(super) struct Artifacts {
    #[serde(skip_serializing_if = "Option::is_none")]
    plugin: Option<PluginRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    models: Vec<crate::runtime::ModelFile>,
}

#[derive(serde::Serialize)]
struct PluginRef {
    name: String,
    file: String,
    sha256: String,
    reported_name: String,
    reported_version: String,
}

impl Artifacts {
    pub(super) fn of(backend: &crate::runtime::Backend) -> Self {
        let provenance = backend.provenance();
        Artifacts {
            plugin: provenance.plugin.map(|p| PluginRef {
                name: p.name,
                file: p.file,
                sha256: p.sha256,
                reported_name: p.reported_name,
                reported_version: p.reported_version,
            }),
            models: provenance.models,
        }
    }
}

#[derive(serde::Serialize)]
struct PolicyRef {
    generation: u64,
    file: String,
    sha256: String,
}

/// Takes a folder's lock (the file `name` in it, an exclusive `flock`),
/// held while the file lives: two gateways appending to one chain would break it, two
/// writing one rollout's state would undo each other's decisions. A
/// server just stopped in this process may still be finishing, so this
/// waits up to 2 s; then the error is `what` (the folder), `taken`.
pub(crate) fn lock(dir: &Path, name: &str, what: &str, taken: &str) -> Result<File, String> {
    use std::os::fd::AsRawFd as _;
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let until = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        if Instant::now() >= until {
            return Err(format!("{what} {}: {taken}", dir.display()));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Cuts a last line without its newline (a write cut short by a crash),
/// so the next record follows the last whole one; returns the size.
fn drop_partial_line(file: &File, path: &Path) -> Result<u64, String> {
    let problem = |e: std::io::Error| format!("decision log {}: {e}", path.display());
    let size = file.metadata().map_err(problem)?.len();
    if size == 0 {
        return Ok(0);
    }
    let tail = read_tail(file, size, path)?;
    if tail.ends_with(b"\n") {
        return Ok(size);
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => size - tail.len() as u64 + i as u64 + 1,
        None if size <= MAX_RECORD_BYTES => 0,
        None => {
            return Err(format!(
                "decision log {}: its last {MAX_RECORD_BYTES} bytes hold no line break; move the file away",
                path.display()
            ));
        }
    };
    tracing::warn!(
        file = %path.display(),
        bytes = size - keep,
        "decision log: removed a partial record at the end (a write cut short)"
    );
    file.set_len(keep).map_err(problem)?;
    Ok(keep)
}

/// The last line of a file of `size` bytes that ends with a newline.
fn last_line(file: &File, size: u64, path: &Path) -> Result<Option<String>, String> {
    if size == 0 {
        return Ok(None);
    }
    let tail = read_tail(file, size, path)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if start == 0 && size > tail.len() as u64 {
        return Err(format!(
            "decision log {}: its last record is longer than {MAX_RECORD_BYTES} bytes; move the file away",
            path.display()
        ));
    }
    Ok(Some(String::from_utf8_lossy(&body[start..]).into_owned()))
}

fn read_tail(file: &File, size: u64, path: &Path) -> Result<Vec<u8>, String> {
    let problem = |e: std::io::Error| format!("decision log {}: {e}", path.display());
    let from = size.saturating_sub(MAX_RECORD_BYTES);
    let mut reader = file;
    reader.seek(SeekFrom::Start(from)).map_err(problem)?;
    let mut tail = Vec::with_capacity((size - from) as usize);
    reader
        .take(size - from)
        .read_to_end(&mut tail)
        .map_err(problem)?;
    Ok(tail)
}

/// The sequence number and hash a new record follows.
fn chain_state(line: &str, path: &Path) -> Result<(u64, String), String> {
    let seq = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .ok_or_else(|| {
            format!(
                "decision log {}: its last line is not a record (run `gateway log verify`); move the file away to start a new log",
                path.display()
            )
        })?;
    Ok((seq, Sha256::of(line.as_bytes()).to_string()))
}
