//! What every backend of a version shares, whoever runs it: the types of
//! `wit/plugin.wit` (generated here, once, and reused by the runtime's
//! bindings), the limits one call runs under, the ways a call can fail, and
//! the fingerprint of an artifact.
//!
//! It depends on no other module of the gateway: `tensor`, `runtime`,
//! `onnx`, `validate` and the pipeline all build on it.

use std::fmt;
use std::time::{Duration, Instant};

wasmtime::component::bindgen!({
    inline: "
        package gateway:host;
        world types {
            import gateway:plugin/types@0.1.0;
        }
    ",
    path: "../wit",
});

pub use self::gateway::plugin::types::{Datatype, Error, ModelInfo, Tensor, TensorSpec};

/// Limits a single call runs under.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// When the call is interrupted.
    pub deadline: Instant,
    /// The time budget the deadline was derived from, for messages.
    pub timeout: Duration,
    /// Total bytes of linear memory across all the plugin's memories.
    pub memory_bytes: usize,
}

impl CallLimits {
    /// Limits for a call whose budget starts now.
    pub fn starting_now(timeout: Duration, memory_bytes: usize) -> Self {
        CallLimits {
            deadline: Instant::now() + timeout,
            timeout,
            memory_bytes,
        }
    }
}

/// Everything that can make a plugin call fail.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginError {
    /// The plugin's `infer` returned `invalid-input`: the caller's fault.
    Rejected(String),
    /// The plugin's `infer` returned `internal`.
    Failed(String),
    /// The call ran past its deadline and was interrupted.
    Deadline { limit: Duration },
    /// The deadline passed while the call waited for its turn on the
    /// cores (the version's share, or the compute threads): it had run
    /// for `ran`, less than half of `limit`. The load's doing, not the
    /// plugin's: 503, never counted against it.
    Starved { limit: Duration, ran: Duration },
    /// The plugin asked for more linear memory than its cap.
    MemoryLimit {
        limit_bytes: usize,
        requested_bytes: usize,
    },
    /// The plugin panicked; the message is what it printed.
    Panic(String),
    /// The guest's stack overflowed.
    StackOverflow,
    /// The plugin called a host function it is not granted.
    NotGranted(String),
    /// Another trap (unreachable, out-of-bounds access, ...).
    Trap(String),
    /// The plugin returned tensors that break the layout rules.
    MalformedOutput(String),
    /// No sandbox slot was free (the pooling allocator is full).
    Exhausted(String),
    /// Anything else wasmtime reported.
    Internal(String),
}

impl PluginError {
    /// A call whose deadline `limit` passed after it had run for `ran`: the
    /// plugin's failure ([`PluginError::Deadline`]) when it ran for at least
    /// half of it; otherwise it mostly waited for the cores, which is the
    /// load's doing ([`PluginError::Starved`]).
    pub fn past_deadline(limit: Duration, ran: Duration) -> Self {
        if ran * 2 >= limit {
            PluginError::Deadline { limit }
        } else {
            PluginError::Starved { limit, ran }
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PluginError::Rejected(m) => write!(f, "rejected the input: {m}"),
            PluginError::Failed(m) => write!(f, "failed: {m}"),
            PluginError::Deadline { limit } => {
                write!(
                    f,
                    "did not finish within its deadline of {} ms",
                    limit.as_millis()
                )
            }
            PluginError::Starved { limit, ran } => write!(
                f,
                "did not get the CPU time it needed within its deadline of {} ms: it ran {} ms \
                 and waited for its share of the cores the rest of the time",
                limit.as_millis(),
                ran.as_millis()
            ),
            PluginError::MemoryLimit {
                limit_bytes,
                requested_bytes,
            } => write!(
                f,
                "exceeded its memory limit of {} (asked for {})",
                mebibytes(*limit_bytes),
                mebibytes(*requested_bytes)
            ),
            PluginError::Panic(m) => write!(f, "panicked: {m}"),
            PluginError::StackOverflow => f.write_str("overflowed its stack"),
            PluginError::NotGranted(import) => write!(
                f,
                "called `{import}`, which plugins are not granted (no clocks, random numbers, files or network)"
            ),
            PluginError::Trap(m) => write!(f, "trapped: {m}"),
            PluginError::MalformedOutput(m) => write!(f, "returned a malformed output: {m}"),
            PluginError::Exhausted(m) => write!(f, "could not get a sandbox: {m}"),
            PluginError::Internal(m) => write!(f, "failed in the runtime: {m}"),
        }
    }
}

fn mebibytes(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A fingerprint of a component's bytes: a reload recompiles a plugin only
/// when it changes.
pub fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same bytes give the same hash for the process's life.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}
