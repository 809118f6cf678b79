//! A pool of threads at a lower scheduling priority, fed by a bounded
//! queue, for CPU work that must not hold the executor's workers: large
//! requests' decoding, validation and encoding (the pipeline's bulk pool),
//! and large ONNX computations. When the executor's threads want the cores
//! the kernel gives them most of the time (a nice-10 thread weighs about a
//! tenth of a nice-0 one); when they do not, the pool uses the whole
//! machine. A job whose caller went away before it started is skipped, so
//! the queue never holds work nobody waits for.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run.
#[derive(Debug)]
pub(crate) enum PoolError {
    /// The queue is full.
    Full { queue: usize },
    /// The job panicked (a bug of the gateway).
    Panicked,
}

/// The pool; its threads end when it is dropped.
pub(crate) struct Pool {
    jobs: SyncSender<Job>,
    queue: usize,
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
        Ok(Pool { jobs, queue })
    }

    /// Runs `f` on the pool and waits for it without blocking the executor.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return;
            }
            let result = catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(result);
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Full { queue: self.queue }),
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Panicked),
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) | Err(_) => Err(PoolError::Panicked),
        }
    }
}

fn work(receiver: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job.
        let job = match receiver.lock() {
            Ok(receiver) => receiver.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_refuses_past_the_queue_and_survives_a_panic() {
        let bulk = Pool::start("test", 1, 10, 1).unwrap();
        assert_eq!(bulk.run(|| 6 * 7).await.unwrap(), 42);
        assert!(matches!(
            bulk.run(|| -> () { panic!("a bug") }).await,
            Err(PoolError::Panicked)
        ));
        // One job running (blocked), one queued: the third is refused.
        let (started, has_started) = std::sync::mpsc::channel();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let mut running = Box::pin(bulk.run(move || {
            let _ = started.send(());
            wait.recv().is_ok()
        }));
        assert!(poll_once(&mut running).await.is_none());
        has_started.recv().unwrap();
        let mut queued = Box::pin(bulk.run(|| 1));
        assert!(poll_once(&mut queued).await.is_none());
        assert!(matches!(
            bulk.run(|| 2).await,
            Err(PoolError::Full { queue: 1 })
        ));
        release.send(()).unwrap();
        assert!(running.await.unwrap());
        assert_eq!(queued.await.unwrap(), 1);
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
