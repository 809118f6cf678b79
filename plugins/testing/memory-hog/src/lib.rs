//! Test plugin: allocates `x[0]` MiB, one MiB at a time, or without bound
//! when `x[0]` is negative. The gateway must refuse memory past the
//! version's cap, fail only that request, and serve the next (small) call.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct MemoryHog;

impl Guest for MemoryHog {
    fn info() -> ModelInfo {
        ModelInfo::new("memory-hog", "0.1.0", "allocates without bound")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let x = gateway_plugin_sdk::input(&inputs, "x")?.to_f32()?;
        let mebibytes = x.first().copied().unwrap_or(-1.0);
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        while mebibytes < 0.0 || (hoard.len() as f32) < mebibytes {
            hoard.push(core::hint::black_box(vec![0xA5; 1 << 20]));
        }
        Ok(vec![Tensor::fp32("y", &[1], &[hoard.len() as f32])])
    }
}

gateway_plugin_sdk::export_model!(MemoryHog);
