//! Canary splits: the observed share over many requests, sticky keys across
//! restarts, monotone rollouts, pinned requests, and the metrics that count
//! them.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::{Client, TestGateway, fp32_request};

fn policy(model: &str, percent: f64) -> String {
    format!(
        "model = \"{model}\"\nchampion = \"v1\"\n\
         [versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v2]\nplugin = \"ttm-rules-v2\"\n\
         [canary]\nversion = \"v2\"\npercent = {percent}\nsticky_header = \"X-User\"\n"
    )
}

fn request() -> Value {
    fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0])
}

/// Sends `count` requests over `connections` keep-alive connections and
/// counts the answering versions; `key(i)` gives request i's routing key.
async fn versions_of(
    gw: &TestGateway,
    model: &str,
    count: usize,
    connections: usize,
    key: impl Fn(usize) -> Option<String>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let mut client: Client = gw.client().await;
        let path = format!("/v2/models/{model}/infer");
        let keys: Vec<(usize, Option<String>)> = (c..count)
            .step_by(connections)
            .map(|i| (i, key(i)))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for (i, key) in keys {
                let headers: Vec<(&str, &str)> =
                    key.as_deref().map(|k| ("x-user", k)).into_iter().collect();
                let reply = client.post(&path, &request(), &headers).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                let version = reply
                    .header("x-model-version")
                    .expect("x-model-version")
                    .to_string();
                assert_eq!(reply.json()["model_version"], version.as_str());
                seen.push((i, version));
            }
            seen
        }));
    }
    let mut all = Vec::with_capacity(count);
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort();
    all.into_iter().map(|(_, v)| v).collect()
}

fn count(versions: &[String], version: &str) -> usize {
    versions.iter().filter(|v| *v == version).count()
}

/// 10,000 unkeyed requests at 25 %: the canary share is within 4 standard
/// deviations (sqrt(10000 * 0.25 * 0.75) = 43) of 2,500, and the metrics
/// count exactly what the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_gets_its_share_of_unkeyed_traffic() {
    let gw = TestGateway::start(&[("split.toml", &policy("share", 25.0))]).await;
    let before = gw.metrics().await;
    let versions = versions_of(&gw, "share", 10_000, 4, |_| None).await;
    let canary = count(&versions, "v2");
    assert!(
        (2_327..=2_673).contains(&canary),
        "{canary} of 10000 went to the canary at 25 %"
    );
    let m = gw.metrics().await;
    let delta = |version, route| {
        let labels = [
            ("model", "share"),
            ("version", version),
            ("route", route),
            ("status", "200"),
        ];
        m.value("gateway_requests_total", &labels) - before.value("gateway_requests_total", &labels)
    };
    assert_eq!(delta("v2", "canary"), canary as f64);
    assert_eq!(delta("v1", "champion"), (10_000 - canary) as f64);
    assert_eq!(
        m.value(
            "gateway_canary_percent",
            &[("model", "share"), ("version", "v2")]
        ),
        25.0
    );
    gw.shutdown().await;
}

/// A fractional percent: 2.5 % of 10,000 keyed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_percents_split_keyed_traffic() {
    let gw = TestGateway::start(&[("split.toml", &policy("fraction", 2.5))]).await;
    let versions = versions_of(&gw, "fraction", 10_000, 4, |i| Some(format!("user-{i}"))).await;
    let canary = count(&versions, "v2");
    // sqrt(10000 * 0.025 * 0.975) = 15.6; 4 sigma = 63.
    assert!(
        (187..=313).contains(&canary),
        "{canary} of 10000 keys at 2.5 %"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_keeps_its_version_across_requests_and_restarts() {
    let gw = TestGateway::start(&[("split.toml", &policy("sticky", 30.0))]).await;
    let key = |i: usize| Some(format!("user-{i}"));
    let first = versions_of(&gw, "sticky", 1_000, 2, key).await;
    let canary = count(&first, "v2");
    assert!(
        (230..=370).contains(&canary),
        "{canary} of 1000 keys at 30 %"
    );
    assert_eq!(
        versions_of(&gw, "sticky", 1_000, 3, key).await,
        first,
        "a key changed version between requests"
    );
    let gw = gw.restart().await;
    assert_eq!(
        versions_of(&gw, "sticky", 1_000, 2, key).await,
        first,
        "a key changed version across a restart"
    );
    gw.shutdown().await;
}

/// The rollout 2 -> 5 -> 10 -> 25 -> 75 -> 100 %, applied by reloads: no
/// key ever goes back from the canary to the champion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_percent_never_moves_a_key_back() {
    let gw = TestGateway::start(&[("split.toml", &policy("rollout", 2.0))]).await;
    let key = |i: usize| Some(format!("k{i}"));
    let mut previous = versions_of(&gw, "rollout", 2_000, 2, key).await;
    for percent in [5.0, 10.0, 25.0, 75.0, 100.0] {
        gw.write_policy("split.toml", &policy("rollout", percent));
        let reload = gw.reload().await;
        assert_eq!(reload.status, 200, "{}", reload.text());
        let now = versions_of(&gw, "rollout", 2_000, 2, key).await;
        for (i, (before, after)) in previous.iter().zip(&now).enumerate() {
            assert!(
                !(before == "v2" && after == "v1"),
                "key k{i} went back to the champion at {percent} %"
            );
        }
        let share = count(&now, "v2") as f64 / 20.0;
        assert!(
            (share - percent).abs() < 4.5,
            "{share} % of keys on the canary at {percent} %"
        );
        previous = now;
    }
    assert_eq!(count(&previous, "v2"), 2_000);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_requests_skip_the_split() {
    let gw = TestGateway::start(&[("split.toml", &policy("pinsplit", 50.0))]).await;
    let mut client = gw.client().await;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..200 {
        let version = if i % 2 == 0 { "v1" } else { "v2" };
        let reply = client
            .post(
                &format!("/v2/models/pinsplit/versions/{version}/infer"),
                &request(),
                &[("x-user", "same-key")],
            )
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-model-version"), Some(version));
        *seen.entry(version.to_string()).or_default() += 1;
    }
    assert_eq!(seen.get("v1"), Some(&100));
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_requests_total",
            &[
                ("model", "pinsplit"),
                ("version", "v2"),
                ("route", "pinned")
            ]
        ),
        100.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictions_are_counted_per_label_and_version() {
    let gw = TestGateway::start(&[("split.toml", &policy("labels", 0.0))]).await;
    let mut client = gw.client().await;
    // 3 rows per request: within_hour, within_day, longer (see api.rs).
    let rows = fp32_request(
        "pr_features",
        &[3, 6],
        &[
            1.0, 10.0, 5.0, 1.0, 0.0, 1.0, 4.0, 150.0, 50.0, 2.0, 3.0, 1.0, 40.0, 5000.0, 1.0,
            30.0, 0.0, 1.0,
        ],
    );
    for _ in 0..5 {
        assert_eq!(
            client
                .post("/v2/models/labels/infer", &rows, &[])
                .await
                .status,
            200
        );
    }
    let m = gw.metrics().await;
    for label in ["within_hour", "within_day", "longer"] {
        assert_eq!(
            m.value(
                "gateway_predictions_total",
                &[("model", "labels"), ("version", "v1"), ("label", label)]
            ),
            5.0,
            "{label}"
        );
    }
    assert_eq!(
        m.value(
            "gateway_predictions_total",
            &[
                ("model", "labels"),
                ("version", "v1"),
                ("label", "within_week")
            ]
        ),
        0.0
    );
    gw.shutdown().await;
}
