//! The command line: `gateway serve` and `gateway check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::router;
use crate::runtime::Runtime;
use crate::server::{self, ServeOptions};

/// Serves machine-learning models, packaged as sandboxed WebAssembly
/// components, over the Open Inference Protocol (KServe V2 REST).
#[derive(Parser, Debug)]
#[command(name = "gateway", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the policies and serve them over HTTP until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Check a policy folder as serving would, compiling every plugin; exit
    /// non-zero listing every problem.
    Check(PolicyArgs),
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// Folder of policy files (`*.toml`, one per model).
    #[arg(long, default_value = "policies", env = "GATEWAY_POLICIES")]
    policies: PathBuf,
    /// Folder where bare plugin names are looked up as `<name>.wasm`; may be
    /// repeated. The plugins built with the gateway are always searched last.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Sandboxes that may run at once across all models.
    #[arg(long, default_value_t = 256)]
    max_instances: u32,
    /// Largest memory cap a policy may set, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_memory_mebibytes: usize,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "GATEWAY_LISTEN")]
    listen: SocketAddr,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Largest request body, in bytes; larger gets 413.
    #[arg(long, default_value_t = 8 << 20)]
    max_body_bytes: usize,
    /// Connections open at once per listener; past it a new connection is
    /// closed at once. Lowered to what the process's file limit allows.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Connections open at once from one IP address (0: no limit; raise
    /// it behind a proxy or load balancer that connects for many clients).
    #[arg(long, default_value_t = 1_000)]
    max_connections_per_peer: usize,
    /// Milliseconds a new connection has to send its first byte (cleartext).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    first_byte_timeout_ms: u64,
    /// Milliseconds a TLS handshake may take.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    tls_handshake_timeout_ms: u64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    idle_timeout_secs: u64,
    /// Seconds a response write may make no progress (a client that does
    /// not read) before the connection is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    write_timeout_secs: u64,
    /// Seconds a client has to send a request head.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    header_read_timeout_secs: u64,
    /// Bytes of a request's headers together; more gets 431.
    #[arg(long, default_value_t = 64 << 10)]
    max_header_bytes: usize,
    /// Headers per request; more gets 431.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// HTTP/2 streams a client may open at once on one connection.
    #[arg(long, default_value_t = 100)]
    h2_max_concurrent_streams: u32,
    /// PEM certificate chain: serve inference over TLS (with --tls-key).
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        env = "GATEWAY_TLS_CERT"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_cert",
        env = "GATEWAY_TLS_KEY"
    )]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: inference clients must present a certificate it signed.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Address of the admin listener (/metrics and /admin/*); without it
    /// /metrics is served with inference and the admin API is off.
    #[arg(long, value_name = "ADDR", env = "GATEWAY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// PEM certificate chain of the admin listener (with --admin-tls-key).
    #[arg(long, value_name = "FILE", requires_all = ["admin_tls_key", "admin_listen"])]
    admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, value_name = "FILE", requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// PEM CA bundle: admin clients must present a certificate it signed.
    #[arg(long, value_name = "FILE", requires = "admin_tls_cert")]
    admin_tls_client_ca: Option<PathBuf>,
    /// Inputs per inference request; more gets 413.
    #[arg(long, default_value_t = 64)]
    max_inputs: usize,
    /// Elements per input tensor; more gets 413.
    #[arg(long, default_value_t = 16 << 20)]
    max_tensor_elements: usize,
    /// Bytes per BYTES element; more gets 400.
    #[arg(long, default_value_t = 1 << 20)]
    max_bytes_element: usize,
    /// Seconds a client has to send a request body; slower gets 408.
    #[arg(long, default_value_t = 30)]
    body_read_timeout_secs: u64,
    /// Bytes of any one request header's value; more gets 431.
    #[arg(long, default_value_t = 8 << 10)]
    max_header_value_bytes: usize,
    /// Bytes of a request's `id`; more gets 400.
    #[arg(long, default_value_t = 1024)]
    max_id_bytes: usize,
    /// Bytes of each `parameters` object (the request's, an input's, an
    /// output's), as written; more gets 400.
    #[arg(long, default_value_t = 64 << 10)]
    max_parameters_bytes: usize,
    /// MiB that requests in flight may hold together (bodies, decoded
    /// inputs, outputs, answers); past it, 503 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_inflight_mebibytes: usize,
    /// MiB of sandbox memory that running plugin calls may reserve together
    /// (each its version's memory cap); calls wait for it until their
    /// deadline, then get 503.
    #[arg(long, default_value_t = 4096)]
    max_sandbox_memory_mebibytes: usize,
    /// Percent of the machine's CPU time shadow calls may use (0 to 100).
    #[arg(long, default_value_t = 10.0, value_parser = percent)]
    shadow_cpu_percent: f64,
    /// Bodies, inputs and outputs larger than this many KiB are decoded,
    /// validated and encoded on a lower-priority pool, never on the threads
    /// that answer small requests.
    #[arg(long, default_value_t = 64)]
    bulk_kib: usize,
    /// Large requests waiting for that pool; more get 503.
    #[arg(long, default_value_t = 256)]
    bulk_queue: usize,
    /// Seconds after SIGTERM during which readiness answers 503 while
    /// connections are still accepted, before the listeners close.
    #[arg(long, default_value_t = 5)]
    drain_delay_secs: u64,
    /// Seconds in-flight requests get to finish once the listeners closed.
    #[arg(long, default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// File holding the bearer token of /admin/reload, /admin/policies and
    /// /admin/monitoring (or set GATEWAY_ADMIN_TOKEN); without a token the
    /// admin API is off. Never a flag value: the process list shows those.
    #[arg(long, value_name = "FILE", env = "GATEWAY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Do not watch the policy folder (reload with SIGHUP or POST /admin/reload).
    #[arg(long)]
    no_watch: bool,
    /// Allow a reload that unloads every model (by default a policy folder
    /// emptied, or synced halfway, is refused and the models keep serving).
    #[arg(long)]
    allow_empty_policies: bool,
    /// Milliseconds after the last policy file change before reloading.
    #[arg(long, default_value_t = 500)]
    reload_debounce_ms: u64,
}

/// A percentage from 0 to 100.
fn percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{text:?} is not a percentage from 0 to 100")),
    }
}

impl PolicyArgs {
    fn options(&self, listen: SocketAddr) -> ServeOptions {
        let mut options =
            ServeOptions::new(listen, self.policies.clone(), self.plugin_dirs.clone());
        options.runtime.max_instances = self.max_instances;
        options.runtime.max_memory_bytes = self.max_memory_mebibytes.saturating_mul(1 << 20);
        options
    }
}

/// Parses the arguments and runs the command; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Check(args) => check(args).await,
        }
    })
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for people: not in files, pipes or log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

async fn serve(args: ServeArgs) -> ExitCode {
    let mut options = args.policy.options(args.listen);
    options.server.max_body_bytes = args.max_body_bytes;
    let secs = std::time::Duration::from_secs;
    let millis = std::time::Duration::from_millis;
    options.server.connections = server::ConnectionLimits {
        max_connections: fit_file_limit(args.max_connections),
        max_connections_per_peer: args.max_connections_per_peer,
        first_byte_timeout: millis(args.first_byte_timeout_ms),
        tls_handshake_timeout: millis(args.tls_handshake_timeout_ms),
        idle_timeout: secs(args.idle_timeout_secs),
        write_timeout: secs(args.write_timeout_secs),
        header_read_timeout: secs(args.header_read_timeout_secs),
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        http2: server::Http2Limits {
            max_concurrent_streams: args.h2_max_concurrent_streams,
            ..server::Http2Limits::default()
        },
    };
    let tls = |cert: &Option<PathBuf>, key: &Option<PathBuf>, ca: &Option<PathBuf>| {
        Some(server::TlsConfig {
            cert: cert.clone()?,
            key: key.clone()?,
            client_ca: ca.clone(),
        })
    };
    options.server.tls = tls(&args.tls_cert, &args.tls_key, &args.tls_client_ca);
    options.server.admin = args.admin_listen.map(|listen| server::AdminConfig {
        listen,
        tls: tls(
            &args.admin_tls_cert,
            &args.admin_tls_key,
            &args.admin_tls_client_ca,
        ),
    });
    options.server.drain_delay = secs(args.drain_delay_secs);
    options.server.decode = crate::protocol::DecodeLimits {
        max_inputs: args.max_inputs,
        max_elements: args.max_tensor_elements,
        max_bytes_element: args.max_bytes_element,
        max_id_bytes: args.max_id_bytes,
        max_parameters_bytes: args.max_parameters_bytes,
    };
    options.server.body_read_timeout = std::time::Duration::from_secs(args.body_read_timeout_secs);
    options.server.max_header_value_bytes = args.max_header_value_bytes;
    options.pipeline = crate::pipeline::PipelineConfig {
        max_inflight_bytes: args.max_inflight_mebibytes.saturating_mul(1 << 20),
        max_sandbox_memory_bytes: args.max_sandbox_memory_mebibytes.saturating_mul(1 << 20),
        shadow_cpu_percent: args.shadow_cpu_percent,
        bulk_bytes: args.bulk_kib.saturating_mul(1 << 10),
        bulk_queue: args.bulk_queue,
    };
    options.server.shutdown_grace = std::time::Duration::from_secs(args.shutdown_grace_secs);
    options.server.admin_token = match admin_token(args.admin_token_file.as_deref()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    options.watch_debounce =
        (!args.no_watch).then(|| std::time::Duration::from_millis(args.reload_debounce_ms));
    options.allow_empty_policies = args.allow_empty_policies;
    let server = match server::start(options).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = server.shutdown_handle();
    tokio::spawn(async move {
        // The first signal drains; a second one ends the drain at once.
        shutdown_signal().await;
        tracing::info!("signal: draining (a second signal stops at once)");
        stop.drain();
        shutdown_signal().await;
        stop.stop();
    });
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(mut hangup) => {
                let reloader = server.reloader();
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        // Errors are logged and counted by `reload`.
                        let _ = reloader.reload("signal").await;
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    server.wait().await;
    ExitCode::SUCCESS
}

/// The admin token: the file's first line, or `GATEWAY_ADMIN_TOKEN`.
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        None => std::env::var("GATEWAY_ADMIN_TOKEN").unwrap_or_default(),
    };
    if file.is_some() && token.is_empty() {
        return Err("the admin token file is empty".into());
    }
    if !token.is_empty() && token.len() < 16 {
        return Err("the admin token is shorter than 16 characters".into());
    }
    Ok((!token.is_empty()).then_some(token))
}

/// Raises the open-file limit to its hard maximum and returns `wanted`
/// connections, or fewer if the limit cannot hold them (with room for
/// plugins, models and the policy files).
fn fit_file_limit(wanted: usize) -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit read and write one rlimit through a
        // valid pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return wanted;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // Room for the admin listener's connections, plugins, models and
        // policy files beside the inference connections.
        let room = (limit.rlim_cur as usize).saturating_sub(server::ADMIN_CONNECTIONS + 1024);
        if room < wanted {
            tracing::warn!(
                wanted,
                allowed = room,
                open_files = limit.rlim_cur,
                "--max-connections lowered to what the open-file limit allows"
            );
            return room.max(1);
        }
    }
    wanted
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

async fn check(args: PolicyArgs) -> ExitCode {
    let options = args.options(SocketAddr::from(([127, 0, 0, 1], 0)));
    let runtime = match Runtime::new(options.runtime.clone()) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the WebAssembly runtime: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match router::load(&options.policies, &options.load_options(), &runtime, None).await {
        Ok((snapshot, _)) => {
            let mut count = 0;
            for model in snapshot.models() {
                count += 1;
                let versions: Vec<String> = model
                    .versions
                    .values()
                    .map(|v| format!("{} ({})", v.name, v.backend.name()))
                    .collect();
                println!(
                    "ok: model `{}` ({}): champion {}, versions {}",
                    model.name,
                    model.policy.file.display(),
                    model.champion.name,
                    versions.join(", ")
                );
            }
            println!(
                "{count} model(s) in {} are valid",
                options.policies.display()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            eprintln!(
                "{} problem(s) in {}",
                errors.len(),
                options.policies.display()
            );
            ExitCode::FAILURE
        }
    }
}
