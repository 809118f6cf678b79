//! Host bindings generated from `wit/plugin.wit`.
//!
//! Exports are async so that a plugin call can yield to the executor at each
//! epoch tick: a long call never holds a worker thread for more than a tick.
//! The wasi:nn imports may trap (a plugin past its host-memory budget), and
//! `compute` is async: it waits for the ONNX compute threads, never blocks a worker.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "model",
    exports: { default: async },
    imports: {
        "wasi:nn/inference.[method]graph-execution-context.compute": async | trappable,
        default: trappable,
    },
    with: {
        "gateway:plugin/types": crate::contract::gateway::plugin::types,
        "wasi:nn/tensor.tensor": super::nn::NnTensor,
        "wasi:nn/graph.graph": super::nn::NnGraph,
        "wasi:nn/inference.graph-execution-context": super::nn::NnContext,
        "wasi:nn/errors.error": super::nn::NnError,
    },
});

pub use self::wasi::nn;
