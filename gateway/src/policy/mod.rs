//! Routing policies: the TOML files operators edit, one per model.
//!
//! This module parses and checks them strictly (unknown keys, missing or
//! unresolvable plugins, a champion that is not a version, two files claiming
//! one model, limits out of range) and resolves plugin names to files. It
//! reports every problem it finds, each naming the file, line and key. It
//! does not compile plugins: the router does that when it builds a snapshot.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::contract::{ClockGrant, Grants, RandomGrant};

mod schema;
pub use schema::{Allowed, FeatureRule, InputRule, Mode, Monitoring, Reference, Schema};

/// Limits of one model version; a version's own table overrides its model's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deadline for a request, from routing to the plugin's answer.
    pub timeout: Duration,
    /// Cap on the plugin's linear memory, summed over its memories.
    pub memory_bytes: usize,
    /// Plugin calls of this version that may run at once.
    pub max_concurrency: u32,
    /// Requests that may wait for a free slot beyond those running.
    pub max_queue: u32,
    /// Calls one plugin instance serves before it is thrown away. 1 (the
    /// default) gives every call a fresh instance; more lets consecutive
    /// calls share an instance's memory (see the README's "Instance reuse").
    pub calls_per_instance: u32,
    /// The version's calls that execute at the same moment (plugin code or
    /// ONNX computation): its share of the cores. Default: half the
    /// machine's cores, at least one.
    pub max_parallel: u32,
    /// Largest total size of one answer's outputs.
    pub max_output_bytes: usize,
    /// Plugin failures in a row that open the circuit breaker; 0: never.
    pub breaker_failures: u32,
    /// How long an open breaker refuses before it lets a probe through.
    pub breaker_cooldown: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_millis(1000),
            memory_bytes: 64 << 20,
            max_concurrency: 64,
            max_queue: 64,
            calls_per_instance: 1,
            max_parallel: crate::cpu::default_parallel(),
            max_output_bytes: 16 << 20,
            breaker_failures: 20,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// A checked policy for one model.
#[derive(Clone, Debug)]
pub struct ModelPolicy {
    pub file: PathBuf,
    /// The file's SHA-256, as it was read.
    pub sha256: crate::contract::Sha256,
    pub model: String,
    pub description: Option<String>,
    pub champion: String,
    pub versions: Vec<VersionPolicy>,
    pub canary: Option<Canary>,
    /// A share held on a baseline version (`[control]`).
    pub control: Option<Control>,
    pub shadow: Option<Shadow>,
    /// Declared inputs and value rules (`[validation]`, `[[inputs]]`).
    pub schema: Option<Schema>,
    /// How data monitoring summarizes the declared features.
    pub monitoring: Monitoring,
    /// What the decision log keeps of the requests' data (`[record]`).
    pub record: Record,
    /// A progressive rollout of a candidate version (`[rollout]`).
    pub rollout: Option<Rollout>,
}

/// A progressive rollout (`[rollout]`): the candidate serves a growing
/// share of the unpinned traffic, step by step, as long as its gates pass
/// against the champion over the step; after the last step it becomes the
/// champion, and a failed gate takes its share back to 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    pub candidate: String,
    /// The champion the file names (a rollout is judged against it, and a
    /// promotion serves the candidate in its place).
    pub champion: String,
    /// The candidate's percent at each step, increasing.
    pub steps: Vec<f64>,
    /// The least time a step lasts.
    pub step_time: Duration,
    /// The least requests the candidate answers in a step.
    pub step_requests: u64,
    /// The request header that keeps a caller on one side (lower-case).
    pub sticky_header: String,
    pub gates: Gates,
}

/// What a rollout's candidate must show against the champion over a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gates {
    /// The candidate's share of failed answers (a 5xx, or its plugin
    /// refusing the inputs) may exceed the champion's by at most this
    /// (0.01: one percentage point).
    pub max_error_rate_increase: f64,
    /// The candidate's p99 latency may be at most this times the
    /// champion's (latencies under 1 ms count as 1 ms): more than 1 % of
    /// its requests, and at least two, slower than that fail the gate.
    pub max_p99_ratio: f64,
    /// When set, the candidate's accuracy on ground truth minus the
    /// champion's must be at least this (-0.02: two points worse at most);
    /// a step then lasts until each side has `min_feedback` judged rows.
    pub min_accuracy_change: Option<f64>,
    pub min_feedback: u64,
    /// When set, the share of the candidate's shadow copies (of requests
    /// the champion served) that agree with the champion must be at
    /// least this; a step then lasts until `step_requests` were compared.
    pub min_shadow_agreement: Option<f64>,
    /// When set, the population stability index of the labels the
    /// candidate predicted against the champion's over the step must be
    /// at most this (0.1: the usual "no significant shift").
    pub max_prediction_psi: Option<f64>,
    /// When set, for every declared feature with a reference, the
    /// population stability index of the values the candidate saw against
    /// those the champion saw over the step (on the reference's bins)
    /// must be at most this.
    pub max_input_psi: Option<f64>,
}

impl Rollout {
    /// The whole rollout as the policy states it: a change of any of it
    /// restarts a rollout that is running, paused or failed. Written out
    /// field by field (never `Debug`), so it stays the same across
    /// versions of the gateway; a field added later must leave the text
    /// of its default unchanged.
    pub fn fingerprint(&self) -> String {
        let g = &self.gates;
        let text = format!(
            "rollout/1 {} {} {:?} {} {} {} {} {} {:?} {} {:?}",
            self.identity(),
            self.sticky_header,
            self.steps,
            self.step_time.as_nanos(),
            self.step_requests,
            g.max_error_rate_increase,
            g.max_p99_ratio,
            g.min_feedback,
            g.min_accuracy_change,
            "shadow",
            g.min_shadow_agreement,
        );
        // Added later: keeps every older rollout's fingerprint.
        let text = match g.max_prediction_psi {
            Some(psi) => format!("{text} prediction_psi {psi:?}"),
            None => text,
        };
        let text = match g.max_input_psi {
            Some(psi) => format!("{text} input_psi {psi:?}"),
            None => text,
        };
        crate::contract::Sha256::of(text.as_bytes()).to_string()
    }

    /// What a promotion is of: the candidate and the champion. Only a
    /// change of these restarts a promoted rollout (a gate tuned after
    /// the promotion does not demote the candidate).
    pub fn identity(&self) -> String {
        format!("{} over {}", self.candidate, self.champion)
    }
}

/// What the decision log keeps of a model's requests (`[record]`):
/// digests of every request's inputs and outputs, and for a sample of
/// them the tensors themselves, so `gateway replay` and `gateway what-if`
/// can run them again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Record {
    /// Share of requests recorded with their inputs and outputs, 0 to 100.
    pub sample_percent: f64,
    /// A sampled request whose inputs and outputs together are larger
    /// is recorded by digest only (and says so).
    pub max_bytes: usize,
}

/// The largest `record.max_kib`: a record must stay well below what the
/// log reads back of its last line (1 MiB), base64 included.
pub const MAX_RECORD_KIB: usize = 512;

impl Default for Record {
    fn default() -> Self {
        Record {
            sample_percent: 0.0,
            max_bytes: 64 << 10,
        }
    }
}

/// A share of a model's traffic sent to one version instead of the champion.
#[derive(Clone, Debug, PartialEq)]
pub struct Canary {
    pub version: String,
    /// 0 to 100; fractions allowed.
    pub percent: f64,
    /// The request header whose value keeps a caller on one version
    /// (lower-case).
    pub sticky_header: String,
}

/// A control group (`[control]`): a sticky share of the unpinned traffic
/// held on a baseline version whatever the champion and the canary, so
/// every version's ground truth can be compared with it. Its share is the
/// top of the sticky points (`[100 - percent, 100)`); the canary's is the
/// bottom.
#[derive(Clone, Debug, PartialEq)]
pub struct Control {
    pub version: String,
    /// 0 to 100 (below 100).
    pub percent: f64,
    /// The header that keeps a caller in or out of the group (the canary's
    /// or rollout's, when there is one: one point per caller).
    pub sticky_header: String,
}

/// Challenger versions that see a copy of a sample of the traffic.
#[derive(Clone, Debug, PartialEq)]
pub struct Shadow {
    pub versions: Vec<String>,
    /// Share of answered requests copied to the challengers, 0 to 100.
    pub sample_percent: f64,
    /// Shadow calls of this model in flight at once; more are dropped.
    pub max_concurrency: u32,
    /// Largest absolute difference at which numeric outputs still agree.
    pub tolerance: f64,
    /// The output compared; by default the first BYTES output (the label),
    /// else every output.
    pub compare_output: Option<String>,
}

/// The header that keeps a caller on one side of a canary split.
pub const DEFAULT_STICKY_HEADER: &str = "x-routing-key";

/// One version of a model and what serves it.
#[derive(Clone, Debug)]
pub struct VersionPolicy {
    pub name: String,
    pub description: Option<String>,
    pub serving: Serving,
    /// Where `plugin` or `onnx` is set, for errors found later (compiling,
    /// `info()`, loading the model).
    pub serving_location: Location,
    /// ONNX models the plugin may run through wasi:nn, by the name it loads
    /// them with (`[versions.<v>.models]`); empty for an ONNX-only version.
    pub models: Vec<ModelFile>,
    pub limits: Limits,
    /// What its plugin may read of random numbers and clocks.
    pub grants: Grants,
}

/// What serves a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serving {
    /// A plugin: the resolved `.wasm` file.
    Plugin(PathBuf),
    /// An ONNX model served directly: the resolved `.onnx` file.
    Onnx(PathBuf),
}

/// An ONNX model a version's plugin may load by name.
#[derive(Clone, Debug)]
pub struct ModelFile {
    pub name: String,
    pub path: PathBuf,
    pub location: Location,
}

/// A place in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The dotted key, e.g. `versions.v1.plugin`.
    pub key: String,
}

/// A problem in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based; `None` for problems with the file as a whole.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn file(file: &Path, message: impl Into<String>) -> Self {
        PolicyError {
            file: file.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about a key whose place in the file is no longer known.
    pub fn key(file: &Path, key: &str, message: impl Into<String>) -> Self {
        PolicyError {
            key: Some(key.to_string()),
            ..PolicyError::file(file, message)
        }
    }

    /// An error at a known place in a file.
    pub fn at(location: &Location, message: impl Into<String>) -> Self {
        PolicyError {
            file: location.file.clone(),
            line: Some(location.line),
            column: Some(location.column),
            key: Some(location.key.clone()),
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        match &self.key {
            Some(key) => write!(f, ": `{key}`: {}", self.message),
            None => write!(f, ": {}", self.message),
        }
    }
}

impl std::error::Error for PolicyError {}

/// What a policy folder is checked against.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Where bare plugin names (`plugin = "ttm-rules-v1"`) are looked up, in
    /// order, as `<dir>/<name>.wasm`.
    pub plugin_dirs: Vec<PathBuf>,
    /// The largest `memory_mebibytes` a policy may ask for.
    pub max_memory_bytes: usize,
    /// What changes the routing of checked policies before they serve
    /// (the rollouts' state); none for `gateway check`.
    pub overlay: Option<Overlay>,
}

/// Changes the routing (champion, canary) of a checked policy before it
/// is built: a rollout's step or promotion.
pub trait Route: Send + Sync {
    fn apply(&self, policy: &mut ModelPolicy);
}

/// A shared [`Route`].
#[derive(Clone)]
pub struct Overlay(pub std::sync::Arc<dyn Route>);

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Overlay")
    }
}

// ---- The file format. Every table refuses unknown keys. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    model: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    champion: Spanned<String>,
    versions: Spanned<BTreeMap<Spanned<String>, VersionTable>>,
    #[serde(default)]
    limits: Option<LimitsTable>,
    #[serde(default)]
    grants: Option<GrantsTable>,
    #[serde(default)]
    canary: Option<CanaryTable>,
    #[serde(default)]
    control: Option<ControlTable>,
    #[serde(default)]
    shadow: Option<ShadowTable>,
    #[serde(default)]
    validation: Option<schema::ValidationTable>,
    #[serde(default)]
    inputs: Vec<schema::InputTable>,
    #[serde(default)]
    monitoring: Option<schema::MonitoringTable>,
    #[serde(default)]
    record: Option<RecordTable>,
    #[serde(default)]
    rollout: Option<RolloutTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutTable {
    candidate: Spanned<String>,
    #[serde(default)]
    steps: Option<Spanned<Vec<f64>>>,
    #[serde(default)]
    step_seconds: Option<Spanned<f64>>,
    #[serde(default)]
    step_requests: Option<Spanned<i64>>,
    #[serde(default)]
    sticky_header: Option<Spanned<String>>,
    #[serde(default)]
    max_error_rate_increase: Option<Spanned<f64>>,
    #[serde(default)]
    max_p99_ratio: Option<Spanned<f64>>,
    #[serde(default)]
    min_accuracy_change: Option<Spanned<f64>>,
    #[serde(default)]
    min_feedback: Option<Spanned<i64>>,
    #[serde(default)]
    min_shadow_agreement: Option<Spanned<f64>>,
    #[serde(default)]
    max_prediction_psi: Option<Spanned<f64>>,
    #[serde(default)]
    max_input_psi: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordTable {
    #[serde(default)]
    sample_percent: Option<Spanned<f64>>,
    #[serde(default)]
    max_kib: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CanaryTable {
    version: Spanned<String>,
    percent: Spanned<f64>,
    #[serde(default)]
    sticky_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlTable {
    version: Spanned<String>,
    percent: Spanned<f64>,
    #[serde(default)]
    sticky_header: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowTable {
    versions: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    sample_percent: Option<Spanned<f64>>,
    #[serde(default)]
    max_concurrency: Option<Spanned<i64>>,
    #[serde(default)]
    tolerance: Option<Spanned<f64>>,
    #[serde(default)]
    compare_output: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionTable {
    #[serde(default)]
    plugin: Option<Spanned<String>>,
    #[serde(default)]
    onnx: Option<Spanned<String>>,
    #[serde(default)]
    models: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    limits: Option<LimitsTable>,
    #[serde(default)]
    grants: Option<GrantsTable>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GrantsTable {
    random: Option<Spanned<String>>,
    clocks: Option<Spanned<String>>,
    seed: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsTable {
    timeout_ms: Option<Spanned<i64>>,
    memory_mebibytes: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    max_queue: Option<Spanned<i64>>,
    calls_per_instance: Option<Spanned<i64>>,
    max_parallel: Option<Spanned<i64>>,
    max_output_mebibytes: Option<Spanned<i64>>,
    breaker_failures: Option<Spanned<i64>>,
    breaker_cooldown_ms: Option<Spanned<i64>>,
}

/// Reads every `*.toml` file in `dir`, checks each and all of them together,
/// and returns the policies or every error found.
pub fn load_dir(dir: &Path, options: &LoadOptions) -> (Vec<ModelPolicy>, Vec<PolicyError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return (
                Vec::new(),
                vec![PolicyError::file(
                    dir,
                    format!("cannot read the policy folder: {e}"),
                )],
            );
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();

    let mut policies = Vec::new();
    let mut errors = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => match parse(file, &text, options) {
                Ok(policy) => policies.push(policy),
                Err(mut e) => errors.append(&mut e),
            },
            Err(e) => errors.push(PolicyError::file(file, format!("cannot be read: {e}"))),
        }
    }

    // One model, one file: the second one is dropped with its error.
    let mut duplicates = Vec::new();
    for (i, policy) in policies.iter().enumerate() {
        if let Some(first) = policies[..i].iter().find(|p| p.model == policy.model) {
            errors.push(PolicyError {
                key: Some("model".into()),
                ..PolicyError::file(
                    &policy.file,
                    format!(
                        "model `{}` is already defined by {}; each model has exactly one policy file",
                        policy.model,
                        first.file.display()
                    ),
                )
            });
            duplicates.push(i);
        }
    }
    for i in duplicates.into_iter().rev() {
        policies.remove(i);
    }
    (policies, errors)
}

/// Parses and checks one policy file.
pub fn parse(
    file: &Path,
    text: &str,
    options: &LoadOptions,
) -> Result<ModelPolicy, Vec<PolicyError>> {
    let at = |span: std::ops::Range<usize>, key: &str| locate(file, text, span.start, key);
    let raw: PolicyFile = toml::from_str(text).map_err(|e| vec![syntax_error(file, text, &e)])?;

    let mut errors = Vec::new();
    let model = raw.model.get_ref().clone();
    if let Err(e) = check_name(&model) {
        errors.push(PolicyError::at(&at(raw.model.span(), "model"), e));
    }

    let defaults = resolve_limits(
        Limits::default(),
        raw.limits.as_ref(),
        "limits",
        &at,
        options,
        &mut errors,
    );
    let policy_dir = file.parent().unwrap_or(Path::new("."));

    if raw.versions.get_ref().is_empty() {
        errors.push(PolicyError::at(
            &at(raw.versions.span(), "versions"),
            "a model needs at least one version",
        ));
    }
    let mut versions = Vec::new();
    for (name, table) in raw.versions.get_ref() {
        let key = format!("versions.{}", name.get_ref());
        if let Err(e) = check_name(name.get_ref()) {
            errors.push(PolicyError::at(&at(name.span(), &key), e));
        }
        let limits = resolve_limits(
            defaults,
            table.limits.as_ref(),
            &format!("{key}.limits"),
            &at,
            options,
            &mut errors,
        );
        let grants = resolve_grants(
            &model,
            name.get_ref(),
            [raw.grants.as_ref(), table.grants.as_ref()],
            &key,
            &at,
            &mut errors,
        );
        let serving = match (&table.plugin, &table.onnx) {
            (Some(plugin), None) => {
                let location = at(plugin.span(), &format!("{key}.plugin"));
                resolve_plugin(plugin.get_ref(), policy_dir, &options.plugin_dirs)
                    .map(|p| (Serving::Plugin(p), location.clone()))
                    .map_err(|e| PolicyError::at(&location, e))
            }
            (None, Some(onnx)) => {
                let location = at(onnx.span(), &format!("{key}.onnx"));
                resolve_model(onnx.get_ref(), policy_dir)
                    .map(|p| (Serving::Onnx(p), location.clone()))
                    .map_err(|e| PolicyError::at(&location, e))
            }
            (Some(_), Some(onnx)) => Err(PolicyError::at(
                &at(onnx.span(), &format!("{key}.onnx")),
                "a version is served by a plugin or by an ONNX model, not both: a plugin runs its models through `models`",
            )),
            (None, None) => Err(PolicyError::at(
                &at(name.span(), &key),
                "a version needs `plugin` (a Wasm plugin) or `onnx` (an ONNX model served directly)",
            )),
        };
        let mut models = Vec::new();
        if let Some(table_models) = &table.models {
            if table.plugin.is_none() {
                errors.push(PolicyError::at(
                    &at(table_models.span(), &format!("{key}.models")),
                    "`models` lists what a plugin may run; an ONNX-only version serves its `onnx` file",
                ));
            }
            for (model_name, file) in table_models.get_ref() {
                let model_key = format!("{key}.models.{}", model_name.get_ref());
                let location = at(file.span(), &model_key);
                if let Err(e) = check_name(model_name.get_ref()) {
                    errors.push(PolicyError::at(&at(model_name.span(), &model_key), e));
                    continue;
                }
                match resolve_model(file.get_ref(), policy_dir) {
                    Ok(path) => models.push(ModelFile {
                        name: model_name.get_ref().clone(),
                        path,
                        location,
                    }),
                    Err(e) => errors.push(PolicyError::at(&location, e)),
                }
            }
        }
        match serving {
            Ok((serving, serving_location)) => versions.push(VersionPolicy {
                name: name.get_ref().clone(),
                description: table.description.clone(),
                serving,
                serving_location,
                models,
                limits,
                grants,
            }),
            Err(e) => errors.push(e),
        }
    }

    let champion = raw.champion.get_ref().clone();
    if !raw
        .versions
        .get_ref()
        .keys()
        .any(|v| v.get_ref() == &champion)
    {
        let known: Vec<&str> = raw
            .versions
            .get_ref()
            .keys()
            .map(|k| k.get_ref().as_str())
            .collect();
        errors.push(PolicyError::at(
            &at(raw.champion.span(), "champion"),
            format!(
                "`{champion}` is not a version of this model (versions: {})",
                known.join(", ")
            ),
        ));
    }

    let is_version = |v: &str| raw.versions.get_ref().keys().any(|k| k.get_ref() == v);
    let canary = raw.canary.as_ref().and_then(|c| {
        let version = c.version.get_ref();
        let before = errors.len();
        if !is_version(version) {
            errors.push(PolicyError::at(
                &at(c.version.span(), "canary.version"),
                format!("`{version}` is not a version of this model"),
            ));
        } else if *version == champion {
            errors.push(PolicyError::at(
                &at(c.version.span(), "canary.version"),
                format!("`{version}` is the champion; a canary must be another version"),
            ));
        }
        let percent = *c.percent.get_ref();
        if !(0.0..=100.0).contains(&percent) {
            errors.push(PolicyError::at(
                &at(c.percent.span(), "canary.percent"),
                format!("{percent} is out of range; allowed: 0 to 100"),
            ));
        }
        let sticky_header =
            sticky_header(&c.sticky_header, "canary.sticky_header", &at, &mut errors);
        (errors.len() == before).then(|| Canary {
            version: version.clone(),
            percent,
            sticky_header,
        })
    });
    let shadow = raw.shadow.as_ref().and_then(|s| {
        let before = errors.len();
        let mut versions: Vec<String> = Vec::new();
        if s.versions.get_ref().is_empty() {
            errors.push(PolicyError::at(
                &at(s.versions.span(), "shadow.versions"),
                "name at least one challenger version",
            ));
        }
        for v in s.versions.get_ref() {
            let name = v.get_ref();
            let problem = if !is_version(name) {
                Some(format!("`{name}` is not a version of this model"))
            } else if *name == champion {
                Some(format!(
                    "`{name}` is the champion; a challenger must be another version"
                ))
            } else if canary.as_ref().is_some_and(|c| &c.version == name) {
                Some(format!(
                    "`{name}` is the canary; a version is either canary or challenger"
                ))
            } else if versions.contains(name) {
                Some(format!("`{name}` is listed twice"))
            } else {
                None
            };
            match problem {
                Some(p) => errors.push(PolicyError::at(&at(v.span(), "shadow.versions"), p)),
                None => versions.push(name.clone()),
            }
        }
        let mut percent = |value: &Option<Spanned<f64>>, key: &str, default: f64, max: f64| {
            let Some(value) = value else { return default };
            let v = *value.get_ref();
            if !(0.0..=max).contains(&v) {
                errors.push(PolicyError::at(
                    &at(value.span(), key),
                    format!("{v} is out of range; allowed: 0 to {max}"),
                ));
            }
            v
        };
        let sample_percent = percent(&s.sample_percent, "shadow.sample_percent", 100.0, 100.0);
        let tolerance = percent(&s.tolerance, "shadow.tolerance", 1e-4, f64::MAX);
        let max_concurrency = match &s.max_concurrency {
            None => 16,
            Some(m) if (1..=10_000).contains(m.get_ref()) => *m.get_ref() as u32,
            Some(m) => {
                errors.push(PolicyError::at(
                    &at(m.span(), "shadow.max_concurrency"),
                    format!("{} is out of range; allowed: 1 to 10000", m.get_ref()),
                ));
                1
            }
        };
        (errors.len() == before).then(|| Shadow {
            versions,
            sample_percent,
            max_concurrency,
            tolerance,
            compare_output: s.compare_output.as_ref().map(|o| o.get_ref().clone()),
        })
    });

    let schema = schema::parse(raw.validation.as_ref(), &raw.inputs, &at, &mut errors);
    let monitoring = schema::parse_monitoring(raw.monitoring.as_ref(), &at, &mut errors);
    let record = parse_record(raw.record.as_ref(), &at, &mut errors);
    let control = raw.control.as_ref().and_then(|c| {
        let before = errors.len();
        let version = c.version.get_ref();
        let split_by = canary
            .as_ref()
            .map(|k| (k.version.as_str(), k.sticky_header.as_str(), "canary"))
            .or_else(|| {
                raw.rollout.as_ref().map(|r| {
                    (
                        r.candidate.get_ref().as_str(),
                        r.sticky_header.as_ref().map_or(DEFAULT_STICKY_HEADER, |h| h.get_ref().as_str()),
                        "rollout",
                    )
                })
            });
        if !is_version(version) {
            errors.push(PolicyError::at(
                &at(c.version.span(), "control.version"),
                format!("`{version}` is not a version of this model"),
            ));
        } else if let Some((other, _, what)) = split_by
            && other == version
        {
            errors.push(PolicyError::at(
                &at(c.version.span(), "control.version"),
                format!("`{version}` is the {what}'s; the control group is held on a baseline"),
            ));
        }
        let percent = *c.percent.get_ref();
        let canary_percent = canary.as_ref().map_or(0.0, |k| k.percent);
        if !(0.0..100.0).contains(&percent) {
            errors.push(PolicyError::at(
                &at(c.percent.span(), "control.percent"),
                format!("{percent} is out of range; allowed: 0 to below 100"),
            ));
        } else if percent + canary_percent > 100.0 + 1e-9 {
            errors.push(PolicyError::at(
                &at(c.percent.span(), "control.percent"),
                format!("{percent} and the canary's {canary_percent} are more than 100 together"),
            ));
        }
        let sticky_header = sticky_header(&c.sticky_header, "control.sticky_header", &at, &mut errors);
        if let Some((_, theirs, what)) = split_by
            && !theirs.eq_ignore_ascii_case(&sticky_header)
        {
            let span = c
                .sticky_header
                .as_ref()
                .map_or_else(|| c.version.span(), |h| h.span());
            errors.push(PolicyError::at(
                &at(span, "control.sticky_header"),
                format!("`{sticky_header}`, but the {what} splits by `{theirs}`: one header places a caller in both"),
            ));
        }
        (errors.len() == before).then(|| Control {
            version: version.clone(),
            percent,
            sticky_header,
        })
    });
    let rollout = raw.rollout.as_ref().and_then(|r| {
        let before = errors.len();
        let candidate = r.candidate.get_ref();
        let key = |k: &str| format!("rollout.{k}");
        if !is_version(candidate) {
            errors.push(PolicyError::at(
                &at(r.candidate.span(), "rollout.candidate"),
                format!("`{candidate}` is not a version of this model"),
            ));
        } else if *candidate == champion {
            errors.push(PolicyError::at(
                &at(r.candidate.span(), "rollout.candidate"),
                format!("`{candidate}` is the champion; a rollout takes another version to champion"),
            ));
        }
        if let Some(c) = &raw.canary {
            errors.push(PolicyError::at(
                &at(c.version.span(), "canary.version"),
                "a rollout sets the canary share of its candidate step by step; remove [canary]",
            ));
        }
        let mut number = |value: &Option<Spanned<f64>>, k: &str, range: std::ops::RangeInclusive<f64>, default: f64| {
            let Some(value) = value else { return default };
            let v = *value.get_ref();
            if !range.contains(&v) {
                errors.push(PolicyError::at(
                    &at(value.span(), &key(k)),
                    format!("{v} is out of range; allowed: {} to {}", range.start(), range.end()),
                ));
            }
            v
        };
        let step_seconds = number(&r.step_seconds, "step_seconds", 0.1..=30.0 * 86_400.0, 600.0);
        let max_error_rate_increase =
            number(&r.max_error_rate_increase, "max_error_rate_increase", 0.0..=1.0, 0.01);
        let max_p99_ratio = number(&r.max_p99_ratio, "max_p99_ratio", 1.0..=1000.0, 2.0);
        let min_accuracy_change = r
            .min_accuracy_change
            .is_some()
            .then(|| number(&r.min_accuracy_change, "min_accuracy_change", -1.0..=1.0, 0.0));
        let min_shadow_agreement = r
            .min_shadow_agreement
            .is_some()
            .then(|| number(&r.min_shadow_agreement, "min_shadow_agreement", 0.0..=1.0, 0.0));
        let max_prediction_psi = r
            .max_prediction_psi
            .is_some()
            .then(|| number(&r.max_prediction_psi, "max_prediction_psi", 0.0..=100.0, 0.0));
        let max_input_psi = r
            .max_input_psi
            .is_some()
            .then(|| number(&r.max_input_psi, "max_input_psi", 0.0..=100.0, 0.0));
        if let Some(gate) = &r.max_input_psi
            && !schema.as_ref().is_some_and(|s| {
                s.inputs
                    .iter()
                    .any(|i| i.features.iter().any(|f| f.reference.is_some()))
            })
        {
            errors.push(PolicyError::at(
                &at(gate.span(), "rollout.max_input_psi"),
                "judges the candidate's inputs on the features' reference bins, but no feature of [[inputs]] has a `reference`",
            ));
        }
        if let Some(gate) = &r.min_shadow_agreement
            && !shadow.as_ref().is_some_and(|s| s.versions.contains(candidate))
        {
            errors.push(PolicyError::at(
                &at(gate.span(), "rollout.min_shadow_agreement"),
                format!("judges the candidate's shadow copies, but `{candidate}` is not in [shadow] versions"),
            ));
        }
        let mut count = |value: &Option<Spanned<i64>>, k: &str, default: u64| {
            let Some(value) = value else { return default };
            let v = *value.get_ref();
            if !(1..=1_000_000_000).contains(&v) {
                errors.push(PolicyError::at(
                    &at(value.span(), &key(k)),
                    format!("{v} is out of range; allowed: 1 to 1000000000"),
                ));
            }
            v.max(1) as u64
        };
        let step_requests = count(&r.step_requests, "step_requests", 100);
        let min_feedback = count(&r.min_feedback, "min_feedback", 100);
        let steps = match &r.steps {
            None => vec![2.0, 5.0, 10.0, 25.0, 75.0, 100.0],
            Some(steps) => {
                let list = steps.get_ref();
                let problem = if list.is_empty() || list.len() > 32 {
                    Some("give 1 to 32 steps".to_string())
                } else if let Some(p) = list.iter().find(|p| !(**p > 0.0 && **p <= 100.0)) {
                    Some(format!("{p} is out of range; a step's percent is above 0 and at most 100"))
                } else if list.windows(2).any(|w| w[0] >= w[1]) {
                    Some("the steps must increase".to_string())
                } else if list[0] >= 100.0 {
                    Some("the first step must be below 100: the candidate is judged against the champion, which then serves the rest".to_string())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    errors.push(PolicyError::at(&at(steps.span(), "rollout.steps"), problem));
                }
                list.clone()
            }
        };
        // Below 100, the champion must keep a share beside the control
        // group: it is what the candidate is judged against.
        if let Some(c) = &control
            && let Some(p) = steps
                .iter()
                .find(|p| **p < 100.0 && **p + c.percent > 100.0 - 1e-9)
        {
            let span = r.steps.as_ref().map_or_else(|| r.candidate.span(), |s| s.span());
            errors.push(PolicyError::at(
                &at(span, "rollout.steps"),
                format!(
                    "the step at {p} % leaves the champion nothing beside the control group's {} %: below 100, a step is at most {} %",
                    c.percent,
                    100.0 - c.percent
                ),
            ));
        }
        let sticky_header = sticky_header(&r.sticky_header, "rollout.sticky_header", &at, &mut errors);
        (errors.len() == before).then(|| Rollout {
            candidate: candidate.clone(),
            champion: champion.clone(),
            steps,
            step_time: Duration::from_secs_f64(step_seconds),
            step_requests,
            sticky_header,
            gates: Gates {
                max_error_rate_increase,
                max_p99_ratio,
                min_accuracy_change,
                min_feedback,
                min_shadow_agreement,
                max_prediction_psi,
                max_input_psi,
            },
        })
    });

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(ModelPolicy {
        file: file.to_path_buf(),
        sha256: crate::contract::Sha256::of(text.as_bytes()),
        model,
        description: raw.description,
        champion,
        versions,
        canary,
        control,
        shadow,
        schema,
        monitoring,
        record,
        rollout,
    })
}

/// A sticky header's name, lower-case (the default when not given).
fn sticky_header(
    header: &Option<Spanned<String>>,
    key: &str,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> String {
    let Some(h) = header else {
        return DEFAULT_STICKY_HEADER.to_string();
    };
    let name = h.get_ref().to_ascii_lowercase();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        errors.push(PolicyError::at(
            &at(h.span(), key),
            format!("`{}` is not a valid HTTP header name", h.get_ref()),
        ));
    }
    name
}

fn parse_record(
    table: Option<&RecordTable>,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> Record {
    let mut record = Record::default();
    let Some(table) = table else { return record };
    if let Some(p) = &table.sample_percent {
        let v = *p.get_ref();
        if (0.0..=100.0).contains(&v) {
            record.sample_percent = v;
        } else {
            errors.push(PolicyError::at(
                &at(p.span(), "record.sample_percent"),
                format!("{v} is out of range; allowed: 0 to 100"),
            ));
        }
    }
    if let Some(k) = &table.max_kib {
        let v = *k.get_ref();
        if (1..=MAX_RECORD_KIB as i64).contains(&v) {
            record.max_bytes = v as usize * 1024;
        } else {
            errors.push(PolicyError::at(
                &at(k.span(), "record.max_kib"),
                format!("{v} is out of range; allowed: 1 to {MAX_RECORD_KIB}"),
            ));
        }
    }
    record
}

/// A version's grants: the defaults, then the model's `[grants]`, then
/// the version's own `grants`. Without a `seed`, the seed is a hash of the
/// model's and the version's names: stable across restarts and replicas,
/// and different for each version.
fn resolve_grants(
    model: &str,
    version: &str,
    tables: [Option<&GrantsTable>; 2],
    version_key: &str,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    errors: &mut Vec<PolicyError>,
) -> Grants {
    let mut grants = Grants {
        // 63 bits, so a policy can write the seed back (TOML integers are
        // signed).
        seed: crate::contract::fnv1a64(model.bytes().chain([0]).chain(version.bytes()))
            & i64::MAX as u64,
        ..Grants::default()
    };
    for (table, prefix) in tables
        .into_iter()
        .zip(["grants".to_string(), format!("{version_key}.grants")])
    {
        let Some(table) = table else { continue };
        if let Some(random) = &table.random {
            match random.get_ref().as_str() {
                "seeded" => grants.random = RandomGrant::Seeded,
                "real" => grants.random = RandomGrant::Real,
                "none" => grants.random = RandomGrant::Denied,
                other => errors.push(PolicyError::at(
                    &at(random.span(), &format!("{prefix}.random")),
                    format!("`{other}` is not one of `seeded`, `real`, `none`"),
                )),
            }
        }
        if let Some(clocks) = &table.clocks {
            match clocks.get_ref().as_str() {
                "fixed" => grants.clocks = ClockGrant::Fixed,
                "real" => grants.clocks = ClockGrant::Real,
                "none" => grants.clocks = ClockGrant::Denied,
                other => errors.push(PolicyError::at(
                    &at(clocks.span(), &format!("{prefix}.clocks")),
                    format!("`{other}` is not one of `fixed`, `real`, `none`"),
                )),
            }
        }
        if let Some(seed) = &table.seed {
            match u64::try_from(*seed.get_ref()) {
                Ok(value) => grants.seed = value,
                Err(_) => errors.push(PolicyError::at(
                    &at(seed.span(), &format!("{prefix}.seed")),
                    format!(
                        "{} is out of range; allowed: 0 to {}",
                        seed.get_ref(),
                        i64::MAX
                    ),
                )),
            }
        }
    }
    grants
}

fn resolve_limits(
    base: Limits,
    table: Option<&LimitsTable>,
    key: &str,
    at: &impl Fn(std::ops::Range<usize>, &str) -> Location,
    options: &LoadOptions,
    errors: &mut Vec<PolicyError>,
) -> Limits {
    let Some(table) = table else { return base };
    let mut limits = base;
    let max_mib = (options.max_memory_bytes >> 20) as i64;
    let mut field = |value: &Option<Spanned<i64>>, name: &str, min: i64, max: i64| -> Option<i64> {
        let value = value.as_ref()?;
        let v = *value.get_ref();
        if (min..=max).contains(&v) {
            Some(v)
        } else {
            errors.push(PolicyError::at(
                &at(value.span(), &format!("{key}.{name}")),
                format!("{v} is out of range; allowed: {min} to {max}"),
            ));
            None
        }
    };
    if let Some(v) = field(&table.timeout_ms, "timeout_ms", 1, 600_000) {
        limits.timeout = Duration::from_millis(v as u64);
    }
    if let Some(v) = field(&table.memory_mebibytes, "memory_mebibytes", 1, max_mib) {
        limits.memory_bytes = (v as usize) << 20;
    }
    if let Some(v) = field(&table.max_concurrency, "max_concurrency", 1, 100_000) {
        limits.max_concurrency = v as u32;
    }
    if let Some(v) = field(&table.max_queue, "max_queue", 0, 1_000_000) {
        limits.max_queue = v as u32;
    }
    if let Some(v) = field(
        &table.calls_per_instance,
        "calls_per_instance",
        1,
        1_000_000,
    ) {
        limits.calls_per_instance = v as u32;
    }
    if let Some(v) = field(&table.max_parallel, "max_parallel", 1, 4096) {
        limits.max_parallel = v as u32;
    }
    if let Some(v) = field(&table.max_output_mebibytes, "max_output_mebibytes", 1, 4096) {
        limits.max_output_bytes = (v as usize) << 20;
    }
    if let Some(v) = field(&table.breaker_failures, "breaker_failures", 0, 1_000_000) {
        limits.breaker_failures = v as u32;
    }
    if let Some(v) = field(
        &table.breaker_cooldown_ms,
        "breaker_cooldown_ms",
        10,
        3_600_000,
    ) {
        limits.breaker_cooldown = Duration::from_millis(v as u64);
    }
    limits
}

/// Model and version names appear in URLs and metric labels.
fn check_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: use 1 to 128 letters, digits, `_`, `.` or `-`, starting with a letter or digit"
        ))
    }
}

/// An ONNX file, relative to the policy's folder.
fn resolve_model(file: &str, policy_dir: &Path) -> Result<PathBuf, String> {
    if file.is_empty() {
        return Err("the model file name is empty".into());
    }
    let path = policy_dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("model file {} does not exist", path.display()))
    }
}

/// A path (`plugins/x.wasm`, relative to the policy file) or a bare name
/// looked up in the plugin folders.
pub(crate) fn resolve_plugin(
    plugin: &str,
    policy_dir: &Path,
    plugin_dirs: &[PathBuf],
) -> Result<PathBuf, String> {
    if plugin.is_empty() {
        return Err("the plugin name is empty".into());
    }
    if plugin.contains('/') || plugin.ends_with(".wasm") {
        let path = policy_dir.join(plugin);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("plugin file {} does not exist", path.display()))
        };
    }
    let file = format!("{plugin}.wasm");
    // Cargo names a crate's component with `_` where the crate name has
    // `-` (`const-label` builds `const_label.wasm`): either spelling finds
    // either file, the name as written first, in each folder in turn.
    let other = format!("{}.wasm", swap_separators(plugin));
    if let Some(path) = plugin_dirs
        .iter()
        .flat_map(|d| [d.join(&file), d.join(&other)])
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    let searched: Vec<String> = plugin_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    Err(format!(
        "plugin `{plugin}` not found: no {file} in {} (add a folder with --plugin-dir, or give a path ending in .wasm)",
        if searched.is_empty() {
            "any plugin folder".to_string()
        } else {
            searched.join(", ")
        }
    ))
}

/// `a-b_c` as `a_b_c` when it has a `-`, else as `a-b-c`: the other way
/// Cargo may have spelled a crate's file.
fn swap_separators(name: &str) -> String {
    if name.contains('-') {
        name.replace('-', "_")
    } else {
        name.replace('_', "-")
    }
}

/// A TOML file that does not parse, or does not fit its schema (an
/// unknown key, a wrong type), at the place the parser names.
pub(crate) fn syntax_error(file: &Path, text: &str, e: &toml::de::Error) -> PolicyError {
    let (line, column) = e.span().map(|s| line_column(text, s.start)).unzip();
    PolicyError {
        file: file.to_path_buf(),
        line,
        column,
        key: None,
        message: e.message().trim().to_string(),
    }
}

pub(crate) fn locate(file: &Path, text: &str, offset: usize, key: &str) -> Location {
    let (line, column) = line_column(text, offset);
    Location {
        file: file.to_path_buf(),
        line,
        column,
        key: key.to_string(),
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> LoadOptions {
        LoadOptions {
            plugin_dirs: vec![dir.to_path_buf()],
            max_memory_bytes: 1 << 30,
            overlay: None,
        }
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p1.wasm"), b"").unwrap();
        std::fs::write(dir.path().join("p2.wasm"), b"").unwrap();
        dir
    }

    fn errors(text: &str) -> Vec<String> {
        let dir = fixture();
        let file = dir.path().join("m.toml");
        parse(&file, text, &options(dir.path()))
            .map(|_| Vec::new())
            .unwrap_or_else(|e| {
                e.iter()
                    .map(|e| {
                        e.to_string()
                            .replace(&dir.path().display().to_string(), "D")
                    })
                    .collect()
            })
    }

    const GOOD: &str = "model = \"m\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"p1\"\n[versions.v2]\nplugin = \"p2\"\nlimits = { timeout_ms = 50 }\n[limits]\nmemory_mebibytes = 32\n";

    #[test]
    fn parses_a_good_policy_with_inherited_limits() {
        let dir = fixture();
        let policy = parse(&dir.path().join("m.toml"), GOOD, &options(dir.path())).unwrap();
        assert_eq!(policy.model, "m");
        assert_eq!(policy.champion, "v1");
        let v2 = &policy.versions[1];
        assert_eq!(v2.serving, Serving::Plugin(dir.path().join("p2.wasm")));
        assert_eq!(v2.limits.timeout, Duration::from_millis(50));
        assert_eq!(v2.limits.memory_bytes, 32 << 20);
        assert_eq!(policy.versions[0].limits.timeout, Limits::default().timeout);
        assert_eq!(v2.serving_location.line, 6);
    }

    #[test]
    fn reports_unknown_keys_with_their_line() {
        let e = errors(&GOOD.replace("plugin = \"p1\"", "plugn = \"p1\""));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("D/m.toml:4:1: "), "{}", e[0]);
        assert!(e[0].contains("unknown field `plugn`"), "{}", e[0]);
    }

    #[test]
    fn reports_every_semantic_error_with_key_and_line() {
        let text = "model = \"m m\"\nchampion = \"v9\"\n[versions.v1]\nplugin = \"nope\"\n[limits]\ntimeout_ms = 0\n";
        let e = errors(text);
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(
            e[0].starts_with("D/m.toml:1:9: `model`: `m m` is not a valid name"),
            "{}",
            e[0]
        );
        assert!(
            e[1].starts_with("D/m.toml:6:14: `limits.timeout_ms`: 0 is out of range"),
            "{}",
            e[1]
        );
        assert!(
            e[2].starts_with(
                "D/m.toml:4:10: `versions.v1.plugin`: plugin `nope` not found: no nope.wasm in D"
            ),
            "{}",
            e[2]
        );
        assert_eq!(
            e[3],
            "D/m.toml:2:12: `champion`: `v9` is not a version of this model (versions: v1)"
        );
    }

    #[test]
    fn plugin_names_match_either_separator() {
        let dir = fixture();
        std::fs::write(dir.path().join("const_label.wasm"), b"").unwrap();
        std::fs::write(dir.path().join("rules-v1.wasm"), b"").unwrap();
        let dirs = [dir.path().to_path_buf()];
        let found = |name: &str| resolve_plugin(name, dir.path(), &dirs);
        assert_eq!(
            found("const-label"),
            Ok(dir.path().join("const_label.wasm"))
        );
        assert_eq!(
            found("const_label"),
            Ok(dir.path().join("const_label.wasm"))
        );
        assert_eq!(found("rules_v1"), Ok(dir.path().join("rules-v1.wasm")));
        // The name as written wins where both files exist.
        std::fs::write(dir.path().join("rules_v1.wasm"), b"").unwrap();
        assert_eq!(found("rules_v1"), Ok(dir.path().join("rules_v1.wasm")));
        assert!(found("const-labels").is_err());
    }

    #[test]
    fn reports_bad_toml() {
        let e = errors("model = \"m\"\nchampion = \n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("D/m.toml:2:"), "{}", e[0]);
    }

    #[test]
    fn line_and_column() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
