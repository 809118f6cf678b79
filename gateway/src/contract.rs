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
    /// What the call may read of the world: random numbers and clocks.
    pub grants: Grants,
}

impl CallLimits {
    /// Limits for a call whose budget starts now, with the default grants.
    pub fn starting_now(timeout: Duration, memory_bytes: usize) -> Self {
        CallLimits {
            deadline: Instant::now() + timeout,
            timeout,
            memory_bytes,
            grants: Grants::default(),
        }
    }

    /// The same limits with `grants`.
    pub fn with_grants(self, grants: Grants) -> Self {
        CallLimits { grants, ..self }
    }
}

/// What a plugin may read of the world beyond its inputs. Language
/// runtimes read random numbers and clocks when they start (CPython seeds
/// its hashes, a Rust `HashMap` its hasher, JavaScript engines read the
/// time), so both are granted by default, as deterministic stand-ins: the
/// same input gives the same output, on every replica and in a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grants {
    pub random: RandomGrant,
    pub clocks: ClockGrant,
    /// The seed of `RandomGrant::Seeded`: every call's random numbers
    /// start from it.
    pub seed: u64,
}

impl Default for Grants {
    fn default() -> Self {
        Grants {
            random: RandomGrant::Seeded,
            clocks: ClockGrant::Fixed,
            seed: 0,
        }
    }
}

/// What `wasi:random` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RandomGrant {
    /// A stream that starts from the version's seed at every call.
    Seeded,
    /// The operating system's random numbers.
    Real,
    /// Calling `wasi:random` fails the call (`NotGranted`).
    Denied,
}

/// What `wasi:clocks` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockGrant {
    /// Virtual time: every call starts at [`FIXED_WALL_CLOCK_SECS`] on the
    /// wall clock and at 0 on the monotonic clock; both advance only when
    /// the plugin waits on a clock, and a wait returns at once.
    Fixed,
    /// The host's clocks; a wait ends at the call's deadline at the latest.
    Real,
    /// Calling `wasi:clocks` fails the call (`NotGranted`).
    Denied,
}

/// Where the fixed wall clock stands at the start of every call:
/// 2000-01-01T00:00:00Z, far enough from 0 that date code works.
pub const FIXED_WALL_CLOCK_SECS: u64 = 946_684_800;

impl RandomGrant {
    /// The name a policy uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RandomGrant::Seeded => "seeded",
            RandomGrant::Real => "real",
            RandomGrant::Denied => "none",
        }
    }
}

impl ClockGrant {
    /// The name a policy uses.
    pub fn as_str(self) -> &'static str {
        match self {
            ClockGrant::Fixed => "fixed",
            ClockGrant::Real => "real",
            ClockGrant::Denied => "none",
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
                "called `{import}`, which it is not granted (plugins get no files, network or \
                 environment; random numbers and clocks as the policy's `grants` say)"
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

/// The SHA-256 of an artifact's bytes (a plugin component, an ONNX
/// model): what model metadata and the admin API report, so an answer can
/// be traced to the exact file that made it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn of(bytes: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0; 32];
        out.copy_from_slice(digest.as_ref());
        Sha256(out)
    }

    /// The first 64 bits, as a quick fingerprint.
    pub fn short(&self) -> u64 {
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(first)
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

/// A fingerprint of an artifact's bytes: a reload recompiles a plugin only
/// when it changes.
pub fn content_hash(bytes: &[u8]) -> u64 {
    Sha256::of(bytes).short()
}

/// FNV-1a over `bytes`: a hash that is the same in every process, machine
/// and release (routing points and default seeds depend on it).
pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.into_iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The splitmix64 finalizer: spreads similar inputs over all 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
