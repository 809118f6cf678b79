//! `LinearClassifier` (scikit-learn's logistic regression, linear SVMs):
//! `scores = x · coefficientsᵀ + intercepts`, a post-transform, and the
//! label of the best score.
//!
//! tract-onnx 0.23 has one, but it fails to type a classifier with string
//! labels (every model trained on named classes); this one serves both.
//! Semantics follow onnxruntime: one score row per class, or, for two
//! classes, a single score `s` written as `[-s, s]` with the label from its
//! sign.

use std::sync::Arc;

use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use super::trees::{Labels, PostTransform, apply, tensor2d};

#[derive(Debug)]
pub(super) struct Linear {
    /// `[classes or 1][features]`, row-major.
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    n_features: usize,
    labels: Labels,
    post_transform: PostTransform,
}

impl Linear {
    pub(super) fn parse(node: &NodeProto) -> TractResult<Linear> {
        Self::parse_inner(node).map_err(|e| format_err!("{} `{}`: {e}", node.op_type, node.name))
    }

    fn parse_inner(node: &NodeProto) -> Result<Linear, String> {
        let e = |err: TractError| format!("{err:#}");
        let labels = Labels::parse(node, "classlabels_ints")?;
        let coefficients = node
            .get_attr_opt_vec::<f32>("coefficients")
            .map_err(e)?
            .unwrap_or_default();
        let intercepts = node
            .get_attr_opt_vec::<f32>("intercepts")
            .map_err(e)?
            .unwrap_or_default();
        let post_transform = PostTransform::parse(node)?;
        let rows = intercepts.len();
        if rows == 0 || coefficients.is_empty() || coefficients.len() % rows != 0 {
            return Err(format!(
                "{} coefficients do not split into {rows} rows",
                coefficients.len()
            ));
        }
        let binary = rows == 1 && labels.len() == 2;
        if rows != labels.len() && !binary {
            return Err(format!("{rows} score rows for {} classes", labels.len()));
        }
        Ok(Linear {
            n_features: coefficients.len() / rows,
            coefficients,
            intercepts,
            labels,
            post_transform,
        })
    }

    fn classes(&self) -> usize {
        self.labels.len()
    }

    fn classify(&self, input: &[f32], rows: usize) -> (Vec<usize>, Vec<f32>) {
        let f = self.n_features;
        let c = self.classes();
        let mut labels = vec![0usize; rows];
        let mut scores = vec![0.0f32; rows * c];
        for ((x, label), out) in input
            .chunks_exact(f)
            .zip(labels.iter_mut())
            .zip(scores.chunks_exact_mut(c))
        {
            for (k, (w, b)) in self
                .coefficients
                .chunks_exact(f)
                .zip(&self.intercepts)
                .enumerate()
            {
                out[k] = x.iter().zip(w).map(|(a, b)| a * b).sum::<f32>() + b;
            }
            if self.intercepts.len() == 1 {
                let s = out[0];
                *label = usize::from(s > 0.0);
                out[0] = -s;
                out[1] = s;
            } else {
                // The first highest score.
                *label = (0..c).fold(0, |best, k| if out[k] > out[best] { k } else { best });
            }
            apply(self.post_transform, out);
        }
        (labels, scores)
    }
}

/// The tract operator: `[N, F]` in, `label [N]` and `scores [N, C]` out.
#[derive(Clone, Debug)]
pub(super) struct LinearOp(pub Arc<Linear>);

impl PartialEq for LinearOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for LinearOp {}

impl Op for LinearOp {
    fn name(&self) -> StaticName {
        "GatewayLinearClassifier".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LinearOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let input = input.cast_to::<f32>()?;
        let shape = input.shape();
        ensure!(
            shape.len() == 2 && shape[1] == self.0.n_features,
            "a linear classifier of {} features takes a [rows, {}] input, not shape {shape:?}",
            self.0.n_features,
            self.0.n_features
        );
        let rows = shape[0];
        let view = input.try_as_plain_ram()?;
        let (labels, scores) = self.0.classify(view.as_slice::<f32>()?, rows);
        Ok(tvec!(
            self.0.labels.pick(&labels).into_tvalue(),
            tensor2d(rows, self.0.classes(), scores)?.into_tvalue()
        ))
    }
}

impl TypedOp for LinearOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].rank() == 2,
            "a linear classifier takes a [rows, features] input"
        );
        let n = inputs[0].shape[0].clone();
        Ok(tvec!(
            TypedFact::dt_shape(self.0.labels.datum_type(), [n.clone()]),
            f32::fact([n, self.0.classes().to_dim()])
        ))
    }

    as_op!();
}

#[derive(Clone, Debug)]
pub(super) struct LinearExpansion(pub LinearOp);

impl Expansion for LinearExpansion {
    fn name(&self) -> StaticName {
        self.0.name()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 2)?;
        let linear = &self.0.0;
        s.equals(&inputs[0].rank, 2)?;
        s.equals(&outputs[0].datum_type, linear.labels.datum_type())?;
        s.equals(&outputs[0].rank, 1)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].datum_type, DatumType::F32)?;
        s.equals(&outputs[1].rank, 2)?;
        s.equals(&outputs[1].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[1].shape[1], linear.classes().to_dim())?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.0.clone(), inputs)
    }
}
