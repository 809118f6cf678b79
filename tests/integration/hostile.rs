//! Plugins that loop, hog memory, panic, overflow their stack, return broken
//! tensors or reach for capabilities they are not granted. Each failure stays
//! inside its request: the same plugin serves its next call, and every other
//! model keeps serving.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestGateway, fp32_request, single_version_policy};

fn x(value: f32) -> serde_json::Value {
    fp32_request("x", &[1], &[value])
}

fn mode(value: i32) -> serde_json::Value {
    json!({"inputs": [{"name": "mode", "shape": [1], "datatype": "INT32", "data": [value]}]})
}

async fn gateway_with(model: &str, plugin: &str, limits: &str) -> TestGateway {
    TestGateway::start(&[
        (
            "hostile.toml",
            &single_version_policy(model, plugin, limits),
        ),
        (
            "healthy.toml",
            &single_version_policy("healthy", "ttm-rules-v1", ""),
        ),
    ])
    .await
}

async fn assert_healthy_model_serves(gw: &TestGateway) {
    let reply = gw
        .infer(
            "healthy",
            &fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_at_its_deadline() {
    let gw = gateway_with("spin", "spin-loop", "timeout_ms = 200").await;
    let reply = gw.infer("spin", &x(-1.0)).await;
    reply.assert_error(
        504,
        &["model `spin` version `v1`: plugin `spin-loop` (spin-loop 0.1.0) in `infer` did not finish within its deadline of 200 ms"],
    );
    assert!(
        reply.elapsed < Duration::from_millis(400),
        "stopped after {:?}, over twice the deadline",
        reply.elapsed
    );
    assert!(
        reply.elapsed >= Duration::from_millis(190),
        "stopped early, after {:?}",
        reply.elapsed
    );
    assert_healthy_model_serves(&gw).await;
    let finite = gw.infer("spin", &x(1.0)).await;
    assert_eq!(finite.status, 200, "{}", finite.text());
    assert_eq!(finite.json()["outputs"][0]["data"], json!([1e6]));
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_plugin_errors_total",
            &[("model", "spin"), ("kind", "deadline")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "gateway_requests_total",
            &[("model", "spin"), ("status", "504")]
        ),
        1.0
    );
    gw.shutdown().await;
}

/// Two endless loops on a two-worker runtime do not starve other requests:
/// a running plugin yields to the executor at every epoch tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loops_do_not_stall_other_models() {
    // Both loops run at once (each on a core, yielding at every epoch
    // tick), so each runs its whole deadline: 504, the plugin's failure.
    let gw = gateway_with("spin", "spin-loop", "timeout_ms = 1500\nmax_parallel = 2").await;
    let loops: Vec<_> = (0..2).map(|_| gw.spawn_infer("spin", &x(-1.0))).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let healthy = gw
        .infer(
            "healthy",
            &fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0]),
        )
        .await;
    assert_eq!(healthy.status, 200);
    assert!(
        healthy.elapsed < Duration::from_millis(700),
        "a healthy request waited {:?} behind two loops",
        healthy.elapsed
    );
    for l in loops {
        assert_eq!(l.await.unwrap().status, 504);
    }
    gw.shutdown().await;
}

/// A call whose deadline passes while it waits for its turn on the
/// version's share of the cores is the load's doing, not the plugin's: a
/// 503 with `Retry-After`, counted as `starved`, and the circuit breaker
/// does not count it. The same loop alone runs its whole deadline: 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_spent_waiting_for_the_cores_is_a_503() {
    let gw = gateway_with(
        "spin",
        "spin-loop",
        "timeout_ms = 400\nmax_parallel = 1\nbreaker_failures = 2",
    )
    .await;
    gw.infer("spin", &x(-1.0))
        .await
        .assert_error(504, &["did not finish within its deadline of 400 ms"]);
    // Eight loops on one slot: each runs about an eighth of its deadline.
    let calls: Vec<_> = (0..8).map(|_| gw.spawn_infer("spin", &x(-1.0))).collect();
    for call in calls {
        let reply = call.await.unwrap();
        reply.assert_error(
            503,
            &[
                "model `spin` version `v1`: plugin `spin-loop` (spin-loop 0.1.0) in `infer` did not get the CPU time it needed within its deadline of 400 ms",
                "waited for its share of the cores",
            ],
        );
        assert_eq!(reply.header("retry-after"), Some("1"));
    }
    // Two plugin failures would open the breaker; one 504 and eight 503s
    // do not.
    let finite = gw.infer("spin", &x(1.0)).await;
    assert_eq!(finite.status, 200, "{}", finite.text());
    let m = gw.metrics().await;
    let errors = |kind| {
        m.value(
            "gateway_plugin_errors_total",
            &[("model", "spin"), ("kind", kind)],
        )
    };
    assert_eq!((errors("deadline"), errors("starved")), (1.0, 8.0));
    assert_eq!(
        m.value(
            "gateway_circuit_open",
            &[("model", "spin"), ("version", "v1")]
        ),
        0.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_hits_the_memory_cap() {
    let gw = gateway_with("hog", "memory-hog", "memory_mebibytes = 16").await;
    gw.infer("hog", &x(-1.0)).await.assert_error(
        500,
        &["model `hog` version `v1`: plugin `memory-hog` (memory-hog 0.1.0) in `infer` exceeded its memory limit of 16.0 MiB"],
    );
    assert_healthy_model_serves(&gw).await;
    let small = gw.infer("hog", &x(4.0)).await;
    assert_eq!(small.status, 200, "{}", small.text());
    assert_eq!(small.json()["outputs"][0]["data"], json!([4.0]));
    // Just over the cap is refused, whatever the allocator does with it.
    gw.infer("hog", &x(16.0))
        .await
        .assert_error(500, &["exceeded its memory limit"]);
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_plugin_errors_total",
            &[("model", "hog"), ("kind", "memory")]
        ),
        2.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_a_500_naming_the_plugin_and_the_message() {
    let gw = gateway_with("panics", "panic", "").await;
    gw.infer("panics", &x(-2.0)).await.assert_error(
        500,
        &[
            "model `panics` version `v1`: plugin `panic` (panic 0.1.0) in `infer` panicked: panicked at",
            "deliberate panic on x[0] = -2",
        ],
    );
    assert_healthy_model_serves(&gw).await;
    let next = gw.infer("panics", &x(2.0)).await;
    assert_eq!(next.status, 200, "{}", next.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_overflow_is_a_500() {
    let gw = gateway_with("deep", "stack-overflow", "").await;
    gw.infer("deep", &x(-1.0)).await.assert_error(
        500,
        &["plugin `stack-overflow` (stack-overflow 0.1.0) in `infer` overflowed its stack"],
    );
    assert_healthy_model_serves(&gw).await;
    // Rust keeps address-taken locals on a stack in linear memory; running
    // off its end is an out-of-bounds access, caught the same way.
    gw.infer("deep", &x(-2.0)).await.assert_error(
        500,
        &["plugin `stack-overflow` (stack-overflow 0.1.0) in `infer` trapped: wasm trap: out of bounds memory access"],
    );
    let shallow = gw.infer("deep", &x(100.0)).await;
    assert_eq!(shallow.status, 200, "{}", shallow.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_outputs_are_a_500_naming_the_defect() {
    let gw = gateway_with("broken", "malformed-output", "").await;
    let cases = [
        (
            0,
            "output `y`: shape [1, 5] of FP32 needs 20 bytes of data, got 12",
        ),
        (1, "output `y`: shape [-1, 5] has a negative dimension"),
        (
            2,
            "output `y`: BYTES element 0: length prefix runs past the end of the data",
        ),
        (3, "output `y` appears twice"),
        (4, "output `y` has shape [1, 5], declared [-1]"),
        (
            5,
            "output `y` element 1 is NaN (allow it with `allow_nan_outputs` in [validation])",
        ),
        (6, "declared output `y` is missing"),
    ];
    for (m, message) in cases {
        gw.infer("broken", &mode(m)).await.assert_error(
            500,
            &["model `broken` version `v1`: plugin `malformed-output` (malformed-output 0.1.0) in `infer` returned a malformed output: ", message],
        );
    }
    assert_healthy_model_serves(&gw).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_at_its_concurrency_limit_answers_503() {
    let gw = gateway_with(
        "busy",
        "spin-loop",
        "timeout_ms = 1000\nmax_concurrency = 1\nmax_queue = 0",
    )
    .await;
    let running = gw.spawn_infer("busy", &x(-1.0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = gw.infer("busy", &x(0.0)).await;
    refused.assert_error(
        503,
        &["model `busy` version `v1` is at its concurrency limit (1 running, 0 queued)"],
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(running.await.unwrap().status, 504);
    assert_eq!(gw.infer("busy", &x(0.0)).await.status, 200);
    gw.shutdown().await;
}
