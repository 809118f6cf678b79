//! The per-call sandbox: what a plugin's `Store` holds, the one function that
//! configures every `Store`, and the WASI subset plugins are granted.
//!
//! Granted: `wasi:io` streams, `wasi:cli` stdin (empty: JavaScript
//! runtimes open it at start), stdout/stderr (captured, bounded, for error
//! messages and logs) and the terminal interfaces (none is a terminal),
//! `wasi:cli/environment` (empty) and
//! `wasi:cli/exit`, `wasi:random` and `wasi:clocks` as the version's grants
//! say (see `world`), and `wasi:nn` for the models the version declares (see
//! `nn`). Not granted: files, sockets and anything else. A plugin that
//! imports those still loads (every std Rust guest does); calling one fails
//! the call with [`NotGranted`]; the list of preopened folders is empty.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    Component, HasData, Linker, LinkerInstance, ResourceTable, ResourceType,
};
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::nn::NnState;
use super::world::{self, World};
use crate::contract::CallLimits;
use crate::onnx::ModelSet;

/// Host resources one call may hold at once (wasi:nn's tensors and
/// contexts, streams, clock waits); a plugin that subscribes to waits in a
/// loop is stopped here, not by the host's memory.
const MAX_HOST_RESOURCES: usize = 8192;

/// Bytes of stdout and of stderr kept per call; the rest is dropped.
pub(super) const CAPTURE_BYTES: usize = 4096;

/// The data of one call's `Store`.
pub struct Host {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    pub(super) limits: CallLimits,
    pub(super) timed_out: bool,
    /// CPU time the call's wasi:nn computations used on the compute
    /// threads: running time that polling the call does not see.
    pub(super) offloaded: Duration,
    /// The models the call may run through wasi:nn, and its budget there.
    pub(super) nn: NnState,
    /// What the call reads of random numbers and clocks.
    pub(super) world: World,
    pub(super) stdout: Capture,
    pub(super) stderr: Capture,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host {
    /// The call's random and clock state, beside the table its waits go in.
    pub(super) fn world_and_table(&mut self) -> (&mut World, &mut ResourceTable) {
        (&mut self.world, &mut self.table)
    }

    /// Readies a kept instance's state for its next call: new limits, empty
    /// captures. Memory and host resources the instance holds stay counted.
    pub(super) fn next_call(&mut self, limits: CallLimits) {
        self.limits = limits;
        self.world.next_call(limits.grants, limits.deadline);
        self.timed_out = false;
        self.offloaded = Duration::ZERO;
        self.limiter.refused = None;
        self.stdout.clear();
        self.stderr.clear();
    }
}

/// Creates the `Store` for one call: fresh state, memory limiter, deadline.
/// Every store is made here, so no call can run without its limits.
pub(super) fn new_store(engine: &Engine, limits: CallLimits, models: Arc<ModelSet>) -> Store<Host> {
    let stdout = Capture::default();
    let stderr = Capture::default();
    let wasi = WasiCtxBuilder::new()
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .build();
    // Host resources a call may hold (streams, waits, wasi:nn's 4096):
    // each costs host memory the linear-memory cap does not count.
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_HOST_RESOURCES);
    let host = Host {
        wasi,
        table,
        limiter: MemoryLimiter::new(limits.memory_bytes),
        limits,
        timed_out: false,
        offloaded: Duration::ZERO,
        nn: NnState::new(models, limits.memory_bytes),
        world: World::new(limits.grants, limits.deadline),
        stdout,
        stderr,
    };
    let mut store = Store::new(engine, host);
    store.limiter(|host| &mut host.limiter);
    // The engine's epoch ticks every `EPOCH_TICK`; at each tick the call
    // yields to the executor (so it never holds a worker thread for longer
    // than a tick) and is interrupted once its deadline has passed.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut ctx| {
        let host = ctx.data_mut();
        if Instant::now() >= host.limits.deadline {
            host.timed_out = true;
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

/// The interfaces [`add_granted_wasi`] defines, without their version: any
/// 0.2.x version a guest imports is served by wasmtime-wasi's 0.2 definitions.
const GRANTED: [&str; 13] = [
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/environment",
    "wasi:cli/exit",
];

/// The wasi:nn interfaces plugins are granted, in the one version served
/// (see `nn`); another version is not granted.
const GRANTED_EXACT: [&str; 4] = [
    "wasi:nn/tensor@0.2.0-rc-2024-10-28",
    "wasi:nn/errors@0.2.0-rc-2024-10-28",
    "wasi:nn/inference@0.2.0-rc-2024-10-28",
    "wasi:nn/graph@0.2.0-rc-2024-10-28",
];

/// Adds the granted WASI interfaces to `linker`.
pub(super) fn add_granted_wasi(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    use wasmtime_wasi::p2::bindings::{cli, io};
    io::error::add_to_linker::<Host, HasTable>(linker, |h| &mut h.table)?;
    io::poll::add_to_linker::<Host, HasTable>(linker, |h| &mut h.table)?;
    io::streams::add_to_linker::<Host, HasTable>(linker, |h| &mut h.table)?;
    cli::terminal_input::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::terminal_output::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::terminal_stdin::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::terminal_stdout::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::terminal_stderr::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::stdin::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::stdout::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::stderr::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::environment::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    cli::exit::add_to_linker::<Host, WasiCli>(linker, Host::cli)?;
    world::add_to_linker(linker)?;
    super::nn::add_to_linker(linker)?;
    Ok(())
}

/// Defines every import of `component` outside [`GRANTED`] as a function
/// that fails with [`NotGranted`], so a plugin can import more than it is
/// granted and still run as long as it does not call it.
///
/// (wasmtime's `define_unknown_imports_as_traps` would also stub the granted
/// interfaces when the guest imports another 0.2.x version than the linker
/// defines, because it looks names up exactly.)
pub(super) fn stub_ungranted_imports(
    linker: &mut Linker<Host>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    let ty = component.component_type();
    let is_granted = |name: &str| {
        let unversioned = name.split('@').next().unwrap_or(name);
        GRANTED_EXACT.contains(&name)
            || GRANTED.contains(&unversioned)
            || world::INTERFACES.contains(&unversioned)
    };
    // Resources of granted interfaces that stubbed interfaces `use` (e.g.
    // `wasi:cli/stdin` uses `input-stream`) are already defined: an alias
    // must keep the granted type, not get a stub type of its own.
    let mut granted_resources = Vec::new();
    for (name, import) in ty.imports(engine) {
        if let (true, ComponentItem::ComponentInstance(instance)) = (is_granted(name), &import.ty) {
            for (_, export) in instance.exports(engine) {
                if let ComponentItem::Resource(resource) = export.ty {
                    granted_resources.push(resource);
                }
            }
        }
    }
    for (name, import) in ty.imports(engine) {
        if is_granted(name) {
            continue;
        }
        match import.ty {
            ComponentItem::ComponentInstance(instance) => {
                let mut stubs = linker.instance(name)?;
                let preopens = name.split('@').next() == Some("wasi:filesystem/preopens");
                for (item, export) in instance.exports(engine) {
                    match export.ty {
                        ComponentItem::Resource(r) if granted_resources.contains(&r) => {}
                        // No folders are opened for plugins: the list is
                        // empty (JavaScript runtimes ask for it at start),
                        // and every other filesystem call fails.
                        ComponentItem::ComponentFunc(_)
                            if preopens && item == "get-directories" =>
                        {
                            stubs.func_new(item, |_, _, _, results| {
                                if let Some(list) = results.first_mut() {
                                    *list = wasmtime::component::Val::List(Vec::new());
                                }
                                Ok(())
                            })?
                        }
                        ty => stub(&mut stubs, name, item, &ty)?,
                    }
                }
            }
            other => stub(&mut linker.root(), "", name, &other)?,
        }
    }
    Ok(())
}

fn stub(
    linker: &mut LinkerInstance<'_, Host>,
    interface: &str,
    item: &str,
    ty: &ComponentItem,
) -> wasmtime::Result<()> {
    match ty {
        ComponentItem::ComponentFunc(_) => {
            let import = if interface.is_empty() {
                item.to_string()
            } else {
                format!("{interface}#{item}")
            };
            linker.func_new(item, move |_, _, _, _| {
                Err(wasmtime::Error::new(NotGranted(import.clone())))
            })
        }
        ComponentItem::Resource(_) => {
            linker.resource(item, ResourceType::host::<()>(), |_, _| Ok(()))
        }
        // Types need no definition; anything else a linker cannot stub, and
        // instantiation reports it.
        _ => Ok(()),
    }
}

/// A plugin called an import it is not granted; the name of the import.
#[derive(Debug)]
pub(super) struct NotGranted(pub String);

impl std::fmt::Display for NotGranted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "import `{}` is not granted to plugins", self.0)
    }
}

impl std::error::Error for NotGranted {}

struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// Caps the sum of all linear memories of a call (wasmtime's own
/// `StoreLimits` caps each memory separately) and remembers a refusal, so a
/// failed call can be reported as "out of memory" rather than as whatever
/// trap the guest's allocator turned the refusal into.
pub(super) struct MemoryLimiter {
    max_bytes: usize,
    used_bytes: usize,
    /// The total the plugin asked for when it was refused.
    pub(super) refused: Option<usize>,
}

/// Tables and instances a plugin may create; generous for any real component,
/// small enough to stop a component that multiplies them.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
const MAX_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;

impl MemoryLimiter {
    fn new(max_bytes: usize) -> Self {
        MemoryLimiter {
            max_bytes,
            used_bytes: 0,
            refused: None,
        }
    }

    /// Linear memory currently held by the call, in bytes.
    pub(super) fn used_bytes(&self) -> usize {
        self.used_bytes
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.used_bytes - current.min(self.used_bytes) + desired;
        if total > self.max_bytes {
            self.refused = Some(total);
            return Ok(false);
        }
        self.used_bytes = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A bounded in-memory stdout/stderr: keeps the first [`CAPTURE_BYTES`]
/// bytes, drops the rest, never blocks and never fails the guest.
#[derive(Clone, Default)]
pub(super) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// What the guest wrote, lossily decoded, trimmed.
    pub(super) fn text(&self) -> String {
        let buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&buf).trim().to_string()
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn append(&self, bytes: &[u8]) {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let room = CAPTURE_BYTES.saturating_sub(buf.len());
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_sums_memories_and_remembers_refusal() {
        let mut limiter = MemoryLimiter::new(10 << 20);
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert!(limiter.memory_growing(0, 4 << 20, None).unwrap());
        // A third memory would take the total to 12 MiB.
        assert!(!limiter.memory_growing(0, 4 << 20, None).unwrap());
        assert_eq!(limiter.refused, Some(12 << 20));
        // Growing the first from 4 to 6 MiB fits exactly.
        assert!(limiter.memory_growing(4 << 20, 6 << 20, None).unwrap());
    }

    #[test]
    fn capture_is_bounded() {
        let capture = Capture::default();
        capture.append(&vec![b'a'; CAPTURE_BYTES - 2]);
        capture.append(b"bcdef");
        let text = capture.text();
        assert_eq!(text.len(), CAPTURE_BYTES);
        assert!(text.ends_with("bc"));
    }
}
