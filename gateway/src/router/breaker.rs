//! Per-version circuit breaker: a version whose plugin fails `failures`
//! times in a row is taken out of service for `cooldown` (requests get a
//! fast 503 naming it), then one probe request at a time is let through;
//! the first probe that succeeds closes the breaker, one that fails opens
//! it for another cooldown. Lock-free: the served path reads one atomic.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the breaker lets a request do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Closed: serve as usual.
    Closed,
    /// Half-open: this request is the one probe.
    Probe,
}

/// How a call ended, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin answered.
    Success,
    /// The plugin itself failed (trap, deadline, panic, malformed output...).
    Failure,
    /// Says nothing about the plugin (rejected input, refused admission).
    Neutral,
}

/// A transition worth a log line and a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened { failures: u32 },
    Closed,
}

#[derive(Debug)]
pub struct Breaker {
    /// Consecutive failures; 0 disables the breaker.
    threshold: u32,
    cooldown: Duration,
    consecutive: AtomicU32,
    /// Milliseconds since [`epoch`] until which the breaker is open; 0
    /// while closed.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    // +1: 0 means closed.
    epoch().elapsed().as_millis() as u64 + 1
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            threshold,
            cooldown,
            consecutive: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether a request may run now; `Err(seconds)` until a retry may.
    pub fn check(&self) -> Result<Pass, u32> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Ok(Pass::Closed);
        }
        let now = now_ms();
        if now >= until
            && self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(Pass::Probe);
        }
        Err((until.saturating_sub(now).div_ceil(1000)).max(1) as u32)
    }

    /// What [`Breaker::check`] would answer, without claiming the probe:
    /// front ends ask before reading a body, and the probe is claimed
    /// only when the call is about to run (a slow upload must not hold
    /// it).
    pub fn peek(&self) -> Result<(), u32> {
        let until = self.open_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = now_ms();
        if now >= until && !self.probing.load(Ordering::Acquire) {
            return Ok(());
        }
        Err((until.saturating_sub(now).div_ceil(1000)).max(1) as u32)
    }

    /// Records how a call that `check` let through ended.
    pub fn record(&self, pass: Pass, outcome: Outcome) -> Option<Transition> {
        if self.threshold == 0 {
            return None;
        }
        match (pass, outcome) {
            (Pass::Probe, Outcome::Success) => {
                self.consecutive.store(0, Ordering::Release);
                self.open_until_ms.store(0, Ordering::Release);
                self.probing.store(false, Ordering::Release);
                Some(Transition::Closed)
            }
            (Pass::Probe, Outcome::Failure) => {
                self.open_until_ms.store(
                    now_ms() + self.cooldown.as_millis() as u64,
                    Ordering::Release,
                );
                self.probing.store(false, Ordering::Release);
                None
            }
            (Pass::Probe, Outcome::Neutral) => {
                self.probing.store(false, Ordering::Release);
                None
            }
            (Pass::Closed, Outcome::Success) => {
                // Read first: no write (and no cache-line ping-pong) on the
                // usual path.
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                None
            }
            (Pass::Closed, Outcome::Failure) => {
                let failures = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= self.threshold
                    && self
                        .open_until_ms
                        .compare_exchange(
                            0,
                            now_ms() + self.cooldown.as_millis() as u64,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                {
                    return Some(Transition::Opened { failures });
                }
                None
            }
            (Pass::Closed, Outcome::Neutral) => None,
        }
    }

    /// Failures in a row needed to open, for messages.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// Whether requests are refused now (open, not yet probing).
    pub fn is_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_and_closes_after_a_good_probe() {
        let b = Breaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert_eq!(b.record(Pass::Closed, Outcome::Failure), None);
        }
        // A success in between starts the count over.
        b.record(Pass::Closed, Outcome::Success);
        b.record(Pass::Closed, Outcome::Failure);
        b.record(Pass::Closed, Outcome::Neutral);
        b.record(Pass::Closed, Outcome::Failure);
        assert_eq!(
            b.record(Pass::Closed, Outcome::Failure),
            Some(Transition::Opened { failures: 3 })
        );
        assert!(b.check().is_err());
        assert!(b.peek().is_err());
        std::thread::sleep(Duration::from_millis(40));
        // Peeking claims nothing.
        assert_eq!(b.peek(), Ok(()));
        assert_eq!(b.peek(), Ok(()));
        assert_eq!(b.check(), Ok(Pass::Probe));
        // One probe at a time.
        assert!(b.check().is_err());
        assert!(b.peek().is_err());
        b.record(Pass::Probe, Outcome::Failure);
        assert!(b.check().is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.check(), Ok(Pass::Probe));
        assert_eq!(
            b.record(Pass::Probe, Outcome::Success),
            Some(Transition::Closed)
        );
        assert_eq!(b.check(), Ok(Pass::Closed));
    }

    #[test]
    fn a_threshold_of_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_secs(1));
        for _ in 0..100 {
            b.record(Pass::Closed, Outcome::Failure);
        }
        assert_eq!(b.check(), Ok(Pass::Closed));
    }
}
