//! `Softmax` (opset 13 and later) and `ArgMax`/`ArgMin` along one axis of
//! an FP32 tensor, as plain strided loops.
//!
//! Every scikit-learn classifier that is not a tree or a linear model ends
//! in these two (an MLP's output layer, naive Bayes' label), and tract runs
//! them through general n-dimensional machinery: in a 36-row MLP they took
//! a third of the time (perf, `benches/onnx_zoo.rs`). Other element types
//! are wired to tract's own operators.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::change_axes::AxisOp as TractAxisOp;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, Softmax};
use tract_onnx::tract_hir::internal::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Softmax,
    /// `select_last_index`: among equal extremes, the last.
    ArgMax(bool),
    ArgMin(bool),
    Sum,
    /// `max + ln(sum(exp(x - max)))`: stable where tract's `ln(sum(exp(x)))`
    /// underflows (GaussianNB's very negative log-likelihoods).
    LogSumExp,
}

impl Kind {
    fn is_reduction(self) -> bool {
        self != Kind::Softmax
    }
}

/// The typed operator, on a resolved axis.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AlongAxis {
    kind: Kind,
    axis: usize,
}

/// The ONNX node, before the input's rank is known.
#[derive(Clone, Debug)]
pub(super) struct AlongAxisExpansion {
    kind: Kind,
    axis: i64,
    keep_dims: bool,
    /// The node's inputs: 2 when the axes come as a constant input.
    arity: usize,
}

/// `ReduceSum` (opset 13 on, axes as an input) over the one axis a constant
/// input names, or `None` for other forms.
pub(super) fn reduce_sum_one_axis(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<Option<AlongAxisExpansion>> {
    let axes = node
        .input
        .get(1)
        .and_then(|name| {
            ctx.parent_graphs
                .last()
                .and_then(|g| g.initializer.iter().find(|t| &t.name == name))
        })
        .map(|proto| ctx.load_tensor(proto))
        .transpose()?;
    let Some(axes) = axes else { return Ok(None) };
    if node.input.len() != 2 || axes.len() != 1 {
        return Ok(None);
    }
    let axis = axes.cast_to::<i64>()?;
    let axis = axis.try_as_plain_ram()?.as_slice::<i64>()?[0];
    let keep_dims = node.get_attr_opt("keepdims")?.unwrap_or(1i64) == 1;
    Ok(Some(AlongAxisExpansion {
        kind: Kind::Sum,
        axis,
        keep_dims,
        arity: 2,
    }))
}

/// `ReduceLogSumExp` over one axis.
pub(super) fn log_sum_exp_one_axis(axis: i64, keep_dims: bool) -> AlongAxisExpansion {
    AlongAxisExpansion {
        kind: Kind::LogSumExp,
        axis,
        keep_dims,
        arity: 1,
    }
}

pub(super) fn softmax(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    if ctx.onnx_operator_set_version < 13 {
        // Before opset 13 Softmax flattened the axes from `axis` on.
        let axis = node.get_attr_opt("axis")?.unwrap_or(1);
        return Ok((
            expand(tract_onnx::tract_hir::ops::nn::LayerSoftmax::new(
                axis, true,
            )),
            vec![],
        ));
    }
    let axis = node.get_attr_opt("axis")?.unwrap_or(-1i64);
    Ok((
        expand(AlongAxisExpansion {
            kind: Kind::Softmax,
            axis,
            keep_dims: true,
            arity: 1,
        }),
        vec![],
    ))
}

pub(super) fn arg_max_min(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let axis = node.get_attr_opt("axis")?.unwrap_or(0i64);
    let keep_dims = node.get_attr_opt("keepdims")?.unwrap_or(1i64) == 1;
    let last = node.get_attr_opt("select_last_index")?.unwrap_or(0i64) == 1;
    let kind = if node.op_type == "ArgMax" {
        Kind::ArgMax(last)
    } else {
        Kind::ArgMin(last)
    };
    Ok((
        expand(AlongAxisExpansion {
            kind,
            axis,
            keep_dims,
            arity: 1,
        }),
        vec![],
    ))
}

/// `shape` without the reduced `axes` (or with them as 1 with `keep_dims`).
pub(super) fn reduced_shape(shape: &[TDim], axes: &[usize], keep_dims: bool) -> TVec<TDim> {
    shape
        .iter()
        .enumerate()
        .filter_map(|(ix, d)| match (axes.contains(&ix), keep_dims) {
            (false, _) => Some(d.clone()),
            (true, true) => Some(1.to_dim()),
            (true, false) => None,
        })
        .collect()
}

/// `values` as a tensor of `shape`, with `axis` reduced to 1.
fn reduced<T: Datum>(values: Vec<T>, shape: &[usize], axis: usize) -> TractResult<TVec<TValue>> {
    let mut shape: TVec<usize> = shape.into();
    shape[axis] = 1;
    Ok(tvec!(
        tract_onnx::prelude::tensor1(&values)
            .into_shape(&shape)?
            .into_tvalue()
    ))
}

/// `(outer, n, inner)`: the shape around `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

impl Op for AlongAxis {
    fn name(&self) -> StaticName {
        match self.kind {
            Kind::Softmax => "GatewaySoftmax".into(),
            Kind::ArgMax(_) => "GatewayArgMax".into(),
            Kind::ArgMin(_) => "GatewayArgMin".into(),
            Kind::Sum => "GatewayReduceSum".into(),
            Kind::LogSumExp => "GatewayReduceLogSumExp".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for AlongAxis {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape: TVec<usize> = x.shape().into();
        ensure!(
            self.axis < shape.len(),
            "axis {} of shape {shape:?}",
            self.axis
        );
        let (outer, n, inner) = split(&shape, self.axis);
        let view = x.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        match self.kind {
            Kind::Softmax if inner == 1 => {
                // The usual case, the last axis: contiguous rows.
                let mut y = x.to_vec();
                for row in y.chunks_exact_mut(n.max(1)) {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0f32;
                    for v in row.iter_mut() {
                        *v = (*v - max).exp();
                        sum += *v;
                    }
                    let inverse = 1.0 / sum;
                    row.iter_mut().for_each(|v| *v *= inverse);
                }
                Ok(tvec!(
                    tract_onnx::prelude::tensor1(&y)
                        .into_shape(&shape)?
                        .into_tvalue()
                ))
            }
            Kind::Softmax => {
                let mut y = x.to_vec();
                for o in 0..outer {
                    for i in 0..inner {
                        let base = o * n * inner + i;
                        let at = |k: usize| base + k * inner;
                        let max = (0..n).map(|k| y[at(k)]).fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0.0f32;
                        for k in 0..n {
                            let e = (y[at(k)] - max).exp();
                            y[at(k)] = e;
                            sum += e;
                        }
                        for k in 0..n {
                            y[at(k)] /= sum;
                        }
                    }
                }
                Ok(tvec!(
                    tract_onnx::prelude::tensor1(&y)
                        .into_shape(&shape)?
                        .into_tvalue()
                ))
            }
            Kind::ArgMax(last) | Kind::ArgMin(last) => {
                let max = matches!(self.kind, Kind::ArgMax(_));
                let mut out = Vec::with_capacity(outer * inner);
                for o in 0..outer {
                    for i in 0..inner {
                        let base = o * n * inner + i;
                        let mut best = 0usize;
                        for k in 1..n {
                            let (v, b) = (x[base + k * inner], x[base + best * inner]);
                            let better = if max { v > b } else { v < b };
                            if better || (last && v == b) {
                                best = k;
                            }
                        }
                        out.push(best as i64);
                    }
                }
                reduced(out, &shape, self.axis)
            }
            Kind::Sum | Kind::LogSumExp => {
                let mut out = Vec::with_capacity(outer * inner);
                for o in 0..outer {
                    for i in 0..inner {
                        let base = o * n * inner + i;
                        let values = (0..n).map(|k| x[base + k * inner]);
                        out.push(if self.kind == Kind::Sum {
                            values.sum()
                        } else {
                            let max = values.clone().fold(f32::NEG_INFINITY, f32::max);
                            if max.is_finite() {
                                max + values.map(|v| (v - max).exp()).sum::<f32>().ln()
                            } else {
                                // All -inf (or an inf or NaN present): as is.
                                values.map(f32::exp).sum::<f32>().ln()
                            }
                        });
                    }
                }
                reduced(out, &shape, self.axis)
            }
        }
    }
}

impl TypedOp for AlongAxis {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        ensure!(
            self.axis < shape.len(),
            "axis {} of rank {}",
            self.axis,
            shape.len()
        );
        Ok(tvec!(match self.kind {
            Kind::Softmax => f32::fact(shape),
            Kind::ArgMax(_) | Kind::ArgMin(_) => {
                shape[self.axis] = 1.to_dim();
                i64::fact(shape)
            }
            Kind::Sum | Kind::LogSumExp => {
                shape[self.axis] = 1.to_dim();
                f32::fact(shape)
            }
        }))
    }

    as_op!();
}

impl Expansion for AlongAxisExpansion {
    fn name(&self) -> StaticName {
        match self.kind {
            Kind::Softmax => "Softmax".into(),
            Kind::ArgMax(_) => "ArgMax".into(),
            Kind::ArgMin(_) => "ArgMin".into(),
            Kind::Sum => "ReduceSum".into(),
            Kind::LogSumExp => "ReduceLogSumExp".into(),
        }
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.arity)?;
        check_output_arity(outputs, 1)?;
        if self.kind == Kind::Softmax {
            s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
            s.equals(&outputs[0].shape, &inputs[0].shape)?;
            return Ok(());
        }
        if matches!(self.kind, Kind::ArgMax(_) | Kind::ArgMin(_)) {
            s.equals(&outputs[0].datum_type, DatumType::I64)?;
        } else {
            s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        }
        let (axis, keep_dims) = (self.axis, self.keep_dims);
        s.given(&inputs[0].shape, move |s, shape| {
            let rank = shape.len() as i64;
            let axis = if axis < 0 { axis + rank } else { axis };
            let axes: Vec<usize> = usize::try_from(axis).into_iter().collect();
            s.equals(&outputs[0].shape, reduced_shape(&shape, &axes, keep_dims))
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as i64;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        ensure!(
            (0..rank).contains(&axis),
            "axis {} of rank {rank}",
            self.axis
        );
        let axis = axis as usize;
        let f32_input = fact.datum_type == f32::datum_type();
        let inputs = &inputs[..1];
        let mut wire = match (self.kind, f32_input) {
            (kind, true) => model.wire_node(prefix, AlongAxis { kind, axis }, inputs)?,
            (Kind::Sum, false) => {
                model.wire_node(prefix, Reduce::new(tvec!(axis), Reducer::Sum), inputs)?
            }
            (Kind::LogSumExp, false) => {
                bail!(
                    "ReduceLogSumExp over {:?} is not supported",
                    fact.datum_type
                )
            }
            (Kind::Softmax, false) => model.wire_node(
                prefix,
                Softmax {
                    axes: tvec!(axis),
                    quant_output_dt: None,
                    ..Softmax::default()
                },
                inputs,
            )?,
            (Kind::ArgMax(last), false) => model.wire_node(
                prefix,
                Reduce::new(tvec!(axis), Reducer::ArgMax(last)),
                inputs,
            )?,
            (Kind::ArgMin(last), false) => model.wire_node(
                prefix,
                Reduce::new(tvec!(axis), Reducer::ArgMin(last)),
                inputs,
            )?,
        };
        if self.kind.is_reduction() && !self.keep_dims {
            wire = model.wire_node(format!("{prefix}.rm"), TractAxisOp::Rm(axis), &wire)?;
        }
        Ok(wire)
    }
}

/// `Sub`, `Mul` and `Div` of two FP32 tensors with numpy broadcasting, as
/// strided loops over the output's last axis. tract's run an n-dimensional
/// zip per element; GaussianNB's `[N, 1, F] - [1, C, F]` and friends were
/// half its time. Other element types go to tract's own operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Arith {
    Sub,
    Mul,
    Div,
}

impl Arith {
    fn tract(self) -> Box<dyn tract_onnx::tract_core::ops::binary::BinMiniOp> {
        use tract_onnx::tract_core::ops::math;
        match self {
            Arith::Sub => Box::new(math::Sub),
            Arith::Mul => Box::new(math::Mul),
            Arith::Div => Box::new(math::Div),
        }
    }
}

pub(super) fn arith(kind: Arith) -> Box<dyn InferenceOp> {
    expand(ArithExpansion(
        kind,
        tract_onnx::tract_hir::ops::binary::InferenceBinOp(kind.tract()),
    ))
}

#[derive(Clone, Debug)]
struct ArithExpansion(Arith, tract_onnx::tract_hir::ops::binary::InferenceBinOp);

impl Expansion for ArithExpansion {
    fn name(&self) -> StaticName {
        format!("{:?}", self.0).into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        self.1.rules(s, inputs, outputs)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let f32_only = inputs.iter().all(|&i| {
            model
                .outlet_fact(i)
                .is_ok_and(|f| f.datum_type == f32::datum_type())
        });
        if f32_only && inputs.len() == 2 {
            model.wire_node(prefix, Broadcast(self.0), inputs)
        } else {
            self.1.wire(prefix, model, inputs)
        }
    }
}

/// The typed operator of [`Arith`].
#[derive(Clone, Debug, PartialEq, Eq)]
struct Broadcast(Arith);

/// Strides of `shape` right-aligned to `rank` dimensions, 0 where the
/// dimension is broadcast.
fn broadcast_strides(shape: &[usize], rank: usize) -> TVec<usize> {
    let mut strides: TVec<usize> = tvec![0; rank];
    let mut stride = 1;
    for (i, &d) in shape.iter().enumerate().rev() {
        let at = rank - shape.len() + i;
        strides[at] = if d == 1 { 0 } else { stride };
        stride *= d;
    }
    strides
}

impl Op for Broadcast {
    fn name(&self) -> StaticName {
        format!("Gateway{:?}", self.0).into()
    }

    op_as_typed_op!();
}

impl EvalOp for Broadcast {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (a, b) = args_2!(inputs);
        let shape = tract_onnx::tract_core::broadcast::multi_broadcast(&[a.shape(), b.shape()])?;
        let (va, vb) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (xa, xb) = (va.as_slice::<f32>()?, vb.as_slice::<f32>()?);
        let total: usize = shape.iter().product();
        let mut out = vec![0.0f32; total];
        let (sa, sb) = (a.shape(), b.shape());
        match self.0 {
            Arith::Sub => broadcast(|x, y| x - y, &shape, (xa, sa), (xb, sb), &mut out),
            Arith::Mul => broadcast(|x, y| x * y, &shape, (xa, sa), (xb, sb), &mut out),
            Arith::Div => broadcast(|x, y| x / y, &shape, (xa, sa), (xb, sb), &mut out),
        }
        Ok(tvec!(
            tract_onnx::prelude::tensor1(&out)
                .into_shape(&shape)?
                .into_tvalue()
        ))
    }
}

/// `out = f(a, b)` with numpy broadcasting to `shape`, one output row (the
/// last axis) at a time, each row a contiguous or constant-operand loop.
fn broadcast(
    f: impl Fn(f32, f32) -> f32 + Copy,
    shape: &[usize],
    (xa, a_shape): (&[f32], &[usize]),
    (xb, b_shape): (&[f32], &[usize]),
    out: &mut [f32],
) {
    if a_shape == b_shape {
        for ((o, &x), &y) in out.iter_mut().zip(xa).zip(xb) {
            *o = f(x, y);
        }
        return;
    }
    if out.is_empty() {
        return;
    }
    if shape.is_empty() {
        out[0] = f(xa[0], xb[0]);
        return;
    }
    let rank = shape.len();
    let (sa, sb) = (
        broadcast_strides(a_shape, rank),
        broadcast_strides(b_shape, rank),
    );
    let last = shape[rank - 1];
    let (la, lb) = (sa[rank - 1], sb[rank - 1]);
    let mut index: TVec<usize> = tvec![0; rank - 1];
    for row in out.chunks_exact_mut(last) {
        let oa: usize = index.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ob: usize = index.iter().zip(&sb).map(|(i, s)| i * s).sum();
        match (la, lb) {
            (1, 1) => {
                for ((o, &x), &y) in row
                    .iter_mut()
                    .zip(&xa[oa..oa + last])
                    .zip(&xb[ob..ob + last])
                {
                    *o = f(x, y);
                }
            }
            (1, 0) => {
                let y = xb[ob];
                for (o, &x) in row.iter_mut().zip(&xa[oa..oa + last]) {
                    *o = f(x, y);
                }
            }
            (0, 1) => {
                let x = xa[oa];
                for (o, &y) in row.iter_mut().zip(&xb[ob..ob + last]) {
                    *o = f(x, y);
                }
            }
            _ => {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = f(xa[oa + j * la], xb[ob + j * lb]);
                }
            }
        }
        // Next row of the output, last outer axis fastest.
        for axis in (0..rank - 1).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}

impl TypedOp for Broadcast {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = tract_onnx::tract_core::broadcast::multi_broadcast(&[
            &*inputs[0].shape.to_tvec(),
            &*inputs[1].shape.to_tvec(),
        ])?;
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::tensor1;

    fn run(op: &dyn EvalOp, inputs: Vec<Tensor>) -> Tensor {
        let out = op
            .eval_out_of_plan(inputs.into_iter().map(Tensor::into_tvalue).collect())
            .unwrap()
            .unwrap();
        out[0].clone().into_tensor()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn broadcasts_like_numpy() {
        // [2, 1, 3] - [3] -> [2, 1, 3]; [2, 1, 3] / [1, 2, 1] -> [2, 2, 3].
        let a = tensor1(&[1f32, 2., 3., 4., 5., 6.])
            .into_shape(&[2, 1, 3])
            .unwrap();
        let b = tensor1(&[1f32, 1., 2.]);
        let y = run(&Broadcast(Arith::Sub), vec![a.clone(), b]);
        assert_eq!(y.shape(), &[2, 1, 3]);
        assert_eq!(f32s(&y), vec![0., 1., 1., 3., 4., 4.]);
        let c = tensor1(&[1f32, 2.]).into_shape(&[1, 2, 1]).unwrap();
        let y = run(&Broadcast(Arith::Div), vec![a, c]);
        assert_eq!(y.shape(), &[2, 2, 3]);
        assert_eq!(
            f32s(&y),
            vec![1., 2., 3., 0.5, 1., 1.5, 4., 5., 6., 2., 2.5, 3.]
        );
    }

    #[test]
    fn reductions_along_an_axis() {
        let x = tensor1(&[1f32, 3., 3., f32::NEG_INFINITY, f32::NEG_INFINITY, 0.])
            .into_shape(&[2, 3])
            .unwrap();
        let arg = |kind| {
            let t = run(&AlongAxis { kind, axis: 1 }, vec![x.clone()]);
            t.try_as_plain_ram()
                .unwrap()
                .as_slice::<i64>()
                .unwrap()
                .to_vec()
        };
        assert_eq!(arg(Kind::ArgMax(false)), vec![1, 2]);
        assert_eq!(arg(Kind::ArgMax(true)), vec![2, 2]);
        assert_eq!(arg(Kind::ArgMin(false)), vec![0, 0]);
        assert_eq!(arg(Kind::ArgMin(true)), vec![0, 1]);
        let lse = f32s(&run(
            &AlongAxis {
                kind: Kind::LogSumExp,
                axis: 1,
            },
            vec![x.clone()],
        ));
        let want = (1f32.exp() + 2.0 * 3f32.exp()).ln();
        assert!((lse[0] - want).abs() < 1e-6, "{lse:?}");
        assert_eq!(lse[1], 0.0);
        let sum = f32s(&run(
            &AlongAxis {
                kind: Kind::Sum,
                axis: 0,
            },
            vec![x.clone()],
        ));
        assert_eq!(sum, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 3.0]);
        let soft = f32s(&run(
            &AlongAxis {
                kind: Kind::Softmax,
                axis: 1,
            },
            vec![x],
        ));
        assert!((soft[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(&soft[3..], &[0.0, 0.0, 1.0]);
    }
}
