//! End-to-end tests: the real gateway on 127.0.0.1:0, real HTTP, real Wasm
//! plugins built from `plugins/` by this build. One test binary for the
//! whole project (a binary per file would multiply link time).

mod api;
mod authoring;
mod bad_input;
mod binary;
mod bounds;
mod compat;
mod config;
mod decisions;
mod feedback;
mod fleet;
mod front;
mod grants;
mod hostile;
mod languages;
mod machine;
mod memory;
mod monitoring;
mod onnx;
mod policy_check;
mod reload;
mod replay;
mod reuse;
mod rollout;
mod shadow;
mod support;
mod traffic;
mod validation;
