//! Host bindings generated from `wit/plugin.wit`.
//!
//! Exports are async so that a plugin call can yield to the executor at each
//! epoch tick: a long call never holds a worker thread for more than a tick.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "model",
    exports: { default: async },
});

pub use self::gateway::plugin::types::{Datatype, TensorSpec};
