//! Test plugin: reads random numbers while it starts, in `info()`, as
//! CPython (hash seeds) and most language runtimes do. A version that
//! grants no random numbers cannot serve it, which `gateway check` says.
//! `infer` returns `y = x`.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct RandomAtStart;

impl Guest for RandomAtStart {
    fn info() -> ModelInfo {
        let mut seen = std::collections::HashMap::new();
        seen.insert("started", true);
        ModelInfo::new("random-at-start", "0.1.0", "seeds a HashMap in info()")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let x = gateway_plugin_sdk::input(&inputs, "x")?;
        Ok(vec![Tensor::fp32("y", &x.shape, &x.to_f32()?)])
    }
}

gateway_plugin_sdk::export_model!(RandomAtStart);
