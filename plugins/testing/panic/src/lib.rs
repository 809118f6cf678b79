//! Test plugin: panics when `x[0]` is negative, else echoes `x`. The gateway
//! must answer 500 naming the plugin and the panic message, and serve the
//! next call.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct Panics;

impl Guest for Panics {
    fn info() -> ModelInfo {
        ModelInfo::new("panic", "0.1.0", "panics on negative input")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let x = gateway_plugin_sdk::input(&inputs, "x")?;
        let values = x.to_f32()?;
        if values.first().is_some_and(|v| *v < 0.0) {
            panic!("deliberate panic on x[0] = {}", values[0]);
        }
        Ok(vec![Tensor::fp32("y", &x.shape, &values)])
    }
}

gateway_plugin_sdk::export_model!(Panics);
