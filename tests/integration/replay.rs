//! Recorded requests run again: the tensors a policy's `[record]` keeps,
//! `gateway replay` against the recorded version (bit for bit), another
//! version and a changed artifact, and `gateway what-if` against a real
//! run of the same traffic under the proposed policies.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use serde_json::Value;

use crate::decisions::{of, records, start};
use crate::support::{TestGateway, fp32_request};

const RULES: &str = r#"
model = "ttm"
champion = "v1"

[versions.v1]
plugin = "ttm-rules-v1"

[versions.v3]
plugin = "ttm-rules-v3"

[record]
sample_percent = 100
"#;

/// Runs the gateway's command line; its exit code and what it printed.
fn gateway(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .expect("run gateway");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// A policy folder holding `files`.
fn policies(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `gateway <command> --log LOG --policies DIR` with a compile cache of
/// the test's own.
fn offline(command: &[&str], log: &Path, policies: &Path, cache: &Path) -> (i32, String) {
    let mut args: Vec<&str> = command.to_vec();
    args.extend([
        "--log",
        log.to_str().unwrap(),
        "--policies",
        policies.to_str().unwrap(),
        "--compile-cache",
        cache.to_str().unwrap(),
    ]);
    gateway(&args)
}

fn features(i: usize) -> [f32; 6] {
    let i = i as f32;
    [
        i % 20.0 + 1.0,
        i * 37.0 % 900.0,
        i * 11.0 % 300.0,
        2.0,
        i % 9.0,
        i % 3.0,
    ]
}

fn label(reply: &Value) -> String {
    crate::support::label_of(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_request_replays_bit_for_bit_and_shows_what_changed() {
    let log = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let plain = "model = \"plain\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    let mut config = gateway::decisions::DecisionLogConfig::new(log.path().to_path_buf());
    config.buffer = 64;
    let gw = TestGateway::start_configured(&[("ttm.toml", RULES), ("plain.toml", plain)], |o| {
        o.decisions = Some(config)
    })
    .await;
    let mut client = gw.client().await;
    let data = features(3);
    let request = fp32_request("pr_features", &[1, 6], &data);
    let answered = client
        .post(
            "/v2/models/ttm/infer",
            &request,
            &[("x-request-id", "r-ok")],
        )
        .await;
    assert_eq!(answered.status, 200, "{}", answered.text());
    let refused = client
        .post(
            "/v2/models/ttm/infer",
            &fp32_request("pr_features", &[1, 5], &[1.0; 5]),
            &[("x-request-id", "r-refused")],
        )
        .await;
    assert_eq!(refused.status, 400);
    let digest_only = client
        .post(
            "/v2/models/plain/infer",
            &request,
            &[("x-request-id", "r-plain")],
        )
        .await;
    assert_eq!(digest_only.status, 200);
    // Two requests with one id (ids are the clients').
    for row in [features(5), features(6)] {
        let body = fp32_request("pr_features", &[1, 6], &row);
        let reply = client
            .post("/v2/models/ttm/infer", &body, &[("x-request-id", "r-dup")])
            .await;
        assert_eq!(reply.status, 200);
    }
    let all = records(&gw, log.path(), 5.0).await;
    gw.shutdown().await;

    // The record keeps the tensors: the inputs as sent, little-endian.
    let ok = of(&all, "r-ok")[0];
    let inputs = ok["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{ok}");
    assert_eq!(inputs[0]["name"], "pr_features");
    assert_eq!(inputs[0]["datatype"], "FP32");
    assert_eq!(inputs[0]["shape"], serde_json::json!([1, 6]));
    let bytes: Vec<u8> = data.iter().flat_map(|f| f.to_le_bytes()).collect();
    let recorded = base64::engine::general_purpose::STANDARD
        .decode(inputs[0]["data_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(recorded, bytes);
    let outputs: Vec<&str> = ok["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["label", "probabilities"]);
    // A refused request keeps its inputs (to replay the refusal), no
    // outputs; a model without `[record]` keeps digests only.
    let refused = of(&all, "r-refused")[0];
    assert!(refused["inputs"].is_array() && refused.get("outputs").is_none());
    let plain_record = of(&all, "r-plain")[0];
    assert!(plain_record.get("inputs").is_none() && plain_record.get("outputs").is_none());
    assert_eq!(plain_record["inputs_sha256"], ok["inputs_sha256"]);

    let same = policies(&[("ttm.toml", RULES), ("plain.toml", plain)]);
    let replay = |id: &str, extra: &[&str], dir: &Path| {
        let mut command = vec!["replay", id];
        command.extend(extra);
        offline(&command, log.path(), dir, cache.path())
    };

    // Against the recorded version: the same answer, bit for bit.
    let (code, out) = replay("r-ok", &[], same.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("version `v1` (champion), status 200"), "{out}");
    assert!(out.contains("artifacts: the same as recorded"), "{out}");
    assert!(
        out.contains("outputs: identical to the recorded outputs, bit for bit"),
        "{out}"
    );
    // Against another version: the difference, element by element.
    let (code, out) = replay("r-ok", &["--version", "v3"], same.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("replayed against `v3` (another version"),
        "{out}"
    );
    assert!(out.contains("DIFFERS from the record"), "{out}");
    assert!(
        out.contains("output `probabilities` (FP32 [1, 5]): "),
        "{out}"
    );
    assert!(out.contains("[0] recorded "), "{out}");
    // A refusal replays as the same refusal.
    let (code, out) = replay("r-refused", &[], same.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the same failure as recorded"), "{out}");

    // The version's plugin was replaced since: replay says so, and what
    // the new one answers.
    let swapped = policies(&[(
        "ttm.toml",
        &RULES.replace("\"ttm-rules-v1\"", "\"ttm-rules-v3\""),
    )]);
    let (code, out) = replay("r-ok", &[], swapped.path());
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "CHANGED since the record: plugin `ttm-rules-v3`: ttm-rules-v1.wasm with SHA-256 "
        ),
        "{out}"
    );
    assert!(out.contains("DIFFERS from the record"), "{out}");

    // Of two requests with one id, the latest, unless --seq says which.
    let (code, out) = replay("r-dup", &[], same.path());
    assert_eq!(code, 0, "{out}");
    let seqs: Vec<u64> = of(&all, "r-dup")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        out.contains(&format!(
            "note: 2 requests had id `r-dup` (ids are the clients'); replaying the latest, record {}",
            seqs[1]
        )),
        "{out}"
    );
    let first = seqs[0].to_string();
    let (code, out) = replay("r-dup", &["--seq", &first], same.path());
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("note:"), "{out}");
    let (code, out) = replay("r-dup", &["--seq", "999"], same.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("none numbered 999"), "{out}");

    // what-if cannot judge a change by records that keep only digests:
    // with a threshold, that fails the gate instead of passing it.
    let only_plain = policies(&[("plain.toml", plain)]);
    let (code, out) = offline(
        &["what-if", "--max-changed-percent", "50"],
        log.path(),
        only_plain.path(),
        cache.path(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("model `plain`"), "{out}");
    assert!(out.contains("nothing to judge the change by"), "{out}");
    // A model the proposal drops would be 404 for all its requests.
    assert!(
        out.contains("model `ttm`: 4 recorded request(s), but the new policies have no such model"),
        "{out}"
    );
    let (code, out) = offline(
        &["what-if", "--max-failed-percent", "50"],
        log.path(),
        only_plain.path(),
        cache.path(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("THRESHOLD: 100.0 % would be refused or fail, over --max-failed-percent 50"),
        "{out}"
    );

    // What cannot be replayed says why, with exit code 2.
    let (code, out) = replay("r-plain", &[], same.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("keeps only the digest of its inputs"), "{out}");
    assert!(out.contains("[record] sample_percent"), "{out}");
    let (code, out) = replay("never-sent", &[], same.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no decision of request `never-sent`"), "{out}");
    // Recorded inputs changed after the fact no longer match their digest.
    let file = log.path().join("decisions.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let original = inputs[0]["data_base64"].as_str().unwrap();
    let forged = base64::engine::general_purpose::STANDARD.encode(
        features(4)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    std::fs::write(&file, text.replacen(original, &forged, 1)).unwrap();
    let (code, out) = replay("r-ok", &[], same.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("do not match their SHA-256"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keep_the_tensors_of_the_sampled_share_within_max_kib() {
    let log = tempfile::tempdir().unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
                  [record]\nsample_percent = 30\nmax_kib = 1\n";
    let gw = start(policy, log.path(), |_| {}).await;
    let mut client = gw.client().await;
    let small = fp32_request("pr_features", &[1, 6], &features(1));
    for i in 0..200 {
        let id = format!("s-{i}");
        let reply = client
            .post("/v2/models/ttm/infer", &small, &[("x-request-id", &id)])
            .await;
        assert_eq!(reply.status, 200);
    }
    // 100 rows, 2,400 bytes of inputs: over 1 KiB, sampled or not.
    let rows: Vec<f32> = (0..100).flat_map(features).collect();
    let big = fp32_request("pr_features", &[100, 6], &rows);
    for i in 0..40 {
        let id = format!("b-{i}");
        let reply = client
            .post("/v2/models/ttm/infer", &big, &[("x-request-id", &id)])
            .await;
        assert_eq!(reply.status, 200);
    }
    let all = records(&gw, log.path(), 240.0).await;
    gw.shutdown().await;
    let kept = all
        .iter()
        .filter(|r| r["request_id"].as_str().unwrap().starts_with("s-"))
        .filter(|r| r["inputs"].is_array() && r["outputs"].is_array())
        .count();
    // Binomial(200, 0.3): 60 ± 6.5; four standard deviations.
    assert!((34..=86).contains(&kept), "{kept} of 200 kept at 30 %");
    let mut omitted = 0;
    for r in all
        .iter()
        .filter(|r| r["request_id"].as_str().unwrap().starts_with("b-"))
    {
        assert!(
            r.get("inputs").is_none() && r.get("outputs").is_none(),
            "{r}"
        );
        assert_eq!(r["inputs_sha256"].as_str().map(str::len), Some(64));
        if let Some(why) = r["payload_omitted"].as_str() {
            assert!(
                why.contains(
                    "the inputs (2604 bytes as recorded) are over the policy's record.max_kib (1024 bytes)"
                ),
                "{why}"
            );
            omitted += 1;
        }
    }
    // The sampled ones among the 40 say why they keep no tensors.
    assert!(omitted >= 1, "none of 40 large requests sampled at 30 %");
}

/// The numbers of a `what-if` report line (`  share new:     v1 46.3 % (19), v3 ...`):
/// each version's count.
fn shares(line: &str) -> BTreeMap<String, u64> {
    let list = line.split_once(':').unwrap().1;
    list.split(", ")
        .map(|part| {
            let part = part.trim();
            let version = part.split(' ').next().unwrap().to_string();
            let count = part
                .rsplit_once('(')
                .unwrap()
                .1
                .split(')')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (version, count)
        })
        .collect()
}

/// The first number after `key` in the report's part for `model`.
fn report_line<'a>(report: &'a str, model: &str, key: &str) -> &'a str {
    let part = report
        .split("model `")
        .find(|p| p.starts_with(&format!("{model}`")))
        .unwrap_or_else(|| panic!("no part for {model}: {report}"));
    part.lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no `{key}` line for {model}: {report}"))
}

fn first_number(line: &str) -> u64 {
    line.split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The proposed policies: `ttm` moves its canary from 10 % to 50 % and
/// refuses pull requests of more than 10 files; `free` (no sticky keys)
/// moves from 10 % to 50 %.
fn policy(model: &str, percent: u32, max_files: Option<u32>) -> String {
    let mut text = format!(
        "model = \"{model}\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v3]\nplugin = \"ttm-rules-v3\"\n\
         [canary]\nversion = \"v3\"\npercent = {percent}\nsticky_header = \"x-routing-key\"\n\
         [record]\nsample_percent = 100\n"
    );
    if let Some(max) = max_files {
        text.push_str("[validation]\nmode = \"reject\"\n[[inputs]]\nname = \"pr_features\"\ndatatype = \"FP32\"\nshape = [-1, 6]\n");
        for (name, bound) in [
            ("files_changed", format!("max = {max}")),
            ("additions", String::new()),
            ("deletions", String::new()),
            ("commits", String::new()),
            ("comments", String::new()),
            ("review_count", String::new()),
        ] {
            text.push_str(&format!(
                "[[inputs.features]]\nname = \"{name}\"\n{bound}\n"
            ));
        }
    }
    text
}

fn files<'a>(p: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    p.iter().map(|(n, t)| (*n, t.as_str())).collect()
}

/// The traffic: 120 `ttm` requests on sticky keys, 100 `free` ones
/// without; each answer's version and label (None when refused).
async fn traffic(gw: &TestGateway) -> Vec<(String, Option<(String, String)>)> {
    let mut client = gw.client().await;
    let mut answers = Vec::new();
    for i in 0..220 {
        let (model, key) = if i < 120 {
            ("ttm", Some(format!("user-{i}")))
        } else {
            ("free", None)
        };
        let id = format!("{model}-{i}");
        let mut headers = vec![("x-request-id", id.as_str())];
        if let Some(key) = &key {
            headers.push(("x-routing-key", key.as_str()));
        }
        let body = fp32_request("pr_features", &[1, 6], &features(i));
        let reply = client
            .post(&format!("/v2/models/{model}/infer"), &body, &headers)
            .await;
        let answer = match reply.status {
            200 => Some((
                reply.header("x-model-version").unwrap().to_string(),
                label(&reply.json()),
            )),
            400 => None,
            other => panic!("{other}: {}", reply.text()),
        };
        answers.push((id, answer));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_if_predicts_what_the_new_policies_then_serve() {
    let log = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let now = [
        ("ttm.toml", policy("ttm", 10, None)),
        ("free.toml", policy("free", 10, None)),
    ];
    let proposed = [
        ("ttm.toml", policy("ttm", 50, Some(10))),
        ("free.toml", policy("free", 50, None)),
    ];
    let mut config = gateway::decisions::DecisionLogConfig::new(log.path().to_path_buf());
    config.buffer = 1024;
    let gw = TestGateway::start_configured(&files(&now), |o| o.decisions = Some(config)).await;
    let before = traffic(&gw).await;
    records(&gw, log.path(), 220.0).await;
    gw.shutdown().await;

    let proposed_dir = policies(&files(&proposed));
    let (code, report) = offline(
        &["what-if", "--max-changed-percent", "100"],
        log.path(),
        proposed_dir.path(),
        cache.path(),
    );
    assert_eq!(code, 0, "{report}");

    // The same traffic, served by the proposed policies.
    let gw = TestGateway::start(&files(&proposed)).await;
    let after = traffic(&gw).await;
    gw.shutdown().await;

    let served = |model: &str, version: &str| {
        after
            .iter()
            .filter(|(id, a)| {
                id.starts_with(model) && a.as_ref().is_some_and(|(v, _)| v == version)
            })
            .count() as u64
    };
    // Sticky keys: what-if's shares are exactly what was served (a
    // refused request was routed first: it counts for its version).
    let predicted = shares(report_line(&report, "ttm", "share new:"));
    let refused_now = after
        .iter()
        .filter(|(id, a)| id.starts_with("ttm") && a.is_none())
        .count() as u64;
    assert_eq!(predicted.values().sum::<u64>(), 120, "{report}");
    assert!(refused_now > 0, "the new rule refuses some");
    // Refused requests have no version in the answer: compare the routes
    // of the answered ones through the records' points.
    let answered_v3 = served("ttm", "v3");
    let answered_v1 = served("ttm", "v1");
    assert_eq!(answered_v1 + answered_v3 + refused_now, 120);
    let mut expected_v3 = 0;
    for (i, (_, answer)) in after.iter().enumerate().take(120) {
        let point = gateway::router::sticky_point("ttm", format!("user-{i}").as_bytes());
        if point < 50.0 {
            expected_v3 += 1;
            if let Some((version, _)) = answer {
                assert_eq!(version, "v3");
            }
        }
    }
    assert_eq!(
        predicted.get("v3").copied().unwrap_or(0),
        expected_v3,
        "{report}"
    );
    // The new rule's refusals: exactly the requests refused when served.
    let refused = first_number(report_line(&report, "ttm", "refused/failed:"));
    assert_eq!(refused, refused_now, "{report}");
    // Changed labels: exactly those that changed among the answered.
    let changed = after
        .iter()
        .zip(&before)
        .take(120)
        .filter(|((_, a), (_, b))| match (a, b) {
            (Some((_, x)), Some((_, y))) => x != y,
            _ => false,
        })
        .count() as u64;
    assert!(changed > 0, "v3 answers some of these differently");
    assert_eq!(
        first_number(report_line(&report, "ttm", "labels:")),
        changed,
        "{report}"
    );
    // Without sticky keys, the draw is random each time: within sampling
    // error (two Binomial(100, 0.5): the difference's sd is 7.1).
    let predicted_free = shares(report_line(&report, "free", "share new:"));
    let predicted_v3 = predicted_free.get("v3").copied().unwrap_or(0) as i64;
    let served_v3 = served("free", "v3") as i64;
    assert!(
        (predicted_v3 - served_v3).abs() <= 29,
        "predicted {predicted_v3}, served {served_v3}: {report}"
    );

    // A threshold crossed is exit code 1, naming it.
    let (code, out) = offline(
        &["what-if", "--max-changed-percent", "0"],
        log.path(),
        proposed_dir.path(),
        cache.path(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("THRESHOLD: "), "{out}");
    assert!(out.contains("over --max-changed-percent 0"), "{out}");
    let (code, out) = offline(
        &["what-if", "--max-failed-percent", "0"],
        log.path(),
        proposed_dir.path(),
        cache.path(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("over --max-failed-percent 0"), "{out}");
    // A broken proposal cannot be run: exit 2, with the policy's error.
    std::fs::write(proposed_dir.path().join("ttm.toml"), "model = 3\n").unwrap();
    let (code, out) = offline(&["what-if"], log.path(), proposed_dir.path(), cache.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("ttm.toml"), "{out}");
}
