//! Ground truth: `POST /v2/models/{model}/feedback` joined to what every
//! version answered (served, canary and shadow), against an offline
//! computation over the same requests from the decision log; late,
//! unknown, duplicate and mismatched feedback counted, bad bodies refused.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::decisions::records;
use crate::support::{TestGateway, fp32_request, pr_features as features};

const POLICY: &str = r#"
model = "ttm"
champion = "v1"

[versions.v1]
plugin = "ttm-rules-v1"

[versions.v2]
plugin = "ttm-rules-v2"

[versions.v3]
plugin = "ttm-rules-v3"

[canary]
version = "v3"
percent = 40.0

[shadow]
versions = ["v2"]

[record]
sample_percent = 100
"#;

const BUCKETS: [&str; 5] = [
    "within_hour",
    "within_day",
    "within_week",
    "within_month",
    "longer",
];

/// The true bucket of request `i` (made up, the same in the test and the
/// offline computation).
fn truth(i: usize) -> &'static str {
    BUCKETS[(i * 7 + i / 3) % 5]
}

/// The labels of a record's `label` output.
fn recorded_labels(record: &Value) -> Vec<String> {
    let label = record["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap();
    let data = base64::engine::general_purpose::STANDARD
        .decode(label["data_base64"].as_str().unwrap())
        .unwrap();
    let mut labels = Vec::new();
    let mut rest = &data[..];
    while rest.len() >= 4 {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        labels.push(String::from_utf8(rest[4..4 + n].to_vec()).unwrap());
        rest = &rest[4 + n..];
    }
    labels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ground_truth_joins_every_version_and_matches_an_offline_computation() {
    let log = tempfile::tempdir().unwrap();
    let dir = log.path().to_path_buf();
    let gw = TestGateway::start_configured(&[("ttm.toml", POLICY)], move |o| {
        o.decisions = Some(gateway::decisions::DecisionLogConfig::new(dir));
        // Every shadow copy runs (a sequential client leaves the CPU
        // spare); the ones that do not are not in the log either.
        o.pipeline.shadow_cpu_percent = 100.0;
        o.pipeline.ground_truth_keep = 150;
    })
    .await;
    let mut client = gw.client().await;
    for i in 0..120 {
        let id = format!("gt-{i}");
        let key = format!("user-{i}");
        let body = fp32_request("pr_features", &[1, 6], &features(i));
        let reply = client
            .post(
                "/v2/models/ttm/infer",
                &body,
                &[("x-request-id", &id), ("x-routing-key", &key)],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // Every shadow copy ran or was dropped, and every record is written:
    // the log holds every answer the feedback will be joined to.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ran = loop {
        let metrics = gw.metrics().await;
        let copies = metrics.sum("gateway_shadow_comparisons_total", &[]);
        let dropped = metrics.value(
            "gateway_shadow_comparisons_total",
            &[("model", "ttm"), ("version", "v2"), ("result", "dropped")],
        );
        if copies >= 120.0 {
            break copies - dropped;
        }
        assert!(std::time::Instant::now() < until, "{copies} shadow copies");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    records(&gw, log.path(), 120.0 + ran).await;

    // 60 in one batch, then 60 one by one.
    let batch: Vec<Value> = (0..60)
        .map(|i| json!({"request_id": format!("gt-{i}"), "label": truth(i)}))
        .collect();
    let reply = client
        .post("/v2/models/ttm/feedback", &json!({"feedback": batch}), &[])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["joined"], 60, "{}", reply.text());
    for i in 60..120 {
        let reply = client
            .post(
                "/v2/models/ttm/feedback",
                &json!({"request_id": format!("gt-{i}"), "labels": [truth(i)]}),
                &[],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["joined"], 1);
    }
    // Again (duplicates), never sent (unknown), two rows for one.
    let reply = client
        .post(
            "/v2/models/ttm/feedback",
            &json!({"feedback": [
                {"request_id": "gt-3", "label": "longer"},
                {"request_id": "gt-4", "label": "longer"},
                {"request_id": "never-sent", "label": "longer"},
            ]}),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let counts = reply.json();
    assert_eq!(
        (
            counts["joined"].clone(),
            counts["duplicate"].clone(),
            counts["unknown"].clone()
        ),
        (json!(0), json!(2), json!(1)),
        "{counts}"
    );

    // The offline computation, from the decision log: every version that
    // answered each request, its label against the truth. The confusion
    // matrix names the labels some version predicted (all of them were,
    // before the first feedback); any other truth is `_other`.
    let all = crate::decisions::read_records(log.path());
    let predicted_labels: std::collections::BTreeSet<String> = all
        .iter()
        .filter(|r| r["status"] == 200)
        .map(|r| recorded_labels(r)[0].clone())
        .collect();
    let named = |truth: &str| {
        if predicted_labels.contains(truth) {
            truth.to_string()
        } else {
            "_other".to_string()
        }
    };
    let mut expected: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut confusion: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    let mut versions_seen = std::collections::BTreeSet::new();
    for r in &all {
        let id = r["request_id"].as_str().unwrap();
        let Some(i) = id.strip_prefix("gt-").and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        if r["status"] != 200 {
            continue;
        }
        let version = r["version"].as_str().unwrap().to_string();
        let route = r["route"].as_str().unwrap().to_string();
        versions_seen.insert(version.clone());
        let predicted = &recorded_labels(r)[0];
        let outcome = if predicted == truth(i) {
            "correct"
        } else {
            "wrong"
        };
        *expected
            .entry((version.clone(), route, outcome.to_string()))
            .or_default() += 1;
        *confusion
            .entry((version, predicted.clone(), named(truth(i))))
            .or_default() += 1;
    }
    assert_eq!(
        versions_seen.len(),
        3,
        "v1 (champion), v3 (canary), v2 (shadow)"
    );
    let metrics = gw.metrics().await;
    let mut got: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (labels, value) in metrics.samples_of("gateway_ground_truth_total") {
        got.insert(
            (
                labels["version"].clone(),
                labels["route"].clone(),
                labels["outcome"].clone(),
            ),
            value as u64,
        );
    }
    assert_eq!(got, expected);
    let mut got_confusion: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (labels, value) in metrics.samples_of("gateway_confusion_total") {
        got_confusion.insert(
            (
                labels["version"].clone(),
                labels["predicted"].clone(),
                labels["actual"].clone(),
            ),
            value as u64,
        );
    }
    assert_eq!(got_confusion, confusion);
    // The champion and the challenger were judged on the same requests.
    let judged = |version: &str| -> u64 {
        expected
            .iter()
            .filter(|((v, _, _), _)| v == version)
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(judged("v1") + judged("v3"), 120);
    assert_eq!(
        metrics.value(
            "gateway_feedback_total",
            &[("model", "ttm"), ("outcome", "joined")]
        ),
        120.0
    );
    assert_eq!(
        metrics.value(
            "gateway_feedback_total",
            &[("model", "ttm"), ("outcome", "duplicate")]
        ),
        2.0
    );

    // Past the 150 requests kept, the oldest answers are let go: their
    // feedback is late, counted, not an error.
    for i in 120..280 {
        let body = fp32_request("pr_features", &[1, 6], &features(i));
        let id = format!("gt-{i}");
        let reply = client
            .post(
                "/v2/models/ttm/versions/v1/infer",
                &body,
                &[("x-request-id", &id)],
            )
            .await;
        assert_eq!(reply.status, 200);
    }
    let reply = client
        .post(
            "/v2/models/ttm/feedback",
            &json!({"feedback": [
                {"request_id": "gt-0", "label": "longer"},
                {"request_id": "gt-279", "labels": ["longer", "longer"]},
                {"request_id": "gt-278", "label": truth(278)},
            ]}),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let counts = reply.json();
    assert_eq!(counts["late"], 1, "{counts}");
    assert_eq!(counts["rows_mismatch"], 1, "{counts}");
    assert_eq!(counts["joined"], 1, "{counts}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_that_is_not_feedback_is_refused_whole() {
    let gw = TestGateway::start(&[("ttm.toml", POLICY)]).await;
    let mut client = gw.client().await;
    let reply = client
        .post(
            "/v2/models/ttm/infer",
            &fp32_request("pr_features", &[1, 6], &features(1)),
            &[("x-request-id", "one")],
        )
        .await;
    assert_eq!(reply.status, 200);
    let cases = [
        (json!({"label": "x"}), "missing field `request_id`"),
        (
            json!({"request_id": "one"}),
            "give `label` (one row) or `labels` (one per row)",
        ),
        (
            json!({"request_id": "one", "label": "x", "extra": 1}),
            "unknown field `extra`",
        ),
        (
            json!({"request_id": "has space", "label": "x"}),
            "`request_id`: must be 1 to 128 visible ASCII",
        ),
        (
            json!({"request_id": "one", "labels": []}),
            "`labels` is empty",
        ),
        (
            json!({"feedback": [{"request_id": "one", "label": "x"}, {"request_id": "two"}]}),
            "feedback[1]: give `label`",
        ),
        (
            json!({"feedback": 3}),
            "the body is not feedback: invalid type: integer `3`, expected an array of at most 10000 elements",
        ),
        (
            json!({"feedback": vec![json!({}); 10_001]}),
            "more than 10000 elements; at most 10000 in one request",
        ),
        (
            json!({"feedback": [], "request_id": "one"}),
            "a batch has one field, `feedback`",
        ),
        (json!([1, 2]), "expected {\"request_id\""),
    ];
    for (body, expected) in cases {
        let reply = client.post("/v2/models/ttm/feedback", &body, &[]).await;
        reply.assert_error(400, &["invalid feedback: ", expected]);
    }
    // Nothing of a refused batch was applied: the valid item still joins.
    let reply = client
        .post(
            "/v2/models/ttm/feedback",
            &json!({"request_id": "one", "label": "within_day"}),
            &[],
        )
        .await;
    assert_eq!(reply.json()["joined"], 1, "{}", reply.text());
    let reply = client
        .post(
            "/v2/models/nope/feedback",
            &json!({"request_id": "one", "label": "x"}),
            &[],
        )
        .await;
    reply.assert_error(404, &["unknown model `nope`"]);
    let get = gw.get("/v2/models/ttm/feedback").await;
    assert_eq!(get.status, 405);
    assert_eq!(get.header("allow"), Some("POST"));
    gw.shutdown().await;
}

const ONE_VERSION: &str = r#"
model = "ttm"
champion = "v1"

[versions.v1]
plugin = "ttm-rules-v1"
"#;

/// With a feedback token, truth without it is refused (401, counted) and
/// nothing is judged; a truth no version predicted is `_other` in the
/// confusion matrix; an id answered again is kept as the newest answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_token_guards_truth_and_the_matrix_names_only_predictions() {
    const TOKEN: &str = "feedback-token-0123456789";
    let gw = TestGateway::start_configured(&[("ttm.toml", ONE_VERSION)], |o| {
        o.server.feedback_token = Some(TOKEN.into());
        o.pipeline.ground_truth_keep = 2;
    })
    .await;
    let mut client = gw.client().await;
    let infer = async |client: &mut crate::support::Client, id: &str| {
        let reply = client
            .post(
                "/v2/models/ttm/infer",
                &fp32_request("pr_features", &[1, 6], &features(1)),
                &[("x-request-id", id)],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        crate::support::label_of(&reply.json())
    };
    // x, y, x again, z: with two requests kept, y goes first (x's earlier
    // answer does not count), so x is still joined and y is late.
    let predicted = infer(&mut client, "x").await;
    for id in ["y", "x", "z"] {
        infer(&mut client, id).await;
    }
    let truth = json!({"feedback": [
        {"request_id": "x", "label": "no-version-predicts-this"},
        {"request_id": "y", "label": "longer"},
    ]});
    let bearer = format!("Bearer {TOKEN}");
    let refused = [
        client.post("/v2/models/ttm/feedback", &truth, &[]).await,
        client
            .post(
                "/v2/models/ttm/feedback",
                &truth,
                &[("authorization", "Bearer not-the-feedback-token")],
            )
            .await,
    ];
    for reply in refused {
        reply.assert_error(
            401,
            &["the feedback endpoint needs `Authorization: Bearer <feedback token>`"],
        );
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    }
    let reply = client
        .post(
            "/v2/models/ttm/feedback",
            &truth,
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let counts = reply.json();
    assert_eq!(
        (counts["joined"].clone(), counts["late"].clone()),
        (json!(1), json!(1)),
        "{counts}"
    );
    let metrics = gw.metrics().await;
    assert_eq!(
        metrics.value(
            "gateway_feedback_total",
            &[("model", "ttm"), ("outcome", "wrong_token")]
        ),
        2.0
    );
    let cells = metrics.samples_of("gateway_confusion_total");
    assert_eq!(cells.len(), 1, "{cells:?}");
    assert_eq!(cells[0].0["predicted"], predicted);
    assert_eq!(cells[0].0["actual"], "_other");
    assert_eq!(cells[0].1, 1.0);
    gw.shutdown().await;
}
