//! Time to merge, version 1: size rules.
//!
//! The bucket follows the size of the change (lines added plus deleted, and
//! files touched); a long discussion (20 comments or more) pushes it one bucket
//! later. The predicted bucket gets probability 0.7, every other one 0.075.
//!
//! | lines changed | files | bucket       |
//! |---------------|-------|--------------|
//! | <= 20         | <= 2  | within_hour  |
//! | <= 200        |       | within_day   |
//! | <= 1000       |       | within_week  |
//! | <= 5000       |       | within_month |
//! | more          |       | longer       |

//!
//! The rules are `ttm_rules::v1`, plain Rust that the gateway's load
//! benchmark also calls natively.

use gateway_plugin_sdk::{Error, Guest, ModelInfo, Tensor};
use ttm_common::{model_info, outputs, read_pull_requests};

struct SizeRules;

impl Guest for SizeRules {
    fn info() -> ModelInfo {
        model_info(
            "1.0.0",
            "time-to-merge bucket from change size and discussion length",
        )
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let probabilities: Vec<[f32; 5]> = read_pull_requests(&inputs)?
            .iter()
            .map(ttm_rules::v1::probabilities)
            .collect();
        Ok(outputs(&probabilities))
    }
}

gateway_plugin_sdk::export_model!(SizeRules);
