//! A pool of threads at a lower scheduling priority, fed by a bounded
//! queue, for CPU work that must not hold the executor's workers: large
//! requests' decoding, validation and encoding (the pipeline's bulk pool),
//! and large ONNX computations. When the executor's threads want the cores
//! the kernel gives them most of the time (a nice-10 thread weighs about a
//! tenth of a nice-0 one); when they do not, the pool uses the whole
//! machine. A job whose caller went away before it started is skipped, so
//! the queue never holds work nobody waits for.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run.
#[derive(Debug)]
pub(crate) enum PoolError {
    /// The queue is full.
    Full,
    /// The job was not started by its deadline.
    Late,
    /// The job panicked (a bug of the gateway).
    Panicked,
}

/// The pool; its threads end when it is dropped.
pub(crate) struct Pool {
    jobs: SyncSender<Job>,
}

impl Pool {
    /// `threads` threads named `{name}-{i}` at `nice`, `queue` jobs waiting
    /// at most.
    pub(crate) fn start(
        name: &str,
        threads: usize,
        nice: i32,
        queue: usize,
    ) -> std::io::Result<Self> {
        let queue = queue.max(1);
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    super::lower_priority(nice);
                    work(&receiver);
                })?;
        }
        Ok(Pool { jobs })
    }

    /// Runs `f` on the pool and waits for it without blocking the executor.
    /// A job not started by `start_by` is skipped ([`PoolError::Late`]); a
    /// started one runs to its end (its work is bounded by its input).
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        start_by: Instant,
    ) -> Result<T, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let charge = super::OFFLOADED_NANOS.try_with(Arc::clone).ok();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            if Instant::now() > start_by {
                let _ = tx.send(Ok(Err(PoolError::Late)));
                return;
            }
            let started = charge.as_ref().map(|_| super::thread_cpu_time());
            let result = catch_unwind(AssertUnwindSafe(f)).map(Ok);
            if let (Some(charge), Some(started)) = (charge, started) {
                let used = super::thread_cpu_time().saturating_sub(started);
                charge.fetch_add(
                    used.as_nanos().min(u64::MAX as u128) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            let _ = tx.send(result);
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Full),
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Panicked),
        }
        match rx.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(PoolError::Panicked),
        }
    }
}

/// How long a thread waits for work before it gives its freed memory back.
const IDLE: Duration = Duration::from_secs(1);

fn work(receiver: &Mutex<Receiver<Job>>) {
    let mut worked = false;
    loop {
        // The lock is held only while waiting for the next job.
        let job = match receiver.lock() {
            Ok(receiver) => receiver.recv_timeout(IDLE),
            Err(_) => return,
        };
        match job {
            Ok(job) => {
                job();
                worked = true;
            }
            Err(RecvTimeoutError::Timeout) if std::mem::take(&mut worked) => release_memory(),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Returns what this thread freed to the system. mimalloc keeps the
/// memory a thread allocated (a job's outputs, freed later by the thread
/// that sent them) in that thread's heap until the thread allocates again:
/// an idle pool thread never does, and after 100,000-row ONNX batches the
/// gateway stayed 97 % above its baseline (soak benchmark).
fn release_memory() {
    // SAFETY: mi_collect has no preconditions; without mimalloc as the
    // global allocator (the tests) it collects an empty heap.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    /// Occupies the pool's one thread until the returned sender is used.
    async fn block(
        pool: &Pool,
    ) -> (
        impl std::future::Future<Output = bool> + '_,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started, has_started) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let mut running = Box::pin(pool.run(
            move || {
                let _ = started.send(());
                wait.recv().is_ok()
            },
            later(),
        ));
        assert!(poll_once(&mut running).await.is_none());
        has_started.recv().unwrap();
        (async move { running.await.unwrap() }, release)
    }

    #[tokio::test]
    async fn runs_jobs_refuses_past_the_queue_and_survives_a_panic() {
        let pool = Pool::start("test", 1, 10, 1).unwrap();
        assert_eq!(pool.run(|| 6 * 7, later()).await.unwrap(), 42);
        assert!(matches!(
            pool.run(|| -> () { panic!("a bug") }, later()).await,
            Err(PoolError::Panicked)
        ));
        // One job running (blocked), one queued: the third is refused.
        let (running, release) = block(&pool).await;
        let mut queued = Box::pin(pool.run(|| 1, later()));
        assert!(poll_once(&mut queued).await.is_none());
        assert!(matches!(
            pool.run(|| 2, later()).await,
            Err(PoolError::Full)
        ));
        release.send(()).unwrap();
        assert!(running.await);
        assert_eq!(queued.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_job_not_started_by_its_deadline_is_skipped() {
        let pool = Pool::start("test", 1, 10, 1).unwrap();
        let (running, release) = block(&pool).await;
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let mut late = Box::pin(pool.run(
            move || flag.store(true, std::sync::atomic::Ordering::Relaxed),
            Instant::now() + Duration::from_millis(1),
        ));
        assert!(poll_once(&mut late).await.is_none());
        std::thread::sleep(Duration::from_millis(5));
        release.send(()).unwrap();
        assert!(running.await);
        assert!(matches!(late.await, Err(PoolError::Late)));
        assert!(!ran.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_budgeted_task_is_charged_for_its_jobs_cpu_time() {
        let pool = Pool::start("test", 1, 10, 1).unwrap();
        let charged = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let spin = || {
            let start = super::super::thread_cpu_time();
            while super::super::thread_cpu_time() - start < Duration::from_millis(20) {}
        };
        super::super::OFFLOADED_NANOS
            .scope(charged.clone(), pool.run(spin, later()))
            .await
            .unwrap();
        let nanos = charged.load(std::sync::atomic::Ordering::Relaxed);
        assert!(nanos >= 20_000_000, "{nanos} ns charged");
        // Outside a budgeted task nothing is charged anywhere.
        pool.run(spin, later()).await.unwrap();
        assert_eq!(charged.load(std::sync::atomic::Ordering::Relaxed), nanos);
    }

    /// Polls once: `Some` if the future finished.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
