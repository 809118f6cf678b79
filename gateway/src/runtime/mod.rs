//! Runs plugins. Owns the one wasmtime `Engine` (pooling allocator, epoch
//! interruption, async calls), compiles and pre-instantiates each plugin once
//! when it is loaded, and runs every call in a fresh sandbox with a memory cap
//! and a deadline (see `sandbox`).
//!
//! It turns everything that can go wrong inside a plugin into a typed
//! [`PluginError`]; it does not know about HTTP status codes.

pub mod bindings;
pub mod cache;
pub mod nn;
mod reuse;
mod sandbox;
mod world;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolConcurrencyLimitError,
    PoolingAllocationConfig, Trap,
};

use crate::contract::{
    CallLimits, Error as GuestError, Grants, ModelInfo, PluginError, Sha256, content_hash,
};
use crate::onnx::{ModelSet, OnnxModel};
use crate::telemetry::escape;
use crate::tensor::{self, Tensor};
use bindings::ModelPre;
pub use reuse::InstancePool;
use reuse::Tickets;
use sandbox::{Host, NotGranted};

/// How often the engine's epoch advances: the granularity of deadlines and
/// of a running plugin's yields to the executor.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How long `info()` may take when a plugin is loaded.
const INFO_DEADLINE: Duration = Duration::from_secs(5);

/// Process-wide sandbox settings; per-version limits come from policies.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Sandboxes that may exist at once, across all plugins. The pooling
    /// allocator reserves address space for this many up front.
    pub max_instances: u32,
    /// The largest memory cap any policy may set, in bytes.
    pub max_memory_bytes: usize,
    /// Bytes of linear memory (and of tables) a freed sandbox slot keeps
    /// resident, reset, for its next call (see [`KEEP_RESIDENT_BYTES`] and
    /// [`default_keep_resident_bytes`]).
    pub keep_resident_bytes: usize,
    /// Where compiled plugins are kept between runs (see `cache`); none:
    /// every start compiles every plugin.
    pub compile_cache: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 256,
            max_memory_bytes: 1 << 30,
            keep_resident_bytes: default_keep_resident_bytes(),
            compile_cache: None,
        }
    }
}

/// Per-component ceilings of the pooling allocator. A component past them
/// fails to load, with wasmtime's message naming the limit.
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
const MEMORIES_PER_COMPONENT: u32 = 2;
const TABLES_PER_COMPONENT: u32 = 16;

/// Linear memory and table bytes a freed sandbox slot keeps resident (and
/// resets) by default instead of returning them to the kernel. Returning
/// them costs an madvise per sandbox and TLB shootdowns between threads:
/// keeping them doubled throughput with two threads (wrk, 64 connections,
/// 13.4k -> 27.2k req/s).
///
/// With `PAGEMAP_SCAN` (Linux 6.7+) wasmtime finds the pages the call
/// dirtied, anywhere in the memory, resets them in address order until it
/// has kept this much (or 32 runs of pages), and returns the rest. The
/// example Rust plugins dirty 12-64 KiB per call (256-row batches
/// included), the Python and JavaScript ones about 300 KiB, so 512 KiB
/// keeps them whole (their latency was the same with 2 MiB).
///
/// Without it wasmtime memsets the first this-many bytes of the memory and
/// returns the rest, and a Rust guest's stack (its first 1 MiB, used from
/// the top) lies past 512 KiB: there the default stays 2 MiB, which
/// covered the example plugins (1 MiB did not), at the price of a 2 MiB
/// memset per call (17 % of the gateway's CPU at 64 connections).
///
/// What it also bounds is what stays after a burst: wasmtime 48 never
/// drops a used slot's resident part, so every memory and table slot a
/// call used keeps up to this much, whatever the call filled. At 2 MiB the
/// soak's attacking plugins left 13.3 MiB in the pool; at 512 KiB, 2.4 MiB
/// (`--sandbox-keep-resident-kib`; 0 returns everything after every call).
const KEEP_RESIDENT_BYTES: usize = 512 << 10;

/// [`KEEP_RESIDENT_BYTES`] where the kernel has `PAGEMAP_SCAN`, else 2 MiB.
pub(crate) fn default_keep_resident_bytes() -> usize {
    static DEFAULT: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        if pagemap_scan() {
            KEEP_RESIDENT_BYTES
        } else {
            2 << 20
        }
    });
    *DEFAULT
}

/// Whether this kernel answers `PAGEMAP_SCAN` on `/proc/self/pagemap`,
/// asked as wasmtime asks before it uses it: an empty range, one page.
fn pagemap_scan() -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        /// `struct pm_scan_arg` of `linux/fs.h`.
        #[repr(C)]
        struct PmScanArg {
            size: u64,
            flags: u64,
            start: u64,
            end: u64,
            walk_end: u64,
            vec: u64,
            vec_len: u64,
            max_pages: u64,
            category_inverted: u64,
            category_mask: u64,
            category_anyof_mask: u64,
            return_mask: u64,
        }
        /// `_IOWR('f', 16, struct pm_scan_arg)`.
        const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
        let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
            return false;
        };
        // One `struct page_region` (start, end, categories).
        let mut region = [0u64; 3];
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: 0,
            end: 0,
            walk_end: 0,
            vec: region.as_mut_ptr() as u64,
            vec_len: 1,
            max_pages: 1,
            category_inverted: 0,
            // The eight categories Linux 6.7 defines.
            category_mask: 0xff,
            category_anyof_mask: 0,
            return_mask: 0,
        };
        // SAFETY: the kernel reads `arg` and writes at most `vec_len`
        // regions to `vec`, both valid for the call; an unknown request is
        // an error (ENOTTY), not undefined behaviour.
        unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) >= 0 }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// The engine, the linker holding the granted host interfaces, and the epoch
/// ticker. Cheap to share behind an `Arc`; one per process.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    config: RuntimeConfig,
    /// The budget of instances kept between calls (see `reuse`).
    kept: Arc<Tickets>,
    /// The metrics of the server this runtime serves.
    telemetry: Arc<crate::telemetry::Telemetry>,
    /// Compiled plugins kept between runs.
    cache: Option<Arc<cache::CompileCache>>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let n = config.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n * CORE_INSTANCES_PER_COMPONENT)
            .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
            .total_memories(n * MEMORIES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(n * TABLES_PER_COMPONENT)
            .max_tables_per_component(TABLES_PER_COMPONENT)
            .total_stacks(n)
            .max_memory_size(config.max_memory_bytes)
            .linear_memory_keep_resident(config.keep_resident_bytes)
            .table_keep_resident(config.keep_resident_bytes)
            .pagemap_scan(Enabled::Auto);

        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .wasm_component_model(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm)?;

        let mut linker = Linker::new(&engine);
        sandbox::add_granted_wasi(&mut linker)?;

        spawn_epoch_ticker(&engine)?;
        let cache = config.compile_cache.as_deref().and_then(|dir| {
            cache::CompileCache::open(dir, &engine)
                .map(Arc::new)
                .map_err(|e| tracing::warn!("not using the compile cache: {e}"))
                .ok()
        });
        Ok(Runtime {
            cache,
            engine,
            linker,
            kept: Tickets::new((n / reuse::KEPT_SHARE) as usize),
            config,
            telemetry: crate::telemetry::Telemetry::new(),
        })
    }

    /// An instance pool for a version whose instances serve up to
    /// `calls_per_instance` calls each.
    pub fn instance_pool(&self, calls_per_instance: u32) -> InstancePool {
        InstancePool::new(
            calls_per_instance,
            self.kept.clone(),
            (self.config.max_instances.max(2) / 2) as usize,
        )
    }

    /// Appends the sandbox pool's series to a Prometheus text exposition:
    /// what freed sandbox slots keep resident (see [`KEEP_RESIDENT_BYTES`]),
    /// the part of the process's memory that no allocator gives back.
    pub(crate) fn render_pool(&self, out: &mut String) {
        use std::fmt::Write as _;
        let Some(pool) = self.engine.pooling_allocator_metrics() else {
            return;
        };
        let name = "gateway_sandbox_pool_resident_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} Memory that freed sandbox slots keep resident, reset, for the next call.\n\
             # TYPE {name} gauge\n\
             {name}{{kind=\"memory\"}} {}\n\
             {name}{{kind=\"table\"}} {}\n\
             {name}{{kind=\"stack\"}} {}",
            pool.unused_memory_bytes_resident(),
            pool.unused_table_bytes_resident(),
            pool.unused_stack_bytes_resident().unwrap_or(0),
        );
        let name = "gateway_sandbox_pool_warm_slots";
        let _ = writeln!(
            out,
            "# HELP {name} Freed sandbox slots that keep memory resident.\n\
             # TYPE {name} gauge\n\
             {name}{{kind=\"memory\"}} {}\n\
             {name}{{kind=\"table\"}} {}\n\
             {name}{{kind=\"stack\"}} {}\n\
             # HELP gateway_sandbox_instances Sandboxes (component instances) in use.\n\
             # TYPE gateway_sandbox_instances gauge\n\
             gateway_sandbox_instances {}",
            pool.unused_warm_memories(),
            pool.unused_warm_tables(),
            pool.unused_warm_stacks(),
            pool.component_instances(),
        );
    }

    /// The metrics of the server this runtime serves (its own recorder).
    pub fn telemetry(&self) -> &Arc<crate::telemetry::Telemetry> {
        &self.telemetry
    }

    /// Reads and loads the component at `path` (see [`Runtime::load_plugin_bytes`]).
    pub async fn load_plugin(&self, path: &Path) -> Result<Arc<Plugin>, LoadError> {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read(e.to_string()))?;
        self.load_plugin_bytes(path, bytes).await
    }

    /// Compiles a component read from `path`, checks that it exports the
    /// plugin world, pre-instantiates it and calls its `info()` once.
    ///
    /// Compilation runs on the blocking pool: it takes tens of milliseconds
    /// per plugin and must not stall request handling during a reload.
    pub async fn load_plugin_bytes(
        &self,
        path: &Path,
        bytes: Vec<u8>,
    ) -> Result<Arc<Plugin>, LoadError> {
        let sha256 = Sha256::of(&bytes);
        let engine = self.engine.clone();
        let cache = self.cache.clone();
        let (component, cached) = tokio::task::spawn_blocking(move || {
            compile(&engine, cache.as_deref(), &bytes, &sha256)
        })
        .await
        .map_err(|e| LoadError::Compile(e.to_string()))?
        .map_err(|e| LoadError::Compile(format!("{e:#}")))?;

        let imports: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .collect();
        let mut linker = self.linker.clone();
        sandbox::stub_ungranted_imports(&mut linker, &self.engine, &component)
            .map_err(|e| LoadError::Interface(format!("{e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(ModelPre::new)
            .map_err(|e| LoadError::Interface(format!("{e:#}")))?;

        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let mut plugin = Plugin {
            name,
            path: path.to_path_buf(),
            engine: self.engine.clone(),
            pre,
            info: ModelInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
            startup_memory_bytes: 0,
            sha256,
            imports,
        };
        let limits = CallLimits::starting_now(INFO_DEADLINE, self.config.max_memory_bytes);
        let (info, startup_memory_bytes) =
            plugin.call_info(limits).await.map_err(LoadError::Info)?;
        check_info(&info).map_err(LoadError::BadInfo)?;
        plugin.info = info;
        plugin.startup_memory_bytes = startup_memory_bytes;
        match cached {
            Compiled::Fresh => self.telemetry.record_plugin_compiled(),
            Compiled::FromCache => self.telemetry.record_plugin_cached(),
        }
        Ok(Arc::new(plugin))
    }
}

/// Where a component's machine code came from.
enum Compiled {
    Fresh,
    FromCache,
}

/// Compiles a component, or loads its compiled form from `cache` (and
/// stores what it compiled there). Blocking: seconds for a large guest.
fn compile(
    engine: &Engine,
    cache: Option<&cache::CompileCache>,
    bytes: &[u8],
    sha256: &Sha256,
) -> wasmtime::Result<(Component, Compiled)> {
    if let Some(cache) = cache {
        match cache.load(engine, sha256) {
            cache::Lookup::Hit(component) => return Ok((component, Compiled::FromCache)),
            cache::Lookup::Refused(why) => {
                tracing::warn!("compile cache entry refused, compiling again: {why}")
            }
            cache::Lookup::Miss => {}
        }
    }
    let component = Component::new(engine, bytes)?;
    if let Some(Err(e)) = cache.map(|c| c.store(&component, sha256)) {
        tracing::warn!("could not store a compiled plugin in the compile cache: {e}");
    }
    Ok((component, Compiled::Fresh))
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("epoch-ticker".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
    Ok(())
}

/// A compiled, pre-instantiated plugin and what it declared about itself.
pub struct Plugin {
    name: String,
    path: PathBuf,
    engine: Engine,
    pre: ModelPre<Host>,
    info: ModelInfo,
    startup_memory_bytes: usize,
    sha256: Sha256,
    /// The interfaces the component imports, with their versions.
    imports: Vec<String>,
}

impl Plugin {
    /// The plugin's name (its file name without `.wasm`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The plugin for a failed call of `export`: its file's name, what its
    /// `info()` reports, and the export ("plugin `ttm-rules-v1`
    /// (ttm-rules 1.0.0) in `infer`").
    pub(crate) fn describe_call(&self, export: &str) -> String {
        format!(
            "plugin `{}` ({} {}) in `{export}`",
            self.name(),
            self.info.name,
            self.info.version
        )
    }

    /// What `info()` returned at load time.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// See [`content_hash`].
    pub fn content_hash(&self) -> u64 {
        self.sha256.short()
    }

    /// The interfaces the component imports (`wasi:nn/graph@...`).
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// Whether the plugin runs trained models through wasi:nn.
    pub fn imports_nn(&self) -> bool {
        self.imports.iter().any(|i| i.starts_with("wasi:nn/"))
    }

    /// The SHA-256 of the component file.
    pub fn sha256(&self) -> Sha256 {
        self.sha256
    }

    /// Linear memory the plugin had after instantiation: a version's memory
    /// cap below this can never serve a request.
    pub fn startup_memory_bytes(&self) -> usize {
        self.startup_memory_bytes
    }

    /// Runs `infer` in a sandbox, with `models` reachable through wasi:nn,
    /// and checks the layout of its outputs. The sandbox is fresh unless
    /// `pool` keeps instances (see `reuse`): then it may be one that served
    /// earlier calls of the same version, and it is offered back to `pool`
    /// if this call ends cleanly.
    pub async fn infer(
        &self,
        inputs: &[Tensor],
        limits: CallLimits,
        models: &Arc<ModelSet>,
        pool: &InstancePool,
    ) -> Result<Vec<Tensor>, PluginError> {
        self.infer_measured(inputs, limits, models, pool).await.0
    }

    /// [`Plugin::infer`], and what the call used.
    pub async fn infer_measured(
        &self,
        inputs: &[Tensor],
        limits: CallLimits,
        models: &Arc<ModelSet>,
        pool: &InstancePool,
    ) -> (Result<Vec<Tensor>, PluginError>, CallStats) {
        let mut stats = CallStats::default();
        let result = self
            .infer_counting(inputs, limits, models, pool, &mut stats)
            .await;
        (result, stats)
    }

    async fn infer_counting(
        &self,
        inputs: &[Tensor],
        limits: CallLimits,
        models: &Arc<ModelSet>,
        pool: &InstancePool,
        stats: &mut CallStats,
    ) -> Result<Vec<Tensor>, PluginError> {
        // How long the call ran (was polled, plus its wasi:nn computations
        // elsewhere): a deadline is the plugin's failure only if it ran for
        // most of it, not if it waited for its turn on the cores.
        let mut ran = Duration::ZERO;
        let mut kept = match pool.take() {
            Some(mut kept) => {
                kept.store.data_mut().next_call(limits);
                kept.store.set_epoch_deadline(1);
                kept
            }
            None => {
                let sandbox = pool.sandbox(limits.deadline).await.ok_or_else(|| {
                    PluginError::Exhausted(
                        "the version holds its share (half) of the sandbox pool until its deadline"
                            .into(),
                    )
                })?;
                let mut store = sandbox::new_store(&self.engine, limits, models.clone());
                let (instance, took) =
                    crate::cpu::timed(self.pre.instantiate_async(&mut store)).await;
                ran += took;
                match instance {
                    Ok(model) => reuse::Kept::new(store, model, sandbox),
                    Err(error) => return Err(classify(error, store.data(), limits, ran)),
                }
            }
        };
        let (result, took) =
            crate::cpu::timed(kept.model.call_infer(&mut kept.store, inputs)).await;
        ran += took;
        stats.ran = ran;
        stats.memory_bytes = kept.store.data().limiter.used_bytes();
        log_output(&self.name, kept.store.data());
        let result = match result {
            Ok(Ok(outputs)) => check_outputs(&outputs).map(|()| outputs),
            // A plugin's own words reach clients and logs: a few KiB of
            // them, control characters escaped.
            Ok(Err(GuestError::InvalidInput(message))) => {
                Err(PluginError::Rejected(escape(&message)))
            }
            Ok(Err(GuestError::Internal(message))) => {
                return Err(PluginError::Failed(escape(&message)));
            }
            Err(error) => return Err(classify(error, kept.store.data(), limits, ran)),
        };
        if matches!(result, Ok(_) | Err(PluginError::Rejected(_))) {
            pool.give_back(kept);
        }
        result
    }

    /// Calls `info()` in a fresh sandbox under a version's memory cap and
    /// grants: a plugin that cannot start under them fails every call of
    /// that version, which a policy check must say at load.
    pub async fn starts_under(
        &self,
        memory_bytes: usize,
        grants: Grants,
    ) -> Result<(), PluginError> {
        let limits = CallLimits::starting_now(INFO_DEADLINE, memory_bytes).with_grants(grants);
        self.call_info(limits).await.map(|_| ())
    }

    /// Calls `info()` in a fresh sandbox; also returns the linear memory the
    /// plugin held by then. The cheapest complete call a plugin has: a
    /// baseline for what `infer` adds.
    pub async fn call_info(&self, limits: CallLimits) -> Result<(ModelInfo, usize), PluginError> {
        let mut store = sandbox::new_store(&self.engine, limits, Arc::default());
        let (result, ran) = crate::cpu::timed(async {
            let model = self.pre.instantiate_async(&mut store).await?;
            model.call_info(&mut store).await
        })
        .await;
        match result {
            Ok(info) => Ok((info, store.data().limiter.used_bytes())),
            Err(error) => Err(classify(error, store.data(), limits, ran)),
        }
    }
}

/// What one call used: its running time (instantiation included) and the
/// linear memory its instance held at the end.
#[derive(Clone, Copy, Debug, Default)]
pub struct CallStats {
    pub ran: Duration,
    pub memory_bytes: usize,
}

/// What serves a version: a plugin, which may run the version's ONNX
/// models through wasi:nn, or an ONNX model alone.
#[derive(Clone)]
pub enum Backend {
    Plugin {
        plugin: Arc<Plugin>,
        models: Arc<ModelSet>,
    },
    Onnx(Arc<OnnxModel>),
}

/// The files that serve a version (see [`Backend::provenance`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Provenance {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<PluginFile>,
    /// The ONNX models: the plugin's, by the name it loads them with, or
    /// the one an ONNX-only version serves.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelFile>,
}

/// A plugin component and what its `info()` says it is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PluginFile {
    /// The name policies use (the file name without `.wasm`).
    pub name: String,
    pub file: String,
    pub sha256: String,
    /// `info()`'s name, version and description: the plugin's own account
    /// of its build.
    pub reported_name: String,
    pub reported_version: String,
    pub description: String,
}

/// An ONNX model file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelFile {
    /// The name a plugin loads it with through wasi:nn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub file: String,
    pub sha256: String,
}

impl Backend {
    /// The plugin's name or the model's file name.
    pub fn name(&self) -> &str {
        match self {
            Backend::Plugin { plugin, .. } => plugin.name(),
            Backend::Onnx(model) => model.name(),
        }
    }

    /// "plugin `ttm-rules-v1`" or "ONNX model `ttm-v2.onnx`", for messages.
    pub fn describe(&self) -> String {
        match self {
            Backend::Plugin { plugin, .. } => format!("plugin `{}`", plugin.name()),
            Backend::Onnx(model) => format!("ONNX model `{}`", model.name()),
        }
    }

    /// [`Backend::describe`] for a failed call: a plugin also by what its
    /// `info()` reports and the export that failed, "plugin `ttm-rules-v1`
    /// (ttm-rules 1.0.0) in `infer`".
    pub(crate) fn describe_call(&self) -> String {
        match self {
            Backend::Plugin { plugin, .. } => plugin.describe_call("infer"),
            Backend::Onnx(_) => self.describe(),
        }
    }

    /// The V2 `platform` of model metadata.
    pub fn platform(&self) -> &'static str {
        match self {
            Backend::Plugin { .. } => "wasm-component",
            Backend::Onnx(_) => "onnx",
        }
    }

    /// The plugin's `info()`, or the model's signature.
    pub fn info(&self) -> &ModelInfo {
        match self {
            Backend::Plugin { plugin, .. } => plugin.info(),
            Backend::Onnx(model) => model.info(),
        }
    }

    /// A fingerprint of every file the backend runs.
    pub fn content_hash(&self) -> u64 {
        match self {
            Backend::Plugin { plugin, models } => {
                let mut entries: Vec<_> =
                    models.iter().map(|(n, m)| (n, m.content_hash())).collect();
                entries.sort();
                entries
                    .into_iter()
                    .fold(plugin.content_hash(), |acc, (name, hash)| {
                        acc.rotate_left(7) ^ hash ^ content_hash(name.as_bytes())
                    })
            }
            Backend::Onnx(model) => model.content_hash(),
        }
    }

    /// Every file the backend runs, with its SHA-256: what model metadata
    /// and the admin API show, so an answer traces to the exact artifacts.
    pub fn provenance(&self) -> Provenance {
        let file = |path: &Path| {
            path.file_name().map_or_else(
                || path.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        match self {
            Backend::Plugin { plugin, models } => {
                let mut models: Vec<ModelFile> = models
                    .iter()
                    .map(|(name, model)| ModelFile {
                        name: Some(name.clone()),
                        file: file(model.path()),
                        sha256: model.sha256().to_string(),
                    })
                    .collect();
                models.sort_by(|a, b| a.name.cmp(&b.name));
                Provenance {
                    plugin: Some(PluginFile {
                        name: plugin.name().to_string(),
                        file: file(plugin.path()),
                        sha256: plugin.sha256().to_string(),
                        reported_name: plugin.info().name.clone(),
                        reported_version: plugin.info().version.clone(),
                        description: plugin.info().description.clone(),
                    }),
                    models,
                }
            }
            Backend::Onnx(model) => Provenance {
                plugin: None,
                models: vec![ModelFile {
                    name: None,
                    file: file(model.path()),
                    sha256: model.sha256().to_string(),
                }],
            },
        }
    }

    /// Linear memory the plugin needs to start (none for an ONNX model).
    pub fn startup_memory_bytes(&self) -> usize {
        match self {
            Backend::Plugin { plugin, .. } => plugin.startup_memory_bytes(),
            Backend::Onnx(_) => 0,
        }
    }

    /// The same loaded plugin and models (or model), by identity.
    pub fn same_as(&self, other: &Backend) -> bool {
        match (self, other) {
            (
                Backend::Plugin { plugin, models },
                Backend::Plugin {
                    plugin: p,
                    models: m,
                },
            ) => {
                Arc::ptr_eq(plugin, p)
                    && models.iter().count() == m.iter().count()
                    && models
                        .iter()
                        .all(|(name, model)| m.get(name).is_some_and(|o| Arc::ptr_eq(model, o)))
            }
            (Backend::Onnx(a), Backend::Onnx(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// One inference under `limits`; a plugin's instance comes from (and
    /// may go back to) `pool`.
    pub async fn infer(
        &self,
        inputs: &[Tensor],
        limits: CallLimits,
        pool: &InstancePool,
        gate: &crate::cpu::Gate,
    ) -> Result<Vec<Tensor>, PluginError> {
        match self {
            Backend::Plugin { plugin, models } => {
                let call = std::pin::pin!(plugin.infer(inputs, limits, models, pool));
                gate.run(call).await
            }
            Backend::Onnx(model) => model.infer(inputs, limits, gate).await,
        }
    }
}

/// What a plugin printed, at debug level (it may print on every call).
fn log_output(plugin: &str, host: &Host) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for (stream, capture) in [("stdout", &host.stdout), ("stderr", &host.stderr)] {
        let text = capture.text();
        if !text.is_empty() {
            tracing::debug!(plugin, stream, output = %text, "plugin output");
        }
    }
}

/// Turns a wasmtime error into the [`PluginError`] that explains it, using
/// what the sandbox recorded: wasmtime reports an interrupted call and a
/// refused `memory.grow` as generic traps. `ran` is how long the call was
/// polled.
fn classify(error: wasmtime::Error, host: &Host, limits: CallLimits, ran: Duration) -> PluginError {
    if host.timed_out {
        return PluginError::past_deadline(
            limits.timeout,
            ran + host.offloaded + host.world.waited(),
        );
    }
    if let Some(requested_bytes) = host.limiter.refused {
        return PluginError::MemoryLimit {
            limit_bytes: limits.memory_bytes,
            requested_bytes,
        };
    }
    if let Some(nn::HostLimit(e)) = error.downcast_ref::<nn::HostLimit>() {
        return e.clone();
    }
    if error.downcast_ref::<PoolConcurrencyLimitError>().is_some() {
        return PluginError::Exhausted(error.to_string());
    }
    let trap = error.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::StackOverflow) {
        return PluginError::StackOverflow;
    }
    if let Some(NotGranted(import)) = error.downcast_ref::<NotGranted>() {
        return PluginError::NotGranted(import.clone());
    }
    let message = format!("{error:#}");
    let stderr = host.stderr.text();
    if let Some(panic) = panic_message(&stderr) {
        return PluginError::Panic(escape(&panic));
    }
    match trap {
        Some(trap) if stderr.is_empty() => PluginError::Trap(trap.to_string()),
        Some(trap) => PluginError::Trap(format!("{trap}; the plugin printed: {}", escape(&stderr))),
        None => PluginError::Internal(first_line(&message).to_string()),
    }
}

/// The panic message from what Rust's panic handler printed, without the
/// thread name and the backtrace hint.
fn panic_message(stderr: &str) -> Option<String> {
    let at = stderr.find("panicked at ")?;
    let text: Vec<&str> = stderr[at..]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    Some(text.join(" "))
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}

/// Output layout rules: a consistent shape and data, unique names.
fn check_outputs(outputs: &[Tensor]) -> Result<(), PluginError> {
    for (i, output) in outputs.iter().enumerate() {
        tensor::check_layout(output)
            .map_err(|e| PluginError::MalformedOutput(format!("output `{}`: {e}", output.name)))?;
        if outputs[..i].iter().any(|o| o.name == output.name) {
            return Err(PluginError::MalformedOutput(format!(
                "output `{}` appears twice",
                output.name
            )));
        }
    }
    Ok(())
}

/// `info()` rules: unique names, dimensions of -1 or more.
fn check_info(info: &ModelInfo) -> Result<(), String> {
    for (kind, specs) in [("input", &info.inputs), ("output", &info.outputs)] {
        for (i, spec) in specs.iter().enumerate() {
            if spec.name.is_empty() {
                return Err(format!("{kind} {i} has an empty name"));
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(format!("{kind} `{}` is declared twice", spec.name));
            }
            if spec.shape.iter().any(|&d| d < -1) {
                return Err(format!("{kind} `{}` has shape {:?}", spec.name, spec.shape));
            }
        }
    }
    if info.inputs.is_empty() {
        return Err("declares no inputs".into());
    }
    // They are shown in model metadata, on every request for it.
    for (field, value, limit) in [
        ("name", &info.name, 256),
        ("version", &info.version, 256),
        ("description", &info.description, 4096),
    ] {
        if value.len() > limit {
            return Err(format!(
                "its {field} has {} bytes; the most is {limit}",
                value.len()
            ));
        }
        // The name and version go into error messages and logs.
        if field != "description" && value.chars().any(breaks_lines) {
            return Err(format!("its {field} {value:?} has control characters"));
        }
    }
    Ok(())
}

/// A control character, a line or paragraph separator, or a bidirectional
/// override: what could forge or disguise a log line.
fn breaks_lines(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Why a plugin could not be loaded.
#[derive(Debug, Clone)]
pub enum LoadError {
    Read(String),
    Compile(String),
    Interface(String),
    Info(PluginError),
    BadInfo(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Read(e) => write!(f, "cannot be read: {e}"),
            LoadError::Compile(e) => write!(f, "is not a valid WebAssembly component: {e}"),
            LoadError::Interface(e) => {
                write!(f, "does not implement the gateway:plugin/model world: {e}")
            }
            LoadError::Info(e) => write!(f, "failed in info(): it {e}"),
            LoadError::BadInfo(e) => write!(f, "returned unusable metadata from info(): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe agrees with the kernel's version: `PAGEMAP_SCAN` came in
    /// Linux 6.7, and the default follows the probe.
    #[cfg(target_os = "linux")]
    #[test]
    fn pagemap_scan_is_found_where_the_kernel_has_it() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let version = (numbers.next().unwrap(), numbers.next().unwrap());
        assert_eq!(pagemap_scan(), version >= (6, 7), "kernel {release}");
        let expected = if version >= (6, 7) {
            512 << 10
        } else {
            2 << 20
        };
        assert_eq!(default_keep_resident_bytes(), expected);
        assert_eq!(RuntimeConfig::default().keep_resident_bytes, expected);
    }

    #[test]
    fn info_names_and_versions_have_no_control_characters() {
        let info = |name: &str, description: &str| ModelInfo {
            name: name.into(),
            version: "1.0.0".into(),
            description: description.into(),
            inputs: vec![crate::contract::TensorSpec {
                name: "x".into(),
                datatype: crate::contract::Datatype::Fp32,
                shape: vec![-1],
            }],
            outputs: Vec::new(),
        };
        assert!(check_info(&info("ttm-rules", "line one\nline two")).is_ok());
        let e = check_info(&info("ttm\n2026-12-07 ERROR forged", "")).unwrap_err();
        assert!(
            e.contains("name") && e.contains("control characters"),
            "{e}"
        );
        assert!(check_info(&info("ttm\u{202e}sgol", "")).is_err());
    }

    #[test]
    fn extracts_panic_message() {
        let stderr = "thread '<unnamed>' panicked at src/lib.rs:16:9:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicked at src/lib.rs:16:9: boom")
        );
        assert_eq!(panic_message("plain output"), None);
    }
}
