//! The routing snapshot: every model, its versions and their loaded plugins,
//! built in full from the policies before it serves (so a broken policy is
//! never half-applied), immutable afterwards, and shared behind an `Arc`.
//!
//! It answers "which version serves this request?" and owns each version's
//! admission (concurrency limit and bounded queue). It does not decode
//! requests or run plugins.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::policy::{self, Limits, LoadOptions, ModelPolicy, PolicyError};
use crate::runtime::{Plugin, Runtime};

/// All models, ready to serve.
pub struct Snapshot {
    models: BTreeMap<String, Arc<Model>>,
}

/// A model: its versions and which one is champion.
pub struct Model {
    pub name: String,
    pub description: Option<String>,
    pub policy_file: PathBuf,
    pub champion: Arc<Version>,
    pub versions: BTreeMap<String, Arc<Version>>,
}

/// One servable version of a model.
pub struct Version {
    pub model: String,
    pub name: String,
    pub description: Option<String>,
    pub plugin: Arc<Plugin>,
    pub limits: Limits,
    /// Rate-limits the warnings this version's failures log.
    pub error_log: crate::telemetry::LogLimiter,
    admission: Admission,
}

/// How a request reached its version: the `route` label of metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The model's default version.
    Champion,
    /// `/versions/{version}` in the URL.
    Pinned,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Champion => "champion",
            Route::Pinned => "pinned",
        }
    }
}

/// A request for something the snapshot does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    UnknownModel {
        model: String,
    },
    UnknownVersion {
        model: String,
        version: String,
        known: Vec<String>,
    },
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::UnknownModel { model } => write!(f, "unknown model `{model}`"),
            RouteError::UnknownVersion {
                model,
                version,
                known,
            } => write!(
                f,
                "model `{model}` has no version `{version}` (versions: {})",
                known.join(", ")
            ),
        }
    }
}

impl Snapshot {
    /// An empty snapshot: serves nothing.
    pub fn empty() -> Self {
        Snapshot {
            models: BTreeMap::new(),
        }
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.values()
    }

    pub fn model(&self, name: &str) -> Result<&Arc<Model>, RouteError> {
        self.models
            .get(name)
            .ok_or_else(|| RouteError::UnknownModel {
                model: name.to_string(),
            })
    }

    /// The version that serves a request: the pinned one if the URL names it,
    /// else the champion.
    pub fn route(
        &self,
        model: &str,
        pinned: Option<&str>,
    ) -> Result<(&Arc<Version>, Route), RouteError> {
        let model = self.model(model)?;
        match pinned {
            None => Ok((&model.champion, Route::Champion)),
            Some(version) => Ok((model.version(version)?, Route::Pinned)),
        }
    }
}

impl Model {
    pub fn version(&self, name: &str) -> Result<&Arc<Version>, RouteError> {
        self.versions
            .get(name)
            .ok_or_else(|| RouteError::UnknownVersion {
                model: self.name.clone(),
                version: name.to_string(),
                known: self.versions.keys().cloned().collect(),
            })
    }
}

/// Reads, checks and loads a policy folder into a snapshot: every check that
/// serving needs, including compiling each plugin and calling its `info()`.
/// `gateway check` runs exactly this.
pub async fn load(
    dir: &std::path::Path,
    options: &LoadOptions,
    runtime: &Runtime,
) -> Result<Snapshot, Vec<PolicyError>> {
    let policies = policy::load_dir(dir, options)?;
    build(policies, runtime).await
}

/// Loads the plugins the policies name (each file once) and assembles the
/// snapshot; all errors are reported at the policy key that caused them.
pub async fn build(
    policies: Vec<ModelPolicy>,
    runtime: &Runtime,
) -> Result<Snapshot, Vec<PolicyError>> {
    let mut plugins: HashMap<PathBuf, Result<Arc<Plugin>, String>> = HashMap::new();
    let mut errors = Vec::new();
    let mut models = BTreeMap::new();
    for policy in policies {
        let mut versions = BTreeMap::new();
        for v in policy.versions {
            let key = std::fs::canonicalize(&v.plugin).unwrap_or_else(|_| v.plugin.clone());
            if !plugins.contains_key(&key) {
                let loaded = runtime
                    .load_plugin(&v.plugin)
                    .await
                    .map_err(|e| format!("plugin {} {e}", v.plugin.display()));
                plugins.insert(key.clone(), loaded);
            }
            let plugin = match &plugins[&key] {
                Ok(plugin) => plugin.clone(),
                Err(e) => {
                    errors.push(PolicyError::at(&v.plugin_location, e.clone()));
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
            let version = Version {
                model: policy.model.clone(),
                name: v.name.clone(),
                description: v.description,
                plugin,
                limits: v.limits,
                error_log: Default::default(),
                admission: Admission::new(v.limits.max_concurrency, v.limits.max_queue),
            };
            versions.insert(v.name, Arc::new(version));
        }
        // A version that failed to load has been reported; keep checking the rest.
        let Some(champion) = versions.get(&policy.champion).cloned() else {
            continue;
        };
        let model = Model {
            name: policy.model.clone(),
            description: policy.description,
            policy_file: policy.file,
            champion,
            versions,
        };
        models.insert(policy.model, Arc::new(model));
    }
    if errors.is_empty() {
        Ok(Snapshot { models })
    } else {
        Err(errors)
    }
}

/// Why a request was not admitted to its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionError {
    /// Every slot is busy and the queue is full.
    QueueFull { running: u32, queued: u32 },
    /// The request waited in the queue until its deadline.
    QueueTimeout { running: u32 },
}

impl fmt::Display for AdmissionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmissionError::QueueFull { running, queued } => write!(
                f,
                "is at its concurrency limit ({running} running, {queued} queued)"
            ),
            AdmissionError::QueueTimeout { running } => write!(
                f,
                "is at its concurrency limit ({running} running) and no slot freed before the deadline"
            ),
        }
    }
}

/// At most `max_concurrency` calls run; at most `max_queue` more wait, each
/// no longer than its deadline. Everything else is refused at once, so a
/// flood against one version never builds an unbounded queue.
struct Admission {
    slots: Semaphore,
    max_concurrency: u32,
    waiting: AtomicU32,
    max_queue: u32,
}

impl Admission {
    fn new(max_concurrency: u32, max_queue: u32) -> Self {
        Admission {
            slots: Semaphore::new(max_concurrency as usize),
            max_concurrency,
            waiting: AtomicU32::new(0),
            max_queue,
        }
    }

    async fn admit(&self, deadline: Instant) -> Result<SemaphorePermit<'_>, AdmissionError> {
        if let Ok(permit) = self.slots.try_acquire() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = LeaveQueue(&self.waiting);
        if queued >= self.max_queue {
            return Err(AdmissionError::QueueFull {
                running: self.max_concurrency,
                queued,
            });
        }
        match tokio::time::timeout_at(deadline.into(), self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout is the only way out.
            _ => Err(AdmissionError::QueueTimeout {
                running: self.max_concurrency,
            }),
        }
    }
}

struct LeaveQueue<'a>(&'a AtomicU32);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Version {
    /// Waits (boundedly) for a slot to run this version's plugin.
    pub async fn admit(&self, deadline: Instant) -> Result<SemaphorePermit<'_>, AdmissionError> {
        self.admission.admit(deadline).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn admission_bounds_running_and_waiting() {
        let admission = Admission::new(1, 1);
        let far = Instant::now() + Duration::from_secs(10);
        let first = admission.admit(far).await.unwrap();
        // The second waits in the queue; the third finds the queue full.
        let second = admission.admit(far);
        tokio::pin!(second);
        assert!(futures_poll_once(second.as_mut()).await.is_none());
        let third = admission.admit(far).await;
        assert_eq!(
            third.unwrap_err(),
            AdmissionError::QueueFull {
                running: 1,
                queued: 1
            }
        );
        drop(first);
        assert!(second.await.is_ok());
        assert_eq!(admission.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn admission_waits_no_longer_than_the_deadline() {
        let admission = Admission::new(1, 4);
        let _held = admission
            .admit(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        let waited = admission.admit(soon).await;
        assert_eq!(
            waited.unwrap_err(),
            AdmissionError::QueueTimeout { running: 1 }
        );
        assert!(Instant::now() >= soon);
        assert_eq!(admission.waiting.load(Ordering::Acquire), 0);
    }

    /// Polls a future once; `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
