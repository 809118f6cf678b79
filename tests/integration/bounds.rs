//! What a client or a plugin sends costs no more than its share: bounded
//! validation, refusals before the body is read, budgets for bytes and
//! sandbox memory, capped outputs and error texts, the circuit breaker,
//! the deadline starting when the inputs are ready, and the requests the
//! protocol defines answered as the reference servers do.

use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    TestGateway, echo_inputs, fp32_request, latencies, quantile, repo_root, send,
    single_version_policy,
};

fn pr_features(rows: usize) -> serde_json::Value {
    let row = [3.0, 40.0, 12.0, 4.0, 1.0, 2.0];
    let data: Vec<f32> = row.iter().copied().cycle().take(rows * 6).collect();
    fp32_request("pr_features", &[rows as i64, 6], &data)
}

/// The example policy (input rules, monitoring), for a model named `model`.
fn example_policy_as(model: &str) -> String {
    std::fs::read_to_string(repo_root().join("policies/time-to-merge.toml"))
        .unwrap()
        .replace("model = \"time-to-merge\"", &format!("model = \"{model}\""))
}

/// A request of `rows` rows whose every value breaks the example's `min = 0`.
fn rule_breaking_rows(rows: usize) -> String {
    let mut body = format!(
        r#"{{"inputs":[{{"name":"pr_features","shape":[{rows},6],"datatype":"FP32","data":[-1"#
    );
    body.push_str(&",-1".repeat(rows * 6 - 1));
    body.push_str("]}]}");
    body
}

/// Sends raw bytes on a new connection and reads what comes back within
/// `wait` (until the server closes, or the time is up).
async fn raw(gw: &TestGateway, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut response = vec![0; 65536];
    let n = tokio::time::timeout(wait, stream.read(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    String::from_utf8_lossy(&response[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_a_million_bad_values_is_refused_with_bounded_work() {
    let policy = example_policy_as("amplified");
    let gw = TestGateway::start_configured(&[("amplified.toml", &policy)], |o| {
        o.server.max_body_bytes = 16 << 20;
    })
    .await;
    // 340,000 rows of six values that all break `min = 0` (the issue's
    // 6 MB attack): 2,040,000 violations.
    let rows = 340_000;
    let body = rule_breaking_rows(rows);
    let reply = gw.post("/v2/models/amplified/infer", body).await;
    reply.assert_error(
        400,
        &[
            "invalid inputs: 2040000 violations: `pr_features`[row 0] feature `files_changed` = -1 is below the minimum 0",
            "; and 2039900 more",
        ],
    );
    assert!(
        reply.error().len() < 16 << 10,
        "{} bytes",
        reply.error().len()
    );
    let m = gw.metrics().await;
    let labels = [("model", "amplified"), ("rule", "min")];
    assert_eq!(
        m.sum("gateway_validation_failures_total", &labels),
        2_040_000.0
    );
    assert_eq!(
        m.value(
            "gateway_validation_failures_total",
            &[
                ("model", "amplified"),
                ("rule", "min"),
                ("feature", "comments")
            ]
        ),
        340_000.0
    );
    gw.shutdown().await;
}

/// The breaker's probe goes to a call that is ready to run: a client
/// still uploading its body when the cooldown ends does not hold it, so a
/// good request meanwhile probes and closes the breaker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_hold_the_breakers_probe() {
    let gw = TestGateway::start(&[(
        "broken.toml",
        &single_version_policy(
            "broken",
            "panic",
            "breaker_failures = 2\nbreaker_cooldown_ms = 200",
        ),
    )])
    .await;
    let bad = fp32_request("x", &[1], &[-1.0]);
    for _ in 0..2 {
        gw.infer("broken", &bad)
            .await
            .assert_error(500, &["panicked"]);
    }
    gw.infer("broken", &bad)
        .await
        .assert_error(503, &["circuit breaker open"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Headers and half a body, then nothing (for less than the body time).
    let body = fp32_request("x", &[1], &[1.0]).to_string();
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v2/models/broken/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = gw.infer("broken", &fp32_request("x", &[1], &[1.0])).await;
    assert_eq!(probe.status, 200, "{}", probe.text());
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_circuit_open",
            &[("model", "broken"), ("version", "v1")]
        ),
        0.0
    );
    // The slow upload, finished, is served too.
    slow.write_all(&body.as_bytes()[body.len() / 2..])
        .await
        .unwrap();
    let mut response = vec![0u8; 1024];
    let n = slow.read(&mut response).await.unwrap();
    assert!(
        response[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&response[..n])
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_takes_a_failing_version_out_and_probes_it() {
    let gw = TestGateway::start(&[
        (
            "broken.toml",
            &single_version_policy(
                "broken",
                "panic",
                "breaker_failures = 3\nbreaker_cooldown_ms = 300",
            ),
        ),
        (
            "healthy.toml",
            &single_version_policy("healthy", "ttm-rules-v1", ""),
        ),
    ])
    .await;
    let bad = fp32_request("x", &[1], &[-1.0]);
    for _ in 0..3 {
        gw.infer("broken", &bad)
            .await
            .assert_error(500, &["panicked"]);
    }
    let refused = gw.infer("broken", &bad).await;
    refused.assert_error(
        503,
        &["model `broken` version `v1` is taken out of service after 3 failures in a row (circuit breaker open)"],
    );
    assert_eq!(refused.header("retry-after"), Some("1"));
    // A good request is refused too while the breaker is open: the
    // version, not the request, is out of service.
    gw.infer("broken", &fp32_request("x", &[1], &[1.0]))
        .await
        .assert_error(503, &["circuit breaker open"]);
    assert_eq!(gw.infer("healthy", &pr_features(1)).await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_circuit_open",
            &[("model", "broken"), ("version", "v1")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "gateway_refused_total",
            &[("model", "broken"), ("reason", "circuit_open")]
        ),
        2.0
    );
    // After the cooldown one probe goes through; it succeeds and closes
    // the breaker.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let probe = gw.infer("broken", &fp32_request("x", &[1], &[1.0])).await;
    assert_eq!(probe.status, 200, "{}", probe.text());
    assert_eq!(
        gw.infer("broken", &fp32_request("x", &[1], &[2.0]))
            .await
            .status,
        200
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_circuit_open",
            &[("model", "broken"), ("version", "v1")]
        ),
        0.0
    );
    assert_eq!(
        m.value(
            "gateway_circuit_transitions_total",
            &[("model", "broken"), ("state", "closed")]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_over_the_cap_are_refused_naming_the_size() {
    let gw = TestGateway::start_configured(
        &[(
            "echo.toml",
            &single_version_policy("big-echo", "echo", "max_output_mebibytes = 1"),
        )],
        |o| o.server.max_body_bytes = 4 << 20,
    )
    .await;
    let small = echo_inputs(
        json!({"name": "uint8", "shape": [300_000], "datatype": "UINT8", "data": vec![1; 300_000]}),
    );
    assert_eq!(gw.infer("big-echo", &small).await.status, 200);
    let big = echo_inputs(
        json!({"name": "uint8", "shape": [1_200_000], "datatype": "UINT8", "data": vec![1; 1_200_000]}),
    );
    gw.infer("big-echo", &big).await.assert_error(
        500,
        &["model `big-echo` version `v1`: plugin `echo` (echo 0.1.0) in `infer` returned 1.1 MiB of outputs, over the version's limit of 1.0 MiB (limits.max_output_mebibytes)"],
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_plugin_errors_total",
            &[("model", "big-echo"), ("kind", "output_too_large")]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_huge_error_text_is_cut_and_escaped() {
    let gw = TestGateway::start(&[(
        "loud.toml",
        &single_version_policy("loud", "loud-error", ""),
    )])
    .await;
    let reply = gw.infer("loud", &fp32_request("x", &[1], &[1.0])).await;
    reply.assert_error(
        500,
        &[
            "model `loud` version `v1`: plugin `loud-error` (loud-error 0.1.0) in `infer` failed: forged\\n2026",
            "more bytes)",
        ],
    );
    let error = reply.error();
    assert!(
        error.len() < 5 << 10,
        "{} bytes reached the client",
        error.len()
    );
    assert!(
        !error.contains('\n') && !error.contains('\u{1b}'),
        "{error}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_is_refused_before_it_is_sent() {
    let gw = TestGateway::example().await; // body limit: 1 MiB
    let head = "POST /v2/models/time-to-merge/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n";
    let response = raw(&gw, head.as_bytes(), Duration::from_secs(1)).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains("request body exceeds the limit of 1048576 bytes"),
        "{response}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_cannot_admit_refuses_before_the_body_is_read() {
    let gw = TestGateway::start(&[(
        "busy.toml",
        &single_version_policy(
            "busy",
            "spin-loop",
            "timeout_ms = 2000\nmax_concurrency = 1\nmax_queue = 0",
        ),
    )])
    .await;
    let spinning = gw.spawn_infer("busy", &fp32_request("x", &[1], &[-1.0]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Headers only: the body never comes, the answer does.
    let head = "POST /v2/models/busy/infer HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n";
    let response = raw(&gw, head.as_bytes(), Duration::from_secs(1)).await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.contains("is at its concurrency limit (1 running, 0 queued)"),
        "{response}"
    );
    assert!(
        response.to_lowercase().contains("retry-after: 1"),
        "{response}"
    );
    assert_eq!(spinning.await.unwrap().status, 504);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_to_upload_is_not_charged_to_the_plugin() {
    let gw = TestGateway::start(&[(
        "quick.toml",
        &single_version_policy("quick", "ttm-rules-v1", "timeout_ms = 100"),
    )])
    .await;
    let body = pr_features(2).to_string();
    let (first, rest) = body.split_at(body.len() / 2);
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v2/models/quick/infer HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{first}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // Three times the plugin's deadline between the two halves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(rest.as_bytes()).await.unwrap();
    let mut response = vec![0; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_budget_of_bytes_in_flight_requests_get_503() {
    let gw = TestGateway::start_configured(
        &[(
            "budget.toml",
            &single_version_policy("budget", "ttm-rules-v1", ""),
        )],
        |o| o.pipeline.max_inflight_bytes = 64 << 10,
    )
    .await;
    assert_eq!(gw.infer("budget", &pr_features(2)).await.status, 200);
    let reply = gw.infer("budget", &pr_features(3000)).await;
    reply.assert_error(
        503,
        &[
            "model `budget` version `v1` cannot take",
            "the gateway's budget of 0.1 MiB for requests in flight is taken",
        ],
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(gw.infer("budget", &pr_features(2)).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_sandbox_memory_budget_calls_wait_then_get_503() {
    let gw = TestGateway::start_configured(
        &[
            (
                "hog.toml",
                &single_version_policy(
                    "hog",
                    "spin-loop",
                    "timeout_ms = 1500\nmemory_mebibytes = 48",
                ),
            ),
            (
                "other.toml",
                &single_version_policy(
                    "other",
                    "ttm-rules-v1",
                    "timeout_ms = 300\nmemory_mebibytes = 32",
                ),
            ),
        ],
        |o| {
            o.pipeline.max_sandbox_memory_bytes = 64 << 20;
            o.runtime.max_memory_bytes = 64 << 20;
        },
    )
    .await;
    let spinning = gw.spawn_infer("hog", &fp32_request("x", &[1], &[-1.0]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = gw.infer("other", &pr_features(1)).await;
    reply.assert_error(
        503,
        &["model `other` version `v1` needs 32.0 MiB of sandbox memory, and the gateway's budget of 64.0 MiB is taken by running calls"],
    );
    assert_eq!(spinning.await.unwrap().status, 504);
    assert_eq!(gw.infer("other", &pr_features(1)).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_protocol_defines_are_answered_as_reference_servers_do() {
    let gw = TestGateway::start(&[
        ("echo.toml", &single_version_policy("echo", "echo", "")),
        (
            "ttm.toml",
            &single_version_policy("ttm", "ttm-rules-v1", ""),
        ),
    ])
    .await;
    // HEAD works where GET does; 405 says what is allowed.
    let head = raw(
        &gw,
        b"HEAD /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("\r\n\r\n"), "no body after a HEAD: {head:?}");
    let wrong = gw.post("/v2/health/live", "").await;
    wrong.assert_error(405, &["use GET, HEAD"]);
    assert_eq!(wrong.header("allow"), Some("GET, HEAD"));
    let wrong = gw.get("/v2/models/ttm/infer").await;
    assert_eq!(wrong.header("allow"), Some("POST"));

    // An output requested twice, ragged nesting, INT64 floats that are
    // not exact.
    let mut twice = pr_features(1);
    twice["outputs"] = json!([{"name": "label"}, {"name": "label"}]);
    gw.infer("ttm", &twice)
        .await
        .assert_error(400, &["output `label` is requested twice"]);
    let ragged = json!({"inputs": [{"name": "pr_features", "shape": [2, 6], "datatype": "FP32",
        "data": [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12]]}]});
    gw.infer("ttm", &ragged)
        .await
        .assert_error(400, &["data is ragged"]);
    let inexact =
        echo_inputs(json!({"name": "int64", "shape": [1], "datatype": "INT64", "data": [1e19]}));
    gw.infer("echo", &inexact)
        .await
        .assert_error(400, &["written as a float"]);

    // Compressed bodies: gzip and deflate decoded, others refused.
    let plain = gw.infer("ttm", &pr_features(2)).await;
    assert_eq!(plain.status, 200);
    let body = pr_features(2).to_string();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(body.as_bytes()).unwrap();
    let mut deflate = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    deflate.write_all(body.as_bytes()).unwrap();
    for (coding, bytes) in [
        ("gzip", gzip.finish().unwrap()),
        ("deflate", deflate.finish().unwrap()),
    ] {
        let reply = post_encoded(&gw, "ttm", coding, bytes).await;
        assert_eq!(reply.status, 200, "{coding}: {}", reply.text());
        assert_eq!(reply.body, plain.body, "{coding}");
    }
    post_encoded(&gw, "ttm", "br", body.clone().into_bytes())
        .await
        .assert_error(415, &["Content-Encoding `br` is not supported"]);
    // A gzip bomb: 2 MiB of spaces in a few KiB, over the 1 MiB limit once
    // inflated.
    let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    bomb.write_all(&vec![b' '; 2 << 20]).unwrap();
    let bomb = bomb.finish().unwrap();
    assert!(bomb.len() < 16 << 10);
    post_encoded(&gw, "ttm", "gzip", bomb)
        .await
        .assert_error(413, &["request body exceeds the limit of 1048576 bytes"]);
    let corrupt = post_encoded(&gw, "ttm", "gzip", b"not gzip".to_vec()).await;
    corrupt.assert_error(400, &["the gzip body cannot be decompressed"]);

    // Header values and ids are bounded.
    let request = Request::post("/v2/models/ttm/infer")
        .header("host", gw.addr.to_string())
        .header("x-sticky", "k".repeat(10_000))
        .body(Full::new(Bytes::from(pr_features(1).to_string())))
        .unwrap();
    send(gw.addr, request).await.assert_error(
        431,
        &["is 10000 bytes; the limit is 8192 bytes per header value"],
    );
    let mut long_id = pr_features(1);
    long_id["id"] = json!("i".repeat(2000));
    gw.infer("ttm", &long_id)
        .await
        .assert_error(400, &["`id` is 2000 bytes; the limit is 1024"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_json_cannot_carry_come_back_in_binary() {
    let gw = TestGateway::start(&[("echo.toml", &single_version_policy("echo", "echo", ""))]).await;
    // One BYTES element that is not UTF-8, sent with the binary extension;
    // the client asks for JSON.
    let element = [3u8, 0, 0, 0, 0xff, 0xfe, b'a'];
    let request = echo_inputs(json!({"name": "bytes", "shape": [1], "datatype": "BYTES",
        "parameters": {"binary_data_size": element.len()}}));
    let reply = crate::binary::post_binary(&gw, "echo", &request, &element, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (json, data) = crate::binary::split(&reply);
    assert_eq!(data, &element[..]);
    let bytes = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "bytes")
        .unwrap();
    assert_eq!(
        bytes["parameters"]["binary_data_size"],
        json!(element.len())
    );
    // The other outputs, text-safe, stay JSON.
    let uint8 = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "uint8")
        .unwrap();
    assert_eq!(uint8["data"], json!([]));
    gw.shutdown().await;
}

async fn post_encoded(
    gw: &TestGateway,
    model: &str,
    coding: &str,
    body: Vec<u8>,
) -> crate::support::Reply {
    let request = Request::post(format!("/v2/models/{model}/infer"))
        .header("host", gw.addr.to_string())
        .header("content-encoding", coding)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(gw.addr, request).await
}

/// The latencies of `n` sequential requests to the healthy model, sorted.
async fn healthy_latencies(gw: &TestGateway, n: usize) -> Vec<Duration> {
    latencies(gw, "/v2/models/healthy/infer", &pr_features(1), n).await
}

async fn healthy_p99(gw: &TestGateway, n: usize) -> Duration {
    quantile(&healthy_latencies(gw, n).await, 0.99)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_looping_calls_does_not_slow_another_model() {
    let _alone = crate::machine::alone().await;
    let gw = TestGateway::start(&[
        (
            "flood.toml",
            &single_version_policy(
                "flood",
                "spin-loop",
                "timeout_ms = 1000\nbreaker_failures = 0",
            ),
        ),
        (
            "healthy.toml",
            &single_version_policy("healthy", "ttm-rules-v1", ""),
        ),
    ])
    .await;
    // Five rounds of a quiet window and an attacked one, in alternating
    // order so that load from other tests on the same two cores, which
    // comes and goes, falls on both kinds alike; the medians are compared,
    // so no one moment decides.
    let (mut quiet, mut attacked) = (Vec::new(), Vec::new());
    for round in 0..5 {
        if round % 2 == 0 {
            quiet.push(healthy_p99(&gw, 200).await);
        }
        // 300 looping calls at once: 64 admitted, 64 queued, the rest
        // refused; the admitted ones take turns on the version's share of
        // the cores.
        let flood: Vec<_> = (0..300)
            .map(|_| gw.spawn_infer("flood", &fp32_request("x", &[1], &[-1.0])))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        attacked.push(healthy_p99(&gw, 200).await);
        for call in flood {
            let status = call.await.unwrap().status;
            assert!(status == 504 || status == 503, "{status}");
        }
        if round % 2 == 1 {
            quiet.push(healthy_p99(&gw, 200).await);
        }
    }
    quiet.sort();
    attacked.sort();
    eprintln!("healthy p99: quiet {quiet:?}, during the flood {attacked:?}");
    // Without the version's share of the cores this was 117 ms against 0.3.
    assert!(
        attacked[2] <= quiet[2] * 2 + Duration::from_millis(5),
        "healthy p99 {attacked:?} during the flood, {quiet:?} without"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_challenger_gets_fewer_copies_not_more_cpu() {
    let _alone = crate::machine::alone().await;
    let shadowed = "model = \"healthy\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n[versions.v2]\nplugin = \"slow-ttm\"\n[shadow]\nversions = [\"v2\"]\nsample_percent = 100\n";
    let gw = TestGateway::start(&[(
        "healthy.toml",
        &single_version_policy("healthy", "ttm-rules-v1", ""),
    )])
    .await;
    let before = healthy_latencies(&gw, 300).await;
    gw.write_policy("healthy.toml", shadowed);
    assert_eq!(gw.reload().await.status, 200);
    let with_shadow = healthy_latencies(&gw, 300).await;
    // The one copy the budget let run finishes a little later.
    let mut m = gw.metrics().await;
    let finished = |m: &crate::support::Metrics| {
        m.sum(
            "gateway_shadow_comparisons_total",
            &[("model", "healthy"), ("version", "v2")],
        )
    };
    for _ in 0..100 {
        if finished(&m) >= 300.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = gw.metrics().await;
    }
    let result = |r| {
        m.value(
            "gateway_shadow_comparisons_total",
            &[("model", "healthy"), ("version", "v2"), ("result", r)],
        )
    };
    eprintln!(
        "champion p50/p99: {:?}/{:?} alone, {:?}/{:?} with a 100 % slow shadow; copies run {}, dropped {}",
        quantile(&before, 0.5),
        quantile(&before, 0.99),
        quantile(&with_shadow, 0.5),
        quantile(&with_shadow, 0.99),
        result("disagree"),
        result("dropped")
    );
    // Each copy spins for 100-300 ms: the budget (10 % of the machine)
    // lets a few run and sheds the rest.
    assert!(result("disagree") + result("error") >= 1.0);
    assert!(result("dropped") >= 250.0, "{}", result("dropped"));
    // The baseline before and after (the larger: other tests share the
    // cores). Before the budget and the shadow thread the p99 read 4.1 ms
    // against 0.25 ms; the 10 % target itself is for `cargo bench --bench
    // load`, where nothing else runs.
    gw.write_policy(
        "healthy.toml",
        &single_version_policy("healthy", "ttm-rules-v1", ""),
    );
    assert_eq!(gw.reload().await.status, 200);
    // The median, not the p99: one stall of a loaded CI machine moves a
    // p99 of 300 requests; a shadow that competes with the champion (16
    // copies at once, before the budget) moves every request.
    let quiet = quantile(&before, 0.5).max(quantile(&healthy_latencies(&gw, 300).await, 0.5));
    let shadowed = quantile(&with_shadow, 0.5);
    assert!(
        shadowed <= quiet * 2 + Duration::from_millis(1),
        "champion p50 {shadowed:?} with the shadow, {quiet:?} without"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_do_not_slow_small_ones_of_the_same_model() {
    let _alone = crate::machine::alone().await;
    let policy = example_policy_as("healthy");
    let gw = TestGateway::start_configured(&[("healthy.toml", &policy)], |o| {
        o.server.max_body_bytes = 16 << 20;
    })
    .await;
    // Two clients sending 100,000 rows that all break the input rules,
    // one request after another: decoding and validating each takes tens
    // of milliseconds of CPU. On the executor's threads that put the small
    // requests' p99 at 14x (`cargo bench --bench soak`). Three rounds of a
    // quiet window then an attacked one; the medians are compared.
    let big = Bytes::from(rule_breaking_rows(100_000));
    let (mut quiet, mut attacked, mut refused) = (Vec::new(), Vec::new(), 0);
    for _ in 0..3 {
        quiet.push(healthy_p99(&gw, 200).await);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let attackers: Vec<_> = (0..2)
            .map(|_| {
                let (addr, big, stop) = (gw.addr, big.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let request = Request::post("/v2/models/healthy/infer")
                            .header("host", addr.to_string())
                            .body(Full::new(big.clone()))
                            .unwrap();
                        statuses.push(send(addr, request).await.status);
                    }
                    statuses
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        attacked.push(healthy_p99(&gw, 200).await);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for attacker in attackers {
            for status in attacker.await.unwrap() {
                assert_eq!(status, 400);
                refused += 1;
            }
        }
    }
    assert!(refused >= 6, "the attack sent {refused} requests");
    quiet.sort();
    attacked.sort();
    eprintln!("small requests' p99: quiet {quiet:?}, beside {refused} large ones {attacked:?}");
    assert!(
        attacked[1] <= quiet[1] * 2 + Duration::from_millis(5),
        "small requests' p99 {attacked:?} beside large ones, {quiet:?} without"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_memory_cap_no_call_could_ever_get_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = gateway::server::ServeOptions::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().to_path_buf(),
        vec![],
    );
    options.pipeline.max_sandbox_memory_bytes = 512 << 20;
    options.runtime.max_memory_bytes = 1 << 30;
    let error = match gateway::server::start(options).await {
        Ok(_) => panic!("started with a cap over the budget"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        error,
        "the largest memory cap a policy may set (1024 MiB, --max-memory-mebibytes) exceeds the sandbox memory of the whole gateway (512 MiB, --max-sandbox-memory-mebibytes): a version with that cap could never run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_version_fills_at_most_half_of_the_bulk_queue() {
    let policy = example_policy_as("bulky");
    let gw = TestGateway::start_configured(&[("bulky.toml", &policy)], |o| {
        o.server.max_body_bytes = 16 << 20;
        // Half of a queue of two: one large request of the version at a time.
        o.pipeline.bulk_queue = 2;
    })
    .await;
    let big: serde_json::Value = serde_json::from_str(&rule_breaking_rows(100_000)).unwrap();
    let replies: Vec<_> = (0..8).map(|_| gw.spawn_infer("bulky", &big)).collect();
    let mut statuses = Vec::new();
    for reply in replies {
        let reply = reply.await.unwrap();
        if reply.status == 503 {
            reply.assert_error(503, &["model `bulky` version `v1` cannot be served now: the pool that decodes and checks large requests (queue of 2, at most half of it per version) has no room for it, or did not start its work within 5 s; retry later"]);
            assert!(reply.header("retry-after").is_some());
        } else {
            assert_eq!(reply.status, 400, "{}", reply.text());
        }
        statuses.push(reply.status);
    }
    assert!(
        statuses.contains(&503) && statuses.contains(&400),
        "{statuses:?}"
    );
    let m = gw.metrics().await;
    let refused = m.value(
        "gateway_refused_total",
        &[("model", "bulky"), ("reason", "bulk_queue")],
    );
    assert_eq!(
        refused,
        statuses.iter().filter(|s| **s == 503).count() as f64
    );
    // Small requests never touch the pool.
    assert_eq!(gw.infer("bulky", &pr_features(1)).await.status, 200);
    gw.shutdown().await;
}
