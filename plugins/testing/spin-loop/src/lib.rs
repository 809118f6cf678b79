//! Test plugin: spins for `x[0]` million iterations, or forever when `x[0]`
//! is negative. The gateway must stop it at the version's deadline, keep
//! serving, and serve the next (finite) call to the same plugin.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct SpinLoop;

impl Guest for SpinLoop {
    fn info() -> ModelInfo {
        ModelInfo::new("spin-loop", "0.1.0", "loops forever")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let x = gateway_plugin_sdk::input(&inputs, "x")?.to_f32()?;
        let millions = x.first().copied().unwrap_or(-1.0);
        let mut n: u64 = 0;
        while millions < 0.0 || (n as f32) < millions * 1e6 {
            n = core::hint::black_box(n + 1);
        }
        Ok(vec![Tensor::fp32("y", &[1], &[n as f32])])
    }
}

gateway_plugin_sdk::export_model!(SpinLoop);
