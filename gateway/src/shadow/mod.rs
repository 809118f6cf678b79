//! How busy a server is, and how a challenger's answer compares with the
//! champion's: what the pipeline's shadows (`pipeline/shadows.rs`) decide
//! with. A leaf: it knows tensors, not versions or requests.
//!
//! Shadows use spare CPU only: while the served traffic saturates the
//! machine, copies are shed (counted as `dropped`). Saturated means either
//! as many inference requests in flight as the machine has cores, or tasks
//! waiting their turn on the executor: a probe yields every few
//! milliseconds and measures how long it waits to run again, and three
//! long waits in a row mean saturation (see [`Load`]). On one runtime, a
//! 100 % shadow at 64 connections had halved the champion's throughput;
//! counting requests in flight alone kept 79-92 % of it (`cargo bench
//! --bench load`), since at saturation the other worker is as often parsing
//! HTTP as inside a request.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::tensor::{self, Datatype, Tensor};

/// How often the probe measures the executor's queue.
const PROBE_EVERY: Duration = Duration::from_millis(5);

/// A task that waited longer than this to run again after yielding, in
/// [`SUSTAINED`] probes in a row, means other tasks queue for the CPU:
/// serving traffic saturates it. In a row: one long wait may be the
/// operating system preempting the thread, not the executor's queue.
const SATURATED_WAIT: Duration = Duration::from_micros(200);
const SUSTAINED: usize = 3;

/// Probes in a row without a shadow dispatch after which the probe pauses
/// (a second): a gateway without shadow traffic runs no timer for it.
const IDLE_PROBES: u32 = 200;

/// How busy one server is: inference requests in flight, and how long a
/// task last waited for its turn on the executor.
#[derive(Debug, Default)]
pub(crate) struct Load {
    in_flight: AtomicUsize,
    queue_wait_us: AtomicU64,
    /// Whether the probe runs; it pauses without shadow traffic.
    probing: AtomicBool,
    /// Set by every saturation check, cleared by the probe.
    asked: AtomicBool,
    wake: Arc<Notify>,
}

impl Drop for Load {
    fn drop(&mut self) {
        // Lets a paused probe see that the server is gone.
        self.wake.notify_one();
    }
}

impl Load {
    /// Starts the probe on the current runtime; it measures only while
    /// shadows are being dispatched, and ends when `load` is dropped.
    pub(crate) fn spawn_probe(load: &Arc<Load>) {
        let weak: Weak<Load> = Arc::downgrade(load);
        tokio::spawn(async move {
            // Paused until a saturation check asks for it (or the server
            // is gone: see `Drop`).
            while let Some(wake) = weak.upgrade().map(|load| load.wake.clone()) {
                wake.notified().await;
                if !Self::measure(&weak).await {
                    break;
                }
            }
        });
    }

    /// Measures every [`PROBE_EVERY`] until nobody asked for
    /// [`IDLE_PROBES`] probes; `false` once the server is gone.
    async fn measure(weak: &Weak<Load>) -> bool {
        let mut every = tokio::time::interval(PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = [0u64; SUSTAINED];
        let mut unasked = 0;
        for n in 0usize.. {
            every.tick().await;
            let start = Instant::now();
            tokio::task::yield_now().await;
            last[n % SUSTAINED] = start.elapsed().as_micros().min(u64::MAX as u128) as u64;
            let Some(load) = weak.upgrade() else {
                return false;
            };
            let shortest = last.iter().copied().min().unwrap_or(0);
            load.queue_wait_us.store(shortest, Ordering::Relaxed);
            unasked = if load.asked.swap(false, Ordering::Relaxed) {
                0
            } else {
                unasked + 1
            };
            if unasked >= IDLE_PROBES {
                load.queue_wait_us.store(0, Ordering::Relaxed);
                load.probing.store(false, Ordering::Release);
                return true;
            }
        }
        true
    }

    /// The shortest of the probe's last [`SUSTAINED`] measurements (0
    /// while it pauses); starts the probe if it pauses.
    pub(crate) fn queue_wait(&self) -> Duration {
        self.asked.store(true, Ordering::Relaxed);
        if !self.probing.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
        Duration::from_micros(self.queue_wait_us.load(Ordering::Relaxed))
    }
}

/// Marks an inference request in flight (in one server's [`Load`]) for as
/// long as it lives.
pub(crate) struct Busy<'a>(&'a Load);

impl<'a> Busy<'a> {
    pub(crate) fn enter(load: &'a Load) -> Busy<'a> {
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(load)
    }

    /// Whether requests in flight (this one included) occupy every core,
    /// or tasks queue for the executor.
    pub(crate) fn saturated(&self) -> bool {
        self.0.in_flight.load(Ordering::Relaxed) >= crate::cpu::cores()
            || self.0.queue_wait() >= SATURATED_WAIT
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the challenger's outputs agree with the answer: the output named
/// `output`, else the first BYTES output of the answer (a label, compared
/// exactly), else every output of the answer (numbers within `tolerance`).
/// `Err` when the challenger did not produce what is compared.
pub(crate) fn compare(
    answer: &[Tensor],
    challenger: &[Tensor],
    output: Option<&str>,
    tolerance: f64,
) -> Result<bool, String> {
    let names: Vec<&str> = match output {
        Some(name) => vec![name],
        None => match answer.iter().find(|t| t.datatype == Datatype::Bytes) {
            Some(label) => vec![label.name.as_str()],
            None => answer.iter().map(|t| t.name.as_str()).collect(),
        },
    };
    for name in names {
        let Some(a) = answer.iter().find(|t| t.name == name) else {
            return Err(format!("the answer has no output `{name}` to compare"));
        };
        let Some(c) = challenger.iter().find(|t| t.name == name) else {
            return Err(format!("the challenger returned no output `{name}`"));
        };
        if a.shape != c.shape {
            return Ok(false);
        }
        let same = match (a.datatype, c.datatype) {
            (Datatype::Bytes, Datatype::Bytes) => a.data == c.data,
            (Datatype::Bytes, _) | (_, Datatype::Bytes) => false,
            _ => {
                let (x, y) = (tensor::numbers(a), tensor::numbers(c));
                x.len() == y.len()
                    && x.iter()
                        .zip(&y)
                        .all(|(p, q)| (p - q).abs() <= tolerance || (p.is_nan() && q.is_nan()))
            }
        };
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(name: &str, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: Datatype::Fp32,
            shape: vec![values.len() as i64],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn label(values: &[&str]) -> Tensor {
        crate::tensor::bytes_tensor("label", values)
    }

    #[test]
    fn labels_are_compared_exactly_and_first() {
        let answer = [label(&["a", "b"]), fp32("p", &[0.1, 0.9])];
        assert_eq!(
            compare(
                &answer,
                &[label(&["a", "b"]), fp32("p", &[0.5, 0.5])],
                None,
                0.0
            ),
            Ok(true)
        );
        assert_eq!(
            compare(
                &answer,
                &[label(&["a", "c"]), fp32("p", &[0.1, 0.9])],
                None,
                0.0
            ),
            Ok(false)
        );
        assert!(compare(&answer, &[fp32("p", &[0.1, 0.9])], None, 0.0).is_err());
    }

    #[test]
    fn numbers_are_compared_within_the_tolerance() {
        let answer = [fp32("p", &[0.1, 0.9])];
        assert_eq!(
            compare(&answer, &[fp32("p", &[0.1001, 0.8999])], None, 1e-3),
            Ok(true)
        );
        assert_eq!(
            compare(&answer, &[fp32("p", &[0.2, 0.8])], None, 1e-3),
            Ok(false)
        );
        assert_eq!(
            compare(&answer, &[fp32("p", &[0.1, 0.9, 0.0])], None, 1e-3),
            Ok(false)
        );
        let both = [label(&["a"]), fp32("p", &[0.1])];
        assert_eq!(
            compare(&both, &[label(&["b"]), fp32("p", &[0.1])], Some("p"), 0.0),
            Ok(true)
        );
    }

    /// The probe sees tasks queueing on the executor, and sees it stop.
    #[test]
    fn the_probe_measures_tasks_waiting_for_the_executor() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let load = Arc::new(Load::default());
            Load::spawn_probe(&load);
            assert_eq!(load.queue_wait(), Duration::ZERO, "paused until asked");
            // 80 tasks on two workers, each computing for 100 us between
            // yields: a task that yields waits ~4 ms for its next turn.
            let busy: Vec<_> = (0..80)
                .map(|_| {
                    tokio::spawn(async {
                        let end = Instant::now() + Duration::from_millis(60);
                        while Instant::now() < end {
                            let slice = Instant::now() + Duration::from_micros(100);
                            while Instant::now() < slice {
                                std::hint::spin_loop();
                            }
                            tokio::task::yield_now().await;
                        }
                    })
                })
                .collect();
            let mut busy_waits = Vec::new();
            for _ in 0..8 {
                tokio::time::sleep(PROBE_EVERY).await;
                busy_waits.push(load.queue_wait());
            }
            assert!(
                busy_waits.iter().any(|w| *w >= SATURATED_WAIT),
                "{busy_waits:?}"
            );
            for task in busy {
                task.await.unwrap();
            }
            // Idle again: at least one of the next measurements is short
            // (one, not all: the machine running the test may be busy).
            let mut idle = Vec::new();
            for _ in 0..10 {
                tokio::time::sleep(PROBE_EVERY * 2).await;
                idle.push(load.queue_wait());
            }
            assert!(idle.iter().any(|w| *w < SATURATED_WAIT), "{idle:?}");
        });
    }
}
