//! Per-version admission: a bounded number of plugin calls run, a bounded
//! number wait (no longer than their deadline), the rest are refused.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

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
pub(super) struct Admission {
    slots: Semaphore,
    max_concurrency: u32,
    waiting: AtomicU32,
    max_queue: u32,
}

impl Admission {
    pub(super) fn new(max_concurrency: u32, max_queue: u32) -> Self {
        Admission {
            slots: Semaphore::new(max_concurrency as usize),
            max_concurrency,
            waiting: AtomicU32::new(0),
            max_queue,
        }
    }

    pub(super) async fn admit(
        &self,
        deadline: Instant,
    ) -> Result<SemaphorePermit<'_>, AdmissionError> {
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

    /// The refusal a request would get now, without waiting: every slot
    /// busy and the queue full.
    pub(super) fn full(&self) -> Option<AdmissionError> {
        let queued = self.waiting.load(Ordering::Acquire);
        (self.slots.available_permits() == 0 && queued >= self.max_queue).then_some(
            AdmissionError::QueueFull {
                running: self.max_concurrency,
                queued,
            },
        )
    }

    /// A slot only if one is free now (shadow calls never wait).
    pub(super) fn try_admit(&self) -> Option<SemaphorePermit<'_>> {
        self.slots.try_acquire().ok()
    }
}

struct LeaveQueue<'a>(&'a AtomicU32);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
