//! The ONNX-ML operators scikit-learn exports and tract-onnx 0.23 lacks or
//! runs slowly, registered through tract's operator table:
//!
//! - `Scaler` (every StandardScaler pipeline) becomes `(x - offset) * scale`
//!   on tract's own arithmetic, so tract optimises it like any other node;
//! - `ZipMap` (skl2onnx's default classifier output, a list of maps) passes
//!   the probability matrix through: V2 has no map type, and the matrix in
//!   class order is what a client reads anyway;
//! - `TreeEnsembleClassifier` and `TreeEnsembleRegressor` run on the
//!   evaluator in [`super::trees`];
//! - `LinearClassifier` runs in [`super::linear`] (tract's cannot type
//!   string class labels).

use tract_onnx::model::{OnnxOpRegister, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::logic::wire_with_rank_broadcast;

use super::linear::{Linear, LinearExpansion, LinearOp};
use super::trees::{Ensemble, TreeEnsembleExpansion, TreeEnsembleOp};

pub fn register(reg: &mut OnnxOpRegister) {
    reg.insert("Scaler", scaler);
    reg.insert("ZipMap", zipmap);
    reg.insert("TreeEnsembleClassifier", tree_classifier);
    reg.insert("TreeEnsembleRegressor", tree_regressor);
    reg.insert("LinearClassifier", linear_classifier);
    if let Some(&original) = reg.0.get("ReduceLogSumExp") {
        let _ = TRACT_REDUCE_LOG_SUM_EXP.set(original);
    }
    reg.insert("ReduceLogSumExp", reduce_log_sum_exp);
}

type OpBuilder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

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
            let out: TVec<TDim> = shape
                .iter()
                .enumerate()
                .filter_map(|(ix, d)| match (reduced.contains(&ix), keep_dims) {
                    (false, _) => Some(d.clone()),
                    (true, true) => Some(1.to_dim()),
                    (true, false) => None,
                })
                .collect();
            s.equals(&outputs[0].shape, out)
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

/// `Scaler`: `y = (x - offset) * scale`, per feature or for all features.
#[derive(Clone, Debug)]
struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

fn scaler(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset = node.get_attr_opt_vec::<f32>("offset")?.unwrap_or_default();
    let scale = node.get_attr_opt_vec::<f32>("scale")?.unwrap_or_default();
    Ok((expand(Scaler { offset, scale }), vec![]))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
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
        let fact = model.outlet_fact(inputs[0])?.clone();
        ensure!(fact.rank() >= 1, "Scaler needs an input of rank 1 or more");
        let width = fact.shape[fact.rank() - 1].to_usize().ok();
        for (name, values) in [("offset", &self.offset), ("scale", &self.scale)] {
            ensure!(
                values.len() <= 1 || Some(values.len()) == width,
                "Scaler `{name}` has {} values for {} features",
                values.len(),
                fact.shape[fact.rank() - 1]
            );
        }
        let mut x = inputs[0];
        if fact.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        if !self.offset.is_empty() {
            let offset = model.add_const(format!("{prefix}.offset"), rctensor1(&self.offset))?;
            x = wire_with_rank_broadcast(
                format!("{prefix}.sub"),
                model,
                tract_onnx::tract_core::ops::math::sub(),
                &[x, offset],
            )?[0];
        }
        if !self.scale.is_empty() {
            let scale = model.add_const(format!("{prefix}.scale"), rctensor1(&self.scale))?;
            x = wire_with_rank_broadcast(
                format!("{prefix}.mul"),
                model,
                tract_onnx::tract_core::ops::math::mul(),
                &[x, scale],
            )?[0];
        }
        Ok(tvec!(x))
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
