//! The request path, protocol-neutral: every front end (the V2 REST API
//! today; gRPC and the replay of recorded requests next) and every shadow
//! copy drives the same steps through a [`Call`]:
//!
//! ```text
//! route -> admissible? -> (front end reads and decodes) -> validate -> monitor
//!       -> admit -> invoke -> check outputs -> (front end encodes) -> finish
//! ```
//!
//! `finish` records what happened (metrics, logs, the circuit breaker) and
//! hands the answer to the shadows. Every step fails with the one
//! [`Error`]; nothing here knows HTTP beyond the status an error maps to.

mod budget;
pub(crate) mod error;
mod shadows;

use std::sync::Arc;
use std::time::Instant;

use http::HeaderMap;

pub(crate) use error::{BodyError, Error, Guarded, OutputProblem, Unavailable};

use crate::contract::{CallLimits, PluginError, Sha256};
use crate::decisions::{Decision, DecisionLog, Identity, Payload, Target, Validation};
use crate::policy::Mode;
use crate::protocol::InferRequest;
use crate::router::breaker::{Outcome, Pass, Transition};
use crate::router::{Draw, Model, Route, Snapshot, Version};
use crate::shadow::{Busy, Load};
use crate::telemetry::{self, Escaped};
use crate::tensor::Tensor;
use crate::validate;

/// Process-wide limits of the pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    /// Bytes that requests in flight may hold together (bodies, decoded
    /// inputs, outputs, encoded answers).
    pub max_inflight_bytes: usize,
    /// The sum of the memory caps of the plugin calls running at once.
    pub max_sandbox_memory_bytes: usize,
    /// The share of the machine's CPU time shadow calls may use.
    pub shadow_cpu_percent: f64,
    /// Bodies, inputs and outputs over this many bytes are decoded,
    /// validated and encoded on the bulk pool (a `cpu::Pool` at nice 10).
    pub bulk_bytes: usize,
    /// Jobs waiting for the bulk pool; more get 503.
    pub bulk_queue: usize,
    /// Access log lines a second (one per request and shadow call); 0: off.
    pub access_log_per_second: u32,
    /// Requests whose answers each model keeps for ground truth.
    pub ground_truth_keep: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            max_inflight_bytes: 1 << 30,
            max_sandbox_memory_bytes: 4 << 30,
            shadow_cpu_percent: 10.0,
            bulk_bytes: 64 << 10,
            bulk_queue: 256,
            access_log_per_second: 0,
            ground_truth_keep: crate::feedback::KEEP_REQUESTS,
        }
    }
}

/// How long a large request waits for the bulk pool to start its work
/// before it gets 503 (once started, the work runs to its end: it is
/// bounded by the request's size).
const BULK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What every request of one server shares.
pub(crate) struct Pipeline {
    /// How busy the server is: shadows only use spare CPU.
    pub(crate) load: Arc<Load>,
    bytes: Arc<budget::Bytes>,
    sandbox_memory: budget::SandboxMemory,
    shadow_cpu: shadows::CpuBudget,
    shadow_executor: shadows::Executor,
    /// Decodes, validates and encodes what is larger than `bulk_bytes`:
    /// synchronous work that, on the executor's threads, held every small
    /// request behind it (two clients sending 100,000-row requests had cut
    /// the same model's small requests to 7 % of their throughput, p99 14x,
    /// in `cargo bench --bench soak`).
    bulk: crate::cpu::Pool,
    bulk_bytes: usize,
    bulk_queue: usize,
    /// The server's metrics (requests that reached no version).
    telemetry: Arc<telemetry::Telemetry>,
    /// Where every request's decision is recorded, if anywhere.
    decisions: Option<DecisionLog>,
    /// Lets access log lines through, when the access log is on.
    access: Option<telemetry::RateLimiter>,
    /// What each version answered, for the ground truth clients send later.
    predictions: crate::feedback::Predictions,
    /// Whether circuit breakers judge the calls: not when replaying
    /// recorded requests offline, where a breaker opened by a few
    /// failures would turn every later replay into a refusal.
    breakers: bool,
}

impl Pipeline {
    /// A pipeline; its saturation probe runs on the current runtime, its
    /// shadow calls on a thread of their own.
    pub(crate) fn new(
        config: PipelineConfig,
        telemetry: Arc<telemetry::Telemetry>,
        decisions: Option<DecisionLog>,
    ) -> std::io::Result<Arc<Self>> {
        Self::build(config, telemetry, decisions, true)
    }

    fn build(
        config: PipelineConfig,
        telemetry: Arc<telemetry::Telemetry>,
        decisions: Option<DecisionLog>,
        breakers: bool,
    ) -> std::io::Result<Arc<Self>> {
        crate::onnx::start_compute_threads()?;
        let pipeline = Arc::new(Pipeline {
            load: Arc::default(),
            bytes: budget::Bytes::new(config.max_inflight_bytes),
            sandbox_memory: budget::SandboxMemory::new(config.max_sandbox_memory_bytes),
            shadow_cpu: shadows::CpuBudget::new(config.shadow_cpu_percent),
            shadow_executor: shadows::Executor::start()?,
            bulk: crate::cpu::Pool::start("bulk", crate::cpu::cores(), 10, config.bulk_queue)?,
            bulk_bytes: config.bulk_bytes,
            bulk_queue: config.bulk_queue.max(1),
            telemetry,
            decisions,
            access: (config.access_log_per_second > 0)
                .then(|| telemetry::RateLimiter::new(config.access_log_per_second)),
            breakers,
            predictions: crate::feedback::Predictions::new(config.ground_truth_keep),
        });
        Load::spawn_probe(&pipeline.load);
        Ok(pipeline)
    }

    /// A pipeline for replaying recorded requests: no decision log, no
    /// circuit breakers.
    pub(crate) fn offline(
        config: PipelineConfig,
        telemetry: Arc<telemetry::Telemetry>,
    ) -> std::io::Result<Arc<Self>> {
        Self::build(config, telemetry, None, false)
    }

    /// The server's metrics.
    pub(crate) fn telemetry(&self) -> &telemetry::Telemetry {
        &self.telemetry
    }

    /// The decision log, when the server keeps one.
    pub(crate) fn decisions(&self) -> Option<&DecisionLog> {
        self.decisions.as_ref()
    }

    /// What each version answered lately, for ground truth.
    pub(crate) fn predictions(&self) -> &crate::feedback::Predictions {
        &self.predictions
    }

    /// An empty holding of the byte budget of requests in flight, for a
    /// body read outside an inference call (feedback).
    pub(crate) fn body_bytes(&self, model: &str) -> BodyBytes {
        BodyBytes(budget::Held::none(&self.bytes), model.to_string())
    }

    /// The version that serves a request (pinned, canary or champion) and
    /// the call that will serve it. Unknown model or version: recorded
    /// under `_unknown` and returned.
    pub(crate) fn route<'a>(
        self: &'a Arc<Self>,
        snapshot: &'a Snapshot,
        model: &str,
        pinned: Option<&str>,
        headers: &HeaderMap,
        identity: Identity,
    ) -> Result<Call<'a>, Error> {
        let start = Instant::now();
        match snapshot.route(model, pinned, headers) {
            Ok(routed) => {
                let sample = routed.model.policy.record.sample_percent;
                let sampled =
                    self.decisions.is_some() && sample > 0.0 && crate::router::sampled(sample);
                Ok(Call::new(
                    self,
                    routed.model,
                    routed.version,
                    routed.route,
                    Some(Busy::enter(&self.load)),
                    Origin {
                        identity,
                        generation: snapshot.generation,
                        draw: routed.draw,
                        inputs_sha256: None,
                        sampled,
                    },
                ))
            }
            Err(e) => {
                let error = Error::from(e);
                self.telemetry.record_request(
                    telemetry::UNKNOWN,
                    telemetry::UNKNOWN,
                    "none",
                    error.status().as_u16(),
                    start.elapsed(),
                );
                if let Some(log) = &self.decisions {
                    log.record(Decision {
                        time: std::time::SystemTime::now(),
                        identity,
                        target: Target::Unknown {
                            model: model.to_string(),
                            version: pinned.map(str::to_string),
                        },
                        generation: snapshot.generation,
                        route: Route::Champion,
                        draw: None,
                        inputs_sha256: None,
                        outputs_sha256: None,
                        payload: Payload::default(),
                        validation: Validation::NotReached,
                        status: error.status().as_u16(),
                        error: Some((error.kind(), crate::decisions::cut(error.to_string()))),
                        latency: start.elapsed(),
                    });
                }
                Err(error)
            }
        }
    }
}

/// Bytes of a body held in the budget of requests in flight (see
/// [`Pipeline::body_bytes`]), given back when dropped.
pub(crate) struct BodyBytes(budget::Held, String);

impl BodyBytes {
    /// Holds `bytes` more: a 503 when the budget has no room.
    pub(crate) fn hold(&mut self, bytes: usize) -> Result<(), Error> {
        self.0.grow(bytes).map_err(|budget| Error::Unavailable {
            model: self.1.clone(),
            version: String::new(),
            why: Unavailable::Bytes {
                needed: bytes,
                budget,
            },
        })
    }
}

/// What a replayed request came to (see [`Pipeline::replay`]).
pub(crate) struct Replayed {
    pub validation: Validation,
    pub outputs: Result<Vec<Tensor>, Error>,
    /// From its inputs ready to its outputs checked.
    pub latency: std::time::Duration,
}

impl Pipeline {
    /// Runs `inputs` through `version` of `model` as a pinned request goes
    /// (admission, validation, the call, the checks of its outputs): the
    /// front end of `gateway replay` and `gateway what-if`. An unknown
    /// model or version is the error.
    pub(crate) async fn replay(
        self: &Arc<Self>,
        snapshot: &Snapshot,
        model: &str,
        version: &str,
        inputs: Vec<Tensor>,
        request_id: &str,
    ) -> Result<Replayed, Error> {
        let identity = Identity {
            request_id: request_id.into(),
            trace: None,
        };
        let mut call = self.route(snapshot, model, Some(version), &HeaderMap::new(), identity)?;
        let start = Instant::now();
        let request = InferRequest {
            id: None,
            inputs,
            outputs: None,
            binary_outputs: false,
        };
        let result = match call.admissible() {
            Ok(()) => call.infer(request).await,
            Err(e) => Err(e),
        };
        let latency = start.elapsed();
        let validation = call.validation;
        let outputs = match result {
            Ok((request, outputs)) => {
                call.finish(Ok(Answer {
                    inputs: request.inputs,
                    outputs: outputs.clone(),
                }));
                Ok(outputs)
            }
            Err(e) => {
                call.finish(Err(&e));
                Err(e)
            }
        };
        Ok(Replayed {
            validation,
            outputs,
            latency,
        })
    }
}

/// An answer's bytes, still counted in the budget of bytes in flight
/// while its response is being sent (see [`Call::keep_for_answer`]).
#[derive(Debug)]
pub(crate) struct AnswerBytes {
    _held: budget::Held,
}

/// Where a call comes from: the request's identity, the policies that
/// routed it and the canary's draw.
pub(crate) struct Origin {
    pub identity: Identity,
    pub generation: u64,
    pub draw: Option<Draw>,
    /// A shadow copy's inputs are its served request's: their digest.
    pub inputs_sha256: Option<Sha256>,
    /// Whether the record keeps the call's tensors (the policy's
    /// `[record] sample_percent`); a shadow copy follows its request.
    pub sampled: bool,
}

/// One request (or shadow copy) on its way through the pipeline.
pub(crate) struct Call<'a> {
    pipeline: &'a Arc<Pipeline>,
    pub model: &'a Arc<Model>,
    pub version: &'a Arc<Version>,
    pub route: Route,
    start: Instant,
    /// What the request holds of the process's byte budget.
    bytes: budget::Held,
    /// What the circuit breaker let this call do.
    pass: Pass,
    /// Marks a served request in flight (shadows do not count).
    _busy: Option<Busy<'a>>,
    /// Whether the outcome was recorded; a call dropped before that (the
    /// client went away) still ends a breaker probe, as neutral.
    recorded: bool,
    origin: Origin,
    /// What the decision record says of the inputs and outputs (digests
    /// only when the server keeps a decision log).
    validation: Validation,
    inputs_sha256: Option<Sha256>,
    outputs_sha256: Option<Sha256>,
    /// The tensors the record keeps, for a sampled call.
    payload: Payload,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.version.breaker.record(self.pass, Outcome::Neutral);
            // The client went away (or the server stopped) before an
            // answer: still a decision. A shadow copy refused before it
            // ran is not one.
            if self.route != Route::Shadow {
                self.record_decision(ABANDONED, Some(("abandoned", String::new())));
            }
        }
    }
}

/// The status a decision record gives a request whose client went away
/// before its answer (nginx's "client closed request").
const ABANDONED: u16 = 499;

/// A successful answer, handed to [`Call::finish`] after it was encoded.
pub(crate) struct Answer {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

impl<'a> Call<'a> {
    /// A call of `version` starting now; `busy` marks a served request in
    /// flight (shadow copies have none).
    fn new(
        pipeline: &'a Arc<Pipeline>,
        model: &'a Arc<Model>,
        version: &'a Arc<Version>,
        route: Route,
        busy: Option<Busy<'a>>,
        origin: Origin,
    ) -> Self {
        Call {
            pipeline,
            model,
            version,
            route,
            start: Instant::now(),
            bytes: budget::Held::none(&pipeline.bytes),
            pass: Pass::Closed,
            _busy: busy,
            recorded: false,
            inputs_sha256: origin.inputs_sha256,
            origin,
            validation: Validation::NotReached,
            outputs_sha256: None,
            payload: Payload::default(),
        }
    }

    /// Whether the version could take the request now: its circuit
    /// breaker is closed (or this is its probe) and its queue has room.
    /// Front ends ask before reading the body, so a version that would
    /// refuse costs no upload.
    pub(crate) fn admissible(&mut self) -> Result<(), Error> {
        let version = self.version;
        if self.pipeline.breakers
            && let Err(retry_in_secs) = version.breaker.peek()
        {
            return Err(self.circuit_open(retry_in_secs));
        }
        if let Some(full) = version.queue_full() {
            return Err(self.unavailable(Unavailable::Admission(full)));
        }
        Ok(())
    }

    /// The 503 of an open circuit breaker.
    fn circuit_open(&self, retry_in_secs: u32) -> Error {
        self.unavailable(Unavailable::CircuitOpen {
            failures: self.version.breaker.threshold(),
            retry_in_secs,
        })
    }

    /// Holds `bytes` more of the process's budget for requests in flight
    /// (the body as it arrives, decoded tensors, outputs, the answer).
    pub(crate) fn hold(&mut self, bytes: usize) -> Result<(), Error> {
        self.bytes.grow(bytes).map_err(|budget| {
            let needed = bytes;
            Error::Unavailable {
                model: self.version.model.clone(),
                version: self.version.name.clone(),
                why: Unavailable::Bytes { needed, budget },
            }
        })
    }

    /// Keeps `bytes` of what the request holds (its encoded answer) in
    /// the budget after the call ends, until the returned guard is
    /// dropped with the response body: a client that does not take its
    /// answer (an HTTP/2 stream whose window stays shut) keeps it counted.
    pub(crate) fn keep_for_answer(&mut self, bytes: usize) -> AnswerBytes {
        AnswerBytes {
            _held: self.bytes.split(bytes),
        }
    }

    /// Gives back `bytes` of what [`Call::hold`] took (a body dropped
    /// after decoding).
    pub(crate) fn release(&mut self, bytes: usize) {
        self.bytes.shrink(bytes);
    }

    /// Bytes above which work belongs on the bulk pool.
    pub(crate) fn bulk_bytes(&self) -> usize {
        self.pipeline.bulk_bytes
    }

    /// Whether work on `bytes` belongs on the bulk pool.
    pub(crate) fn is_bulk(&self, bytes: usize) -> bool {
        bytes > self.pipeline.bulk_bytes
    }

    /// Runs `f` on the bulk pool (see [`crate::cpu::Pool`]): a full queue
    /// is a 503 naming the version.
    pub(crate) async fn offload<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        let queue = self.pipeline.bulk_queue;
        let full = || self.unavailable(Unavailable::Bulk { queue });
        // One version may fill half the queue; a job not started within
        // BULK_WAIT is skipped.
        let _share = self
            .version
            .bulk_share
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new((queue / 2).max(1))))
            .clone()
            .try_acquire_owned()
            .map_err(|_| full())?;
        match self.pipeline.bulk.run(f, Instant::now() + BULK_WAIT).await {
            Ok(value) => Ok(value),
            Err(crate::cpu::PoolError::Full | crate::cpu::PoolError::Late) => Err(full()),
            Err(crate::cpu::PoolError::Panicked) => {
                Err(Error::Internal("a bulk job panicked".into()))
            }
        }
    }

    /// Validates a decoded request and runs it: the served path. Large
    /// inputs are validated and monitored on the bulk pool. The request
    /// comes back with the outputs.
    pub(crate) async fn infer(
        &mut self,
        request: InferRequest,
    ) -> Result<(InferRequest, Vec<Tensor>), Error> {
        let bytes = request.inputs.iter().map(|t| t.data.len()).sum();
        self.hold(bytes)?;
        let digest = self.pipeline.decisions.is_some();
        let id = self.origin.identity.request_id.clone();
        let (request, checked, inputs_sha256) = if self.is_bulk(bytes) {
            let (model, version) = (self.model.clone(), self.version.clone());
            self.offload(move || {
                let checked = check(&model, &version, &request, &id);
                let inputs_sha256 = digest.then(|| crate::decisions::digest(&request.inputs));
                (request, checked, inputs_sha256)
            })
            .await?
        } else {
            let checked = check(self.model, self.version, &request, &id);
            let inputs_sha256 = digest.then(|| crate::decisions::digest(&request.inputs));
            (request, checked, inputs_sha256)
        };
        self.inputs_sha256 = inputs_sha256;
        if self.origin.sampled {
            // Recorded whatever the validation says: a refused request is
            // replayable too.
            self.keep(&request.inputs, true);
        }
        self.validation = match &checked {
            Ok(validation) => *validation,
            Err(_) => Validation::Failed,
        };
        checked?;
        let outputs = self.run(&request.inputs, Wait::UntilDeadline).await?;
        Ok((request, outputs))
    }

    /// Admission, sandbox memory, the call, and the checks of its outputs.
    /// The call's deadline starts now, when its inputs are ready: the time
    /// a client takes to upload is never charged to the plugin.
    async fn run(&mut self, inputs: &[Tensor], wait: Wait) -> Result<Vec<Tensor>, Error> {
        let version = self.version;
        let limits = CallLimits::starting_now(version.limits.timeout, version.limits.memory_bytes)
            .with_grants(version.grants);
        let _slot = match wait {
            Wait::UntilDeadline => version
                .admit(limits.deadline)
                .await
                .map_err(|e| self.unavailable(Unavailable::Admission(e)))?,
            Wait::No => version.try_admit().ok_or_else(|| {
                self.unavailable(Unavailable::Admission(
                    crate::router::AdmissionError::QueueFull {
                        running: version.limits.max_concurrency,
                        queued: 0,
                    },
                ))
            })?,
        };
        // A shadow copy never waits: memory that is not free now is the
        // served requests'.
        let memory_until = match wait {
            Wait::UntilDeadline => limits.deadline,
            Wait::No => Instant::now(),
        };
        let memory = self.sandbox_memory_needed();
        let _memory = match memory {
            0 => None,
            needed => Some(
                self.pipeline
                    .sandbox_memory
                    .take(needed, memory_until, &version.memory_share)
                    .await
                    .ok_or_else(|| {
                        self.unavailable(Unavailable::SandboxMemory {
                            needed,
                            budget: self.pipeline.sandbox_memory.limit_bytes(),
                        })
                    })?,
            ),
        };
        // The breaker's verdict, and its probe, are taken only now: a call
        // that was still uploading, queued or failing validation held
        // nothing of it.
        if self.pipeline.breakers {
            self.pass = version
                .breaker
                .check()
                .map_err(|retry_in_secs| self.circuit_open(retry_in_secs))?;
        }
        let called = Instant::now();
        let outputs = version.infer(inputs, limits).await;
        version
            .metrics
            .plugin_call(&version.model, &version.name, called.elapsed());
        let outputs = outputs.map_err(|error| self.plugin_error(error))?;
        self.check_outputs(&outputs)?;
        let outputs = if self.pipeline.decisions.is_none() {
            outputs
        } else if self.is_bulk(outputs.iter().map(|t| t.data.len()).sum()) {
            let (outputs, digest) = self
                .offload(move || {
                    let digest = crate::decisions::digest(&outputs);
                    (outputs, digest)
                })
                .await?;
            self.outputs_sha256 = Some(digest);
            outputs
        } else {
            self.outputs_sha256 = Some(crate::decisions::digest(&outputs));
            outputs
        };
        if self.origin.sampled {
            self.keep(&outputs, false);
        }
        if let Some(labels) = version
            .label_output
            .as_ref()
            .and_then(|name| outputs.iter().find(|t| &t.name == name))
        {
            version
                .metrics
                .predictions(&version.model, &version.name, self.route, labels);
            self.pipeline.predictions.keep(
                &version.model,
                &self.origin.identity.request_id,
                &version.name,
                self.route,
                labels,
            );
        }
        Ok(outputs)
    }

    /// Keeps a sampled call's inputs or outputs for its record (see
    /// [`Payload::keep`]).
    fn keep(&mut self, tensors: &[Tensor], inputs: bool) {
        if let Some(log) = &self.pipeline.decisions {
            let limit = self.model.policy.record.max_bytes;
            self.payload.keep(log, tensors, limit, inputs);
        }
    }

    /// The memory a call of this version may use in its sandbox (none for
    /// an ONNX-only version, whose computation is bounded by its inputs).
    fn sandbox_memory_needed(&self) -> usize {
        match self.version.backend {
            crate::runtime::Backend::Plugin { .. } => self.version.limits.memory_bytes,
            crate::runtime::Backend::Onnx(_) => 0,
        }
    }

    /// The outputs against the declaration and the version's size cap;
    /// what passes is held in the byte budget.
    fn check_outputs(&mut self, outputs: &[Tensor]) -> Result<(), Error> {
        let version = self.version;
        let bytes: usize = outputs.iter().map(|t| t.data.len()).sum();
        if bytes > version.limits.max_output_bytes {
            return Err(self.output_error(OutputProblem::TooLarge {
                bytes,
                limit: version.limits.max_output_bytes,
            }));
        }
        let allow_nan = self
            .model
            .schema
            .as_ref()
            .is_some_and(|s| s.allow_nan_outputs);
        validate::check_outputs(outputs, version.backend.info(), allow_nan)
            .map_err(|e| self.plugin_error(PluginError::MalformedOutput(e)))?;
        self.hold(bytes)
    }

    /// An answer of this call's version that cannot go to the client.
    pub(crate) fn output_error(&self, problem: OutputProblem) -> Error {
        Error::Output {
            model: self.version.model.clone(),
            version: self.version.name.clone(),
            backend: self.version.backend.describe_call(),
            problem,
        }
    }

    fn plugin_error(&self, error: PluginError) -> Error {
        Error::Plugin {
            model: self.version.model.clone(),
            version: self.version.name.clone(),
            backend: self.version.backend.describe_call(),
            error,
        }
    }

    fn unavailable(&self, why: Unavailable) -> Error {
        Error::Unavailable {
            model: self.version.model.clone(),
            version: self.version.name.clone(),
            why,
        }
    }

    /// Records how the request ended (see [`Call::record`]) and, for an
    /// answered unpinned request, sends the shadow copies. Call it after
    /// the answer was encoded.
    pub(crate) fn finish(mut self, result: Result<Answer, &Error>) {
        self.record(result.as_ref().map(|_| ()).map_err(|e| *e));
        if let Ok(answer) = result
            // The control group is a measurement of its baseline alone.
            && !matches!(self.route, Route::Pinned | Route::Shadow | Route::Control)
        {
            shadows::dispatch(
                self.pipeline,
                self.model,
                self.version,
                answer,
                self._busy.as_ref(),
                &self.origin,
                self.inputs_sha256,
            );
        }
    }

    /// Metrics, the circuit breaker, and a rate-limited log line for
    /// failures.
    fn record(&mut self, result: Result<(), &Error>) {
        self.recorded = true;
        let version = self.version;
        let status = match result {
            Ok(()) => 200,
            Err(e) => e.status().as_u16(),
        };
        let outcome = match result {
            Ok(()) => Outcome::Success,
            // The plugin's own failures; not a sandbox or slot it could not
            // get (503), which says nothing about the plugin.
            Err(e)
                if e.plugin_failure().is_some()
                    && e.status().is_server_error()
                    && e.retry_after().is_none() =>
            {
                Outcome::Failure
            }
            Err(_) => Outcome::Neutral,
        };
        if self.pipeline.breakers
            && let Some(transition) = version.breaker.record(self.pass, outcome)
        {
            log_transition(version, transition);
        }
        if let Err(e) = result {
            self.record_error(e);
        }
        let latency = self.start.elapsed();
        // The version's own failures: a 5xx, or a 4xx its plugin gave
        // (it refused inputs the policy let through).
        let fault =
            result.is_err_and(|e| e.status().is_server_error() || e.plugin_failure().is_some());
        version.metrics.request(
            &version.model,
            &version.name,
            self.route,
            status,
            fault,
            latency,
        );
        if let Some(suppressed) = self.pipeline.access.as_ref().and_then(|a| a.check()) {
            tracing::info!(
                target: "gateway::access",
                request_id = %Escaped(&self.origin.identity.request_id),
                trace_id = self.origin.identity.trace.map(|t| t.trace_id_hex()),
                model = %version.model,
                version = %version.name,
                route = self.route.as_str(),
                status,
                kind = result.err().map(Error::kind),
                latency_ms = latency.as_secs_f64() * 1e3,
                suppressed,
                "request"
            );
        }
        self.record_decision(
            status,
            result
                .err()
                .map(|e| (e.kind(), crate::decisions::cut(e.to_string()))),
        );
    }

    /// Hands this call's decision to the decision log, if there is one.
    fn record_decision(&mut self, status: u16, error: Option<(&'static str, String)>) {
        if let Some(log) = &self.pipeline.decisions {
            log.record(Decision {
                time: std::time::SystemTime::now(),
                identity: self.origin.identity.clone(),
                target: Target::Version {
                    model: self.model.clone(),
                    version: self.version.clone(),
                },
                generation: self.origin.generation,
                route: self.route,
                draw: self.origin.draw,
                inputs_sha256: self.inputs_sha256,
                outputs_sha256: self.outputs_sha256,
                payload: std::mem::take(&mut self.payload),
                validation: self.validation,
                status,
                error,
                latency: self.start.elapsed(),
            });
        }
    }

    fn record_error(&self, e: &Error) {
        let version = self.version;
        if let Some(kind) = e.plugin_failure() {
            version
                .metrics
                .telemetry()
                .record_plugin_error(&version.model, &version.name, kind);
        }
        if let Error::Unavailable { .. } = e {
            version
                .metrics
                .telemetry()
                .record_refused(&version.model, &version.name, e.kind());
        }
        if e.status().is_server_error()
            && let Some(suppressed) = version.error_log.check()
        {
            tracing::warn!(
                model = %version.model,
                version = %version.name,
                route = self.route.as_str(),
                request_id = %Escaped(&self.origin.identity.request_id),
                trace_id = self.origin.identity.trace.map(|t| t.trace_id_hex()),
                status = e.status().as_u16(),
                kind = e.kind(),
                error = %Escaped(&e.to_string()),
                suppressed,
                "inference failed"
            );
        }
    }
}

/// Whether a call waits for an admission slot.
#[derive(Clone, Copy)]
enum Wait {
    /// Served requests wait in the version's queue until their deadline.
    UntilDeadline,
    /// Shadow copies take a free slot or are dropped.
    No,
}

fn log_transition(version: &Version, transition: Transition) {
    match transition {
        Transition::Opened { failures } => {
            version
                .metrics
                .telemetry()
                .record_circuit(&version.model, &version.name, true);
            tracing::warn!(
                model = %version.model,
                version = %version.name,
                failures,
                cooldown_ms = version.limits.breaker_cooldown.as_millis() as u64,
                "circuit breaker opened: the version fails every request; refusing it until a probe succeeds"
            );
        }
        Transition::Closed => {
            version
                .metrics
                .telemetry()
                .record_circuit(&version.model, &version.name, false);
            tracing::info!(model = %version.model, version = %version.name, "circuit breaker closed: a probe succeeded");
        }
    }
}

/// The plugin's declaration, then the policy's rules (every violation
/// counted; value violations served in `flag` mode), then the data monitor.
/// `request_id` goes into the warning a flagged request logs.
fn check(
    model: &Model,
    version: &Version,
    request: &InferRequest,
    request_id: &str,
) -> Result<Validation, Error> {
    let validation = validate_inputs(model, version, request, request_id)?;
    if let Some(monitor) = model.monitors.get(&version.name) {
        monitor.observe(&request.inputs);
    }
    Ok(validation)
}

fn validate_inputs(
    model: &Model,
    version: &Version,
    request: &InferRequest,
    request_id: &str,
) -> Result<Validation, Error> {
    let violations = match validate::check_request(request, version.backend.info()) {
        Err(e) => e,
        Ok(()) => match &model.schema {
            Some(schema) => validate::schema_violations(schema, &request.inputs),
            None => return Ok(Validation::Passed),
        },
    };
    if violations.is_empty() {
        return Ok(Validation::Passed);
    }
    for c in violations.counts() {
        version.metrics.telemetry().record_validation_failure(
            &version.model,
            &version.name,
            &c.input,
            &c.feature,
            c.rule,
            c.n,
        );
    }
    let flagged = model.schema.as_ref().is_some_and(|s| s.mode == Mode::Flag)
        && violations.value_rules_only();
    if flagged {
        if let Some(suppressed) = version.error_log.check() {
            tracing::warn!(
                model = %version.model,
                version = %version.name,
                request_id = %Escaped(request_id),
                suppressed,
                "served a request that breaks the input rules (flag mode): {violations}"
            );
        }
        return Ok(Validation::Flagged);
    }
    Err(violations.into())
}
