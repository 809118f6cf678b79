//! Test plugin: answers how many `infer` calls this instance has served,
//! itself included, so tests can see whether the gateway reused an instance.
//! `x[0] < 0` panics (a trap), `x[0] == 0` returns `internal`: after either,
//! the gateway must not reuse the instance.
use std::sync::atomic::{AtomicI64, Ordering};

use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

static CALLS: AtomicI64 = AtomicI64::new(0);

struct Counter;

impl Guest for Counter {
    fn info() -> ModelInfo {
        ModelInfo::new("counter", "0.1.0", "counts the calls of its instance")
            .input(TensorSpec::new("x", Datatype::Fp32, &[1]))
            .output(TensorSpec::new("calls", Datatype::Int64, &[1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let x = gateway_plugin_sdk::input(&inputs, "x")?.to_f32()?;
        match x.first().copied() {
            Some(v) if v < 0.0 => panic!("asked to fail"),
            Some(0.0) => Err(Error::Internal("asked to fail".into())),
            _ => Ok(vec![Tensor::int64("calls", &[1], &[calls])]),
        }
    }
}

gateway_plugin_sdk::export_model!(Counter);
