//! The input schema of a policy: what each input of a model must look like
//! and which values each feature (position on the last axis) may take.
//! Parsed and checked here; applied by `validate`.

use serde::Deserialize;
use toml::Spanned;

use super::{Location, PolicyError};
use crate::tensor::{self, Datatype};

/// What happens to a request that breaks a value rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer 400 listing every violation.
    Reject,
    /// Serve it, but count and log the violations (to roll a rule out safely).
    Flag,
}

/// A model's declared inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Schema {
    pub mode: Mode,
    /// Datatype and shape come from the plugins' `info()`; the policy adds
    /// the value rules.
    pub from_plugin: bool,
    pub inputs: Vec<InputRule>,
    /// Plugins may return NaN and infinities in float outputs.
    pub allow_nan_outputs: bool,
}

/// One declared input.
#[derive(Clone, Debug, PartialEq)]
pub struct InputRule {
    pub name: String,
    pub datatype: Option<Datatype>,
    pub shape: Option<Vec<i64>>,
    /// Longest BYTES element, in bytes.
    pub max_bytes_length: Option<usize>,
    /// Rules per position on the last axis; empty means none.
    pub features: Vec<FeatureRule>,
    /// For elements without a feature rule.
    pub allow_nan: bool,
    pub allow_infinity: bool,
}

/// Rules for one feature.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureRule {
    pub name: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub allowed: Option<Allowed>,
    pub allow_nan: bool,
    pub allow_infinity: bool,
    /// The training data's distribution, for drift and outliers.
    pub reference: Option<Reference>,
}

/// A feature's distribution in the training data: bin edges (increasing)
/// and the share of values in each bin, optionally mean and standard
/// deviation.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub edges: Vec<f64>,
    pub proportions: Vec<f64>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
}

/// How data monitoring summarizes what a model sees (`[monitoring]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Monitoring {
    /// Values per feature in the sliding window the drift score covers.
    pub window: usize,
    /// PSI above which a feature counts as drifting.
    pub drift_threshold: f64,
    /// Reference standard deviations beyond which a value is an outlier.
    pub outlier_sigma: f64,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            window: 1000,
            drift_threshold: 0.2,
            outlier_sigma: 4.0,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MonitoringTable {
    #[serde(default)]
    window: Option<Spanned<i64>>,
    #[serde(default)]
    drift_threshold: Option<Spanned<f64>>,
    #[serde(default)]
    outlier_sigma: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReferenceTable {
    edges: Vec<f64>,
    proportions: Vec<f64>,
    #[serde(default)]
    mean: Option<f64>,
    #[serde(default)]
    std: Option<f64>,
}

/// Checks `[monitoring]`.
pub(super) fn parse_monitoring(
    table: Option<&MonitoringTable>,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> Monitoring {
    let mut m = Monitoring::default();
    let Some(t) = table else { return m };
    if let Some(w) = &t.window {
        if (16..=1_000_000).contains(w.get_ref()) {
            m.window = *w.get_ref() as usize;
        } else {
            errors.push(PolicyError::at(
                &at(w.span(), "monitoring.window"),
                "allowed: 16 to 1000000 values",
            ));
        }
    }
    for (value, key, slot) in [
        (
            &t.drift_threshold,
            "monitoring.drift_threshold",
            &mut m.drift_threshold,
        ),
        (
            &t.outlier_sigma,
            "monitoring.outlier_sigma",
            &mut m.outlier_sigma,
        ),
    ] {
        if let Some(v) = value {
            if v.get_ref().is_finite() && *v.get_ref() > 0.0 {
                *slot = *v.get_ref();
            } else {
                errors.push(PolicyError::at(
                    &at(v.span(), key),
                    "must be a number above 0",
                ));
            }
        }
    }
    m
}

/// The values a feature may take.
#[derive(Clone, Debug, PartialEq)]
pub enum Allowed {
    Numbers(Vec<f64>),
    Strings(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ValidationTable {
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    from_plugin: Option<bool>,
    #[serde(default)]
    allow_nan_outputs: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InputTable {
    name: Spanned<String>,
    #[serde(default)]
    datatype: Option<Spanned<String>>,
    #[serde(default)]
    shape: Option<Spanned<Vec<i64>>>,
    #[serde(default)]
    max_bytes_length: Option<Spanned<i64>>,
    #[serde(default)]
    allow_nan: Option<bool>,
    #[serde(default)]
    allow_infinity: Option<bool>,
    #[serde(default)]
    features: Vec<FeatureTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureTable {
    name: Spanned<String>,
    #[serde(default)]
    min: Option<Spanned<f64>>,
    #[serde(default)]
    max: Option<Spanned<f64>>,
    #[serde(default)]
    allowed: Option<Spanned<Vec<toml::Value>>>,
    #[serde(default)]
    allow_nan: Option<bool>,
    #[serde(default)]
    allow_infinity: Option<bool>,
    #[serde(default)]
    reference: Option<Spanned<ReferenceTable>>,
}

/// Checks the `[validation]` table and the `[[inputs]]` array.
pub(super) fn parse(
    validation: Option<&ValidationTable>,
    inputs: &[InputTable],
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> Option<Schema> {
    if validation.is_none() && inputs.is_empty() {
        return None;
    }
    let before = errors.len();
    let mode = match validation.and_then(|v| v.mode.as_ref()) {
        None => Mode::Reject,
        Some(m) => match m.get_ref().as_str() {
            "reject" => Mode::Reject,
            "flag" => Mode::Flag,
            other => {
                errors.push(PolicyError::at(
                    &at(m.span(), "validation.mode"),
                    format!("`{other}` is not a mode; use `reject` or `flag`"),
                ));
                Mode::Reject
            }
        },
    };
    let from_plugin = validation.and_then(|v| v.from_plugin).unwrap_or(false);
    let mut rules: Vec<InputRule> = Vec::new();
    for input in inputs {
        let name = input.name.get_ref().clone();
        let key = format!("inputs.{name}");
        if rules.iter().any(|r| r.name == name) {
            errors.push(PolicyError::at(
                &at(input.name.span(), &key),
                format!("input `{name}` is declared twice"),
            ));
        }
        let datatype = input
            .datatype
            .as_ref()
            .and_then(|d| match Datatype::from_v2(d.get_ref()) {
                Some(dt) => Some(dt),
                None => {
                    errors.push(PolicyError::at(
                        &at(d.span(), &format!("{key}.datatype")),
                        format!(
                            "`{}` is not a datatype (use one of {})",
                            d.get_ref(),
                            tensor::supported_datatypes()
                        ),
                    ));
                    None
                }
            });
        if !from_plugin && (input.datatype.is_none() || input.shape.is_none()) {
            errors.push(PolicyError::at(
                &at(input.name.span(), &key),
                "give `datatype` and `shape`, or set `from_plugin = true` in [validation]",
            ));
        }
        let shape = input.shape.as_ref().map(|s| {
            if s.get_ref().iter().any(|&d| d < -1) {
                errors.push(PolicyError::at(
                    &at(s.span(), &format!("{key}.shape")),
                    "dimensions are sizes (0 or more) or -1 for any size",
                ));
            }
            s.get_ref().clone()
        });
        if let (Some(shape), false) = (&shape, input.features.is_empty()) {
            match shape.last() {
                Some(&last) if last >= 0 && last as usize != input.features.len() => {
                    errors.push(PolicyError::at(
                        &at(input.name.span(), &format!("{key}.features")),
                        format!(
                            "{} features for a last dimension of {last}",
                            input.features.len()
                        ),
                    ));
                }
                None => errors.push(PolicyError::at(
                    &at(input.name.span(), &format!("{key}.features")),
                    "a scalar input has no features",
                )),
                _ => {}
            }
        }
        let max_bytes_length = input.max_bytes_length.as_ref().and_then(|m| {
            let v = *m.get_ref();
            if v < 0 {
                errors.push(PolicyError::at(
                    &at(m.span(), &format!("{key}.max_bytes_length")),
                    "must be 0 or more",
                ));
                None
            } else {
                Some(v as usize)
            }
        });
        let features = input
            .features
            .iter()
            .map(|f| feature(f, input, &key, at, errors))
            .collect();
        rules.push(InputRule {
            name,
            datatype,
            shape,
            max_bytes_length,
            features,
            allow_nan: input.allow_nan.unwrap_or(false),
            allow_infinity: input.allow_infinity.unwrap_or(false),
        });
    }
    let allow_nan_outputs = validation
        .and_then(|v| v.allow_nan_outputs)
        .unwrap_or(false);
    (errors.len() == before).then_some(Schema {
        mode,
        from_plugin,
        inputs: rules,
        allow_nan_outputs,
    })
}

fn feature(
    f: &FeatureTable,
    input: &InputTable,
    input_key: &str,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> FeatureRule {
    let key = format!("{input_key}.features.{}", f.name.get_ref());
    let bound = |b: &Option<Spanned<f64>>, errors: &mut Vec<PolicyError>, which: &str| {
        b.as_ref().map(|v| {
            if v.get_ref().is_nan() {
                errors.push(PolicyError::at(
                    &at(v.span(), &format!("{key}.{which}")),
                    "must be a number",
                ));
            }
            *v.get_ref()
        })
    };
    let min = bound(&f.min, errors, "min");
    let max = bound(&f.max, errors, "max");
    if let (Some(lo), Some(hi), Some(m)) = (min, max, &f.max)
        && lo > hi
    {
        errors.push(PolicyError::at(
            &at(m.span(), &format!("{key}.max")),
            format!("{hi} is below min {lo}"),
        ));
    }
    let allowed = f.allowed.as_ref().and_then(|a| {
        let values = a.get_ref();
        let numbers: Option<Vec<f64>> = values
            .iter()
            .map(|v| match v {
                toml::Value::Integer(i) => Some(*i as f64),
                toml::Value::Float(x) => Some(*x),
                _ => None,
            })
            .collect();
        let strings: Option<Vec<String>> = values
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect();
        match (numbers, strings) {
            _ if values.is_empty() => {
                errors.push(PolicyError::at(
                    &at(a.span(), &format!("{key}.allowed")),
                    "list at least one value",
                ));
                None
            }
            (Some(n), _) => Some(Allowed::Numbers(n)),
            (_, Some(s)) => Some(Allowed::Strings(s)),
            _ => {
                errors.push(PolicyError::at(
                    &at(a.span(), &format!("{key}.allowed")),
                    "list numbers, or strings for BYTES, not a mix",
                ));
                None
            }
        }
    });
    let reference = f.reference.as_ref().and_then(|r| {
        let t = r.get_ref();
        let problem = if t.edges.len() < 2 {
            Some("needs at least two edges".to_string())
        } else if t
            .edges
            .windows(2)
            .any(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            Some("edges must increase".to_string())
        } else if t.proportions.len() + 1 != t.edges.len() {
            Some(format!(
                "{} edges make {} bins, but there are {} proportions",
                t.edges.len(),
                t.edges.len() - 1,
                t.proportions.len()
            ))
        } else if t.proportions.iter().any(|p| !(0.0..=1.0).contains(p))
            || (t.proportions.iter().sum::<f64>() - 1.0).abs() > 0.01
        {
            Some("proportions must be between 0 and 1 and add up to 1".to_string())
        } else if t
            .std
            .is_some_and(|s| s.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater))
        {
            Some("std must be above 0".to_string())
        } else {
            None
        };
        match problem {
            Some(p) => {
                errors.push(PolicyError::at(
                    &at(r.span(), &format!("{key}.reference")),
                    p,
                ));
                None
            }
            None => Some(Reference {
                edges: t.edges.clone(),
                proportions: t.proportions.clone(),
                mean: t.mean,
                std: t.std,
            }),
        }
    });
    FeatureRule {
        reference,
        name: f.name.get_ref().clone(),
        min,
        max,
        allowed,
        allow_nan: f.allow_nan.or(input.allow_nan).unwrap_or(false),
        allow_infinity: f.allow_infinity.or(input.allow_infinity).unwrap_or(false),
    }
}
