//! Test plugin: runs whatever host model the request names, so tests can
//! reach the edges of wasi:nn.
//!
//! Inputs: `model` (BYTES [1]) names the model to load; `mode` (INT32 [1])
//! picks the probe; `x` (FP32 [-1, -1]) is passed to the model as
//! `pr_features`. Output: `y` (FP32), the model's first FP32 output.
//!
//! Modes: 0 run the model; 1 load graph bytes instead of a name (refused);
//! 2 pass the input under a wrong name; 3 create tensors until the host's
//! budget stops the call.

use gateway_plugin_sdk::nn::{self, NnTensor, TensorType};
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct Probe;

impl Guest for Probe {
    fn info() -> ModelInfo {
        ModelInfo::new("nn-probe", "1.0.0", "reaches the edges of wasi:nn")
            .input(TensorSpec::new("model", Datatype::Bytes, &[1]))
            .input(TensorSpec::new("mode", Datatype::Int32, &[1]))
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1, -1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1, -1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let model = gateway_plugin_sdk::input(&inputs, "model")?;
        let name = String::from_utf8_lossy(model.data.get(4..).unwrap_or_default()).into_owned();
        let mode = gateway_plugin_sdk::input(&inputs, "mode")?.to_i32()?[0];
        let x = gateway_plugin_sdk::input(&inputs, "x")?;
        let dims: Vec<u32> = x.shape.iter().map(|&d| d as u32).collect();
        let values = x.to_f32()?;
        let input_name = if mode == 2 {
            "wrong_name"
        } else {
            "pr_features"
        };
        match mode {
            1 => {
                let e = nn::graph::load(
                    &[vec![0u8; 16]],
                    nn::graph::GraphEncoding::Onnx,
                    nn::graph::ExecutionTarget::Cpu,
                )
                .err()
                .ok_or_else(|| Error::Internal("loading bytes was allowed".into()))?;
                return Err(Error::Internal(format!("{:?}: {}", e.code(), e.data())));
            }
            3 => {
                let block = vec![0u8; 1 << 20];
                let mut kept = Vec::new();
                loop {
                    kept.push(NnTensor::new(&[1 << 18], TensorType::Fp32, &block));
                }
            }
            _ => {}
        }
        let outputs = nn::run(
            &name,
            vec![(input_name.to_string(), nn::f32_tensor(&dims, &values))],
        )?;
        let y = outputs
            .iter()
            .find(|o| o.ty == TensorType::Fp32)
            .ok_or_else(|| Error::Internal("the model has no FP32 output".into()))?;
        let shape: Vec<i64> = y.dims.iter().map(|&d| d as i64).collect();
        Ok(vec![Tensor::fp32("y", &shape, &y.to_f32()?)])
    }
}

gateway_plugin_sdk::export_model!(Probe);
