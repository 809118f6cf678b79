//! The routing snapshot: every model, its versions and their loaded plugins,
//! built in full from the policies before it serves (so a broken policy is
//! never half-applied), immutable afterwards, and shared behind an `Arc`.
//!
//! It answers "which version serves this request?" — pinned, canary (sticky
//! and monotone in the percent) or champion — and owns each version's
//! admission. It does not decode requests or run plugins.

mod admission;
pub mod breaker;
mod build;
mod metrics;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName};
use tokio::sync::{Semaphore, SemaphorePermit};

use admission::Admission;
pub use admission::AdmissionError;
pub use build::load;
pub(crate) use build::reroute;
pub use metrics::VersionMetrics;

use crate::contract::{CallLimits, PluginError, fnv1a64, mix64};
use crate::policy::{Limits, ModelPolicy};
use crate::runtime::{Backend, InstancePool};
use crate::telemetry::LogLimiter;
use crate::tensor::Tensor;

/// All models, ready to serve.
pub struct Snapshot {
    models: BTreeMap<String, Arc<Model>>,
    /// Counts successful loads: 1 for the first, +1 per applied reload.
    pub generation: u64,
}

/// A model: its versions, its champion, and its traffic policy.
pub struct Model {
    pub name: String,
    /// The checked policy this model was built from.
    pub policy: ModelPolicy,
    pub champion: Arc<Version>,
    pub versions: BTreeMap<String, Arc<Version>>,
    /// The bottom `percent` of the sticky points, sent to the canary.
    pub canary: Option<ShareRoute>,
    /// The top `percent` of the sticky points, held on a baseline version
    /// (see [`crate::policy::Control`]).
    pub control: Option<ShareRoute>,
    pub shadow: Option<ShadowRoute>,
    /// The declared inputs, with datatypes and shapes filled in from the
    /// plugins when the policy says `from_plugin`.
    pub schema: Option<crate::policy::Schema>,
    /// Data monitoring of the declared features, per version name.
    pub monitors: BTreeMap<String, Arc<crate::monitor::Monitor>>,
}

/// A sticky share of unpinned traffic that goes to another version than
/// the champion (the canary's, or the control group's).
pub struct ShareRoute {
    pub version: Arc<Version>,
    pub percent: f64,
    pub sticky_header: HeaderName,
}

/// Challengers that get a copy of a sample of the answered traffic.
pub struct ShadowRoute {
    pub versions: Vec<Arc<Version>>,
    pub sample_percent: f64,
    pub tolerance: f64,
    /// The output compared; see [`crate::policy::Shadow::compare_output`].
    pub compare_output: Option<String>,
    /// Shadow calls of this model in flight; when none is free, a shadow
    /// call is dropped (and counted), never queued.
    pub slots: Arc<Semaphore>,
}

/// One servable version of a model.
pub struct Version {
    pub model: String,
    pub name: String,
    /// The name as the value of the header that names the version of an
    /// answer, made once (`None` for a name a header cannot carry).
    pub name_header: Option<http::HeaderValue>,
    pub description: Option<String>,
    /// What answers: a plugin (with its models) or an ONNX model.
    pub backend: Backend,
    pub limits: Limits,
    /// What its plugin may read of random numbers and clocks.
    pub grants: crate::contract::Grants,
    /// The output whose values are class labels (the first BYTES output the
    /// plugin declares), counted per label in metrics.
    pub label_output: Option<String>,
    /// Its request, plugin-call and prediction series (predicted labels
    /// bounded, so a plugin cannot grow the metric series).
    pub metrics: VersionMetrics,
    /// Rate-limits the warnings this version's failures log.
    pub error_log: LogLimiter,
    admission: Admission,
    /// Takes the version out of service after repeated failures.
    pub breaker: breaker::Breaker,
    /// Its share of the process's sandbox memory budget (half of it, set
    /// on first use by the pipeline that owns the budget).
    pub memory_share: std::sync::OnceLock<Arc<Semaphore>>,
    /// Its share of the bulk pool's queue (half of it, set on first use).
    pub bulk_share: std::sync::OnceLock<Arc<Semaphore>>,
    /// The expected CPU time of a shadow copy to this version (a moving
    /// average, nanoseconds), reserved from the shadow budget at dispatch.
    pub shadow_cost_ns: std::sync::atomic::AtomicU64,
    /// Its share of the cores (`max_parallel`).
    pub gate: crate::cpu::Gate,
    /// Plugin instances kept between calls (`calls_per_instance`).
    pub instances: InstancePool,
}

/// Where a request goes, and why.
pub struct Routed<'a> {
    pub model: &'a Arc<Model>,
    pub version: &'a Arc<Version>,
    pub route: Route,
    /// The canary's draw, for an unpinned request of a model with a canary.
    pub draw: Option<Draw>,
}

/// Why an unpinned request of a model with a canary or a control group
/// went where it went: its point in `[0, 100)` (the sticky key's, see
/// [`sticky_point`], or a random one) against the canary's percent (0
/// without a canary) and the control group's.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Draw {
    pub point: f64,
    pub percent: f64,
    /// The control group's percent: points at or above `100 - it` are
    /// held on its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_percent: Option<f64>,
    /// Whether the point came from the sticky header.
    pub sticky: bool,
}

/// How a request reached its version: the `route` label of metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The model's default version.
    Champion,
    /// The canary share of unpinned traffic.
    Canary,
    /// `/versions/{version}` in the URL.
    Pinned,
    /// A copy of an answered request, sent to a challenger.
    Shadow,
    /// The control group's share, held on its baseline version.
    Control,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Champion => "champion",
            Route::Canary => "canary",
            Route::Pinned => "pinned",
            Route::Shadow => "shadow",
            Route::Control => "control",
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

    /// The version that serves a request: the pinned one if the URL names
    /// it, else the canary or the champion (see [`Model::choose`]), with
    /// the canary's draw when there was one.
    pub fn route(
        &self,
        model: &str,
        pinned: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Routed<'_>, RouteError> {
        let model = self.model(model)?;
        let (version, route, draw) = match pinned {
            Some(version) => (model.version(version)?, Route::Pinned, None),
            None => model.choose(headers),
        };
        Ok(Routed {
            model,
            version,
            route,
            draw,
        })
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

    /// Control group, canary or champion for an unpinned request. With
    /// the sticky header, the choice is a pure function of model and key
    /// (the same on every replica and after restarts); without it, a
    /// fresh random draw.
    pub fn choose(&self, headers: &HeaderMap) -> (&Arc<Version>, Route, Option<Draw>) {
        let header = match (&self.canary, &self.control) {
            (Some(canary), _) => &canary.sticky_header,
            (None, Some(control)) => &control.sticky_header,
            (None, None) => return (&self.champion, Route::Champion, None),
        };
        let key = headers.get(header);
        let point = match key {
            Some(key) => sticky_point(&self.name, key.as_bytes()),
            None => random_point(),
        };
        let draw = Some(Draw {
            point,
            percent: self.canary.as_ref().map_or(0.0, |c| c.percent),
            control_percent: self.control.as_ref().map(|c| c.percent),
            sticky: key.is_some(),
        });
        let (version, route) = self.choose_at(point);
        (version, route, draw)
    }

    /// Control group, canary or champion for an unpinned request whose
    /// point (see [`sticky_point`]) is `point`: the control group holds
    /// the top of the points, the canary the bottom.
    pub fn choose_at(&self, point: f64) -> (&Arc<Version>, Route) {
        if let Some(control) = &self.control
            && point >= 100.0 - control.percent
        {
            return (&control.version, Route::Control);
        }
        match &self.canary {
            Some(canary) if point < canary.percent => (&canary.version, Route::Canary),
            _ => (&self.champion, Route::Champion),
        }
    }
}

/// A routing key's point in `[0, 100)`: FNV-1a over the model name and the
/// key, then a 64-bit finalizer so similar keys spread evenly. A key goes to
/// the canary when its point is below the percent, so raising the percent
/// only ever moves keys from champion to canary. Stable across processes,
/// machines and versions of this program: do not change it.
pub fn sticky_point(model: &str, key: &[u8]) -> f64 {
    let hash = fnv1a64(model.bytes().chain([0xff]).chain(key.iter().copied()));
    unit_interval(mix64(hash)) * 100.0
}

/// A uniformly random point in `[0, 100)`, from a per-thread generator.
pub fn random_point() -> f64 {
    unit_interval(next_random()) * 100.0
}

/// Whether a request is sampled at `percent`.
pub fn sampled(percent: f64) -> bool {
    percent >= 100.0 || random_point() < percent
}

/// The top 53 bits as a float in `[0, 1)`.
fn unit_interval(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// splitmix64, seeded per thread from the process's random hasher keys.
fn next_random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&h as *const _ as usize);
            h.finish()
        });
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        mix64(next)
    })
}

impl Version {
    /// Waits (boundedly) for a slot to run this version's plugin.
    pub async fn admit(&self, deadline: Instant) -> Result<SemaphorePermit<'_>, AdmissionError> {
        self.admission.admit(deadline).await
    }

    /// A slot only if one is free now.
    pub fn try_admit(&self) -> Option<SemaphorePermit<'_>> {
        self.admission.try_admit()
    }

    /// `Some` when a request would be refused now: every slot busy and the
    /// queue full. Checked before a request's body is read.
    pub fn queue_full(&self) -> Option<AdmissionError> {
        self.admission.full()
    }

    /// One inference by this version's backend under `limits`, within the
    /// version's share of the cores.
    pub async fn infer(
        &self,
        inputs: &[Tensor],
        limits: CallLimits,
    ) -> Result<Vec<Tensor>, PluginError> {
        self.backend
            .infer(inputs, limits, &self.instances, &self.gate)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_points_are_stable_and_spread() {
        // Fixed values: a change here moves users between versions.
        assert_eq!(
            sticky_point("time-to-merge", b"user-1"),
            sticky_point("time-to-merge", b"user-1")
        );
        let golden = sticky_point("time-to-merge", b"user-1");
        assert!((0.0..100.0).contains(&golden));
        // Golden values: the points of these keys, pinned.
        let points: Vec<f64> = [&b"user-1"[..], b"user-2", b"author-4711"]
            .iter()
            .map(|k| sticky_point("time-to-merge", k))
            .collect();
        assert_eq!(
            points,
            [94.85020457652436, 15.569226027794391, 49.921901689425006]
        );
        assert_ne!(
            sticky_point("time-to-merge", b"user-1"),
            sticky_point("other-model", b"user-1")
        );
        let below_10 = (0..100_000)
            .filter(|i| sticky_point("m", format!("key-{i}").as_bytes()) < 10.0)
            .count();
        assert!(
            (9_500..10_500).contains(&below_10),
            "{below_10} of 100000 below 10"
        );
    }

    #[test]
    fn random_points_are_uniform() {
        let below_25 = (0..100_000).filter(|_| random_point() < 25.0).count();
        assert!((24_000..26_000).contains(&below_25), "{below_25}");
        assert!(sampled(100.0));
        assert!(!(0..1000).any(|_| sampled(0.0)));
    }
}
