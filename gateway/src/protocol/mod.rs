//! The Open Inference Protocol (KServe V2) REST encoding: request bodies in,
//! response bodies out. Owns the wire format and its errors
//! ([`DecodeError`]); knows nothing of routing, plugins or HTTP statuses.

mod data;

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::tensor::{self, Datatype, Tensor, TensorSpec};
use data::{ElementSink, Elements};

/// Bounds on what one request may ask the gateway to hold.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Inputs per request.
    pub max_inputs: usize,
    /// Elements per input tensor.
    pub max_elements: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_inputs: 64,
            max_elements: 16 << 20,
        }
    }
}

/// A decoded inference request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// The outputs the client asked for, in its order; `None` means all.
    pub outputs: Option<Vec<String>>,
}

/// Why a request body is not a valid V2 inference request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Json(String),
    NoInputs,
    TooManyInputs {
        count: usize,
        limit: usize,
    },
    DuplicateInput(String),
    UnknownDatatype {
        input: String,
        datatype: String,
    },
    MissingData {
        input: String,
    },
    Shape {
        input: String,
        detail: String,
    },
    TooManyElements {
        input: String,
        count: usize,
        limit: usize,
    },
    Data {
        input: String,
        detail: String,
    },
    ElementCount {
        input: String,
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(e) => write!(f, "malformed inference request: {e}"),
            DecodeError::NoInputs => f.write_str("the request has no inputs"),
            DecodeError::TooManyInputs { count, limit } => {
                write!(f, "the request has {count} inputs; the limit is {limit}")
            }
            DecodeError::DuplicateInput(name) => write!(f, "input `{name}` appears twice"),
            DecodeError::UnknownDatatype { input, datatype } => write!(
                f,
                "input `{input}`: unsupported datatype `{datatype}` (supported: {})",
                tensor::supported_datatypes()
            ),
            DecodeError::MissingData { input } => write!(f, "input `{input}` has no `data`"),
            DecodeError::Shape { input, detail } => write!(f, "input `{input}`: {detail}"),
            DecodeError::TooManyElements {
                input,
                count,
                limit,
            } => write!(
                f,
                "input `{input}`: {count} elements exceed the limit of {limit} per tensor"
            ),
            DecodeError::Data { input, detail } => write!(f, "input `{input}`: {detail}"),
            DecodeError::ElementCount {
                input,
                shape,
                expected,
                actual,
            } => write!(
                f,
                "input `{input}`: shape {shape:?} needs {expected} elements, data has {actual}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "parameters")]
    _parameters: Option<Parameters>,
    #[serde(borrow)]
    inputs: Vec<WireInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<WireOutput>>,
}

#[derive(Deserialize)]
struct WireInput<'a> {
    name: String,
    shape: Vec<i64>,
    #[serde(borrow)]
    datatype: Cow<'a, str>,
    #[serde(default, rename = "parameters")]
    _parameters: Option<Parameters>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireOutput {
    name: String,
    #[serde(default, rename = "parameters")]
    _parameters: Option<Parameters>,
}

/// A `parameters` object: accepted and checked to be an object, otherwise
/// ignored (the V2 protocol leaves their meaning to the server).
struct Parameters;

impl<'de> Deserialize<'de> for Parameters {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = Parameters;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a parameters object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Parameters, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Parameters)
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

/// Decodes a V2 JSON inference request body.
pub fn decode_infer_request(
    body: &[u8],
    limits: DecodeLimits,
) -> Result<InferRequest, DecodeError> {
    let wire: WireRequest<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError::Json(e.to_string()))?;
    if wire.inputs.is_empty() {
        return Err(DecodeError::NoInputs);
    }
    if wire.inputs.len() > limits.max_inputs {
        return Err(DecodeError::TooManyInputs {
            count: wire.inputs.len(),
            limit: limits.max_inputs,
        });
    }
    let mut inputs: Vec<Tensor> = Vec::with_capacity(wire.inputs.len());
    for input in wire.inputs {
        if inputs.iter().any(|t| t.name == input.name) {
            return Err(DecodeError::DuplicateInput(input.name));
        }
        inputs.push(decode_input(input, limits)?);
    }
    let outputs = wire
        .outputs
        .map(|o| o.into_iter().map(|o| o.name).collect());
    Ok(InferRequest {
        id: wire.id,
        inputs,
        outputs,
    })
}

fn decode_input(input: WireInput<'_>, limits: DecodeLimits) -> Result<Tensor, DecodeError> {
    let name = input.name;
    let Some(datatype) = Datatype::from_v2(&input.datatype) else {
        return Err(DecodeError::UnknownDatatype {
            input: name,
            datatype: input.datatype.into_owned(),
        });
    };
    let expected = tensor::element_count(&input.shape).map_err(|e| DecodeError::Shape {
        input: name.clone(),
        detail: e.to_string(),
    })?;
    if expected > limits.max_elements {
        return Err(DecodeError::TooManyElements {
            input: name,
            count: expected,
            limit: limits.max_elements,
        });
    }
    let Some(raw) = input.data else {
        return Err(DecodeError::MissingData { input: name });
    };
    // Every JSON element takes at least two bytes (digit and separator), so the
    // raw text bounds the allocation whatever the shape claims.
    let mut sink = ElementSink::new(datatype, expected, raw.get().len() / 2 + 1);
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::DeserializeSeed::deserialize(Elements(&mut sink), &mut de).map_err(|e| {
        DecodeError::Data {
            input: name.clone(),
            detail: without_position(&e),
        }
    })?;
    if sink.count != expected {
        return Err(DecodeError::ElementCount {
            input: name,
            shape: input.shape,
            expected,
            actual: sink.count,
        });
    }
    Ok(Tensor {
        name,
        datatype,
        shape: input.shape,
        data: sink.data,
    })
}

/// serde_json's message without " at line 1 column 9", which points into the
/// `data` array rather than the body and would mislead.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// The body of a successful inference response.
pub struct InferResponse<'a> {
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub id: Option<&'a str>,
    pub outputs: &'a [&'a Tensor],
}

impl Serialize for InferResponse<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model_name", self.model_name)?;
        map.serialize_entry("model_version", self.model_version)?;
        if let Some(id) = self.id {
            map.serialize_entry("id", id)?;
        }
        map.serialize_entry("outputs", &OutputList(self.outputs))?;
        map.end()
    }
}

struct OutputList<'a>(&'a [&'a Tensor]);

impl Serialize for OutputList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            seq.serialize_element(&OutputTensor(t))?;
        }
        seq.end()
    }
}

struct OutputTensor<'a>(&'a Tensor);

impl Serialize for OutputTensor<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("name", &t.name)?;
        map.serialize_entry("datatype", t.datatype.as_v2())?;
        map.serialize_entry("shape", &t.shape)?;
        map.serialize_entry("data", &OutputData(t))?;
        map.end()
    }
}

/// The elements of a tensor as a flat JSON array, read straight from its
/// little-endian buffer (layout already checked by the runtime).
struct OutputData<'a>(&'a Tensor);

impl Serialize for OutputData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        macro_rules! numbers {
            ($t:ty) => {{
                const N: usize = size_of::<$t>();
                let mut seq = s.serialize_seq(Some(t.data.len() / N))?;
                for chunk in t.data.chunks_exact(N) {
                    let mut bytes = [0u8; N];
                    bytes.copy_from_slice(chunk);
                    seq.serialize_element(&<$t>::from_le_bytes(bytes))?;
                }
                seq.end()
            }};
        }
        match t.datatype {
            Datatype::Bool => {
                let mut seq = s.serialize_seq(Some(t.data.len()))?;
                for b in &t.data {
                    seq.serialize_element(&(*b != 0))?;
                }
                seq.end()
            }
            Datatype::Int8 => numbers!(i8),
            Datatype::Int16 => numbers!(i16),
            Datatype::Int32 => numbers!(i32),
            Datatype::Int64 => numbers!(i64),
            Datatype::Uint8 => numbers!(u8),
            Datatype::Uint16 => numbers!(u16),
            Datatype::Uint32 => numbers!(u32),
            Datatype::Uint64 => numbers!(u64),
            Datatype::Fp32 => numbers!(f32),
            Datatype::Fp64 => numbers!(f64),
            Datatype::Bytes => {
                let mut seq = s.serialize_seq(None)?;
                for (i, element) in tensor::bytes_elements(&t.data).enumerate() {
                    let element = element.map_err(serde::ser::Error::custom)?;
                    let text = std::str::from_utf8(element).map_err(|_| {
                        serde::ser::Error::custom(format_args!(
                            "output `{}` element {i} is not UTF-8 text, which JSON cannot carry",
                            t.name
                        ))
                    })?;
                    seq.serialize_element(text)?;
                }
                seq.end()
            }
        }
    }
}

/// `GET /v2`: server metadata.
#[derive(Serialize)]
pub struct ServerMetadata<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub extensions: &'a [&'a str],
}

/// `GET /v2/models/{model}[/versions/{version}]`: model metadata.
#[derive(Serialize)]
pub struct ModelMetadata<'a> {
    pub name: &'a str,
    pub versions: Vec<&'a str>,
    pub platform: &'a str,
    pub inputs: Vec<SpecJson<'a>>,
    pub outputs: Vec<SpecJson<'a>>,
}

/// One input or output in model metadata.
#[derive(Serialize)]
pub struct SpecJson<'a> {
    pub name: &'a str,
    pub datatype: &'static str,
    pub shape: &'a [i64],
}

impl<'a> From<&'a TensorSpec> for SpecJson<'a> {
    fn from(spec: &'a TensorSpec) -> Self {
        SpecJson {
            name: &spec.name,
            datatype: spec.datatype.as_v2(),
            shape: &spec.shape,
        }
    }
}

/// The error body every failure uses: `{"error": "..."}`.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<InferRequest, DecodeError> {
        decode_infer_request(body.as_bytes(), DecodeLimits::default())
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn decodes_flat_and_nested_data() {
        let flat = decode(r#"{"id":"r1","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2.5,3,4]}]}"#).unwrap();
        let nested = decode(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}"#,
        )
        .unwrap();
        assert_eq!(flat.id.as_deref(), Some("r1"));
        assert_eq!(f32s(&flat.inputs[0]), vec![1.0, 2.5, 3.0, 4.0]);
        assert_eq!(flat.inputs[0].data, nested.inputs[0].data);
    }

    #[test]
    fn decodes_every_datatype() {
        let cases = [
            ("BOOL", "[true,false]", vec![1u8, 0]),
            ("INT8", "[-128,127]", vec![0x80, 0x7f]),
            ("UINT8", "[0,255]", vec![0, 255]),
            (
                "INT16",
                "[-2,3]",
                [(-2i16).to_le_bytes(), 3i16.to_le_bytes()].concat(),
            ),
            (
                "UINT16",
                "[65535,1]",
                [65535u16.to_le_bytes(), 1u16.to_le_bytes()].concat(),
            ),
            (
                "INT32",
                "[-1,7]",
                [(-1i32).to_le_bytes(), 7i32.to_le_bytes()].concat(),
            ),
            (
                "UINT32",
                "[4294967295,0]",
                [u32::MAX.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            (
                "INT64",
                "[-9223372036854775808,1]",
                [i64::MIN.to_le_bytes(), 1i64.to_le_bytes()].concat(),
            ),
            (
                "UINT64",
                "[18446744073709551615,2]",
                [u64::MAX.to_le_bytes(), 2u64.to_le_bytes()].concat(),
            ),
            (
                "FP64",
                "[0.1,-2]",
                [0.1f64.to_le_bytes(), (-2f64).to_le_bytes()].concat(),
            ),
            (
                "BYTES",
                r#"["hi","é"]"#,
                [
                    &2u32.to_le_bytes()[..],
                    b"hi",
                    &2u32.to_le_bytes(),
                    "é".as_bytes(),
                ]
                .concat(),
            ),
        ];
        for (datatype, data, expected) in cases {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{datatype}","data":{data}}}]}}"#
            );
            let request = decode(&body).unwrap_or_else(|e| panic!("{datatype}: {e}"));
            assert_eq!(request.inputs[0].data, expected, "{datatype}");
            assert_eq!(request.inputs[0].datatype.as_v2(), datatype);
        }
    }

    #[test]
    fn rejects_values_outside_the_datatype() {
        let cases = [
            ("INT8", "[128]", "element 0 is 128, out of range for INT8"),
            ("UINT8", "[-1]", "element 0 is -1, out of range for UINT8"),
            (
                "INT32",
                "[1.5]",
                "element 0 is 1.5, not an integer as INT32 requires",
            ),
            ("FP32", "[1e39]", "element 0 is 1e39, out of range for FP32"),
            (
                "BOOL",
                "[1]",
                "element 0 is the number 1, but the datatype is BOOL",
            ),
            (
                "FP32",
                r#"["a"]"#,
                "element 0 is a string, but the datatype is FP32",
            ),
            (
                "BYTES",
                "[true]",
                "element 0 is true, but the datatype is BYTES",
            ),
            ("FP32", "[null]", "element 0 is null"),
        ];
        for (datatype, data, message) in cases {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{datatype}","data":{data}}}]}}"#
            );
            let error = decode(&body).unwrap_err();
            assert_eq!(
                error,
                DecodeError::Data {
                    input: "x".into(),
                    detail: message.into()
                },
                "{datatype} {data}"
            );
        }
    }

    #[test]
    fn checks_shape_against_data() {
        let short = decode(
            r#"{"inputs":[{"name":"x","shape":[1,6],"datatype":"FP32","data":[1,2,3,4,5]}]}"#,
        );
        assert_eq!(
            short.unwrap_err().to_string(),
            "input `x`: shape [1, 6] needs 6 elements, data has 5"
        );
        let long =
            decode(r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2,3]}]}"#);
        assert_eq!(
            long.unwrap_err().to_string(),
            "input `x`: data has more than the 2 elements its shape allows"
        );
        let negative =
            decode(r#"{"inputs":[{"name":"x","shape":[-1,2],"datatype":"FP32","data":[1,2]}]}"#);
        assert_eq!(
            negative.unwrap_err().to_string(),
            "input `x`: shape [-1, 2] has a negative dimension"
        );
    }

    #[test]
    fn bounds_what_a_shape_can_claim() {
        let huge = decode(
            r#"{"inputs":[{"name":"x","shape":[1000000,1000000],"datatype":"FP32","data":[1]}]}"#,
        );
        assert!(matches!(huge, Err(DecodeError::TooManyElements { .. })));
        let overflow = decode(
            r#"{"inputs":[{"name":"x","shape":[9223372036854775807,9223372036854775807],"datatype":"FP32","data":[]}]}"#,
        );
        assert!(matches!(overflow, Err(DecodeError::Shape { .. })));
    }

    #[test]
    fn rejects_malformed_requests() {
        assert!(matches!(decode("{"), Err(DecodeError::Json(_))));
        assert!(matches!(
            decode(r#"{"inputs":[]}"#),
            Err(DecodeError::NoInputs)
        ));
        assert!(matches!(
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":[1]}]}"#),
            Err(DecodeError::UnknownDatatype { .. })
        ));
        assert!(matches!(
            decode(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#),
            Err(DecodeError::MissingData { .. })
        ));
        assert!(matches!(
            decode(
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]},{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#
            ),
            Err(DecodeError::DuplicateInput(_))
        ));
        assert!(matches!(
            decode(
                r#"{"parameters":[1],"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#
            ),
            Err(DecodeError::Json(_))
        ));
        let params = decode(r#"{"parameters":{"a":{"b":[1]}},"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"c":1},"data":[1]}],"outputs":[{"name":"y","parameters":{}}]}"#).unwrap();
        assert_eq!(params.outputs, Some(vec!["y".to_string()]));
    }

    #[test]
    fn encodes_a_response() {
        let label = Tensor {
            name: "label".into(),
            datatype: Datatype::Bytes,
            shape: vec![1],
            data: [&3u32.to_le_bytes()[..], b"day"].concat(),
        };
        let p = Tensor {
            name: "p".into(),
            datatype: Datatype::Fp32,
            shape: vec![1, 2],
            data: [0.25f32.to_le_bytes(), 0.75f32.to_le_bytes()].concat(),
        };
        let body = serde_json::to_string(&InferResponse {
            model_name: "m",
            model_version: "v1",
            id: Some("7"),
            outputs: &[&label, &p],
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"model_name":"m","model_version":"v1","id":"7","outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["day"]},{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]}]}"#
        );
    }
}
