//! Time to merge, version 3: size rules that trust reviewers.
//!
//! Version 1's size rules, but a pull request with two or more reviews moves
//! one bucket earlier (reviewers already engaged) and a long discussion (20
//! comments or more) one bucket later, the two cancelling out. The
//! predicted bucket gets probability 0.6, its neighbours 0.15 each, the rest
//! what remains, spread evenly.

use gateway_plugin_sdk::{Error, Guest, ModelInfo, Tensor};
use ttm_common::{PullRequest, model_info, outputs, read_pull_requests, size_bucket};

struct ReviewAwareRules;

fn bucket(pr: &PullRequest) -> usize {
    let by_size = size_bucket(pr) as i32;
    let reviewed = if pr.review_count >= 2.0 { -1 } else { 0 };
    let discussed = if pr.comments >= 20.0 { 1 } else { 0 };
    (by_size + reviewed + discussed).clamp(0, 4) as usize
}

fn probabilities(bucket: usize) -> [f32; 5] {
    let mut p = [0.0f32; 5];
    p[bucket] = 0.6;
    let neighbours: Vec<usize> = [bucket.wrapping_sub(1), bucket + 1]
        .into_iter()
        .filter(|&b| b < 5)
        .collect();
    for &n in &neighbours {
        p[n] = 0.15;
    }
    let rest = 5 - 1 - neighbours.len();
    let left = 1.0 - 0.6 - 0.15 * neighbours.len() as f32;
    for (i, v) in p.iter_mut().enumerate() {
        if i != bucket && !neighbours.contains(&i) {
            *v = left / rest as f32;
        }
    }
    p
}

impl Guest for ReviewAwareRules {
    fn info() -> ModelInfo {
        model_info(
            "3.0.0",
            "time-to-merge bucket from change size, reviews and discussion",
        )
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let probabilities: Vec<[f32; 5]> = read_pull_requests(&inputs)?
            .iter()
            .map(|pr| probabilities(bucket(pr)))
            .collect();
        Ok(outputs(&probabilities))
    }
}

gateway_plugin_sdk::export_model!(ReviewAwareRules);
