//! End-to-end load: N keep-alive connections over loopback for a fixed time,
//! each sending one V2 request after another, against
//!
//! 1. `http-limit`: a minimal hyper server (same HTTP stack and settings)
//!    that reads the request and answers a fixed V2 response of the same
//!    size as the gateway's: what HTTP alone costs;
//! 2. `native`: the same server decoding the request with the gateway's V2
//!    codec, running ttm-rules-v1's rules (`plugins/ttm-rules`) compiled
//!    natively and in-process, encoding the answer: what the gateway costs
//!    beyond serving the model directly (sandbox, routing, metrics). Its
//!    answer is checked to be the gateway's, byte for byte;
//! 3. `gateway`: the gateway, rule-based plugin (ttm-rules-v1), champion only;
//!    `gateway-kept`: the same with `calls_per_instance = 1000` (instances
//!    kept between calls instead of a fresh one per call);
//! 4. `canary`: the same with a 50 % canary to ttm-rules-v2;
//! 5. `shadow`: the same with every request shadowed to ttm-rules-v3;
//! 6. `validated`: the example policy's input rules and data monitoring;
//! 7. `onnx`: the example's trained model (policies/models/ttm-v2.onnx)
//!    served as an ONNX-only version;
//! 8. `recorded`: `gateway` on a second gateway that keeps a decision log
//!    (a record per request, with digests of inputs and outputs);
//!    `recorded-tensors`: the same with the inputs and outputs themselves
//!    in every record (`[record] sample_percent = 100`); `recorded-1024` and
//!    `recorded-tensors-1024`: both with 1024-row requests, whose difference in
//!    CPU time per request, divided by the KiB of tensors each record keeps,
//!    is the cost of recording a KiB;
//!
//! at 1, 16 and 64 connections, every scenario in the same run, each
//! reported as a ratio to `http-limit` at the same concurrency. Each
//! concurrency runs every scenario in turn, `--rounds` times over
//! (interleaved, so a slow moment of the shared machine hits all scenarios
//! alike); the run with the median throughput of each scenario is reported.
//!
//!     cargo bench --bench load [-- --seconds 2 --rounds 3 --connections 1,16,64
//!                                  --scenarios gateway,shadow --server-threads 2]
//!
//! Client and servers share the process (separate tokio runtimes: the
//! servers get two worker threads unless `--server-threads` says otherwise,
//! the client one) and the machine's cores;
//! loopback only. Results: stdout and `$CARGO_TARGET_DIR/load-results.{md,json}`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::{protocol, server};

mod common;
use common::Connection;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const REQUEST: &str = r#"{"id":"load","inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,2,4,1]}]}"#;

/// Who answers a scenario.
#[derive(Clone, Copy)]
enum Server {
    HttpLimit,
    Native,
    /// The gateway, serving this model.
    Gateway(&'static str),
    /// The gateway that keeps a decision log, serving this model
    /// requests of this many rows.
    Recorded(&'static str, usize),
}

const SCENARIOS: [(&str, Server); 12] = [
    ("http-limit", Server::HttpLimit),
    ("native", Server::Native),
    ("gateway", Server::Gateway("plain")),
    ("gateway-kept", Server::Gateway("kept")),
    ("canary", Server::Gateway("canary")),
    ("shadow", Server::Gateway("shadow")),
    ("validated", Server::Gateway("validated")),
    ("onnx", Server::Gateway("onnx")),
    ("recorded", Server::Recorded("plain", 1)),
    ("recorded-tensors", Server::Recorded("full", 1)),
    ("recorded-1024", Server::Recorded("plain", 1024)),
    ("recorded-tensors-1024", Server::Recorded("full", 1024)),
];

/// The row every request sends (REQUEST's).
const ROW: [f32; 6] = [3.0, 40.0, 12.0, 2.0, 4.0, 1.0];

/// A request of `rows` copies of [`ROW`].
fn request_of(rows: usize) -> Bytes {
    if rows == 1 {
        return Bytes::from_static(REQUEST.as_bytes());
    }
    let data: Vec<f32> = (0..rows).flat_map(|_| ROW).collect();
    Bytes::from(
        serde_json::json!({"id": "load", "inputs": [{"name": "pr_features", "shape": [rows, 6], "datatype": "FP32", "data": data}]})
            .to_string(),
    )
}

/// The bytes of tensors a record of a `rows`-row request keeps: the
/// inputs, the labels (each after its 4-byte length) and the
/// probabilities.
fn kept_bytes(rows: usize) -> usize {
    let pr = ttm_rules::PullRequest::from_row(0, &ROW).expect("the row");
    let label = ttm_rules::BUCKETS[ttm_rules::most_probable(&ttm_rules::v1::probabilities(&pr))];
    rows * (24 + 4 + label.len() + 20)
}

fn policies(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example =
        std::fs::read_to_string(root.join("policies/time-to-merge.toml")).expect("example policy");
    let files = [
        (
            "plain.toml",
            "model = \"plain\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n"
                .to_string(),
        ),
        (
            "kept.toml",
            "model = \"kept\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
             limits = { calls_per_instance = 1000 }\n"
                .to_string(),
        ),
        (
            "canary.toml",
            "model = \"canary\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
             [versions.v2]\nplugin = \"ttm-rules-v2\"\n[canary]\nversion = \"v2\"\npercent = 50\n"
                .to_string(),
        ),
        (
            "shadow.toml",
            "model = \"shadow\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
             [versions.v3]\nplugin = \"ttm-rules-v3\"\n[shadow]\nversions = [\"v3\"]\nsample_percent = 100\n"
                .to_string(),
        ),
        (
            "validated.toml",
            example.replace("model = \"time-to-merge\"", "model = \"validated\""),
        ),
        (
            "full.toml",
            "model = \"full\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
             [record]\nsample_percent = 100\nmax_kib = 512\n"
                .to_string(),
        ),
        (
            "onnx.toml",
            "model = \"onnx\"\nchampion = \"v1\"\n[versions.v1]\nonnx = \"models/ttm-v2.onnx\"\n"
                .to_string(),
        ),
    ];
    std::fs::create_dir_all(dir.join("models")).expect("models/");
    std::fs::copy(
        root.join("policies/models/ttm-v2.onnx"),
        dir.join("models/ttm-v2.onnx"),
    )
    .expect("copy model");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write policy");
    }
}

/// Serves `handler` on a free loopback port with the gateway's HTTP/1
/// settings (timer, header timeout, buffer size, keep-alive, no delay).
async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Bytes) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = gateway::server::ServerConfig::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.connections.header_read_timeout)
        .max_buf_size((config.connections.max_header_bytes * 2).max(8192))
        .keep_alive(true);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let body = match request.into_body().collect().await {
                        Ok(body) => body.to_bytes(),
                        Err(_) => Bytes::new(),
                    };
                    Ok::<_, std::convert::Infallible>(handler(body).await)
                }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::spawn(connection);
        }
    });
    addr
}

fn answer(body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .header("x-model-version", "v1")
        .body(Full::new(body))
        .expect("response")
}

/// Scenario 1: reads each request's body, answers `reply`.
async fn http_limit(reply: Bytes) -> SocketAddr {
    serve(move |_body| {
        let reply = reply.clone();
        async move { answer(reply) }
    })
    .await
}

/// Scenario 2: the V2 codec around ttm-rules-v1's rules, compiled natively.
async fn native() -> SocketAddr {
    serve(|body: Bytes| async move {
        match native_infer(&body) {
            Ok(reply) => answer(reply.into()),
            Err(message) => Response::builder()
                .status(400)
                .body(Full::new(Bytes::from(message)))
                .expect("response"),
        }
    })
    .await
}

/// What ttm-rules-v1 does inside its sandbox, natively: `pr_features` in,
/// `label` and `probabilities` out.
fn native_infer(body: &[u8]) -> Result<Vec<u8>, String> {
    use gateway::tensor::{Datatype, Tensor};
    let request = protocol::decode_infer_request(body, None, protocol::DecodeLimits::default())
        .map_err(|e| e.to_string())?;
    let features = request
        .inputs
        .iter()
        .find(|t| t.name == ttm_rules::INPUT && t.datatype == Datatype::Fp32)
        .ok_or("no FP32 pr_features")?;
    let mut label = Vec::new();
    let mut probabilities = Vec::new();
    let mut rows = 0i64;
    for (r, row) in features.data.chunks_exact(24).enumerate() {
        let mut values = [0f32; 6];
        for (v, b) in values.iter_mut().zip(row.chunks_exact(4)) {
            *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        let p = ttm_rules::v1::probabilities(&ttm_rules::PullRequest::from_row(r, &values)?);
        let name = ttm_rules::BUCKETS[ttm_rules::most_probable(&p)];
        label.extend_from_slice(&(name.len() as u32).to_le_bytes());
        label.extend_from_slice(name.as_bytes());
        probabilities.extend(p.iter().flat_map(|v| v.to_le_bytes()));
        rows += 1;
    }
    let label = Tensor {
        name: "label".into(),
        datatype: Datatype::Bytes,
        shape: vec![rows],
        data: label,
    };
    let probabilities = Tensor {
        name: "probabilities".into(),
        datatype: Datatype::Fp32,
        shape: vec![rows, 5],
        data: probabilities,
    };
    let (body, _) = protocol::InferResponse {
        model_name: "plain",
        model_version: "v1",
        id: request.id.as_deref(),
        outputs: &[(&label, false), (&probabilities, false)],
    }
    .encode()
    .map_err(|e| e.to_string())?;
    Ok(body)
}

#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    scenario: String,
    connections: usize,
    requests_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    /// CPU time of the whole process (client and server) per request,
    /// warm-up included: steadier than throughput on a shared machine.
    cpu_us_per_request: f64,
    errors: u64,
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// What one load run saw.
struct Measured {
    /// Latencies of the measured part, sorted.
    latencies: Vec<u32>,
    /// Failed requests in the measured part.
    errors: u64,
    /// Successful requests, warm-up included.
    answered: u64,
}

/// `connections` connections sending for `seconds` after a one-second
/// warm-up; latencies of the measured part only.
async fn load(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    connections: usize,
    seconds: f64,
) -> Measured {
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let body = body.clone();
            let path = path.to_string();
            tokio::spawn(async move {
                let mut connection = Connection::open(addr).await;
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                let mut answered = 0u64;
                loop {
                    let start = Instant::now();
                    if start >= end {
                        break;
                    }
                    let ok = connection.send(&path, &body).await.is_some();
                    answered += ok as u64;
                    if start >= warm {
                        if ok {
                            latencies
                                .push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        } else {
                            errors += 1;
                        }
                    }
                    if !ok {
                        connection = Connection::open(addr).await;
                    }
                }
                (latencies, errors, answered)
            })
        })
        .collect();
    let mut measured = Measured {
        latencies: Vec::new(),
        errors: 0,
        answered: 0,
    };
    for task in tasks {
        let (latencies, errors, answered) = task.await.expect("client task");
        measured.latencies.extend(latencies);
        measured.errors += errors;
        measured.answered += answered;
    }
    measured.latencies.sort_unstable();
    measured
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at] as u64
}

struct Args {
    seconds: f64,
    rounds: usize,
    /// Worker threads of the servers' runtime.
    server_threads: usize,
    connections: Vec<usize>,
    /// Only these scenarios (all when empty).
    only: Vec<String>,
}

fn args() -> Args {
    let mut seconds = 2.0;
    let mut rounds = 3;
    let mut server_threads = 2;
    let mut connections = vec![1, 16, 64];
    let mut only = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => seconds = positive(args.next(), "--seconds N"),
            "--rounds" => rounds = positive(args.next(), "--rounds N"),
            "--server-threads" => server_threads = positive(args.next(), "--server-threads N"),
            "--connections" => {
                connections = args
                    .next()
                    .map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
                    .expect("--connections 1,16,64")
            }
            "--scenarios" => {
                only = args
                    .next()
                    .map(|s| s.split(',').map(str::to_string).collect())
                    .expect("--scenarios gateway,canary")
            }
            _ => {}
        }
    }
    Args {
        seconds,
        rounds,
        server_threads,
        connections,
        only,
    }
}

/// A command-line value above zero, or a panic saying how to write it.
fn positive<T: std::str::FromStr + PartialOrd + Default>(value: Option<String>, usage: &str) -> T {
    value
        .and_then(|s| s.parse().ok())
        .filter(|n| *n > T::default())
        .expect(usage)
}

fn main() {
    let Args {
        seconds,
        rounds,
        server_threads,
        connections: connection_counts,
        only,
    } = args();
    let servers = common::served_runtime(server_threads);
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");

    let dir = tempfile::tempdir().expect("temp dir");
    policies(dir.path());
    let gateway = servers
        .block_on(server::start(common::gateway_options(dir.path())))
        .expect("gateway");
    let gateway_addr = gateway.local_addr();
    // The recording gateway runs only when a scenario needs it: an idle
    // gateway still ticks its engine's epoch every millisecond, which would
    // charge every other scenario a thousand wake-ups a second.
    let selected = |scenario: &str| only.is_empty() || only.iter().any(|o| o == scenario);
    let log = tempfile::tempdir().expect("temp dir");
    let recorded = SCENARIOS
        .iter()
        .any(|(scenario, server)| matches!(server, Server::Recorded(..)) && selected(scenario))
        .then(|| {
            let mut options = common::gateway_options(dir.path());
            options.decisions = Some(gateway::decisions::DecisionLogConfig::new(
                log.path().to_path_buf(),
            ));
            servers.block_on(server::start(options)).expect("gateway")
        });

    // The HTTP limit answers what the gateway answers, byte for byte; the
    // native rules must compute the same answer.
    let request = Bytes::from_static(REQUEST.as_bytes());
    let ask = |addr| {
        client.block_on(async {
            let mut c = Connection::open(addr).await;
            c.send("/v2/models/plain/infer", &request).await
        })
    };
    let reply = ask(gateway_addr).expect("the gateway answers");
    let limit_addr = servers.block_on(http_limit(reply.clone()));
    let native_addr = servers.block_on(native());
    assert_eq!(
        ask(native_addr).as_deref(),
        Some(&reply[..]),
        "the native rules answer differently from the gateway"
    );

    let mut runs = Vec::new();
    for &connections in &connection_counts {
        let mut measured: Vec<Vec<Run>> = vec![Vec::new(); SCENARIOS.len()];
        for _ in 0..rounds {
            for (i, (scenario, server)) in SCENARIOS.iter().enumerate() {
                if !selected(scenario) {
                    continue;
                }
                let (addr, path, rows) = match server {
                    Server::HttpLimit => (limit_addr, "/v2/models/plain/infer".to_string(), 1),
                    Server::Native => (native_addr, "/v2/models/plain/infer".to_string(), 1),
                    Server::Gateway(m) => (gateway_addr, format!("/v2/models/{m}/infer"), 1),
                    Server::Recorded(m, rows) => {
                        let Some(recorded) = &recorded else {
                            unreachable!("the recording gateway runs when a scenario needs it")
                        };
                        (
                            recorded.local_addr(),
                            format!("/v2/models/{m}/infer"),
                            *rows,
                        )
                    }
                };
                let cpu = cpu_seconds();
                let m = client.block_on(load(addr, &path, request_of(rows), connections, seconds));
                let cpu = cpu_seconds() - cpu;
                let run = Run {
                    scenario: scenario.to_string(),
                    connections,
                    requests_per_second: m.latencies.len() as f64 / seconds,
                    p50_us: percentile(&m.latencies, 0.50),
                    p99_us: percentile(&m.latencies, 0.99),
                    p999_us: percentile(&m.latencies, 0.999),
                    cpu_us_per_request: cpu * 1e6 / m.answered.max(1) as f64,
                    errors: m.errors,
                };
                eprintln!("{run:?}");
                measured[i].push(run);
            }
        }
        for mut of_scenario in measured {
            of_scenario.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
            if !of_scenario.is_empty() {
                let errors = of_scenario.iter().map(|r| r.errors).sum();
                let mut median = of_scenario.swap_remove(of_scenario.len() / 2);
                median.errors = errors;
                runs.push(median);
            }
        }
    }
    servers.block_on(gateway.shutdown());
    if let Some(recorded) = recorded {
        servers.block_on(recorded.shutdown());
    }

    let md = report(&runs);
    common::write_results(
        "load-results",
        &md,
        serde_json::to_string_pretty(&runs).ok(),
    );
}

/// The markdown table, each scenario relative to the HTTP limit, the native
/// model and the plain gateway at the same concurrency, and the targets of
/// issue 7, each marked met or not.
fn report(runs: &[Run]) -> String {
    let find = |scenario: &str, connections: usize| {
        runs.iter()
            .find(|r| r.scenario == scenario && r.connections == connections)
    };
    let rps = |scenario: &str, connections: usize| {
        find(scenario, connections).map_or(f64::NAN, |r| r.requests_per_second)
    };
    let mut md = String::from(
        "| scenario | connections | req/s | vs HTTP limit | vs native | vs gateway | p50 | p99 | p99.9 | CPU/request | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let n = r.connections;
        md += &format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} µs | {} µs | {} µs | {:.1} µs | {} |\n",
            r.scenario,
            n,
            r.requests_per_second,
            r.requests_per_second / rps("http-limit", n),
            r.requests_per_second / rps("native", n),
            r.requests_per_second / rps("gateway", n),
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.cpu_us_per_request,
            r.errors
        );
    }
    md += "\nTargets (throughput at 64 connections unless said):";
    let mut target = |what: String, value: f64, met: bool| {
        if value.is_finite() {
            md += &format!(
                "\n- {what}: {} ({})",
                if what.contains("p99") {
                    format!("{:+.0} %", value * 100.0)
                } else {
                    format!("{:.0} %", value * 100.0)
                },
                if met { "met" } else { "not met" }
            );
        }
    };
    for gw in ["gateway", "gateway-kept"] {
        let of_limit = rps(gw, 64) / rps("http-limit", 64);
        target(
            format!("`{gw}` >= 50 % of the HTTP limit"),
            of_limit,
            of_limit >= 0.5,
        );
        let of_native = rps(gw, 64) / rps("native", 64);
        target(
            format!("`{gw}` within 25 % of the native model (>= 75 %)"),
            of_native,
            of_native >= 0.75,
        );
    }
    for scenario in ["canary", "validated", "recorded"] {
        let cost = 1.0 - rps(scenario, 64) / rps("gateway", 64);
        target(
            format!("`{scenario}` costs <= 5 % of the gateway's throughput"),
            cost,
            cost <= 0.05,
        );
    }
    let kept = rps("shadow", 64) / rps("gateway", 64);
    target(
        "CPU saturated: a 100 % shadow keeps >= 90 % of the gateway's throughput".into(),
        kept,
        kept >= 0.9,
    );
    if let (Some(shadow), Some(plain)) = (find("shadow", 1), find("gateway", 1)) {
        let p99 = shadow.p99_us as f64 / plain.p99_us as f64 - 1.0;
        target(
            "CPU spare (1 connection): a 100 % shadow moves the champion's p99 by <= +10 %".into(),
            p99,
            p99 <= 0.10,
        );
    }
    let tensors = 1.0 - rps("recorded-tensors", 64) / rps("recorded", 64);
    if tensors.is_finite() {
        md += &format!(
            "\n- `recorded-tensors` (every record keeps its {} bytes of tensors) costs {:.1} % of `recorded`'s throughput",
            kept_bytes(1),
            tensors * 100.0
        );
    }
    for n in [1, 16, 64] {
        if let (Some(full), Some(digests)) =
            (find("recorded-tensors-1024", n), find("recorded-1024", n))
        {
            let kib = kept_bytes(1024) as f64 / 1024.0;
            md += &format!(
                "\n- recording tensors costs {:.2} µs of CPU per KiB kept at {n} connections ({:.1} vs {:.1} µs per 1024-row request, {kib:.2} KiB each)",
                (full.cpu_us_per_request - digests.cpu_us_per_request) / kib,
                full.cpu_us_per_request,
                digests.cpu_us_per_request
            );
        }
    }
    md + "\n"
}
