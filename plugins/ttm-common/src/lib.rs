//! What both time-to-merge plugins share: the feature layout of their input,
//! the five time buckets of their output, and the checks on raw feature values.
//! The rules themselves live in each plugin.

use gateway_plugin_sdk::{Datatype, Error, ModelInfo, Tensor, TensorSpec};

/// Input tensor name: one row of PR features per pull request.
pub const INPUT: &str = "pr_features";

/// The columns of `pr_features`, in order.
pub const FEATURES: [&str; 6] = [
    "files_changed",
    "additions",
    "deletions",
    "commits",
    "comments",
    "review_count",
];

/// The predicted classes, shortest time first.
pub const BUCKETS: [&str; 5] = [
    "within_hour",
    "within_day",
    "within_week",
    "within_month",
    "longer",
];

/// One pull request's features, named.
#[derive(Clone, Copy, Debug)]
pub struct PullRequest {
    pub files_changed: f32,
    pub additions: f32,
    pub deletions: f32,
    pub commits: f32,
    pub comments: f32,
    pub review_count: f32,
}

/// The bucket a pull request's size alone suggests (the size rules of
/// versions 1 and 3):
///
/// | lines changed | files | bucket       |
/// |---------------|-------|--------------|
/// | <= 20         | <= 2  | within_hour  |
/// | <= 200        |       | within_day   |
/// | <= 1000       |       | within_week  |
/// | <= 5000       |       | within_month |
/// | more          |       | longer       |
pub fn size_bucket(pr: &PullRequest) -> usize {
    let lines = pr.additions + pr.deletions;
    if lines <= 20.0 && pr.files_changed <= 2.0 {
        0
    } else if lines <= 200.0 {
        1
    } else if lines <= 1000.0 {
        2
    } else if lines <= 5000.0 {
        3
    } else {
        4
    }
}

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
    let mut rows = Vec::with_capacity(values.len() / FEATURES.len());
    for (r, row) in values.chunks_exact(FEATURES.len()).enumerate() {
        for (value, feature) in row.iter().zip(FEATURES) {
            if !value.is_finite() || *value < 0.0 {
                return Err(Error::InvalidInput(format!(
                    "{INPUT}[{r}] feature `{feature}` is {value}; counts must be finite and >= 0"
                )));
            }
        }
        rows.push(PullRequest {
            files_changed: row[0],
            additions: row[1],
            deletions: row[2],
            commits: row[3],
            comments: row[4],
            review_count: row[5],
        });
    }
    Ok(rows)
}

/// The outputs for a batch: `label` (the most probable bucket) and
/// `probabilities` (one row of five per pull request).
pub fn outputs(probabilities: &[[f32; 5]]) -> Vec<Tensor> {
    let n = probabilities.len() as i64;
    let labels: Vec<&str> = probabilities
        .iter()
        .map(|p| {
            let best = (0..p.len())
                .reduce(|a, b| if p[b] > p[a] { b } else { a })
                .unwrap_or(0);
            BUCKETS[best]
        })
        .collect();
    let flat: Vec<f32> = probabilities.iter().flatten().copied().collect();
    vec![
        Tensor::bytes("label", &[n], &labels),
        Tensor::fp32("probabilities", &[n, 5], &flat),
    ]
}
