//! The command line: `gateway serve` and `gateway check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand};

use std::time::Duration;

use crate::config::{self, Settings};
use crate::router;
use crate::runtime::Runtime;
use crate::server::{self, ServeOptions};

/// A numeric flag within the bounds the configuration file has.
macro_rules! bounded {
    ($t:ty, $range:expr) => {
        clap::value_parser!(i64)
            .range($range)
            .map(|v| <$t>::try_from(v).unwrap_or(<$t>::MAX))
    };
}

/// Serves machine-learning models, packaged as sandboxed WebAssembly
/// components, over the Open Inference Protocol (KServe V2 REST).
#[derive(Parser, Debug)]
#[command(name = "gateway", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text for people, or as one JSON object per line
    /// (`timestamp`, `level`, `target`, `message` and the event's fields)
    /// for log collectors.
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        env = "GATEWAY_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the policies and serve them over HTTP until SIGINT or SIGTERM.
    ///
    /// Settings come from their defaults, then the configuration file
    /// (--config; `gateway.toml` in the repository lists every key with its
    /// default), then these flags and their environment variables.
    Serve(Box<ServeArgs>),
    /// Check a configuration file (with the TLS and token files it names)
    /// and a policy folder as serving would, compiling every plugin; exit
    /// non-zero listing every problem.
    Check(PolicyArgs),
    /// Tools for plugin authors: run a plugin on a request, test it, or
    /// start a new one; no server needed.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Read a decision log: check its hash chain, or show the decisions
    /// of one request.
    #[command(subcommand)]
    Log(LogCommand),
    /// Run a recorded request again, offline, through the policies as
    /// `serve` would load them: against the version that answered it, or
    /// another; show the difference. Exit 0 when the answer is the
    /// recorded one, 1 when it differs, 2 when it cannot be replayed.
    Replay(ReplayArgs),
    /// Run the requests of a decision log against a proposed policy folder
    /// without serving it: per model, the share each version would get,
    /// the answers that would change and to what, what would be refused,
    /// latency per version. Exit 1 when a given threshold is crossed, 2
    /// when it cannot run.
    WhatIf(WhatIfArgs),
}

#[derive(Args, Debug)]
struct ReplayArgs {
    /// The request id (`x-request-id` of the answer).
    id: String,
    /// The decision log: its folder (`serve --decision-log`) or one file.
    #[arg(long, value_name = "PATH", default_value = "decisions")]
    log: PathBuf,
    /// Run it against this version instead of the one that answered it.
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,
    /// The record to replay when several requests had the id (its `seq`);
    /// by default the latest.
    #[arg(long, value_name = "N")]
    seq: Option<u64>,
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Args, Debug)]
struct WhatIfArgs {
    /// The decision log: its folder (`serve --decision-log`) or one file.
    #[arg(long, value_name = "PATH", default_value = "decisions")]
    log: PathBuf,
    /// Exit 1 when more than this share (percent) of any model's replayed
    /// answers would change.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    max_changed_percent: Option<f64>,
    /// Exit 1 when more than this share (percent) of any model's replayed
    /// requests, answered when recorded, would be refused or fail.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    max_failed_percent: Option<f64>,
    /// The proposed policies (`--policies`), and how to load them.
    #[command(flatten)]
    policy: PolicyArgs,
}

#[derive(Subcommand, Debug)]
enum LogCommand {
    /// Check that no record of the log was removed, inserted or changed
    /// (each carries the SHA-256 of the one before); exit 1 naming where
    /// the chain breaks.
    Verify {
        /// The log's folder (`serve --decision-log`).
        dir: PathBuf,
    },
    /// Print the decisions of one request (its answer and its shadow
    /// copies), one JSON object per line; exit 1 when there is none.
    Show {
        /// The request id (`x-request-id` of the answer).
        id: String,
        /// The log's folder (`serve --decision-log`).
        #[arg(long, value_name = "DIR", default_value = "decisions")]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PluginCommand {
    /// Answer one V2 inference request with a plugin, as the gateway would
    /// (the answer on stdout, exit 1 on an error answer).
    Run(PluginRunArgs),
    /// Run the conformance suite on a plugin: info(), infer on inputs made
    /// from its declared shapes and datatypes (batches of 1, many and
    /// none, zeros, extreme values), outputs against the declaration,
    /// determinism, time and memory; exit 1 on any failure.
    Test(PluginTestArgs),
    /// Write a new plugin project (source, WIT, a unit test, a policy)
    /// that builds, tests and serves as it is.
    New(PluginNewArgs),
}

#[derive(Args, Debug)]
struct PluginArgs {
    /// The plugin: a path to a component (`.wasm`), or a name looked up in
    /// the --plugin-dir folders, then among the plugins built with the
    /// gateway (`-` and `_` alike).
    plugin: String,
    /// Folder where a bare plugin name is looked up; may be repeated.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// The call's deadline, as a policy's `limits.timeout_ms`.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = bounded!(u64, 1..=600_000))]
    timeout_ms: u64,
    /// The call's memory cap, as a policy's `limits.memory_mebibytes`.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = bounded!(usize, config::MEBIBYTES))]
    memory_mebibytes: usize,
    /// Random numbers, as a policy's `grants.random`.
    #[arg(long, value_name = "GRANT", default_value = "seeded", value_parser = ["seeded", "real", "none"])]
    random: String,
    /// Clocks, as a policy's `grants.clocks`.
    #[arg(long, value_name = "GRANT", default_value = "fixed", value_parser = ["fixed", "real", "none"])]
    clocks: String,
    /// The seed of seeded random numbers, as a policy's `grants.seed`.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = bounded!(u64, 0..=i64::MAX))]
    seed: u64,
    /// An ONNX model the plugin may load through wasi:nn, as a policy's
    /// `models`; may be repeated.
    #[arg(long = "model", value_name = "NAME=FILE")]
    models: Vec<String>,
    /// Folder of compiled plugins (see `gateway serve --compile-cache`).
    #[arg(long, value_name = "DIR", env = "GATEWAY_COMPILE_CACHE")]
    compile_cache: Option<PathBuf>,
    /// Compile the plugin, keeping nothing on disk.
    #[arg(long, conflicts_with = "compile_cache")]
    no_compile_cache: bool,
}

#[derive(Args, Debug)]
struct PluginRunArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// The V2 inference request (JSON); `-` reads it from stdin.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
}

#[derive(Args, Debug)]
struct PluginTestArgs {
    #[command(flatten)]
    plugin: PluginArgs,
    /// V2 inference requests to run too: one JSON request, a JSON array of
    /// them, or one per line.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PluginNewArgs {
    /// The plugin's name: lower-case letters, digits and `-`.
    name: String,
    /// The language of the project.
    #[arg(long, value_enum, default_value = "rust")]
    lang: crate::author::Lang,
    /// Where to write it [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct PolicyArgs {
    /// Configuration file (TOML; see `gateway.toml`).
    #[arg(long, value_name = "FILE", env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Folder of policy files (`*.toml`, one per model) [default: policies].
    #[arg(long, value_name = "DIR", env = "GATEWAY_POLICIES")]
    policies: Option<PathBuf>,
    /// Folder where bare plugin names are looked up as `<name>.wasm`; may be
    /// repeated. The plugins built with the gateway are always searched last.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// Sandboxes that may run at once across all models [default: 256].
    #[arg(long, value_name = "N", value_parser = bounded!(u32, config::INSTANCES))]
    max_instances: Option<u32>,
    /// Largest memory cap a policy may set, in MiB [default: 1024].
    #[arg(long, value_name = "MIB", value_parser = bounded!(usize, config::MEBIBYTES))]
    max_memory_mebibytes: Option<usize>,
    /// KiB of memory a freed sandbox slot keeps resident (reset) for its
    /// next call instead of returning it to the system; what stays after a
    /// burst is at most this much per slot. By default 512, or 2048 on
    /// kernels before Linux 6.7, which lack PAGEMAP_SCAN.
    #[arg(long, value_name = "KIB", value_parser = bounded!(usize, config::KEEP_RESIDENT_KIB))]
    sandbox_keep_resident_kib: Option<usize>,
    /// Folder where compiled plugins are kept between runs, keyed by the
    /// component's SHA-256 and the engine's settings; it must be writable
    /// by this user only. By default $XDG_CACHE_HOME/wasm-model-gateway/compiled,
    /// else ~/.cache/wasm-model-gateway/compiled.
    #[arg(long, value_name = "DIR", env = "GATEWAY_COMPILE_CACHE")]
    compile_cache: Option<PathBuf>,
    /// Compile every plugin at every start, keeping nothing on disk.
    #[arg(long, conflicts_with = "compile_cache")]
    no_compile_cache: bool,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR", env = "GATEWAY_LISTEN")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Largest request body, in bytes; larger gets 413 [default: 8388608].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::BODY_BYTES))]
    max_body_bytes: Option<usize>,
    /// Connections open at once per listener; past it a new connection is
    /// closed at once. Lowered to what the process's file limit allows
    /// [default: 20000].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::CONNECTIONS))]
    max_connections: Option<usize>,
    /// Connections open at once from one IP address (0: no limit; raise
    /// it behind a proxy or load balancer that connects for many clients)
    /// [default: 1000].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::CONNECTIONS_PER_PEER))]
    max_connections_per_peer: Option<usize>,
    /// Milliseconds a new connection has to send its first byte (cleartext)
    /// [default: 2000].
    #[arg(long, value_name = "MS", value_parser = bounded!(u64, config::TIMEOUT_MS))]
    first_byte_timeout_ms: Option<u64>,
    /// Milliseconds a TLS handshake may take [default: 5000].
    #[arg(long, value_name = "MS", value_parser = bounded!(u64, config::TIMEOUT_MS))]
    tls_handshake_timeout_ms: Option<u64>,
    /// Seconds a connection with no request in flight stays open
    /// [default: 60].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::TIMEOUT_SECS))]
    idle_timeout_secs: Option<u64>,
    /// Seconds a response write may make no progress (a client that does
    /// not read) before the connection is closed [default: 30].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::TIMEOUT_SECS))]
    write_timeout_secs: Option<u64>,
    /// Seconds a client has to send a request head [default: 10].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::TIMEOUT_SECS))]
    header_read_timeout_secs: Option<u64>,
    /// Bytes of a request's headers together; more gets 431
    /// [default: 65536].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::HEADER_BYTES))]
    max_header_bytes: Option<usize>,
    /// Headers per request; more gets 431 [default: 100].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::HEADERS))]
    max_headers: Option<usize>,
    /// HTTP/2 streams a client may open at once on one connection
    /// [default: 100].
    #[arg(long, value_name = "N", value_parser = bounded!(u32, config::H2_STREAMS))]
    h2_max_concurrent_streams: Option<u32>,
    /// PEM certificate chain: serve inference over TLS (with --tls-key).
    #[arg(long, value_name = "FILE", env = "GATEWAY_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", env = "GATEWAY_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: inference clients must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Address of the admin listener (/metrics and /admin/*); without it
    /// /metrics is served with inference and the admin API is off.
    #[arg(long, value_name = "ADDR", env = "GATEWAY_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// PEM certificate chain of the admin listener (with --admin-tls-key).
    #[arg(long, value_name = "FILE")]
    admin_tls_cert: Option<PathBuf>,
    /// PEM private key of --admin-tls-cert.
    #[arg(long, value_name = "FILE")]
    admin_tls_key: Option<PathBuf>,
    /// PEM CA bundle: admin clients must present a certificate it signed.
    #[arg(long, value_name = "FILE")]
    admin_tls_client_ca: Option<PathBuf>,
    /// Inputs per inference request; more gets 413 [default: 64].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::COUNT))]
    max_inputs: Option<usize>,
    /// Elements per input tensor; more gets 413 [default: 16777216].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::COUNT))]
    max_tensor_elements: Option<usize>,
    /// Bytes per BYTES element; more gets 400 [default: 1048576].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::BODY_BYTES))]
    max_bytes_element: Option<usize>,
    /// Seconds a client has to send a request body; slower gets 408
    /// [default: 30].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::TIMEOUT_SECS))]
    body_read_timeout_secs: Option<u64>,
    /// Bytes of any one request header's value; more gets 431
    /// [default: 8192].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::HEADER_BYTES))]
    max_header_value_bytes: Option<usize>,
    /// Bytes of a request's `id`; more gets 400 [default: 1024].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::BODY_BYTES))]
    max_id_bytes: Option<usize>,
    /// Bytes of each `parameters` object (the request's, an input's, an
    /// output's), as written; more gets 400 [default: 65536].
    #[arg(long, value_name = "BYTES", value_parser = bounded!(usize, config::BODY_BYTES))]
    max_parameters_bytes: Option<usize>,
    /// MiB that requests in flight may hold together (bodies, decoded
    /// inputs, outputs, answers); past it, 503 with Retry-After
    /// [default: 1024].
    #[arg(long, value_name = "MIB", value_parser = bounded!(usize, config::MEBIBYTES))]
    max_inflight_mebibytes: Option<usize>,
    /// MiB of sandbox memory that running plugin calls may reserve together
    /// (each its version's memory cap); calls wait for it until their
    /// deadline, then get 503 [default: 4096].
    #[arg(long, value_name = "MIB", value_parser = bounded!(usize, config::MEBIBYTES))]
    max_sandbox_memory_mebibytes: Option<usize>,
    /// Percent of the machine's CPU time shadow calls may use (0 to 100)
    /// [default: 10].
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    shadow_cpu_percent: Option<f64>,
    /// Bodies, inputs and outputs larger than this many KiB are decoded,
    /// validated and encoded on a lower-priority pool, never on the threads
    /// that answer small requests [default: 64].
    #[arg(long, value_name = "KIB", value_parser = bounded!(usize, config::MEBIBYTES))]
    bulk_kib: Option<usize>,
    /// Large requests waiting for that pool; more get 503 [default: 256].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::QUEUE))]
    bulk_queue: Option<usize>,
    /// Requests whose answers (every version's label) each model keeps for
    /// the ground truth clients send later to
    /// `POST /v2/models/{model}/feedback` [default: 100000].
    #[arg(long, value_name = "N", value_parser = bounded!(usize, config::QUEUE))]
    ground_truth_keep: Option<usize>,
    /// Seconds after SIGTERM during which readiness answers 503 while
    /// connections are still accepted, before the listeners close
    /// [default: 5].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::DRAIN_SECS))]
    drain_delay_secs: Option<u64>,
    /// Seconds in-flight requests get to finish once the listeners closed
    /// [default: 10].
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::DRAIN_SECS))]
    shutdown_grace_secs: Option<u64>,
    /// File holding the bearer token of /admin/reload, /admin/policies and
    /// /admin/monitoring (or set GATEWAY_ADMIN_TOKEN); without a token the
    /// admin API is off. Never a flag value: the process list shows those.
    #[arg(long, value_name = "FILE", env = "GATEWAY_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// File holding the bearer token that POST /v2/models/{model}/feedback
    /// needs (or set GATEWAY_FEEDBACK_TOKEN); without a token any client of
    /// the inference listener may send ground truth.
    #[arg(long, value_name = "FILE", env = "GATEWAY_FEEDBACK_TOKEN_FILE")]
    feedback_token_file: Option<PathBuf>,
    /// Do not watch the policy folder (reload with SIGHUP or POST /admin/reload).
    #[arg(long)]
    no_watch: bool,
    /// Log one line per inference request and shadow call (target
    /// `gateway::access`: request id, trace id, model, version, route,
    /// status, error kind, latency), at most this many a second; the rest
    /// are counted in the next line's `suppressed`. Off unless given.
    #[arg(long, value_name = "PER_SECOND", env = "GATEWAY_ACCESS_LOG", value_parser = bounded!(u32, 1..=1_000_000))]
    access_log: Option<u32>,
    /// Folder of the decision log: a record of every inference request and
    /// shadow call (version, route and why, the SHA-256 of every file that
    /// answered, digests of inputs and outputs), hash-chained, rotated at
    /// 64 MiB, 16 files kept. One gateway per folder. Off without it.
    #[arg(long, value_name = "DIR", env = "GATEWAY_DECISION_LOG")]
    decision_log: Option<PathBuf>,
    /// Folder where rollouts keep their state (step, decisions), so a
    /// restart resumes them; without it a restart starts every rollout
    /// again at its first step.
    #[arg(long, value_name = "DIR", env = "GATEWAY_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Judge rollouts with a fleet: from the gateway_gate_* series every
    /// replica exports, read from this Prometheus (http:// URL), at
    /// boundaries aligned in time, so every replica makes the same
    /// decisions. Without it each gateway judges its own traffic.
    #[arg(long, value_name = "URL", env = "GATEWAY_ROLLOUT_PROMETHEUS", value_parser = crate::http_url::HttpUrl::parse)]
    rollout_prometheus: Option<crate::http_url::HttpUrl>,
    /// A fleet's evaluation interval: boundaries are its multiples since
    /// the Unix epoch; the same on every replica (15 unless set).
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::FLEET_INTERVAL_SECS))]
    rollout_interval_secs: Option<u64>,
    /// How long after a boundary a fleet reads it: at least Prometheus's
    /// scrape interval and a scrape's time (30 unless set).
    #[arg(long, value_name = "SECS", value_parser = bounded!(u64, config::FLEET_DELAY_SECS))]
    rollout_delay_secs: Option<u64>,
    /// Label matchers added to a fleet's every query, so that only this
    /// fleet's series count: `job="gateway-prod"` (also !=, =~, !~;
    /// comma-separated).
    #[arg(long, value_name = "MATCHERS", value_parser = crate::rollout::fleet::Matchers::parse)]
    rollout_match: Option<crate::rollout::fleet::Matchers>,
    /// Also send every record the decision log writes to this http:// URL,
    /// as CloudEvents in batches (`application/cloudevents-batch+json`);
    /// never slows a request: what cannot be sent is counted and stays in
    /// the files. Needs the decision log.
    #[arg(long, value_name = "URL", env = "GATEWAY_DECISION_SINK", value_parser = crate::decisions::SinkUrl::parse)]
    decision_sink: Option<crate::decisions::SinkUrl>,
    /// Allow a reload that unloads every model (by default a policy folder
    /// emptied, or synced halfway, is refused and the models keep serving).
    #[arg(long)]
    allow_empty_policies: bool,
    /// Milliseconds after the last policy file change before reloading
    /// [default: 500].
    #[arg(long, value_name = "MS", value_parser = bounded!(u64, config::DEBOUNCE_MS))]
    reload_debounce_ms: Option<u64>,
}

/// A percentage from 0 to 100.
fn percent(text: &str) -> Result<f64, String> {
    let p = text
        .parse::<f64>()
        .map_err(|_| format!("{text:?} is not a percentage from 0 to 100"))?;
    config::percent(p)
}

/// Sets `$target` to the flag's value, converted, when the flag was given.
macro_rules! flag {
    ($target:expr, $flag:expr) => {
        flag!($target, $flag, |v| v)
    };
    ($target:expr, $flag:expr, $convert:expr) => {
        if let Some(v) = $flag {
            $target = $convert(v);
        }
    };
}

impl PolicyArgs {
    /// The defaults, then the configuration file, then these flags.
    fn settings(&self) -> Result<Settings, Vec<String>> {
        let mut settings = Settings::default();
        if let Some(file) = &self.config {
            settings
                .read_file(file)
                .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        }
        flag!(settings.options.policies, self.policies.clone());
        if !self.plugin_dirs.is_empty() {
            settings.plugin_dirs = self.plugin_dirs.clone();
        }
        flag!(settings.options.runtime.max_instances, self.max_instances);
        flag!(
            settings.options.runtime.max_memory_bytes,
            self.max_memory_mebibytes,
            mebibytes
        );
        flag!(
            settings.options.runtime.keep_resident_bytes,
            self.sandbox_keep_resident_kib,
            |k: usize| k << 10
        );
        flag!(
            settings.options.runtime.compile_cache,
            self.compile_cache.clone(),
            Some
        );
        if self.no_compile_cache {
            settings.options.runtime.compile_cache = None;
        }
        Ok(settings)
    }
}

fn mebibytes(m: usize) -> usize {
    m.saturating_mul(1 << 20)
}

impl ServeArgs {
    /// The options `serve` runs with: defaults, file, flags.
    fn options(self) -> Result<ServeOptions, Vec<String>> {
        let mut s = self.policy.settings()?;
        let secs = Duration::from_secs;
        let millis = Duration::from_millis;
        flag!(s.options.listen, self.listen);
        let server = &mut s.options.server;
        flag!(server.max_body_bytes, self.max_body_bytes);
        flag!(server.body_read_timeout, self.body_read_timeout_secs, secs);
        flag!(server.max_header_value_bytes, self.max_header_value_bytes);
        flag!(server.drain_delay, self.drain_delay_secs, secs);
        flag!(server.shutdown_grace, self.shutdown_grace_secs, secs);
        let limits = &mut server.connections;
        flag!(limits.max_connections, self.max_connections);
        flag!(
            limits.max_connections_per_peer,
            self.max_connections_per_peer
        );
        flag!(
            limits.first_byte_timeout,
            self.first_byte_timeout_ms,
            millis
        );
        flag!(
            limits.tls_handshake_timeout,
            self.tls_handshake_timeout_ms,
            millis
        );
        flag!(limits.idle_timeout, self.idle_timeout_secs, secs);
        flag!(limits.write_timeout, self.write_timeout_secs, secs);
        flag!(
            limits.header_read_timeout,
            self.header_read_timeout_secs,
            secs
        );
        flag!(limits.max_header_bytes, self.max_header_bytes);
        flag!(limits.max_headers, self.max_headers);
        flag!(
            limits.http2.max_concurrent_streams,
            self.h2_max_concurrent_streams
        );
        let decode = &mut server.decode;
        flag!(decode.max_inputs, self.max_inputs);
        flag!(decode.max_elements, self.max_tensor_elements);
        flag!(decode.max_bytes_element, self.max_bytes_element);
        flag!(decode.max_id_bytes, self.max_id_bytes);
        flag!(decode.max_parameters_bytes, self.max_parameters_bytes);
        let pipeline = &mut s.options.pipeline;
        flag!(
            pipeline.max_inflight_bytes,
            self.max_inflight_mebibytes,
            mebibytes
        );
        flag!(
            pipeline.max_sandbox_memory_bytes,
            self.max_sandbox_memory_mebibytes,
            mebibytes
        );
        flag!(pipeline.shadow_cpu_percent, self.shadow_cpu_percent);
        flag!(pipeline.bulk_bytes, self.bulk_kib, |k: usize| k
            .saturating_mul(1 << 10));
        flag!(pipeline.bulk_queue, self.bulk_queue);
        flag!(pipeline.ground_truth_keep, self.ground_truth_keep);
        flag!(s.tls.cert, self.tls_cert, Some);
        flag!(s.tls.key, self.tls_key, Some);
        flag!(s.tls.client_ca, self.tls_client_ca, Some);
        flag!(s.admin_listen, self.admin_listen, Some);
        flag!(s.admin_tls.cert, self.admin_tls_cert, Some);
        flag!(s.admin_tls.key, self.admin_tls_key, Some);
        flag!(s.admin_tls.client_ca, self.admin_tls_client_ca, Some);
        flag!(s.admin_token_file, self.admin_token_file, Some);
        flag!(s.feedback_token_file, self.feedback_token_file, Some);
        flag!(s.options.state_dir, self.state_dir, Some);
        flag!(s.reload_debounce, self.reload_debounce_ms, millis);
        if self.no_watch {
            s.watch = false;
        }
        if self.allow_empty_policies {
            s.options.allow_empty_policies = true;
        }
        flag!(s.options.pipeline.access_log_per_second, self.access_log);
        if let Some(dir) = self.decision_log {
            // The folder; the file's other [decisions] settings stay.
            match s.options.decisions.as_mut() {
                Some(log) => log.dir = dir,
                None => s.options.decisions = Some(crate::decisions::DecisionLogConfig::new(dir)),
            }
        }
        if let Some(url) = self.decision_sink {
            match s.options.decisions.as_mut() {
                Some(log) => log.sink = Some(url),
                None => {
                    return Err(vec![
                        "--decision-sink sends what the decision log writes: give --decision-log too"
                            .into(),
                    ]);
                }
            }
        }
        if let Some(prometheus) = self.rollout_prometheus {
            let fleet = s
                .options
                .fleet
                .get_or_insert(crate::rollout::fleet::Settings {
                    prometheus: prometheus.clone(),
                    every: config::FLEET_INTERVAL,
                    delay: config::FLEET_DELAY,
                    matchers: Default::default(),
                });
            fleet.prometheus = prometheus;
        }
        if let Some(matchers) = self.rollout_match {
            match s.options.fleet.as_mut() {
                Some(fleet) => fleet.matchers = matchers,
                None => {
                    return Err(vec![
                        "--rollout-match is for a fleet's rollouts: give --rollout-prometheus too"
                            .into(),
                    ]);
                }
            }
        }
        for (flag, value, set) in [
            (
                "--rollout-interval-secs",
                self.rollout_interval_secs,
                (|f, v| f.every = v) as fn(&mut crate::rollout::fleet::Settings, Duration),
            ),
            ("--rollout-delay-secs", self.rollout_delay_secs, |f, v| {
                f.delay = v
            }),
        ] {
            let Some(secs) = value else { continue };
            match s.options.fleet.as_mut() {
                Some(fleet) => set(fleet, Duration::from_secs(secs)),
                None => {
                    return Err(vec![format!(
                        "{flag} is for a fleet's rollouts: give --rollout-prometheus too"
                    )]);
                }
            }
        }
        s.finish().map_err(|e| vec![e])
    }
}

/// Parses the arguments and runs the command; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match crate::process::runtime(None) {
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
            Command::Plugin(command) => plugin(command).await,
            Command::Log(command) => log(command),
            Command::Replay(args) => replay(args).await,
            Command::WhatIf(args) => what_if(args).await,
        }
    })
}

fn log(command: LogCommand) -> ExitCode {
    match command {
        LogCommand::Verify { dir } => match crate::decisions::verify::verify(&dir) {
            Ok(report) => {
                let range = match (report.first_seq, report.last_seq) {
                    (Some(first), Some(last)) => format!("records {first} to {last}"),
                    _ => "no records".to_string(),
                };
                let dropped = if report.dropped > 0 {
                    format!("; the log says {} records were dropped", report.dropped)
                } else {
                    String::new()
                };
                for problem in &report.problems {
                    println!("BROKEN {problem}");
                }
                if report.problems.is_empty() {
                    println!(
                        "ok: {} records in {} files, {range}, chained{dropped}",
                        report.records, report.files
                    );
                    ExitCode::SUCCESS
                } else {
                    println!(
                        "the chain breaks {} times in {} records ({range}){dropped}",
                        report.problems.len(),
                        report.records
                    );
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        LogCommand::Show { id, dir } => match crate::decisions::verify::find(&dir, &id, 1000) {
            Ok(records) if records.is_empty() => {
                eprintln!("error: no decision of request `{id}` in {}", dir.display());
                ExitCode::FAILURE
            }
            Ok(records) => {
                for record in records {
                    println!("{record}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The exit code of a command that could not run at all (`replay`,
/// `what-if`): 1 says what they found.
const CANNOT_RUN: u8 = 2;

fn offline_options(policy: &PolicyArgs) -> Result<ServeOptions, String> {
    policy
        .settings()
        .and_then(|s| s.finish().map_err(|e| vec![e]))
        .map_err(|errors| errors.join("\n"))
}

async fn replay(args: ReplayArgs) -> ExitCode {
    let mut out = String::new();
    let verdict = match offline_options(&args.policy) {
        Ok(options) => {
            crate::replay::replay(
                &options,
                &args.log,
                &args.id,
                args.seq,
                args.version.as_deref(),
                &mut out,
            )
            .await
        }
        Err(e) => Err(e),
    };
    print!("{out}");
    match verdict {
        Ok(crate::replay::Verdict::Same) => ExitCode::SUCCESS,
        Ok(crate::replay::Verdict::Differs) => ExitCode::FAILURE,
        Ok(crate::replay::Verdict::NotComparable(_)) => ExitCode::from(CANNOT_RUN),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(CANNOT_RUN)
        }
    }
}

async fn what_if(args: WhatIfArgs) -> ExitCode {
    let thresholds = crate::replay::whatif::Thresholds {
        max_changed_percent: args.max_changed_percent,
        max_failed_percent: args.max_failed_percent,
    };
    let mut out = String::new();
    let crossed = match offline_options(&args.policy) {
        Ok(options) => {
            crate::replay::whatif::what_if(&options, &args.log, thresholds, &mut out).await
        }
        Err(e) => Err(e),
    };
    print!("{out}");
    match crossed {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(CANNOT_RUN)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only for people: not in files, pipes or log collectors.
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let mut options = match args.options() {
        Ok(options) => options,
        Err(errors) => {
            for error in errors {
                eprintln!("error: {error}");
            }
            return ExitCode::FAILURE;
        }
    };
    let limits = &mut options.server.connections;
    limits.max_connections = fit_file_limit(limits.max_connections);
    let server = match server::start(options).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = server.shutdown_handle();
    let sweep = tokio::spawn(crate::process::sweep_freed_memory());
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
    sweep.abort();
    ExitCode::SUCCESS
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
    let fail = |errors: &[String], what: &str| {
        for error in errors {
            eprintln!("error: {error}");
        }
        eprintln!("{} problem(s) in {what}", errors.len());
        ExitCode::FAILURE
    };
    let config = args
        .config
        .as_ref()
        .map_or_else(String::new, |f| f.display().to_string());
    let options = match args
        .settings()
        .and_then(|s| s.finish().map_err(|e| vec![e]))
    {
        Ok(options) => options,
        Err(errors) => return fail(&errors, &config),
    };
    if args.config.is_some() {
        let listeners = [
            options.server.tls.as_ref(),
            options.server.admin.as_ref().and_then(|a| a.tls.as_ref()),
        ];
        let errors: Vec<String> = listeners
            .into_iter()
            .flatten()
            .filter_map(|tls| server::check_tls(tls).err().map(|e| e.to_string()))
            .collect();
        if !errors.is_empty() {
            return fail(&errors, &config);
        }
        println!("ok: configuration {config}");
    }
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

impl PluginArgs {
    /// The plugin's file and how to run it.
    fn resolve(&self) -> Result<(PathBuf, crate::author::Settings), String> {
        use crate::contract::{ClockGrant, Grants, RandomGrant};
        let mut dirs = self.plugin_dirs.clone();
        dirs.push(PathBuf::from(crate::artifacts::BUILT_PLUGIN_DIR));
        let path = crate::author::resolve(&self.plugin, &dirs)?;
        let mut models = Vec::new();
        for spec in &self.models {
            let (name, file) = spec
                .split_once('=')
                .ok_or_else(|| format!("--model {spec}: write NAME=FILE"))?;
            models.push((name.to_string(), PathBuf::from(file)));
        }
        let grants = Grants {
            random: match self.random.as_str() {
                "real" => RandomGrant::Real,
                "none" => RandomGrant::Denied,
                _ => RandomGrant::Seeded,
            },
            clocks: match self.clocks.as_str() {
                "real" => ClockGrant::Real,
                "none" => ClockGrant::Denied,
                _ => ClockGrant::Fixed,
            },
            seed: self.seed,
        };
        let compile_cache = if self.no_compile_cache {
            None
        } else {
            self.compile_cache
                .clone()
                .or_else(crate::runtime::cache::default_dir)
        };
        Ok((
            path,
            crate::author::Settings {
                timeout: Duration::from_millis(self.timeout_ms),
                memory_bytes: mebibytes(self.memory_mebibytes),
                grants,
                models,
                compile_cache,
            },
        ))
    }

    async fn load(&self) -> Result<(crate::author::Loaded, crate::author::Settings), String> {
        let (path, settings) = self.resolve()?;
        let loaded = crate::author::Loaded::load(&path, &settings).await?;
        Ok((loaded, settings))
    }
}

async fn plugin(command: PluginCommand) -> ExitCode {
    let outcome = match command {
        PluginCommand::Run(args) => plugin_run(args).await,
        PluginCommand::Test(args) => plugin_test(args).await,
        PluginCommand::New(args) => plugin_new(args),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A request file, or stdin for `-`.
fn read_input(path: &std::path::Path) -> Result<Vec<u8>, String> {
    if path == std::path::Path::new("-") {
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut body)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(body)
    } else {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

async fn plugin_run(args: PluginRunArgs) -> Result<ExitCode, String> {
    let body = read_input(&args.input)?;
    let (loaded, settings) = args.plugin.load().await?;
    let (status, answer) = crate::author::run(&loaded, &body, &settings).await;
    println!("{answer}");
    Ok(if status == 200 {
        ExitCode::SUCCESS
    } else {
        eprintln!("status {status}");
        ExitCode::FAILURE
    })
}

async fn plugin_test(args: PluginTestArgs) -> Result<ExitCode, String> {
    let requests = match &args.inputs {
        None => Vec::new(),
        Some(file) => crate::author::requests(file, &read_input(file)?)?,
    };
    let (loaded, settings) = args.plugin.load().await?;
    let report = crate::author::conformance(&loaded, &settings, &requests).await;
    for line in &report.lines {
        println!("{line}");
    }
    if report.failures == 0 {
        println!(
            "plugin `{}` passed all {} checks",
            loaded.plugin.name(),
            report.lines.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "plugin `{}` failed {} of {} checks",
            loaded.plugin.name(),
            report.failures,
            report.lines.len()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn plugin_new(args: PluginNewArgs) -> Result<ExitCode, String> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let files = crate::author::new_project(&args.name, args.lang, &dir)?;
    for file in &files {
        println!("wrote {}", file.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(["gateway", "serve"].iter().chain(args)).unwrap();
        match cli.command {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    /// Every `[default: X]` in `gateway serve --help`, given as a flag,
    /// yields the defaults the gateway runs with: the help tells the truth.
    #[test]
    fn the_defaults_in_the_help_are_the_defaults() {
        let mut command = Cli::command();
        let serve = command.find_subcommand_mut("serve").unwrap();
        let mut flags = Vec::new();
        for arg in serve.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some(at) = help.find("[default: ") else {
                continue;
            };
            let rest = &help[at + "[default: ".len()..];
            let value = &rest[..rest.find(']').unwrap()];
            flags.push(format!("--{}", arg.get_long().unwrap()));
            flags.push(value.to_string());
        }
        assert!(flags.len() >= 2 * 30, "{flags:?}");
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let given = serve_args(&flags).options().unwrap();
        let defaults = Settings::default().finish().unwrap();
        assert_eq!(format!("{given:?}"), format!("{defaults:?}"));
        let none = serve_args(&[]).options().unwrap();
        assert_eq!(format!("{none:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gateway.toml");
        std::fs::write(
            &file,
            "[connections]\nmax = 5\nmax_headers = 50\n[policies]\nwatch = true\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let options = serve_args(&["--config", file, "--max-headers", "7", "--no-watch"])
            .options()
            .unwrap();
        assert_eq!(options.server.connections.max_connections, 5);
        assert_eq!(options.server.connections.max_headers, 7);
        assert_eq!(options.watch_debounce, None);
    }

    #[test]
    fn flags_have_the_bounds_of_the_file() {
        for (flag, value) in [
            ("--max-connections", "0"),
            ("--first-byte-timeout-ms", "0"),
            ("--shadow-cpu-percent", "101"),
            ("--max-headers", "-1"),
        ] {
            let parsed = Cli::try_parse_from(["gateway", "serve", flag, value]);
            assert!(parsed.is_err(), "{flag} {value} accepted");
        }
    }
}
