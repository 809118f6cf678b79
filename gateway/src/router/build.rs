//! Building a snapshot from checked policies: loads each plugin file once,
//! reuses what the previous snapshot already compiled (same file, same
//! bytes) and the versions whose plugin and limits did not change (so their
//! admission state carries over), and reports every problem at the policy
//! key that caused it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::HeaderName;
use tokio::sync::Semaphore;

use super::{Admission, Model, ShadowRoute, ShareRoute, Snapshot, Version};
use crate::onnx::{ModelSet, OnnxModel};
use crate::policy::{self, LoadOptions, ModelPolicy, PolicyError, Serving, VersionPolicy};
use crate::runtime::{Backend, Plugin, Runtime};
use crate::tensor::Datatype;

/// What a build did with the plugins.
#[derive(Debug, Default)]
pub struct BuildReport {
    /// Plugin files compiled by this build.
    pub compiled: Vec<PathBuf>,
    /// Plugin files taken, unchanged, from the previous snapshot.
    pub reused: Vec<PathBuf>,
}

/// Reads, checks and loads a policy folder into a snapshot: every check that
/// serving needs, including compiling each plugin and calling its `info()`.
/// `gateway check`, start-up and every reload run exactly this.
pub async fn load(
    dir: &Path,
    options: &LoadOptions,
    runtime: &Runtime,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, BuildReport), Vec<PolicyError>> {
    // Every problem of every file: the files that parse are built (their
    // plugins compiled) even when others do not, so one run lists all.
    let (mut policies, mut errors) = policy::load_dir(dir, options);
    if let Some(overlay) = &options.overlay {
        for policy in &mut policies {
            overlay.0.apply(policy);
        }
    }
    match build(policies, runtime, previous).await {
        Ok(built) if errors.is_empty() => Ok(built),
        Ok(_) => Err(errors),
        Err(mut more) => {
            errors.append(&mut more);
            Err(errors)
        }
    }
}

/// Assembles a snapshot from checked policies (see the module docs).
pub(super) async fn build(
    policies: Vec<ModelPolicy>,
    runtime: &Runtime,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, BuildReport), Vec<PolicyError>> {
    let mut plugins = plugin_cache(previous);
    let mut onnx = onnx_cache(previous);
    let mut report = BuildReport::default();
    let mut errors = Vec::new();
    let mut models = BTreeMap::new();
    for policy in policies {
        let before = errors.len();
        let old = previous.and_then(|p| p.model(&policy.model).ok());
        let mut versions = BTreeMap::new();
        for v in &policy.versions {
            let backend = match &v.serving {
                Serving::Plugin(path) => {
                    let plugin = plugins
                        .get(path, &mut report, |p, b| load_plugin(runtime, p, b))
                        .await;
                    let mut declared = HashMap::new();
                    for m in &v.models {
                        match onnx.get(&m.path, &mut report, load_onnx).await {
                            Ok(model) => {
                                declared.insert(m.name.clone(), model);
                            }
                            Err(e) => errors.push(PolicyError::at(&m.location, e)),
                        }
                    }
                    plugin.map(|plugin| Backend::Plugin {
                        plugin,
                        models: Arc::new(ModelSet::new(declared)),
                    })
                }
                Serving::Onnx(path) => onnx
                    .get(path, &mut report, load_onnx)
                    .await
                    .map(Backend::Onnx),
            };
            let backend = match backend {
                Ok(backend) => backend,
                Err(e) => {
                    errors.push(PolicyError::at(&v.serving_location, e));
                    continue;
                }
            };
            if let Backend::Plugin { plugin, models } = &backend
                && plugin.imports_nn()
                && models.iter().next().is_none()
            {
                errors.push(PolicyError::at(
                    &v.serving_location,
                    format!(
                        "plugin `{}` imports wasi:nn (it runs trained models on the host), but version `{}` declares no `models` for it, so every call would fail: add `models = {{ <name> = \"<file>.onnx\" }}` with the names it loads",
                        plugin.name(),
                        v.name
                    ),
                ));
                continue;
            }
            if let Backend::Plugin { plugin, .. } = &backend
                && (v.grants.random == crate::contract::RandomGrant::Denied
                    || v.grants.clocks == crate::contract::ClockGrant::Denied)
                && let Err(crate::contract::PluginError::NotGranted(import)) =
                    plugin.starts_under(v.limits.memory_bytes, v.grants).await
            {
                errors.push(PolicyError::at(
                    &v.serving_location,
                    format!(
                        "plugin `{}` calls `{import}` when it starts (in info()), which version `{}` does not grant, so every call would fail: allow it in `grants`",
                        plugin.name(),
                        v.name
                    ),
                ));
                continue;
            }
            if let Some(import) = probe_reaches_denied(&backend, v, runtime).await {
                errors.push(PolicyError::at(
                    &v.serving_location,
                    format!(
                        "plugin `{}` calls `{import}` in infer() on a probe input (a batch of one generated from its info()), which version `{}` does not grant, so its calls would fail: allow it in `grants`",
                        backend.name(),
                        v.name
                    ),
                ));
                continue;
            }
            if v.limits.memory_bytes < backend.startup_memory_bytes() {
                errors.push(PolicyError::at(
                    &v.serving_location,
                    format!(
                        "{} needs {} KiB of memory to start, more than the version's memory_mebibytes allows ({} KiB)",
                        backend.describe(),
                        backend.startup_memory_bytes() >> 10,
                        v.limits.memory_bytes >> 10
                    ),
                ));
                continue;
            }
            let reusable = old.and_then(|m| m.versions.get(&v.name)).filter(|o| {
                o.backend.same_as(&backend)
                    && o.limits == v.limits
                    && o.grants == v.grants
                    && o.description == v.description
            });
            let version = match reusable {
                Some(same) => same.clone(),
                None => Arc::new(new_version(&policy.model, v, backend, runtime)),
            };
            versions.insert(v.name.clone(), version);
        }
        if errors.len() > before {
            continue;
        }
        match assemble(policy, versions, old) {
            Ok(model) => {
                models.insert(model.name.clone(), Arc::new(model));
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let generation = previous.map_or(1, |p| p.generation + 1);
    Ok((Snapshot { models, generation }, report))
}

/// A snapshot like `previous` with each model's routing (champion,
/// canary, shadows) from `policies`, over the same versions: nothing is
/// read from disk or compiled. How a rollout's step is served.
pub(crate) fn reroute(
    previous: &Snapshot,
    policies: Vec<ModelPolicy>,
) -> Result<Snapshot, Vec<PolicyError>> {
    let mut models = BTreeMap::new();
    let mut errors = Vec::new();
    for policy in policies {
        let Ok(old) = previous.model(&policy.model) else {
            continue;
        };
        match assemble(policy, old.versions.clone(), Some(old)) {
            Ok(model) => {
                models.insert(model.name.clone(), Arc::new(model));
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Snapshot {
        models,
        generation: previous.generation + 1,
    })
}

fn new_version(model: &str, v: &VersionPolicy, backend: Backend, runtime: &Runtime) -> Version {
    let label_output = backend
        .info()
        .outputs
        .iter()
        .find(|o| o.datatype == Datatype::Bytes)
        .map(|o| o.name.clone());
    Version {
        model: model.to_string(),
        name: v.name.clone(),
        name_header: http::HeaderValue::from_str(&v.name).ok(),
        description: v.description.clone(),
        backend,
        limits: v.limits,
        grants: v.grants,
        label_output,
        metrics: super::VersionMetrics::new(
            runtime.telemetry().clone(),
            runtime.telemetry().tally(model, &v.name),
            runtime
                .telemetry()
                .tally(model, crate::telemetry::CONTROL_TALLY),
        ),
        error_log: Default::default(),
        admission: Admission::new(v.limits.max_concurrency, v.limits.max_queue),
        breaker: super::breaker::Breaker::new(v.limits.breaker_failures, v.limits.breaker_cooldown),
        memory_share: Default::default(),
        bulk_share: Default::default(),
        shadow_cost_ns: Default::default(),
        gate: crate::cpu::Gate::new(v.limits.max_parallel),
        instances: runtime.instance_pool(v.limits.calls_per_instance),
    }
}

/// Wires the champion, canary and shadows of one model (the policy module
/// has checked that they name existing, distinct versions).
/// A canary answers clients in the champion's place, so its outputs must
/// be the champion's (names and datatypes); a challenger is compared with
/// the champion, so it must have at least the champion's outputs.
fn same_outputs(
    policy: &ModelPolicy,
    key: &str,
    champion: &Version,
    other: &Version,
    exactly: bool,
) -> Result<(), PolicyError> {
    let outputs = |v: &Version| -> Vec<(String, Datatype)> {
        let mut o: Vec<_> = v
            .backend
            .info()
            .outputs
            .iter()
            .map(|o| (o.name.clone(), o.datatype))
            .collect();
        o.sort_by(|a, b| a.0.cmp(&b.0));
        o
    };
    let (theirs, ours) = (outputs(champion), outputs(other));
    let fits = if exactly {
        theirs == ours
    } else {
        theirs.iter().all(|o| ours.contains(o))
    };
    if fits {
        return Ok(());
    }
    let list = |outputs: &[(String, Datatype)]| {
        outputs
            .iter()
            .map(|(name, datatype)| format!("`{name}` {}", datatype.as_v2()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(PolicyError::key(
        &policy.file,
        key,
        format!(
            "version `{}` ({}) answers {}, but the champion `{}` ({}) answers {}: {}",
            other.name,
            other.backend.describe(),
            list(&ours),
            champion.name,
            champion.backend.describe(),
            list(&theirs),
            if exactly {
                "a canary answers in the champion's place, so it needs the same output names and datatypes"
            } else {
                "a challenger is compared with the champion, so it needs every output of the champion, with the same datatype"
            }
        ),
    ))
}

fn assemble(
    policy: ModelPolicy,
    versions: BTreeMap<String, Arc<Version>>,
    old: Option<&Arc<Model>>,
) -> Result<Model, PolicyError> {
    let version = |name: &str| {
        versions.get(name).cloned().ok_or_else(|| {
            PolicyError::key(
                &policy.file,
                "versions",
                format!("version `{name}` did not load"),
            )
        })
    };
    let champion = version(&policy.champion)?;
    let share = |table: &str, name: &str, percent: f64, header: &str| {
        Ok::<_, PolicyError>(ShareRoute {
            version: version(name)?,
            percent,
            sticky_header: HeaderName::from_bytes(header.as_bytes()).map_err(|e| {
                PolicyError::key(
                    &policy.file,
                    &format!("{table}.sticky_header"),
                    e.to_string(),
                )
            })?,
        })
    };
    let canary = match &policy.canary {
        None => None,
        Some(c) => Some(share("canary", &c.version, c.percent, &c.sticky_header)?),
    };
    let control = match &policy.control {
        None => None,
        Some(c) => Some(share("control", &c.version, c.percent, &c.sticky_header)?),
    };
    if let Some(control) = &control {
        same_outputs(
            &policy,
            "control.version",
            &champion,
            &control.version,
            true,
        )?;
    }
    if let Some(r) = &policy.rollout {
        // Checked here too, so `gateway check` (no rollout state: no
        // canary) refuses what a rollout's step would.
        same_outputs(
            &policy,
            "rollout.candidate",
            &*version(&r.champion)?,
            &*version(&r.candidate)?,
            true,
        )?;
        for v in [&r.candidate, &r.champion] {
            let v = version(v)?;
            if r.gates.max_prediction_psi.is_some() && v.label_output.is_none() {
                return Err(PolicyError::key(
                    &policy.file,
                    "rollout.max_prediction_psi",
                    format!(
                        "compares the labels the candidate and the champion predict, but `{}` ({}) has no BYTES output of labels",
                        v.name,
                        v.backend.describe()
                    ),
                ));
            }
        }
    } else if let Some(canary) = &canary {
        same_outputs(&policy, "canary.version", &champion, &canary.version, true)?;
    }
    let shadow = match &policy.shadow {
        None => None,
        Some(s) => {
            let challengers = s
                .versions
                .iter()
                .map(|v| version(v))
                .collect::<Result<Vec<_>, _>>()?;
            for challenger in &challengers {
                same_outputs(&policy, "shadow.versions", &champion, challenger, false)?;
            }
            if let Some(output) = &s.compare_output {
                for v in std::iter::once(&champion)
                    .chain(canary.as_ref().map(|c| &c.version))
                    .chain(&challengers)
                {
                    if !v.backend.info().outputs.iter().any(|o| &o.name == output) {
                        return Err(PolicyError::key(
                            &policy.file,
                            "shadow.compare_output",
                            format!(
                                "version `{}` ({}) has no output `{output}`",
                                v.name,
                                v.backend.describe()
                            ),
                        ));
                    }
                }
            }
            Some(ShadowRoute {
                versions: challengers,
                sample_percent: s.sample_percent,
                tolerance: s.tolerance,
                compare_output: s.compare_output.clone(),
                slots: Arc::new(Semaphore::new(s.max_concurrency as usize)),
            })
        }
    };
    let schema = match &policy.schema {
        None => None,
        Some(schema) => Some(resolve_schema(&policy, schema, &versions)?),
    };
    // A version whose plugin, limits, schema and monitoring settings did not
    // change keeps what its monitor has seen.
    let mut monitors = BTreeMap::new();
    if let Some(schema) = &schema {
        for (name, version) in &versions {
            let kept = old
                .filter(|o| {
                    o.schema.as_ref() == Some(schema) && o.policy.monitoring == policy.monitoring
                })
                .filter(|o| {
                    o.versions
                        .get(name)
                        .is_some_and(|v| Arc::ptr_eq(v, version))
                })
                .and_then(|o| o.monitors.get(name).cloned());
            let monitor = kept
                .or_else(|| crate::monitor::Monitor::new(schema, &policy.monitoring).map(Arc::new));
            if let Some(monitor) = monitor {
                monitors.insert(name.clone(), monitor);
            }
        }
    }
    Ok(Model {
        name: policy.model.clone(),
        champion,
        versions,
        canary,
        control,
        shadow,
        schema,
        monitors,
        policy,
    })
}

/// Checks the declared inputs against every version's plugin (each must
/// accept what the schema lets through) and fills in datatypes and shapes
/// the policy takes from the plugins. This is where `gateway check` reports
/// a policy and a plugin that disagree.
fn resolve_schema(
    policy: &ModelPolicy,
    schema: &crate::policy::Schema,
    versions: &BTreeMap<String, Arc<Version>>,
) -> Result<crate::policy::Schema, PolicyError> {
    let mut resolved = schema.clone();
    for rule in &mut resolved.inputs {
        let key = format!("inputs.{}", rule.name);
        for v in versions.values() {
            let problem = |what: String| {
                PolicyError::key(
                    &policy.file,
                    &key,
                    format!("version `{}` ({}) {what}", v.name, v.backend.describe()),
                )
            };
            let Some(spec) = v.backend.info().inputs.iter().find(|s| s.name == rule.name) else {
                return Err(problem(format!("has no input `{}`", rule.name)));
            };
            let datatype = *rule.datatype.get_or_insert(spec.datatype);
            if datatype != spec.datatype {
                return Err(problem(format!(
                    "expects {} where the policy declares {datatype}",
                    spec.datatype
                )));
            }
            let shape = rule.shape.get_or_insert_with(|| spec.shape.clone());
            let compatible = shape.len() == spec.shape.len()
                && shape
                    .iter()
                    .zip(&spec.shape)
                    .all(|(&mine, &theirs)| theirs == -1 || mine == theirs);
            if !compatible {
                return Err(problem(format!(
                    "expects shape {:?}, which the policy's {shape:?} does not guarantee",
                    spec.shape
                )));
            }
            if let Some(&last) = shape.last()
                && last >= 0
                && !rule.features.is_empty()
                && rule.features.len() != last as usize
            {
                return Err(problem(format!(
                    "has {last} features on its last axis, the policy names {}",
                    rule.features.len()
                )));
            }
        }
    }
    Ok(resolved)
}

/// Loaded files (plugins, ONNX models) by path: each loaded at most once per
/// build, and taken from the previous snapshot while the file's bytes hash
/// the same.
struct FileCache<T> {
    /// "plugin" or "ONNX model", for messages.
    what: &'static str,
    previous: HashMap<PathBuf, Arc<T>>,
    loaded: HashMap<PathBuf, Result<Arc<T>, String>>,
}

/// What [`FileCache`] compares to decide that a file is unchanged.
trait ContentHash {
    fn content_hash(&self) -> u64;
}

impl ContentHash for Plugin {
    fn content_hash(&self) -> u64 {
        Plugin::content_hash(self)
    }
}

impl ContentHash for OnnxModel {
    fn content_hash(&self) -> u64 {
        OnnxModel::content_hash(self)
    }
}

impl<T: ContentHash> FileCache<T> {
    fn new(what: &'static str, previous: impl Iterator<Item = (PathBuf, Arc<T>)>) -> Self {
        FileCache {
            what,
            previous: previous.map(|(path, t)| (canonical(&path), t)).collect(),
            loaded: HashMap::new(),
        }
    }

    /// The file at `path`: reused, or read and handed to `load`.
    async fn get<F, Fut>(
        &mut self,
        path: &Path,
        report: &mut BuildReport,
        load: F,
    ) -> Result<Arc<T>, String>
    where
        F: FnOnce(PathBuf, Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<Arc<T>, String>>,
    {
        let key = canonical(path);
        if let Some(done) = self.loaded.get(&key) {
            return done.clone();
        }
        let result = match std::fs::read(path) {
            Err(e) => Err(format!(
                "{} {} cannot be read: {e}",
                self.what,
                path.display()
            )),
            Ok(bytes) => match self.previous.get(&key) {
                Some(old) if old.content_hash() == crate::contract::content_hash(&bytes) => {
                    report.reused.push(path.to_path_buf());
                    Ok(old.clone())
                }
                _ => {
                    report.compiled.push(path.to_path_buf());
                    load(path.to_path_buf(), bytes)
                        .await
                        .map_err(|e| format!("{} {} {e}", self.what, path.display()))
                }
            },
        };
        self.loaded.insert(key, result.clone());
        result
    }
}

/// The plugins of the previous snapshot.
fn plugin_cache(previous: Option<&Snapshot>) -> FileCache<Plugin> {
    let plugins = versions_of(previous).filter_map(|v| match &v.backend {
        Backend::Plugin { plugin, .. } => Some((plugin.path().to_path_buf(), plugin.clone())),
        Backend::Onnx(_) => None,
    });
    FileCache::new("plugin", plugins)
}

/// The ONNX models of the previous snapshot, served alone or by plugins.
fn onnx_cache(previous: Option<&Snapshot>) -> FileCache<OnnxModel> {
    let mut models = Vec::new();
    for v in versions_of(previous) {
        match &v.backend {
            Backend::Onnx(model) => models.push(model.clone()),
            Backend::Plugin { models: set, .. } => {
                models.extend(set.iter().map(|(_, m)| m.clone()));
            }
        }
    }
    FileCache::new(
        "ONNX model",
        models.into_iter().map(|m| (m.path().to_path_buf(), m)),
    )
}

/// Compiles a plugin (see [`Runtime::load_plugin_bytes`]).
async fn load_plugin(
    runtime: &Runtime,
    path: PathBuf,
    bytes: Vec<u8>,
) -> Result<Arc<Plugin>, String> {
    runtime
        .load_plugin_bytes(&path, bytes)
        .await
        .map_err(|e| e.to_string())
}

/// Loads an ONNX model on the blocking pool (it takes milliseconds).
async fn load_onnx(path: PathBuf, bytes: Vec<u8>) -> Result<Arc<OnnxModel>, String> {
    tokio::task::spawn_blocking(move || OnnxModel::load_bytes(&path, &bytes))
        .await
        .map_err(|e| e.to_string())?
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn versions_of(snapshot: Option<&Snapshot>) -> impl Iterator<Item = &Arc<Version>> {
    snapshot
        .into_iter()
        .flat_map(|s| s.models())
        .flat_map(|m| m.versions.values())
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// For a plugin version that is refused random numbers or clocks: one
/// `infer` call on a batch of one generated from `info()` (a fresh sandbox,
/// the version's limits and grants); the import it reached and was refused,
/// if it did. Any other outcome is the plugin's business at request time.
async fn probe_reaches_denied(
    backend: &Backend,
    v: &crate::policy::VersionPolicy,
    runtime: &Runtime,
) -> Option<String> {
    let Backend::Plugin { plugin, models } = backend else {
        return None;
    };
    let denies = v.grants.random == crate::contract::RandomGrant::Denied
        || v.grants.clocks == crate::contract::ClockGrant::Denied;
    if !denies {
        return None;
    }
    let inputs = crate::tensor::generated(
        &plugin.info().inputs,
        1,
        crate::tensor::Fill::Varied,
        v.limits.memory_bytes,
    )?;
    let limits = crate::contract::CallLimits::starting_now(v.limits.timeout, v.limits.memory_bytes)
        .with_grants(v.grants);
    match plugin
        .infer(&inputs, limits, models, &runtime.instance_pool(1))
        .await
    {
        Err(crate::contract::PluginError::NotGranted(import)) => Some(import),
        _ => None,
    }
}
