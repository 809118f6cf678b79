//! Test plugin: returns outputs that break the tensor contract, chosen by the
//! first element of its INT32 input `mode`:
//!
//! 0. FP32 data shorter than the shape needs;
//! 1. a negative dimension in the shape;
//! 2. a BYTES element whose length prefix runs past the data;
//! 3. two outputs with the same name;
//! 4. a well-formed `y` of shape [1, 5], where `info()` declares [-1];
//! 5. a NaN in `y`;
//! 6. no `y` at all (an undeclared `z` instead).
//!
//! The gateway must answer 500 naming the plugin and the defect.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct Malformed;

impl Guest for Malformed {
    fn info() -> ModelInfo {
        ModelInfo::new("malformed-output", "0.1.0", "returns broken tensors")
            .input(TensorSpec::new("mode", Datatype::Int32, &[1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let mode = gateway_plugin_sdk::input(&inputs, "mode")?.to_i32()?;
        let mut y = Tensor::fp32("y", &[1, 5], &[0.2; 5]);
        Ok(match mode.first().copied().unwrap_or(0) {
            0 => {
                y.data.truncate(12);
                vec![y]
            }
            1 => {
                y.shape = vec![-1, 5];
                vec![y]
            }
            2 => {
                let mut bytes = Tensor::bytes("y", &[1], &[b"abc"]);
                bytes.data[0] = 200;
                vec![bytes]
            }
            3 => vec![y.clone(), y],
            4 => vec![y],
            5 => vec![Tensor::fp32("y", &[2], &[0.5, f32::NAN])],
            _ => vec![Tensor::fp32("z", &[1], &[1.0])],
        })
    }
}

gateway_plugin_sdk::export_model!(Malformed);
