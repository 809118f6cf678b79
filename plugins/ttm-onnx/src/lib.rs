//! Time to merge, version 2: a trained model (gradient boosting, exported to
//! ONNX by `tests/fixtures/onnx/generate.py`) that the gateway runs on the
//! host; this plugin is its pre- and post-processing.
//!
//! Before: the raw PR counts are checked (finite, non-negative) and scaled
//! with `ln(1 + x)`, as the model was trained. After: the model's five
//! bucket probabilities become the `label` and `probabilities` outputs every
//! time-to-merge version has, so the trained version can stand beside (and
//! be compared with) the rule-based ones. The model is the one the policy
//! declares as `classifier` for this version.

use gateway_plugin_sdk::nn;
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};
use ttm_common::{BUCKETS, FEATURES, INPUT, outputs, read_pull_requests};

/// The name the policy gives the model under `[versions.<v>.models]`.
const MODEL: &str = "classifier";

struct TrainedTtm;

impl Guest for TrainedTtm {
    fn info() -> ModelInfo {
        ModelInfo::new(
            "ttm-onnx",
            "2.0.0",
            "time-to-merge bucket from a gradient-boosted model over log-scaled PR features",
        )
        .input(TensorSpec::new(INPUT, Datatype::Fp32, &[-1, 6]))
        .output(TensorSpec::new("label", Datatype::Bytes, &[-1]))
        .output(TensorSpec::new("probabilities", Datatype::Fp32, &[-1, 5]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let prs = read_pull_requests(&inputs)?;
        let features: Vec<f32> = prs
            .iter()
            .flat_map(|pr| {
                [
                    pr.files_changed,
                    pr.additions,
                    pr.deletions,
                    pr.commits,
                    pr.comments,
                    pr.review_count,
                ]
            })
            .map(f32::ln_1p)
            .collect();
        let rows =
            u32::try_from(prs.len()).map_err(|_| Error::InvalidInput("too many rows".into()))?;
        let results = nn::run(
            MODEL,
            vec![(
                INPUT.to_string(),
                nn::f32_tensor(&[rows, FEATURES.len() as u32], &features),
            )],
        )?;
        let flat = nn::output(&results, "probabilities")?.to_f32()?;
        if flat.len() != prs.len() * BUCKETS.len() {
            return Err(Error::Internal(format!(
                "model `{MODEL}` returned {} probabilities for {} rows of {} buckets",
                flat.len(),
                prs.len(),
                BUCKETS.len()
            )));
        }
        let probabilities: Vec<[f32; 5]> = flat
            .chunks_exact(5)
            .map(|c| [c[0], c[1], c[2], c[3], c[4]])
            .collect();
        Ok(outputs(&probabilities))
    }
}

gateway_plugin_sdk::export_model!(TrainedTtm);
