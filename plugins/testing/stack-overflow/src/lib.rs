//! Test plugin: recurses `x[0]` levels deep, or without end when `x[0]` is
//! negative: on the wasm call stack for `-1`, on the shadow stack in linear
//! memory (large local arrays) for `-2`. The gateway must turn either
//! overflow into an error for that request, never a crash of the host, and
//! serve the next call.
use gateway_plugin_sdk::{Datatype, Error, Guest, ModelInfo, Tensor, TensorSpec};

struct StackOverflow;

/// Keeps its state in wasm locals: overflows wasmtime's wasm stack limit.
#[inline(never)]
fn on_wasm_stack(depth: u64, limit: Option<u64>) -> u64 {
    if limit.is_some_and(|l| depth >= l) {
        return depth;
    }
    let below = on_wasm_stack(depth + 1, limit);
    below.wrapping_mul(depth | 1).wrapping_sub(depth)
}

/// Keeps an address-taken array per frame: overflows the shadow stack that
/// Rust keeps in linear memory, which ends in an out-of-bounds access.
#[inline(never)]
#[allow(unconditional_recursion)]
fn on_shadow_stack(depth: u64, pad: [u64; 64]) -> u64 {
    let pad = core::hint::black_box(pad);
    on_shadow_stack(depth + 1, pad).wrapping_add(pad[(depth % 64) as usize])
}

impl Guest for StackOverflow {
    fn info() -> ModelInfo {
        ModelInfo::new("stack-overflow", "0.1.0", "recurses forever")
            .input(TensorSpec::new("x", Datatype::Fp32, &[-1]))
            .output(TensorSpec::new("y", Datatype::Fp32, &[-1]))
    }

    fn infer(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
        let x = gateway_plugin_sdk::input(&inputs, "x")?.to_f32()?;
        let depth = x.first().copied().unwrap_or(-1.0);
        let n = if depth == -2.0 {
            on_shadow_stack(0, [1; 64])
        } else {
            on_wasm_stack(0, (depth >= 0.0).then_some(depth as u64))
        };
        Ok(vec![Tensor::fp32("y", &[1], &[n as f32])])
    }
}

gateway_plugin_sdk::export_model!(StackOverflow);
