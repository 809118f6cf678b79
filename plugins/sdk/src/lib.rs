//! The plugin author's side of the gateway's WIT interface (`wit/plugin.wit`).
//!
//! A plugin implements [`Guest`] (the `info` and `infer` exports) and registers
//! it with [`export_model!`]:
//!
//! ```ignore
//! use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};
//!
//! struct Doubler;
//!
//! impl Guest for Doubler {
//!     fn info() -> ModelInfo {
//!         ModelInfo::new("doubler", "1.0.0", "multiplies every value by two")
//!             .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
//!             .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
//!     }
//!     fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
//!         let x = gateway_plugin_sdk::input(&inputs, "x")?;
//!         let y: Vec<f32> = x.view_f32()?.iter().map(|v| v * 2.0).collect();
//!         Ok(vec![Tensor::fp32("y", &x.shape, &y)])
//!     }
//! }
//!
//! gateway_plugin_sdk::export_model!(Doubler);
//! ```
//!
//! Tensor data is row-major and little-endian, as the WIT file documents; the
//! helpers here convert between that layout and Rust slices.

// Lets the generated bindings and the exported macro name this crate the same
// way from inside and from plugin crates.
extern crate self as gateway_plugin_sdk;

#[doc(hidden)]
pub use wit_bindgen;

/// The generated bindings; plugin authors use the re-exports below.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "model",
        pub_export_macro: true,
        export_macro_name: "export_model",
        default_bindings_module: "gateway_plugin_sdk::bindings",
        runtime_path: "gateway_plugin_sdk::wit_bindgen::rt",
        generate_all,
    });
}

pub use bindings::gateway::plugin::types::{Datatype, TensorSpec};
pub use bindings::{Error, Guest, ModelInfo, Tensor, export_model};

impl Datatype {
    /// Bytes per element, or `None` for BYTES (variable length).
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

impl TensorSpec {
    pub fn new(name: &str, datatype: Datatype, shape: &[i64]) -> Self {
        TensorSpec {
            name: name.to_string(),
            datatype,
            shape: shape.to_vec(),
        }
    }
}

impl ModelInfo {
    pub fn new(name: &str, version: &str, description: &str) -> Self {
        ModelInfo {
            name: name.to_string(),
            version: version.to_string(),
            description: description.to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    pub fn input(mut self, spec: TensorSpec) -> Self {
        self.inputs.push(spec);
        self
    }

    pub fn output(mut self, spec: TensorSpec) -> Self {
        self.outputs.push(spec);
        self
    }
}

/// The input named `name`, or an `invalid-input` error naming what is missing.
pub fn input<'a>(inputs: &'a [Tensor], name: &str) -> Result<&'a Tensor, Error> {
    inputs
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::InvalidInput(format!("missing input `{name}`")))
}

/// A number a tensor holds, read from its little-endian bytes.
pub trait Element: Copy {
    /// Bytes per element.
    const SIZE: usize;
    /// The element in `bytes` (exactly [`Element::SIZE`] of them).
    fn read(bytes: &[u8]) -> Self;
}

/// A typed view of a numeric tensor's elements, without copying them: each
/// is read from the tensor's little-endian bytes when it is used (the bytes
/// carry no alignment, so a `&[f32]` cannot borrow them). Rows of a matrix
/// are views too.
///
/// ```ignore
/// let x = gateway_plugin_sdk::input(&inputs, "pr_features")?;
/// let rows = x.rows(6)?;
/// for row in x.view_f32()?.rows(6) {
///     let additions = row.get(1).unwrap_or(0.0);
/// }
/// let total: f32 = x.view_f32()?.iter().sum();
/// ```
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    data: &'a [u8],
    element: std::marker::PhantomData<T>,
}

impl<'a, T: Element + 'a> View<'a, T> {
    fn new(data: &'a [u8]) -> Self {
        View {
            data,
            element: std::marker::PhantomData,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.data.len() / T::SIZE
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element at `index` (row-major), if there is one.
    pub fn get(&self, index: usize) -> Option<T> {
        let start = index.checked_mul(T::SIZE)?;
        self.data
            .get(start..start.checked_add(T::SIZE)?)
            .map(T::read)
    }

    /// The elements in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = T> + 'a {
        self.data.chunks_exact(T::SIZE).map(T::read)
    }

    /// The rows of a matrix with `columns` columns, each a view (none when
    /// `columns` is 0).
    pub fn rows(&self, columns: usize) -> impl ExactSizeIterator<Item = View<'a, T>> + 'a {
        let row_bytes = columns.saturating_mul(T::SIZE).max(1);
        let data = if columns == 0 {
            &self.data[..0]
        } else {
            self.data
        };
        data.chunks_exact(row_bytes).map(View::new)
    }

    /// The elements, copied into a vector.
    pub fn to_vec(&self) -> Vec<T> {
        self.iter().collect()
    }
}

macro_rules! element {
    ($($ty:ty),*) => {$(
        impl Element for $ty {
            const SIZE: usize = size_of::<$ty>();
            fn read(bytes: &[u8]) -> Self {
                let mut le = [0u8; size_of::<$ty>()];
                le.copy_from_slice(bytes);
                <$ty>::from_le_bytes(le)
            }
        }
    )*};
}

element!(f32, f64, i32, i64);

macro_rules! numeric_tensor {
    ($ctor:ident, $reader:ident, $view:ident, $ty:ty, $dt:ident) => {
        impl Tensor {
            #[doc = concat!("A ", stringify!($dt), " tensor from row-major values.")]
            pub fn $ctor(name: &str, shape: &[i64], values: &[$ty]) -> Tensor {
                let mut data = Vec::with_capacity(values.len() * size_of::<$ty>());
                for v in values {
                    data.extend_from_slice(&v.to_le_bytes());
                }
                Tensor {
                    name: name.to_string(),
                    datatype: Datatype::$dt,
                    shape: shape.to_vec(),
                    data,
                }
            }

            #[doc = concat!("The elements of a ", stringify!($dt), " tensor, copied; an `invalid-input` error for any other datatype.")]
            pub fn $reader(&self) -> Result<Vec<$ty>, Error> {
                Ok(self.$view()?.to_vec())
            }

            #[doc = concat!("A view of a ", stringify!($dt), " tensor's elements, without copying them; an `invalid-input` error for any other datatype or a data length that is not a whole number of elements.")]
            pub fn $view(&self) -> Result<View<'_, $ty>, Error> {
                self.expect_datatype(Datatype::$dt)?;
                if self.data.len() % size_of::<$ty>() != 0 {
                    return Err(self.invalid(&format!(
                        "{} bytes are not a whole number of {}-byte elements",
                        self.data.len(),
                        size_of::<$ty>()
                    )));
                }
                Ok(View::new(&self.data))
            }
        }
    };
}

numeric_tensor!(fp32, to_f32, view_f32, f32, Fp32);
numeric_tensor!(fp64, to_f64, view_f64, f64, Fp64);
numeric_tensor!(int32, to_i32, view_i32, i32, Int32);
numeric_tensor!(int64, to_i64, view_i64, i64, Int64);

impl Tensor {
    /// A BYTES tensor: each element is length-prefixed (u32, little-endian).
    pub fn bytes<B: AsRef<[u8]>>(name: &str, shape: &[i64], elements: &[B]) -> Tensor {
        let total: usize = elements.iter().map(|e| 4 + e.as_ref().len()).sum();
        let mut data = Vec::with_capacity(total);
        for e in elements {
            let e = e.as_ref();
            let len = u32::try_from(e.len()).expect("BYTES element over 4 GiB");
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(e);
        }
        Tensor {
            name: name.to_string(),
            datatype: Datatype::Bytes,
            shape: shape.to_vec(),
            data,
        }
    }

    /// The elements of a BYTES tensor.
    pub fn to_bytes(&self) -> Result<Vec<&[u8]>, Error> {
        self.expect_datatype(Datatype::Bytes)?;
        let mut out = Vec::new();
        let mut rest = self.data.as_slice();
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| self.invalid("truncated BYTES length prefix"))?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(self.invalid("BYTES element longer than the data"));
            }
            let (element, tail) = tail.split_at(len);
            out.push(element);
            rest = tail;
        }
        Ok(out)
    }

    /// Checks that the tensor is a matrix with `columns` columns and returns
    /// its number of rows.
    pub fn rows(&self, columns: usize) -> Result<usize, Error> {
        match self.shape.as_slice() {
            [rows, cols] if *rows >= 0 && *cols == columns as i64 => Ok(*rows as usize),
            _ => Err(self.invalid(&format!(
                "expected shape [N, {columns}], got {:?}",
                self.shape
            ))),
        }
    }

    fn expect_datatype(&self, datatype: Datatype) -> Result<(), Error> {
        if self.datatype == datatype {
            Ok(())
        } else {
            Err(self.invalid(&format!(
                "expected datatype {datatype:?}, got {:?}",
                self.datatype
            )))
        }
    }

    fn invalid(&self, what: &str) -> Error {
        Error::InvalidInput(format!("input `{}`: {what}", self.name))
    }
}

/// Host inference through the standard `wasi:nn` interface: the ONNX models
/// the policy declares for the plugin's version (`[versions.<v>.models]`),
/// run by the gateway. A plugin that never calls this does not import it.
///
/// ```ignore
/// let outputs = gateway_plugin_sdk::nn::run(
///     "classifier",
///     vec![("pr_features".into(), nn::f32_tensor(&[rows, 6], &features))],
/// )?;
/// let probabilities = nn::output(&outputs, "probabilities")?.to_f32()?;
/// ```
pub mod nn {
    pub use crate::bindings::wasi::nn::tensor::{Tensor as NnTensor, TensorType};
    pub use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

    use crate::Error;

    /// One output of a model, copied out of the host.
    #[derive(Clone, Debug)]
    pub struct Output {
        pub name: String,
        pub dims: Vec<u32>,
        pub ty: TensorType,
        pub data: Vec<u8>,
    }

    impl Output {
        /// The values of an FP32 output.
        pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
            if self.ty != TensorType::Fp32 {
                return Err(Error::Internal(format!(
                    "model output `{}` is {:?}, not FP32",
                    self.name, self.ty
                )));
            }
            Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        }
    }

    /// An FP32 tensor of the given dimensions.
    pub fn f32_tensor(dims: &[u32], values: &[f32]) -> NnTensor {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        NnTensor::new(dims, TensorType::Fp32, &data)
    }

    /// Loads the model the policy declares as `model` and runs it once.
    /// Errors name the model and carry the host's message.
    pub fn run(model: &str, inputs: Vec<(String, NnTensor)>) -> Result<Vec<Output>, Error> {
        let failed = |e: errors::Error| {
            Error::Internal(format!("model `{model}`: {:?}: {}", e.code(), e.data()))
        };
        let graph = graph::load_by_name(model).map_err(failed)?;
        let context = graph.init_execution_context().map_err(failed)?;
        let outputs = context.compute(inputs).map_err(failed)?;
        Ok(outputs
            .into_iter()
            .map(|(name, t)| Output {
                name,
                dims: t.dimensions(),
                ty: t.ty(),
                data: t.data(),
            })
            .collect())
    }

    /// The output named `name`.
    pub fn output<'a>(outputs: &'a [Output], name: &str) -> Result<&'a Output, Error> {
        outputs
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| Error::Internal(format!("the model returned no output `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_read_elements_in_place() {
        let t = Tensor::fp32("x", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, -6.5]);
        let view = t.view_f32().unwrap();
        assert_eq!(view.len(), 6);
        assert_eq!(view.get(5), Some(-6.5));
        assert_eq!(view.get(6), None);
        assert_eq!(view.get(usize::MAX), None);
        assert_eq!(view.get(usize::MAX / 4), None);
        assert_eq!(view.iter().sum::<f32>(), 8.5);
        let rows: Vec<Vec<f32>> = view.rows(3).map(|r| r.to_vec()).collect();
        assert_eq!(rows, vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, -6.5]]);
        assert_eq!(view.rows(0).len(), 0);
        assert_eq!(t.to_f32().unwrap(), view.to_vec());
        let i = Tensor::int64("n", &[2], &[i64::MIN, 7]);
        assert_eq!(i.view_i64().unwrap().to_vec(), vec![i64::MIN, 7]);
    }

    #[test]
    fn views_refuse_what_they_cannot_read() {
        let t = Tensor::fp32("x", &[1], &[1.0]);
        let Err(Error::InvalidInput(m)) = t.view_i32() else {
            panic!("an FP32 tensor read as INT32");
        };
        assert!(m.contains("input `x`") && m.contains("Int32"), "{m}");
        let mut ragged = t.clone();
        ragged.data.push(0);
        let Err(Error::InvalidInput(m)) = ragged.view_f32() else {
            panic!("5 bytes read as FP32");
        };
        assert!(m.contains("not a whole number"), "{m}");
    }

    #[test]
    fn bytes_round_trip() {
        let t = Tensor::bytes("s", &[2], &["within_day", ""]);
        assert_eq!(t.to_bytes().unwrap(), vec![&b"within_day"[..], b""]);
    }
}
