//! Process-wide budgets: bytes held by requests in flight (bodies, decoded
//! tensors, outputs, encoded responses) and sandbox memory (the sum of the
//! memory caps of the plugin calls running). Past either, a request gets a
//! 503 with `Retry-After` instead of an allocation that could take the
//! process down.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes that requests in flight may hold together.
#[derive(Debug)]
pub(super) struct Bytes {
    used: AtomicUsize,
    limit: usize,
}

impl Bytes {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Bytes {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// What one request holds of a [`Bytes`] budget; given back when dropped.
#[derive(Debug)]
pub(super) struct Held {
    budget: Arc<Bytes>,
    bytes: usize,
}

impl Held {
    pub(super) fn none(budget: &Arc<Bytes>) -> Self {
        Held {
            budget: budget.clone(),
            bytes: 0,
        }
    }

    /// Takes `more` bytes of the budget, or none if that would pass it.
    pub(super) fn grow(&mut self, more: usize) -> Result<(), usize> {
        let budget = &self.budget;
        let mut used = budget.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(more);
            if next > budget.limit {
                return Err(budget.limit);
            }
            match budget
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.bytes += more;
                    return Ok(());
                }
                Err(now) => used = now,
            }
        }
    }

    /// Moves `n` of what is held (or all of it, if less) into a `Held` of
    /// its own, which gives it back when dropped.
    pub(super) fn split(&mut self, n: usize) -> Held {
        let n = n.min(self.bytes);
        self.bytes -= n;
        Held {
            budget: self.budget.clone(),
            bytes: n,
        }
    }

    /// Gives back `less` of what is held (a body dropped after decoding).
    pub(super) fn shrink(&mut self, less: usize) {
        let less = less.min(self.bytes);
        self.bytes -= less;
        self.budget.used.fetch_sub(less, Ordering::AcqRel);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Sandbox memory, in MiB: a plugin call holds its version's memory cap
/// while it runs. A call waits for memory no longer than its deadline.
#[derive(Debug)]
pub(super) struct SandboxMemory {
    mebibytes: Arc<Semaphore>,
    limit_bytes: usize,
}

impl SandboxMemory {
    pub(super) fn new(limit_bytes: usize) -> Self {
        SandboxMemory {
            mebibytes: Arc::new(Semaphore::new((limit_bytes >> 20).max(1))),
            limit_bytes,
        }
    }

    pub(super) fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    /// The memory for one call capped at `bytes`, waiting until `deadline`
    /// at most; `None` when it cannot be had by then (or ever). `share` is
    /// the calling version's part of the budget, at most half of it: a
    /// flooded version cannot take the memory every other model needs.
    pub(super) async fn take(
        &self,
        bytes: usize,
        deadline: Instant,
        share: &OnceLock<Arc<Semaphore>>,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let n = u32::try_from(bytes.div_ceil(1 << 20)).ok()?;
        let total = (self.limit_bytes >> 20).max(1);
        if n as usize > total {
            return None;
        }
        let share = share
            .get_or_init(|| Arc::new(Semaphore::new((total / 2).max(n as usize))))
            .clone();
        let mine = acquire(share, n, deadline).await?;
        let global = acquire(self.mebibytes.clone(), n, deadline).await?;
        Some((mine, global))
    }
}

async fn acquire(
    semaphore: Arc<Semaphore>,
    n: u32,
    deadline: Instant,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = semaphore.clone().try_acquire_many_owned(n) {
        return Some(permit);
    }
    tokio::time::timeout_at(deadline.into(), semaphore.acquire_many_owned(n))
        .await
        .ok()?
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_refused_past_the_budget_and_given_back() {
        let budget = Bytes::new(100);
        let mut a = Held::none(&budget);
        a.grow(60).unwrap();
        let mut b = Held::none(&budget);
        assert_eq!(b.grow(50), Err(100));
        b.grow(40).unwrap();
        a.shrink(10);
        assert_eq!(budget.used(), 90);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn sandbox_memory_waits_until_the_deadline() {
        let memory = SandboxMemory::new(64 << 20);
        let (a, b) = (OnceLock::new(), OnceLock::new());
        let soon = || Instant::now() + std::time::Duration::from_millis(20);
        let first = memory.take(48 << 20, soon(), &a).await.unwrap();
        assert!(memory.take(32 << 20, soon(), &b).await.is_none());
        drop(first);
        assert!(memory.take(32 << 20, soon(), &b).await.is_some());
        assert!(
            memory.take(65 << 20, soon(), &b).await.is_none(),
            "never fits"
        );
        // One version holds at most half the budget (or one call, if its
        // cap is more than half).
        let c = OnceLock::new();
        let held = memory.take(16 << 20, soon(), &c).await.unwrap();
        let held2 = memory.take(16 << 20, soon(), &c).await.unwrap();
        assert!(memory.take(16 << 20, soon(), &c).await.is_none());
        assert!(memory.take(16 << 20, soon(), &b).await.is_some());
        drop((held, held2));
    }
}
