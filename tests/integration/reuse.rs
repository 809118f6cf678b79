//! `calls_per_instance`: a version may let one plugin instance serve several
//! calls. The `counter` plugin answers how many calls its instance has
//! served, so these tests see exactly when an instance is reused, and that
//! a call that failed never hands its instance on.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestGateway, fp32_request, single_version_policy};

fn x(value: f32) -> serde_json::Value {
    fp32_request("x", &[1], &[value])
}

/// The `calls` the counter plugin answered.
async fn calls(gw: &TestGateway, model: &str) -> i64 {
    let reply = gw.infer(model, &x(1.0)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["outputs"][0]["data"][0]
        .as_i64()
        .expect("an INT64 count")
}

/// A gateway serving `plugin` alone as `model`, under `limits`.
async fn serving(model: &str, plugin: &str, limits: &str) -> TestGateway {
    TestGateway::start(&[("one.toml", &single_version_policy(model, plugin, limits))]).await
}

async fn counter(model: &str, limits: &str) -> TestGateway {
    serving(model, "counter", limits).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_gets_a_fresh_instance_by_default() {
    let gw = counter("count-fresh", "").await;
    for _ in 0..4 {
        assert_eq!(calls(&gw, "count-fresh").await, 1);
    }
    let view = gw.policies_view().await;
    assert_eq!(
        view["models"][0]["versions"][0]["calls_per_instance"],
        json!(1),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_instance_serves_up_to_calls_per_instance_calls() {
    let gw = counter("count-kept", "calls_per_instance = 3").await;
    let mut seen = Vec::new();
    for _ in 0..7 {
        seen.push(calls(&gw, "count-kept").await);
    }
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
    let view = gw.policies_view().await;
    assert_eq!(
        view["models"][0]["versions"][0]["calls_per_instance"],
        json!(3),
        "{view}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_call_failed_is_never_reused() {
    let gw = counter("count-fail", "calls_per_instance = 100").await;
    assert_eq!(calls(&gw, "count-fail").await, 1);
    assert_eq!(calls(&gw, "count-fail").await, 2);
    // A panic traps: the instance is poisoned and must go.
    let trapped = gw.infer("count-fail", &x(-1.0)).await;
    trapped.assert_error(500, &["plugin `counter`", "asked to fail"]);
    assert_eq!(calls(&gw, "count-fail").await, 1);
    assert_eq!(calls(&gw, "count-fail").await, 2);
    // `internal` leaves the instance usable, but in a state the plugin
    // itself called broken: it goes too.
    let failed = gw.infer("count-fail", &x(0.0)).await;
    failed.assert_error(500, &["plugin `counter`", "asked to fail"]);
    assert_eq!(calls(&gw, "count-fail").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_never_share_an_instance() {
    let gw = counter("count-concurrent", "calls_per_instance = 1000").await;
    let tasks: Vec<_> = (0..32)
        .map(|_| gw.spawn_infer("count-concurrent", &x(1.0)))
        .collect();
    let mut counts = Vec::new();
    for task in tasks {
        let reply = task.await.expect("request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
        counts.push(
            reply.json()["outputs"][0]["data"][0]
                .as_i64()
                .expect("count"),
        );
    }
    // Each instance counts 1, 2, 3, ... over the calls it served; with no
    // instance shared by two calls at once, every count is reached once per
    // instance: as many 1s as instances, never more 2s than 1s, and so on.
    counts.sort_unstable();
    let at = |n: i64| counts.iter().filter(|&&c| c == n).count();
    assert!(at(1) >= 1, "{counts:?}");
    for n in 2..=32 {
        assert!(at(n) <= at(n - 1), "{counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_instance_gets_each_calls_own_deadline() {
    let gw = serving(
        "spin-kept",
        "spin-loop",
        "timeout_ms = 200\ncalls_per_instance = 100",
    )
    .await;
    // Calls that span several epoch ticks, spaced wider than the deadline:
    // a kept instance that carried its first call's deadline over would be
    // interrupted at the first tick.
    for _ in 0..3 {
        let reply = gw.infer("spin-kept", &x(5.0)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let endless = gw.infer("spin-kept", &x(-1.0)).await;
    endless.assert_error(504, &["did not finish within its deadline of 200 ms"]);
    assert!(
        endless.elapsed < Duration::from_millis(400),
        "{:?}",
        endless.elapsed
    );
    let reply = gw.infer("spin-kept", &x(5.0)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_instance_stays_under_its_memory_cap() {
    let gw = serving(
        "hog-kept",
        "memory-hog",
        "memory_mebibytes = 16\ncalls_per_instance = 100",
    )
    .await;
    // The memory a kept instance grew to stays counted: it can take 12 MiB
    // again (its allocator reuses what it freed), but never 16 more.
    for _ in 0..3 {
        let reply = gw.infer("hog-kept", &x(12.0)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let hog = gw.infer("hog-kept", &x(-1.0)).await;
    hog.assert_error(500, &["exceeded its memory limit of 16.0 MiB"]);
    let reply = gw.infer("hog-kept", &x(1.0)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A kept instance counts against its version's half of the sandbox pool,
/// idle or running. With a pool of 4 (2 per version): a call leaves an
/// instance kept, three long calls follow (one takes the kept instance,
/// one a fresh sandbox, the third waits for the version's share), and
/// another version's two calls still find their two sandboxes. Had the
/// kept instance given its share back, the long calls would hold three of
/// the four sandboxes and one of the other version's calls would get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_instances_count_against_their_versions_share_of_the_pool() {
    let spin = single_version_policy(
        "spin-share",
        "spin-loop",
        "timeout_ms = 60000\ncalls_per_instance = 100",
    );
    let other = single_version_policy("spin-other", "spin-loop", "timeout_ms = 60000");
    let gw = TestGateway::start_configured(&[("a.toml", &spin), ("b.toml", &other)], |o| {
        o.runtime.max_instances = 4;
    })
    .await;
    let short = gw.infer("spin-share", &x(0.001)).await;
    assert_eq!(short.status, 200, "{}", short.text());
    // About a second of spinning each, taking turns on the version's core.
    let long: Vec<_> = (0..3)
        .map(|_| gw.spawn_infer("spin-share", &x(1000.0)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let calls: Vec<_> = (0..2)
            // Long enough (tens of ms) for the two to overlap.
            .map(|_| gw.spawn_infer("spin-other", &x(50.0)))
            .collect();
        for call in calls {
            let reply = call.await.expect("request task");
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
    }
    for call in long {
        let reply = call.await.expect("request task");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}
