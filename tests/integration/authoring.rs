//! The plugin author's tools, through the real binary: `gateway plugin
//! run` answers a request as the gateway does, `gateway plugin test` passes
//! good plugins and names what is wrong with bad ones, and `gateway plugin
//! new` writes a project that builds, tests and serves as it is.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;

use crate::support::{TestGateway, repo_root};

/// The binary with `args`; `plugin run` and `plugin test` keep nothing on
/// disk.
fn gateway(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    command.args(args);
    if matches!(args.get(1), Some(&"run" | &"test")) {
        command.arg("--no-compile-cache");
    }
    command.output().expect("run gateway")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn plugin_run_answers_as_the_gateway_does() {
    let request = repo_root().join("request.json");
    let out = gateway(&[
        "plugin",
        "run",
        "ttm-rules-v1",
        "--input",
        request.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["model_name"], "ttm-rules-v1");
    assert_eq!(answer["id"], "pr-4711");
    assert_eq!(
        answer["outputs"][0],
        json!({"name": "label", "datatype": "BYTES", "shape": [2], "data": ["within_day", "longer"]})
    );
    // A name with `_` finds the file Cargo named with `-` (and back).
    let out = gateway(&[
        "plugin",
        "run",
        "ttm_rules_v1",
        "--input",
        request.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // A refused input: the gateway's 400 message, exit 1.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[1,-3,5,1,0,1]}]}"#,
    )
    .unwrap();
    let out = gateway(&[
        "plugin",
        "run",
        "ttm-rules-v1",
        "--input",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains(
            "plugin `ttm-rules-v1` (ttm-rules 1.0.0) in `infer` rejected the input: pr_features[0] feature `additions` is -3"
        ),
        "{}",
        text(&out)
    );
}

#[test]
fn plugin_test_passes_good_plugins_and_names_what_fails() {
    let out = gateway(&["plugin", "test", "ttm-rules-v1"]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for line in [
        "ok    loads: compiled and info() in",
        "reports itself as `ttm-rules` 1.0.0",
        "ok    infer on a batch of 64: `label` BYTES [64], `probabilities` FP32 [64, 5]",
        "ok    infer on an empty batch: `label` BYTES [0], `probabilities` FP32 [0, 5]",
        "ok    infer on smallest values: refused as invalid input (a 400): pr_features[0] feature `files_changed` is -1000000000000000000000000000000",
        "ok    deterministic on a batch of 64: same output twice",
        "ok    time and memory: median",
        "plugin `ttm-rules-v1` passed all",
    ] {
        assert!(report.contains(line), "{line}\n{report}");
    }

    // A plugin that panics on every call fails, with the panic's words.
    let out = gateway(&["plugin", "test", "panic"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains(
            "FAIL  infer on smallest values: it panicked: panicked at testing/panic/src/lib.rs:19:13: \
             deliberate panic on x[0] = -1000000000000000000000000000000"
        ),
        "{report}"
    );
    assert!(report.contains("ok    infer on a batch of 1"), "{report}");
    // One that answers with the real time is not deterministic (the
    // probe's generated `mode` 0 reads the wall clock).
    let out = gateway(&["plugin", "test", "wasi-probe", "--clocks", "real"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("FAIL  deterministic on a batch of 1: the same input gave another output"),
        "{report}"
    );
    // With the default fixed clock it is.
    let out = gateway(&["plugin", "test", "wasi-probe"]);
    let report = text(&out);
    assert!(
        report.contains("ok    deterministic on a batch of 1"),
        "{report}"
    );
    // One that loops is over its deadline.
    let out = gateway(&["plugin", "test", "spin-loop", "--timeout-ms", "200"]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(
        report.contains("did not finish within its deadline of 200 ms"),
        "{report}"
    );
}

#[test]
fn plugin_test_runs_an_inputs_file() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.jsonl");
    std::fs::write(
        &inputs,
        "{\"inputs\":[{\"name\":\"pr_features\",\"shape\":[1,6],\"datatype\":\"FP32\",\"data\":[3,40,12,2,4,1]}]}\n\
         {\"inputs\":[{\"name\":\"pr_features\",\"shape\":[2,6],\"datatype\":\"FP32\",\"data\":[3,40,12,2,4,1,1,1,1,1,1,1]}]}\n",
    )
    .unwrap();
    let out = gateway(&[
        "plugin",
        "test",
        "ttm-rules-v3",
        "--inputs",
        inputs.to_str().unwrap(),
    ]);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "ok    infer on request 2 of {}: `label` BYTES [2]",
            inputs.display()
        )),
        "{report}"
    );
}

fn cargo(dir: &Path, args: &[&str]) -> Output {
    let _machine = crate::machine::share();
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(dir)
        // The outer build's settings are not the new project's.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_rust_plugin_builds_tests_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("demo-plugin");
    let out = gateway(&[
        "plugin",
        "new",
        "demo-plugin",
        "--lang",
        "rust",
        "--dir",
        project.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // Nothing in it points back into this repository.
    for file in ["Cargo.toml", "sdk/Cargo.toml", "sdk/src/lib.rs"] {
        let content = std::fs::read_to_string(project.join(file)).unwrap();
        assert!(!content.contains("../"), "{file}: {content}");
    }

    let built = cargo(
        &project,
        &["build", "--release", "--target", "wasm32-wasip2"],
    );
    assert!(built.status.success(), "{}", text(&built));
    let tested = cargo(&project, &["test", "--release"]);
    assert!(tested.status.success(), "{}", text(&tested));
    assert!(
        text(&tested).contains("test result: ok. 2 passed"),
        "{}",
        text(&tested)
    );
    // The SDK's own tests, natively, as the project vendors it.
    let sdk = cargo(&project, &["test", "--release", "-p", "gateway-plugin-sdk"]);
    assert!(sdk.status.success(), "{}", text(&sdk));
    assert!(
        text(&sdk).contains("test result: ok. 3 passed"),
        "{}",
        text(&sdk)
    );

    let wasm = project.join("target/wasm32-wasip2/release/demo_plugin.wasm");
    let out = gateway(&["plugin", "test", wasm.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    // Its policy serves it (its relative path made absolute, since the
    // test gateway reads policies from a folder of its own).
    let text_of_policy = std::fs::read_to_string(project.join("policies/demo-plugin.toml"))
        .unwrap()
        .replace("../target", &project.join("target").display().to_string());
    let gw = TestGateway::start(&[("demo-plugin.toml", &text_of_policy)]).await;
    let body = std::fs::read_to_string(project.join("request.json")).unwrap();
    let reply = gw.post("/v2/models/demo-plugin/infer", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    gw.shutdown().await;
}
