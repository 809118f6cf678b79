//! What plugins may read of the world: random numbers and clocks as
//! deterministic stand-ins by default, the real ones where a policy grants
//! them, neither where it refuses them; never files, sockets or the
//! environment's contents.

use std::time::Duration;

use serde_json::json;

use crate::policy_check;
use crate::support::{TestGateway, single_version_policy};

fn mode(value: i32) -> serde_json::Value {
    json!({"inputs": [{"name": "mode", "shape": [1], "datatype": "INT32", "data": [value]}]})
}

/// The probe's one output value for `mode`, from the version at `path`.
async fn seen(gw: &TestGateway, path: &str, m: i32) -> f64 {
    let reply = gw.post(path, mode(m).to_string()).await;
    assert_eq!(reply.status, 200, "mode {m} at {path}: {}", reply.text());
    reply.json()["outputs"][0]["data"][0]
        .as_f64()
        .unwrap_or_else(|| panic!("{}", reply.text()))
}

const FIXED: &str = "/v2/models/fixed/infer";

fn probe_policies() -> [(&'static str, &'static str); 3] {
    [
        (
            "fixed.toml",
            "model = \"fixed\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"wasi-probe\"\n\
             [versions.v2]\nplugin = \"wasi-probe\"\n\
             [versions.same]\nplugin = \"wasi-probe\"\ngrants = { seed = 7 }\n\
             [versions.also]\nplugin = \"wasi-probe\"\ngrants = { seed = 7 }\n",
        ),
        (
            "real.toml",
            "model = \"real\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"wasi-probe\"\n\
             [grants]\nrandom = \"real\"\nclocks = \"real\"\n[limits]\ntimeout_ms = 400\n",
        ),
        (
            "denied.toml",
            // Random numbers only: with clocks refused too, the load's probe
            // call (mode 0 reads the wall clock) refuses the version (see
            // `check_refuses_a_version_whose_probe_call_needs_a_grant`).
            "model = \"denied\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"wasi-probe\"\n\
             grants = { random = \"none\" }\n",
        ),
    ]
}

async fn probe_gateway() -> TestGateway {
    TestGateway::start(&probe_policies()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_numbers_and_clocks_are_deterministic_by_default() {
    let gw = probe_gateway().await;
    // A Rust HashMap seeds itself from wasi:random: it works.
    assert_eq!(seen(&gw, FIXED, 1).await, 1.0);
    // The same seed at every call: the same request, the same answer.
    let first = seen(&gw, FIXED, 6).await;
    for _ in 0..5 {
        assert_eq!(seen(&gw, FIXED, 6).await, first);
    }
    // Each version has its own seed unless the policy sets one.
    let v2 = seen(&gw, "/v2/models/fixed/versions/v2/infer", 6).await;
    assert_ne!(v2, first);
    let same = seen(&gw, "/v2/models/fixed/versions/same/infer", 6).await;
    let also = seen(&gw, "/v2/models/fixed/versions/also/infer", 6).await;
    assert_eq!(same, also);
    assert_ne!(same, first);
    // The wall clock stands at 2000-01-01 when every call starts.
    assert_eq!(seen(&gw, FIXED, 0).await, 946_684_800.0);
    // A wait returns at once and moves virtual time by exactly its length,
    // even a wait far past the deadline (1 s).
    assert_eq!(seen(&gw, FIXED, 7).await, 0.01);
    assert_eq!(seen(&gw, FIXED, 8).await, 60.0);

    // Metadata and the admin view say what each version has.
    let meta = gw.get("/v2/models/fixed/versions/same").await.json();
    assert_eq!(
        meta["grants"],
        json!({"random": "seeded", "clocks": "fixed", "seed": 7})
    );
    let meta = gw.get("/v2/models/real").await.json();
    assert_eq!(meta["grants"]["random"], "real");
    assert_eq!(meta["grants"]["clocks"], "real");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_ones_when_granted() {
    let gw = probe_gateway().await;
    let real = "/v2/models/real/infer";
    let draws: Vec<f64> = [
        seen(&gw, real, 6).await,
        seen(&gw, real, 6).await,
        seen(&gw, real, 6).await,
    ]
    .into();
    assert!(draws[0] != draws[1] || draws[1] != draws[2], "{draws:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let clock = seen(&gw, real, 0).await;
    assert!((clock - now).abs() < 3600.0, "{clock} against {now}");
    assert!(seen(&gw, real, 7).await >= 0.01);
    // A real wait ends at the call's deadline: the plugin's own doing,
    // so a 504 (its waiting counts as its running time), not a 503.
    let started = std::time::Instant::now();
    gw.post(real, mode(8).to_string()).await.assert_error(
        504,
        &["plugin `wasi-probe` (wasi-probe 0.1.0) in `infer` did not finish within its deadline of 400 ms"],
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_grants_and_what_is_never_granted() {
    let gw = probe_gateway().await;
    let denied = "/v2/models/denied/infer";
    for (m, import) in [(1, "wasi:random/"), (6, "wasi:random/")] {
        gw.post(denied, mode(m).to_string()).await.assert_error(
            500,
            &[
                "plugin `wasi-probe` (wasi-probe 0.1.0) in `infer` called `",
                import,
                "which it is not granted",
            ],
        );
    }
    // Files and sockets, whatever the grants: no folder is open to a
    // plugin, so a file is not found; a socket is not granted.
    for path in [denied, FIXED] {
        gw.post(path, mode(2).to_string()).await.assert_error(
            500,
            &["plugin `wasi-probe` (wasi-probe 0.1.0) in `infer` failed: No such file or directory"],
        );
        gw.post(path, mode(3).to_string()).await.assert_error(
            500,
            &[
                "plugin `wasi-probe` (wasi-probe 0.1.0) in `infer` called `",
                "wasi:sockets/",
                "which it is not granted",
            ],
        );
    }
    // The environment is granted and empty; stdout and stderr are captured.
    assert_eq!(seen(&gw, FIXED, 4).await, 0.0);
    assert_eq!(seen(&gw, FIXED, 5).await, 5.0);
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_plugin_errors_total",
            &[("model", "denied"), ("kind", "not_granted")]
        ),
        3.0
    );
    gw.shutdown().await;
}

#[test]
fn check_refuses_a_version_whose_plugin_cannot_start_without_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"random-at-start\"\n\
         grants = { random = \"none\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = policy_check::check(dir.path());
    assert_eq!(code, 1, "{stderr}");
    let stderr = stderr.replace(&dir.path().display().to_string(), "D");
    assert!(
        stderr.contains(
            "error: D/m.toml:4:10: `versions.v1.plugin`: plugin `random-at-start` calls \
             `wasi:random/insecure-seed#insecure-seed` when it starts (in info()), which version `v1` \
             does not grant, so every call would fail: allow it in `grants`"
        ),
        "{stderr}"
    );
    // The same plugin with the default grants serves.
    std::fs::write(
        dir.path().join("m.toml"),
        single_version_policy("m", "random-at-start", ""),
    )
    .unwrap();
    let (code, _, stderr) = policy_check::check(dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_refuses_a_version_whose_probe_call_needs_a_grant() {
    let dir = tempfile::tempdir().unwrap();
    // wasi-probe's info() needs nothing; its infer on the probe input
    // (mode 0) reads the wall clock.
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"wasi-probe\"\n\
         grants = { clocks = \"none\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = policy_check::check(dir.path());
    assert_eq!(code, 1, "{stderr}");
    let stderr = stderr.replace(&dir.path().display().to_string(), "D");
    assert!(
        stderr.contains(
            "error: D/m.toml:4:10: `versions.v1.plugin`: plugin `wasi-probe` calls \
             `wasi:clocks/wall-clock#now` in infer() on a probe input (a batch of one generated \
             from its info()), which version `v1` does not grant, so its calls would fail: allow \
             it in `grants`"
        ),
        "{stderr}"
    );
    // Random numbers refused: the probe does not reach them, so it serves
    // (and a request that does reach them is a 500 naming the import).
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"wasi-probe\"\n\
         grants = { random = \"none\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = policy_check::check(dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn grants_are_checked_strictly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[grants]\nrandom = \"os\"\nclocks = \"frozen\"\n\
         seed = -1\n[versions.v1]\nplugin = \"wasi-probe\"\ngrants = { network = \"real\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = policy_check::check(dir.path());
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("unknown field `network`, expected one of `random`, `clocks`, `seed`"),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[grants]\nrandom = \"os\"\nclocks = \"frozen\"\n\
         seed = -1\n[versions.v1]\nplugin = \"wasi-probe\"\n",
    )
    .unwrap();
    let (_, _, stderr) = policy_check::check(dir.path());
    let stderr = stderr.replace(&dir.path().display().to_string(), "D");
    for line in [
        "error: D/m.toml:4:10: `grants.random`: `os` is not one of `seeded`, `real`, `none`",
        "error: D/m.toml:5:10: `grants.clocks`: `frozen` is not one of `fixed`, `real`, `none`",
        "error: D/m.toml:6:8: `grants.seed`: -1 is out of range; allowed: 0 to 9223372036854775807",
    ] {
        assert!(stderr.contains(line), "{line}\n{stderr}");
    }
}
