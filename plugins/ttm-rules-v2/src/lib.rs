//! Time to merge, version 2: a weighted effort score.
//!
//! `score = ln(1 + additions + deletions) + 0.5 ln(1 + files_changed)
//!          + 0.1 comments + 0.05 commits - 0.3 min(review_count, 3)`
//!
//! Each bucket has a centre on the score axis (1.5, 3.5, 5.5, 7.5, 9.5); the
//! probabilities are a softmax of `-1.5 |score - centre|`, so the predicted
//! bucket is the one whose centre is nearest (boundaries at 2.5, 4.5, 6.5,
//! 8.5) and the confidence falls as the score nears a boundary. Compared with
//! version 1, reviews shorten the expected time and commits lengthen it.

use gateway_plugin_sdk::{Error, Guest, ModelInfo, Tensor};
use ttm_common::{PullRequest, model_info, outputs, read_pull_requests};

struct EffortScore;

const CENTRES: [f32; 5] = [1.5, 3.5, 5.5, 7.5, 9.5];

fn score(pr: &PullRequest) -> f32 {
    (1.0 + pr.additions + pr.deletions).ln()
        + 0.5 * (1.0 + pr.files_changed).ln()
        + 0.1 * pr.comments
        + 0.05 * pr.commits
        - 0.3 * pr.review_count.min(3.0)
}

fn probabilities(score: f32) -> [f32; 5] {
    let logits = CENTRES.map(|c| -1.5 * (score - c).abs());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp = logits.map(|l| (l - max).exp());
    let sum: f32 = exp.iter().sum();
    exp.map(|e| e / sum)
}

impl Guest for EffortScore {
    fn info() -> ModelInfo {
        model_info("2.0.0", "time-to-merge bucket from a weighted effort score")
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let probabilities: Vec<[f32; 5]> = read_pull_requests(&inputs)?
            .iter()
            .map(|pr| probabilities(score(pr)))
            .collect();
        Ok(outputs(&probabilities))
    }
}

gateway_plugin_sdk::export_model!(EffortScore);
