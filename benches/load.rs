//! End-to-end load: N keep-alive connections over loopback for a fixed time,
//! each sending one V2 request after another, against
//!
//! 1. `http-limit`: a minimal hyper server (same HTTP stack and settings)
//!    that reads the request and answers a fixed V2 response of the same
//!    size as the gateway's: what HTTP alone costs;
//! 3. `gateway`: the gateway, rule-based plugin (ttm-rules-v1), champion only;
//! 4. `canary`: the same with a 50 % canary to ttm-rules-v2;
//! 5. `shadow`: the same with every request shadowed to ttm-rules-v3;
//! 6. `validated`: the example policy's input rules and data monitoring;
//! 7. `onnx`: the example's trained model (policies/models/ttm-v2.onnx)
//!    served as an ONNX-only version;
//!
//! at 1, 16 and 64 connections, every scenario in the same run, each
//! reported as a ratio to `http-limit` at the same concurrency. (Scenario 2
//! of issue 7, the model compiled natively behind the same stack, is not
//! written yet.)
//!
//!     cargo bench --bench load [-- --seconds 3 --connections 1,16,64]
//!
//! Client and servers share the process (separate tokio runtimes: the
//! servers get two worker threads, the client one) and the machine's cores;
//! loopback only. Results: stdout and `$CARGO_TARGET_DIR/load-results.{md,json}`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::server;

mod common;
use common::Connection;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const REQUEST: &str = r#"{"id":"load","inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,2,4,1]}]}"#;

/// (scenario, model served by the gateway; `None` for the HTTP limit)
const SCENARIOS: [(&str, Option<&str>); 6] = [
    ("http-limit", None),
    ("gateway", Some("plain")),
    ("canary", Some("canary")),
    ("shadow", Some("shadow")),
    ("validated", Some("validated")),
    ("onnx", Some("onnx")),
];

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

/// The minimal server: reads each request's body, answers `body`.
async fn http_limit(body: Bytes) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let body = body.clone();
                    async move {
                        let _ = hyper::body::Incoming::collect(request.into_body()).await;
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .header("x-model-version", "v1")
                                .body(Full::new(body))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    scenario: String,
    connections: usize,
    requests_per_second: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    errors: u64,
}

/// `connections` connections sending for `seconds` after a one-second
/// warm-up; latencies of the measured part only.
async fn load(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    seconds: f64,
) -> (Vec<u32>, u64, f64) {
    let body = Bytes::from_static(REQUEST.as_bytes());
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
                loop {
                    let start = Instant::now();
                    if start >= end {
                        break;
                    }
                    let ok = connection.send(&path, &body).await.is_some();
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
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await.expect("client task");
        all.extend(latencies);
        errors += e;
    }
    all.sort_unstable();
    (all, errors, seconds)
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at] as u64
}

fn args() -> (f64, Vec<usize>) {
    let mut seconds = 3.0;
    let mut connections = vec![1, 16, 64];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--connections" => {
                connections = args
                    .next()
                    .map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
                    .expect("--connections 1,16,64")
            }
            _ => {}
        }
    }
    (seconds, connections)
}

fn main() {
    let (seconds, connection_counts) = args();
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
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

    // The HTTP limit answers what the gateway answers, byte for byte in size.
    let reply = client
        .block_on(async {
            let mut c = Connection::open(gateway_addr).await;
            c.send(
                "/v2/models/plain/infer",
                &Bytes::from_static(REQUEST.as_bytes()),
            )
            .await
        })
        .expect("the gateway answers");
    let limit_addr = servers.block_on(http_limit(reply));

    let mut runs = Vec::new();
    for &connections in &connection_counts {
        for (scenario, model) in SCENARIOS {
            let (addr, path) = match model {
                None => (limit_addr, "/v2/models/plain/infer".to_string()),
                Some(m) => (gateway_addr, format!("/v2/models/{m}/infer")),
            };
            let (latencies, errors, secs) =
                client.block_on(load(addr, &path, connections, seconds));
            let run = Run {
                scenario: scenario.to_string(),
                connections,
                requests_per_second: latencies.len() as f64 / secs,
                p50_us: percentile(&latencies, 0.50),
                p99_us: percentile(&latencies, 0.99),
                p999_us: percentile(&latencies, 0.999),
                errors,
            };
            eprintln!("{run:?}");
            runs.push(run);
        }
    }
    servers.block_on(gateway.shutdown());

    let md = report(&runs);
    common::write_results(
        "load-results",
        &md,
        serde_json::to_string_pretty(&runs).ok(),
    );
}

/// The markdown table, each scenario relative to the HTTP limit at the same
/// concurrency, and the targets of issue 7 that this run can check.
fn report(runs: &[Run]) -> String {
    let find = |scenario: &str, connections: usize| {
        runs.iter()
            .find(|r| r.scenario == scenario && r.connections == connections)
    };
    let mut md = String::from(
        "| scenario | connections | req/s | vs HTTP limit | vs gateway | p50 | p99 | p99.9 | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in runs {
        let limit = find("http-limit", r.connections).map_or(f64::NAN, |l| l.requests_per_second);
        let gw = find("gateway", r.connections).map_or(f64::NAN, |g| g.requests_per_second);
        md += &format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} µs | {} µs | {} µs | {} |\n",
            r.scenario,
            r.connections,
            r.requests_per_second,
            r.requests_per_second / limit,
            r.requests_per_second / gw,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.errors
        );
    }
    if let (Some(limit), Some(gw)) = (find("http-limit", 64), find("gateway", 64)) {
        let ratio = gw.requests_per_second / limit.requests_per_second;
        md += &format!(
            "\nTarget: gateway >= 50 % of the HTTP limit at 64 connections: {:.0} % ({}).\n",
            ratio * 100.0,
            if ratio >= 0.5 { "met" } else { "not met" }
        );
        for scenario in ["canary", "validated"] {
            if let Some(s) = find(scenario, 64) {
                let cost = 1.0 - s.requests_per_second / gw.requests_per_second;
                md += &format!(
                    "Target: {scenario} costs <= 5 % of the gateway's throughput at 64 connections: {:.1} % ({}).\n",
                    cost * 100.0,
                    if cost <= 0.05 { "met" } else { "not met" }
                );
            }
        }
        if let Some(s) = find("shadow", 64) {
            let kept = s.requests_per_second / gw.requests_per_second;
            md += &format!(
                "Target: with CPU saturated, a 100 % shadow keeps the champion within 10 % of the gateway's throughput: {:.0} % ({}).\n",
                kept * 100.0,
                if kept >= 0.9 { "met" } else { "not met" }
            );
        }
    }
    md
}
