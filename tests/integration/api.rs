//! The V2 endpoints against the example policies, and the example model's
//! answers checked against its rules by hand.

use serde_json::json;

use crate::support::{TestGateway, fp32_request};

const TTM: &str = "time-to-merge";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_server_metadata() {
    let gw = TestGateway::example().await;
    let live = gw.get("/v2/health/live").await;
    assert_eq!((live.status, live.json()), (200, json!({"live": true})));
    let ready = gw.get("/v2/health/ready").await;
    assert_eq!((ready.status, ready.json()), (200, json!({"ready": true})));
    let meta = gw.get("/v2").await;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.json()["name"], "wasm-model-gateway");
    assert_eq!(meta.json()["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(meta.json()["extensions"], json!(["binary_tensor_data"]));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_metadata_and_readiness() {
    let gw = TestGateway::example().await;
    let features = json!([{"name": "pr_features", "datatype": "FP32", "shape": [-1, 6]}]);
    let outputs = json!([
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]},
    ]);
    let model = gw.get("/v2/models/time-to-merge").await;
    assert_eq!(model.status, 200);
    // The V2 fields, then what traces an answer to the files behind it.
    let built =
        std::path::Path::new(gateway::artifacts::BUILT_PLUGIN_DIR).join("ttm-rules-v1.wasm");
    let sha256 = gateway::contract::Sha256::of(&std::fs::read(built).unwrap()).to_string();
    assert_eq!(
        model.json(),
        json!({"name": TTM, "versions": ["v1", "v2", "v3"], "platform": "wasm-component",
               "inputs": features, "outputs": outputs, "model_version": "v1",
               "plugin": {"name": "ttm-rules-v1", "file": "ttm-rules-v1.wasm", "sha256": sha256,
                          "reported_name": "ttm-rules", "reported_version": "1.0.0",
                          "description": "time-to-merge bucket from change size and discussion length"},
               // The default seed: a hash of the model's and the version's
               // names (golden: a seeded plugin's answers must not change).
               "grants": {"random": "seeded", "clocks": "fixed", "seed": 3082855326800646716_u64}})
    );
    let v2 = gw.get("/v2/models/time-to-merge/versions/v2").await.json();
    let model_file = gw.policy_dir().join("models/ttm-v2.onnx");
    assert_eq!(
        v2["models"],
        json!([{"name": "classifier", "file": "ttm-v2.onnx",
                "sha256": gateway::contract::Sha256::of(&std::fs::read(model_file).unwrap()).to_string()}])
    );
    let version = gw.get("/v2/models/time-to-merge/versions/v2").await;
    assert_eq!(version.status, 200);
    assert_eq!(version.json()["versions"], json!(["v2"]));
    assert_eq!(version.json()["inputs"], features);

    for path in [
        "/v2/models/time-to-merge/ready",
        "/v2/models/time-to-merge/versions/v1/ready",
    ] {
        let ready = gw.get(path).await;
        assert_eq!(
            (ready.status, ready.json()),
            (200, json!({"name": TTM, "ready": true})),
            "{path}"
        );
    }
    gw.get("/v2/models/nope/ready")
        .await
        .assert_error(404, &["unknown model `nope`"]);
    gw.get("/v2/models/time-to-merge/versions/v9/ready")
        .await
        .assert_error(
            404,
            &["model `time-to-merge` has no version `v9` (versions: v1, v2, v3)"],
        );
    gw.get("/v2/models/nope")
        .await
        .assert_error(404, &["unknown model `nope`"]);
    gw.get("/v2/models/time-to-merge/versions/v9")
        .await
        .assert_error(404, &["no version `v9`"]);
    gw.shutdown().await;
}

/// Rows chosen so each rule of v1 (see plugins/ttm-rules-v1) decides once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn champion_answers_with_the_size_rules() {
    let gw = TestGateway::example().await;
    #[rustfmt::skip]
    let rows: [([f32; 6], &str); 6] = [
        // files, additions, deletions, commits, comments, reviews
        ([1.0, 10.0, 5.0, 1.0, 0.0, 1.0], "within_hour"),     // 15 lines, 1 file
        ([3.0, 10.0, 5.0, 1.0, 0.0, 1.0], "within_day"),      // 15 lines but 3 files
        ([4.0, 150.0, 50.0, 2.0, 3.0, 1.0], "within_day"),    // exactly 200 lines
        ([9.0, 600.0, 300.0, 5.0, 2.0, 2.0], "within_week"),  // 900 lines
        ([9.0, 600.0, 300.0, 5.0, 25.0, 2.0], "within_month"),// 900 lines, long discussion
        ([40.0, 5000.0, 1.0, 30.0, 0.0, 1.0], "longer"),      // 5001 lines
    ];
    let data: Vec<f32> = rows.iter().flat_map(|(r, _)| r.iter().copied()).collect();
    let mut request = fp32_request("pr_features", &[6, 6], &data);
    request["id"] = json!("batch-1");
    let reply = gw.infer(TTM, &request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-model-version"), Some("v1"));
    let body = reply.json();
    assert_eq!(body["model_name"], TTM);
    assert_eq!(body["model_version"], "v1");
    assert_eq!(body["id"], "batch-1");
    let labels: Vec<&str> = rows.iter().map(|(_, l)| *l).collect();
    assert_eq!(
        body["outputs"][0],
        json!({"name": "label", "datatype": "BYTES", "shape": [6], "data": labels})
    );
    let probabilities = &body["outputs"][1];
    assert_eq!(probabilities["name"], "probabilities");
    assert_eq!(probabilities["shape"], json!([6, 5]));
    let first: Vec<f32> = probabilities["data"].as_array().unwrap()[..5]
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(first, vec![0.7, 0.075, 0.075, 0.075, 0.075]);
    gw.shutdown().await;
}

/// v2's score, by hand for [1, 5, 2, 1, 0, 1]: ln(8) + 0.5 ln(2) + 0.05 - 0.3
/// = 2.176, nearest centre 1.5 (within_hour); for [10, 400, 100, 3, 12, 0]:
/// ln(501) + 0.5 ln(11) + 1.2 + 0.15 = 8.762, nearest 9.5 (longer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_version_answers_with_the_effort_score() {
    let gw = TestGateway::start(&[(
        "ttm.toml",
        "model = \"time-to-merge\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n[versions.v2]\nplugin = \"ttm-rules-v2\"\n",
    )])
    .await;
    let request = fp32_request(
        "pr_features",
        &[2, 6],
        &[
            1.0, 5.0, 2.0, 1.0, 0.0, 1.0, 10.0, 400.0, 100.0, 3.0, 12.0, 0.0,
        ],
    );
    let reply = gw
        .post(
            "/v2/models/time-to-merge/versions/v2/infer",
            request.to_string(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-model-version"), Some("v2"));
    let body = reply.json();
    assert_eq!(body["model_version"], "v2");
    assert!(body.get("id").is_none(), "no id was sent: {body}");
    assert_eq!(body["outputs"][0]["data"], json!(["within_hour", "longer"]));
    let p: Vec<f64> = body["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for row in p.chunks(5) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    // Score 2.176 is 0.676 from centre 1.5 and 1.324 from 3.5.
    let expected_first = 1.0
        / (1.0
            + (-1.5f64 * (1.324 - 0.676)).exp()
            + (-1.5f64 * (3.324 - 0.676)).exp()
            + (-1.5f64 * (5.324 - 0.676)).exp()
            + (-1.5f64 * (7.324 - 0.676)).exp());
    assert!(
        (p[0] - expected_first).abs() < 1e-3,
        "{} vs {expected_first}",
        p[0]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_outputs_are_returned_in_the_requested_order() {
    let gw = TestGateway::example().await;
    let mut request = fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0]);
    request["outputs"] =
        json!([{"name": "probabilities", "parameters": {"binary_data": false}}, {"name": "label"}]);
    request["parameters"] = json!({"priority": 1});
    request["inputs"][0]["parameters"] = json!({"binary_data_size": null});
    let reply = gw.infer(TTM, &request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    let names: Vec<&str> = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["probabilities", "label"]);
    request["outputs"] = json!([{"name": "label"}]);
    let only_label = gw.infer(TTM, &request).await.json();
    assert_eq!(only_label["outputs"].as_array().unwrap().len(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_counted_per_version_and_route() {
    let gw = TestGateway::start(&[(
        "counted.toml",
        "model = \"counted\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n[versions.v2]\nplugin = \"ttm-rules-v2\"\n",
    )])
    .await;
    let request = fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0]);
    for _ in 0..3 {
        assert_eq!(gw.infer("counted", &request).await.status, 200);
    }
    assert_eq!(
        gw.post("/v2/models/counted/versions/v2/infer", request.to_string())
            .await
            .status,
        200
    );
    let bad = fp32_request("pr_features", &[1, 5], &[1.0; 5]);
    assert_eq!(gw.infer("counted", &bad).await.status, 400);

    let m = gw.metrics().await;
    let count = |version, route, status| {
        m.value(
            "gateway_requests_total",
            &[
                ("model", "counted"),
                ("version", version),
                ("route", route),
                ("status", status),
            ],
        )
    };
    assert_eq!(count("v1", "champion", "200"), 3.0);
    assert_eq!(count("v2", "pinned", "200"), 1.0);
    assert_eq!(count("v1", "champion", "400"), 1.0);
    assert_eq!(
        m.value(
            "gateway_request_duration_seconds_count",
            &[
                ("model", "counted"),
                ("version", "v1"),
                ("route", "champion")
            ]
        ),
        4.0
    );
    assert_eq!(
        m.value(
            "gateway_plugin_duration_seconds_count",
            &[("model", "counted"), ("version", "v1")]
        ),
        3.0
    );
    assert!(
        m.value(
            "gateway_request_duration_seconds_bucket",
            &[
                ("model", "counted"),
                ("version", "v1"),
                ("route", "champion"),
                ("le", "+Inf")
            ]
        ) == 4.0
    );
    assert_eq!(
        m.value(
            "gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    gw.shutdown().await;
}

/// The echo plugin declares one input per datatype and returns each input
/// as an output: every datatype crosses JSON -> plugin -> JSON unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_round_trips_through_a_plugin() {
    let gw = TestGateway::start(&[(
        "echo.toml",
        &crate::support::single_version_policy("echo", "echo", ""),
    )])
    .await;
    let inputs = json!([
        {"name": "bool", "datatype": "BOOL", "shape": [2], "data": [true, false]},
        {"name": "int8", "datatype": "INT8", "shape": [2], "data": [-128, 127]},
        {"name": "int16", "datatype": "INT16", "shape": [2], "data": [-32768, 32767]},
        {"name": "int32", "datatype": "INT32", "shape": [2], "data": [-2147483648i64, 2147483647]},
        {"name": "int64", "datatype": "INT64", "shape": [2], "data": [i64::MIN, i64::MAX]},
        {"name": "uint8", "datatype": "UINT8", "shape": [2], "data": [0, 255]},
        {"name": "uint16", "datatype": "UINT16", "shape": [2], "data": [0, 65535]},
        {"name": "uint32", "datatype": "UINT32", "shape": [2], "data": [0, 4294967295u64]},
        {"name": "uint64", "datatype": "UINT64", "shape": [2], "data": [0, u64::MAX]},
        {"name": "fp32", "datatype": "FP32", "shape": [2, 2], "data": [0.0, -1.5, 1e-7, 3.4028235e38]},
        {"name": "fp64", "datatype": "FP64", "shape": [2], "data": [0.1, -1e300]},
        {"name": "bytes", "datatype": "BYTES", "shape": [3], "data": ["", "hello", "ünïcødé"]},
    ]);
    let reply = gw.infer("echo", &json!({"inputs": inputs})).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let outputs = reply.json()["outputs"].clone();
    assert_eq!(outputs, inputs);
    gw.shutdown().await;
}
