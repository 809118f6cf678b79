//! Checks a decoded request against what the serving plugin declared in
//! `info()`: every declared input present, no unknown input, datatypes and
//! shapes as declared, requested outputs known. Runs before any plugin does.
//!
//! It reports every violation, not only the first, and does not look at
//! values (range rules belong to policies).

use std::fmt;

use crate::protocol::InferRequest;
use crate::runtime::bindings::ModelInfo;
use crate::tensor::{self, TensorSpec};

/// The violations of one request; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub violations: Vec<String>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.violations.join("; "))
    }
}

impl std::error::Error for ValidationError {}

/// Checks the request's inputs and requested outputs against `info`.
pub fn check_request(request: &InferRequest, info: &ModelInfo) -> Result<(), ValidationError> {
    let mut violations = Vec::new();
    for input in &request.inputs {
        match info.inputs.iter().find(|s| s.name == input.name) {
            None => violations.push(format!(
                "unknown input `{}` (the model's inputs: {})",
                input.name,
                describe_all(&info.inputs)
            )),
            Some(spec) => {
                if spec.datatype != input.datatype {
                    violations.push(format!(
                        "input `{}` has datatype {}, the model expects {}",
                        input.name, input.datatype, spec.datatype
                    ));
                }
                if !tensor::shape_matches(&spec.shape, &input.shape) {
                    violations.push(format!(
                        "input `{}` has shape {:?}, the model expects {:?} (-1: any size)",
                        input.name, input.shape, spec.shape
                    ));
                }
            }
        }
    }
    for spec in &info.inputs {
        if !request.inputs.iter().any(|t| t.name == spec.name) {
            violations.push(format!("missing input {}", describe(spec)));
        }
    }
    for name in request.outputs.iter().flatten() {
        if !info.outputs.iter().any(|s| &s.name == name) {
            violations.push(format!(
                "unknown output `{name}` requested (the model's outputs: {})",
                describe_all(&info.outputs)
            ));
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ValidationError { violations })
    }
}

fn describe(spec: &TensorSpec) -> String {
    format!("`{}` ({} {:?})", spec.name, spec.datatype, spec.shape)
}

fn describe_all(specs: &[TensorSpec]) -> String {
    specs.iter().map(describe).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Datatype, Tensor};

    fn info() -> ModelInfo {
        ModelInfo {
            name: "m".into(),
            version: "1".into(),
            description: String::new(),
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1, 2],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: Datatype::Fp32,
                shape: vec![-1],
            }],
        }
    }

    fn request(inputs: Vec<Tensor>, outputs: Option<Vec<String>>) -> InferRequest {
        InferRequest {
            id: None,
            inputs,
            outputs,
        }
    }

    fn x(datatype: Datatype, shape: &[i64]) -> Tensor {
        Tensor {
            name: "x".into(),
            datatype,
            shape: shape.to_vec(),
            data: vec![],
        }
    }

    #[test]
    fn accepts_a_matching_request() {
        assert_eq!(
            check_request(
                &request(vec![x(Datatype::Fp32, &[3, 2])], Some(vec!["y".into()])),
                &info()
            ),
            Ok(())
        );
    }

    #[test]
    fn lists_every_violation() {
        let extra = Tensor {
            name: "z".into(),
            ..x(Datatype::Fp32, &[1])
        };
        let error = check_request(
            &request(vec![x(Datatype::Fp64, &[3]), extra], Some(vec!["w".into()])),
            &info(),
        )
        .unwrap_err();
        assert_eq!(
            error.violations,
            vec![
                "input `x` has datatype FP64, the model expects FP32",
                "input `x` has shape [3], the model expects [-1, 2] (-1: any size)",
                "unknown input `z` (the model's inputs: `x` (FP32 [-1, 2]))",
                "unknown output `w` requested (the model's outputs: `y` (FP32 [-1]))",
            ]
        );
        let missing = check_request(&request(vec![], None), &info()).unwrap_err();
        assert_eq!(missing.violations, vec!["missing input `x` (FP32 [-1, 2])"]);
    }
}
