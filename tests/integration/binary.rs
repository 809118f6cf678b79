//! The V2 binary tensor data extension through the real server: inputs and
//! outputs in binary, mixed with JSON, and every framing mistake a 400.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

use crate::support::{Reply, TestGateway, send, single_version_policy};

/// POSTs `json` followed by `binary`, with the extension's header.
pub(crate) async fn post_binary(
    gw: &TestGateway,
    model: &str,
    json: &Value,
    binary: &[u8],
    header: Option<&str>,
) -> Reply {
    let json = json.to_string();
    let mut body = json.as_bytes().to_vec();
    body.extend_from_slice(binary);
    let length = json.len().to_string();
    let request = Request::post(format!("/v2/models/{model}/infer"))
        .header("host", gw.addr.to_string())
        .header("inference-header-content-length", header.unwrap_or(&length))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(gw.addr, request).await
}

/// Splits a binary response into its JSON part and binary part.
pub(crate) fn split(reply: &Reply) -> (Value, &[u8]) {
    let n: usize = reply
        .header("inference-header-content-length")
        .expect("inference-header-content-length")
        .parse()
        .unwrap();
    (
        serde_json::from_slice(&reply.body[..n]).unwrap(),
        &reply.body[n..],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_round_trips_in_binary() {
    // NaN and infinities may come back: the policy allows them in outputs.
    let policy =
        single_version_policy("echo", "echo", "") + "[validation]\nallow_nan_outputs = true\n";
    let gw = TestGateway::start(&[("echo.toml", &policy)]).await;
    let tensors: Vec<(&str, &str, Vec<i64>, Vec<u8>)> = vec![
        ("bool", "BOOL", vec![2], vec![1, 0]),
        ("int8", "INT8", vec![2], vec![0x80, 0x7f]),
        ("int16", "INT16", vec![1], (-2i16).to_le_bytes().to_vec()),
        ("int32", "INT32", vec![1], 7i32.to_le_bytes().to_vec()),
        ("int64", "INT64", vec![1], i64::MIN.to_le_bytes().to_vec()),
        ("uint8", "UINT8", vec![1], vec![255]),
        ("uint16", "UINT16", vec![1], 65535u16.to_le_bytes().to_vec()),
        ("uint32", "UINT32", vec![1], u32::MAX.to_le_bytes().to_vec()),
        ("uint64", "UINT64", vec![1], u64::MAX.to_le_bytes().to_vec()),
        (
            "fp32",
            "FP32",
            vec![1, 2],
            [f32::NAN.to_le_bytes(), f32::INFINITY.to_le_bytes()].concat(),
        ),
        ("fp64", "FP64", vec![1], (-0.1f64).to_le_bytes().to_vec()),
        (
            "bytes",
            "BYTES",
            vec![2],
            [&3u32.to_le_bytes()[..], &[0, 159, 255], &0u32.to_le_bytes()].concat(),
        ),
    ];
    let inputs: Vec<Value> = tensors
        .iter()
        .map(|(name, datatype, shape, data)| {
            json!({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": data.len()}})
        })
        .collect();
    let binary: Vec<u8> = tensors.iter().flat_map(|t| t.3.clone()).collect();
    let request = json!({"inputs": inputs, "parameters": {"binary_data_output": true}});
    let reply = post_binary(&gw, "echo", &request, &binary, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.header("content-type"),
        Some("application/octet-stream")
    );
    let (json, data) = split(&reply);
    // Non-finite floats and non-UTF-8 bytes, which JSON cannot carry, come
    // back exactly in binary.
    assert_eq!(data, &binary[..]);
    for (output, (name, datatype, shape, bytes)) in
        json["outputs"].as_array().unwrap().iter().zip(&tensors)
    {
        assert_eq!(
            output,
            &json!({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": bytes.len()}})
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_inputs_mix_with_json_inputs_and_outputs() {
    let gw = TestGateway::example().await;
    let features: Vec<u8> = [1.0f32, 10.0, 5.0, 1.0, 0.0, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let request = json!({
        "inputs": [{"name": "pr_features", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}],
        "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": true}}]
    });
    let reply = post_binary(&gw, "time-to-merge", &request, &features, None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (json, data) = split(&reply);
    assert_eq!(json["outputs"][0]["data"], json!(["within_hour"]));
    assert_eq!(json["outputs"][1]["parameters"]["binary_data_size"], 20);
    let p: Vec<f32> = data
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(p, vec![0.7, 0.075, 0.075, 0.075, 0.075]);
    // Without binary outputs the response is plain JSON.
    let json_only = json!({"inputs": request["inputs"].clone()});
    let reply = post_binary(&gw, "time-to-merge", &json_only, &features, None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("inference-header-content-length"), None);
    assert_eq!(reply.json()["outputs"][0]["data"], json!(["within_hour"]));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_binary_bodies_are_400() {
    let gw = TestGateway::example().await;
    let input = |size: Value| json!({"inputs": [{"name": "pr_features", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": size}}]});
    let cases: Vec<(Value, Vec<u8>, Option<&str>, &str)> = vec![
        (
            input(json!(24)),
            vec![0; 24],
            Some("100000"),
            "Inference-Header-Content-Length is 100000 but the body has only",
        ),
        (
            input(json!(24)),
            vec![0; 24],
            Some("-5"),
            "Inference-Header-Content-Length is not a byte count",
        ),
        (
            input(json!(24)),
            vec![0; 10],
            None,
            "binary_data_size 24 runs past the end of the body (10 bytes left)",
        ),
        (
            input(json!(20)),
            vec![0; 20],
            None,
            "input `pr_features`: binary data: shape [1, 6] of FP32 needs 24 bytes of data, got 20",
        ),
        (
            input(json!(24)),
            vec![0; 30],
            None,
            "6 bytes of binary data follow the JSON but no input claims them",
        ),
        (
            input(json!(u64::MAX)),
            vec![0; 24],
            None,
            "runs past the end of the body",
        ),
        (
            input(json!(-1)),
            vec![0; 24],
            None,
            "malformed inference request",
        ),
        (
            input(json!("24")),
            vec![0; 24],
            None,
            "malformed inference request",
        ),
    ];
    for (json, binary, header, message) in cases {
        post_binary(&gw, "time-to-merge", &json, &binary, header)
            .await
            .assert_error(400, &[message]);
    }
    // The same binary input without the header is refused too.
    gw.post(
        "/v2/models/time-to-merge/infer",
        input(json!(24)).to_string(),
    )
    .await
    .assert_error(
        400,
        &["has a binary_data_size but the request has no Inference-Header-Content-Length header"],
    );
    let features: Vec<u8> = [1.0f32, 10.0, 5.0, 1.0, 0.0, 1.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(
        post_binary(&gw, "time-to-merge", &input(json!(24)), &features, None)
            .await
            .status,
        200
    );
    gw.shutdown().await;
}
