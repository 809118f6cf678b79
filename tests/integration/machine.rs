//! Who has the machine. Tests that compare a model's latency during an
//! attack they make with its latency without one take the machine
//! [`alone`]: their attack takes a core by design, so another test loading
//! the other core would decide their result (the flood test once read
//! 6.8 ms against 0.32 ms that way, and 0.27 ms against 0.35 ms with
//! nothing else running). Everything that loads the machine for long, a
//! test gateway, a served gateway process or a plugin build, holds a
//! [`Shared`] part of it while it lives; it waits while a test has the
//! machine alone, and such a test waits until the shared parts in use are
//! given back. (The short runs of the `gateway` command line, `check`,
//! `replay` or `plugin test`, take none: a second or two each.)
//!
//! A thread that already holds a part never waits for another (a test
//! starting its second gateway while a test waits to be alone would
//! otherwise wait for itself); neither side waits past [`PATIENCE`], so a
//! part held on an unexpected thread delays, never deadlocks.

use std::cell::Cell;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// The longest either side waits: longer than any one test runs.
const PATIENCE: Duration = Duration::from_secs(240);

struct State {
    /// The thread of the test that has the machine alone, or is waiting
    /// to have it.
    alone: Option<ThreadId>,
    /// Shared parts in use.
    shared: usize,
}

static STATE: Mutex<State> = Mutex::new(State {
    alone: None,
    shared: 0,
});
static CHANGED: Condvar = Condvar::new();

thread_local! {
    /// Shared parts taken on this thread and not yet given back.
    static HELD: Cell<usize> = const { Cell::new(0) };
}

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on [`CHANGED`] while `busy` holds, at most [`PATIENCE`].
fn wait_while(
    mut state: MutexGuard<'static, State>,
    what: &str,
    mut busy: impl FnMut(&State) -> bool,
) -> MutexGuard<'static, State> {
    let deadline = Instant::now() + PATIENCE;
    while busy(&state) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("waited {PATIENCE:?} for {what}; going on");
            break;
        }
        state = CHANGED
            .wait_timeout(state, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    state
}

/// A part of the machine, given back when dropped.
pub struct Shared {
    thread: ThreadId,
}

/// A part of the machine for a gateway, a process or a build: waits while
/// another test has the machine alone.
pub fn share() -> Shared {
    let me = std::thread::current().id();
    let mut state = state();
    if HELD.get() == 0 {
        state = wait_while(state, "a test that runs alone", |s| {
            s.alone.is_some_and(|owner| owner != me)
        });
    }
    state.shared += 1;
    HELD.set(HELD.get() + 1);
    Shared { thread: me }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let mut state = state();
        state.shared = state.shared.saturating_sub(1);
        if std::thread::current().id() == self.thread {
            HELD.set(HELD.get().saturating_sub(1));
        }
        CHANGED.notify_all();
    }
}

/// The machine for the calling test alone, until dropped.
pub struct Alone {
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

/// Waits for the tests that hold parts of the machine to give them back;
/// meanwhile no other test takes one. One test at a time.
pub async fn alone() -> Alone {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let one_at_a_time = ONE_AT_A_TIME.lock().await;
    let me = std::thread::current().id();
    let mut state = state();
    state.alone = Some(me);
    // This thread's own parts (a gateway it started first) do not count.
    let mine = HELD.get();
    drop(wait_while(state, "the other tests' gateways", |s| {
        s.shared > mine
    }));
    Alone {
        _one_at_a_time: one_at_a_time,
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        state().alone = None;
        CHANGED.notify_all();
    }
}
