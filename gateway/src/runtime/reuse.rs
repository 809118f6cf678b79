//! Plugin instances kept between calls, for versions whose policy lets an
//! instance serve more than one call (`calls_per_instance`).
//!
//! A fresh instance per call is the default and the strongest isolation: no
//! call can see what an earlier one left in linear memory. It is also most
//! of what a call costs (a store, an instantiation, and resetting the
//! memory afterwards: ~15-20 us against ~2 us for the call itself). A
//! version that opts in keeps instances that ended a call cleanly and hands
//! them to later calls of the same version, until each has served
//! `calls_per_instance` calls. An instance that trapped, hit a limit,
//! returned `internal` or returned malformed outputs is never kept; its
//! memory cap still counts everything it holds, across calls.
//!
//! Kept instances hold slots of the engine's instance pool, so they are
//! bounded three times: per version by the number of cores (more only
//! helps calls that run concurrently on the same core, which take long
//! enough not to notice an instantiation), per process by a share of the
//! pool ([`KEPT_SHARE`]), so that fresh calls of other versions always find
//! slots, and by the version's share of the pool: an instance holds one of
//! the version's sandboxes from its instantiation until it is dropped,
//! kept or running, so a version's running and kept instances together
//! never pass its half of the pool.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::Store;

use super::bindings::Model;
use super::sandbox::Host;

/// At most one in this many of the engine's instance slots is held by kept
/// instances.
pub(super) const KEPT_SHARE: u32 = 4;

/// An instantiated plugin and its store, between calls.
pub(super) struct Kept {
    pub(super) store: Store<Host>,
    pub(super) model: Model,
    /// Calls served so far.
    pub(super) calls: u32,
    /// Held while the instance is kept; `None` for an instance that has not
    /// been offered back yet.
    ticket: Option<Ticket>,
    /// One of the version's sandboxes, held as long as the instance lives.
    _sandbox: tokio::sync::OwnedSemaphorePermit,
}

impl Kept {
    pub(super) fn new(
        store: Store<Host>,
        model: Model,
        sandbox: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        Kept {
            store,
            model,
            calls: 0,
            ticket: None,
            _sandbox: sandbox,
        }
    }
}

/// The process-wide budget of kept instances.
#[derive(Debug)]
pub(super) struct Tickets {
    available: AtomicUsize,
}

impl Tickets {
    pub(super) fn new(n: usize) -> Arc<Self> {
        Arc::new(Tickets {
            available: AtomicUsize::new(n),
        })
    }

    fn take(self: &Arc<Self>) -> Option<Ticket> {
        self.available
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .ok()
            .map(|_| Ticket(self.clone()))
    }
}

/// One unit of [`Tickets`], returned when dropped.
struct Ticket(Arc<Tickets>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.available.fetch_add(1, Ordering::AcqRel);
    }
}

/// One version's kept instances.
pub struct InstancePool {
    idle: Mutex<Vec<Kept>>,
    calls_per_instance: u32,
    max_idle: usize,
    tickets: Arc<Tickets>,
    /// The version's share of the sandbox pool: every instance of the
    /// version, running or kept, holds one, so a flooded version cannot
    /// take every sandbox and starve the other models (half the pool, see
    /// `Runtime`).
    sandboxes: Arc<tokio::sync::Semaphore>,
}

impl InstancePool {
    pub(super) fn new(calls_per_instance: u32, tickets: Arc<Tickets>, sandboxes: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        InstancePool {
            idle: Mutex::new(Vec::new()),
            calls_per_instance: calls_per_instance.max(1),
            max_idle: cores.max(2),
            tickets,
            sandboxes: Arc::new(tokio::sync::Semaphore::new(sandboxes.max(1))),
        }
    }

    /// A pool that keeps nothing: every call gets a fresh instance.
    pub fn fresh() -> Self {
        Self::new(1, Tickets::new(0), tokio::sync::Semaphore::MAX_PERMITS)
    }

    /// One of the version's sandboxes, waiting for one no longer than
    /// `deadline`.
    pub(super) async fn sandbox(
        &self,
        deadline: std::time::Instant,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.sandboxes.clone().try_acquire_owned() {
            return Some(permit);
        }
        tokio::time::timeout_at(deadline.into(), self.sandboxes.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    /// The most recently kept instance, if any.
    pub(super) fn take(&self) -> Option<Kept> {
        if self.calls_per_instance == 1 {
            return None;
        }
        self.idle.lock().ok()?.pop()
    }

    /// Offers back an instance that just ended a call cleanly; it is kept
    /// if it has calls left, no call may be waiting for one of the
    /// version's sandboxes, and both budgets have room; dropped otherwise.
    pub(super) fn give_back(&self, mut kept: Kept) {
        kept.calls += 1;
        // With every sandbox of the version taken, calls may be waiting for
        // one, and would not see an idle instance: its sandbox goes to them.
        if kept.calls >= self.calls_per_instance || self.sandboxes.available_permits() == 0 {
            return;
        }
        if kept.ticket.is_none() {
            match self.tickets.take() {
                Some(ticket) => kept.ticket = Some(ticket),
                None => return,
            }
        }
        let refused = match self.idle.lock() {
            Ok(mut idle) if idle.len() < self.max_idle => {
                idle.push(kept);
                None
            }
            _ => Some(kept),
        };
        // Tearing an instance down takes microseconds: not under the lock.
        drop(refused);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_bounded_and_returned() {
        let tickets = Tickets::new(2);
        let a = tickets.take();
        let b = tickets.take();
        assert!(a.is_some() && b.is_some());
        assert!(tickets.take().is_none());
        drop(a);
        assert!(tickets.take().is_some());
    }
}
