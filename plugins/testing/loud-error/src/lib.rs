//! Test plugin: fails every call with a 1 MiB error text full of line
//! breaks and terminal escapes. The gateway must send the client a few KiB
//! of it, escaped, and log nothing that forges a log line.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct Loud;

impl Guest for Loud {
    fn info() -> ModelInfo {
        ModelInfo::new("loud-error", "0.1.0", "fails with a huge error text")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(_inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let line = "forged\n2026-01-01T00:00:00Z  INFO gateway: all is well \u{1b}[31m\n";
        Err(Error::Internal(line.repeat((1 << 20) / line.len())))
    }
}

gateway_plugin_sdk::export_model!(Loud);
