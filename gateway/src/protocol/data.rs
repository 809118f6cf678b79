//! Decodes a V2 JSON `data` array straight into a tensor's little-endian
//! buffer: no intermediate `serde_json::Value`, one pass over the elements,
//! nested arrays flattened in row-major order.

use std::fmt;

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};

use crate::tensor::Datatype;

/// The typed output buffer and how many elements it holds.
pub(super) struct ElementSink {
    pub datatype: Datatype,
    pub data: Vec<u8>,
    pub count: usize,
    /// Elements allowed; one more is an error (bounds allocation by the shape).
    pub limit: usize,
    /// Bytes allowed per BYTES element.
    pub max_bytes_element: usize,
    /// The tensor's shape: nested arrays must follow it exactly.
    pub dims: Vec<usize>,
    /// Whether `data` is nested (`[[1,2],[3,4]]`) or flat (`[1,2,3,4]`),
    /// once its first element has said so.
    form: Option<Form>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Flat,
    Nested,
}

impl ElementSink {
    pub(super) fn new(datatype: Datatype, limit: usize, capacity_hint: usize) -> Self {
        let bytes = datatype
            .element_size()
            .unwrap_or(8)
            .saturating_mul(limit.min(capacity_hint));
        ElementSink {
            datatype,
            data: Vec::with_capacity(bytes),
            count: 0,
            limit,
            max_bytes_element: usize::MAX,
            dims: Vec::new(),
            form: None,
        }
    }

    /// A scalar at `depth`: allowed in flat data (depth 1) or at the
    /// innermost level of nested data, or alone as a rank-0 tensor.
    fn scalar_at<E: de::Error>(&mut self, depth: usize) -> Result<(), E> {
        if depth <= 1 && self.form != Some(Form::Nested) {
            if depth == 1 {
                self.form = Some(Form::Flat);
            }
            return Ok(());
        }
        if self.form == Some(Form::Nested) && depth == self.dims.len() {
            return Ok(());
        }
        Err(E::custom(format_args!(
            "data is ragged: element {} is at nesting depth {depth}, but the shape {:?} needs depth {} (or flat data)",
            self.count,
            self.dims,
            self.dims.len()
        )))
    }

    /// An array at `depth` (0: `data` itself).
    fn array_at<E: de::Error>(&mut self, depth: usize) -> Result<(), E> {
        if depth == 0 {
            return Ok(());
        }
        if depth == 1 && self.form.is_none() {
            self.form = Some(Form::Nested);
        }
        if self.form == Some(Form::Nested) && depth < self.dims.len() {
            return Ok(());
        }
        Err(E::custom(format_args!(
            "data is ragged: an array at nesting depth {depth} where the shape {:?} allows {} (flat data mixed with nested, or nested too deep)",
            self.dims,
            self.dims.len().saturating_sub(1)
        )))
    }

    /// An array at `depth` ended with `len` elements: in nested data, the
    /// shape's dimension at that depth.
    fn array_len<E: de::Error>(&self, depth: usize, len: usize) -> Result<(), E> {
        if self.form != Some(Form::Nested) {
            return Ok(());
        }
        match self.dims.get(depth) {
            Some(&want) if want != len => Err(E::custom(format_args!(
                "data is ragged: an array at nesting depth {depth} has {len} elements, the shape {:?} needs {want}",
                self.dims
            ))),
            _ => Ok(()),
        }
    }

    fn admit<E: de::Error>(&mut self) -> Result<(), E> {
        if self.count >= self.limit {
            return Err(E::custom(format_args!(
                "data has more than the {} elements its shape allows",
                self.limit
            )));
        }
        self.count += 1;
        Ok(())
    }

    fn push_int<E: de::Error>(&mut self, v: i128) -> Result<(), E> {
        let index = self.count;
        let datatype = self.datatype;
        self.admit::<E>()?;
        let out_of_range = || {
            E::custom(format_args!(
                "element {index} is {v}, out of range for {datatype}"
            ))
        };
        macro_rules! put {
            ($t:ty) => {{
                let x = <$t>::try_from(v).map_err(|_| out_of_range())?;
                self.data.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match datatype {
            Datatype::Int8 => put!(i8),
            Datatype::Int16 => put!(i16),
            Datatype::Int32 => put!(i32),
            Datatype::Int64 => put!(i64),
            Datatype::Uint8 => put!(u8),
            Datatype::Uint16 => put!(u16),
            Datatype::Uint32 => put!(u32),
            Datatype::Uint64 => put!(u64),
            Datatype::Fp32 => self.data.extend_from_slice(&(v as f32).to_le_bytes()),
            Datatype::Fp64 => self.data.extend_from_slice(&(v as f64).to_le_bytes()),
            Datatype::Bool | Datatype::Bytes => {
                return Err(E::custom(format_args!(
                    "element {index} is the number {v}, but the datatype is {datatype}"
                )));
            }
        }
        Ok(())
    }

    fn push_float<E: de::Error>(&mut self, v: f64) -> Result<(), E> {
        let index = self.count;
        match self.datatype {
            Datatype::Fp64 => {
                self.admit::<E>()?;
                self.data.extend_from_slice(&v.to_le_bytes());
                Ok(())
            }
            Datatype::Fp32 => {
                let x = v as f32;
                if x.is_infinite() {
                    return Err(E::custom(format_args!(
                        "element {index} is {v:?}, out of range for FP32"
                    )));
                }
                self.admit::<E>()?;
                self.data.extend_from_slice(&x.to_le_bytes());
                Ok(())
            }
            Datatype::Bool | Datatype::Bytes => Err(E::custom(format_args!(
                "element {index} is the number {v:?}, but the datatype is {}",
                self.datatype
            ))),
            // Integer types accept integral floats such as `3.0`, up to
            // 2^53: above it a float may already have been rounded from
            // what the client wrote, and the value would change silently.
            _ if v.fract() == 0.0 && v.abs() <= 2f64.powi(53) => self.push_int(v as i128),
            _ if v.fract() == 0.0 => Err(E::custom(format_args!(
                "element {index} is {v:?} written as a float, which cannot hold every {} exactly beyond 2^53; write it as an integer",
                self.datatype
            ))),
            _ => Err(E::custom(format_args!(
                "element {index} is {v:?}, not an integer as {} requires",
                self.datatype
            ))),
        }
    }
}

/// The seed for one JSON value inside `data`: a scalar or a nested array,
/// at a nesting depth (0: `data` itself).
pub(super) struct Elements<'s>(pub &'s mut ElementSink, usize);

impl<'s> Elements<'s> {
    /// The seed for `data` itself.
    pub(super) fn top(sink: &'s mut ElementSink) -> Self {
        Elements(sink, 0)
    }
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} elements, possibly in nested arrays", self.0.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Elements(sink, depth) = self;
        sink.array_at::<A::Error>(depth)?;
        let mut len = 0usize;
        while seq
            .next_element_seed(Elements(&mut *sink, depth + 1))?
            .is_some()
        {
            len += 1;
        }
        sink.array_len::<A::Error>(depth, len)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.scalar_at::<E>(self.1)?;
        let sink = self.0;
        let index = sink.count;
        if sink.datatype != Datatype::Bool {
            return Err(E::custom(format_args!(
                "element {index} is {v}, but the datatype is {}",
                sink.datatype
            )));
        }
        sink.admit::<E>()?;
        sink.data.push(u8::from(v));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.scalar_at::<E>(self.1)?;
        self.0.push_int(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.scalar_at::<E>(self.1)?;
        self.0.push_int(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.scalar_at::<E>(self.1)?;
        self.0.push_float(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.scalar_at::<E>(self.1)?;
        let sink = self.0;
        let index = sink.count;
        if sink.datatype != Datatype::Bytes {
            return Err(E::custom(format_args!(
                "element {index} is a string, but the datatype is {}",
                sink.datatype
            )));
        }
        if v.len() > sink.max_bytes_element {
            return Err(E::custom(format_args!(
                "element {index} is {} bytes, over the limit of {} bytes per BYTES element",
                v.len(),
                sink.max_bytes_element
            )));
        }
        let len = u32::try_from(v.len())
            .map_err(|_| E::custom(format_args!("element {index} is longer than 4 GiB")))?;
        sink.admit::<E>()?;
        sink.data.extend_from_slice(&len.to_le_bytes());
        sink.data.extend_from_slice(v.as_bytes());
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format_args!("element {} is null", self.0.count)))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format_args!(
            "element {} is an object",
            self.0.count
        )))
    }
}
