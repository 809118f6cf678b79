//! Recorded requests run again, offline, through the same pipeline that
//! served them: `gateway replay ID` re-runs one request against the version
//! that answered it (or another) and shows the difference;
//! `gateway what-if` runs a whole log against a proposed policy folder
//! (see `whatif`). Both load the policies as `serve` would, without a
//! listener and without a decision log of their own.

pub(crate) mod whatif;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use crate::decisions::read::{Recorded, Records};
use crate::pipeline::{Pipeline, Replayed};
use crate::router::{Snapshot, Version};
use crate::runtime::Runtime;
use crate::server::ServeOptions;
use crate::tensor::Tensor;

/// Policies loaded and a pipeline to run recorded requests through.
pub(crate) struct Offline {
    pub snapshot: Snapshot,
    pub pipeline: Arc<Pipeline>,
    _runtime: Runtime,
}

impl Offline {
    /// Loads `options.policies` as `serve` would (every plugin compiled,
    /// every rule checked).
    pub(crate) async fn load(options: &ServeOptions) -> Result<Self, String> {
        let runtime = Runtime::new(options.runtime.clone())
            .map_err(|e| format!("cannot start the WebAssembly runtime: {e:#}"))?;
        let (snapshot, _) =
            crate::router::load(&options.policies, &options.load_options(), &runtime, None)
                .await
                .map_err(|errors| {
                    let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    format!(
                        "{} problem(s) in {}:\n  {}",
                        list.len(),
                        options.policies.display(),
                        list.join("\n  ")
                    )
                })?;
        let pipeline = Pipeline::offline(options.pipeline, runtime.telemetry().clone())
            .map_err(|e| format!("cannot start the pipeline: {e}"))?;
        Ok(Offline {
            snapshot,
            pipeline,
            _runtime: runtime,
        })
    }
}

/// How a replay compares with its record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Same,
    Differs,
    /// The record has no answer to compare with (why).
    NotComparable(String),
}

/// Why a record's outcome says nothing about its version's answer: the
/// client went away first, or the gateway was too busy to run it.
pub(crate) fn not_comparable(record: &Recorded) -> Option<String> {
    let why = match record.status {
        499 => "the client went away before its answer",
        429 | 503 => "the gateway could not run it then (load, not the version)",
        _ => return None,
    };
    Some(format!(
        "recorded status {} ({}): {why}",
        record.status,
        record.error_kind.as_deref().unwrap_or("error")
    ))
}

/// `gateway replay`: runs the recorded inputs of request `id` (from the
/// log at `log`) through `version` (by default the one that answered it)
/// and writes to `out` what the record says, what the replay did, whether
/// the artifacts changed since, and the difference in the outputs.
pub(crate) async fn replay(
    options: &ServeOptions,
    log: &Path,
    id: &str,
    seq: Option<u64>,
    version: Option<&str>,
    out: &mut String,
) -> Result<Verdict, String> {
    let (record, served) = served_record(log, id, seq)?;
    if served > 1 && seq.is_none() {
        let _ = writeln!(
            out,
            "note: {served} requests had id `{id}` (ids are the clients'); replaying the latest, record {} (--seq picks another)",
            record.seq
        );
    }
    let inputs = recorded_inputs(&record)?;
    let recorded_version = record.version.clone().unwrap_or_default();
    let target = version.unwrap_or(&recorded_version).to_string();
    let offline = Offline::load(options).await?;
    let model = offline
        .snapshot
        .model(&record.model)
        .map_err(|e| format!("{e} in {}", options.policies.display()))?;
    let replayed_version = model
        .version(&target)
        .map_err(|e| format!("{e} in {}", options.policies.display()))?;

    let _ = writeln!(
        out,
        "request {id}: model `{}`, recorded {}: version `{recorded_version}` ({}), status {}, validation {}, {} ms",
        record.model,
        record.time,
        record.route,
        record.status,
        record.validation,
        record.latency_ms
    );
    let changed = if target == recorded_version {
        changed_artifacts(&record, replayed_version)
    } else {
        Vec::new()
    };
    let replayed = offline
        .pipeline
        .replay(&offline.snapshot, &record.model, &target, inputs, id)
        .await
        .map_err(|e| e.to_string())?;
    let which = if target == recorded_version {
        "the recorded version"
    } else {
        "another version"
    };
    let _ = writeln!(
        out,
        "replayed against `{target}` ({which}, {}): status {}, validation {}, {:.3} ms",
        replayed_version.backend.describe_call(),
        status(&replayed),
        replayed.validation.as_str(),
        replayed.latency.as_secs_f64() * 1e3
    );
    if target == recorded_version {
        if changed.is_empty() {
            let _ = writeln!(out, "artifacts: the same as recorded (by SHA-256)");
        } else {
            for c in &changed {
                let _ = writeln!(out, "CHANGED since the record: {c}");
            }
        }
    }
    if let Some(why) = not_comparable(&record) {
        let _ = writeln!(out, "nothing to compare with: {why}");
        return Ok(Verdict::NotComparable(why));
    }
    let differences = compare(&record, &replayed);
    if differences.is_empty() {
        let how = if record.outputs.is_some() {
            "the recorded outputs, bit for bit"
        } else {
            "the recorded outputs' SHA-256 (the record keeps no tensors)"
        };
        let same = match &replayed.outputs {
            Ok(_) => format!("outputs: identical to {how}"),
            Err(e) => format!("the same failure as recorded: {e}"),
        };
        let _ = writeln!(out, "{same}");
        Ok(Verdict::Same)
    } else {
        let _ = writeln!(out, "DIFFERS from the record:");
        for d in differences {
            let _ = writeln!(out, "  {d}");
        }
        Ok(Verdict::Differs)
    }
}

/// The status a replay ended with.
fn status(replayed: &Replayed) -> u16 {
    match &replayed.outputs {
        Ok(_) => 200,
        Err(e) => e.status().as_u16(),
    }
}

/// The record of request `id` as served (not its shadow copies): the one
/// numbered `seq`, or the latest; and how many served requests had that id.
fn served_record(log: &Path, id: &str, seq: Option<u64>) -> Result<(Recorded, u64), String> {
    let mut records = Records::open(log)?;
    let (mut found, mut served, mut shadows) = (None, 0, 0);
    while let Some(record) = records.next_record() {
        let record = record?;
        if record.request_id != id {
            continue;
        }
        if !record.is_served() {
            shadows += 1;
            continue;
        }
        served += 1;
        if seq.is_none_or(|s| s == record.seq) {
            found = Some(record);
        }
    }
    match found {
        Some(record) => Ok((record, served)),
        None => Err(match (seq, served, shadows) {
            (Some(s), n, _) if n > 0 => {
                format!(
                    "request `{id}` has {n} record(s) in {}, none numbered {s}",
                    log.display()
                )
            }
            (_, _, 0) => format!(
                "no decision of request `{id}` in {} (records of routing errors have nothing to replay)",
                log.display()
            ),
            (_, _, n) => format!(
                "{} holds {n} shadow record(s) of request `{id}` but not the request itself (rotated away?)",
                log.display()
            ),
        }),
    }
}

/// The inputs a record keeps, checked against the digest it also keeps.
pub(crate) fn recorded_inputs(record: &Recorded) -> Result<Vec<Tensor>, String> {
    let Some(recorded) = &record.inputs else {
        let why = record
            .payload_omitted
            .as_deref()
            .map(|w| format!(" ({w})"))
            .unwrap_or_default();
        return Err(format!(
            "the record of request `{}` keeps only the digest of its inputs{why}; a model's policy keeps the tensors of a share of its requests with `[record] sample_percent`",
            record.request_id
        ));
    };
    let inputs = recorded
        .iter()
        .map(crate::decisions::RecordedTensor::tensor)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the record of request `{}`: {e}", record.request_id))?;
    let digest = crate::decisions::digest(&inputs).to_string();
    if record.inputs_sha256.as_deref() != Some(digest.as_str()) {
        return Err(format!(
            "the record of request `{}`: its inputs do not match their SHA-256 ({}); the record was changed (run `gateway log verify`)",
            record.request_id,
            record.inputs_sha256.as_deref().unwrap_or("none")
        ));
    }
    Ok(inputs)
}

/// The artifacts of `version` now that differ from those in the record.
fn changed_artifacts(record: &Recorded, version: &Version) -> Vec<String> {
    let now = version.backend.provenance();
    let then = record.artifacts.clone().unwrap_or_default();
    let mut changed = Vec::new();
    match (&then.plugin, &now.plugin) {
        (Some(a), Some(b)) if a.sha256 != b.sha256 || a.file != b.file => changed.push(format!(
            "plugin `{}`: {} with SHA-256 {} then, {} with SHA-256 {} now",
            b.name, a.file, a.sha256, b.file, b.sha256
        )),
        (Some(a), None) => changed.push(format!(
            "the version was served by plugin {} then, by an ONNX model now",
            a.file
        )),
        (None, Some(b)) => changed.push(format!(
            "the version was served by an ONNX model then, by plugin {} now",
            b.file
        )),
        _ => {}
    }
    for model in &now.models {
        let before = then
            .models
            .iter()
            .find(|m| m.name == model.name && (model.name.is_some() || m.file == model.file));
        match before {
            Some(m) if m.sha256 == model.sha256 && m.file == model.file => {}
            Some(m) => changed.push(format!(
                "model {}: {} with SHA-256 {} then, {} with SHA-256 {} now",
                model.name.as_deref().unwrap_or(&model.file),
                m.file,
                m.sha256,
                model.file,
                model.sha256
            )),
            None => changed.push(format!("model {} is new", model.file)),
        }
    }
    for m in &then.models {
        if !now
            .models
            .iter()
            .any(|n| n.name == m.name && (m.name.is_some() || n.file == m.file))
        {
            changed.push(format!("model {} is gone", m.file));
        }
    }
    changed
}

/// How a replay differs from its record: nothing when the status, the
/// error kind and the outputs (tensors, or their digest) are the same.
pub(crate) fn compare(record: &Recorded, replayed: &Replayed) -> Vec<String> {
    let outputs = match &replayed.outputs {
        Err(e) => {
            return if record.status == e.status().as_u16()
                && record.error_kind.as_deref() == Some(e.kind())
            {
                Vec::new()
            } else {
                vec![format!(
                    "recorded status {}{}, now {} ({}): {e}",
                    record.status,
                    record
                        .error_kind
                        .as_deref()
                        .map(|k| format!(" ({k})"))
                        .unwrap_or_default(),
                    e.status().as_u16(),
                    e.kind()
                )]
            };
        }
        Ok(outputs) => outputs,
    };
    if record.status != 200 {
        return vec![format!(
            "recorded status {} ({}), now answered (200)",
            record.status,
            record.error_kind.as_deref().unwrap_or("error")
        )];
    }
    if let Some(recorded) = &record.outputs {
        let recorded: Result<Vec<Tensor>, String> = recorded
            .iter()
            .map(crate::decisions::RecordedTensor::tensor)
            .collect();
        return match recorded {
            Ok(recorded) => tensor_differences(&recorded, outputs),
            Err(e) => vec![format!("the recorded outputs cannot be read: {e}")],
        };
    }
    let digest = crate::decisions::digest(outputs).to_string();
    match &record.outputs_sha256 {
        Some(d) if *d == digest => Vec::new(),
        Some(d) => vec![format!(
            "the outputs' SHA-256 is {digest}, recorded {d} (the record keeps no tensors to show where)"
        )],
        None => vec!["the record has no digest of its outputs".into()],
    }
}

/// The most element differences shown per tensor.
const SHOWN: usize = 5;

/// Tensor by tensor, by name: what differs, bit for bit.
fn tensor_differences(recorded: &[Tensor], now: &[Tensor]) -> Vec<String> {
    let mut out = Vec::new();
    for r in recorded {
        let Some(n) = now.iter().find(|n| n.name == r.name) else {
            out.push(format!("output `{}` is gone", r.name));
            continue;
        };
        if r.datatype != n.datatype || r.shape != n.shape {
            out.push(format!(
                "output `{}`: {} {:?} recorded, {} {:?} now",
                r.name,
                r.datatype.as_v2(),
                r.shape,
                n.datatype.as_v2(),
                n.shape
            ));
            continue;
        }
        if r.data == n.data {
            continue;
        }
        let (a, b) = (elements(r), elements(n));
        let differing: Vec<usize> = (0..a.len().max(b.len()))
            .filter(|&i| a.get(i) != b.get(i))
            .collect();
        out.push(format!(
            "output `{}` ({} {:?}): {} of {} elements differ",
            r.name,
            r.datatype.as_v2(),
            r.shape,
            differing.len(),
            a.len()
        ));
        for &i in differing.iter().take(SHOWN) {
            out.push(format!(
                "  [{i}] recorded {}, now {}",
                a.get(i).map_or("-", String::as_str),
                b.get(i).map_or("-", String::as_str)
            ));
        }
    }
    for n in now {
        if !recorded.iter().any(|r| r.name == n.name) {
            out.push(format!("output `{}` is new", n.name));
        }
    }
    out
}

/// A tensor's elements as text: numbers exactly (floats as Rust prints
/// them, which round-trips), BYTES as quoted, escaped strings.
pub(crate) fn elements(t: &Tensor) -> Vec<String> {
    use crate::contract::Datatype as D;
    macro_rules! numbers {
        ($ty:ty) => {
            t.data
                .chunks_exact(std::mem::size_of::<$ty>())
                .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or_default()).to_string())
                .collect()
        };
    }
    match t.datatype {
        D::Bool => t.data.iter().map(|&b| (b != 0).to_string()).collect(),
        D::Int8 => numbers!(i8),
        D::Int16 => numbers!(i16),
        D::Int32 => numbers!(i32),
        D::Int64 => numbers!(i64),
        D::Uint8 => numbers!(u8),
        D::Uint16 => numbers!(u16),
        D::Uint32 => numbers!(u32),
        D::Uint64 => numbers!(u64),
        D::Fp32 => numbers!(f32),
        D::Fp64 => numbers!(f64),
        D::Bytes => crate::tensor::bytes_elements(&t.data)
            .map(|e| match e {
                Ok(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
                Err(e) => format!("<{e}>"),
            })
            .collect(),
    }
}
