//! Test plugin: declares one input of each datatype (named after it, any
//! length) and returns every input unchanged as an output of the same name,
//! so tests can check each datatype's trip through JSON and the sandbox.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct Echo;

const DATATYPES: [(&str, Datatype); 12] = [
    ("bool", Datatype::Bool),
    ("int8", Datatype::Int8),
    ("int16", Datatype::Int16),
    ("int32", Datatype::Int32),
    ("int64", Datatype::Int64),
    ("uint8", Datatype::Uint8),
    ("uint16", Datatype::Uint16),
    ("uint32", Datatype::Uint32),
    ("uint64", Datatype::Uint64),
    ("fp32", Datatype::Fp32),
    ("fp64", Datatype::Fp64),
    ("bytes", Datatype::Bytes),
];

impl Guest for Echo {
    fn info() -> ModelInfo {
        DATATYPES.iter().fold(
            ModelInfo::new("echo", "0.1.0", "returns its inputs"),
            |info, (name, datatype)| {
                let shape: &[i64] = if *name == "fp32" { &[-1, -1] } else { &[-1] };
                info.input(TensorSpec::new(name, *datatype, shape))
                    .output(TensorSpec::new(name, *datatype, shape))
            },
        )
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        Ok(inputs)
    }
}

gateway_plugin_sdk::export_model!(Echo);
