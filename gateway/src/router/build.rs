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

use super::{Admission, CanaryRoute, Model, ShadowRoute, Snapshot, Version};
use crate::policy::{self, LoadOptions, ModelPolicy, PolicyError, VersionPolicy};
use crate::runtime::{Plugin, Runtime};
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
    let policies = policy::load_dir(dir, options)?;
    build(policies, runtime, previous).await
}

/// Assembles a snapshot from checked policies (see the module docs).
pub async fn build(
    policies: Vec<ModelPolicy>,
    runtime: &Runtime,
    previous: Option<&Snapshot>,
) -> Result<(Snapshot, BuildReport), Vec<PolicyError>> {
    let mut plugins = PluginSet::from_previous(previous);
    let mut report = BuildReport::default();
    let mut errors = Vec::new();
    let mut models = BTreeMap::new();
    for policy in policies {
        let before = errors.len();
        let old = previous.and_then(|p| p.model(&policy.model).ok());
        let mut versions = BTreeMap::new();
        for v in &policy.versions {
            let plugin = match plugins.get(v, runtime, &mut report).await {
                Ok(plugin) => plugin,
                Err(e) => {
                    errors.push(PolicyError::at(&v.plugin_location, e));
                    continue;
                }
            };
            if v.limits.memory_bytes < plugin.startup_memory_bytes() {
                errors.push(PolicyError::at(
                    &v.plugin_location,
                    format!(
                        "plugin {} needs {} KiB of memory to start, more than the version's memory_mebibytes allows ({} KiB)",
                        plugin.name(),
                        plugin.startup_memory_bytes() >> 10,
                        v.limits.memory_bytes >> 10
                    ),
                ));
                continue;
            }
            let reusable = old.and_then(|m| m.versions.get(&v.name)).filter(|o| {
                Arc::ptr_eq(&o.plugin, &plugin)
                    && o.limits == v.limits
                    && o.description == v.description
            });
            let version = match reusable {
                Some(same) => same.clone(),
                None => Arc::new(new_version(&policy.model, v, plugin)),
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

fn new_version(model: &str, v: &VersionPolicy, plugin: Arc<Plugin>) -> Version {
    let label_output = plugin
        .info()
        .outputs
        .iter()
        .find(|o| o.datatype == Datatype::Bytes)
        .map(|o| o.name.clone());
    Version {
        model: model.to_string(),
        name: v.name.clone(),
        description: v.description.clone(),
        plugin,
        limits: v.limits,
        label_output,
        labels: Default::default(),
        error_log: Default::default(),
        admission: Admission::new(v.limits.max_concurrency, v.limits.max_queue),
    }
}

/// Wires the champion, canary and shadows of one model (the policy module
/// has checked that they name existing, distinct versions).
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
    let canary = match &policy.canary {
        None => None,
        Some(c) => Some(CanaryRoute {
            version: version(&c.version)?,
            percent: c.percent,
            sticky_header: HeaderName::from_bytes(c.sticky_header.as_bytes()).map_err(|e| {
                PolicyError::key(&policy.file, "canary.sticky_header", e.to_string())
            })?,
        }),
    };
    let shadow = match &policy.shadow {
        None => None,
        Some(s) => {
            let challengers = s
                .versions
                .iter()
                .map(|v| version(v))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some(output) = &s.compare_output {
                for v in std::iter::once(&champion)
                    .chain(canary.as_ref().map(|c| &c.version))
                    .chain(&challengers)
                {
                    if !v.plugin.info().outputs.iter().any(|o| &o.name == output) {
                        return Err(PolicyError::key(
                            &policy.file,
                            "shadow.compare_output",
                            format!(
                                "version `{}` (plugin {}) has no output `{output}`",
                                v.name,
                                v.plugin.name()
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
                    format!("version `{}` (plugin {}) {what}", v.name, v.plugin.name()),
                )
            };
            let Some(spec) = v.plugin.info().inputs.iter().find(|s| s.name == rule.name) else {
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

/// Plugins by file, loaded at most once per build, and taken from the
/// previous snapshot when the file's bytes have not changed.
struct PluginSet {
    previous: HashMap<PathBuf, Arc<Plugin>>,
    loaded: HashMap<PathBuf, Result<Arc<Plugin>, String>>,
}

impl PluginSet {
    fn from_previous(previous: Option<&Snapshot>) -> Self {
        let previous = previous
            .into_iter()
            .flat_map(|s| s.models())
            .flat_map(|m| m.versions.values())
            .map(|v| (canonical(v.plugin.path()), v.plugin.clone()))
            .collect();
        PluginSet {
            previous,
            loaded: HashMap::new(),
        }
    }

    async fn get(
        &mut self,
        v: &VersionPolicy,
        runtime: &Runtime,
        report: &mut BuildReport,
    ) -> Result<Arc<Plugin>, String> {
        let key = canonical(&v.plugin);
        if let Some(done) = self.loaded.get(&key) {
            return done.clone();
        }
        let result = match std::fs::read(&v.plugin) {
            Err(e) => Err(format!("plugin {} cannot be read: {e}", v.plugin.display())),
            Ok(bytes) => match self.previous.get(&key) {
                Some(old) if old.content_hash() == crate::runtime::content_hash(&bytes) => {
                    report.reused.push(v.plugin.clone());
                    Ok(old.clone())
                }
                _ => {
                    report.compiled.push(v.plugin.clone());
                    runtime
                        .load_plugin_bytes(&v.plugin, bytes)
                        .await
                        .map_err(|e| format!("plugin {} {e}", v.plugin.display()))
                }
            },
        };
        self.loaded.insert(key, result.clone());
        result
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
