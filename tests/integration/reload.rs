//! Live reload: by `POST /admin/reload`, by the file watcher and by SIGHUP
//! to the real binary. A reload under load loses no request, a broken
//! folder is refused while the old routing keeps serving, unchanged plugins
//! are not recompiled, and the admin API needs its token.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{ADMIN_TOKEN, Binary, TestGateway, fp32_request, send};

fn policy(champion: &str, canary: Option<(&str, f64)>) -> String {
    let mut text = format!(
        "model = \"live\"\nchampion = \"{champion}\"\n\
         [versions.v1]\nplugin = \"ttm-rules-v1\"\n\
         [versions.v2]\nplugin = \"ttm-rules-v2\"\n\
         [versions.v3]\nplugin = \"ttm-rules-v3\"\n"
    );
    if let Some((version, percent)) = canary {
        text += &format!("[canary]\nversion = \"{version}\"\npercent = {percent}\n");
    }
    text
}

fn request() -> Value {
    fp32_request("pr_features", &[1, 6], &[1.0, 10.0, 5.0, 1.0, 0.0, 1.0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_load_loses_no_request() {
    let gw = TestGateway::start(&[("live.toml", &policy("v1", None))]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..3 {
        let mut client = gw.client().await;
        let (stop, answered) = (stop.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            let mut versions = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = client.post("/v2/models/live/infer", &request(), &[]).await;
                assert_eq!(
                    reply.status,
                    200,
                    "a request failed during reloads: {}",
                    reply.text()
                );
                versions.insert(
                    reply
                        .header("x-model-version")
                        .unwrap_or_default()
                        .to_string(),
                );
                answered.fetch_add(1, Ordering::Relaxed);
            }
            versions
        }));
    }
    let steps = [
        policy("v1", Some(("v2", 50.0))),
        policy("v2", None),
        policy("v3", Some(("v1", 100.0))),
        policy("v1", Some(("v3", 10.0))),
        policy("v2", Some(("v1", 0.0))),
    ];
    for (i, text) in steps.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        gw.write_policy("live.toml", text);
        let reply = gw.reload().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["generation"], json!(i + 2));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for task in load {
        versions.extend(task.await.expect("load task"));
    }
    assert!(
        answered.load(Ordering::Relaxed) > 100,
        "too little load to mean anything"
    );
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        vec!["v1", "v2", "v3"]
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_policy_reloads_total",
            &[("outcome", "success"), ("trigger", "admin")]
        ),
        5.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_folder_is_refused_and_the_old_routing_keeps_serving() {
    let gw = TestGateway::start(&[("live.toml", &policy("v1", Some(("v2", 100.0))))]).await;
    let before = gw.metrics().await;
    for broken in [
        policy("v1", Some(("v2", 100.0)))
            .replace("plugin = \"ttm-rules-v3\"", "plugn = \"ttm-rules-v3\""),
        policy("v1", Some(("v2", 150.0))),
        policy("v9", None),
        policy("v1", None).replace("ttm-rules-v3", "no-such-plugin"),
        "model = \"live\"\nchampion = [".to_string(),
    ] {
        gw.write_policy("live.toml", &broken);
        let reply = gw.reload().await;
        assert_eq!(reply.status, 422, "{}", reply.text());
        let body = reply.json();
        let error = body["error"].as_str().unwrap();
        assert!(
            error.starts_with("reload refused, 1 problem(s); still serving generation 1: "),
            "{error}"
        );
        let problem = body["problems"][0].as_str().unwrap();
        assert!(
            problem.contains("live.toml:"),
            "the problem does not name the file and line: {problem}"
        );
        // Still the old routing: everything to the canary v2.
        let answer = gw.infer("live", &request()).await;
        assert_eq!(
            (answer.status, answer.header("x-model-version")),
            (200, Some("v2"))
        );
    }
    assert_eq!(gw.policies_view().await["generation"], 1);
    // Another file in the folder breaking the folder is refused too.
    gw.write_policy("live.toml", &policy("v1", None));
    gw.write_policy("other.toml", &policy("v1", None));
    let reply = gw.reload().await;
    assert_eq!(reply.status, 422);
    assert!(
        reply.json()["problems"][0]
            .as_str()
            .unwrap()
            .contains("model `live` is already defined by")
    );
    let m = gw.metrics().await;
    let errors = |m: &crate::support::Metrics| {
        m.value(
            "gateway_policy_reloads_total",
            &[("outcome", "error"), ("trigger", "admin")],
        )
    };
    assert_eq!(errors(&m) - errors(&before), 6.0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_plugins_are_not_recompiled() {
    let gw = TestGateway::start(&[("live.toml", &policy("v1", None))]).await;
    gw.write_policy("live.toml", &policy("v1", Some(("v2", 5.0))));
    let reply = gw.reload().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let report = reply.json();
    assert_eq!(report["generation"], 2);
    assert_eq!(report["compiled"], json!([]));
    assert_eq!(report["reused"].as_array().unwrap().len(), 3);
    assert_eq!(
        report["changes"],
        json!(["model `live`: canary added (v2 at 5% (sticky header x-routing-key))"])
    );

    // Nothing changed: nothing swapped.
    let same = gw.reload().await.json();
    assert_eq!(
        (same["generation"].clone(), same["changes"].clone()),
        (json!(2), json!([]))
    );

    // A plugin given by path whose file changes is recompiled.
    let copy = gw.policy_dir().join("copy.wasm");
    let built = std::path::Path::new(gateway::artifacts::BUILT_PLUGIN_DIR);
    std::fs::copy(built.join("ttm-rules-v1.wasm"), &copy).unwrap();
    gw.write_policy(
        "live.toml",
        &policy("v1", None).replace("\"ttm-rules-v3\"", "\"copy.wasm\""),
    );
    let reply = gw.reload().await.json();
    assert_eq!(reply["compiled"].as_array().unwrap().len(), 1, "{reply}");
    std::fs::copy(built.join("ttm-rules-v2.wasm"), &copy).unwrap();
    let reply = gw.reload().await.json();
    assert_eq!(reply["compiled"].as_array().unwrap().len(), 1, "{reply}");
    assert!(
        reply["changes"][0]
            .as_str()
            .unwrap()
            .starts_with("model `live`: version `v3`: plugin `copy`"),
        "{reply}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_shows_routing_and_needs_its_token() {
    let gw = TestGateway::start(&[("live.toml", &policy("v1", Some(("v2", 12.5))))]).await;
    let view = gw.policies_view().await;
    assert_eq!(view["generation"], 1);
    let model = &view["models"][0];
    assert_eq!(model["model"], "live");
    assert_eq!(model["champion"], "v1");
    assert_eq!(
        model["canary"],
        json!({"version": "v2", "percent": 12.5, "sticky_header": "x-routing-key"})
    );
    assert_eq!(model["shadow"], Value::Null);
    assert_eq!(model["versions"][0]["name"], "v1");
    assert_eq!(model["versions"][0]["plugin"], "ttm-rules-v1");
    assert_eq!(model["versions"][0]["timeout_ms"], 1000);

    for (method, path) in [
        (http::Method::GET, "/admin/policies"),
        (http::Method::POST, "/admin/reload"),
    ] {
        for auth in [None, Some("Bearer wrong"), Some(ADMIN_TOKEN)] {
            let mut request = http::Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", "x");
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let reply = send(
                gw.admin,
                request
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap(),
            )
            .await;
            reply.assert_error(
                401,
                &["the admin API needs `Authorization: Bearer <admin token>`"],
            );
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_policy_file_reloads_it() {
    let gw = TestGateway::start_watching(&[("live.toml", &policy("v1", None))]).await;
    assert_eq!(
        gw.infer("live", &request()).await.header("x-model-version"),
        Some("v1")
    );
    gw.write_policy("live.toml", &policy("v3", None));
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.infer("live", &request()).await.header("x-model-version") != Some("v3") {
        assert!(Instant::now() < deadline, "the edit was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken edit is refused; the last good policy keeps serving.
    gw.write_policy(
        "live.toml",
        "model = \"live\"\nchampion = \"v3\"\n[versions.v3]\nplugin = 7\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metrics().await.value(
        "gateway_policy_reloads_total",
        &[("outcome", "error"), ("trigger", "file")],
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "the broken edit was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        gw.infer("live", &request()).await.header("x-model-version"),
        Some("v3")
    );
    gw.shutdown().await;
}

/// The real binary: SIGHUP reloads, `--admin-token` from the environment.
#[test]
fn sighup_reloads_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("live.toml"), policy("v1", None)).unwrap();
    let mut gateway = Binary::start(
        [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
            "--drain-delay-secs",
            "0",
            "--policies",
            dir.path().to_str().unwrap(),
        ],
        &[("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)],
        1,
    );
    let addr = gateway.addresses[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let version = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let request = http::Request::post("/v2/models/live/infer")
                .header("host", "x")
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    request().to_string(),
                )))
                .unwrap();
            send(addr, request)
                .await
                .header("x-model-version")
                .map(str::to_string)
        })
    };
    assert_eq!(version(&rt).as_deref(), Some("v1"));
    std::fs::write(dir.path().join("live.toml"), policy("v2", None)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        version(&rt).as_deref(),
        Some("v1"),
        "--no-watch still reloaded"
    );
    gateway.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(&rt).as_deref() != Some("v2") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    gateway.signal("TERM");
    let exit = gateway.child.wait().unwrap();
    assert!(exit.success(), "the gateway exited with {exit} on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_whose_info_never_returns_is_refused_while_the_rest_serves() {
    let gw = TestGateway::start(&[("live.toml", &policy("v1", None))]).await;
    gw.write_policy(
        "stuck.toml",
        "model = \"stuck\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"info-loop\"\n",
    );
    let reload = {
        let gw_addr = gw.admin;
        tokio::spawn(async move {
            let request = http::Request::post("/admin/reload")
                .header("host", gw_addr.to_string())
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            send(gw_addr, request).await
        })
    };
    // While info() loops, until its load deadline, the old policies serve.
    let mut served = 0;
    while !reload.is_finished() {
        let answer = gw.infer("live", &request()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        served += 1;
    }
    assert!(served > 10, "only {served} requests while the reload ran");
    let reply = reload.await.unwrap();
    assert_eq!(reply.status, 422, "{}", reply.text());
    let problem = reply.json()["problems"][0].as_str().unwrap().to_string();
    assert!(
        problem.contains("stuck.toml")
            && problem
                .contains("failed in info(): it did not finish within its deadline of 5000 ms"),
        "{problem}"
    );
    assert_eq!(gw.infer("live", &request()).await.status, 200);
    assert_eq!(gw.infer("stuck", &request()).await.status, 404);
    gw.shutdown().await;
}

/// Waits until the champion answering `live` is `version`.
async fn until_serving(gw: &TestGateway, version: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.infer("live", &request()).await.header("x-model-version") != Some(version) {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What Kubernetes does to a mounted ConfigMap: the files are symlinks
/// into `..data`, itself a symlink to a timestamped folder, and an update
/// writes a new folder and renames a new `..data` link over the old one.
/// No event names a `*.toml`; the watcher reloads anyway.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_is_picked_up() {
    use std::os::unix::fs::symlink;
    let dir = crate::support::policy_folder();
    let root = dir.path();
    std::fs::create_dir(root.join("..2026_12_02_first")).unwrap();
    std::fs::write(
        root.join("..2026_12_02_first/live.toml"),
        policy("v1", None),
    )
    .unwrap();
    symlink("..2026_12_02_first", root.join("..data")).unwrap();
    symlink("..data/live.toml", root.join("live.toml")).unwrap();
    let gw = TestGateway::start_watching_in(dir).await;
    until_serving(&gw, "v1", "the first version was not served").await;

    let root = gw.policy_dir().to_path_buf();
    std::fs::create_dir(root.join("..2026_12_02_second")).unwrap();
    std::fs::write(
        root.join("..2026_12_02_second/live.toml"),
        policy("v3", None),
    )
    .unwrap();
    symlink("..2026_12_02_second", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..2026_12_02_first")).unwrap();
    until_serving(&gw, "v3", "the ConfigMap update was not picked up").await;
    gw.shutdown().await;
}

/// The policy folder deleted: the watcher says so (a metric and a log
/// line), the last good policies keep serving; the folder recreated: it
/// is watched and read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_survives_its_folder_being_deleted_and_recreated() {
    let gw = TestGateway::start_watching(&[("live.toml", &policy("v1", None))]).await;
    let dir = gw.policy_dir().to_path_buf();
    assert_eq!(
        gw.metrics().await.value("gateway_policy_watch_up", &[]),
        1.0
    );
    std::fs::remove_dir_all(&dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metrics().await.value("gateway_policy_watch_up", &[]) != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a folder that is gone was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        gw.infer("live", &request()).await.header("x-model-version"),
        Some("v1"),
        "the last good policies stop serving"
    );
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("live.toml"), policy("v2", None)).unwrap();
    until_serving(&gw, "v2", "the recreated folder was not read").await;
    assert_eq!(
        gw.metrics().await.value("gateway_policy_watch_up", &[]),
        1.0
    );
    // And it is watched again.
    std::fs::write(dir.join("live.toml"), policy("v3", None)).unwrap();
    until_serving(&gw, "v3", "an edit after the recreation was not picked up").await;
    gw.shutdown().await;
}

/// A folder emptied (or synced halfway) would unload every model: that
/// reload is refused, by the watcher and by the admin API alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptying_the_policy_folder_unloads_nothing() {
    let gw = TestGateway::start_watching(&[("live.toml", &policy("v1", None))]).await;
    std::fs::remove_file(gw.policy_dir().join("live.toml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.metrics().await.value(
        "gateway_policy_reloads_total",
        &[("outcome", "error"), ("trigger", "file")],
    ) < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the emptied folder was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = gw.reload().await;
    assert_eq!(refused.status, 422);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("has no policy files left"),
        "{}",
        refused.text()
    );
    assert_eq!(gw.infer("live", &request()).await.status, 200);
    gw.shutdown().await;
}

/// A plugin file a policy names is watched: replacing it reloads (and
/// recompiles) without any policy file changing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_plugin_file_is_reloaded() {
    let plugins = tempfile::tempdir().unwrap();
    let file = plugins.path().join("live.wasm");
    let built = std::path::Path::new(gateway::artifacts::BUILT_PLUGIN_DIR);
    std::fs::copy(built.join("ttm-rules-v1.wasm"), &file).unwrap();
    let text = format!(
        "model = \"live\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"{}\"\n",
        file.display()
    );
    let gw = TestGateway::start_watching(&[("live.toml", &text)]).await;
    let compiled = |m: &crate::support::Metrics| m.value("gateway_plugin_compilations_total", &[]);
    let before = compiled(&gw.metrics().await);
    // Written to a new name and renamed over the old one, as deploy tools do.
    let staged = plugins.path().join(".live.wasm.tmp");
    std::fs::copy(built.join("ttm-rules-v2.wasm"), &staged).unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while compiled(&gw.metrics().await) <= before {
        assert!(
            Instant::now() < deadline,
            "the new plugin file was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = gw.policies_view().await;
    assert_eq!(view["generation"], 2, "{view}");
    gw.shutdown().await;
}
