//! Test plugin: a slow, contrary time-to-merge challenger. It takes the same
//! `pr_features` input as the real versions, spins for a long while (about
//! 100-300 ms on a typical core; there is no clock to wait on), then
//! predicts `longer` for every pull request. Used to check that a slow
//! challenger never slows the champion, that shadow calls are shed under
//! load, and that disagreement is counted.
use gateway_plugin_sdk::{Error, Guest, ModelInfo, Tensor};
use ttm_common::{model_info, outputs, read_pull_requests};

struct SlowTtm;

const SPINS: u64 = 200_000_000;

impl Guest for SlowTtm {
    fn info() -> ModelInfo {
        model_info("0.1.0", "slow challenger that always predicts `longer`")
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let rows = read_pull_requests(&inputs)?;
        let mut n: u64 = 0;
        while n < SPINS {
            n = core::hint::black_box(n + 1);
        }
        Ok(outputs(&vec![[0.0, 0.0, 0.0, 0.0, 1.0]; rows.len()]))
    }
}

gateway_plugin_sdk::export_model!(SlowTtm);
