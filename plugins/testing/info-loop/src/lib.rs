//! Test plugin: `info()` never returns. The gateway must give up on it at
//! its load deadline, refuse the policy that names it with an error saying
//! so, and keep loading and serving every other model.
use gateway_plugin_sdk::{Error, Guest, ModelInfo, Tensor};

struct InfoLoop;

impl Guest for InfoLoop {
    fn info() -> ModelInfo {
        let mut n: u64 = 0;
        loop {
            n = core::hint::black_box(n.wrapping_add(1));
        }
    }

    fn infer(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        Err(Error::Internal("never loaded".into()))
    }
}

gateway_plugin_sdk::export_model!(InfoLoop);
