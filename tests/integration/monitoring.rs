//! Data monitoring through the real server: per-feature statistics equal to
//! those computed offline on the same values, a drift score that stays low
//! for data drawn from the reference and rises past the threshold for
//! shifted data, outliers counted, all readable from `/metrics` alone.

use serde_json::Value;

use crate::support::{ADMIN_TOKEN, Client, TestGateway, fp32_request, send};

/// The example's features, in column order (as in plugins/ttm-common).
const FEATURES: [&str; 6] = [
    "files_changed",
    "additions",
    "deletions",
    "commits",
    "comments",
    "review_count",
];

/// The example policy, as its own model, with a small drift window.
fn policy(model: &str) -> String {
    let example =
        std::fs::read_to_string(crate::support::repo_root().join("policies/time-to-merge.toml"))
            .unwrap();
    example
        .replace("model = \"time-to-merge\"", &format!("model = \"{model}\""))
        .replace("window = 1000", "window = 400")
}

/// The example's reference for each feature: (edges, proportions).
fn references() -> Vec<(Vec<f64>, Vec<f64>)> {
    vec![
        (
            vec![0.0, 1.5, 2.5, 4.5, 8.5, 16.5, 10000.0],
            vec![0.30, 0.20, 0.20, 0.15, 0.10, 0.05],
        ),
        (
            vec![0.0, 10.0, 50.0, 200.0, 1000.0, 1e6],
            vec![0.25, 0.30, 0.25, 0.15, 0.05],
        ),
        (
            vec![0.0, 5.0, 20.0, 100.0, 500.0, 1e6],
            vec![0.30, 0.30, 0.25, 0.10, 0.05],
        ),
        (
            vec![0.0, 1.5, 3.5, 7.5, 5000.0],
            vec![0.40, 0.30, 0.20, 0.10],
        ),
        (
            vec![0.0, 0.5, 3.5, 10.5, 5000.0],
            vec![0.30, 0.35, 0.25, 0.10],
        ),
        (
            vec![0.0, 0.5, 1.5, 3.5, 500.0],
            vec![0.15, 0.45, 0.30, 0.10],
        ),
    ]
}

/// `n` values of one feature spread over the bins in the reference's
/// proportions, in a scrambled order (deterministic).
fn from_reference(edges: &[f64], proportions: &[f64], n: usize, salt: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(n);
    for (b, p) in proportions.iter().enumerate() {
        let k = (p * n as f64).round() as usize;
        let (lo, hi) = (edges[b], edges[b + 1].min(edges[b] * 4.0 + 20.0));
        for i in 0..k {
            values.push((lo + (hi - lo) * (i as f64 + 0.5) / k as f64) as f32);
        }
    }
    values.resize(n, edges[0] as f32);
    let len = values.len();
    (0..len)
        .map(|i| values[(i * 7919 + salt * 31) % len])
        .collect()
}

/// `n` rows drawn from the reference, one column per feature.
fn reference_columns(n: usize) -> Vec<Vec<f32>> {
    references()
        .iter()
        .enumerate()
        .map(|(i, (edges, p))| from_reference(edges, p, n, i))
        .collect()
}

async fn send_rows(client: &mut Client, model: &str, columns: &[Vec<f32>]) {
    let rows = columns[0].len();
    for start in (0..rows).step_by(50) {
        let end = (start + 50).min(rows);
        let data: Vec<f32> = (start..end)
            .flat_map(|r| columns.iter().map(move |c| c[r]))
            .collect();
        let reply = client
            .post(
                &format!("/v2/models/{model}/infer"),
                &fp32_request("pr_features", &[(end - start) as i64, 6], &data),
                &[],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

async fn monitoring(gw: &TestGateway) -> Value {
    let request = http::Request::get("/admin/monitoring")
        .header("host", "x")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let reply = send(gw.admin, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

fn feature<'a>(view: &'a Value, model: &str, name: &str) -> &'a Value {
    view["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model"] == model && v["version"] == "v1")
        .and_then(|v| {
            v["features"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["feature"] == name)
        })
        .unwrap_or_else(|| panic!("no feature {name} for {model}: {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_equal_those_computed_offline() {
    let gw = TestGateway::start(&[("stats.toml", &policy("stats"))]).await;
    let mut client = gw.client().await;
    let columns = reference_columns(137);
    send_rows(&mut client, "stats", &columns).await;
    let view = monitoring(&gw).await;
    for (name, values) in FEATURES.iter().zip(&columns) {
        let values: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let f = feature(&view, "stats", name);
        assert_eq!(f["count"], 137, "{name}");
        let close = |got: &Value, want: f64| {
            (got.as_f64().unwrap() - want).abs() <= 1e-9 * want.abs().max(1.0)
        };
        assert!(
            close(&f["mean"], mean),
            "{name}: mean {} vs {mean}",
            f["mean"]
        );
        assert!(
            close(&f["stddev"], std),
            "{name}: stddev {} vs {std}",
            f["stddev"]
        );
        assert!(
            close(
                &f["min"],
                values.iter().cloned().fold(f64::INFINITY, f64::min)
            ),
            "{name} min"
        );
        assert!(
            close(
                &f["max"],
                values.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            ),
            "{name} max"
        );
        let counts: u64 = f["histogram"]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(counts, 137);
    }
    let m = gw.metrics().await;
    let labels = [
        ("model", "stats"),
        ("version", "v1"),
        ("input", "pr_features"),
        ("feature", "additions"),
    ];
    assert_eq!(
        m.value("gateway_feature_observations_total", &labels),
        137.0
    );
    assert_eq!(m.value("gateway_feature_value_count", &labels), 137.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_stays_low_for_reference_data_and_rises_for_shifted_data() {
    let gw = TestGateway::start(&[("drift.toml", &policy("drift"))]).await;
    let mut client = gw.client().await;
    let reference = reference_columns(400);
    send_rows(&mut client, "drift", &reference).await;
    let view = monitoring(&gw).await;
    for name in FEATURES {
        let psi = feature(&view, "drift", name)["psi"].as_f64().unwrap();
        assert!(
            psi < 0.05,
            "{name}: PSI {psi} for data drawn from the reference"
        );
    }
    assert_eq!(view["versions"][0]["drifting"], serde_json::json!([]));
    let outliers_before = feature(&view, "drift", "additions")["beyond_sigma"]
        .as_u64()
        .unwrap();

    // Pull requests get much bigger: additions move to the top bins.
    let mut shifted = reference.clone();
    shifted[1] = (0..400).map(|i| 3000.0 + i as f32).collect();
    send_rows(&mut client, "drift", &shifted).await;
    let view = monitoring(&gw).await;
    let additions = feature(&view, "drift", "additions");
    let psi = additions["psi"].as_f64().unwrap();
    assert!(psi > 1.0, "PSI {psi} after the shift");
    assert_eq!(
        view["versions"][0]["drifting"],
        serde_json::json!(["pr_features.additions"])
    );
    assert!(
        feature(&view, "drift", "files_changed")["psi"]
            .as_f64()
            .unwrap()
            < 0.05
    );
    // additions of 3000+ are beyond 4 reference deviations (180 + 4 * 600).
    assert_eq!(
        additions["beyond_sigma"].as_u64().unwrap(),
        outliers_before + 400
    );

    // From /metrics alone: the drift score and the predictions moving.
    let m = gw.metrics().await;
    let labels = [
        ("model", "drift"),
        ("version", "v1"),
        ("feature", "additions"),
    ];
    assert!(m.value("gateway_feature_drift_psi", &labels) > 0.2);
    assert_eq!(
        m.value(
            "gateway_feature_outliers_total",
            &[labels[0], labels[1], labels[2], ("reason", "beyond_sigma")]
        ),
        (outliers_before + 400) as f64
    );
    assert!(
        m.value(
            "gateway_predictions_total",
            &[
                ("model", "drift"),
                ("version", "v1"),
                ("label", "within_month")
            ]
        ) > 0.0
    );
    gw.shutdown().await;
}
