//! Live policy changes: owns the snapshot being served and replaces it.
//! The file watcher is `watch`.
//!
//! A reload reads, checks and loads the whole policy folder first (reusing
//! unchanged plugins and versions), then swaps the snapshot atomically:
//! requests in flight finish on the old one, new requests see the new one,
//! and no request fails because of the reload. A folder with any problem is
//! refused as a whole; the last good snapshot keeps serving. Reloads come
//! from the file watcher ([`watch`]), SIGHUP and `POST /admin/reload`, and
//! run one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::policy::{LoadOptions, PolicyError};
use crate::router::{self, Model, Snapshot};
use crate::runtime::{Backend, Runtime};
use crate::telemetry::Telemetry;

mod watch;
pub(crate) use watch::PolicyWatch;

/// The policies being served, and how to load them again.
pub struct Reloader {
    current: ArcSwap<Snapshot>,
    dir: PathBuf,
    options: LoadOptions,
    runtime: Arc<Runtime>,
    /// One reload at a time: two concurrent ones could swap in the older.
    lock: tokio::sync::Mutex<()>,
    /// Whether a reload may unload every model (a folder emptied, or
    /// synced halfway, is refused otherwise).
    pub(crate) allow_empty: bool,
}

/// What a successful reload changed.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub generation: u64,
    /// Human-readable changes, one per line; empty when nothing changed.
    pub changes: Vec<String>,
    /// Plugin files compiled by this reload.
    pub compiled: Vec<String>,
    /// Plugin files reused unchanged.
    pub reused: Vec<String>,
}

impl Reloader {
    /// Loads the folder for the first time (generation 1).
    pub async fn start(
        dir: &Path,
        options: LoadOptions,
        runtime: Arc<Runtime>,
    ) -> Result<Self, Vec<PolicyError>> {
        let (snapshot, _) = router::load(dir, &options, &runtime, None).await?;
        publish(runtime.telemetry(), None, &snapshot);
        Ok(Reloader {
            current: ArcSwap::from_pointee(snapshot),
            dir: dir.to_path_buf(),
            options,
            runtime,
            lock: tokio::sync::Mutex::new(()),
            allow_empty: false,
        })
    }

    /// The snapshot to serve a request from; keep it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The policy folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn telemetry(&self) -> &Arc<Telemetry> {
        self.runtime.telemetry()
    }

    /// The runtime that loads and runs the served plugins.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The plugin and model files the served policies name.
    pub(crate) fn artifact_files(&self) -> BTreeSet<PathBuf> {
        let snapshot = self.snapshot();
        let mut files = BTreeSet::new();
        for model in snapshot.models() {
            for version in model.versions.values() {
                match &version.backend {
                    Backend::Plugin { plugin, models } => {
                        files.insert(plugin.path().to_path_buf());
                        files.extend(models.iter().map(|(_, m)| m.path().to_path_buf()));
                    }
                    Backend::Onnx(model) => {
                        files.insert(model.path().to_path_buf());
                    }
                }
            }
        }
        files
    }

    /// Loads the folder again and, if it is valid and differs, serves it.
    /// `trigger` (`file`, `signal`, `admin`) labels the metric and the log.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, Vec<PolicyError>> {
        let _one_at_a_time = self.lock.lock().await;
        let previous = self.current.load_full();
        let loaded = router::load(&self.dir, &self.options, &self.runtime, Some(&previous))
            .await
            .and_then(|(next, built)| {
                let unloads_all =
                    next.models().next().is_none() && previous.models().next().is_some();
                if unloads_all && !self.allow_empty {
                    return Err(vec![PolicyError::file(
                        &self.dir,
                        "has no policy files left: a reload that would unload every model is refused \
                         (a folder emptied or synced halfway?); start the gateway with \
                         --allow-empty-policies to allow it",
                    )]);
                }
                Ok((next, built))
            });
        match loaded {
            Err(errors) => {
                self.runtime.telemetry().record_reload("error", trigger);
                tracing::error!(
                    trigger,
                    problems = errors.len(),
                    "policy reload refused; still serving generation {}:\n{}",
                    previous.generation,
                    errors
                        .iter()
                        .map(|e| format!("  {e}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                Err(errors)
            }
            Ok((next, built)) => {
                let changes = diff(&previous, &next);
                let paths = |p: Vec<PathBuf>| p.iter().map(|p| p.display().to_string()).collect();
                let generation = if changes.is_empty() {
                    previous.generation
                } else {
                    publish(self.runtime.telemetry(), Some(&previous), &next);
                    let generation = next.generation;
                    self.current.store(Arc::new(next));
                    generation
                };
                self.runtime.telemetry().record_reload("success", trigger);
                tracing::info!(trigger, generation, changes = ?changes, "policies reloaded");
                Ok(ReloadReport {
                    generation,
                    changes,
                    compiled: paths(built.compiled),
                    reused: paths(built.reused),
                })
            }
        }
    }

    /// Routes the served policies again, without reading the folder, so
    /// that a change of the routing overlay (a rollout's step) serves: the
    /// same versions, nothing read or compiled. A reload and this take
    /// turns.
    pub(crate) async fn reapply(&self, trigger: &'static str) -> Result<u64, Vec<PolicyError>> {
        let _one_at_a_time = self.lock.lock().await;
        let previous = self.current.load_full();
        let policies = previous
            .models()
            .map(|m| {
                let mut policy = m.policy.clone();
                if let Some(overlay) = &self.options.overlay {
                    overlay.0.apply(&mut policy);
                }
                policy
            })
            .collect();
        let next = router::reroute(&previous, policies)?;
        let changes = diff(&previous, &next);
        if changes.is_empty() {
            return Ok(previous.generation);
        }
        publish(self.runtime.telemetry(), Some(&previous), &next);
        let generation = next.generation;
        self.current.store(Arc::new(next));
        self.runtime.telemetry().record_reload("success", trigger);
        tracing::info!(trigger, generation, changes = ?changes, "routing changed");
        Ok(generation)
    }

    /// The effective routing of every model.
    pub fn view(&self) -> PoliciesView {
        let snapshot = self.snapshot();
        PoliciesView {
            generation: snapshot.generation,
            models: snapshot.models().map(|m| ModelView::of(m)).collect(),
        }
    }
}

/// Sets the metrics that describe the snapshot being served; zeroes the
/// canary gauges of the previous snapshot that no longer apply.
fn publish(telemetry: &Telemetry, previous: Option<&Snapshot>, next: &Snapshot) {
    telemetry.record_generation(next.generation);
    let canaries = |s: &Snapshot| -> BTreeSet<(String, String)> {
        s.models()
            .filter_map(|m| {
                m.canary
                    .as_ref()
                    .map(|c| (m.name.clone(), c.version.name.clone()))
            })
            .collect()
    };
    let now = canaries(next);
    for (model, version) in previous.map(canaries).unwrap_or_default() {
        if !now.contains(&(model.clone(), version.clone())) {
            telemetry.record_canary_percent(&model, &version, 0.0);
        }
    }
    for model in next.models() {
        if let Some(c) = &model.canary {
            telemetry.record_canary_percent(&model.name, &c.version.name, c.percent);
        }
    }
}

/// What differs between two snapshots, for operators.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<String> {
    let mut changes = Vec::new();
    for m in new.models() {
        let Ok(o) = old.model(&m.name) else {
            changes.push(format!(
                "model `{}` added (champion {})",
                m.name, m.champion.name
            ));
            continue;
        };
        let before = describe(o);
        let after = describe(m);
        for (what, b) in &before {
            match after.iter().find(|(w, _)| w == what) {
                Some((_, a)) if a != b => {
                    changes.push(format!("model `{}`: {what}: {b} -> {a}", m.name))
                }
                None => changes.push(format!("model `{}`: {what} removed (was {b})", m.name)),
                _ => {}
            }
        }
        for (what, a) in &after {
            if !before.iter().any(|(w, _)| w == what) {
                changes.push(format!("model `{}`: {what} added ({a})", m.name));
            }
        }
        // Too long to print; named when they change.
        if o.policy.schema != m.policy.schema {
            changes.push(format!("model `{}`: input rules changed", m.name));
        }
        if o.policy.monitoring != m.policy.monitoring {
            changes.push(format!("model `{}`: monitoring settings changed", m.name));
        }
        if o.policy.rollout != m.policy.rollout {
            changes.push(format!("model `{}`: rollout changed", m.name));
        }
    }
    for o in old.models() {
        if new.model(&o.name).is_err() {
            changes.push(format!("model `{}` removed", o.name));
        }
    }
    changes
}

/// A model's routing as (aspect, value) pairs that [`diff`] compares.
fn describe(m: &Model) -> Vec<(String, String)> {
    let mut aspects = vec![("champion".to_string(), m.champion.name.clone())];
    if let Some(d) = &m.policy.description {
        aspects.push(("description".into(), format!("{d:?}")));
    }
    for (what, share) in [("canary", &m.canary), ("control", &m.control)] {
        if let Some(c) = share {
            aspects.push((
                what.into(),
                format!(
                    "{} at {}% (sticky header {})",
                    c.version.name, c.percent, c.sticky_header
                ),
            ));
        }
    }
    if let Some(s) = &m.policy.shadow {
        aspects.push((
            "shadow".into(),
            format!(
                "{} at {}% sampling, {} slots, tolerance {}, compared output {}",
                s.versions.join(", "),
                s.sample_percent,
                s.max_concurrency,
                s.tolerance,
                s.compare_output.as_deref().unwrap_or("(default)")
            ),
        ));
    }
    for v in m.versions.values() {
        aspects.push((
            format!("version `{}`", v.name),
            format!(
                "{} ({:016x}), random {} (seed {}), clocks {}, timeout {} ms, memory {} MiB, concurrency {}+{}, {} calls per instance, {} in parallel, outputs up to {} MiB, breaker {} failures / {} ms, description {:?}",
                v.backend.describe(),
                v.backend.content_hash(),
                v.grants.random.as_str(),
                v.grants.seed,
                v.grants.clocks.as_str(),
                v.limits.timeout.as_millis(),
                v.limits.memory_bytes >> 20,
                v.limits.max_concurrency,
                v.limits.max_queue,
                v.limits.calls_per_instance,
                v.limits.max_parallel,
                v.limits.max_output_bytes >> 20,
                v.limits.breaker_failures,
                v.limits.breaker_cooldown.as_millis(),
                v.description.as_deref().unwrap_or("")
            ),
        ));
    }
    aspects
}

/// `GET /admin/policies`.
#[derive(Serialize)]
pub struct PoliciesView {
    pub generation: u64,
    pub models: Vec<ModelView>,
}

#[derive(Serialize)]
pub struct ModelView {
    pub model: String,
    pub file: String,
    pub champion: String,
    pub canary: Option<ShareView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<ShareView>,
    pub shadow: Option<ShadowView>,
    pub versions: Vec<VersionView>,
}

/// A canary's or a control group's share.
#[derive(Serialize)]
pub struct ShareView {
    pub version: String,
    pub percent: f64,
    pub sticky_header: String,
}

impl ShareView {
    fn of(share: &router::ShareRoute) -> Self {
        ShareView {
            version: share.version.name.clone(),
            percent: share.percent,
            sticky_header: share.sticky_header.to_string(),
        }
    }
}

#[derive(Serialize)]
pub struct ShadowView {
    pub versions: Vec<String>,
    pub sample_percent: f64,
    pub max_concurrency: u32,
    pub tolerance: f64,
    pub compare_output: Option<String>,
}

#[derive(Serialize)]
pub struct VersionView {
    pub name: String,
    /// The plugin's name, for a version a plugin serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plugin_file: Option<String>,
    /// The model file, for an ONNX-only version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub onnx_file: Option<String>,
    /// The models the plugin may run through wasi:nn: name -> file.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, String>,
    /// Each file's SHA-256 and what the plugin reports of itself.
    pub provenance: crate::runtime::Provenance,
    pub grants: GrantsView,
    pub timeout_ms: u128,
    pub memory_mebibytes: usize,
    pub max_concurrency: u32,
    pub max_queue: u32,
    pub calls_per_instance: u32,
    pub max_parallel: u32,
    pub max_output_mebibytes: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u128,
    /// Whether the circuit breaker is open now.
    pub circuit_open: bool,
}

/// What a version's plugin may read of random numbers and clocks.
#[derive(Serialize)]
pub struct GrantsView {
    pub random: &'static str,
    pub clocks: &'static str,
    /// The seed of `seeded` random numbers.
    pub seed: u64,
}

impl GrantsView {
    pub(crate) fn of(grants: &crate::contract::Grants) -> Self {
        GrantsView {
            random: grants.random.as_str(),
            clocks: grants.clocks.as_str(),
            seed: grants.seed,
        }
    }
}

impl ModelView {
    fn of(m: &Model) -> Self {
        ModelView {
            model: m.name.clone(),
            file: m.policy.file.display().to_string(),
            champion: m.champion.name.clone(),
            canary: m.canary.as_ref().map(ShareView::of),
            control: m.control.as_ref().map(ShareView::of),
            shadow: m.policy.shadow.as_ref().map(|s| ShadowView {
                versions: s.versions.clone(),
                sample_percent: s.sample_percent,
                max_concurrency: s.max_concurrency,
                tolerance: s.tolerance,
                compare_output: s.compare_output.clone(),
            }),
            versions: m
                .versions
                .values()
                .map(|v| VersionView {
                    name: v.name.clone(),
                    plugin: match &v.backend {
                        Backend::Plugin { plugin, .. } => Some(plugin.name().to_string()),
                        Backend::Onnx(_) => None,
                    },
                    plugin_file: match &v.backend {
                        Backend::Plugin { plugin, .. } => Some(plugin.path().display().to_string()),
                        Backend::Onnx(_) => None,
                    },
                    onnx_file: match &v.backend {
                        Backend::Plugin { .. } => None,
                        Backend::Onnx(model) => Some(model.path().display().to_string()),
                    },
                    models: match &v.backend {
                        Backend::Plugin { models, .. } => models
                            .iter()
                            .map(|(name, m)| (name.clone(), m.path().display().to_string()))
                            .collect(),
                        Backend::Onnx(_) => BTreeMap::new(),
                    },
                    provenance: v.backend.provenance(),
                    grants: GrantsView::of(&v.grants),
                    timeout_ms: v.limits.timeout.as_millis(),
                    memory_mebibytes: v.limits.memory_bytes >> 20,
                    max_concurrency: v.limits.max_concurrency,
                    max_queue: v.limits.max_queue,
                    calls_per_instance: v.limits.calls_per_instance,
                    max_parallel: v.limits.max_parallel,
                    max_output_mebibytes: v.limits.max_output_bytes >> 20,
                    breaker_failures: v.limits.breaker_failures,
                    breaker_cooldown_ms: v.limits.breaker_cooldown.as_millis(),
                    circuit_open: v.breaker.is_open(),
                })
                .collect(),
        }
    }
}
