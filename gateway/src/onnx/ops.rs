//! The ONNX-ML operators scikit-learn exports and tract-onnx 0.23 lacks or
//! runs slowly, registered through tract's operator table:
//!
//! - `Scaler` (every StandardScaler pipeline) and `Normalizer` (every
//!   linear classifier's probabilities) run as row-wise loops;
//! - `ZipMap` (skl2onnx's default classifier output, a list of maps) passes
//!   the probability matrix through: V2 has no map type, and the matrix in
//!   class order is what a client reads anyway;
//! - `TreeEnsembleClassifier` and `TreeEnsembleRegressor` run on the
//!   evaluator in [`super::trees`];
//! - `LinearClassifier` runs in [`super::linear`] (tract's cannot type
//!   string class labels);
//! - `Softmax` and `ArgMax`/`ArgMin` on FP32 run in [`super::axis`].

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use super::linear::{Linear, LinearExpansion, LinearOp};
use super::trees::{Ensemble, TreeEnsembleExpansion, TreeEnsembleOp};

pub(super) fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("Normalizer", normalizer);
    reg.insert("ZipMap", zipmap);
    reg.insert("TreeEnsembleClassifier", tree_classifier);
    reg.insert("TreeEnsembleRegressor", tree_regressor);
    reg.insert("LinearClassifier", linear_classifier);
    if let Some(&original) = reg.0.get("ReduceLogSumExp") {
        let _ = TRACT_REDUCE_LOG_SUM_EXP.set(original);
    }
    reg.insert("ReduceLogSumExp", reduce_log_sum_exp);
    if let Some(&original) = reg.0.get("ReduceSum") {
        let _ = TRACT_REDUCE_SUM.set(original);
    }
    reg.insert("ReduceSum", reduce_sum);
    reg.insert("Sub", |_, _| {
        Ok((super::axis::arith(super::axis::Arith::Sub), vec![]))
    });
    reg.insert("Mul", |_, _| {
        Ok((super::axis::arith(super::axis::Arith::Mul), vec![]))
    });
    reg.insert("Div", |_, _| {
        Ok((super::axis::arith(super::axis::Arith::Div), vec![]))
    });
    reg.insert("Softmax", super::axis::softmax);
    reg.insert("ArgMax", super::axis::arg_max_min);
    reg.insert("ArgMin", super::axis::arg_max_min);
}

type OpBuilder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own `ReduceSum`, for all but a sum over one constant axis.
static TRACT_REDUCE_SUM: std::sync::OnceLock<OpBuilder> = std::sync::OnceLock::new();

/// `ReduceSum` over one axis named by a constant (GaussianNB's, from opset
/// 13 on) runs in [`super::axis`]; any other form is tract's.
fn reduce_sum(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if ctx.onnx_operator_set_version >= 13
        && let Some(op) = super::axis::reduce_sum_one_axis(ctx, node)?
    {
        return Ok((expand(op), vec![]));
    }
    let original = TRACT_REDUCE_SUM
        .get()
        .ok_or_else(|| format_err!("ReduceSum is not available"))?;
    original(ctx, node)
}

/// tract's own `ReduceLogSumExp`, still used from opset 18 (axes as an input).
static TRACT_REDUCE_LOG_SUM_EXP: std::sync::OnceLock<OpBuilder> = std::sync::OnceLock::new();

/// `ReduceLogSumExp` (GaussianNB's normalisation), computed the stable way:
/// `m + ln(sum(exp(x - m)))` with `m` the maximum. tract's computes
/// `ln(sum(exp(x)))`, which underflows to `-inf` for the very negative
/// log-likelihoods of an unusual row and turns its probabilities into inf.
fn reduce_log_sum_exp(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if ctx.onnx_operator_set_version >= 18 || node.input.len() > 1 {
        let original = TRACT_REDUCE_LOG_SUM_EXP
            .get()
            .ok_or_else(|| format_err!("ReduceLogSumExp is not available"))?;
        return original(ctx, node);
    }
    let axes = node.get_attr_opt_vec::<i64>("axes")?;
    let keep_dims = node.get_attr_opt("keepdims")?.unwrap_or(1i64) == 1;
    if let Some([axis]) = axes.as_deref() {
        return Ok((
            expand(super::axis::log_sum_exp_one_axis(*axis, keep_dims)),
            vec![],
        ));
    }
    Ok((expand(LogSumExp { axes, keep_dims }), vec![]))
}

#[derive(Clone, Debug)]
struct LogSumExp {
    axes: Option<Vec<i64>>,
    keep_dims: bool,
}

impl Expansion for LogSumExp {
    fn name(&self) -> StaticName {
        "StableReduceLogSumExp".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        let axes = self.axes.clone();
        let keep_dims = self.keep_dims;
        s.given(&inputs[0].rank, move |s, rank| {
            let reduced = resolve_axes(axes.as_deref(), rank as usize)?;
            let out_rank = if keep_dims {
                rank as usize
            } else {
                rank as usize - reduced.len()
            };
            s.equals(&outputs[0].rank, out_rank as i64)?;
            Ok(())
        })?;
        let axes = self.axes.clone();
        s.given(&inputs[0].shape, move |s, shape| {
            let reduced = resolve_axes(axes.as_deref(), shape.len())?;
            s.equals(
                &outputs[0].shape,
                super::axis::reduced_shape(&shape, &reduced, keep_dims),
            )
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::change_axes::AxisOp;
        use tract_onnx::tract_core::ops::math;
        use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};
        let x = inputs[0];
        let rank = model.outlet_fact(x)?.rank();
        let axes = resolve_axes(self.axes.as_deref(), rank)?;
        let max = model.wire_node(
            format!("{prefix}.max"),
            Reduce::new(axes.clone(), Reducer::Max),
            &[x],
        )?[0];
        let shifted = model.wire_node(format!("{prefix}.shift"), math::sub(), &[x, max])?[0];
        let exp = model.wire_node(format!("{prefix}.exp"), math::exp(), &[shifted])?[0];
        let sum = model.wire_node(
            format!("{prefix}.sum"),
            Reduce::new(axes.clone(), Reducer::Sum),
            &[exp],
        )?[0];
        let ln = model.wire_node(format!("{prefix}.ln"), math::ln(), &[sum])?[0];
        let mut y = model.wire_node(format!("{prefix}.unshift"), math::add(), &[ln, max])?[0];
        if !self.keep_dims {
            for &axis in axes.iter().rev() {
                y = model.wire_node(format!("{prefix}.rm{axis}"), AxisOp::Rm(axis), &[y])?[0];
            }
        }
        Ok(tvec!(y))
    }
}

/// Reduced axes, sorted, from ONNX's (possibly negative) `axes`; all axes
/// when absent.
fn resolve_axes(axes: Option<&[i64]>, rank: usize) -> TractResult<TVec<usize>> {
    let mut resolved: TVec<usize> = match axes {
        None => (0..rank).collect(),
        Some(axes) => axes
            .iter()
            .map(|&a| {
                let a = if a < 0 { a + rank as i64 } else { a };
                usize::try_from(a)
                    .ok()
                    .filter(|&a| a < rank)
                    .ok_or_else(|| format_err!("axis {a} is out of range for rank {rank}"))
            })
            .collect::<TractResult<_>>()?,
    };
    resolved.sort_unstable();
    resolved.dedup();
    Ok(resolved)
}

fn linear_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let linear = Arc::new(Linear::parse(node)?);
    Ok((expand(LinearExpansion(LinearOp(linear))), vec![]))
}

fn tree_classifier(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ensemble = Arc::new(Ensemble::parse(node, true)?);
    Ok((
        expand(TreeEnsembleExpansion(TreeEnsembleOp { ensemble })),
        vec![],
    ))
}

fn tree_regressor(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let ensemble = Arc::new(Ensemble::parse(node, false)?);
    Ok((
        expand(TreeEnsembleExpansion(TreeEnsembleOp { ensemble })),
        vec![],
    ))
}

/// `Scaler` and `Normalizer`: row-wise float arithmetic on the last axis.
/// Both are the gateway's own loops rather than tract's broadcasting
/// arithmetic, which runs a general n-dimensional zip per element and made
/// a 36-row StandardScaler + LogisticRegression pipeline slower than
/// onnxruntime.
#[derive(Clone, Debug, PartialEq)]
enum Rowwise {
    /// `y = (x - offset) * scale`, per feature or for all features.
    Scale { offset: Vec<f32>, scale: Vec<f32> },
    /// Each row divided by its norm, as onnxruntime does (a zero norm
    /// leaves the row as it is).
    Normalize(Norm),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Norm {
    Max,
    L1,
    L2,
}

impl Eq for Rowwise {}

fn scaler(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset = node.get_attr_opt_vec::<f32>("offset")?.unwrap_or_default();
    let scale = node.get_attr_opt_vec::<f32>("scale")?.unwrap_or_default();
    Ok((
        expand(RowwiseExpansion(Rowwise::Scale { offset, scale })),
        vec![],
    ))
}

fn normalizer(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let norm = match node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX") {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => bail!("Normalizer `{}`: unknown norm `{other}`", node.name),
    };
    Ok((expand(RowwiseExpansion(Rowwise::Normalize(norm))), vec![]))
}

impl Rowwise {
    fn apply(&self, row: &mut [f32]) {
        match self {
            Rowwise::Scale { offset, scale } => {
                let at = |v: &[f32], i: usize, default: f32| match v.len() {
                    0 => default,
                    1 => v[0],
                    _ => v[i],
                };
                for (i, x) in row.iter_mut().enumerate() {
                    *x = (*x - at(offset, i, 0.0)) * at(scale, i, 1.0);
                }
            }
            Rowwise::Normalize(norm) => {
                let n = match norm {
                    Norm::Max => row.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    Norm::L1 => row.iter().map(|x| x.abs()).sum(),
                    Norm::L2 => row.iter().map(|x| x * x).sum::<f32>().sqrt(),
                };
                if n != 0.0 && n.is_finite() {
                    row.iter_mut().for_each(|x| *x /= n);
                }
            }
        }
    }
}

impl Op for Rowwise {
    fn name(&self) -> StaticName {
        match self {
            Rowwise::Scale { .. } => "GatewayScaler".into(),
            Rowwise::Normalize(_) => "GatewayNormalizer".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for Rowwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let mut output = input.cast_to::<f32>()?.into_owned();
        let width = output.shape().last().copied().unwrap_or(1).max(1);
        if let Rowwise::Scale { offset, scale } = self {
            for (name, v) in [("offset", offset), ("scale", scale)] {
                ensure!(
                    v.len() <= 1 || v.len() == width,
                    "Scaler `{name}` has {} values for {width} features",
                    v.len()
                );
            }
        }
        let mut view = output.try_as_plain_ram_mut()?;
        for row in view.as_slice_mut::<f32>()?.chunks_exact_mut(width) {
            self.apply(row);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for Rowwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[derive(Clone, Debug)]
struct RowwiseExpansion(Rowwise);

impl Expansion for RowwiseExpansion {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?;
        if let (Rowwise::Scale { offset, scale }, Some(width)) =
            (&self.0, fact.shape.last().and_then(|d| d.to_usize().ok()))
        {
            for (name, v) in [("offset", offset), ("scale", scale)] {
                ensure!(
                    v.len() <= 1 || v.len() == width,
                    "Scaler `{name}` has {} values for {width} features",
                    v.len()
                );
            }
        }
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}

/// `ZipMap`: the probability matrix itself.
#[derive(Clone, Debug)]
struct ZipMap;

fn zipmap(
    _ctx: &ParsingContext,
    _node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    Ok((expand(ZipMap), vec![]))
}

impl Expansion for ZipMap {
    fn name(&self) -> StaticName {
        "ZipMap".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        _prefix: &str,
        _model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        Ok(inputs.into())
    }
}
