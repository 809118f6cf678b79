//! The host side of `wasi:nn` (0.2.0-rc-2024-10-28): how a plugin runs the
//! ONNX models its policy version declares.
//!
//! - `load-by-name(name)` finds `name` in the version's `models` table and
//!   nowhere else (`not-found` otherwise); `load` from bytes is refused
//!   (`security`): models are declared in policies and loaded, checked and
//!   optimised when the policy loads, never by a request.
//! - `compute` takes the named input tensors, runs the model on the blocking
//!   pool under the call's deadline (epoch interruption cannot stop a guest
//!   inside a host call, so the host enforces it) and returns every output
//!   wasi:nn can represent (string outputs, such as class names, are left
//!   out: wasi:nn has no string tensors).
//! - Tensors, graphs and errors live in the call's resource table. Their
//!   bytes count against a host-side budget equal to the version's memory
//!   cap, and their number is bounded: a plugin that hoards them traps with
//!   [`HostLimit`], reported as exceeding its memory limit.

use std::sync::Arc;
use std::time::Duration;

use tract_onnx::prelude::{DatumType, Tensor};
use wasmtime::component::Resource;

use super::bindings::nn::errors::{self, ErrorCode};
use super::bindings::nn::graph::{self, ExecutionTarget, GraphEncoding};
use super::bindings::nn::inference;
use super::bindings::nn::tensor::{self, TensorType};
use super::sandbox::Host;
use crate::contract::PluginError;
use crate::onnx::{ModelSet, OnnxModel, RunError};

/// wasi:nn resources a call may hold at once.
const MAX_RESOURCES: usize = 4096;

/// A `wasi:nn/tensor.tensor`.
pub struct NnTensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// A `wasi:nn/graph.graph`: a model the version declares.
pub struct NnGraph(Arc<OnnxModel>);

/// A `wasi:nn/inference.graph-execution-context`.
pub struct NnContext(Arc<OnnxModel>);

/// A `wasi:nn/errors.error`.
pub struct NnError {
    code: ErrorCode,
    data: String,
}

/// What a call's wasi:nn use may hold: the models it may load and its
/// budget.
pub struct NnState {
    pub(super) models: Arc<ModelSet>,
    budget_bytes: usize,
    held_bytes: usize,
    resources: usize,
}

impl NnState {
    pub fn new(models: Arc<ModelSet>, budget_bytes: usize) -> Self {
        NnState {
            models,
            budget_bytes,
            held_bytes: 0,
            resources: 0,
        }
    }
}

/// A trap from a host call that hit one of the call's limits; the runtime
/// reports the inner error as the call's failure.
#[derive(Debug)]
pub struct HostLimit(pub PluginError);

impl std::fmt::Display for HostLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for HostLimit {}

impl Host {
    /// Accounts for a new resource holding `bytes`.
    fn charge(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let nn = &mut self.nn;
        nn.held_bytes = nn.held_bytes.saturating_add(bytes);
        nn.resources += 1;
        if nn.held_bytes > nn.budget_bytes {
            return Err(wasmtime::Error::new(HostLimit(PluginError::MemoryLimit {
                limit_bytes: nn.budget_bytes,
                requested_bytes: nn.held_bytes,
            })));
        }
        if nn.resources > MAX_RESOURCES {
            return Err(wasmtime::Error::new(HostLimit(PluginError::Failed(
                format!("held more than {MAX_RESOURCES} wasi:nn resources at once"),
            ))));
        }
        Ok(())
    }

    fn release(&mut self, bytes: usize) {
        self.nn.held_bytes = self.nn.held_bytes.saturating_sub(bytes);
        self.nn.resources = self.nn.resources.saturating_sub(1);
    }

    fn nn_error(&mut self, code: ErrorCode, data: String) -> wasmtime::Result<Resource<NnError>> {
        self.charge(data.len())?;
        Ok(self.table.push(NnError { code, data })?)
    }

    fn push_tensor(&mut self, tensor: NnTensor) -> wasmtime::Result<Resource<NnTensor>> {
        self.charge(tensor.data.len())?;
        Ok(self.table.push(tensor)?)
    }
}

impl tensor::Host for Host {}

impl tensor::HostTensor for Host {
    fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        self.push_tensor(NnTensor {
            dims: dimensions,
            ty,
            data,
        })
    }

    fn dimensions(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&t)?.dims.clone())
    }

    fn ty(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&t)?.ty)
    }

    fn data(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<()> {
        let t = self.table.delete(t)?;
        self.release(t.data.len());
        Ok(())
    }
}

impl errors::Host for Host {}

impl errors::HostError for Host {
    fn code(&mut self, e: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    fn data(&mut self, e: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.data.clone())
    }

    fn drop(&mut self, e: Resource<NnError>) -> wasmtime::Result<()> {
        let e = self.table.delete(e)?;
        self.release(e.data.len());
        Ok(())
    }
}

impl graph::Host for Host {
    fn load(
        &mut self,
        _builder: Vec<Vec<u8>>,
        _encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        Ok(Err(self.nn_error(
            ErrorCode::Security,
            "the gateway does not load models from a plugin's bytes: declare the model under the version's `models` in its policy and call load-by-name".into(),
        )?))
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<NnGraph>, Resource<NnError>>> {
        match self.nn.models.get(&name).cloned() {
            Some(model) => {
                self.charge(0)?;
                Ok(Ok(self.table.push(NnGraph(model))?))
            }
            None => {
                let mut declared: Vec<&str> = self.nn.models.names().collect();
                declared.sort_unstable();
                let declared = if declared.is_empty() {
                    "none".to_string()
                } else {
                    declared.join(", ")
                };
                let message = format!(
                    "model `{name}` is not declared for this version (declared: {declared})"
                );
                Ok(Err(self.nn_error(ErrorCode::NotFound, message)?))
            }
        }
    }
}

impl graph::HostGraph for Host {
    fn init_execution_context(
        &mut self,
        g: Resource<NnGraph>,
    ) -> wasmtime::Result<Result<Resource<NnContext>, Resource<NnError>>> {
        let model = self.table.get(&g)?.0.clone();
        self.charge(0)?;
        Ok(Ok(self.table.push(NnContext(model))?))
    }

    fn drop(&mut self, g: Resource<NnGraph>) -> wasmtime::Result<()> {
        self.table.delete(g)?;
        self.release(0);
        Ok(())
    }
}

impl inference::Host for Host {}

impl inference::HostGraphExecutionContext for Host {
    async fn compute(
        &mut self,
        ctx: Resource<NnContext>,
        inputs: Vec<(String, Resource<NnTensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<NnTensor>)>, Resource<NnError>>> {
        let model = self.table.get(&ctx)?.0.clone();
        let mut named = Vec::with_capacity(inputs.len());
        let mut bad = None;
        for (name, t) in inputs {
            // The inputs are owned: the call consumes them.
            let t = self.table.delete(t)?;
            self.release(t.data.len());
            match to_tract(&t) {
                Ok(tensor) => named.push((name, tensor)),
                Err(e) => bad = bad.or(Some(format!("input `{name}`: {e}"))),
            }
        }
        if let Some(message) = bad {
            return Ok(Err(self.nn_error(ErrorCode::InvalidArgument, message)?));
        }
        let values = match model.order_inputs(named) {
            Ok(values) => values,
            Err(e) => {
                let message = format!("ONNX model {}: {e}", model.name());
                return Ok(Err(self.nn_error(ErrorCode::InvalidArgument, message)?));
            }
        };
        let mut offloaded = Duration::ZERO;
        let computed = model
            .compute_async(values, self.limits, None, &mut offloaded)
            .await;
        self.offloaded += offloaded;
        let outputs = match computed {
            Ok(outputs) => outputs,
            Err(RunError::Onnx(e)) => {
                let message = format!("ONNX model {}: {e}", model.name());
                return Ok(Err(self.nn_error(ErrorCode::RuntimeError, message)?));
            }
            Err(RunError::Limit(e)) => {
                if matches!(e, PluginError::Deadline { .. }) {
                    self.timed_out = true;
                }
                return Err(wasmtime::Error::new(HostLimit(e)));
            }
        };
        let mut results = Vec::with_capacity(outputs.len());
        for (name, value) in model.output_names().zip(outputs) {
            if let Some(tensor) = from_tract(&value) {
                results.push((name.to_owned(), self.push_tensor(tensor)?));
            }
        }
        Ok(Ok(results))
    }

    fn drop(&mut self, ctx: Resource<NnContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        self.release(0);
        Ok(())
    }
}

fn datum_type(ty: TensorType) -> Option<DatumType> {
    Some(match ty {
        TensorType::Fp16 => DatumType::F16,
        TensorType::Fp32 => DatumType::F32,
        TensorType::Fp64 => DatumType::F64,
        TensorType::U8 => DatumType::U8,
        TensorType::I32 => DatumType::I32,
        TensorType::I64 => DatumType::I64,
        TensorType::Bf16 => return None,
    })
}

fn to_tract(t: &NnTensor) -> Result<Tensor, String> {
    let dt = datum_type(t.ty).ok_or("BF16 tensors are not supported")?;
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let expected = shape
        .iter()
        .try_fold(dt.size_of(), |acc, &d| acc.checked_mul(d))
        .ok_or("the dimensions overflow")?;
    if expected != t.data.len() {
        return Err(format!(
            "dimensions {:?} of {dt:?} need {expected} bytes, the data has {}",
            t.dims,
            t.data.len()
        ));
    }
    // SAFETY: `dt` is a plain number type whose every bit pattern is valid;
    // the length was checked above and `from_raw_dt` copies into aligned
    // storage. wasi:nn data is little-endian, as tract's on this target.
    unsafe { Tensor::from_raw_dt(dt, &shape, &t.data) }.map_err(|e| format!("{e:#}"))
}

/// A model output as a wasi:nn tensor; `None` for what wasi:nn cannot carry.
fn from_tract(value: &Tensor) -> Option<NnTensor> {
    let value = match value.datum_type() {
        DatumType::TDim | DatumType::I64 => value.cast_to::<i64>().ok()?.into_owned(),
        DatumType::Bool => value.cast_to::<u8>().ok()?.into_owned(),
        _ => value.clone(),
    };
    let ty = match value.datum_type() {
        DatumType::F16 => TensorType::Fp16,
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::U8 => TensorType::U8,
        DatumType::I32 => TensorType::I32,
        DatumType::I64 => TensorType::I64,
        _ => return None,
    };
    let dims = value
        .shape()
        .iter()
        .map(|&d| u32::try_from(d).ok())
        .collect::<Option<Vec<u32>>>()?;
    Some(NnTensor {
        dims,
        ty,
        data: value.as_bytes().to_vec(),
    })
}

/// Adds the wasi:nn interfaces to a plugin linker.
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<Host>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    tensor::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    errors::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    inference::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    graph::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)?;
    Ok(())
}
