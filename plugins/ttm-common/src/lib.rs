//! What the time-to-merge plugins share: `ttm-rules` (the feature layout of
//! their input, the five time buckets of their output, the checks on raw
//! feature values) wrapped in the tensors of the plugin interface.

use gateway_plugin_sdk::{Datatype, Error, ModelInfo, Tensor, TensorSpec};
pub use ttm_rules::{BUCKETS, FEATURES, INPUT, PullRequest, size_bucket};

/// The shared `info()` for a time-to-merge plugin.
pub fn model_info(version: &str, description: &str) -> ModelInfo {
    ModelInfo::new("ttm-rules", version, description)
        .input(TensorSpec::new(INPUT, Datatype::Fp32, &[-1, 6]))
        .output(TensorSpec::new("label", Datatype::Bytes, &[-1]))
        .output(TensorSpec::new("probabilities", Datatype::Fp32, &[-1, 5]))
}

/// Reads `pr_features` into one [`PullRequest`] per row, rejecting negative or
/// non-finite counts with the row and feature named.
pub fn read_pull_requests(inputs: &[Tensor]) -> Result<Vec<PullRequest>, Error> {
    let tensor = gateway_plugin_sdk::input(inputs, INPUT)?;
    tensor.rows(FEATURES.len())?;
    let values = tensor.to_f32()?;
    // `rows` checked the length is a multiple of 6: nothing is left over.
    let (rows, _) = values.as_chunks::<6>();
    rows.iter()
        .enumerate()
        .map(|(r, row)| PullRequest::from_row(r, row).map_err(Error::InvalidInput))
        .collect()
}

/// The outputs for a batch: `label` (the most probable bucket) and
/// `probabilities` (one row of five per pull request).
pub fn outputs(probabilities: &[[f32; 5]]) -> Vec<Tensor> {
    let n = probabilities.len() as i64;
    let labels: Vec<&str> = probabilities
        .iter()
        .map(|p| BUCKETS[ttm_rules::most_probable(p)])
        .collect();
    let flat: Vec<f32> = probabilities.iter().flatten().copied().collect();
    vec![
        Tensor::bytes("label", &[n], &labels),
        Tensor::fp32("probabilities", &[n, 5], &flat),
    ]
}
