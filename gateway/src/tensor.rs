//! The gateway's tensor: the WIT `tensor` record itself, so a decoded request
//! is handed to a plugin without conversion. This module owns the layout
//! rules (element sizes, BYTES framing, shape arithmetic) and nothing else.

use std::fmt;

pub use crate::contract::{Datatype, Tensor, TensorSpec};

/// Every datatype, in V2 order.
pub const ALL_DATATYPES: [Datatype; 12] = [
    Datatype::Bool,
    Datatype::Int8,
    Datatype::Int16,
    Datatype::Int32,
    Datatype::Int64,
    Datatype::Uint8,
    Datatype::Uint16,
    Datatype::Uint32,
    Datatype::Uint64,
    Datatype::Fp32,
    Datatype::Fp64,
    Datatype::Bytes,
];

impl Datatype {
    /// The V2 protocol's name (`"FP32"`).
    pub fn as_v2(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    /// Parses a V2 datatype name; `None` for unknown or unsupported ones.
    pub fn from_v2(name: &str) -> Option<Self> {
        ALL_DATATYPES.into_iter().find(|d| d.as_v2() == name)
    }

    /// Bytes per element; `None` for BYTES, whose elements are length-prefixed.
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            Datatype::Bool | Datatype::Int8 | Datatype::Uint8 => 1,
            Datatype::Int16 | Datatype::Uint16 => 2,
            Datatype::Int32 | Datatype::Uint32 | Datatype::Fp32 => 4,
            Datatype::Int64 | Datatype::Uint64 | Datatype::Fp64 => 8,
            Datatype::Bytes => return None,
        })
    }
}

impl fmt::Display for Datatype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_v2())
    }
}

/// The names the V2 protocol allows, for error messages.
pub fn supported_datatypes() -> String {
    ALL_DATATYPES.map(Datatype::as_v2).join(", ")
}

/// Why a shape or a tensor's data is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    NegativeDimension {
        shape: Vec<i64>,
    },
    TooManyElements {
        shape: Vec<i64>,
    },
    DataLength {
        shape: Vec<i64>,
        datatype: Datatype,
        expected: usize,
        actual: usize,
    },
    BytesFraming {
        element: usize,
        detail: &'static str,
    },
    BytesCount {
        shape: Vec<i64>,
        expected: usize,
        actual: usize,
    },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::NegativeDimension { shape } => {
                write!(f, "shape {shape:?} has a negative dimension")
            }
            LayoutError::TooManyElements { shape } => {
                write!(
                    f,
                    "shape {shape:?} has more elements than the gateway can hold"
                )
            }
            LayoutError::DataLength {
                shape,
                datatype,
                expected,
                actual,
            } => write!(
                f,
                "shape {shape:?} of {datatype} needs {expected} bytes of data, got {actual}"
            ),
            LayoutError::BytesFraming { element, detail } => {
                write!(f, "BYTES element {element}: {detail}")
            }
            LayoutError::BytesCount {
                shape,
                expected,
                actual,
            } => write!(
                f,
                "shape {shape:?} needs {expected} BYTES elements, data holds {actual}"
            ),
        }
    }
}

/// The number of elements of `shape`, refusing negative dimensions and
/// products that overflow `usize`.
pub fn element_count(shape: &[i64]) -> Result<usize, LayoutError> {
    let mut count: usize = 1;
    for &dim in shape {
        let dim = usize::try_from(dim).map_err(|_| LayoutError::NegativeDimension {
            shape: shape.to_vec(),
        })?;
        count = count
            .checked_mul(dim)
            .ok_or_else(|| LayoutError::TooManyElements {
                shape: shape.to_vec(),
            })?;
    }
    Ok(count)
}

/// Checks that a tensor's data matches its shape and datatype, and returns
/// its element count. For BYTES, walks every length prefix.
pub fn check_layout(tensor: &Tensor) -> Result<usize, LayoutError> {
    let count = element_count(&tensor.shape)?;
    match tensor.datatype.element_size() {
        Some(size) => {
            let expected = count
                .checked_mul(size)
                .ok_or_else(|| LayoutError::TooManyElements {
                    shape: tensor.shape.clone(),
                })?;
            if tensor.data.len() != expected {
                return Err(LayoutError::DataLength {
                    shape: tensor.shape.clone(),
                    datatype: tensor.datatype,
                    expected,
                    actual: tensor.data.len(),
                });
            }
        }
        None => {
            let actual = bytes_elements(&tensor.data).try_fold(0, |n, e| e.map(|_| n + 1))?;
            if actual != count {
                return Err(LayoutError::BytesCount {
                    shape: tensor.shape.clone(),
                    expected: count,
                    actual,
                });
            }
        }
    }
    Ok(count)
}

/// Iterates over the elements of BYTES data (4-byte little-endian length, then
/// the bytes), yielding an error and stopping at the first framing defect.
pub fn bytes_elements(data: &[u8]) -> impl Iterator<Item = Result<&[u8], LayoutError>> {
    let mut rest = data;
    let mut index = 0;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let element = index;
        index += 1;
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(LayoutError::BytesFraming {
                element,
                detail: "truncated length prefix",
            }));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            rest = &[];
            return Some(Err(LayoutError::BytesFraming {
                element,
                detail: "length prefix runs past the end of the data",
            }));
        }
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        Some(Ok(bytes))
    })
}

/// Whether `shape` fits `declared`, where `-1` in `declared` matches any size.
pub fn shape_matches(declared: &[i64], shape: &[i64]) -> bool {
    declared.len() == shape.len() && declared.iter().zip(shape).all(|(&d, &s)| d == -1 || d == s)
}

/// Calls `f(index, value)` for the elements `start`, `start + step`, ... of a
/// numeric tensor, as `f64` (BOOL as 0 or 1; nothing for BYTES), without
/// allocating. The layout must have been checked.
pub fn each_number(t: &Tensor, start: usize, step: usize, mut f: impl FnMut(usize, f64)) {
    let step = step.max(1);
    macro_rules! read {
        ($ty:ty) => {{
            const N: usize = size_of::<$ty>();
            for (i, c) in t.data.chunks_exact(N).enumerate().skip(start).step_by(step) {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                f(i, <$ty>::from_le_bytes(b) as f64);
            }
        }};
    }
    match t.datatype {
        Datatype::Bool | Datatype::Uint8 => read!(u8),
        Datatype::Int8 => read!(i8),
        Datatype::Int16 => read!(i16),
        Datatype::Int32 => read!(i32),
        Datatype::Int64 => read!(i64),
        Datatype::Uint16 => read!(u16),
        Datatype::Uint32 => read!(u32),
        Datatype::Uint64 => read!(u64),
        Datatype::Fp32 => read!(f32),
        Datatype::Fp64 => read!(f64),
        Datatype::Bytes => {}
    }
}

/// A numeric tensor's elements as `f64` (see [`each_number`]).
pub fn numbers(t: &Tensor) -> Vec<f64> {
    let mut out = Vec::with_capacity(t.data.len() / t.datatype.element_size().unwrap_or(1));
    each_number(t, 0, 1, |_, v| out.push(v));
    out
}

// Inputs generated from a declaration: for `gateway plugin test` and the
// probe call `gateway check` makes.

/// What generated inputs hold.
#[derive(Clone, Copy)]
pub(crate) enum Fill {
    /// Small, varied values (0 to 9, or short strings).
    Varied,
    Zero,
    /// The datatype's smallest value (floats: -1e30).
    Min,
    /// The datatype's largest value (floats: 1e30).
    Max,
}

/// Inputs for `specs` with the first free dimension set to `batch` and
/// any other free one to 1; `None` when they would hold more than
/// `max_bytes` together.
pub(crate) fn generated(
    specs: &[TensorSpec],
    batch: i64,
    fill: Fill,
    max_bytes: usize,
) -> Option<Vec<Tensor>> {
    let shapes: Vec<Vec<i64>> = specs
        .iter()
        .map(|spec| {
            spec.shape
                .iter()
                .enumerate()
                .map(|(i, &d)| match (d, i) {
                    (-1, 0) => batch,
                    (-1, _) => 1,
                    (d, _) => d,
                })
                .collect()
        })
        .collect();
    let mut counts = Vec::with_capacity(specs.len());
    let mut total: usize = 0;
    for (spec, shape) in specs.iter().zip(&shapes) {
        let count = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?))?;
        let size = spec.datatype.element_size().unwrap_or(4 + 1024);
        total = total.checked_add(count.checked_mul(size)?)?;
        counts.push(count);
    }
    if total > max_bytes {
        return None;
    }
    let inputs = specs
        .iter()
        .zip(shapes)
        .zip(counts)
        .map(|((spec, shape), count)| Tensor {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data: values(spec.datatype, count, fill),
        })
        .collect();
    Some(inputs)
}

pub(crate) fn values(datatype: Datatype, count: usize, fill: Fill) -> Vec<u8> {
    let mut data = Vec::new();
    for i in 0..count {
        let small = (i % 10) as i64;
        let (int, float): (i128, f64) = match fill {
            Fill::Varied => (i128::from(small), small as f64 + 0.5),
            Fill::Zero => (0, 0.0),
            Fill::Min => (i128::MIN, -1e30),
            Fill::Max => (i128::MAX, 1e30),
        };
        macro_rules! int {
            ($t:ty) => {
                data.extend_from_slice(
                    &(int.clamp(<$t>::MIN as i128, <$t>::MAX as i128) as $t).to_le_bytes(),
                )
            };
        }
        match datatype {
            Datatype::Bool => data.push(u8::from(
                int != 0 && int % 2 != 0 || matches!(fill, Fill::Max),
            )),
            Datatype::Int8 => int!(i8),
            Datatype::Int16 => int!(i16),
            Datatype::Int32 => int!(i32),
            Datatype::Int64 => int!(i64),
            Datatype::Uint8 => int!(u8),
            Datatype::Uint16 => int!(u16),
            Datatype::Uint32 => int!(u32),
            Datatype::Uint64 => int!(u64),
            Datatype::Fp32 => data.extend_from_slice(&(float as f32).to_le_bytes()),
            Datatype::Fp64 => data.extend_from_slice(&float.to_le_bytes()),
            Datatype::Bytes => {
                let text = match fill {
                    Fill::Varied => format!("value-{small}"),
                    Fill::Zero | Fill::Min => String::new(),
                    Fill::Max => "x".repeat(1024),
                };
                data.extend_from_slice(&(text.len() as u32).to_le_bytes());
                data.extend_from_slice(text.as_bytes());
            }
        }
    }
    data
}

/// A BYTES tensor of `values`, one element each (tests build labels so).
#[cfg(test)]
pub(crate) fn bytes_tensor<V: AsRef<[u8]>>(name: &str, values: &[V]) -> Tensor {
    let mut data = Vec::new();
    for v in values {
        let v = v.as_ref();
        data.extend_from_slice(&(v.len() as u32).to_le_bytes());
        data.extend_from_slice(v);
    }
    Tensor {
        name: name.into(),
        datatype: Datatype::Bytes,
        shape: vec![values.len() as i64],
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(datatype: Datatype, shape: &[i64], data: Vec<u8>) -> Tensor {
        Tensor {
            name: "t".into(),
            datatype,
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn datatype_names_round_trip() {
        for d in ALL_DATATYPES {
            assert_eq!(Datatype::from_v2(d.as_v2()), Some(d));
        }
        assert_eq!(Datatype::from_v2("FP16"), None);
        assert_eq!(Datatype::from_v2("fp32"), None);
    }

    #[test]
    fn element_count_refuses_negative_and_overflow() {
        assert_eq!(element_count(&[]), Ok(1));
        assert_eq!(element_count(&[2, 0, 7]), Ok(0));
        assert_eq!(element_count(&[3, 4]), Ok(12));
        assert!(matches!(
            element_count(&[2, -1]),
            Err(LayoutError::NegativeDimension { .. })
        ));
        assert!(matches!(
            element_count(&[i64::MAX, i64::MAX]),
            Err(LayoutError::TooManyElements { .. })
        ));
    }

    #[test]
    fn layout_of_fixed_size_types() {
        assert_eq!(
            check_layout(&tensor(Datatype::Fp32, &[2, 3], vec![0; 24])),
            Ok(6)
        );
        let short = check_layout(&tensor(Datatype::Fp32, &[1, 5], vec![0; 12]));
        assert_eq!(
            short.unwrap_err().to_string(),
            "shape [1, 5] of FP32 needs 20 bytes of data, got 12"
        );
    }

    #[test]
    fn layout_of_bytes() {
        let mut data = Vec::new();
        for s in ["ab", "", "xyz"] {
            data.extend_from_slice(&(s.len() as u32).to_le_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        assert_eq!(
            check_layout(&tensor(Datatype::Bytes, &[3], data.clone())),
            Ok(3)
        );
        assert!(matches!(
            check_layout(&tensor(Datatype::Bytes, &[2], data.clone())),
            Err(LayoutError::BytesCount {
                expected: 2,
                actual: 3,
                ..
            })
        ));
        let mut overlong = data.clone();
        overlong[0] = 200;
        assert!(matches!(
            check_layout(&tensor(Datatype::Bytes, &[3], overlong)),
            Err(LayoutError::BytesFraming { element: 0, .. })
        ));
        data.push(1);
        assert!(matches!(
            check_layout(&tensor(Datatype::Bytes, &[3], data)),
            Err(LayoutError::BytesFraming { element: 3, .. })
        ));
    }

    #[test]
    fn declared_shapes() {
        assert!(shape_matches(&[-1, 6], &[4, 6]));
        assert!(!shape_matches(&[-1, 6], &[4, 5]));
        assert!(!shape_matches(&[-1, 6], &[6]));
    }
}
