//! What one request costs inside the gateway, step by step, and what the
//! traffic policy adds to the whole path.
//!
//! - `sandbox`: one plugin call in a fresh sandbox (new `Store`,
//!   instantiation from the pre-instantiated component, the call), and in
//!   a kept instance (`calls_per_instance`). `info_fresh_sandbox` (a
//!   trivial call) is the baseline for `infer_*`.
//! - `codec`: decoding a V2 request, JSON and with the binary tensor
//!   extension (1 and 256 rows of 6 FP32), encoding a response.
//! - `routing`: the routing decision alone (champion, sticky canary,
//!   random canary), to be read against `http/plain`.
//! - `http`: the full path over a keep-alive loopback connection to an
//!   in-process gateway: `plain` (champion only) is the baseline for
//!   `validated` (the example policy's input rules and data monitoring),
//!   `canary` (50 % split) and `shadow` (every request copied to a
//!   challenger, whose work competes for the same two cores).
//!
//! Absolute times vary with the machine: read each figure as a ratio to its
//! baseline from the same run. Run: `cargo bench --bench request_path`.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::contract::CallLimits;
use gateway::policy::LoadOptions;
use gateway::protocol::{DecodeLimits, InferResponse, decode_infer_request};
use gateway::router;
use gateway::runtime::{Runtime, RuntimeConfig};
use gateway::server;
use http::{HeaderMap, HeaderValue};

mod common;
use common::Connection;

fn body(rows: usize) -> String {
    let row = "[3, 40, 12, 2, 4, 1]";
    let data = vec![row; rows].join(",");
    format!(
        r#"{{"id":"b","inputs":[{{"name":"pr_features","shape":[{rows},6],"datatype":"FP32","data":[{data}]}}]}}"#
    )
}

/// The same request with the binary tensor extension: a JSON header, then
/// the raw little-endian FP32 values; and the length of the JSON part.
fn binary_body(rows: usize) -> (Vec<u8>, usize) {
    let json = format!(
        r#"{{"id":"b","inputs":[{{"name":"pr_features","shape":[{rows},6],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}]}}"#,
        rows * 24
    );
    let mut body = json.clone().into_bytes();
    for _ in 0..rows {
        for v in [3f32, 40.0, 12.0, 2.0, 4.0, 1.0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    (body, json.len())
}

fn limits() -> CallLimits {
    CallLimits::starting_now(Duration::from_secs(10), 64 << 20)
}

const POLICIES: [(&str, &str); 4] = [
    (
        "plain.toml",
        "model = \"plain\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n",
    ),
    (
        "canary.toml",
        "model = \"canary\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v2]\nplugin = \"ttm-rules-v2\"\n[canary]\nversion = \"v2\"\npercent = 50\n",
    ),
    (
        "validated.toml",
        // Filled in from the example policy: its input rules and monitoring.
        "",
    ),
    (
        "shadow.toml",
        "model = \"shadow\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v3]\nplugin = \"ttm-rules-v3\"\n[shadow]\nversions = [\"v3\"]\nsample_percent = 100\n",
    ),
];

fn policy_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    // The example policy (behind `validated`) names its trained model.
    std::fs::create_dir_all(dir.path().join("models")).expect("models/");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../policies/models/ttm-v2.onnx"
        ),
        dir.path().join("models/ttm-v2.onnx"),
    )
    .expect("copy the example's model");
    for (name, text) in POLICIES {
        let text = if text.is_empty() {
            validated_policy()
        } else {
            text.to_string()
        };
        std::fs::write(dir.path().join(name), text).expect("write policy");
    }
    dir
}

/// The example time-to-merge policy (input rules, references, monitoring)
/// as model `validated`, serving v1 only.
fn validated_policy() -> String {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/time-to-merge.toml"
    ))
    .expect("example policy");
    example.replace("model = \"time-to-merge\"", "model = \"validated\"")
}

fn sandbox_and_codec(c: &mut Criterion) {
    gateway::process::tune_allocator();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let path = Path::new(gateway::artifacts::BUILT_PLUGIN_DIR).join("ttm-rules-v1.wasm");
    let plugin = rt
        .block_on(runtime.load_plugin(&path))
        .expect("load ttm-rules-v1");
    let no_models = std::sync::Arc::new(gateway::onnx::ModelSet::default());
    let fresh = gateway::runtime::InstancePool::fresh();
    let kept = runtime.instance_pool(1_000_000);

    let mut sandbox = c.benchmark_group("sandbox");
    sandbox.bench_function("info_fresh_sandbox", |b| {
        b.to_async(&rt)
            .iter(|| async { plugin.call_info(limits()).await.expect("info") })
    });
    for rows in [1usize, 256] {
        let request = decode_infer_request(body(rows).as_bytes(), None, DecodeLimits::default())
            .expect("decode");
        sandbox.throughput(Throughput::Elements(rows as u64));
        for (name, pool) in [
            ("infer_fresh_sandbox", &fresh),
            ("infer_kept_instance", &kept),
        ] {
            sandbox.bench_with_input(
                BenchmarkId::new(name, format!("{rows}x6")),
                &request,
                |b, r| {
                    b.to_async(&rt).iter(|| async {
                        plugin
                            .infer(&r.inputs, limits(), &no_models, pool)
                            .await
                            .expect("infer")
                    })
                },
            );
        }
    }
    sandbox.finish();

    let mut codec = c.benchmark_group("codec");
    for rows in [1usize, 256] {
        let text = body(rows);
        codec.throughput(Throughput::Bytes(text.len() as u64));
        codec.bench_with_input(
            BenchmarkId::new("decode_json", format!("{rows}x6")),
            &text,
            |b, t| {
                b.iter(|| {
                    decode_infer_request(t.as_bytes(), None, DecodeLimits::default())
                        .expect("decode")
                })
            },
        );
        let (binary, json_length) = binary_body(rows);
        codec.throughput(Throughput::Bytes(binary.len() as u64));
        codec.bench_with_input(
            BenchmarkId::new("decode_binary", format!("{rows}x6")),
            &binary,
            |b, t| {
                b.iter(|| {
                    decode_infer_request(t, Some(json_length), DecodeLimits::default())
                        .expect("decode")
                })
            },
        );
        let request =
            decode_infer_request(text.as_bytes(), None, DecodeLimits::default()).expect("decode");
        let from_binary = decode_infer_request(&binary, Some(json_length), DecodeLimits::default())
            .expect("decode");
        assert!(
            request.inputs.len() == 1
                && from_binary.inputs.len() == 1
                && request.inputs[0].data == from_binary.inputs[0].data
                && request.inputs[0].shape == from_binary.inputs[0].shape,
            "JSON and binary decode to the same tensor"
        );
        let outputs = rt
            .block_on(plugin.infer(&request.inputs, limits(), &no_models, &fresh))
            .expect("infer");
        let refs: Vec<_> = outputs.iter().map(|t| (t, false)).collect();
        codec.bench_with_input(
            BenchmarkId::new("encode_json", format!("{rows}x6")),
            &refs,
            |b, o| {
                b.iter(|| {
                    InferResponse {
                        model_name: "m",
                        model_version: "v1",
                        id: Some("b"),
                        outputs: o,
                    }
                    .encode()
                    .expect("encode")
                })
            },
        );
    }
    codec.finish();
}

fn routing(c: &mut Criterion) {
    gateway::process::tune_allocator();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let dir = policy_dir();
    let options = LoadOptions {
        plugin_dirs: vec![gateway::artifacts::BUILT_PLUGIN_DIR.into()],
        max_memory_bytes: 1 << 30,
        overlay: None,
    };
    let (snapshot, _) = rt
        .block_on(router::load(dir.path(), &options, &runtime, None))
        .expect("policies");
    let mut keyed = HeaderMap::new();
    keyed.insert("x-routing-key", HeaderValue::from_static("user-4711"));
    let unkeyed = HeaderMap::new();

    let mut group = c.benchmark_group("routing");
    group.bench_function("champion", |b| {
        b.iter(|| {
            snapshot
                .route("plain", None, &unkeyed)
                .expect("route")
                .route
        })
    });
    group.bench_function("canary_sticky_key", |b| {
        b.iter(|| snapshot.route("canary", None, &keyed).expect("route").route)
    });
    let model = snapshot.model("validated").expect("validated model");
    let schema = model.schema.as_ref().expect("schema");
    let monitor = model.monitors.get("v1").expect("monitor");
    let request =
        decode_infer_request(body(1).as_bytes(), None, DecodeLimits::default()).expect("decode");
    group.bench_function("validate_and_monitor_1x6", |b| {
        b.iter(|| {
            let violations = gateway::validate::schema_violations(schema, &request.inputs);
            monitor.observe(&request.inputs);
            violations
        })
    });
    group.bench_function("canary_random", |b| {
        b.iter(|| {
            snapshot
                .route("canary", None, &unkeyed)
                .expect("route")
                .route
        })
    });
    group.finish();
}

fn http(c: &mut Criterion) {
    let rt = common::served_runtime(2);
    let dir = policy_dir();
    let server = rt
        .block_on(server::start(common::gateway_options(dir.path())))
        .expect("gateway");
    let addr = server.local_addr();
    let body = Bytes::from(body(1));

    let mut group = c.benchmark_group("http");
    for model in ["plain", "validated", "canary", "shadow"] {
        group.bench_function(model, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut connection = Connection::open(addr).await;
                    let start = Instant::now();
                    let path = format!("/v2/models/{model}/infer");
                    for _ in 0..iters {
                        connection.send(&path, &body).await.expect("200");
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    rt.block_on(server.shutdown());
}

criterion_group! {
    name = request_path;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = sandbox_and_codec, routing, http
}
criterion_main!(request_path);
