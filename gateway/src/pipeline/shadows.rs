//! Champion/challenger shadowing through the same pipeline as served
//! requests: after a request has been answered, each challenger of the
//! model gets its validated inputs on a task of its own, as a [`Call`] with
//! the `shadow` route, and its outputs are compared with the answer the
//! client got.
//!
//! Shadow work never touches the response and is shed first: it starts
//! after the response is encoded, is never awaited, and runs only while
//! (1) the server is not saturated (see [`crate::shadow::Load`]), (2) the
//! model's shadow slots (`shadow.max_concurrency`) and the challenger's own
//! admission have room without queueing, and (3) shadows have CPU time
//! left in their budget: a share of the machine (`--shadow-cpu-percent`,
//! 10 % by default) measured as the CPU time shadow calls spend being
//! polled plus what their jobs on pool threads (large ONNX computations)
//! use, each copy's expected cost reserved when it starts. Shadow calls
//! run on their own lowest-priority thread ([`Executor`]). A slow challenger therefore gets
//! fewer copies, never more CPU, and never the CPU a served request wants.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::{Answer, Call, Error, Origin, Pipeline, Wait};
use crate::cpu;
use crate::router::{self, Model, Route, Version};
use crate::shadow::{Busy, compare};
use crate::telemetry::Escaped;
use crate::validate;

/// Copies an answered request to the model's challengers, if it has any,
/// the request is sampled and there is room (see the module's doc).
/// `busy` is the served request's mark in its server's load: saturation
/// is measured only once a copy is due, so a model without shadows never
/// starts the probe.
pub(super) fn dispatch(
    pipeline: &Arc<Pipeline>,
    model: &Arc<Model>,
    answered: &Arc<Version>,
    answer: Answer,
    busy: Option<&Busy<'_>>,
    origin: &Origin,
    inputs_sha256: Option<crate::contract::Sha256>,
) {
    let Some(shadow) = &model.shadow else { return };
    if !router::sampled(shadow.sample_percent) {
        return;
    }
    let saturated = busy.is_some_and(Busy::saturated);
    let answer = Arc::new(answer);
    for challenger in &shadow.versions {
        if Arc::ptr_eq(challenger, answered) {
            continue;
        }
        let estimate = Duration::from_nanos(challenger.shadow_cost_ns.load(Ordering::Relaxed));
        let room = match shadow.slots.clone().try_acquire_owned() {
            Ok(permit) if !saturated => pipeline
                .shadow_cpu
                .start(estimate)
                .map(|running| (permit, running)),
            _ => None,
        };
        let Some((permit, running)) = room else {
            challenger
                .metrics
                .telemetry()
                .record_shadow(&model.name, &challenger.name, "dropped");
            continue;
        };
        let job = Job {
            pipeline: pipeline.clone(),
            model: model.clone(),
            challenger: challenger.clone(),
            answer: answer.clone(),
            identity: origin.identity.clone(),
            generation: origin.generation,
            inputs_sha256,
            sampled: origin.sampled,
        };
        pipeline.shadow_executor.spawn(async move {
            job.run().await;
            drop((permit, running));
        });
    }
}

struct Job {
    pipeline: Arc<Pipeline>,
    model: Arc<Model>,
    challenger: Arc<Version>,
    answer: Arc<Answer>,
    /// The served request's: its shadow records carry its id.
    identity: crate::decisions::Identity,
    generation: u64,
    inputs_sha256: Option<crate::contract::Sha256>,
    /// Whether the served request's record keeps its tensors.
    sampled: bool,
}

impl Job {
    async fn run(self) {
        let mut call = Call::new(
            &self.pipeline,
            &self.model,
            &self.challenger,
            Route::Shadow,
            None,
            Origin {
                identity: self.identity.clone(),
                generation: self.generation,
                draw: None,
                inputs_sha256: self.inputs_sha256,
                sampled: self.sampled,
            },
        );
        let budget = &self.pipeline.shadow_cpu;
        let (result, cpu) = Budgeted::new(budget, async {
            call.admissible()?;
            let checked =
                validate::check_inputs(&self.answer.inputs, self.challenger.backend.info());
            call.validation = match checked {
                Ok(()) => crate::decisions::Validation::Passed,
                Err(_) => crate::decisions::Validation::Failed,
            };
            checked.map_err(Error::Validation)?;
            call.run(&self.answer.inputs, Wait::No).await
        })
        .await;
        if let Err(Error::Unavailable { .. }) = &result {
            // Refused without running: a drop, not a request of the
            // challenger's (its breaker probe, if any, ends as neutral when
            // the call is dropped).
            self.challenger.metrics.telemetry().record_shadow(
                &self.model.name,
                &self.challenger.name,
                "dropped",
            );
            return;
        }
        // What the next copy to this challenger is expected to cost: a
        // moving average of what its copies that ran took.
        let cost = &self.challenger.shadow_cost_ns;
        let previous = cost.load(Ordering::Relaxed);
        let took = cpu.as_nanos().min(u64::MAX as u128) as u64;
        cost.store(previous - previous / 4 + took / 4, Ordering::Relaxed);
        let compared = match &result {
            Ok(outputs) => {
                let shadow = self.model.shadow.as_ref();
                let (output, tolerance) =
                    shadow.map_or((None, 0.0), |s| (s.compare_output.as_deref(), s.tolerance));
                match compare(&self.answer.outputs, outputs, output, tolerance) {
                    Ok(true) => "agree",
                    Ok(false) => "disagree",
                    Err(e) => {
                        log(&self.challenger, &self.identity, &e);
                        "error"
                    }
                }
            }
            Err(e) => {
                log(&self.challenger, &self.identity, &e.to_string());
                "error"
            }
        };
        self.challenger.metrics.telemetry().record_shadow(
            &self.model.name,
            &self.challenger.name,
            compared,
        );
        // A copy that failed did not agree either.
        self.challenger
            .metrics
            .tally()
            .compared(compared == "agree");
        call.record(result.as_ref().map(|_| ()));
    }
}

fn log(challenger: &Version, identity: &crate::decisions::Identity, message: &str) {
    if let Some(suppressed) = challenger.error_log.check() {
        tracing::warn!(
            model = %challenger.model,
            version = %challenger.name,
            request_id = %Escaped(&identity.request_id),
            trace_id = identity.trace.map(|t| t.trace_id_hex()),
            suppressed,
            "shadow call failed: {}",
            Escaped(message)
        );
    }
}

/// The CPU time shadows may use: a token bucket refilled at a share of
/// the machine's cores, holding at most a quarter second of that share.
pub(super) struct CpuBudget {
    /// Core-seconds per second shadows may use.
    rate: f64,
    state: Mutex<Bucket>,
    /// Expected CPU time of the shadow calls running now, nanoseconds.
    reserved_ns: Arc<AtomicU64>,
}

/// A running shadow call's reservation, given back when dropped.
pub(super) struct Running {
    reserved: Arc<AtomicU64>,
    ns: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.ns, Ordering::AcqRel);
    }
}

struct Bucket {
    /// Seconds of CPU time left (negative after an expensive call).
    balance: f64,
    refilled: Instant,
}

/// The bucket's size, in seconds of its refill rate.
const BURST_SECONDS: f64 = 0.25;

impl CpuBudget {
    pub(super) fn new(percent: f64) -> Self {
        let percent = if percent.is_finite() {
            percent.clamp(0.0, 100.0)
        } else {
            0.0
        };
        let rate = crate::cpu::cores() as f64 * percent / 100.0;
        CpuBudget {
            rate,
            state: Mutex::new(Bucket {
                balance: rate * BURST_SECONDS,
                refilled: Instant::now(),
            }),
            reserved_ns: Arc::default(),
        }
    }

    /// Whether a shadow call may start now.
    /// A shadow call expected to cost `estimate` may start now: the budget
    /// has time left beyond what the calls running are expected to use.
    /// Reserving at the start, not only charging at the end, keeps a burst
    /// of copies to a slow challenger from all starting at once.
    pub(super) fn start(&self, estimate: Duration) -> Option<Running> {
        if self.rate <= 0.0 {
            return None;
        }
        // Unknown cost (a challenger's first copy): assume a millisecond.
        let estimate = if estimate.is_zero() {
            Duration::from_millis(1)
        } else {
            estimate
        };
        let reserved = self.reserved_ns.load(Ordering::Acquire) as f64 / 1e9;
        if self.available_balance() - reserved <= 0.0 {
            return None;
        }
        let ns = estimate.as_nanos().min(u64::MAX as u128) as u64;
        self.reserved_ns.fetch_add(ns, Ordering::AcqRel);
        Some(Running {
            reserved: self.reserved_ns.clone(),
            ns,
        })
    }

    /// Charges a shadow call's CPU time.
    pub(super) fn spend(&self, cpu: Duration) {
        if let Ok(mut bucket) = self.state.lock() {
            bucket.balance -= cpu.as_secs_f64();
        }
    }

    fn available_balance(&self) -> f64 {
        let Ok(mut bucket) = self.state.lock() else {
            return f64::NEG_INFINITY;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        bucket.balance = (bucket.balance + elapsed * self.rate).min(self.rate * BURST_SECONDS);
        bucket.balance
    }
}

/// A shadow call charged to the [`CpuBudget`] poll by poll for the CPU
/// time its polls took on the shadow thread, not the time it waited.
/// What the call's work on pool threads used (large ONNX computations)
/// is charged too, when the job that did it ends.
struct Budgeted<'b, F: Future> {
    inner: Pin<Box<tokio::task::futures::TaskLocalFuture<Arc<AtomicU64>, F>>>,
    offloaded: Arc<AtomicU64>,
    budget: &'b CpuBudget,
    spent: Duration,
}

impl<'b, F: Future> Budgeted<'b, F> {
    fn new(budget: &'b CpuBudget, future: F) -> Self {
        let offloaded = Arc::new(AtomicU64::new(0));
        Budgeted {
            inner: Box::pin(cpu::OFFLOADED_NANOS.scope(offloaded.clone(), future)),
            offloaded,
            budget,
            spent: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for Budgeted<'_, F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = cpu::thread_cpu_time();
        let result = self.inner.as_mut().poll(cx);
        let took = cpu::thread_cpu_time().saturating_sub(start)
            + Duration::from_nanos(self.offloaded.swap(0, Ordering::Relaxed));
        self.budget.spend(took);
        self.spent += took;
        result.map(|output| (output, self.spent))
    }
}

/// Runs shadow calls on a thread of their own at the lowest scheduling
/// priority (nice 19): when served requests want the CPU, the kernel
/// gives it to them first, so a shadow never sits between a request and
/// a core. Ends when dropped.
pub(super) struct Executor {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Executor {
    pub(super) fn start() -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("shadows".into())
            .spawn(move || {
                crate::cpu::lower_priority(19);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx
            .recv()
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(Executor {
            handle,
            _stop: stop,
        })
    }

    pub(super) fn spawn(&self, job: impl Future<Output = ()> + Send + 'static) {
        self.handle.spawn(job);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_budget_refills_at_its_share() {
        let budget = CpuBudget::new(10.0);
        // Calls expected to cost a second each: the first reserves more
        // than the whole burst, the second must wait for it.
        let first = budget
            .start(Duration::from_secs(1))
            .expect("a call may start");
        assert!(budget.start(Duration::from_micros(10)).is_none());
        drop(first);
        assert!(budget.start(Duration::from_micros(10)).is_some());
        // A call that took far more than the burst: no more shadows until
        // the share has paid it back.
        budget.spend(Duration::from_secs(1));
        assert!(budget.start(Duration::from_micros(10)).is_none());
        let off = CpuBudget::new(0.0);
        assert!(off.start(Duration::ZERO).is_none());
    }
}
