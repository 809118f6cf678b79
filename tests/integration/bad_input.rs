//! Every way a client can get a request wrong: each gets the right status and
//! a `{"error": ...}` naming what and where, and the gateway keeps serving.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TestGateway, fp32_request};

const INFER: &str = "/v2/models/time-to-merge/infer";

fn good_request() -> serde_json::Value {
    fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    let gw = TestGateway::example().await;
    gw.post(INFER, r#"{"inputs": [{"name": "pr_features""#)
        .await
        .assert_error(400, &["malformed inference request", "EOF"]);
    gw.post(INFER, "not json").await.assert_error(
        400,
        &[
            "malformed inference request",
            "expected ident at line 1 column 2",
        ],
    );
    gw.post(INFER, r#"{"inputs": 3}"#)
        .await
        .assert_error(400, &["invalid type: integer `3`, expected a sequence"]);
    gw.post(INFER, r#"{"outputs": []}"#)
        .await
        .assert_error(400, &["missing field `inputs`"]);
    gw.post(INFER, r#"{"inputs": []}"#)
        .await
        .assert_error(400, &["the request has no inputs"]);
    gw.post(
        INFER,
        r#"{"inputs": [{"name": "pr_features", "shape": [1, 6], "datatype": "FP32"}]}"#,
    )
    .await
    .assert_error(400, &["input `pr_features` has no `data`"]);
    gw.post(INFER, "")
        .await
        .assert_error(400, &["malformed inference request"]);
    assert_eq!(gw.infer("time-to-merge", &good_request()).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_datatype_is_400() {
    let gw = TestGateway::example().await;
    let mut request = good_request();
    request["inputs"][0]["datatype"] = json!("FP64");
    gw.infer("time-to-merge", &request).await.assert_error(
        400,
        &["input `pr_features` has datatype FP64, the model expects FP32"],
    );
    request["inputs"][0]["datatype"] = json!("FP16");
    gw.infer("time-to-merge", &request)
        .await
        .assert_error(400, &["unsupported datatype `FP16`", "FP32"]);
    request["inputs"][0]["datatype"] = json!("INT8");
    request["inputs"][0]["data"] = json!([1, 2, 3, 300, 5, 6]);
    gw.infer("time-to-merge", &request).await.assert_error(
        400,
        &["input `pr_features`: element 3 is 300, out of range for INT8"],
    );
    request["inputs"][0]["datatype"] = json!("FP32");
    request["inputs"][0]["data"] = json!([1, 2, "three", 4, 5, 6]);
    gw.infer("time-to-merge", &request).await.assert_error(
        400,
        &["input `pr_features`: element 2 is a string, but the datatype is FP32"],
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_shape_is_400() {
    let gw = TestGateway::example().await;
    let five = fp32_request("pr_features", &[1, 5], &[1.0; 5]);
    gw.infer("time-to-merge", &five).await.assert_error(
        400,
        &["input `pr_features` has shape [1, 5], the model expects [-1, 6]"],
    );
    let short = fp32_request("pr_features", &[1, 6], &[1.0; 5]);
    gw.infer("time-to-merge", &short).await.assert_error(
        400,
        &["input `pr_features`: shape [1, 6] needs 6 elements, data has 5"],
    );
    let long = fp32_request("pr_features", &[1, 6], &[1.0; 7]);
    gw.infer("time-to-merge", &long).await.assert_error(
        400,
        &["input `pr_features`: data has more than the 6 elements its shape allows"],
    );
    let negative = fp32_request("pr_features", &[-1, 6], &[1.0; 6]);
    gw.infer("time-to-merge", &negative)
        .await
        .assert_error(400, &["negative dimension"]);
    let nested = json!({"inputs": [{"name": "pr_features", "shape": [2, 6], "datatype": "FP32",
        "data": [[1, 10, 5, 1, 0, 1], [1, 10, 5, 1, 0, 1]]}]});
    assert_eq!(
        gw.infer("time-to-merge", &nested).await.status,
        200,
        "nested data is row-major too"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_names_are_400_listing_every_problem() {
    let gw = TestGateway::example().await;
    let request = json!({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}],
        "outputs": [{"name": "bucket"}]});
    gw.infer("time-to-merge", &request).await.assert_error(
        400,
        &[
            "unknown input `features` (the model's inputs: `pr_features` (FP32 [-1, 6]))",
            "missing input `pr_features` (FP32 [-1, 6])",
            "unknown output `bucket` requested",
        ],
    );
    let twice = json!({"inputs": [good_request()["inputs"][0], good_request()["inputs"][0]]});
    gw.infer("time-to-merge", &twice)
        .await
        .assert_error(400, &["input `pr_features` appears twice"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_plugin_refuses_are_400() {
    // No input schema in the policy: the plugin's own check answers.
    let gw = TestGateway::start(&[(
        "unchecked.toml",
        &crate::support::single_version_policy("unchecked", "ttm-rules-v1", ""),
    )])
    .await;
    let negative = fp32_request("pr_features", &[1, 6], &[1.0, -3.0, 5.0, 1.0, 0.0, 1.0]);
    gw.infer("unchecked", &negative).await.assert_error(
        400,
        &["model `unchecked` version `v1`: plugin `ttm-rules-v1` (ttm-rules 1.0.0) in `infer` rejected the input: pr_features[0] feature `additions` is -3"],
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_version_or_path_is_404() {
    let gw = TestGateway::example().await;
    gw.post("/v2/models/no-such-model/infer", good_request().to_string())
        .await
        .assert_error(404, &["unknown model `no-such-model`"]);
    gw.post(
        "/v2/models/time-to-merge/versions/v7/infer",
        good_request().to_string(),
    )
    .await
    .assert_error(
        404,
        &["model `time-to-merge` has no version `v7` (versions: v1, v2, v3)"],
    );
    gw.get("/v3/models")
        .await
        .assert_error(404, &["no endpoint at /v3/models"]);
    gw.get(INFER).await.assert_error(
        405,
        &["GET is not allowed on /v2/models/time-to-merge/infer; use POST"],
    );
    gw.post("/v2/health/live", "")
        .await
        .assert_error(405, &["use GET"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413() {
    let gw = TestGateway::example().await; // body limit: 1 MiB
    let big = vec![b' '; (1 << 20) + 1];
    gw.post(INFER, big)
        .await
        .assert_error(413, &["request body exceeds the limit of 1048576 bytes"]);

    // Without Content-Length (chunked), the limit applies while reading.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head = format!("POST {INFER} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..17 {
        let header = format!("{:x}\r\n", chunk.len());
        if stream.write_all(header.as_bytes()).await.is_err() {
            break;
        }
        let _ = stream.write_all(&chunk).await;
        let _ = stream.write_all(b"\r\n").await;
    }
    let mut response = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains(r#"{"error":"request body exceeds the limit of 1048576 bytes"}"#),
        "{response}"
    );

    let shape = fp32_request("pr_features", &[100_000_000, 6], &[1.0]);
    gw.infer("time-to-merge", &shape)
        .await
        .assert_error(413, &["600000000 elements exceed the limit"]);
    assert_eq!(gw.infer("time-to-merge", &good_request()).await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_body_times_out_with_408_and_others_are_served() {
    let gw = TestGateway::example().await; // body timeout: 2 s
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let head =
        format!("POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{\"inputs\"");
    stream.write_all(head.as_bytes()).await.unwrap();
    // Meanwhile, other clients are served.
    assert_eq!(gw.infer("time-to-merge", &good_request()).await.status, 200);
    let mut response = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(6), stream.read(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains("request body not received within 2 s"),
        "{response}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_in_metrics() {
    let gw = TestGateway::start(&[(
        "errs.toml",
        &crate::support::single_version_policy("errs", "ttm-rules-v1", ""),
    )])
    .await;
    let before = gw.metrics().await;
    assert_eq!(gw.post("/v2/models/errs/infer", "{").await.status, 400);
    assert_eq!(
        gw.infer("errs", &fp32_request("pr_features", &[1, 6], &[-1.0; 6]))
            .await
            .status,
        400
    );
    let after = gw.metrics().await;
    let labels = [
        ("model", "errs"),
        ("version", "v1"),
        ("route", "champion"),
        ("status", "400"),
    ];
    assert_eq!(
        after.value("gateway_requests_total", &labels)
            - before.value("gateway_requests_total", &labels),
        2.0
    );
    assert_eq!(
        after.value(
            "gateway_plugin_errors_total",
            &[("model", "errs"), ("kind", "rejected")]
        ),
        1.0
    );
    gw.shutdown().await;
}
