//! What a plugin may read of the world: `wasi:random` and `wasi:clocks`,
//! as its version's [`Grants`] say.
//!
//! Language runtimes read both when they start (CPython seeds its string
//! hashes, a Rust `HashMap` its hasher, JavaScript engines read the time),
//! so refusing them refuses every plugin written in those languages. The
//! default answers are deterministic stand-ins, so a plugin stays a pure
//! function of its inputs: the same request gives the same answer on every
//! call, replica and replay.
//!
//! - `seeded` random numbers: a splitmix64 stream that starts from the
//!   version's seed at every call (`random`, `insecure` and `insecure-seed`
//!   alike; not secret: a plugin that needs secrets is granted `real`).
//! - `fixed` clocks: virtual time that starts at 2000-01-01 on the wall
//!   clock and at 0 on the monotonic clock for every fresh instance, and
//!   advances only when the plugin subscribes to a wait on a clock (to the
//!   wait's end); the wait is over at once. A kept instance's clock goes
//!   on from where its last call left it, never backwards.
//! - `real`: the operating system's random numbers and clocks. A wait on a
//!   real clock ends at the call's deadline at the latest (epoch
//!   interruption does not reach into a host call), and the time waited
//!   counts as the plugin's running time.
//! - `none`: the call fails with `NotGranted`, naming the import.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use wasmtime_wasi::p2::bindings::clocks::{monotonic_clock, wall_clock};
use wasmtime_wasi::p2::bindings::random::{insecure, insecure_seed, random};
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};

use super::nn::HostLimit;
use super::sandbox::{Host, NotGranted};
use crate::contract::{ClockGrant, FIXED_WALL_CLOCK_SECS, Grants, PluginError, RandomGrant, mix64};

/// The most random bytes one `get-random-bytes` call returns: they are
/// host memory until copied into the guest's.
pub(super) const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// The random and clock state of one call.
pub(super) struct World {
    grants: Grants,
    /// The seeded stream's state.
    state: u64,
    /// Virtual monotonic time of `fixed` clocks, in nanoseconds.
    virtual_ns: u64,
    /// When the call's real waits must end.
    deadline: Instant,
    /// Time spent waiting on real clocks, in nanoseconds.
    waited_ns: Arc<AtomicU64>,
}

impl World {
    pub(super) fn new(grants: Grants, deadline: Instant) -> Self {
        World {
            grants,
            state: grants.seed,
            virtual_ns: 0,
            deadline,
            waited_ns: Arc::default(),
        }
    }

    /// Readies a kept instance's world for its next call: the seeded
    /// stream starts again from the seed; virtual time goes on.
    pub(super) fn next_call(&mut self, grants: Grants, deadline: Instant) {
        let virtual_ns = self.virtual_ns;
        *self = World::new(grants, deadline);
        self.virtual_ns = virtual_ns;
    }

    /// How long the call waited on real clocks: running time the polling
    /// of the call does not see.
    pub(super) fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }

    fn random_granted(&self, function: &str) -> wasmtime::Result<()> {
        if self.grants.random == RandomGrant::Denied {
            return Err(wasmtime::Error::new(NotGranted(function.to_string())));
        }
        Ok(())
    }

    fn clocks_granted(&self, function: &str) -> wasmtime::Result<()> {
        if self.grants.clocks == ClockGrant::Denied {
            return Err(wasmtime::Error::new(NotGranted(function.to_string())));
        }
        Ok(())
    }

    fn next_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(match self.grants.random {
            RandomGrant::Real => {
                let mut bytes = [0; 8];
                fill_real(&mut bytes)?;
                u64::from_le_bytes(bytes)
            }
            _ => {
                // splitmix64 (Steele, Lea, Flood 2014).
                self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                mix64(self.state)
            }
        })
    }

    fn bytes(&mut self, function: &str, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.random_granted(function)?;
        if len > MAX_RANDOM_BYTES {
            return Err(wasmtime::Error::new(HostLimit(PluginError::Failed(
                format!(
                    "asked {function} for {len} random bytes at once; a call may take at most {MAX_RANDOM_BYTES}"
                ),
            ))));
        }
        let mut bytes = vec![0; len as usize];
        if self.grants.random == RandomGrant::Real {
            fill_real(&mut bytes)?;
        } else {
            for chunk in bytes.chunks_mut(8) {
                let word = self.next_u64()?.to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
        }
        Ok(bytes)
    }

    /// Nanoseconds on the monotonic clock.
    fn monotonic_now(&self) -> u64 {
        match self.grants.clocks {
            ClockGrant::Real => {
                u64::try_from(process_start().elapsed().as_nanos()).unwrap_or(u64::MAX)
            }
            _ => self.virtual_ns,
        }
    }

    /// A pollable that is ready once the monotonic clock reaches `when`.
    fn until(
        &mut self,
        table: &mut ResourceTable,
        when: u64,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        let wait = match self.grants.clocks {
            ClockGrant::Real => {
                let ahead = Duration::from_nanos(when.saturating_sub(self.monotonic_now()));
                let until = Instant::now()
                    .checked_add(ahead)
                    .map_or(self.deadline, |t| t.min(self.deadline));
                Wait::Until {
                    until: until.into(),
                    waited_ns: self.waited_ns.clone(),
                }
            }
            _ => {
                self.virtual_ns = self.virtual_ns.max(when);
                Wait::Ready
            }
        };
        let wait = table.push(wait)?;
        subscribe(table, wait)
    }
}

/// The operating system's random bytes (ring reads getrandom). Where
/// they cannot be had the call fails: a plugin granted real random
/// numbers may be making secrets with them.
fn fill_real(bytes: &mut [u8]) -> wasmtime::Result<()> {
    use ring::rand::SecureRandom as _;
    ring::rand::SystemRandom::new().fill(bytes).map_err(|_| {
        wasmtime::Error::new(HostLimit(PluginError::Internal(
            "the system's random numbers are unavailable".into(),
        )))
    })
}

/// The origin of the real monotonic clock: the first time it is read.
fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// A wait on a clock.
enum Wait {
    /// Virtual time has already moved to the wait's end.
    Ready,
    /// Until a real instant, at most the call's deadline.
    Until {
        until: tokio::time::Instant,
        waited_ns: Arc<AtomicU64>,
    },
}

#[wasmtime_wasi::async_trait]
impl Pollable for Wait {
    async fn ready(&mut self) {
        if let Wait::Until { until, waited_ns } = self {
            let started = Instant::now();
            tokio::time::sleep_until(*until).await;
            let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            waited_ns.fetch_add(waited, Ordering::Relaxed);
            // Ready from now on, and counted once.
            *self = Wait::Ready;
        }
    }
}

/// The host side of the random and clock interfaces for one call.
pub(super) struct WorldView<'a> {
    world: &'a mut World,
    table: &'a mut ResourceTable,
}

struct HasWorld;

impl HasData for HasWorld {
    type Data<'a> = WorldView<'a>;
}

fn view(host: &mut Host) -> WorldView<'_> {
    let (world, table) = host.world_and_table();
    WorldView { world, table }
}

/// Adds `wasi:random` and `wasi:clocks` (wall and monotonic) to `linker`.
pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    random::add_to_linker::<Host, HasWorld>(linker, view)?;
    insecure::add_to_linker::<Host, HasWorld>(linker, view)?;
    insecure_seed::add_to_linker::<Host, HasWorld>(linker, view)?;
    wall_clock::add_to_linker::<Host, HasWorld>(linker, view)?;
    monotonic_clock::add_to_linker::<Host, HasWorld>(linker, view)?;
    Ok(())
}

/// The interfaces [`add_to_linker`] defines, without their version.
pub(super) const INTERFACES: [&str; 5] = [
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
];

impl random::Host for WorldView<'_> {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.world.bytes("wasi:random/random#get-random-bytes", len)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.world
            .random_granted("wasi:random/random#get-random-u64")?;
        self.world.next_u64()
    }
}

impl insecure::Host for WorldView<'_> {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        self.world
            .bytes("wasi:random/insecure#get-insecure-random-bytes", len)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.world
            .random_granted("wasi:random/insecure#get-insecure-random-u64")?;
        self.world.next_u64()
    }
}

impl insecure_seed::Host for WorldView<'_> {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        self.world
            .random_granted("wasi:random/insecure-seed#insecure-seed")?;
        Ok((self.world.next_u64()?, self.world.next_u64()?))
    }
}

impl wall_clock::Host for WorldView<'_> {
    fn now(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        self.world.clocks_granted("wasi:clocks/wall-clock#now")?;
        let since_epoch = match self.world.grants.clocks {
            ClockGrant::Real => SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            _ => {
                Duration::from_secs(FIXED_WALL_CLOCK_SECS)
                    + Duration::from_nanos(self.world.virtual_ns)
            }
        };
        Ok(wall_clock::Datetime {
            seconds: since_epoch.as_secs(),
            nanoseconds: since_epoch.subsec_nanos(),
        })
    }

    fn resolution(&mut self) -> wasmtime::Result<wall_clock::Datetime> {
        self.world
            .clocks_granted("wasi:clocks/wall-clock#resolution")?;
        Ok(wall_clock::Datetime {
            seconds: 0,
            nanoseconds: 1,
        })
    }
}

impl monotonic_clock::Host for WorldView<'_> {
    fn now(&mut self) -> wasmtime::Result<u64> {
        self.world
            .clocks_granted("wasi:clocks/monotonic-clock#now")?;
        Ok(self.world.monotonic_now())
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        self.world
            .clocks_granted("wasi:clocks/monotonic-clock#resolution")?;
        Ok(1)
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.world
            .clocks_granted("wasi:clocks/monotonic-clock#subscribe-instant")?;
        self.world.until(self.table, when)
    }

    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.world
            .clocks_granted("wasi:clocks/monotonic-clock#subscribe-duration")?;
        let when = self.world.monotonic_now().saturating_add(duration);
        self.world.until(self.table, when)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(random: RandomGrant, clocks: ClockGrant, seed: u64) -> World {
        World::new(
            Grants {
                random,
                clocks,
                seed,
            },
            Instant::now() + Duration::from_secs(1),
        )
    }

    #[test]
    fn seeded_streams_start_from_the_seed_at_every_call() {
        let draw = |seed| {
            let mut w = world(RandomGrant::Seeded, ClockGrant::Fixed, seed);
            let bytes = w.bytes("f", 20).unwrap();
            (bytes, w.next_u64().unwrap())
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // Golden: a plugin's seeded answers must not change with a release.
        let mut w = world(RandomGrant::Seeded, ClockGrant::Fixed, 0);
        assert_eq!(w.next_u64().unwrap(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn real_random_numbers_differ() {
        let mut a = world(RandomGrant::Real, ClockGrant::Fixed, 0);
        let mut b = world(RandomGrant::Real, ClockGrant::Fixed, 0);
        assert_ne!(a.bytes("f", 32).unwrap(), b.bytes("f", 32).unwrap());
    }

    #[test]
    fn refusals_name_the_function() {
        let mut w = world(RandomGrant::Denied, ClockGrant::Denied, 0);
        let e = w
            .bytes("wasi:random/random#get-random-bytes", 8)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("wasi:random/random#get-random-bytes"),
            "{e}"
        );
        assert!(w.clocks_granted("wasi:clocks/wall-clock#now").is_err());
        let mut w = world(RandomGrant::Seeded, ClockGrant::Fixed, 0);
        assert!(w.bytes("f", MAX_RANDOM_BYTES + 1).is_err());
        assert_eq!(w.bytes("f", MAX_RANDOM_BYTES).unwrap().len(), 1 << 20);
    }

    #[test]
    fn fixed_clocks_advance_only_by_waits() {
        let mut w = world(RandomGrant::Seeded, ClockGrant::Fixed, 0);
        let mut table = ResourceTable::new();
        assert_eq!(w.monotonic_now(), 0);
        w.until(&mut table, 5_000).unwrap();
        assert_eq!(w.monotonic_now(), 5_000);
        // An instant already past leaves the clock where it is.
        w.until(&mut table, 10).unwrap();
        assert_eq!(w.monotonic_now(), 5_000);
        // A kept instance's next call: the stream starts again, the clock
        // goes on.
        let first = w.next_u64().unwrap();
        w.next_call(w.grants, Instant::now());
        assert_eq!(w.monotonic_now(), 5_000);
        assert_eq!(w.next_u64().unwrap(), first);
    }
}
