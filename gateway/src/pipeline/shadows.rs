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
//! 10 % by default) measured as the time shadow calls spend being polled.
//! A slow challenger therefore gets fewer copies, never more CPU.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::{Answer, Call, Error, Pipeline, Wait, budget};
use crate::router::breaker::Pass;
use crate::router::{self, Model, Route, Version};
use crate::shadow::compare;
use crate::telemetry::{self, Escaped};
use crate::validate;

/// Copies an answered request to the model's challengers, if it has any,
/// the request is sampled and there is room (see the module's doc).
pub(super) fn dispatch(
    pipeline: &Arc<Pipeline>,
    model: &Arc<Model>,
    answered: &Arc<Version>,
    answer: Answer,
    saturated: bool,
) {
    let Some(shadow) = &model.shadow else { return };
    if !router::sampled(shadow.sample_percent) {
        return;
    }
    let answer = Arc::new(answer);
    for challenger in &shadow.versions {
        if Arc::ptr_eq(challenger, answered) {
            continue;
        }
        let permit = match shadow.slots.clone().try_acquire_owned() {
            Ok(permit) if !saturated && pipeline.shadow_cpu.available() => permit,
            _ => {
                telemetry::record_shadow(&model.name, &challenger.name, "dropped");
                continue;
            }
        };
        let job = Job {
            pipeline: pipeline.clone(),
            model: model.clone(),
            challenger: challenger.clone(),
            answer: answer.clone(),
        };
        tokio::spawn(async move {
            job.run().await;
            drop(permit);
        });
    }
}

struct Job {
    pipeline: Arc<Pipeline>,
    model: Arc<Model>,
    challenger: Arc<Version>,
    answer: Arc<Answer>,
}

impl Job {
    async fn run(self) {
        let mut call = Call {
            pipeline: &self.pipeline,
            model: &self.model,
            version: &self.challenger,
            route: Route::Shadow,
            start: Instant::now(),
            bytes: budget::Held::none(&self.pipeline.bytes),
            pass: Pass::Closed,
            _busy: None,
        };
        let (result, cpu) = Timed::new(async {
            call.admissible()?;
            validate::check_inputs(&self.answer.inputs, self.challenger.backend.info())
                .map_err(Error::Validation)?;
            call.run(&self.answer.inputs, Wait::No).await
        })
        .await;
        self.pipeline.shadow_cpu.spend(cpu);
        let compared = match &result {
            Ok(outputs) => {
                let shadow = self.model.shadow.as_ref();
                let (output, tolerance) =
                    shadow.map_or((None, 0.0), |s| (s.compare_output.as_deref(), s.tolerance));
                match compare(&self.answer.outputs, outputs, output, tolerance) {
                    Ok(true) => "agree",
                    Ok(false) => "disagree",
                    Err(e) => {
                        log(&self.challenger, &e);
                        "error"
                    }
                }
            }
            Err(Error::Unavailable { .. }) => "dropped",
            Err(e) => {
                log(&self.challenger, &e.to_string());
                "error"
            }
        };
        telemetry::record_shadow(&self.model.name, &self.challenger.name, compared);
        call.record(result.as_ref().map(|_| ()));
    }
}

fn log(challenger: &Version, message: &str) {
    if let Some(suppressed) = challenger.error_log.check() {
        tracing::warn!(
            model = %challenger.model,
            version = %challenger.name,
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
        let rate = crate::cpu::cores() as f64 * percent.clamp(0.0, 100.0) / 100.0;
        CpuBudget {
            rate,
            state: Mutex::new(Bucket {
                balance: rate * BURST_SECONDS,
                refilled: Instant::now(),
            }),
        }
    }

    /// Whether a shadow call may start now.
    pub(super) fn available(&self) -> bool {
        if self.rate <= 0.0 {
            return false;
        }
        let Ok(mut bucket) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.refilled = now;
        bucket.balance = (bucket.balance + elapsed * self.rate).min(self.rate * BURST_SECONDS);
        bucket.balance > 0.0
    }

    /// Charges a finished shadow call's CPU time.
    pub(super) fn spend(&self, cpu: Duration) {
        if let Ok(mut bucket) = self.state.lock() {
            bucket.balance -= cpu.as_secs_f64();
        }
    }
}

/// A future and the time spent polling it: the CPU time it took on the
/// executor (its own work, not the time it waited).
struct Timed<F> {
    inner: Pin<Box<F>>,
    busy: Duration,
}

impl<F: Future> Timed<F> {
    fn new(future: F) -> Self {
        Timed {
            inner: Box::pin(future),
            busy: Duration::ZERO,
        }
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = (F::Output, Duration);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let start = Instant::now();
        let result = self.inner.as_mut().poll(cx);
        self.busy += start.elapsed();
        result.map(|output| (output, self.busy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_budget_refills_at_its_share() {
        let budget = CpuBudget::new(10.0);
        assert!(budget.available());
        // A call that took far more than the burst: no more shadows until
        // the share has paid it back.
        budget.spend(Duration::from_secs(1));
        assert!(!budget.available());
        let off = CpuBudget::new(0.0);
        assert!(!off.available());
    }
}
