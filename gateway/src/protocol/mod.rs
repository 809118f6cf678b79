//! The Open Inference Protocol (KServe V2) REST encoding: request bodies in,
//! response bodies out. Owns the wire format and its errors
//! ([`DecodeError`]); knows nothing of routing, plugins or HTTP statuses.

mod data;

use std::borrow::Cow;
use std::fmt;

use serde::de;
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
    /// Bytes per BYTES element.
    pub max_bytes_element: usize,
    /// Bytes of the request's `id`.
    pub max_id_bytes: usize,
    /// Bytes of each `parameters` object (the request's, an input's or an
    /// output's), as written.
    pub max_parameters_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_inputs: 64,
            max_elements: 16 << 20,
            max_bytes_element: 1 << 20,
            max_id_bytes: 1024,
            max_parameters_bytes: 64 << 10,
        }
    }
}

/// A decoded inference request.
#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// The outputs the client asked for, in its order; `None` means all.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// `binary_data_output`: outputs in binary unless they say otherwise.
    pub binary_outputs: bool,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    /// `binary_data`, when the client set it.
    pub binary: Option<bool>,
}

impl InferRequest {
    /// Whether output `name` goes back in binary (the binary tensor
    /// extension): a listed output as its own `binary_data` says (JSON
    /// unless set), any other as `binary_data_output` says, as Triton and
    /// KServe read it.
    pub fn wants_binary(&self, name: &str) -> bool {
        match self.outputs.iter().flatten().find(|o| o.name == name) {
            Some(listed) => listed.binary.unwrap_or(false),
            None => self.binary_outputs,
        }
    }
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
    DuplicateOutput(String),
    TooManyOutputs {
        count: usize,
        limit: usize,
    },
    /// A field over its size limit (`id`, `parameters`).
    TooLong {
        field: &'static str,
        bytes: usize,
        limit: usize,
    },
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
    /// The binary tensor extension's framing is wrong.
    Binary(String),
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
            DecodeError::TooManyOutputs { count, limit } => write!(
                f,
                "the request asks for {count} outputs; the limit is {limit}"
            ),
            DecodeError::DuplicateOutput(name) => {
                write!(f, "output `{name}` is requested twice")
            }
            DecodeError::TooLong {
                field,
                bytes,
                limit,
            } => write!(f, "`{field}` is {bytes} bytes; the limit is {limit}"),
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
            DecodeError::Binary(detail) => f.write_str(detail),
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
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
    #[serde(borrow)]
    inputs: Vec<WireInput<'a>>,
    #[serde(default, borrow)]
    outputs: Option<Vec<WireOutput<'a>>>,
}

#[derive(Deserialize)]
struct WireInput<'a> {
    name: String,
    shape: Vec<i64>,
    #[serde(borrow)]
    datatype: Cow<'a, str>,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireOutput<'a> {
    name: String,
    #[serde(default, borrow)]
    parameters: Option<&'a RawValue>,
}

/// A `parameters` object within `limits.max_parameters_bytes`, parsed for
/// the keys the gateway understands.
fn parameters<'a, T: Deserialize<'a> + Default>(
    raw: Option<&'a RawValue>,
    limits: DecodeLimits,
) -> Result<T, DecodeError> {
    let Some(raw) = raw else {
        return Ok(T::default());
    };
    let text = raw.get();
    if text.len() > limits.max_parameters_bytes {
        return Err(DecodeError::TooLong {
            field: "parameters",
            bytes: text.len(),
            limit: limits.max_parameters_bytes,
        });
    }
    if text == "null" {
        return Ok(T::default());
    }
    serde_json::from_str(text).map_err(|e| DecodeError::Json(format!("`parameters`: {e}")))
}

// `parameters` objects: the keys the gateway understands, the others
// accepted and ignored (the V2 protocol leaves them to the server).

#[derive(Deserialize, Default)]
struct RequestParameters {
    /// Binary tensor extension: every output in binary unless an output
    /// says otherwise.
    #[serde(default)]
    binary_data_output: Option<bool>,
}

#[derive(Deserialize, Default)]
struct InputParameters {
    /// Binary tensor extension: the input's data is this many bytes of the
    /// binary part of the body.
    #[serde(default)]
    binary_data_size: Option<u64>,
}

#[derive(Deserialize, Default)]
struct OutputParameters {
    /// Binary tensor extension: return this output in binary.
    #[serde(default)]
    binary_data: Option<bool>,
}

/// Decodes a V2 inference request body. With `json_length` (the
/// `Inference-Header-Content-Length` header of the binary tensor extension)
/// the body is that many bytes of JSON followed by the binary data of the
/// inputs that declare a `binary_data_size`, in order.
pub fn decode_infer_request(
    body: &[u8],
    json_length: Option<usize>,
    limits: DecodeLimits,
) -> Result<InferRequest, DecodeError> {
    let (json, mut binary) = match json_length {
        None => (body, None),
        Some(n) if n > body.len() => {
            return Err(DecodeError::Binary(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => (&body[..n], Some(&body[n..])),
    };
    let wire: WireRequest<'_> =
        serde_json::from_slice(json).map_err(|e| DecodeError::Json(e.to_string()))?;
    if let Some(id) = &wire.id
        && id.len() > limits.max_id_bytes
    {
        return Err(DecodeError::TooLong {
            field: "id",
            bytes: id.len(),
            limit: limits.max_id_bytes,
        });
    }
    let request_parameters: RequestParameters = parameters(wire.parameters, limits)?;
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
        inputs.push(decode_input(input, &mut binary, limits)?);
    }
    if let Some(rest) = binary.filter(|rest| !rest.is_empty()) {
        return Err(DecodeError::Binary(format!(
            "{} bytes of binary data follow the JSON but no input claims them (binary_data_size)",
            rest.len()
        )));
    }
    let outputs = match wire.outputs {
        None => None,
        Some(wire_outputs) => {
            if wire_outputs.len() > limits.max_inputs {
                return Err(DecodeError::TooManyOutputs {
                    count: wire_outputs.len(),
                    limit: limits.max_inputs,
                });
            }
            let mut outputs: Vec<RequestedOutput> = Vec::with_capacity(wire_outputs.len());
            for o in wire_outputs {
                if outputs.iter().any(|r| r.name == o.name) {
                    return Err(DecodeError::DuplicateOutput(o.name));
                }
                let p: OutputParameters = parameters(o.parameters, limits)?;
                outputs.push(RequestedOutput {
                    name: o.name,
                    binary: p.binary_data,
                });
            }
            Some(outputs)
        }
    };
    Ok(InferRequest {
        id: wire.id,
        inputs,
        outputs,
        binary_outputs: request_parameters.binary_data_output.unwrap_or(false),
    })
}

fn decode_input(
    input: WireInput<'_>,
    binary: &mut Option<&[u8]>,
    limits: DecodeLimits,
) -> Result<Tensor, DecodeError> {
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
    let input_parameters: InputParameters = parameters(input.parameters, limits)?;
    if let Some(size) = input_parameters.binary_data_size {
        if input.data.is_some() {
            return Err(DecodeError::Binary(format!(
                "input `{name}` has both `data` and a binary_data_size"
            )));
        }
        let Some(rest) = binary.as_mut() else {
            return Err(DecodeError::Binary(format!(
                "input `{name}` has a binary_data_size but the request has no Inference-Header-Content-Length header"
            )));
        };
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > rest.len() {
            return Err(DecodeError::Binary(format!(
                "input `{name}`: binary_data_size {size} runs past the end of the body ({} bytes left)",
                rest.len()
            )));
        }
        let (data, tail) = rest.split_at(size);
        *rest = tail;
        let mut tensor = Tensor {
            name,
            datatype,
            shape: input.shape,
            data: data.to_vec(),
        };
        tensor::check_layout(&tensor).map_err(|e| {
            DecodeError::Binary(format!("input `{}`: binary data: {e}", tensor.name))
        })?;
        if let Some((i, long)) = tensor::bytes_elements(if datatype == Datatype::Bytes {
            &tensor.data
        } else {
            &[]
        })
        .map_while(Result::ok)
        .enumerate()
        .find(|(_, e)| e.len() > limits.max_bytes_element)
        {
            return Err(DecodeError::Binary(format!(
                "input `{}`: element {i} is {} bytes, over the limit of {} bytes per BYTES element",
                tensor.name,
                long.len(),
                limits.max_bytes_element
            )));
        }
        if datatype == Datatype::Bool {
            // Any non-zero byte is true; plugins see 0 or 1 only.
            tensor.data.iter_mut().for_each(|b| *b = u8::from(*b != 0));
        }
        return Ok(tensor);
    }
    let Some(raw) = input.data else {
        return Err(DecodeError::MissingData { input: name });
    };
    // Every JSON element takes at least two bytes (digit and separator), so the
    // raw text bounds the allocation whatever the shape claims.
    let mut sink = ElementSink::new(datatype, expected, raw.get().len() / 2 + 1);
    sink.max_bytes_element = limits.max_bytes_element;
    sink.dims = input.shape.iter().map(|&d| d as usize).collect();
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::DeserializeSeed::deserialize(Elements::top(&mut sink), &mut de).map_err(|e| {
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
    /// The outputs and, for each, whether it goes in binary.
    pub outputs: &'a [(&'a Tensor, bool)],
}

impl InferResponse<'_> {
    /// The response body, and the length of its JSON part when binary
    /// outputs follow it (the `Inference-Header-Content-Length` header).
    pub fn encode(&self) -> Result<(Vec<u8>, Option<usize>), serde_json::Error> {
        let binary: usize = self
            .outputs
            .iter()
            .filter(|(_, b)| *b)
            .map(|(t, _)| t.data.len())
            .sum();
        let mut body = Vec::with_capacity(
            128 + 16
                * self
                    .outputs
                    .iter()
                    .map(|(t, _)| t.data.len())
                    .sum::<usize>(),
        );
        serde_json::to_writer(&mut body, self)?;
        if !self.outputs.iter().any(|(_, b)| *b) {
            return Ok((body, None));
        }
        let json_length = body.len();
        body.reserve(binary);
        for (tensor, _) in self.outputs.iter().filter(|(_, b)| *b) {
            body.extend_from_slice(&tensor.data);
        }
        Ok((body, Some(json_length)))
    }
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

struct OutputList<'a>(&'a [(&'a Tensor, bool)]);

impl Serialize for OutputList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (t, binary) in self.0 {
            seq.serialize_element(&OutputTensor(t, *binary))?;
        }
        seq.end()
    }
}

struct OutputTensor<'a>(&'a Tensor, bool);

impl Serialize for OutputTensor<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let OutputTensor(t, binary) = *self;
        let mut map = s.serialize_map(Some(4))?;
        map.serialize_entry("name", &t.name)?;
        map.serialize_entry("datatype", t.datatype.as_v2())?;
        map.serialize_entry("shape", &t.shape)?;
        if binary {
            #[derive(Serialize)]
            struct Binary {
                binary_data_size: usize,
            }
            map.serialize_entry(
                "parameters",
                &Binary {
                    binary_data_size: t.data.len(),
                },
            )?;
        } else {
            map.serialize_entry("data", &OutputData(t))?;
        }
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
pub struct ModelMetadata<'a, E: Serialize> {
    pub name: &'a str,
    pub versions: Vec<&'a str>,
    pub platform: &'a str,
    pub inputs: Vec<SpecJson<'a>>,
    pub outputs: Vec<SpecJson<'a>>,
    /// What the gateway adds to the protocol's fields (V2 clients ignore
    /// keys they do not know).
    #[serde(flatten)]
    pub extra: E,
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
        decode_infer_request(body.as_bytes(), None, DecodeLimits::default())
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
    fn nested_data_must_follow_the_shape() {
        let body = |shape: &str, data: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"FP32","data":{data}}}]}}"#
            )
        };
        // The element count matches, the nesting does not.
        let ragged = decode(&body("[2,3]", "[[1,2],[3,4,5,6]]")).unwrap_err();
        assert!(
            ragged.to_string().contains(
                "data is ragged: an array at nesting depth 1 has 2 elements, the shape [2, 3] needs 3"
            ),
            "{ragged}"
        );
        assert!(decode(&body("[2,3]", "[1,[2,3],4,5,6]")).is_err());
        assert!(decode(&body("[2,3]", "[[[1,2,3]],[[4,5,6]]]")).is_err());
        assert!(decode(&body("[3,2]", "[[1,2],[3,4]]")).is_err());
        for good in ["[[1,2,3],[4,5,6]]", "[1,2,3,4,5,6]"] {
            assert!(decode(&body("[2,3]", good)).is_ok(), "{good}");
        }
        assert!(decode(&body("[0,3]", "[]")).is_ok());
    }

    #[test]
    fn integers_written_as_inexact_floats_are_refused() {
        let body = |datatype: &str, data: &str| {
            format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{datatype}","data":{data}}}]}}"#
            )
        };
        let error = decode(&body("INT64", "[9007199254740993.0]")).unwrap_err();
        assert!(error.to_string().contains("written as a float"), "{error}");
        assert!(decode(&body("UINT64", "[1e19]")).is_err());
        let exact = decode(&body("INT64", "[4.0]")).unwrap();
        assert_eq!(exact.inputs[0].data, 4i64.to_le_bytes());
        let big = decode(&body("INT64", "[9007199254740993]")).unwrap();
        assert_eq!(big.inputs[0].data, 9_007_199_254_740_993i64.to_le_bytes());
    }

    #[test]
    fn outputs_ids_and_parameters_are_checked() {
        let input = r#"{"name":"x","shape":[1],"datatype":"FP32","data":[1]}"#;
        let twice = format!(r#"{{"inputs":[{input}],"outputs":[{{"name":"y"}},{{"name":"y"}}]}}"#);
        assert_eq!(
            decode(&twice).unwrap_err(),
            DecodeError::DuplicateOutput("y".into())
        );
        let long_id = format!(r#"{{"id":"{}","inputs":[{input}]}}"#, "i".repeat(1025));
        assert_eq!(
            decode(&long_id).unwrap_err().to_string(),
            "`id` is 1025 bytes; the limit is 1024"
        );
        let big = format!(
            r#"{{"parameters":{{"k":"{}"}},"inputs":[{input}]}}"#,
            "p".repeat(70_000)
        );
        assert!(matches!(
            decode(&big).unwrap_err(),
            DecodeError::TooLong {
                field: "parameters",
                ..
            }
        ));
        // binary_data_output covers the outputs not listed; a listed one
        // keeps its own setting.
        let listed = format!(
            r#"{{"parameters":{{"binary_data_output":true}},"inputs":[{input}],"outputs":[{{"name":"y"}},{{"name":"z","parameters":{{"binary_data":true}}}}]}}"#
        );
        let request = decode(&listed).unwrap();
        assert!(!request.wants_binary("y"));
        assert!(request.wants_binary("z"));
        assert!(request.wants_binary("unlisted"));
    }

    #[test]
    fn bounds_bytes_elements() {
        let limits = DecodeLimits {
            max_bytes_element: 3,
            ..DecodeLimits::default()
        };
        let json =
            r#"{"inputs":[{"name":"s","shape":[2],"datatype":"BYTES","data":["abc","abcd"]}]}"#;
        let error = decode_infer_request(json.as_bytes(), None, limits).unwrap_err();
        assert_eq!(
            error.to_string(),
            "input `s`: element 1 is 4 bytes, over the limit of 3 bytes per BYTES element"
        );
        let binary = [
            &3u32.to_le_bytes()[..],
            b"abc",
            &4u32.to_le_bytes(),
            b"abcd",
        ]
        .concat();
        let head = format!(
            r#"{{"inputs":[{{"name":"s","shape":[2],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}}]}}"#,
            binary.len()
        );
        let body = [head.as_bytes(), &binary].concat();
        let error = decode_infer_request(&body, Some(head.len()), limits).unwrap_err();
        assert_eq!(
            error.to_string(),
            "input `s`: element 1 is 4 bytes, over the limit of 3 bytes per BYTES element"
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
        assert_eq!(
            params.outputs,
            Some(vec![RequestedOutput {
                name: "y".into(),
                binary: None
            }])
        );
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
            outputs: &[(&label, false), (&p, false)],
        })
        .unwrap();
        assert_eq!(
            body,
            r#"{"model_name":"m","model_version":"v1","id":"7","outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["day"]},{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]}]}"#
        );
    }

    fn binary_body(json: &str, binary: &[u8]) -> (Vec<u8>, usize) {
        let mut body = json.as_bytes().to_vec();
        body.extend_from_slice(binary);
        (body, json.len())
    }

    fn decode_binary(json: &str, binary: &[u8]) -> Result<InferRequest, DecodeError> {
        let (body, n) = binary_body(json, binary);
        decode_infer_request(&body, Some(n), DecodeLimits::default())
    }

    #[test]
    fn decodes_binary_inputs_in_order() {
        let fp32: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = [&2u32.to_le_bytes()[..], b"hi"].concat();
        let json = format!(
            r#"{{"inputs":[{{"name":"a","shape":[2],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}},{{"name":"j","shape":[1],"datatype":"INT8","data":[7]}},{{"name":"b","shape":[1],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}},{{"name":"c","shape":[2],"datatype":"BOOL","parameters":{{"binary_data_size":2}}}}],"parameters":{{"binary_data_output":true}},"outputs":[{{"name":"y","parameters":{{"binary_data":false}}}}]}}"#,
            fp32.len(),
            bytes.len()
        );
        let request =
            decode_binary(&json, &[fp32.clone(), bytes.clone(), vec![0, 9]].concat()).unwrap();
        assert_eq!(request.inputs[0].data, fp32);
        assert_eq!(request.inputs[1].data, vec![7]);
        assert_eq!(request.inputs[2].data, bytes);
        assert_eq!(
            request.inputs[3].data,
            vec![0, 1],
            "BOOL bytes are normalized"
        );
        assert!(request.binary_outputs);
        assert!(!request.wants_binary("y"));
        assert!(request.wants_binary("z"));
    }

    #[test]
    fn refuses_broken_binary_framing() {
        let one = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let cases: [(&str, &[u8], Option<usize>, &str); 6] = [
            (
                one,
                &[0; 4],
                None,
                "binary_data_size 8 runs past the end of the body (4 bytes left)",
            ),
            (
                one,
                &[0; 12],
                None,
                "4 bytes of binary data follow the JSON but no input claims them",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[3],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#,
                &[0; 8],
                None,
                "input `a`: binary data: shape [3] of FP32 needs 12 bytes of data, got 8",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}"#,
                &[9, 0, 0, 0, 1, 2],
                None,
                "input `a`: binary data: BYTES element 0: length prefix runs past the end of the data",
            ),
            (
                r#"{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":[1],"parameters":{"binary_data_size":4}}]}"#,
                &[0; 4],
                None,
                "input `a` has both `data` and a binary_data_size",
            ),
            (
                one,
                &[0; 8],
                Some(10_000),
                "Inference-Header-Content-Length is 10000 but the body has only",
            ),
        ];
        for (json, binary, header, message) in cases {
            let (body, n) = binary_body(json, binary);
            let error =
                decode_infer_request(&body, Some(header.unwrap_or(n)), DecodeLimits::default())
                    .unwrap_err();
            assert!(
                error.to_string().contains(message),
                "{error} lacks {message}"
            );
        }
        let huge = r#"{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":18446744073709551615}}]}"#;
        assert!(
            decode_binary(huge, &[0; 8])
                .unwrap_err()
                .to_string()
                .contains("runs past the end")
        );
        let without_header =
            decode_infer_request(one.as_bytes(), None, DecodeLimits::default()).unwrap_err();
        assert!(
            without_header
                .to_string()
                .contains("no Inference-Header-Content-Length header")
        );
    }

    #[test]
    fn encodes_binary_outputs_after_the_json() {
        let p = Tensor {
            name: "p".into(),
            datatype: Datatype::Fp32,
            shape: vec![2],
            data: [0.25f32.to_le_bytes(), f32::NAN.to_le_bytes()].concat(),
        };
        let q = Tensor {
            name: "q".into(),
            datatype: Datatype::Int8,
            shape: vec![1],
            data: vec![5],
        };
        let (body, json_length) = InferResponse {
            model_name: "m",
            model_version: "v1",
            id: None,
            outputs: &[(&p, true), (&q, false)],
        }
        .encode()
        .unwrap();
        let json_length = json_length.expect("binary outputs give a JSON length");
        assert_eq!(
            std::str::from_utf8(&body[..json_length]).unwrap(),
            r#"{"model_name":"m","model_version":"v1","outputs":[{"name":"p","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}},{"name":"q","datatype":"INT8","shape":[1],"data":[5]}]}"#
        );
        assert_eq!(&body[json_length..], &p.data[..]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Any JSON value, nested a few levels.
        fn json_value() -> impl Strategy<Value = serde_json::Value> {
            let leaf = prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                any::<f64>()
                    .prop_filter("JSON numbers are finite", |f| f.is_finite())
                    .prop_map(serde_json::Value::from),
                ".{0,8}".prop_map(serde_json::Value::from),
            ];
            leaf.prop_recursive(4, 64, 8, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..8)
                        .prop_map(serde_json::Value::from),
                    proptest::collection::btree_map(".{0,4}", inner, 0..4)
                        .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn datatype() -> impl Strategy<Value = String> {
            prop_oneof![
                proptest::sample::select(crate::tensor::ALL_DATATYPES.map(|d| d.as_v2()).to_vec())
                    .prop_map(String::from),
                ".{0,6}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Arbitrary bytes, with or without a binary header length.
            #[test]
            fn arbitrary_bytes_never_panic(
                body in proptest::collection::vec(any::<u8>(), 0..256),
                header in proptest::option::of(0usize..300),
            ) {
                let _ = decode_infer_request(&body, header, DecodeLimits::default());
            }

            /// Well-formed envelopes around arbitrary shapes, datatypes, data
            /// and binary sizes: never a panic, and whatever is accepted has
            /// a layout that matches its shape.
            #[test]
            fn arbitrary_requests_never_panic_and_accepted_ones_are_consistent(
                shape in proptest::collection::vec(-2i64..6, 0..4),
                datatype in datatype(),
                data in json_value(),
                binary_size in proptest::option::of(0u64..80),
                tail in proptest::collection::vec(any::<u8>(), 0..80),
                outputs in json_value(),
            ) {
                let mut input = serde_json::json!({"name": "x", "shape": shape, "datatype": datatype});
                match binary_size {
                    Some(size) => input["parameters"] = serde_json::json!({"binary_data_size": size}),
                    None => input["data"] = data,
                }
                let json = serde_json::json!({"inputs": [input], "outputs": outputs}).to_string();
                let mut body = json.as_bytes().to_vec();
                body.extend_from_slice(&tail);
                let header = binary_size.map(|_| json.len());
                if let Ok(request) = decode_infer_request(&body, header, DecodeLimits::default()) {
                    for tensor in &request.inputs {
                        prop_assert!(crate::tensor::check_layout(tensor).is_ok());
                    }
                }
            }
        }
    }
}
