//! The HTTP front: the inference listener and the optional admin
//! listener (`listener`: connection caps, timeouts, TLS, HTTP/1.1 and
//! HTTP/2), the endpoints (`routes`, the REST front end of the pipeline;
//! `admin_routes`), and the drain at shutdown. Errors become responses
//! only in `error`.

mod admin_routes;
mod error;
mod io;
mod listener;
mod routes;
mod tls;

pub use listener::{ConnectionLimits, Http2Limits};
pub use tls::{TlsConfig, TlsError, check as check_tls};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Reloader};
use crate::pipeline::{Pipeline, PipelineConfig};
use crate::policy::{LoadOptions, PolicyError};
use crate::protocol::DecodeLimits;
use crate::runtime::{Runtime, RuntimeConfig};
use listener::{Connections, Listener, Role};

/// Limits and timeouts of the HTTP front.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request body accepted; larger gets 413 without being read.
    pub max_body_bytes: usize,
    /// Time a client has to send the request body.
    pub body_read_timeout: Duration,
    /// Connections, timeouts, header caps and HTTP/2 settings of each
    /// listener.
    pub connections: ConnectionLimits,
    /// TLS on the inference listener.
    pub tls: Option<TlsConfig>,
    /// After SIGTERM, how long readiness answers 503 while connections
    /// are still accepted (so that load balancers stop sending first).
    pub drain_delay: Duration,
    /// How long shutdown then waits for in-flight requests.
    pub shutdown_grace: Duration,
    pub decode: DecodeLimits,
    /// Largest value of any one request header (431 above).
    pub max_header_value_bytes: usize,
    /// The admin listener (`/metrics`, `/admin/*`); without it `/metrics`
    /// is served on the inference listener and the admin API is off.
    pub admin: Option<AdminConfig>,
    /// Bearer token for `/admin/*`; `None` disables the admin API.
    pub admin_token: Option<String>,
    /// Bearer token for `POST /v2/models/{model}/feedback`; `None` leaves
    /// it open to every client of the inference listener.
    pub feedback_token: Option<String>,
}

/// The admin listener.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 8 << 20,
            body_read_timeout: Duration::from_secs(30),
            connections: ConnectionLimits::default(),
            tls: None,
            drain_delay: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            decode: DecodeLimits::default(),
            max_header_value_bytes: 8 << 10,
            admin: None,
            admin_token: None,
            feedback_token: None,
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
    /// Whether a reload may unload every model.
    pub allow_empty_policies: bool,
    /// The decision log, if one is kept.
    pub decisions: Option<crate::decisions::DecisionLogConfig>,
    /// Where rollouts keep their state; `None` keeps it in memory only
    /// (a restart starts every rollout again).
    pub state_dir: Option<PathBuf>,
    /// How often rollouts are judged.
    pub rollout_tick: Duration,
    /// Judge rollouts with a fleet, from Prometheus, instead of from this
    /// gateway's own counts.
    pub fleet: Option<crate::rollout::fleet::Settings>,
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
            allow_empty_policies: false,
            decisions: None,
            state_dir: None,
            rollout_tick: Duration::from_secs(1),
            fleet: None,
        }
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            plugin_dirs: self.plugin_dirs.clone(),
            max_memory_bytes: self.runtime.max_memory_bytes,
            overlay: None,
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
    #[error("{0}")]
    Decisions(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
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

/// Connections the admin listener holds at most.
pub const ADMIN_CONNECTIONS: usize = 1024;

/// Shared by every request.
pub(crate) struct State {
    /// The snapshot being served, and reloads.
    pub reloader: Arc<Reloader>,
    pub config: ServerConfig,
    /// Set when the drain starts: readiness answers 503.
    pub shutting_down: AtomicBool,
    /// The request path every inference request takes.
    pub pipeline: Arc<Pipeline>,
    /// Failed admin logins per peer.
    pub admin_failures: admin_routes::Failures,
    /// Every model's rollout.
    pub rollouts: Arc<crate::rollout::Rollouts>,
}

/// Where shutdown stands; only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serving,
    /// Readiness 503, connections still accepted, for the drain delay.
    Draining,
    /// Listeners closed; connections asked to end after their request;
    /// in-flight requests get the grace period.
    Closing,
    /// Done waiting.
    Stopped,
}

/// Starts and ends a drain from another task (signal handlers).
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<Phase>);

impl ShutdownHandle {
    fn advance(&self, to: Phase) {
        self.0.send_if_modified(|phase| {
            let later = *phase < to;
            if later {
                *phase = to;
            }
            later
        });
    }

    /// The first SIGTERM: readiness 503 at once, the listeners keep
    /// accepting for the drain delay, then close; in-flight requests get
    /// the grace period.
    pub fn drain(&self) {
        self.advance(Phase::Draining);
    }

    /// Skips the drain delay: the listeners close now, in-flight
    /// requests get the grace period.
    pub fn close(&self) {
        self.advance(Phase::Closing);
    }

    /// A second signal: stop waiting for anything.
    pub fn stop(&self) {
        self.advance(Phase::Stopped);
    }
}

/// Returns once `phase` is at `at` or later (or its sender is gone).
pub(crate) async fn reached(phase: &mut watch::Receiver<Phase>, at: Phase) {
    let _ = phase.wait_for(|p| *p >= at).await;
}

/// A gateway that is accepting connections.
pub struct RunningServer {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    phase: ShutdownHandle,
    task: JoinHandle<()>,
    state: Arc<State>,
    /// Reloads on policy, plugin and model file changes while it lives.
    _watcher: Option<admin::PolicyWatch>,
    /// Moves the rollouts on while it lives.
    _rollouts: AbortOnDrop,
}

/// A task that ends with its owner.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Judges the rollouts every `every` (from this gateway's counts, or in
/// a fleet from Prometheus) and, when one moves, routes the served
/// snapshot again with its new split. One that fails is retried at the
/// next tick: the state has moved, and every build applies it.
async fn drive_rollouts(
    reloader: Arc<Reloader>,
    rollouts: Arc<crate::rollout::Rollouts>,
    pipeline: Arc<Pipeline>,
    every: Duration,
) {
    let mut fleet = rollouts.fleet().map(crate::rollout::fleet::Fleet::new);
    loop {
        tokio::time::sleep(every).await;
        let snapshot = reloader.snapshot();
        let now = std::time::SystemTime::now();
        let moved = match &mut fleet {
            None => {
                let models: Vec<_> = snapshot.models().map(|m| &**m).collect();
                let moved = rollouts.tick(&models, now);
                drop(models);
                drop(snapshot);
                moved
            }
            Some(fleet) => {
                // The snapshot is held for the queries (a few seconds at
                // most), so that no policy is copied.
                let policies: Vec<_> = snapshot.models().map(|m| &m.policy).collect();
                let moved = fleet.tick(&rollouts, &policies, now).await;
                drop(policies);
                drop(snapshot);
                moved
            }
        };
        if moved && let Err(errors) = reloader.reapply("rollout").await {
            tracing::error!(
                problems = ?errors.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                "a rollout moved, but the policies cannot be routed again; retrying"
            );
            rollouts.mark_dirty();
        }
        rollouts.record(pipeline.decisions(), &reloader.snapshot());
    }
}

impl RunningServer {
    /// The inference listener's address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Closes the listeners at once (no drain delay), lets in-flight
    /// requests finish (up to the grace period) and returns when the
    /// server is gone.
    pub async fn shutdown(self) {
        self.phase.close();
        let _ = self.task.await;
    }

    /// Waits until the server stops (after a drain started from a
    /// [`ShutdownHandle`], or never).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that drains or stops the server while another task waits.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.phase.clone()
    }

    /// The reloader, e.g. to reload on SIGHUP.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.state.reloader.clone()
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let socket = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?;
    Ok((socket, local))
}

/// Loads the policies (compiling every plugin), binds the listeners and
/// starts serving. Nothing is served unless every policy is valid.
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
    let telemetry = runtime.telemetry().clone();
    // TLS files are checked before the (slower) policies load.
    let tls = match &options.server.tls {
        Some(config) => Some(tls::load(config, &telemetry)?),
        None => None,
    };
    let admin_tls = match options.server.admin.as_ref().and_then(|a| a.tls.as_ref()) {
        Some(config) => Some(tls::load(config, &telemetry)?),
        None => None,
    };
    let rollouts = Arc::new(
        crate::rollout::Rollouts::open(
            options.state_dir.clone(),
            telemetry.clone(),
            options.fleet.clone(),
        )
        .map_err(StartError::Runtime)?,
    );
    let mut load_options = options.load_options();
    load_options.overlay = Some(crate::policy::Overlay(rollouts.clone()));
    let mut reloader = Reloader::start(&options.policies, load_options, runtime.clone())
        .await
        .map_err(StartError::Policies)?;
    reloader.allow_empty = options.allow_empty_policies;
    let reloader = Arc::new(reloader);
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
        if model
            .policy
            .rollout
            .as_ref()
            .is_some_and(|r| r.gates.min_accuracy_change.is_some())
            && options.server.feedback_token.is_none()
        {
            tracing::warn!(
                model = %model.name,
                "this rollout is judged on ground truth that any client may send: give the feedback endpoint a token (--feedback-token-file)"
            );
        }
    }
    let decisions = match &options.decisions {
        Some(config) => {
            Some(crate::decisions::DecisionLog::open(config).map_err(StartError::Decisions)?)
        }
        None => None,
    };
    let (socket, local_addr) = bind(options.listen).await?;
    let admin = match &options.server.admin {
        Some(config) => Some(bind(config.listen).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|(_, addr)| *addr);

    let watcher = options
        .watch_debounce
        .map(|debounce| admin::PolicyWatch::start(reloader.clone(), debounce));
    let pipeline = Pipeline::new(options.pipeline, telemetry, decisions)
        .map_err(|e| StartError::Runtime(format!("cannot start the shadow executor: {e}")))?;
    let rollout_task = AbortOnDrop(tokio::spawn(drive_rollouts(
        reloader.clone(),
        rollouts.clone(),
        pipeline.clone(),
        options.rollout_tick,
    )));
    let state = Arc::new(State {
        reloader,
        config: options.server.clone(),
        shutting_down: AtomicBool::new(false),
        pipeline,
        admin_failures: admin_routes::Failures::default(),
        rollouts,
    });
    let phase = ShutdownHandle(watch::channel(Phase::Serving).0);
    let mut listeners = vec![Listener {
        socket,
        tls,
        role: Role::Inference {
            metrics: admin.is_none(),
        },
        name: "inference",
    }];
    if let Some((socket, _)) = admin {
        listeners.push(Listener {
            socket,
            tls: admin_tls,
            role: Role::Admin,
            name: "admin",
        });
    }
    let task = tokio::spawn(run(listeners, state.clone(), phase.clone()));
    tracing::info!(tls = options.server.tls.is_some(), address = %local_addr, "serving the V2 inference protocol");
    if let Some(addr) = admin_addr {
        tracing::info!(address = %addr, "serving /metrics and the admin API");
    }
    Ok(RunningServer {
        local_addr,
        admin_addr,
        phase,
        task,
        state,
        _watcher: watcher,
        _rollouts: rollout_task,
    })
}

/// Serves until the phase says otherwise, then drains: readiness 503,
/// the drain delay (still accepting), the listeners closed, connections
/// asked to end, in-flight requests given the grace period.
async fn run(listeners: Vec<Listener>, state: Arc<State>, handle: ShutdownHandle) {
    let config = state.config.clone();
    let mut phase = handle.0.subscribe();
    let mut accepting = Vec::new();
    let mut connections = Vec::new();
    for listener in listeners {
        // The admin listener's budget is its own, and small.
        let capacity = match listener.role {
            Role::Admin => config.connections.max_connections.min(ADMIN_CONNECTIONS),
            Role::Inference { .. } => config.connections.max_connections,
        };
        let open = Arc::new(Connections::new(capacity));
        connections.push(open.clone());
        accepting.push(tokio::spawn(listener::accept_loop(
            listener,
            open,
            state.clone(),
            phase.clone(),
        )));
    }
    reached(&mut phase, Phase::Draining).await;
    state
        .shutting_down
        .store(true, std::sync::atomic::Ordering::Release);
    if *phase.borrow() == Phase::Draining {
        tracing::info!(delay = ?config.drain_delay, "draining: readiness answers 503, still accepting");
        tokio::select! {
            _ = tokio::time::sleep(config.drain_delay) => {}
            _ = reached(&mut phase, Phase::Closing) => {}
        }
    }
    handle.close();
    // The accept loops end at `Closing`, dropping their sockets: new
    // connections are refused from here on.
    for task in accepting {
        let _ = task.await;
    }
    tracing::info!("shutting down: listeners closed, draining in-flight requests");
    let all_closed = async {
        for open in &connections {
            open.all_closed().await;
        }
    };
    tokio::select! {
        result = tokio::time::timeout(config.shutdown_grace, all_closed) => {
            if result.is_err() {
                tracing::warn!(grace = ?config.shutdown_grace, "requests still in flight after the grace period; closing");
            }
        }
        _ = reached(&mut phase, Phase::Stopped) => {
            tracing::warn!("second signal: stopping without waiting for requests in flight");
        }
    }
    // Whatever is left is dropped.
    handle.stop();
}
