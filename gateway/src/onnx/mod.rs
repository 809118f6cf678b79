//! Trained models on the host: ONNX files run by tract.
//!
//! A model is parsed, typed, optimised and planned once, when the policy
//! that declares it loads ([`OnnxModel::load`]); a request only runs the
//! plan. The batch dimension stays symbolic, so any number of rows runs on
//! the same plan. [`ops`] adds the scikit-learn operators tract lacks and
//! [`trees`] the tree-ensemble evaluator.
//!
//! Inference is CPU work that cannot be interrupted: [`OnnxModel::infer`]
//! runs it on threads of its own at a lower priority, at most [`COMPUTE_SLOTS`] at a time across
//! the process (a call waits for a slot, bounded by the version's admission
//! before it), and stops waiting at the call's deadline. tract's errors (anyhow-based) stop at this module:
//! callers see [`OnnxError`] and [`PluginError`].

mod axis;
mod linear;
mod ops;
pub mod trees;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::contract::{CallLimits, ModelInfo, PluginError};
use crate::tensor::{Datatype, Tensor as WireTensor, TensorSpec};

/// ONNX computations that may run on the compute threads at once in the
/// process. Each holds a thread until its current chunk returns.
pub static COMPUTE_SLOTS: LazyLock<usize> = LazyLock::new(|| {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .saturating_mul(4)
        .max(8)
});

static RUNNING: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(*COMPUTE_SLOTS)));

/// The threads larger computations run on, one per slot, at nice 10 (see
/// [`crate::cpu::Pool`]): when small requests want the cores, the kernel
/// gives them the cores first. On tokio's blocking pool, at the priority
/// of everything else, two clients sending 100,000-row batches to one
/// model had put another model's p99 at 5x (`cargo bench --bench soak`).
/// Started by [`start_compute_threads`] when a server starts, from a thread
/// at normal priority (threads inherit their creator's: started from a
/// nice-19 shadow thread, they would stay there).
static POOL: LazyLock<std::io::Result<crate::cpu::Pool>> =
    LazyLock::new(|| crate::cpu::Pool::start("onnx", *COMPUTE_SLOTS, 10, *COMPUTE_SLOTS));

/// Starts the compute threads once per process; an error means none can
/// run (the server should not start).
pub(crate) fn start_compute_threads() -> std::io::Result<()> {
    match &*POOL {
        Ok(_) => Ok(()),
        Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
    }
}

type Plan = TypedSimplePlan;

/// A loaded ONNX model: its plan and its V2 signature.
pub struct OnnxModel {
    name: String,
    path: PathBuf,
    sha256: crate::contract::Sha256,
    plan: Arc<Plan>,
    info: ModelInfo,
    /// tract's datum type of each input, in `info.inputs` order.
    input_types: Vec<DatumType>,
}

impl fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OnnxModel({})", self.path.display())
    }
}

/// Why a model could not be loaded or run.
#[derive(Debug, Clone, PartialEq)]
pub enum OnnxError {
    /// Loading: the file is unreadable, not ONNX, or uses what we cannot run.
    Load(String),
    /// Running: the inputs do not fit the model (the caller's fault).
    Input(String),
    /// Running: tract failed on valid inputs.
    Compute(String),
}

impl fmt::Display for OnnxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnnxError::Load(m) | OnnxError::Input(m) | OnnxError::Compute(m) => f.write_str(m),
        }
    }
}

/// tract-onnx with the gateway's operators.
fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    ops::register(&mut onnx.op_register);
    onnx
}

static FRAMEWORK: LazyLock<tract_onnx::Onnx> = LazyLock::new(framework);

impl OnnxModel {
    /// Reads and loads the model at `path` (see [`OnnxModel::load_bytes`]).
    pub fn load(path: &Path) -> Result<OnnxModel, OnnxError> {
        let bytes =
            std::fs::read(path).map_err(|e| OnnxError::Load(format!("cannot be read: {e}")))?;
        Self::load_bytes(path, &bytes)
    }

    /// Parses, checks, types and optimises a model. Every operator must be
    /// one tract or [`ops`] runs; the first one that is not is named.
    /// Blocking (milliseconds): call it off the async executor.
    pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<OnnxModel, OnnxError> {
        // tract indexes into what a file claims; a malformed file must not
        // take the gateway down with it.
        let result = std::panic::catch_unwind(|| load_inner(bytes));
        let (plan, info, input_types) = match result {
            Ok(r) => r?,
            Err(_) => {
                return Err(OnnxError::Load(
                    "is malformed: tract panicked while reading it".into(),
                ));
            }
        };
        let name = path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(OnnxModel {
            name,
            path: path.to_path_buf(),
            sha256: crate::contract::Sha256::of(bytes),
            plan,
            info,
            input_types,
        })
    }

    /// The file name (`ttm-v2.onnx`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn content_hash(&self) -> u64 {
        self.sha256.short()
    }

    /// The SHA-256 of the model file.
    pub fn sha256(&self) -> crate::contract::Sha256 {
        self.sha256
    }

    /// The model's V2 signature, from the ONNX graph's inputs and outputs.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs the model on the calling thread. Inputs are matched by name;
    /// outputs come back in the model's order.
    pub fn run(&self, inputs: &[WireTensor]) -> Result<Vec<WireTensor>, OnnxError> {
        self.to_wire(self.compute(self.prepare(inputs)?)?)
    }

    /// The inputs as tract tensors, in the model's order (one copy).
    fn prepare(&self, inputs: &[WireTensor]) -> Result<TVec<Tensor>, OnnxError> {
        let mut values = TVec::with_capacity(self.info.inputs.len());
        for (spec, &dt) in self.info.inputs.iter().zip(&self.input_types) {
            let input = inputs
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| OnnxError::Input(format!("input `{}` is missing", spec.name)))?;
            values.push(to_tract(input, dt)?);
        }
        Ok(values)
    }

    /// Named tract tensors (from a plugin) in the model's input order, each
    /// of the element type the model declares.
    pub fn order_inputs(
        &self,
        mut named: Vec<(String, Tensor)>,
    ) -> Result<TVec<Tensor>, OnnxError> {
        let mut values = TVec::with_capacity(self.info.inputs.len());
        for (spec, &dt) in self.info.inputs.iter().zip(&self.input_types) {
            let at = named
                .iter()
                .position(|(n, _)| *n == spec.name)
                .ok_or_else(|| {
                    OnnxError::Input(format!(
                        "input `{}` is missing (the model's inputs: {})",
                        spec.name,
                        self.info
                            .inputs
                            .iter()
                            .map(|i| i.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            let (name, tensor) = named.swap_remove(at);
            if tensor.datum_type() != dt {
                return Err(OnnxError::Input(format!(
                    "input `{name}` is {:?}, the model expects {dt:?}",
                    tensor.datum_type()
                )));
            }
            values.push(tensor);
        }
        if let Some((name, _)) = named.first() {
            return Err(OnnxError::Input(format!("the model has no input `{name}`")));
        }
        Ok(values)
    }

    /// The output names, in the order [`OnnxModel::compute`] returns them.
    pub fn output_names(&self) -> impl Iterator<Item = &str> {
        self.info.outputs.iter().map(|o| o.name.as_str())
    }

    /// Runs the plan on the calling thread.
    fn compute(&self, values: TVec<Tensor>) -> Result<TVec<Tensor>, OnnxError> {
        let outputs = self
            .plan
            .run(values.into_iter().map(Tensor::into_tvalue).collect())
            .map_err(|e| OnnxError::Compute(format!("{e:#}")))?;
        Ok(outputs.into_iter().map(TValue::into_tensor).collect())
    }

    fn to_wire(&self, outputs: TVec<Tensor>) -> Result<Vec<WireTensor>, OnnxError> {
        self.output_names()
            .zip(outputs)
            .map(|(name, value)| from_tract(name, &value))
            .collect()
    }

    /// Runs the model under `limits.deadline` within `gate`, the version's
    /// share of the cores (see [`OnnxModel::compute_async`]).
    pub async fn infer(
        self: &Arc<Self>,
        inputs: &[WireTensor],
        limits: CallLimits,
        gate: &crate::cpu::Gate,
    ) -> Result<Vec<WireTensor>, PluginError> {
        let values = self.prepare(inputs).map_err(plugin_error)?;
        let mut offloaded = Duration::ZERO;
        match self
            .compute_async(values, limits, Some(gate), &mut offloaded)
            .await
        {
            Ok(outputs) => self.to_wire(outputs).map_err(plugin_error),
            Err(RunError::Onnx(e)) => Err(plugin_error(e)),
            Err(RunError::Limit(e)) => Err(e),
        }
    }

    /// Runs the plan. A small computation (at most [`INLINE_ELEMENTS`]
    /// input elements, a few microseconds) runs on the calling task: a hop
    /// to another thread costs more than it does. A larger one runs on
    /// the compute threads ([`POOL`]) once one of the [`COMPUTE_SLOTS`] is free, in
    /// chunks of rows with the deadline checked between them, so a
    /// computation nobody waits for any more stops at the next chunk.
    /// `gate` (the version's share of the cores) bounds both. The compute
    /// threads' CPU time for it is added to `offloaded`; past the deadline,
    /// it tells the model's failure (504) from a computation starved of
    /// the CPU (503, see [`PluginError::past_deadline`]).
    pub(crate) async fn compute_async(
        self: &Arc<Self>,
        values: TVec<Tensor>,
        limits: CallLimits,
        gate: Option<&crate::cpu::Gate>,
        offloaded: &mut Duration,
    ) -> Result<TVec<Tensor>, RunError> {
        let until = limits.deadline.into();
        // Waiting for a slot until the deadline is the version's (or the
        // process's) load, not the model's failure: 503, not 504.
        let busy = |what: &str| {
            RunError::Limit(PluginError::Exhausted(format!(
                "no {what} freed before the deadline of {} ms",
                limits.timeout.as_millis()
            )))
        };
        let share = match gate {
            Some(gate) => match tokio::time::timeout_at(until, gate.enter()).await {
                Ok(permit) => permit,
                Err(_) => return Err(busy("slot of the version's share of the cores")),
            },
            None => None,
        };
        let elements: usize = values.iter().map(|v| v.len()).sum();
        if elements <= INLINE_ELEMENTS {
            // tract can panic on what a model file claims; here that must
            // not unwind through the request's task.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compute(values)))
                    .unwrap_or_else(|_| Err(OnnxError::Compute("tract panicked".into())))
                    .map_err(RunError::Onnx);
            drop(share);
            return result;
        }
        // Waiting is bounded twice: by the deadline here, and by the
        // version's admission (max_concurrency + max_queue) before it.
        let permit = match tokio::time::timeout_at(until, RUNNING.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_closed)) => {
                return Err(RunError::Limit(PluginError::Exhausted(
                    "the ONNX compute slots are closed".into(),
                )));
            }
            Err(_) => return Err(busy("ONNX compute slot")),
        };
        let model = self.clone();
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon_on_drop = Abandon(abandoned.clone());
        let progress = Arc::new(Progress::default());
        let deadline = limits.deadline;
        let Ok(pool) = POOL.as_ref() else {
            return Err(RunError::Limit(PluginError::Exhausted(
                "the ONNX compute threads could not be started".into(),
            )));
        };
        let task = pool.run(
            {
                let progress = progress.clone();
                move || {
                    let _permits = (permit, share);
                    let clock = progress.clock.get_or_init(crate::cpu::ThreadClock::start);
                    let result = model.compute_in_chunks(values, deadline, &abandoned);
                    let _ = progress.done.set(clock.elapsed());
                    result
                }
            },
            deadline,
        );
        let result = tokio::time::timeout_at(until, task).await;
        let ran = progress.ran();
        *offloaded += ran;
        let past_deadline = || RunError::Limit(PluginError::past_deadline(limits.timeout, ran));
        match result {
            Err(_) => Err(past_deadline()),
            Ok(Err(crate::cpu::PoolError::Full)) => Err(busy("ONNX compute thread")),
            Ok(Err(crate::cpu::PoolError::Late)) => Err(past_deadline()),
            Ok(Err(crate::cpu::PoolError::Panicked)) => Err(RunError::Onnx(OnnxError::Compute(
                "the computation panicked".into(),
            ))),
            Ok(Ok(Ok(outputs))) => Ok(outputs),
            Ok(Ok(Err(Stopped::Onnx(e)))) => Err(RunError::Onnx(e)),
            Ok(Ok(Err(Stopped::Deadline))) => Err(past_deadline()),
        }
    }

    /// Computes a batch a chunk of rows at a time when every input's first
    /// dimension is an open batch dimension of the same size and every
    /// output keeps it; stops between chunks past `deadline` or once
    /// `abandoned`. This assumes rows are computed independently, as in
    /// every scikit-learn export (the zoo's conformance tests check it);
    /// a model that mixes rows along an open batch axis would need
    /// chunking off, which is not yet a policy setting.
    fn compute_in_chunks(
        &self,
        values: TVec<Tensor>,
        deadline: std::time::Instant,
        abandoned: &AtomicBool,
    ) -> Result<TVec<Tensor>, Stopped> {
        // Only a batch dimension the model leaves open (-1 in its
        // signature: the model was built for any number of rows) is cut;
        // a fixed first dimension may be anything but rows.
        let open_batch = self
            .info
            .inputs
            .iter()
            .all(|spec| spec.shape.first() == Some(&-1));
        let rows = values.first().and_then(|v| v.shape().first().copied());
        let batched = rows.filter(|&rows| {
            open_batch && values.iter().all(|v| v.rank() >= 1 && v.shape()[0] == rows)
        });
        let Some(rows) = batched else {
            return self.compute(values).map_err(Stopped::Onnx);
        };
        let per_row = values.iter().map(|v| v.len()).sum::<usize>() / rows.max(1);
        let chunk = (CHUNK_ELEMENTS / per_row.max(1)).max(1);
        if rows <= chunk {
            return self.compute(values).map_err(Stopped::Onnx);
        }
        let mut parts: Vec<TVec<Tensor>> = Vec::with_capacity(rows.div_ceil(chunk));
        for start in (0..rows).step_by(chunk) {
            if abandoned.load(Ordering::Relaxed) || std::time::Instant::now() >= deadline {
                return Err(Stopped::Deadline);
            }
            let end = (start + chunk).min(rows);
            let slice = values
                .iter()
                .map(|v| v.slice(0, start, end))
                .collect::<TractResult<TVec<Tensor>>>()
                .map_err(|e| Stopped::Onnx(OnnxError::Compute(format!("{e:#}"))))?;
            let outputs = match self.compute(slice) {
                Ok(outputs) => outputs,
                // A model that cannot take a part of the batch: whole.
                Err(_) if start == 0 => return self.compute(values).map_err(Stopped::Onnx),
                Err(e) => return Err(Stopped::Onnx(e)),
            };
            if !outputs
                .iter()
                .all(|o| o.rank() >= 1 && o.shape()[0] == end - start)
            {
                // Outputs without the batch dimension: chunks do not add up.
                drop(parts);
                return self.compute(values).map_err(Stopped::Onnx);
            }
            parts.push(outputs);
        }
        let n = parts.first().map_or(0, |p| p.len());
        (0..n)
            .map(|i| {
                let column: Vec<&Tensor> = parts.iter().map(|p| &p[i]).collect();
                Tensor::stack_tensors(0, &column)
            })
            .collect::<TractResult<TVec<Tensor>>>()
            .map_err(|e| Stopped::Onnx(OnnxError::Compute(format!("{e:#}"))))
    }
}

/// Input elements up to which a computation runs on the calling task.
pub const INLINE_ELEMENTS: usize = 1024;

/// Input elements per chunk of a large batch: a few milliseconds of work
/// for the example models, so a computation past its deadline stops soon.
pub const CHUNK_ELEMENTS: usize = 1 << 16;

/// How far a computation on the compute threads got: the CPU time it has
/// used, readable while it runs.
#[derive(Default)]
struct Progress {
    clock: std::sync::OnceLock<crate::cpu::ThreadClock>,
    /// The CPU time it used, once it ended.
    done: std::sync::OnceLock<Duration>,
}

impl Progress {
    fn ran(&self) -> Duration {
        match (self.done.get(), self.clock.get()) {
            (Some(ran), _) => *ran,
            (None, Some(clock)) => clock.elapsed(),
            (None, None) => Duration::ZERO,
        }
    }
}

/// Why a chunked computation stopped.
enum Stopped {
    Onnx(OnnxError),
    Deadline,
}

/// Tells the blocking task that nobody waits for its result any more.
struct Abandon(Arc<AtomicBool>);

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What [`OnnxModel::compute_async`] can fail with: the model's own error,
/// or one of the call's limits.
pub(crate) enum RunError {
    Onnx(OnnxError),
    Limit(PluginError),
}

/// An ONNX error as the failure of the version it serves.
fn plugin_error(e: OnnxError) -> PluginError {
    match e {
        OnnxError::Input(m) => PluginError::Rejected(m),
        OnnxError::Load(m) | OnnxError::Compute(m) => PluginError::Failed(m),
    }
}

type Loaded = (Arc<Plan>, ModelInfo, Vec<DatumType>);

fn load_inner(bytes: &[u8]) -> Result<Loaded, OnnxError> {
    let onnx = &*FRAMEWORK;
    let proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| OnnxError::Load(format!("is not an ONNX model: {e:#}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| OnnxError::Load("is not an ONNX model: it has no graph".into()))?;
    check_operators(onnx, graph)?;
    let mut model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| OnnxError::Load(format!("cannot be parsed: {e:#}")))?;

    // Inputs: declared dimensions stay, unknown ones (the batch) become
    // symbols, so one optimised plan serves every batch size.
    let mut input_types = Vec::new();
    let mut inputs = Vec::new();
    for (i, input) in graph
        .input
        .iter()
        .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .enumerate()
    {
        let Some(pb::type_proto::Value::TensorType(tt)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(OnnxError::Load(format!(
                "input `{}` is not a tensor",
                input.name
            )));
        };
        let dt = pb::tensor_proto::DataType::try_from(tt.elem_type)
            .ok()
            .and_then(|t| t.try_into().ok())
            .ok_or_else(|| {
                OnnxError::Load(format!(
                    "input `{}` has an element type tract does not know ({})",
                    input.name, tt.elem_type
                ))
            })?;
        let datatype = to_v2(dt).ok_or_else(|| {
            OnnxError::Load(format!(
                "input `{}` has element type {dt:?}, which V2 cannot carry",
                input.name
            ))
        })?;
        let dims = tt
            .shape
            .as_ref()
            .ok_or_else(|| OnnxError::Load(format!("input `{}` has no shape", input.name)))?;
        let mut shape: Vec<TDim> = Vec::new();
        let mut spec_shape = Vec::new();
        for (d, dim) in dims.dim.iter().enumerate() {
            match &dim.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                    shape.push((*v).to_dim());
                    spec_shape.push(*v);
                }
                _ => {
                    let symbol = if d == 0 {
                        "batch".to_string()
                    } else {
                        format!("{}_{d}", input.name)
                    };
                    shape.push(model.symbols.sym(&symbol).into());
                    spec_shape.push(-1);
                }
            }
        }
        model
            .set_input_fact(i, InferenceFact::dt_shape(dt, shape))
            .map_err(|e| OnnxError::Load(format!("input `{}`: {e:#}", input.name)))?;
        input_types.push(dt);
        inputs.push(TensorSpec {
            name: input.name.clone(),
            datatype,
            shape: spec_shape,
        });
    }

    let typed = model
        .into_typed()
        .map_err(|e| OnnxError::Load(format!("cannot be typed: {e:#}")))?;
    let mut outputs = Vec::new();
    for (i, output) in graph.output.iter().enumerate() {
        let fact = typed
            .output_fact(i)
            .map_err(|e| OnnxError::Load(format!("output `{}`: {e:#}", output.name)))?;
        let dt = if fact.datum_type == DatumType::TDim {
            DatumType::I64
        } else {
            fact.datum_type
        };
        let datatype = to_v2(dt).ok_or_else(|| {
            OnnxError::Load(format!(
                "output `{}` has element type {dt:?}, which V2 cannot carry",
                output.name
            ))
        })?;
        let shape = fact
            .shape
            .iter()
            .map(|d| d.to_i64().unwrap_or(-1))
            .collect();
        outputs.push(TensorSpec {
            name: output.name.clone(),
            datatype,
            shape,
        });
    }
    let optimized = typed
        .into_optimized()
        .map_err(|e| OnnxError::Load(format!("cannot be optimised: {e:#}")))?;
    let plan = tract_onnx::tract_core::plan::SimplePlan::new(optimized)
        .map_err(|e| OnnxError::Load(format!("cannot be planned: {e:#}")))?;
    let info = ModelInfo {
        name: proto.producer_name.clone(),
        version: proto.model_version.to_string(),
        description: proto.doc_string.clone(),
        inputs,
        outputs,
    };
    Ok((plan, info, input_types))
}

/// Refuses a graph with an operator neither tract nor [`ops`] implements,
/// naming the operator and the node (tract would only fail at typing, with
/// a less direct message).
fn check_operators(onnx: &tract_onnx::Onnx, graph: &pb::GraphProto) -> Result<(), OnnxError> {
    for node in &graph.node {
        if !onnx.op_register.0.contains_key(&node.op_type) {
            let domain = if node.domain.is_empty() {
                "ai.onnx"
            } else {
                &node.domain
            };
            return Err(OnnxError::Load(format!(
                "uses operator `{}` ({domain}, node `{}`), which the gateway does not support",
                node.op_type, node.name
            )));
        }
    }
    Ok(())
}

/// The V2 datatype of a tract datum type, if V2 has one.
fn to_v2(dt: DatumType) -> Option<Datatype> {
    Some(match dt {
        DatumType::Bool => Datatype::Bool,
        DatumType::I8 => Datatype::Int8,
        DatumType::I16 => Datatype::Int16,
        DatumType::I32 => Datatype::Int32,
        DatumType::I64 => Datatype::Int64,
        DatumType::U8 => Datatype::Uint8,
        DatumType::U16 => Datatype::Uint16,
        DatumType::U32 => Datatype::Uint32,
        DatumType::U64 => Datatype::Uint64,
        DatumType::F32 => Datatype::Fp32,
        DatumType::F64 => Datatype::Fp64,
        DatumType::String => Datatype::Bytes,
        _ => return None,
    })
}

/// A wire tensor as a tract tensor of the model's datum type.
fn to_tract(t: &WireTensor, dt: DatumType) -> Result<Tensor, OnnxError> {
    let expected = to_v2(dt).unwrap_or(Datatype::Bytes);
    if t.datatype != expected {
        return Err(OnnxError::Input(format!(
            "input `{}` is {}, the model expects {expected}",
            t.name, t.datatype
        )));
    }
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| OnnxError::Input(format!("input `{}` has shape {:?}", t.name, t.shape)))?;
    let bad = |e: TractError| OnnxError::Input(format!("input `{}`: {e:#}", t.name));
    match t.datatype {
        Datatype::Bytes => {
            let strings = crate::tensor::bytes_elements(&t.data)
                .map(|e| {
                    let e = e.map_err(|e| OnnxError::Input(format!("input `{}`: {e}", t.name)))?;
                    std::str::from_utf8(e).map(str::to_owned).map_err(|_| {
                        OnnxError::Input(format!("input `{}` holds a non-UTF-8 string", t.name))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            tract_onnx::prelude::tensor1(&strings)
                .into_shape(&shape)
                .map_err(bad)
        }
        Datatype::Bool => {
            let values: Vec<bool> = t.data.iter().map(|&b| b != 0).collect();
            Tensor::from_shape(&shape, &values).map_err(bad)
        }
        // SAFETY: `dt` is a plain number type (BOOL and BYTES are handled
        // above), every bit pattern of which is a valid value, and the wire
        // layout is little-endian row-major, as tract's on this target.
        // `from_raw_dt` checks the length and copies into aligned storage.
        _ => unsafe { Tensor::from_raw_dt(dt, &shape, &t.data) }.map_err(bad),
    }
}

/// A tract output as a wire tensor.
fn from_tract(name: &str, value: &Tensor) -> Result<WireTensor, OnnxError> {
    let failed = |e: TractError| OnnxError::Compute(format!("output `{name}`: {e:#}"));
    let value = if value.datum_type() == DatumType::TDim {
        std::borrow::Cow::Owned(value.cast_to::<i64>().map_err(failed)?.into_owned())
    } else {
        std::borrow::Cow::Borrowed(value)
    };
    let dt = value.datum_type();
    let datatype = to_v2(dt).ok_or_else(|| {
        OnnxError::Compute(format!(
            "output `{name}` has element type {dt:?}, which V2 cannot carry"
        ))
    })?;
    let shape = value.shape().iter().map(|&d| d as i64).collect();
    let data = match datatype {
        Datatype::Bytes => {
            let view = value.try_as_plain_ram().map_err(failed)?;
            let strings = view.as_slice::<String>().map_err(failed)?;
            let mut data = Vec::with_capacity(strings.iter().map(|s| s.len() + 4).sum());
            for s in strings {
                data.extend_from_slice(&(s.len() as u32).to_le_bytes());
                data.extend_from_slice(s.as_bytes());
            }
            data
        }
        Datatype::Bool => {
            let view = value.try_as_plain_ram().map_err(failed)?;
            view.as_slice::<bool>()
                .map_err(failed)?
                .iter()
                .map(|&b| u8::from(b))
                .collect()
        }
        _ => value.as_bytes().to_vec(),
    };
    Ok(WireTensor {
        name: name.to_string(),
        datatype,
        shape,
        data,
    })
}

/// The models one policy version declares, by the name its plugin loads
/// them with.
#[derive(Debug, Default)]
pub struct ModelSet {
    models: HashMap<String, Arc<OnnxModel>>,
}

impl ModelSet {
    pub fn new(models: HashMap<String, Arc<OnnxModel>>) -> Self {
        ModelSet { models }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<OnnxModel>> {
        self.models.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<OnnxModel>)> {
        self.models.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/onnx")
            .join(format!("{name}.onnx"))
    }

    fn reference() -> serde_json::Value {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/onnx/reference.json"),
        )
        .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn loads_every_zoo_model_with_a_symbolic_batch() {
        let refs = reference();
        let names: Vec<&String> = refs["models"].as_object().unwrap().keys().collect();
        assert!(names.len() >= 15, "{names:?}");
        for name in names.into_iter().filter(|n| *n != "ttm_v2") {
            let model = OnnxModel::load(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            let input = &model.info().inputs[0];
            assert_eq!(input.name, "pr_features", "{name}");
            assert_eq!(input.shape, vec![-1, 6], "{name}");
        }
    }

    /// Every zoo model on every reference row, in one batch, against
    /// onnxruntime (the integration suite repeats this through the server).
    #[test]
    fn zoo_matches_onnxruntime() {
        let refs = reference();
        let rows: Vec<f32> = refs["rows"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        let n = rows.len() / 6;
        let input = WireTensor {
            name: "pr_features".into(),
            datatype: Datatype::Fp32,
            shape: vec![n as i64, 6],
            data: rows.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        for (name, expected) in refs["models"].as_object().unwrap() {
            if name == "ttm_v2" {
                continue;
            }
            let model = OnnxModel::load(&fixture(name)).unwrap();
            let outputs = model.run(std::slice::from_ref(&input)).unwrap();
            for (out, want) in expected["outputs"].as_object().unwrap() {
                let got = outputs.iter().find(|t| &t.name == out).unwrap();
                let want_data = want["data"].as_array().unwrap();
                match got.datatype {
                    Datatype::Fp32 => {
                        let got: Vec<f32> = got
                            .data
                            .chunks_exact(4)
                            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                            .collect();
                        assert_eq!(got.len(), want_data.len(), "{name}.{out}");
                        for (i, (g, w)) in got.iter().zip(want_data).enumerate() {
                            let w = w.as_f64().unwrap() as f32;
                            assert!(
                                (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                                "{name}.{out}[{i}]: {g} != {w}"
                            );
                        }
                    }
                    Datatype::Int64 => {
                        let got: Vec<i64> = got
                            .data
                            .chunks_exact(8)
                            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                            .collect();
                        let want: Vec<i64> =
                            want_data.iter().map(|v| v.as_i64().unwrap()).collect();
                        assert_eq!(got, want, "{name}.{out}");
                    }
                    Datatype::Bytes => {
                        let got: Vec<String> = crate::tensor::bytes_elements(&got.data)
                            .map(|e| String::from_utf8(e.unwrap().to_vec()).unwrap())
                            .collect();
                        let want: Vec<String> = want_data
                            .iter()
                            .map(|v| v.as_str().unwrap().to_string())
                            .collect();
                        assert_eq!(got, want, "{name}.{out}");
                    }
                    other => panic!("{name}.{out}: unexpected {other}"),
                }
            }
        }
    }

    #[test]
    fn refuses_garbage_and_unknown_operators() {
        let e = OnnxModel::load_bytes(Path::new("x.onnx"), b"not a model").unwrap_err();
        assert!(e.to_string().starts_with("is not an ONNX model"), "{e}");
        let e = OnnxModel::load_bytes(Path::new("x.onnx"), b"").unwrap_err();
        assert!(e.to_string().contains("no graph"), "{e}");
    }
}
