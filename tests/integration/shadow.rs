//! Champion/challenger shadowing: answers are unchanged, a slow challenger
//! does not slow the champion, saturation sheds shadow calls, and the
//! comparison counters match challengers known to agree and to disagree.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Metrics, TestGateway, fp32_request};

/// v1 says `within_hour` for this row, v2 says `within_day`.
fn request() -> Value {
    fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0])
}

fn policy(model: &str, shadow: &str) -> String {
    format!(
        "model = \"{model}\"\nchampion = \"v1\"\n\
         [versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.same]\nplugin = \"ttm-rules-v1\"\n\
         [versions.contrary]\nplugin = \"ttm-rules-v2\"\n\
         [versions.slow]\nplugin = \"slow-ttm\"\nlimits = {{ timeout_ms = 5000 }}\n\
         {shadow}"
    )
}

fn shadows(m: &Metrics, model: &str, version: &str, result: &str) -> f64 {
    m.value(
        "gateway_shadow_comparisons_total",
        &[("model", model), ("version", version), ("result", result)],
    )
}

/// Polls `/metrics` until `done` holds (shadow calls finish after the
/// response), failing after 20 s.
async fn wait_for(gw: &TestGateway, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = gw.metrics().await;
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "shadow calls did not finish in time: {:?}",
            m.samples_of("gateway_shadow_comparisons_total")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparisons_count_agreeing_and_disagreeing_challengers() {
    let gw = TestGateway::start(&[(
        "cmp.toml",
        &policy(
            "cmp",
            "[shadow]\nversions = [\"same\", \"contrary\"]\nsample_percent = 100\n",
        ),
    )])
    .await;
    let mut client = gw.client().await;
    // One request's copies at a time: shadows run at the lowest priority
    // and are shed when their slots are busy, and other tests load the
    // same cores; this test is about what a finished copy counts.
    for i in 1..=20 {
        let reply = client.post("/v2/models/cmp/infer", &request(), &[]).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["outputs"][0]["data"][0], "within_hour");
        let done = 2.0 * f64::from(i);
        wait_for(&gw, |m| {
            shadows(m, "cmp", "same", "agree") + shadows(m, "cmp", "contrary", "disagree") >= done
        })
        .await;
    }
    let m = wait_for(&gw, |m| {
        shadows(m, "cmp", "same", "agree") + shadows(m, "cmp", "contrary", "disagree") >= 40.0
    })
    .await;
    assert_eq!(shadows(&m, "cmp", "same", "agree"), 20.0);
    assert_eq!(shadows(&m, "cmp", "contrary", "disagree"), 20.0);
    for (version, result) in [
        ("same", "disagree"),
        ("contrary", "agree"),
        ("same", "error"),
        ("contrary", "dropped"),
    ] {
        assert_eq!(
            shadows(&m, "cmp", version, result),
            0.0,
            "{version} {result}"
        );
    }
    // Each shadow call is a request on the `shadow` route, with its latency.
    let shadow_route = [
        ("model", "cmp"),
        ("version", "contrary"),
        ("route", "shadow"),
    ];
    assert_eq!(
        m.value(
            "gateway_requests_total",
            &[
                shadow_route[0],
                shadow_route[1],
                shadow_route[2],
                ("status", "200")
            ]
        ),
        20.0
    );
    assert_eq!(
        m.value("gateway_request_duration_seconds_count", &shadow_route),
        20.0
    );
    assert_eq!(
        m.value(
            "gateway_predictions_total",
            &[
                ("model", "cmp"),
                ("version", "contrary"),
                ("label", "within_day")
            ]
        ),
        20.0
    );
    gw.shutdown().await;
}

/// The same request gets the same bytes back with and without a shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowing_leaves_responses_byte_identical() {
    let gw = TestGateway::start(&[("ident.toml", &policy("ident", ""))]).await;
    let mut client = gw.client().await;
    let mut body = request();
    body["id"] = "same-id".into();
    let plain = client.post("/v2/models/ident/infer", &body, &[]).await;
    gw.write_policy(
        "ident.toml",
        &policy("ident", "[shadow]\nversions = [\"contrary\", \"same\"]\n"),
    );
    assert_eq!(gw.reload().await.status, 200);
    for i in 1..=10 {
        let shadowed = client.post("/v2/models/ident/infer", &body, &[]).await;
        // One request's copies at a time (see above).
        let done = f64::from(i);
        wait_for(&gw, |m| shadows(m, "ident", "contrary", "disagree") >= done).await;
        assert_eq!(shadowed.status, plain.status);
        assert_eq!(shadowed.body, plain.body);
        assert_eq!(
            shadowed.header("x-model-version"),
            plain.header("x-model-version")
        );
        assert_eq!(
            shadowed.header("content-length"),
            plain.header("content-length")
        );
    }
    wait_for(&gw, |m| shadows(m, "ident", "contrary", "disagree") >= 10.0).await;
    gw.shutdown().await;
}

/// A challenger that spins for 100+ ms per call does not slow the champion's
/// answers, and with one shadow slot most copies are dropped and counted:
/// every sampled copy ends as a comparison, an error or a drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_challenger_neither_slows_the_champion_nor_queues() {
    let gw = TestGateway::start(&[(
        "slow.toml",
        &policy(
            "slowcmp",
            "[shadow]\nversions = [\"slow\"]\nmax_concurrency = 1\n",
        ),
    )])
    .await;
    let mut client = gw.client().await;
    let mut latencies = Vec::new();
    for _ in 0..30 {
        let reply = client
            .post("/v2/models/slowcmp/infer", &request(), &[])
            .await;
        assert_eq!(reply.status, 200);
        latencies.push(reply.elapsed);
    }
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "champion median {median:?} with a slow shadow"
    );
    let m = wait_for(&gw, |m| {
        ["agree", "disagree", "error", "dropped"]
            .iter()
            .map(|r| shadows(m, "slowcmp", "slow", r))
            .sum::<f64>()
            >= 30.0
    })
    .await;
    let dropped = shadows(&m, "slowcmp", "slow", "dropped");
    let disagreed = shadows(&m, "slowcmp", "slow", "disagree");
    assert!(
        dropped >= 15.0,
        "only {dropped} of 30 shadow copies dropped with one slot"
    );
    assert!(disagreed >= 1.0, "the slow challenger never finished");
    assert_eq!(
        dropped + disagreed + shadows(&m, "slowcmp", "slow", "error"),
        30.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_copies_only_a_share() {
    let gw = TestGateway::start(&[(
        "sample.toml",
        &policy(
            "sampled",
            "[shadow]\nversions = [\"same\"]\nsample_percent = 0\n",
        ),
    )])
    .await;
    let mut client = gw.client().await;
    for _ in 0..50 {
        assert_eq!(
            client
                .post("/v2/models/sampled/infer", &request(), &[])
                .await
                .status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.sum("gateway_shadow_comparisons_total", &[("model", "sampled")]),
        0.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_requests_are_not_shadowed() {
    let gw = TestGateway::start(&[(
        "pin.toml",
        &policy("pinshadow", "[shadow]\nversions = [\"same\"]\n"),
    )])
    .await;
    let mut client = gw.client().await;
    for _ in 0..10 {
        assert_eq!(
            client
                .post("/v2/models/pinshadow/versions/v1/infer", &request(), &[])
                .await
                .status,
            200
        );
    }
    assert_eq!(
        client
            .post("/v2/models/pinshadow/infer", &request(), &[])
            .await
            .status,
        200
    );
    let m = wait_for(&gw, |m| shadows(m, "pinshadow", "same", "agree") >= 1.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        shadows(&gw.metrics().await, "pinshadow", "same", "agree"),
        1.0
    );
    drop(m);
    gw.shutdown().await;
}

/// While the served requests occupy every core, shadow copies are shed
/// (counted as dropped) instead of competing with them for CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_are_shed_while_requests_occupy_every_core() {
    let gw = TestGateway::start(&[(
        "busy.toml",
        "model = \"busy\"\nchampion = \"slow\"\n\
         [versions.slow]\nplugin = \"slow-ttm\"\nlimits = { timeout_ms = 30000 }\n\
         [versions.same]\nplugin = \"ttm-rules-v1\"\n\
         [shadow]\nversions = [\"same\"]\nsample_percent = 100\n",
    )])
    .await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Each call spins for 100+ ms: these overlap, more than one per core.
    let n = 2 * cores + 2;
    let replies: Vec<_> = (0..n).map(|_| gw.spawn_infer("busy", &request())).collect();
    for reply in replies {
        assert_eq!(reply.await.unwrap().status, 200);
    }
    let m = wait_for(&gw, |m| {
        ["agree", "disagree", "error", "dropped"]
            .iter()
            .map(|r| shadows(m, "busy", "same", r))
            .sum::<f64>()
            >= n as f64
    })
    .await;
    assert!(shadows(&m, "busy", "same", "dropped") >= 1.0, "none shed");
    gw.shutdown().await;
}

/// A challenger that runs a trained model (the ONNX classifier through
/// its wasi:nn plugin) shadows like any other: batches large enough for
/// the compute threads are compared, or dropped when over the shadow CPU
/// budget, never counted as errors, and the champion answers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trained_challenger_shadows_on_the_compute_threads() {
    let text = "model = \"trained\"\nchampion = \"v1\"\n\
         [versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v2]\nplugin = \"ttm-onnx\"\nmodels = { classifier = \"models/ttm-v2.onnx\" }\n\
         [shadow]\nversions = [\"v2\"]\nsample_percent = 100\n";
    let gw = TestGateway::start(&[("trained.toml", text)]).await;
    // 400 rows: 2,400 elements, past what runs inline.
    let rows = 400usize;
    let data: Vec<f32> = (0..rows * 6).map(|i| (i % 17) as f32).collect();
    let body = crate::support::fp32_request("pr_features", &[rows as i64, 6], &data);
    let n = 12;
    for _ in 0..n {
        let reply = gw.infer("trained", &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.header("x-model-version"), Some("v1"));
    }
    let m = wait_for(&gw, |m| {
        ["agree", "disagree", "dropped", "error"]
            .iter()
            .map(|r| shadows(m, "trained", "v2", r))
            .sum::<f64>()
            >= n as f64
    })
    .await;
    let compared = shadows(&m, "trained", "v2", "agree") + shadows(&m, "trained", "v2", "disagree");
    assert!(
        compared >= 1.0,
        "no trained shadow call was compared: {:?}",
        m.samples_of("gateway_shadow_comparisons_total")
    );
    assert_eq!(shadows(&m, "trained", "v2", "error"), 0.0);
    gw.shutdown().await;
}
