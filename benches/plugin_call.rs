//! What one request costs inside the gateway, step by step: decoding the V2
//! JSON body, one sandboxed plugin call (fresh `Store`, instantiation from
//! the pre-instantiated component, `infer`), and encoding the response.
//!
//! `info_fresh_sandbox` (fresh sandbox, trivial call) is the baseline the
//! `infer_*` figures are read against, since absolute times vary with the
//! machine. Run: `cargo bench --bench plugin_call`.

use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::protocol::{DecodeLimits, InferResponse, decode_infer_request};
use gateway::runtime::{CallLimits, Runtime, RuntimeConfig};

fn body(rows: usize) -> String {
    let row = "[3, 40, 12, 2, 4, 1]";
    let data = vec![row; rows].join(",");
    format!(
        r#"{{"id":"b","inputs":[{{"name":"pr_features","shape":[{rows},6],"datatype":"FP32","data":[{data}]}}]}}"#
    )
}

fn limits() -> CallLimits {
    CallLimits::starting_now(Duration::from_secs(10), 64 << 20)
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let path = Path::new(gateway::artifacts::BUILT_PLUGIN_DIR).join("ttm-rules-v1.wasm");
    let plugin = rt
        .block_on(runtime.load_plugin(&path))
        .expect("load ttm-rules-v1");

    let mut sandbox = c.benchmark_group("sandbox");
    sandbox.bench_function("info_fresh_sandbox", |b| {
        b.to_async(&rt)
            .iter(|| async { plugin.call_info(limits()).await.expect("info") })
    });
    for rows in [1usize, 256] {
        let request =
            decode_infer_request(body(rows).as_bytes(), DecodeLimits::default()).expect("decode");
        sandbox.throughput(Throughput::Elements(rows as u64));
        sandbox.bench_with_input(
            BenchmarkId::new("infer_fresh_sandbox", format!("{rows}x6")),
            &request,
            |b, r| {
                b.to_async(&rt)
                    .iter(|| async { plugin.infer(&r.inputs, limits()).await.expect("infer") })
            },
        );
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
                    decode_infer_request(t.as_bytes(), DecodeLimits::default()).expect("decode")
                })
            },
        );
        let request =
            decode_infer_request(text.as_bytes(), DecodeLimits::default()).expect("decode");
        let outputs = rt
            .block_on(plugin.infer(&request.inputs, limits()))
            .expect("infer");
        let refs: Vec<_> = outputs.iter().collect();
        codec.bench_with_input(
            BenchmarkId::new("encode_json", format!("{rows}x6")),
            &refs,
            |b, o| {
                b.iter(|| {
                    serde_json::to_vec(&InferResponse {
                        model_name: "m",
                        model_version: "v1",
                        id: Some("b"),
                        outputs: o,
                    })
                    .expect("encode")
                })
            },
        );
    }
    codec.finish();
}

criterion_group! {
    name = plugin_call;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(plugin_call);
