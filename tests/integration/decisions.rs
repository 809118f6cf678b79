//! The decision log: a record of every inference request and shadow call,
//! written by the real server, read back from its files, checked with
//! `gateway log verify` and found with `gateway log show` and
//! `GET /admin/decisions/{id}`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{Value, json};

use gateway::decisions::DecisionLogConfig;

use crate::support::{ADMIN_TOKEN, TestGateway, fp32_request, send};

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
percent = 50.0
sticky_header = "x-routing-key"

[shadow]
versions = ["v2"]
sample_percent = 100.0
"#;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn pr() -> Value {
    fp32_request("pr_features", &[1, 6], &[3.0, 40.0, 12.0, 2.0, 4.0, 1.0])
}

pub(crate) async fn start(
    policy: &str,
    log: &Path,
    configure: impl FnOnce(&mut DecisionLogConfig),
) -> TestGateway {
    let mut config = DecisionLogConfig::new(log.to_path_buf());
    configure(&mut config);
    TestGateway::start_configured(&[("ttm.toml", policy)], move |o| {
        o.decisions = Some(config);
    })
    .await
}

/// The log's records, oldest first, once `n` were written (the writer
/// runs beside the requests).
pub(crate) async fn records(gw: &TestGateway, dir: &Path, n: f64) -> Vec<Value> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let written = gw
            .metrics()
            .await
            .value("gateway_decisions_written_total", &[]);
        if written >= n {
            break;
        }
        assert!(Instant::now() < until, "{written} of {n} records written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    read_records(dir)
}

pub(crate) fn read_records(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    // Rotated files (`decisions-<seq>`) sort before the current one.
    files.sort_by_key(|p| (p.ends_with("decisions.jsonl"), p.clone()));
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

pub(crate) fn of<'a>(records: &'a [Value], id: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["request_id"] == id).collect()
}

fn gateway_log(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("log")
        .args(args)
        .output()
        .expect("run gateway log");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    gateway::contract::Sha256::of(bytes).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_leaves_a_decision_naming_its_artifacts() {
    let log = tempfile::tempdir().unwrap();
    let gw = start(POLICY, log.path(), |_| {}).await;
    let mut client = gw.client().await;

    // Answered, on a sticky key, in a trace.
    let answered = client
        .post(
            "/v2/models/ttm/infer",
            &pr(),
            &[
                ("x-request-id", "req-answered"),
                ("x-routing-key", "user-7"),
                ("traceparent", TRACEPARENT),
            ],
        )
        .await;
    assert_eq!(answered.status, 200, "{}", answered.text());
    assert_eq!(answered.header("x-request-id"), Some("req-answered"));
    let served_by = answered.header("x-model-version").unwrap().to_string();
    // Pinned; refused by the declaration; an unknown model; an id that
    // cannot be used; no id at all.
    let pinned = client
        .post(
            "/v2/models/ttm/versions/v1/infer",
            &pr(),
            &[("x-request-id", "req-pinned")],
        )
        .await;
    assert_eq!(pinned.status, 200);
    let wrong_shape = fp32_request("pr_features", &[1, 5], &[1.0; 5]);
    let refused = client
        .post(
            "/v2/models/ttm/versions/v1/infer",
            &wrong_shape,
            &[("x-request-id", "req-refused")],
        )
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    let unknown = client
        .post(
            "/v2/models/nope/infer",
            &pr(),
            &[("x-request-id", "req-unknown")],
        )
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.header("x-request-id"), Some("req-unknown"));
    let bad_id = client
        .post(
            "/v2/models/ttm/infer",
            &pr(),
            &[("x-request-id", "has spaces in it")],
        )
        .await;
    bad_id.assert_error(400, &["x-request-id", "visible ASCII"]);
    let made_id = bad_id.header("x-request-id").unwrap().to_string();
    assert_eq!(made_id.len(), 32, "a new id for the refused one");
    // The refusal closed that connection (its body was left unread).
    let mut client = gw.client().await;
    let anonymous = client
        .post("/v2/models/ttm/versions/v1/infer", &pr(), &[])
        .await;
    let anonymous_id = anonymous.header("x-request-id").unwrap().to_string();
    assert_eq!(anonymous_id.len(), 32);

    // Six requests, the last one's record written last of them (the
    // shadow copy may be shed on a busy machine, or still running: it is
    // looked at below if it ran).
    records(&gw, log.path(), 6.0).await;
    let until = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let records = read_records(log.path());
        if !of(&records, &anonymous_id).is_empty() {
            break records;
        }
        assert!(Instant::now() < until, "no record of the last request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let meta = gw.get("/v2/models/ttm/versions/v1").await.json();
    let v1_sha = meta["plugin"]["sha256"].as_str().unwrap().to_string();
    let policy_sha = sha256_hex(POLICY.as_bytes());

    let served = of(&records, "req-answered");
    let first = served.iter().find(|r| r["route"] != "shadow").unwrap();
    assert_eq!(first["schema"], 1);
    assert_eq!(first["model"], "ttm");
    assert_eq!(first["version"], served_by.as_str());
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["parent_id"], "00f067aa0ba902b7");
    // The sticky key's point decides, against the percent.
    let canary = &first["canary"];
    assert_eq!(canary["sticky"], true);
    assert_eq!(canary["percent"], 50.0);
    let point = canary["point"].as_f64().unwrap();
    assert_eq!(point, gateway::router::sticky_point("ttm", b"user-7"));
    assert_eq!(
        first["route"],
        if point < 50.0 { "canary" } else { "champion" }
    );
    assert_eq!(first["policy"]["generation"], 1);
    assert_eq!(first["policy"]["file"], "ttm.toml");
    assert_eq!(first["policy"]["sha256"], policy_sha.as_str());
    assert_eq!(first["validation"], "passed");
    assert_eq!(first["status"], 200);
    assert_eq!(first["inputs_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(first["outputs_sha256"].as_str().map(str::len), Some(64));
    assert_eq!(
        first["artifacts"]["plugin"]["reported_name"], "ttm-rules",
        "{first}"
    );

    let pinned = of(&records, "req-pinned");
    assert_eq!(pinned.len(), 1, "a pinned request is not shadowed");
    assert_eq!(pinned[0]["route"], "pinned");
    assert_eq!(pinned[0]["version"], "v1");
    assert!(pinned[0].get("canary").is_none());
    assert_eq!(pinned[0]["artifacts"]["plugin"]["sha256"], v1_sha.as_str());
    // The same inputs, the same digest, whichever version answered.
    assert_eq!(pinned[0]["inputs_sha256"], first["inputs_sha256"]);

    let refused = of(&records, "req-refused");
    assert_eq!(refused[0]["status"], 400);
    assert_eq!(refused[0]["validation"], "failed");
    assert_eq!(refused[0]["error_kind"], "validation");
    assert!(refused[0]["outputs_sha256"].is_null());

    let unknown = of(&records, "req-unknown");
    assert_eq!(unknown[0]["model"], "nope");
    assert_eq!(unknown[0]["route"], "none");
    assert_eq!(unknown[0]["status"], 404);
    assert!(unknown[0]["version"].is_null());

    let bad = of(&records, &made_id);
    assert_eq!(bad[0]["status"], 400);
    assert_eq!(bad[0]["error_kind"], "header");
    assert_eq!(of(&records, &anonymous_id)[0]["status"], 200);

    // Shadow copies carry the served request's id: at most one, of the
    // only answered unpinned request.
    let copies: Vec<&Value> = records.iter().filter(|r| r["route"] == "shadow").collect();
    assert!(copies.len() <= 1, "{copies:?}");
    for copy in copies {
        assert_eq!(copy["version"], "v2");
        // The only answered unpinned request.
        assert_eq!(copy["request_id"], "req-answered");
        assert_eq!(copy["inputs_sha256"], first["inputs_sha256"]);
    }

    // The admin API has the recent ones.
    let request = Request::get("/admin/decisions/req-pinned")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(gw.admin, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["decisions"][0]["version"], "v1");
    let request = Request::get("/admin/decisions/never-sent")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(gw.admin, request)
        .await
        .assert_error(404, &["gateway log show never-sent"]);
    gw.shutdown().await;

    // The command line reads the files.
    let dir = log.path().to_str().unwrap();
    let (ok, out) = gateway_log(&["verify", dir]);
    assert!(ok && out.starts_with("ok: "), "{out}");
    let (ok, out) = gateway_log(&["show", "req-pinned", "--dir", dir]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 1);
    // As written in the file, field order included.
    assert!(out.starts_with("{\"schema\":1,\"seq\":"), "{out}");
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["version"], "v1");
    assert_eq!(&shown, pinned[0]);
    let (ok, out) = gateway_log(&["show", "never-sent", "--dir", dir]);
    assert!(!ok && out.contains("no decision"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_finds_a_removed_or_changed_record_and_survives_restarts() {
    let log = tempfile::tempdir().unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    for round in 1..=2 {
        let gw = start(policy, log.path(), |_| {}).await;
        for _ in 0..5 {
            assert_eq!(gw.infer("ttm", &pr()).await.status, 200);
        }
        records(&gw, log.path(), 5.0).await;
        gw.shutdown().await;
        // A restart continues the chain: 5, then 10 records, one chain.
        let all = read_records(log.path());
        assert_eq!(all.len(), 5 * round);
        let seqs: Vec<u64> = all.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=5 * round as u64).collect::<Vec<_>>());
    }
    let dir = log.path().to_str().unwrap();
    let (ok, out) = gateway_log(&["verify", dir]);
    assert!(ok, "{out}");
    assert!(
        out.contains("10 records in 1 files, records 1 to 10"),
        "{out}"
    );

    let file = log.path().join("decisions.jsonl");
    let original = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = original.lines().collect();

    // A record removed.
    let mut removed = lines.clone();
    removed.remove(3);
    std::fs::write(&file, removed.join("\n") + "\n").unwrap();
    let (ok, out) = gateway_log(&["verify", dir]);
    assert!(!ok, "{out}");
    assert!(out.contains("line 4: record 5 follows record 3"), "{out}");

    // A record changed: the one after it no longer follows it.
    let mut changed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    changed[2] = changed[2].replace("\"status\":200", "\"status\":500");
    assert_ne!(changed[2], lines[2]);
    std::fs::write(&file, changed.join("\n") + "\n").unwrap();
    let (ok, out) = gateway_log(&["verify", dir]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 4: record 4 does not follow the line before it"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_chain_and_the_retention() {
    let log = tempfile::tempdir().unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    let gw = start(policy, log.path(), |c| {
        c.max_file_bytes = 4096;
        c.max_files = 2;
    })
    .await;
    for _ in 0..40 {
        assert_eq!(gw.infer("ttm", &pr()).await.status, 200);
    }
    records(&gw, log.path(), 40.0).await;
    gw.shutdown().await;
    let files: Vec<String> = std::fs::read_dir(log.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".jsonl"))
        .collect();
    assert_eq!(
        files.len(),
        3,
        "two rotated files and the current one: {files:?}"
    );
    for name in &files {
        let size = std::fs::metadata(log.path().join(name)).unwrap().len();
        assert!(size <= 4096, "{name}: {size} bytes");
    }
    let kept = read_records(log.path());
    let last = kept.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(last, 40);
    assert!(
        kept[0]["seq"].as_u64().unwrap() > 1,
        "the oldest files went"
    );
    let (ok, out) = gateway_log(&["verify", log.path().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("to 40"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_drops_and_counts_without_failing_requests() {
    let log = tempfile::tempdir().unwrap();
    // Every write fails with ENOSPC, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", log.path().join("decisions.jsonl")).unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    let gw = start(policy, log.path(), |_| {}).await;
    for _ in 0..20 {
        assert_eq!(gw.infer("ttm", &pr()).await.status, 200);
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let m = gw.metrics().await;
        let dropped = m.value(
            "gateway_decisions_dropped_total",
            &[("reason", "write_failed")],
        );
        if dropped == 20.0 {
            assert_eq!(m.value("gateway_decisions_written_total", &[]), 0.0);
            break;
        }
        assert!(Instant::now() < until, "{dropped} of 20 dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_drops_and_counts_without_slowing_requests() {
    let log = tempfile::tempdir().unwrap();
    // A pipe nobody reads: the writer blocks once it holds 64 KiB, as on
    // a disk that stopped answering.
    let fifo = log.path().join("decisions.jsonl");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    let gw = start(policy, log.path(), |c| c.buffer = 4).await;
    let mut client = gw.client().await;
    for i in 0..300 {
        let reply = client.post("/v2/models/ttm/infer", &pr(), &[]).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
    }
    let m = gw.metrics().await;
    let dropped = m.value(
        "gateway_decisions_dropped_total",
        &[("reason", "queue_full")],
    );
    assert!(dropped > 0.0, "the queue of 4 never filled: {dropped}");
    let written = m.value("gateway_decisions_written_total", &[]);
    assert!(dropped + written <= 300.0, "{dropped} + {written}");
    // The writer stays blocked (its thread ends with the test process);
    // the server stops regardless.
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_and_long_error_texts_are_recorded_within_bounds() {
    use tokio::io::AsyncWriteExt as _;
    let log = tempfile::tempdir().unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n\
                  [versions.spin]\nplugin = \"spin-loop\"\n[versions.spin.limits]\ntimeout_ms = 3000\n";
    let gw = start(policy, log.path(), |_| {}).await;

    // A client that goes away while its plugin computes (forever: a
    // negative count).
    let body = fp32_request("x", &[1], &[-1.0]).to_string();
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v2/models/ttm/versions/spin/infer HTTP/1.1\r\nhost: t\r\nx-request-id: gone\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);

    // A request whose error text would be megabytes: a tensor name of 100 KB.
    let long_name = "n".repeat(100_000);
    let reply = gw
        .post(
            "/v2/models/ttm/versions/v1/infer",
            json!({"inputs": [{"name": long_name, "shape": [1], "datatype": "FP32"}]}).to_string(),
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());

    let records = records(&gw, log.path(), 2.0).await;
    let gone = of(&records, "gone");
    assert_eq!(gone.len(), 1, "{records:?}");
    assert_eq!(gone[0]["status"], 499);
    assert_eq!(gone[0]["error_kind"], "abandoned");
    assert_eq!(gone[0]["version"], "spin");
    let long = records.iter().find(|r| r["status"] == 400).unwrap();
    let error = long["error"].as_str().unwrap();
    assert!(
        error.len() <= 1024 + 16 && error.ends_with("... (cut)"),
        "{} bytes",
        error.len()
    );
    gw.shutdown().await;
}

/// `--log-format json` and `--access-log`, from the real binary: one JSON
/// object per line, and a line per request carrying its id and trace.
#[test]
fn json_logs_and_the_access_log_carry_the_request_id() {
    use std::io::{BufRead, BufReader};
    let _machine = crate::machine::share();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-watch",
        ])
        .args(["--access-log", "100", "--policies"])
        .arg(crate::support::repo_root().join("policies"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start gateway");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let next = || {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("a log line");
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: std::net::SocketAddr = loop {
        let line = next();
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
        if line["message"] == "serving the V2 inference protocol" {
            break line["address"].as_str().unwrap().parse().unwrap();
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let reply = runtime.block_on(async {
        let mut client = crate::support::Client::connect(addr).await;
        client
            .post(
                "/v2/models/time-to-merge/infer",
                &pr(),
                &[("x-request-id", "logged-1"), ("traceparent", TRACEPARENT)],
            )
            .await
    });
    assert_eq!(reply.status, 200, "{}", reply.text());
    let access = loop {
        let line = next();
        if line["target"] == "gateway::access" {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(access["level"], "INFO");
    assert_eq!(access["message"], "request");
    assert_eq!(access["request_id"], "logged-1");
    assert_eq!(access["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(access["model"], "time-to-merge");
    assert_eq!(access["version"], "v1");
    assert_eq!(access["route"], "champion");
    assert_eq!(access["status"], 200);
    assert_eq!(access["suppressed"], 0);
    assert!(
        access["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{access}"
    );
}

/// The CloudEvents receiver (`tests/compat/cloudevents_receiver.py`, on
/// the CloudEvents SDK KServe uses), killed when dropped.
struct Receiver {
    child: std::process::Child,
    port: u16,
}

impl Receiver {
    fn start(fail: u32) -> Receiver {
        use std::io::BufRead as _;
        let python = std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = crate::support::repo_root().join("tests/compat/cloudevents_receiver.py");
        let mut child = Command::new(&python)
            .arg(script)
            .args(["--fail", &fail.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the CloudEvents receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the receiver did not start ({line:?}); it needs `{python} -m pip install -r tests/compat/requirements.txt`"
                )
            });
        Receiver { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    async fn received(&self) -> Value {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let request = Request::get("/events")
            .header("host", "127.0.0.1")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(addr, request).await.json()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_network_sink_delivers_every_record_as_a_cloudevent() {
    let log = tempfile::tempdir().unwrap();
    // The receiver refuses the first POST: the sink retries it.
    let receiver = Receiver::start(1);
    let url = gateway::decisions::SinkUrl::parse(&receiver.url()).unwrap();
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    let gw = start(policy, log.path(), |c| c.sink = Some(url)).await;
    let mut client = gw.client().await;
    for i in 0..40 {
        let id = format!("sent-{i}");
        let body = if i % 10 == 9 {
            fp32_request("pr_features", &[1, 5], &[1.0; 5])
        } else {
            pr()
        };
        client
            .post("/v2/models/ttm/infer", &body, &[("x-request-id", &id)])
            .await;
    }
    records(&gw, log.path(), 40.0).await;
    let until = Instant::now() + Duration::from_secs(30);
    let received = loop {
        let received = receiver.received().await;
        if received["events"].as_array().unwrap().len() >= 40 {
            break received;
        }
        assert!(Instant::now() < until, "received: {received}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The receiver keeps events before it answers; the gateway counts
    // them once it has the answer.
    let until = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = gw.metrics().await;
        if metrics.value("gateway_decisions_sent_total", &[]) >= 40.0 {
            break metrics;
        }
        assert!(
            Instant::now() < until,
            "the sink did not count its deliveries"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metrics.value("gateway_decisions_sent_total", &[]), 40.0);
    for reason in ["queue_full", "send_failed"] {
        assert_eq!(
            metrics.value(
                "gateway_decisions_sink_dropped_total",
                &[("reason", reason)]
            ),
            0.0
        );
    }
    gw.shutdown().await;
    assert_eq!(received["posts"]["failed"], 1, "{received}");

    // Every record of the file, once, in order, verbatim as the data.
    let file = std::fs::read_to_string(log.path().join("decisions.jsonl")).unwrap();
    let lines: Vec<&str> = file.lines().collect();
    let events = received["events"].as_array().unwrap();
    assert_eq!(events.len(), lines.len());
    for (event, line) in events.iter().zip(&lines) {
        let record: Value = serde_json::from_str(line).unwrap();
        let attributes = &event["attributes"];
        assert_eq!(attributes["specversion"], "1.0");
        assert_eq!(attributes["type"], "wasm-model-gateway.decision.v1");
        assert!(
            attributes["source"]
                .as_str()
                .unwrap()
                .starts_with("/wasm-model-gateway/"),
            "{attributes}"
        );
        assert_eq!(attributes["id"], sha256_hex(line.as_bytes()));
        assert_eq!(attributes["subject"], record["request_id"]);
        assert_eq!(attributes["time"], record["time"]);
        assert_eq!(attributes["datacontenttype"], "application/json");
        assert_eq!(event["data"], record);
    }
    let statuses: Vec<u64> = events
        .iter()
        .map(|e| e["data"]["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_that_hangs_or_refuses_costs_requests_nothing() {
    // One endpoint accepts connections and never answers; the other
    // refuses them (a port nobody listens on).
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in hanging.incoming().take(4) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(60));
        drop(held);
    });
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let policy = "model = \"ttm\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";
    for (addr, hangs) in [(hanging_addr, true), (closed_addr, false)] {
        let log = tempfile::tempdir().unwrap();
        let url = gateway::decisions::SinkUrl::parse(&format!("http://{addr}/")).unwrap();
        let gw = start(policy, log.path(), |c| c.sink = Some(url)).await;
        let mut client = gw.client().await;
        for _ in 0..200 {
            let reply = client.post("/v2/models/ttm/infer", &pr(), &[]).await;
            assert_eq!(reply.status, 200);
        }
        // The file has every record whatever the sink does.
        assert_eq!(records(&gw, log.path(), 200.0).await.len(), 200);
        if !hangs {
            // Refused three times (at once, then after 0.2 s and 1 s):
            // dropped and counted.
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                let dropped = gw.metrics().await.value(
                    "gateway_decisions_sink_dropped_total",
                    &[("reason", "send_failed")],
                );
                if dropped == 200.0 {
                    break;
                }
                assert!(dropped < 200.0 && Instant::now() < until, "{dropped}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(
                gw.metrics()
                    .await
                    .value("gateway_decisions_sent_total", &[]),
                0.0
            );
        }
        gw.shutdown().await;
    }
    drop(held);
}
