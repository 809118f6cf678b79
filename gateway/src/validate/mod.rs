//! Checks a decoded request against what the serving plugin declared in
//! `info()`: every declared input present, no unknown input, datatypes and
//! shapes as declared, requested outputs known. Runs before any plugin does.
//!
//! It reports every violation, not only the first, and does not look at
//! values (range rules belong to policies).

use std::fmt;

use crate::protocol::InferRequest;
use crate::runtime::bindings::ModelInfo;
use crate::tensor::{self, Tensor, TensorSpec};

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The declared input concerned, or `_unknown` for a name the model does
    /// not declare (the metric label must not come from request text).
    pub input: String,
    /// `unknown_input`, `missing_input`, `datatype`, `shape` or `unknown_output`.
    pub rule: &'static str,
    pub message: String,
}

/// The violations of one request; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub violations: Vec<Violation>,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(&v.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationError {}

/// Label for inputs the model does not declare.
const UNKNOWN: &str = "_unknown";

/// Checks the request's inputs and requested outputs against `info`.
pub fn check_request(request: &InferRequest, info: &ModelInfo) -> Result<(), ValidationError> {
    let mut violations = input_violations(&request.inputs, info);
    for name in request.outputs.iter().flatten().map(|o| &o.name) {
        if !info.outputs.iter().any(|s| &s.name == name) {
            violations.push(Violation {
                input: UNKNOWN.into(),
                rule: "unknown_output",
                message: format!(
                    "unknown output `{name}` requested (the model's outputs: {})",
                    describe_all(&info.outputs)
                ),
            });
        }
    }
    result(violations)
}

/// Checks inputs alone (a shadow call has no requested outputs).
pub fn check_inputs(inputs: &[Tensor], info: &ModelInfo) -> Result<(), ValidationError> {
    result(input_violations(inputs, info))
}

fn result(violations: Vec<Violation>) -> Result<(), ValidationError> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ValidationError { violations })
    }
}

fn input_violations(inputs: &[Tensor], info: &ModelInfo) -> Vec<Violation> {
    let mut violations = Vec::new();
    for input in inputs {
        match info.inputs.iter().find(|s| s.name == input.name) {
            None => violations.push(Violation {
                input: UNKNOWN.into(),
                rule: "unknown_input",
                message: format!(
                    "unknown input `{}` (the model's inputs: {})",
                    input.name,
                    describe_all(&info.inputs)
                ),
            }),
            Some(spec) => {
                if spec.datatype != input.datatype {
                    violations.push(Violation {
                        input: spec.name.clone(),
                        rule: "datatype",
                        message: format!(
                            "input `{}` has datatype {}, the model expects {}",
                            input.name, input.datatype, spec.datatype
                        ),
                    });
                }
                if !tensor::shape_matches(&spec.shape, &input.shape) {
                    violations.push(Violation {
                        input: spec.name.clone(),
                        rule: "shape",
                        message: format!(
                            "input `{}` has shape {:?}, the model expects {:?} (-1: any size)",
                            input.name, input.shape, spec.shape
                        ),
                    });
                }
            }
        }
    }
    for spec in &info.inputs {
        if !inputs.iter().any(|t| t.name == spec.name) {
            violations.push(Violation {
                input: spec.name.clone(),
                rule: "missing_input",
                message: format!("missing input {}", describe(spec)),
            });
        }
    }
    violations
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
    use crate::tensor::Datatype;

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

    fn request(inputs: Vec<Tensor>, outputs: Option<Vec<&str>>) -> InferRequest {
        InferRequest {
            id: None,
            inputs,
            outputs: outputs.map(|o| {
                o.into_iter()
                    .map(|name| crate::protocol::RequestedOutput {
                        name: name.into(),
                        binary: None,
                    })
                    .collect()
            }),
            binary_outputs: false,
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
                &request(vec![x(Datatype::Fp32, &[3, 2])], Some(vec!["y"])),
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
            &request(vec![x(Datatype::Fp64, &[3]), extra], Some(vec!["w"])),
            &info(),
        )
        .unwrap_err();
        assert_eq!(
            error
                .violations
                .iter()
                .map(|v| v.message.as_str())
                .collect::<Vec<_>>(),
            vec![
                "input `x` has datatype FP64, the model expects FP32",
                "input `x` has shape [3], the model expects [-1, 2] (-1: any size)",
                "unknown input `z` (the model's inputs: `x` (FP32 [-1, 2]))",
                "unknown output `w` requested (the model's outputs: `y` (FP32 [-1]))",
            ]
        );
        let missing = check_request(&request(vec![], None), &info()).unwrap_err();
        assert_eq!(
            missing.violations[0].message,
            "missing input `x` (FP32 [-1, 2])"
        );
        assert_eq!(
            (
                missing.violations[0].input.as_str(),
                missing.violations[0].rule
            ),
            ("x", "missing_input")
        );
    }
}
