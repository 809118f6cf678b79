//! Protocol compatibility with the clients users already have: tritonclient
//! and kserve (Python), driving the example policies through the real server.
//!
//! The clients come from `tests/compat/requirements.txt`; the interpreter is
//! `python3`, or `$GATEWAY_TEST_PYTHON` when set (e.g. a virtualenv's).

use std::process::Command;

use crate::support::{TestGateway, repo_root};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_v2_clients() {
    let python = std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import tritonclient.http, kserve"])
        .output();
    let installed = probe.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "the V2 client libraries are missing for {python}: run `{python} -m pip install -r tests/compat/requirements.txt` \
         (or point GATEWAY_TEST_PYTHON at an interpreter that has them)\n{probe:?}"
    );

    // The example policy under a model name of its own: the metric counts
    // the script checks are process-wide, shared with the other tests.
    let example = std::fs::read_to_string(repo_root().join("policies/time-to-merge.toml")).unwrap();
    let policy = example.replace("model = \"time-to-merge\"", "model = \"ttm-compat\"");
    assert_ne!(
        policy, example,
        "the example policy no longer names its model as expected"
    );
    let gw = TestGateway::start(&[("ttm-compat.toml", &policy)]).await;
    let script = repo_root().join("tests/compat/v2_clients.py");
    let url = format!("http://{}", gw.addr);
    let metrics = format!("http://{}/metrics", gw.admin);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(script)
            .arg(url)
            .arg("ttm-compat")
            .arg(metrics)
            .output()
    })
    .await
    .expect("join")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "V2 client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all V2 client checks passed"), "{stdout}");
    gw.shutdown().await;
}
