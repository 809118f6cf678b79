//! Tools for plugin authors, with no server: `gateway plugin run` answers
//! one V2 request with a plugin, `gateway plugin test` runs the conformance
//! suite on any component, `gateway plugin new` writes a project to start
//! from (`new`).
//!
//! Both run the plugin exactly as serving does: the same runtime, sandbox,
//! limits and grants, the same output checks (`validate::check_outputs`).

mod new;
mod suite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use new::{Lang, new_project};
pub use suite::{Report, conformance};

use crate::contract::{CallLimits, Grants};
use crate::onnx::{ModelSet, OnnxModel};
use crate::protocol::{DecodeLimits, InferResponse};
use crate::runtime::{InstancePool, Plugin, Runtime, RuntimeConfig};
use crate::tensor::Tensor;

/// A plugin loaded for one of the tools, with what it may call.
pub struct Loaded {
    runtime: Runtime,
    pub plugin: Arc<Plugin>,
    models: Arc<ModelSet>,
    pool: InstancePool,
    /// How long compiling (or loading from the compile cache) and `info()` took.
    pub load_time: Duration,
}

/// How the tools run a plugin: a version's policy settings, given as flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub timeout: Duration,
    pub memory_bytes: usize,
    pub grants: Grants,
    /// ONNX models the plugin may load through wasi:nn, by name.
    pub models: Vec<(String, PathBuf)>,
    pub compile_cache: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        let limits = crate::policy::Limits::default();
        Settings {
            timeout: limits.timeout,
            memory_bytes: limits.memory_bytes,
            grants: Grants::default(),
            models: Vec::new(),
            compile_cache: None,
        }
    }
}

/// Finds a plugin as a policy would: a path (containing `/` or ending in
/// `.wasm`), else a name looked up in `plugin_dirs`, `-` and `_` alike.
pub fn resolve(plugin: &str, plugin_dirs: &[PathBuf]) -> Result<PathBuf, String> {
    crate::policy::resolve_plugin(plugin, Path::new("."), plugin_dirs)
}

impl Loaded {
    /// Compiles the plugin, calls its `info()` and loads the models.
    pub async fn load(path: &Path, settings: &Settings) -> Result<Loaded, String> {
        let runtime = Runtime::new(RuntimeConfig {
            max_instances: 8,
            max_memory_bytes: settings.memory_bytes.max(1 << 20),
            compile_cache: settings.compile_cache.clone(),
            ..RuntimeConfig::default()
        })
        .map_err(|e| format!("cannot start the WebAssembly runtime: {e:#}"))?;
        let started = Instant::now();
        let plugin = runtime
            .load_plugin(path)
            .await
            .map_err(|e| format!("plugin {} {e}", path.display()))?;
        let load_time = started.elapsed();
        let mut models = HashMap::new();
        for (name, file) in &settings.models {
            let bytes =
                std::fs::read(file).map_err(|e| format!("ONNX model {}: {e}", file.display()))?;
            let model = OnnxModel::load_bytes(file, &bytes).map_err(|e| e.to_string())?;
            models.insert(name.clone(), Arc::new(model));
        }
        let pool = runtime.instance_pool(1);
        Ok(Loaded {
            runtime,
            plugin,
            models: Arc::new(ModelSet::new(models)),
            pool,
            load_time,
        })
    }

    /// One call, as a served request would make it.
    pub async fn call(
        &self,
        inputs: &[Tensor],
        settings: &Settings,
    ) -> (
        Result<Vec<Tensor>, crate::contract::PluginError>,
        crate::runtime::CallStats,
    ) {
        let limits = CallLimits::starting_now(settings.timeout, settings.memory_bytes)
            .with_grants(settings.grants);
        self.plugin
            .infer_measured(inputs, limits, &self.models, &self.pool)
            .await
    }

    /// The runtime the plugin runs in.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

/// `gateway plugin run`: answers the V2 request in `body` with the plugin,
/// as the gateway would (status, JSON body), and what the call used.
pub async fn run(loaded: &Loaded, body: &[u8], settings: &Settings) -> (u16, String) {
    let request = match crate::protocol::decode_infer_request(body, None, DecodeLimits::default()) {
        Ok(request) => request,
        Err(e) => {
            return (
                400,
                error_json(&format!("the request is not a V2 inference request: {e}")),
            );
        }
    };
    let info = loaded.plugin.info();
    if let Err(e) = crate::validate::check_request(&request, info) {
        return (400, error_json(&format!("invalid inputs: {e}")));
    }
    let (result, stats) = loaded.call(&request.inputs, settings).await;
    let outputs = match result {
        Ok(outputs) => outputs,
        Err(e) => {
            let status = if matches!(e, crate::contract::PluginError::Rejected(_)) {
                400
            } else {
                500
            };
            return (
                status,
                error_json(&format!("{} {e}", loaded.plugin.describe_call("infer"))),
            );
        }
    };
    if let Err(e) = crate::validate::check_outputs(&outputs, info, false) {
        return (
            500,
            error_json(&format!(
                "{} returned outputs that break its info(): {e}",
                loaded.plugin.describe_call("infer")
            )),
        );
    }
    let selected: Vec<(&Tensor, bool)> = match &request.outputs {
        None => outputs.iter().map(|t| (t, false)).collect(),
        Some(wanted) => wanted
            .iter()
            .filter_map(|w| outputs.iter().find(|t| t.name == w.name))
            .map(|t| (t, false))
            .collect(),
    };
    let response = InferResponse {
        model_name: loaded.plugin.name(),
        model_version: &info.version,
        id: request.id.as_deref(),
        outputs: &selected,
    };
    match response.encode() {
        Ok((body, None)) => {
            eprintln!(
                "plugin `{}`: ran {:.3} ms, linear memory {:.1} MiB",
                loaded.plugin.name(),
                stats.ran.as_secs_f64() * 1e3,
                stats.memory_bytes as f64 / f64::from(1 << 20)
            );
            (200, String::from_utf8_lossy(&body).into_owned())
        }
        Ok((_, Some(_))) => (
            500,
            error_json(
                "outputs JSON cannot carry (BYTES that are not UTF-8); the gateway answers them in binary",
            ),
        ),
        Err(e) => (500, error_json(&format!("cannot encode the outputs: {e}"))),
    }
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The inputs of the V2 requests in `text` (one request, a JSON array of
/// them, or one per line), each labelled with its place in `file`.
pub fn requests(file: &Path, text: &[u8]) -> Result<Vec<(String, Vec<Tensor>)>, String> {
    let bodies: Vec<Vec<u8>> = match serde_json::from_slice::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(items)) => {
            items.iter().map(|v| v.to_string().into_bytes()).collect()
        }
        Ok(_) => vec![text.to_vec()],
        Err(_) => text
            .split(|&b| b == b'\n')
            .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
            .map(<[u8]>::to_vec)
            .collect(),
    };
    bodies
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let label = format!("request {} of {}", i + 1, file.display());
            crate::protocol::decode_infer_request(body, None, DecodeLimits::default())
                .map(|r| (label.clone(), r.inputs))
                .map_err(|e| format!("{label}: {e}"))
        })
        .collect()
}
