//! A version's share of the cores. Every plugin call and ONNX computation
//! of a version runs through its [`Gate`]: at most `parallel` of them
//! execute at the same moment, whatever the number of calls admitted.
//!
//! A plugin call holds a slot only while it is being polled: a sandbox
//! yields to the executor at every epoch tick (1 ms), and [`Fair`] gives
//! the slot back at each yield, so the version's other calls take turns in
//! FIFO order and a flooded or looping version occupies at most `parallel`
//! cores; the rest of the machine serves other models. Without it, 64
//! looping calls queued on the executor ahead of every other request and
//! pushed another model's p99 from 1.3 ms to over 200 ms.
//!
//! Short calls, nearly all of them, never touch the semaphore: a call's
//! first slice needs no slot while no call of the version waits for one,
//! and its next [`BORROWED_SLICES`] need none while, in addition, fewer
//! gated calls than cores are being polled. Past those slices, or while
//! its version has a queue, a call takes turns like any other. Before that second rule, the few short calls
//! that spanned an epoch tick made every later call queue for the one
//! slot of a two-core machine: a model alone served 35 % fewer requests at
//! 64 connections than with `max_parallel = 64`. (Letting any call of a
//! version alone in the gates borrow instead let 64 looping calls push
//! another model's p99 to 80 ms.)

mod pool;

pub(crate) use pool::{Pool, PoolError};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// The machine's cores (what `available_parallelism` reports).
pub(crate) fn cores() -> usize {
    static CORES: std::sync::LazyLock<usize> =
        std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    *CORES
}

tokio::task_local! {
    /// CPU time (ns) that [`Pool`] jobs started by the current task used,
    /// for a task whose CPU time is budgeted (shadow copies): the job adds
    /// to it when it ends.
    pub(crate) static OFFLOADED_NANOS: Arc<std::sync::atomic::AtomicU64>;
}

/// The CPU time the calling thread has used. Wall time would charge a
/// shadow for the time the kernel gave the CPU to served requests (the
/// shadow thread runs at the lowest priority, so that is often).
pub(crate) fn thread_cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    if let Some(now) = clock_time(libc::CLOCK_THREAD_CPUTIME_ID) {
        return now;
    }
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed()
}

/// A thread's CPU clock, readable from any thread: how much CPU time the
/// thread that started it has used since. The compute threads start one
/// per job, so a request that gives up on a job can tell whether the job
/// ran or waited for the CPU. Read it only while that thread lives (the
/// pools' threads live as long as their pool).
pub(crate) struct ThreadClock {
    #[cfg(target_os = "linux")]
    id: libc::clockid_t,
    #[cfg(not(target_os = "linux"))]
    wall: std::time::Instant,
    start: Duration,
}

impl ThreadClock {
    /// Starts on the calling thread.
    pub(crate) fn start() -> Self {
        #[cfg(target_os = "linux")]
        {
            let mut id: libc::clockid_t = 0;
            // SAFETY: pthread_getcpuclockid writes one clockid_t for the
            // calling thread through a valid pointer.
            if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) } != 0 {
                id = libc::CLOCK_THREAD_CPUTIME_ID;
            }
            let mut clock = ThreadClock {
                id,
                start: Duration::ZERO,
            };
            clock.start = clock.read();
            clock
        }
        #[cfg(not(target_os = "linux"))]
        ThreadClock {
            wall: std::time::Instant::now(),
            start: Duration::ZERO,
        }
    }

    /// CPU time used since [`ThreadClock::start`].
    pub(crate) fn elapsed(&self) -> Duration {
        #[cfg(target_os = "linux")]
        return self.read().saturating_sub(self.start);
        #[cfg(not(target_os = "linux"))]
        return self.wall.elapsed();
    }

    #[cfg(target_os = "linux")]
    fn read(&self) -> Duration {
        clock_time(self.id).unwrap_or(self.start)
    }
}

/// The time of clock `id`, if it can be read.
#[cfg(target_os = "linux")]
pub(crate) fn clock_time(id: libc::clockid_t) -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer;
    // an invalid clock id is an error, not undefined behaviour.
    (unsafe { libc::clock_gettime(id, &mut now) } == 0)
        .then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// `future`'s output and the time spent polling it: how long it ran, not
/// how long it waited for a turn on the cores (see [`Gate`]) or for
/// another thread. Two clock reads per poll.
pub(crate) async fn timed<F: Future>(future: F) -> (F::Output, Duration) {
    let mut future = std::pin::pin!(future);
    let mut running = Duration::ZERO;
    let output = std::future::poll_fn(|cx| {
        let start = std::time::Instant::now();
        let poll = future.as_mut().poll(cx);
        running += start.elapsed();
        poll
    })
    .await;
    (output, running)
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux; a
/// no-op elsewhere). Threads of background work call it once at start: an
/// unprivileged thread can never raise its priority back.
/// Threads inherit their creator's nice value: create them from a thread
/// that was never lowered.
pub(crate) fn lower_priority(nice: i32) {
    // SAFETY: setpriority only changes this thread's nice value (Linux:
    // PRIO_PROCESS with 0 names the calling thread).
    #[cfg(target_os = "linux")]
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "cannot lower a background thread's priority; it competes with requests"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// The default share: half the cores, at least one.
pub(crate) fn default_parallel() -> u32 {
    (cores() / 2).max(1) as u32
}

/// Calls being polled inside a gate right now, with a slot or without.
static EXECUTING: AtomicUsize = AtomicUsize::new(0);

/// Slots of one version.
#[derive(Debug)]
pub struct Gate {
    slots: Arc<Semaphore>,
    /// Calls of the version waiting for a slot: while there are any, the
    /// version is over its share and new calls queue too.
    waiting: Arc<AtomicUsize>,
}

type Acquiring = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

impl Gate {
    pub fn new(parallel: u32) -> Self {
        let parallel = parallel.max(1);
        Gate {
            slots: Arc::new(Semaphore::new(parallel as usize)),
            waiting: Arc::default(),
        }
    }

    /// `future`, polled only while it holds one of the slots. The caller
    /// pins it (`std::pin::pin!`), where it lives anyway.
    pub fn run<F: Future + Unpin>(&self, future: F) -> Fair<F> {
        Fair {
            inner: future,
            slots: self.slots.clone(),
            waiting: self.waiting.clone(),
            acquiring: None,
            // A call's first slice runs without a slot while the version
            // is within its share: most calls finish in it (microseconds)
            // and never touch the semaphore, so a version alone on the
            // machine uses every core. Only calls that yield (they ran a
            // whole epoch tick) take turns.
            free_slice: self.waiting.load(Ordering::Acquire) == 0,
            polls: 0,
        }
    }

    /// A slot for a computation that cannot yield (ONNX): held until the
    /// permit is dropped.
    pub async fn enter(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }
}

/// See [`Gate::run`].
pub struct Fair<F: Future + Unpin> {
    inner: F,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    acquiring: Option<Acquiring>,
    free_slice: bool,
    /// Slices run so far, with a slot or without.
    polls: u32,
}

/// Slices after its first a call may run without a slot, when a core is
/// free of gated calls: enough for a short call that spans an epoch tick
/// or two, far less than a long or looping call needs (those take turns
/// on their version's share).
const BORROWED_SLICES: u32 = 2;

impl<F: Future + Unpin> Drop for Fair<F> {
    fn drop(&mut self) {
        if self.acquiring.is_some() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<F: Future + Unpin> Fair<F> {
    /// Polls the call, counted as executing (uncounted again even if the
    /// call panics).
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<F::Output> {
        struct Executing;
        impl Drop for Executing {
            fn drop(&mut self) {
                EXECUTING.fetch_sub(1, Ordering::AcqRel);
            }
        }
        EXECUTING.fetch_add(1, Ordering::AcqRel);
        let _executing = Executing;
        self.polls = self.polls.saturating_add(1);
        Pin::new(&mut self.inner).poll(cx)
    }

    /// Whether this call may run a slice beyond its version's share: it
    /// has run at most [`BORROWED_SLICES`] slices after its first (a short
    /// call that happened to span an epoch tick, not a long or looping
    /// one), no call of its version waits for a slot (a borrower never
    /// jumps the queue), and a core is free of gated calls.
    fn may_borrow(&self) -> bool {
        self.polls <= BORROWED_SLICES
            && self.waiting.load(Ordering::Acquire) == 0
            && EXECUTING.load(Ordering::Acquire) < cores()
    }
}

impl<F: Future + Unpin> Future for Fair<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if std::mem::take(&mut this.free_slice) {
            return this.poll_inner(cx);
        }
        if this.acquiring.is_none() && this.may_borrow() {
            return this.poll_inner(cx);
        }
        let permit = match this.slots.clone().try_acquire_owned() {
            // A waiter queued first keeps its turn.
            Ok(permit) if this.acquiring.is_none() => Some(permit),
            other => {
                drop(other);
                if this.acquiring.is_none() {
                    this.waiting.fetch_add(1, Ordering::AcqRel);
                }
                let acquiring = this
                    .acquiring
                    .get_or_insert_with(|| Box::pin(this.slots.clone().acquire_owned()));
                match acquiring.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(permit) => {
                        this.acquiring = None;
                        this.waiting.fetch_sub(1, Ordering::AcqRel);
                        // Never closed; if it were, run without a slot.
                        permit.ok()
                    }
                }
            }
        };
        let result = this.poll_inner(cx);
        // Given back at every yield: the next call of the version runs.
        drop(permit);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many calls run through a gate, once past the slices they
    /// may run without a slot, at most `parallel` are inside their future
    /// at once, and all of them finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn at_most_parallel_calls_execute_at_once() {
        let gate = Arc::new(Gate::new(2));
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (gate, inside, most) = (gate.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    gate.run(std::pin::pin!(async {
                        // The first slice, and the borrowed ones after it,
                        // run without a slot.
                        for _ in 0..=BORROWED_SLICES {
                            tokio::task::yield_now().await;
                        }
                        for _ in 0..20 {
                            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let end =
                                std::time::Instant::now() + std::time::Duration::from_micros(200);
                            while std::time::Instant::now() < end {
                                std::hint::spin_loop();
                            }
                            inside.fetch_sub(1, Ordering::SeqCst);
                            tokio::task::yield_now().await;
                        }
                    }))
                    .await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?}");
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}
