//! The HTTP front: accepts connections (bounded), enforces header and body
//! limits, dispatches to the V2 endpoints (`routes`, the REST front end of
//! the pipeline), and drains in-flight requests on shutdown. Errors become
//! responses only in `error`.

mod admin_routes;
mod error;
mod routes;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::admin::{self, Reloader};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::policy::{LoadOptions, PolicyError};
use crate::protocol::DecodeLimits;
use crate::runtime::{Runtime, RuntimeConfig};

/// Limits and timeouts of the HTTP front.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request body accepted; larger gets 413 without being read.
    pub max_body_bytes: usize,
    /// Open connections; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client has to send the request head.
    pub header_read_timeout: Duration,
    /// Time a client has to send the request body.
    pub body_read_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    pub decode: DecodeLimits,
    /// Largest value of any one request header (431 above).
    pub max_header_value_bytes: usize,
    /// Bearer token for `/admin/*`; `None` disables the admin API.
    pub admin_token: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 8 << 20,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
            shutdown_grace: Duration::from_secs(10),
            decode: DecodeLimits::default(),
            max_header_value_bytes: 8 << 10,
            admin_token: None,
        }
    }
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub policies: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    pub pipeline: PipelineConfig,
    /// Reload this long after the last change to a policy file; `None`
    /// disables watching (SIGHUP and `POST /admin/reload` still work).
    pub watch_debounce: Option<Duration>,
}

impl ServeOptions {
    /// Defaults: the built-in plugin folder after any given ones.
    pub fn new(listen: SocketAddr, policies: PathBuf, mut plugin_dirs: Vec<PathBuf>) -> Self {
        plugin_dirs.push(PathBuf::from(crate::artifacts::BUILT_PLUGIN_DIR));
        ServeOptions {
            listen,
            policies,
            plugin_dirs,
            server: ServerConfig::default(),
            runtime: RuntimeConfig::default(),
            pipeline: PipelineConfig::default(),
            watch_debounce: Some(Duration::from_millis(500)),
        }
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            plugin_dirs: self.plugin_dirs.clone(),
            max_memory_bytes: self.runtime.max_memory_bytes,
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the policies are invalid:\n{}", list(.0))]
    Policies(Vec<PolicyError>),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the WebAssembly runtime: {0}")]
    Runtime(String),
    #[error(
        "the largest memory cap a policy may set ({cap_mebibytes} MiB, --max-memory-mebibytes) exceeds the sandbox memory of the whole gateway ({budget_mebibytes} MiB, --max-sandbox-memory-mebibytes): a version with that cap could never run"
    )]
    MemoryCapOverBudget {
        cap_mebibytes: usize,
        budget_mebibytes: usize,
    },
}

fn list(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Shared by every request.
pub(crate) struct State {
    /// The snapshot being served, and reloads.
    pub reloader: Arc<Reloader>,
    pub config: ServerConfig,
    pub shutting_down: AtomicBool,
    /// The request path every inference request takes.
    pub pipeline: Arc<Pipeline>,
}

/// A gateway that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    state: Arc<State>,
    /// Reloads on policy file changes while it lives.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl RunningServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets in-flight requests finish (up to the grace
    /// period) and returns when the server is gone.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (after [`RunningServer::shutdown`] from
    /// elsewhere, or never).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that can trigger shutdown while another task waits.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// The reloader, e.g. to reload on SIGHUP.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.state.reloader.clone()
    }
}

/// Loads the policies (compiling every plugin), binds the listener and starts
/// serving. Nothing is served unless every policy is valid.
pub async fn start(options: ServeOptions) -> Result<RunningServer, StartError> {
    if options.runtime.max_memory_bytes > options.pipeline.max_sandbox_memory_bytes {
        return Err(StartError::MemoryCapOverBudget {
            cap_mebibytes: options.runtime.max_memory_bytes >> 20,
            budget_mebibytes: options.pipeline.max_sandbox_memory_bytes >> 20,
        });
    }
    let runtime = Arc::new(
        Runtime::new(options.runtime.clone()).map_err(|e| StartError::Runtime(format!("{e:#}")))?,
    );
    let reloader = Arc::new(
        Reloader::start(&options.policies, options.load_options(), runtime.clone())
            .await
            .map_err(StartError::Policies)?,
    );
    let snapshot = reloader.snapshot();
    if snapshot.models().next().is_none() {
        tracing::warn!(folder = %options.policies.display(), "no policy files: serving no models");
    }
    for model in snapshot.models() {
        tracing::info!(
            model = %model.name,
            champion = %model.champion.name,
            versions = ?model.versions.keys().collect::<Vec<_>>(),
            "model loaded"
        );
    }
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.listen,
        source,
    })?;

    let watcher = match options.watch_debounce {
        None => None,
        Some(debounce) => match admin::watch(reloader.clone(), debounce) {
            Ok(watcher) => Some(watcher),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the policy folder; reload with SIGHUP or POST /admin/reload");
                None
            }
        },
    };
    let state = Arc::new(State {
        reloader,
        config: options.server.clone(),
        shutting_down: AtomicBool::new(false),
        pipeline: Pipeline::new(options.pipeline, runtime.telemetry().clone())
            .map_err(|e| StartError::Runtime(format!("cannot start the shadow executor: {e}")))?,
    });
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, state.clone(), shutdown_rx));
    tracing::info!(address = %local_addr, "serving the V2 inference protocol");
    Ok(RunningServer {
        local_addr,
        shutdown,
        task,
        state,
        _watcher: watcher,
    })
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = state.config.clone();
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);

    loop {
        // At the connection limit, stop accepting: new clients wait in the
        // kernel's backlog instead of costing us memory.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(routes::handle(&state, request).await) }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }

    state
        .shutting_down
        .store(true, std::sync::atomic::Ordering::Release);
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?config.shutdown_grace, "requests still in flight after the grace period; closing");
    }
}
