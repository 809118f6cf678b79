//! Checks a decoded request against what the serving plugin declared in
//! `info()`: every declared input present, no unknown input, datatypes and
//! shapes as declared, requested outputs known. Runs before any plugin does.
//!
//! It reports every violation, not only the first, and does not look at
//! values (range rules belong to policies).

use std::fmt;

use crate::contract::ModelInfo;
use crate::policy::{Allowed, FeatureRule, InputRule, Schema};
use crate::protocol::InferRequest;
use crate::tensor::{self, Datatype, Tensor, TensorSpec};

/// The value rules, which the policy's `flag` mode may let through;
/// structural violations always reject, since no plugin could use the
/// request.
pub fn is_value_rule(rule: &str) -> bool {
    matches!(
        rule,
        "min" | "max" | "allowed" | "nan" | "infinity" | "bytes_length"
    )
}

/// How often one rule broke for one input and feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// The declared input concerned, or `_unknown` for a name the model does
    /// not declare (the metric label must not come from request text).
    pub input: String,
    /// The feature (position on the last axis) a value rule concerns, by
    /// its declared name; empty for rules about the whole input.
    pub feature: String,
    /// Structural: `unknown_input`, `missing_input`, `datatype`, `shape`,
    /// `unknown_output`. Values: `min`, `max`, `allowed`, `nan`, `infinity`,
    /// `bytes_length`.
    pub rule: &'static str,
    pub n: u64,
}

/// The violations of one request; never empty. Bounded whatever the
/// request: the first [`MAX_LISTED`] are described, the rest only counted
/// per (input, feature, rule), so a request of a million bad values costs
/// a million comparisons and no allocation per value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ValidationError {
    listed: Vec<String>,
    counts: Vec<Count>,
    total: u64,
}

/// Violations described in one error message; all are counted.
pub const MAX_LISTED: usize = 100;

impl ValidationError {
    /// Records one violation; `message` is called only for the first
    /// [`MAX_LISTED`].
    fn push(
        &mut self,
        input: &str,
        feature: &str,
        rule: &'static str,
        message: impl FnOnce() -> String,
    ) {
        self.total += 1;
        if self.listed.len() < MAX_LISTED {
            self.listed.push(message());
        }
        // The last entry first: a request's violations come in runs.
        if let Some(count) = self
            .counts
            .iter_mut()
            .rev()
            .find(|c| c.rule == rule && c.feature == feature && c.input == input)
        {
            count.n += 1;
        } else {
            self.counts.push(Count {
                input: input.to_string(),
                feature: feature.to_string(),
                rule,
                n: 1,
            });
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Violations per (input, feature, rule).
    pub fn counts(&self) -> &[Count] {
        &self.counts
    }

    /// Whether every violation breaks a value rule (see [`is_value_rule`]).
    pub fn value_rules_only(&self) -> bool {
        self.counts.iter().all(|c| is_value_rule(c.rule))
    }

    fn into_result(self) -> Result<(), ValidationError> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total > 1 {
            write!(f, "{} violations: ", self.total)?;
        }
        for (i, message) in self.listed.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            f.write_str(message)?;
        }
        let unlisted = self.total - self.listed.len() as u64;
        if unlisted > 0 {
            write!(f, "; and {unlisted} more")?;
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
            violations.push(UNKNOWN, "", "unknown_output", || {
                format!(
                    "unknown output `{}` requested (the model's outputs: {})",
                    crate::telemetry::Escaped(name),
                    describe_all(&info.outputs)
                )
            });
        }
    }
    violations.into_result()
}

/// Checks inputs alone (a shadow call has no requested outputs).
pub fn check_inputs(inputs: &[Tensor], info: &ModelInfo) -> Result<(), ValidationError> {
    input_violations(inputs, info).into_result()
}

fn input_violations(inputs: &[Tensor], info: &ModelInfo) -> ValidationError {
    let mut violations = ValidationError::default();
    for input in inputs {
        match info.inputs.iter().find(|s| s.name == input.name) {
            None => violations.push(UNKNOWN, "", "unknown_input", || {
                format!(
                    "unknown input `{}` (the model's inputs: {})",
                    crate::telemetry::Escaped(&input.name),
                    describe_all(&info.inputs)
                )
            }),
            Some(spec) => {
                if spec.datatype != input.datatype {
                    violations.push(&spec.name, "", "datatype", || {
                        format!(
                            "input `{}` has datatype {}, the model expects {}",
                            input.name, input.datatype, spec.datatype
                        )
                    });
                }
                if !tensor::shape_matches(&spec.shape, &input.shape) {
                    violations.push(&spec.name, "", "shape", || {
                        format!(
                            "input `{}` has shape {:?}, the model expects {:?} (-1: any size)",
                            input.name, input.shape, spec.shape
                        )
                    });
                }
            }
        }
    }
    for spec in &info.inputs {
        if !inputs.iter().any(|t| t.name == spec.name) {
            violations.push(&spec.name, "", "missing_input", || {
                format!("missing input {}", describe(spec))
            });
        }
    }
    violations
}

/// Checks a plugin's outputs against what its `info()` declares: every
/// declared output present, with its datatype and a matching shape; no NaN
/// or infinity in float outputs unless `allow_nan`.
pub fn check_outputs(outputs: &[Tensor], info: &ModelInfo, allow_nan: bool) -> Result<(), String> {
    for spec in &info.outputs {
        let Some(output) = outputs.iter().find(|t| t.name == spec.name) else {
            return Err(format!("declared output `{}` is missing", spec.name));
        };
        if output.datatype != spec.datatype {
            return Err(format!(
                "output `{}` is {}, declared {}",
                spec.name, output.datatype, spec.datatype
            ));
        }
        if !tensor::shape_matches(&spec.shape, &output.shape) {
            return Err(format!(
                "output `{}` has shape {:?}, declared {:?}",
                spec.name, output.shape, spec.shape
            ));
        }
        if !allow_nan
            && matches!(output.datatype, Datatype::Fp32 | Datatype::Fp64)
            && let Some((i, v)) = first_non_finite(output)
        {
            return Err(format!(
                "output `{}` element {i} is {v} (allow it with `allow_nan_outputs` in [validation])",
                spec.name
            ));
        }
    }
    Ok(())
}

/// The first element of a float tensor that is NaN or infinite, read in
/// place (every answer is checked).
fn first_non_finite(t: &Tensor) -> Option<(usize, f64)> {
    let mut first = None;
    tensor::each_number(t, 0, 1, |i, v| {
        if first.is_none() && !v.is_finite() {
            first = Some((i, v));
        }
    });
    first
}

/// The policy schema's rules for `inputs` (which passed the plugin's
/// structural check): its datatypes and shapes where narrower than the
/// plugin's, then every value rule, element by element.
pub fn schema_violations(schema: &Schema, inputs: &[Tensor]) -> ValidationError {
    let mut violations = ValidationError::default();
    for rule in &schema.inputs {
        let Some(tensor) = inputs.iter().find(|t| t.name == rule.name) else {
            continue;
        };
        if rule.datatype.is_some_and(|d| d != tensor.datatype) {
            violations.push(&rule.name, "", "datatype", || {
                format!(
                    "input `{}` has datatype {}, the policy declares {:?}",
                    rule.name, tensor.datatype, rule.datatype
                )
            });
            continue;
        }
        if let Some(shape) = &rule.shape
            && !tensor::shape_matches(shape, &tensor.shape)
        {
            violations.push(&rule.name, "", "shape", || {
                format!(
                    "input `{}` has shape {:?}, the policy declares {shape:?} (-1: any size)",
                    rule.name, tensor.shape
                )
            });
            continue;
        }
        let columns = rule.features.len().max(1);
        if !rule.features.is_empty() && tensor.shape.last().is_some_and(|&d| d as usize != columns)
        {
            violations.push(&rule.name, "", "shape", || {
                format!(
                    "input `{}` has {:?} values per row, the policy names {columns} features",
                    rule.name,
                    tensor.shape.last()
                )
            });
            continue;
        }
        value_violations(rule, tensor, columns, &mut violations);
    }
    violations
}

fn value_violations(rule: &InputRule, tensor: &Tensor, columns: usize, out: &mut ValidationError) {
    let mut push = |index: usize, rule_name: &'static str, what: &dyn Fn() -> String| {
        let (row, column) = (index / columns, index % columns);
        let feature = rule.features.get(column).map_or("", |f| f.name.as_str());
        out.push(&rule.name, feature, rule_name, || {
            if feature.is_empty() {
                format!("`{}`[row {row}] {}", rule.name, what())
            } else {
                format!("`{}`[row {row}] feature `{feature}` {}", rule.name, what())
            }
        });
    };
    if tensor.datatype == Datatype::Bytes {
        for (i, element) in tensor::bytes_elements(&tensor.data)
            .map_while(Result::ok)
            .enumerate()
        {
            if let Some(max) = rule.max_bytes_length
                && element.len() > max
            {
                push(i, "bytes_length", &|| {
                    format!("is {} bytes long, over the maximum of {max}", element.len())
                });
            }
            if let Some(Allowed::Strings(allowed)) = rule
                .features
                .get(i % columns)
                .and_then(|f| f.allowed.as_ref())
                && !allowed.iter().any(|a| a.as_bytes() == element)
            {
                push(i, "allowed", &|| {
                    format!(
                        "= {:?} is not one of {allowed:?}",
                        String::from_utf8_lossy(&element[..element.len().min(256)])
                    )
                });
            }
        }
        return;
    }
    let default = FeatureRule {
        name: String::new(),
        min: None,
        max: None,
        allowed: None,
        allow_nan: rule.allow_nan,
        allow_infinity: rule.allow_infinity,
        reference: None,
    };
    tensor::each_number(tensor, 0, 1, |i, value| {
        let f = rule.features.get(i % columns).unwrap_or(&default);
        if value.is_nan() {
            if !f.allow_nan {
                push(i, "nan", &|| "is NaN, which is not allowed".into());
            }
            return;
        }
        if value.is_infinite() && !f.allow_infinity {
            push(i, "infinity", &|| {
                format!("is {value}, which is not allowed")
            });
            return;
        }
        if let Some(min) = f.min
            && value < min
        {
            push(i, "min", &|| {
                format!("= {value} is below the minimum {min}")
            });
        }
        if let Some(max) = f.max
            && value > max
        {
            push(i, "max", &|| {
                format!("= {value} is above the maximum {max}")
            });
        }
        if let Some(Allowed::Numbers(allowed)) = &f.allowed
            && !allowed.contains(&value)
        {
            push(i, "allowed", &|| {
                format!("= {value} is not one of {allowed:?}")
            });
        }
    });
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
            error.listed,
            vec![
                "input `x` has datatype FP64, the model expects FP32",
                "input `x` has shape [3], the model expects [-1, 2] (-1: any size)",
                "unknown input `z` (the model's inputs: `x` (FP32 [-1, 2]))",
                "unknown output `w` requested (the model's outputs: `y` (FP32 [-1]))",
            ]
        );
        let missing = check_request(&request(vec![], None), &info()).unwrap_err();
        assert_eq!(missing.listed, ["missing input `x` (FP32 [-1, 2])"]);
        assert_eq!(
            (missing.counts()[0].input.as_str(), missing.counts()[0].rule),
            ("x", "missing_input")
        );
    }
}
