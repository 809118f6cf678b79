//! The policy's input schema through the real server: every value rule
//! accepted at its boundary and refused just past it, every violation of a
//! request listed at once and counted, `flag` mode serving and counting,
//! and `gateway check` naming a schema that disagrees with a plugin.

use serde_json::{Value, json};

use crate::support::{Metrics, TestGateway, fp32_request};

const RULES: &str = r#"
[validation]
mode = "MODE"

[[inputs]]
name = "pr_features"
datatype = "FP32"
shape = [-1, 6]
features = [
  { name = "files_changed", min = 1, max = 100 },
  { name = "additions", min = 0 },
  { name = "deletions", max = 50.5 },
  { name = "commits", allowed = [1, 2, 3] },
  { name = "comments", allow_nan = true, allow_infinity = true },
  { name = "review_count" },
]
"#;

fn policy(model: &str, mode: &str) -> String {
    format!(
        "model = \"{model}\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n{}",
        RULES.replace("MODE", mode)
    )
}

fn row(values: [f32; 6]) -> Value {
    fp32_request("pr_features", &[1, 6], &values)
}

/// A row of binary FP32, for NaN and infinities (JSON has neither).
async fn post_binary_row(gw: &TestGateway, model: &str, values: [f32; 6]) -> crate::support::Reply {
    let json = json!({"inputs": [{"name": "pr_features", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}]})
        .to_string();
    let mut body = json.as_bytes().to_vec();
    body.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    let request = http::Request::post(format!("/v2/models/{model}/infer"))
        .header("host", "x")
        .header("inference-header-content-length", json.len().to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    crate::support::send(gw.addr, request).await
}

const OK: [f32; 6] = [1.0, 0.0, 50.5, 2.0, 0.0, 0.0];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_holds_at_its_boundary_and_refuses_just_past_it() {
    let gw = TestGateway::start(&[("rules.toml", &policy("rules", "reject"))]).await;
    let with = |i: usize, v: f32| {
        let mut r = OK;
        r[i] = v;
        r
    };
    // At the boundary: accepted.
    for values in [
        OK,
        with(0, 100.0),
        with(1, 1e9),
        with(2, 0.0),
        with(3, 1.0),
        with(3, 3.0),
    ] {
        let reply = gw.infer("rules", &row(values)).await;
        assert_eq!(reply.status, 200, "{values:?}: {}", reply.text());
    }
    // Just past it: refused, naming input, row, feature, value and rule.
    let cases = [
        (
            with(0, 0.0),
            "`pr_features`[row 0] feature `files_changed` = 0 is below the minimum 1",
        ),
        (
            with(0, 100.5),
            "`pr_features`[row 0] feature `files_changed` = 100.5 is above the maximum 100",
        ),
        (
            with(1, -0.5),
            "`pr_features`[row 0] feature `additions` = -0.5 is below the minimum 0",
        ),
        (
            with(2, 50.75),
            "`pr_features`[row 0] feature `deletions` = 50.75 is above the maximum 50.5",
        ),
        (
            with(3, 4.0),
            "`pr_features`[row 0] feature `commits` = 4 is not one of [1.0, 2.0, 3.0]",
        ),
    ];
    for (values, message) in cases {
        gw.infer("rules", &row(values))
            .await
            .assert_error(400, &["invalid inputs: ", message]);
    }
    // NaN and infinities: refused by default, allowed where the policy says.
    post_binary_row(&gw, "rules", with(5, f32::NAN))
        .await
        .assert_error(
            400,
            &["`pr_features`[row 0] feature `review_count` is NaN, which is not allowed"],
        );
    post_binary_row(&gw, "rules", with(5, f32::NEG_INFINITY))
        .await
        .assert_error(
            400,
            &["`pr_features`[row 0] feature `review_count` is -inf, which is not allowed"],
        );
    // `comments` allows them: the schema lets them through, and the plugin,
    // which wants finite counts, answers for itself.
    for special in [f32::NAN, f32::INFINITY] {
        post_binary_row(&gw, "rules", with(4, special))
            .await
            .assert_error(
                400,
                &["plugin `ttm-rules-v1` (ttm-rules 1.0.0) in `infer` rejected the input: pr_features[0] feature `comments` is"],
            );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_response_lists_every_violation_and_each_is_counted() {
    let gw = TestGateway::start(&[("many.toml", &policy("many", "reject"))]).await;
    let request = fp32_request(
        "pr_features",
        &[3, 6],
        &[
            1.0, 0.0, 0.0, 1.0, 0.0, 0.0, /* row 1: */ 0.0, -1.0, 0.0, 1.0, 0.0, 0.0,
            /* row 2: */ 1.0, 0.0, 99.0, 9.0, 0.0, 0.0,
        ],
    );
    let reply = gw.infer("many", &request).await;
    reply.assert_error(
        400,
        &[
            "invalid inputs: 4 violations: ",
            "`pr_features`[row 1] feature `files_changed` = 0 is below the minimum 1",
            "`pr_features`[row 1] feature `additions` = -1 is below the minimum 0",
            "`pr_features`[row 2] feature `deletions` = 99 is above the maximum 50.5",
            "`pr_features`[row 2] feature `commits` = 9 is not one of [1.0, 2.0, 3.0]",
        ],
    );
    let m = gw.metrics().await;
    let count = |feature: &str, rule: &str| {
        m.value(
            "gateway_validation_failures_total",
            &[
                ("model", "many"),
                ("input", "pr_features"),
                ("feature", feature),
                ("rule", rule),
            ],
        )
    };
    assert_eq!(count("files_changed", "min"), 1.0);
    assert_eq!(count("additions", "min"), 1.0);
    assert_eq!(count("deletions", "max"), 1.0);
    assert_eq!(count("commits", "allowed"), 1.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_mode_serves_and_counts() {
    let gw = TestGateway::start(&[("flag.toml", &policy("flagged", "flag"))]).await;
    let mut values = OK;
    values[0] = 1000.0;
    let reply = gw.infer("flagged", &row(values)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["outputs"][0]["data"][0], "within_day");
    // Structural problems are refused even in flag mode.
    gw.infer("flagged", &fp32_request("pr_features", &[1, 5], &[1.0; 5]))
        .await
        .assert_error(
            400,
            &["input `pr_features` has shape [1, 5], the model expects [-1, 6]"],
        );
    let m: Metrics = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_validation_failures_total",
            &[
                ("model", "flagged"),
                ("feature", "files_changed"),
                ("rule", "max")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "gateway_validation_failures_total",
            &[("model", "flagged"), ("feature", ""), ("rule", "shape")]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_policy_refuses_negative_counts() {
    let gw = TestGateway::example().await;
    gw.infer(
        "time-to-merge",
        &fp32_request("pr_features", &[1, 6], &[1.0, -3.0, 5.0, 1.0, 0.0, 1.0]),
    )
    .await
    .assert_error(
        400,
        &["`pr_features`[row 0] feature `additions` = -3 is below the minimum 0"],
    );
    gw.shutdown().await;
}

#[test]
fn check_names_a_schema_that_disagrees_with_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    crate::support::copy_dir(&crate::support::repo_root().join("policies"), dir.path());
    let cases = [
        (
            "datatype = \"FP32\"",
            "datatype = \"FP64\"",
            "version `v1` (plugin `ttm-rules-v1`) expects FP32 where the policy declares FP64",
        ),
        (
            "shape = [-1, 6]",
            "shape = [-1, -1]",
            "expects shape [-1, 6], which the policy's [-1, -1] does not guarantee",
        ),
        (
            "name = \"pr_features\"",
            "name = \"features\"",
            "version `v1` (plugin `ttm-rules-v1`) has no input `features`",
        ),
        (
            "mode = \"reject\"",
            "mode = \"strict\"",
            "`validation.mode`: `strict` is not a mode; use `reject` or `flag`",
        ),
        (
            "[[inputs.features]]\nname = \"review_count\"",
            "[monitoring.unused]\nname = \"review_count\"",
            "unknown field `unused`",
        ),
        (
            "proportions = [0.15, 0.45, 0.30, 0.10]",
            "proportions = [0.15, 0.45, 0.30]",
            "5 edges make 4 bins, but there are 3 proportions",
        ),
    ];
    let example =
        std::fs::read_to_string(crate::support::repo_root().join("policies/time-to-merge.toml"))
            .unwrap();
    for (from, to, message) in cases {
        assert!(example.contains(from), "the example policy lacks {from}");
        std::fs::write(
            dir.path().join("time-to-merge.toml"),
            example.replace(from, to),
        )
        .unwrap();
        let (code, _, stderr) = crate::policy_check::check(dir.path());
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(message), "{stderr}\nlacks: {message}");
    }
}

/// BYTES rules through the echo plugin (which needs one input of each
/// datatype): element length and allowed strings, at and past the limit;
/// `from_plugin` takes the datatype and shape from the plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_rules_and_declarations_from_the_plugin() {
    let policy = "model = \"texts\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"echo\"\n\
                  [validation]\nfrom_plugin = true\n\
                  [[inputs]]\nname = \"bytes\"\nmax_bytes_length = 3\n\
                  [[inputs]]\nname = \"uint8\"\nfeatures = [{ name = \"level\", allowed = [1, 2] }]\n";
    let gw = TestGateway::start(&[("texts.toml", policy)]).await;
    let request = |texts: Value, level: u8| {
        let mut inputs = vec![
            json!({"name": "bytes", "datatype": "BYTES", "shape": [texts.as_array().unwrap().len()], "data": texts}),
            json!({"name": "uint8", "datatype": "UINT8", "shape": [1], "data": [level]}),
        ];
        for (name, datatype) in [
            ("bool", "BOOL"),
            ("int8", "INT8"),
            ("int16", "INT16"),
            ("int32", "INT32"),
            ("int64", "INT64"),
            ("uint16", "UINT16"),
            ("uint32", "UINT32"),
            ("uint64", "UINT64"),
            ("fp64", "FP64"),
        ] {
            let value = if datatype == "BOOL" {
                json!(true)
            } else {
                json!(1)
            };
            inputs.push(json!({"name": name, "datatype": datatype, "shape": [1], "data": [value]}));
        }
        inputs.push(json!({"name": "fp32", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}));
        json!({"inputs": inputs})
    };
    assert_eq!(
        gw.infer("texts", &request(json!(["", "abc"]), 2))
            .await
            .status,
        200
    );
    gw.infer("texts", &request(json!(["abc", "abcd"]), 1))
        .await
        .assert_error(
            400,
            &["`bytes`[row 1] is 4 bytes long, over the maximum of 3"],
        );
    gw.infer("texts", &request(json!(["a"]), 3))
        .await
        .assert_error(
            400,
            &["`uint8`[row 0] feature `level` = 3 is not one of [1.0, 2.0]"],
        );
    let view = gw.policies_view().await;
    assert_eq!(view["models"][0]["model"], "texts");
    gw.shutdown().await;
}

/// A reload that changes only an input rule applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changing_only_input_rules_applies_them() {
    let gw = TestGateway::start(&[("live-rules.toml", &policy("liverules", "reject"))]).await;
    let mut values = OK;
    values[0] = 150.0;
    gw.infer("liverules", &row(values)).await.assert_error(
        400,
        &["feature `files_changed` = 150 is above the maximum 100"],
    );
    gw.write_policy(
        "live-rules.toml",
        &policy("liverules", "reject").replace("max = 100", "max = 200"),
    );
    let reload = gw.reload().await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert_eq!(
        reload.json()["changes"],
        json!(["model `liverules`: input rules changed"])
    );
    assert_eq!(gw.infer("liverules", &row(values)).await.status, 200);
    gw.shutdown().await;
}
