//! A fleet's rollouts: three gateways judge each rollout from the series
//! they all export, as a real Prometheus server (Debian's `prometheus`,
//! started here on loopback) scraped them, and follow one decision: the
//! same decisions, at the same boundaries, on the same figures. A replica
//! started again with no state recomputes where the rollout stands, and
//! an operator's action on one replica is carried out by all.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;

use crate::rollout::{infer, outcomes, policy, rollout};
use crate::support::{ADMIN_TOKEN, TestGateway};

/// A Prometheus server scraping the given targets every second, stopped
/// when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `prometheus` binary, or `None` (the test is skipped) when it is
/// missing and `GATEWAY_REQUIRE_TOOLCHAINS` is not set (`.ci/run`
/// installs it and sets it).
fn prometheus_binary() -> Option<String> {
    let binary = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    let present = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Some(binary);
    }
    let message = format!("{binary} is missing; install Debian's `prometheus` as .ci/run does");
    if std::env::var_os("GATEWAY_REQUIRE_TOOLCHAINS").is_some() {
        panic!("{message}");
    }
    eprintln!("SKIPPED {message}");
    None
}

/// A free loopback port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Prometheus {
    async fn start(binary: &str, port: u16, targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: gateway\n    authorization:\n      credentials: {ADMIN_TOKEN}\n    \
             static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).expect("write prometheus.yml");
        let child = std::process::Command::new(binary)
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        loop {
            let ready = tokio::time::timeout(Duration::from_secs(2), async {
                tokio::net::TcpStream::connect(addr).await.ok()?;
                let mut client = crate::support::Client::connect(addr).await;
                client.try_get("/-/ready").await.ok()
            })
            .await;
            if matches!(ready, Ok(Some(ref r)) if r.status == 200) {
                return prometheus;
            }
            assert!(Instant::now() < until, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What must be the same on every replica: each decision with its time,
/// step, percent, gate, reason and figures.
fn decisions(state: &Value) -> Value {
    state["decisions"].clone()
}

/// Every replica's state of `model`'s rollout, once all satisfy `done`.
async fn all_reach(
    replicas: &[TestGateway],
    model: &str,
    until: Instant,
    done: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    loop {
        let mut states = Vec::new();
        for gw in replicas {
            states.push(rollout(gw, model).await);
        }
        if states.iter().all(|s| s.as_ref().is_some_and(&done)) {
            return states.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < until,
            "the replicas' rollouts of {model} never got there: {states:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_a_real_prometheus_follow_one_decision() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let _alone = crate::machine::alone().await;
    // `good`'s candidate is as good as its champion; `bad`'s fails every
    // call (past its 20 ms deadline); `held` never has enough requests
    // to be judged, for the operator.
    let steps = |text: String| {
        text.replace("step_seconds = 0.2", "step_seconds = 3")
            .replace("step_requests = 5", "step_requests = 10")
    };
    let good = steps(policy("good", "ttm-rules-v1", "timeout_ms = 5000", ""));
    let bad = steps(policy(
        "bad",
        "slow-ttm",
        "timeout_ms = 20",
        "max_error_rate_increase = 0.05",
    ));
    let held = steps(policy("held", "ttm-rules-v1", "timeout_ms = 5000", ""))
        .replace("step_requests = 10", "step_requests = 1000000");
    let policies = [
        ("good.toml", good.as_str()),
        ("bad.toml", bad.as_str()),
        ("held.toml", held.as_str()),
    ];
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let fleet = |state_dir: Option<std::path::PathBuf>| {
        let url = url.clone();
        move |o: &mut gateway::server::ServeOptions| {
            o.rollout_tick = Duration::from_millis(100);
            o.state_dir = state_dir;
            o.fleet = Some(gateway::rollout::fleet::Settings {
                prometheus: gateway::http_url::HttpUrl::parse(&url).unwrap(),
                every: Duration::from_secs(1),
                delay: Duration::from_secs(3),
                // The job the test's Prometheus scrapes them as.
                matchers: gateway::rollout::fleet::Matchers::parse("job=\"gateway\"").unwrap(),
            });
        }
    };
    let state_dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &state_dirs {
        replicas.push(
            TestGateway::start_configured(&policies, fleet(Some(dir.path().to_path_buf()))).await,
        );
    }
    let admins: Vec<SocketAddr> = replicas.iter().map(|g| g.admin).collect();
    let prometheus = Prometheus::start(&binary, port, &admins).await;
    assert_eq!(prometheus.url, url);

    // Traffic to every replica in turn until `good` is promoted and `bad`
    // rolled back everywhere.
    let until = Instant::now() + Duration::from_secs(90);
    let mut i = 0;
    loop {
        let mut ended = true;
        for gw in &replicas {
            let good = rollout(gw, "good").await;
            let bad = rollout(gw, "bad").await;
            ended &= good.is_some_and(|s| s["status"] == "promoted")
                && bad.is_some_and(|s| s["status"] == "failed");
        }
        if ended {
            break;
        }
        assert!(Instant::now() < until, "the fleet's rollouts never ended");
        for _ in 0..5 {
            for (r, gw) in replicas.iter().enumerate() {
                let (status, _, _) = infer(&mut gw.client().await, "good", i * 3 + r).await;
                assert_eq!(status, 200, "request {i} to replica {r}");
                infer(&mut gw.client().await, "bad", i * 3 + r).await;
            }
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // One decision: the same on every replica, to the figures.
    for model in ["good", "bad"] {
        let states = all_reach(&replicas, model, until, |_| true).await;
        for state in &states[1..] {
            assert_eq!(decisions(state), decisions(&states[0]), "{model}");
        }
        let state = &states[0];
        assert_eq!(state["fleet"]["prometheus"], format!("{url}/"), "{state:#}");
        for d in state["decisions"].as_array().unwrap() {
            // Decided at boundaries: whole seconds.
            assert!(d["at"].as_str().unwrap().ends_with(".000000Z"), "{d:#}");
        }
    }
    let good = &all_reach(&replicas, "good", until, |_| true).await[0];
    assert_eq!(
        outcomes(good),
        ["started", "advanced", "advanced", "promoted"],
        "{good:#}"
    );
    // Every replica's requests are in the figures: more than any one
    // replica served of the candidate's share.
    eprintln!(
        "DEBUG {}",
        serde_json::to_string(&good["decisions"]).unwrap()
    );
    let first = &good["decisions"][1]["figures"];
    assert!(
        first["candidate"]["requests"].as_u64().unwrap() >= 10,
        "{first:#}"
    );
    let bad = &all_reach(&replicas, "bad", until, |_| true).await[0];
    assert_eq!(outcomes(bad), ["started", "rolled_back"], "{bad:#}");
    let decision = &bad["decisions"][1];
    assert_eq!(decision["gate"], "error_rate", "{decision:#}");
    assert_eq!(decision["step"], 0);
    assert_eq!(
        decision["figures"]["candidate"]["errors"], decision["figures"]["candidate"]["requests"],
        "{decision:#}"
    );
    // Each replica serves the split: the candidate as champion, or not
    // at all.
    for (r, gw) in replicas.iter().enumerate() {
        let mut client = gw.client().await;
        for k in 0..10 {
            let (_, version, _) = infer(&mut client, "good", 100_000 + k).await;
            assert_eq!(version, "v2", "replica {r}");
            let (_, version, _) = infer(&mut client, "bad", 100_000 + k).await;
            assert_eq!(version, "v1", "replica {r}");
        }
    }

    // A replica started again with no state recomputes where the rollouts
    // stand, from Prometheus alone.
    let replica = replicas.remove(2);
    let reborn = replica.restart_configured(fleet(None)).await;
    replicas.push(reborn);
    let until = Instant::now() + Duration::from_secs(60);
    for model in ["good", "bad"] {
        let states = all_reach(&replicas, model, until, |s| {
            s["status"] == "promoted" || s["status"] == "failed"
        })
        .await;
        assert_eq!(decisions(&states[2]), decisions(&states[0]), "{model}");
    }

    // The operator pauses `held` on one replica: every replica pauses at
    // the same boundary; resumed on another, every replica runs again.
    let reply = replicas[0]
        .admin(Method::POST, "/admin/rollouts/held/pause")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.json()["requested"]["pause"].as_f64().is_some(),
        "{}",
        reply.text()
    );
    let states = all_reach(&replicas, "held", until, |s| s["status"] == "paused").await;
    for state in &states[1..] {
        assert_eq!(decisions(state), decisions(&states[0]));
    }
    let paused = states[0]["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(paused["outcome"], "paused");
    assert_eq!(paused["by"], "operator");
    // Not twice from the same replica's published request.
    let reply = replicas[1]
        .admin(Method::POST, "/admin/rollouts/held/pause")
        .await;
    assert_eq!(reply.status, 409, "{}", reply.text());
    let reply = replicas[1]
        .admin(Method::POST, "/admin/rollouts/held/resume")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let states = all_reach(&replicas, "held", until, |s| s["status"] == "running").await;
    for state in &states[1..] {
        assert_eq!(decisions(state), decisions(&states[0]));
    }
    assert_eq!(outcomes(&states[0]), ["started", "paused", "resumed"]);
    for gw in replicas {
        gw.shutdown().await;
    }
    drop(prometheus);
}
