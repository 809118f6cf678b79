//! Soak: good and hostile traffic at once, for minutes, against the real
//! binary (`gateway serve`), reporting what the good traffic got against a
//! quiet baseline measured in the same run, and the gateway's resident
//! memory over time.
//!
//!     cargo bench --bench soak [-- --seconds 600 --quiet-seconds 60
//!                                  --recovery-seconds 60 --connections 8
//!                                  --attacks loop,memory,...]
//!
//! Good traffic: `--connections` keep-alive clients sending one-row
//! requests to the example policy's `time-to-merge` (input rules, data
//! monitoring, champion v1, a 5 % canary to the ONNX v2), whose every
//! answered request is also shadowed to a slow challenger (`slow-ttm`).
//!
//! Phases: `quiet` (good traffic alone), `soak` (good traffic and every
//! attack below at once), `recovery` (good traffic alone again; the last
//! RSS reading at its end). Good clients and attackers run on threads of
//! their own, on the same cores as the gateway. The clients are closed-loop
//! (each sends its next request once answered): a stall shows as lost
//! throughput more than as p99. Attacks, each a few clients sending one request after
//! another: calls that loop until their deadline, calls that allocate
//! without bound, 1 MiB error texts, outputs over the version's cap, 100,000
//! rows that all break the input rules, 100,000-row batches for an
//! ONNX-only model, bodies that trickle until their read timeout, and
//! garbage (invalid JSON, an unknown model, an oversized header, a gzip
//! bomb).
//!
//! Results: stdout and `$CARGO_TARGET_DIR/soak.{md,json}`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::Connection;

const GOOD_PATH: &str = "/v2/models/time-to-merge/infer";
const GOOD_BODY: &str =
    r#"{"inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,4,1,2]}]}"#;
/// The read timeout the gateway gets, so trickled bodies end often.
const BODY_TIMEOUT_SECS: u64 = 2;

struct Args {
    seconds: u64,
    quiet_seconds: u64,
    recovery_seconds: u64,
    connections: usize,
    /// Only these attacks (all when empty).
    only: Vec<String>,
}

fn args() -> Args {
    let mut parsed = Args {
        seconds: 600,
        quiet_seconds: 60,
        recovery_seconds: 60,
        connections: 8,
        only: Vec::new(),
    };
    let number = |value: Option<String>, flag: &str| -> u64 {
        value
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"))
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => parsed.seconds = number(args.next(), "--seconds"),
            "--quiet-seconds" => parsed.quiet_seconds = number(args.next(), "--quiet-seconds"),
            "--recovery-seconds" => {
                parsed.recovery_seconds = number(args.next(), "--recovery-seconds")
            }
            "--connections" => parsed.connections = number(args.next(), "--connections") as usize,
            "--attacks" => {
                parsed.only = args
                    .next()
                    .map(|s| s.split(',').map(str::to_string).collect())
                    .expect("--attacks loop,memory,...")
            }
            // `cargo bench` passes `--bench`.
            _ => {}
        }
    }
    parsed
}

/// The policy folder: the example policy with a slow shadow challenger,
/// and one model per hostile plugin.
fn policies(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(dir.join("models")).expect("models folder");
    std::fs::copy(
        root.join("policies/models/ttm-v2.onnx"),
        dir.join("models/ttm-v2.onnx"),
    )
    .expect("copy the ONNX model");
    let example = std::fs::read_to_string(root.join("policies/time-to-merge.toml"))
        .expect("the example policy");
    let good = example
        + "\n[versions.slow]\nplugin = \"slow-ttm\"\n\
           \n[canary]\nversion = \"v2\"\npercent = 5\n\
           \n[shadow]\nversions = [\"slow\"]\n";
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).expect("write a policy");
    };
    write("time-to-merge.toml", &good);
    let single = |model: &str, serve: &str, limits: &str| {
        format!(
            "model = \"{model}\"\nchampion = \"v1\"\n[versions.v1]\n{serve}\n[limits]\n{limits}\n"
        )
    };
    write(
        "loop.toml",
        &single("loop", "plugin = \"spin-loop\"", "timeout_ms = 200"),
    );
    write(
        "hog.toml",
        &single("hog", "plugin = \"memory-hog\"", "memory_mebibytes = 64"),
    );
    write("loud.toml", &single("loud", "plugin = \"loud-error\"", ""));
    write(
        "echo.toml",
        &single("echo", "plugin = \"echo\"", "max_output_mebibytes = 1"),
    );
    write(
        "batch.toml",
        &single(
            "batch",
            "onnx = \"models/ttm-v2.onnx\"",
            "timeout_ms = 1000",
        ),
    );
}

/// The gateway process, stopped when dropped.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Gateway {
    fn start(dir: &Path) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["serve", "--no-watch", "--listen"])
            .arg(addr.to_string())
            .arg("--policies")
            .arg(dir)
            .args(["--body-read-timeout-secs", &BODY_TIMEOUT_SECS.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway");
        let gateway = Gateway { child, addr };
        let start = Instant::now();
        while common::once(addr, "GET", "/v2/health/ready", "").map(|(s, _)| s) != Some(200) {
            assert!(start.elapsed() < Duration::from_secs(120), "not ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        gateway
    }

    fn rss_kib(&self) -> u64 {
        common::rss_kib(self.child.id())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the attacks got: answers by attack and status (0: no answer), and
/// each attack's latencies (µs).
#[derive(Default)]
struct Outcomes {
    statuses: BTreeMap<(&'static str, u16), u64>,
    latencies: BTreeMap<&'static str, Vec<u32>>,
}

type Tally = Arc<Mutex<Outcomes>>;

fn record(tally: &Tally, attack: &'static str, status: u16, took: Duration) {
    let mut outcomes = tally.lock().expect("tally");
    *outcomes.statuses.entry((attack, status)).or_default() += 1;
    outcomes
        .latencies
        .entry(attack)
        .or_default()
        .push(micros(took));
}

fn micros(took: Duration) -> u32 {
    took.as_micros().min(u32::MAX as u128) as u32
}

/// Every request of the benchmark gives up after this long.
const PATIENCE: Duration = Duration::from_secs(30);

/// Good traffic's outcome: per second of the run, latencies (µs) of the
/// 200s, and the other statuses.
#[derive(Default)]
struct Good {
    latencies: BTreeMap<u64, Vec<u32>>,
    failures: BTreeMap<u16, u64>,
}

async fn good_client(
    addr: SocketAddr,
    start: Instant,
    stop: Arc<AtomicBool>,
    good: Arc<Mutex<Good>>,
) {
    let body = Bytes::from_static(GOOD_BODY.as_bytes());
    let mut connection = Connection::open(addr).await;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let result = tokio::time::timeout(PATIENCE, connection.post(GOOD_PATH, &[], &body))
            .await
            .ok()
            .flatten();
        let took = sent.elapsed();
        let failed = {
            let mut good = good.lock().expect("good traffic");
            match result {
                Some((200, _)) => {
                    good.latencies
                        .entry(sent.duration_since(start).as_secs())
                        .or_default()
                        .push(micros(took));
                    false
                }
                Some((status, _)) => {
                    *good.failures.entry(status).or_default() += 1;
                    false
                }
                None => {
                    *good.failures.entry(0).or_default() += 1;
                    true
                }
            }
        };
        if failed {
            connection = Connection::open(addr).await;
        }
    }
}

/// One attack: requests one after another on a keep-alive connection
/// (reopened whenever the gateway closes it).
struct Attack {
    name: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

async fn attacker(addr: SocketAddr, attack: Arc<Attack>, stop: Arc<AtomicBool>, tally: Tally) {
    let headers: Vec<(&str, &str)> = attack
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    let mut connection = Connection::open(addr).await;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let reply = connection.post(attack.path, &headers, &attack.body);
        let status = match tokio::time::timeout(PATIENCE, reply).await {
            Ok(Some((status, _))) => status,
            _ => 0,
        };
        record(&tally, attack.name, status, sent.elapsed());
        if status == 0 || status >= 400 {
            // Refusals may close the connection; start afresh.
            connection = Connection::open(addr).await;
        }
    }
}

/// A body that trickles: the headers promise 1 KiB, a few bytes arrive,
/// then nothing until the gateway gives up (408).
async fn trickler(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Tally) {
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let status = async {
            let mut stream = TcpStream::connect(addr).await.ok()?;
            let head = format!(
                "POST {GOOD_PATH} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 1024\r\n\r\n{{\"inputs\":"
            );
            stream.write_all(head.as_bytes()).await.ok()?;
            let mut reply = vec![0; 4096];
            let n = tokio::time::timeout(
                Duration::from_secs(BODY_TIMEOUT_SECS * 5),
                stream.read(&mut reply),
            )
            .await
            .ok()?
            .ok()?;
            let text = String::from_utf8_lossy(&reply[..n]).into_owned();
            text.split(' ').nth(1)?.parse::<u16>().ok()
        }
        .await
        .unwrap_or(0);
        record(&tally, "slow-body", status, sent.elapsed());
    }
}

fn fp32_body(name: &str, shape: &[usize], value: &str) -> Bytes {
    let count: usize = shape.iter().product();
    let mut body = format!(
        "{{\"inputs\":[{{\"name\":\"{name}\",\"shape\":{shape:?},\"datatype\":\"FP32\",\"data\":["
    );
    body.reserve(count * (value.len() + 1));
    for i in 0..count {
        if i > 0 {
            body.push(',');
        }
        body.push_str(value);
    }
    body.push_str("]}]}");
    Bytes::from(body)
}

/// A request for the echo plugin (one input of each datatype) whose UINT8
/// input has `n` elements: its output is as large.
fn echo_body(n: usize) -> Bytes {
    let mut inputs: Vec<serde_json::Value> = [
        ("bool", "BOOL"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("fp64", "FP64"),
        ("bytes", "BYTES"),
    ]
    .into_iter()
    .map(|(name, datatype)| {
        serde_json::json!({"name": name, "shape": [0], "datatype": datatype, "data": []})
    })
    .collect();
    inputs
        .push(serde_json::json!({"name": "fp32", "shape": [0, 0], "datatype": "FP32", "data": []}));
    inputs.push(
        serde_json::json!({"name": "uint8", "shape": [n], "datatype": "UINT8", "data": vec![1; n]}),
    );
    Bytes::from(serde_json::json!({ "inputs": inputs }).to_string())
}

fn attacks() -> Vec<(Attack, usize)> {
    let gzip_bomb = {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&zeros).expect("compress");
        }
        Bytes::from(encoder.finish().expect("compress"))
    };
    let attack = |name, path, body| Attack {
        name,
        path,
        headers: vec![],
        body,
    };
    let x = || fp32_body("x", &[1], "-1");
    vec![
        (attack("loop", "/v2/models/loop/infer", x()), 2),
        (attack("memory", "/v2/models/hog/infer", x()), 2),
        (attack("loud-error", "/v2/models/loud/infer", x()), 1),
        (
            attack("huge-output", "/v2/models/echo/infer", echo_body(1_200_000)),
            1,
        ),
        (
            attack(
                "violations",
                GOOD_PATH,
                fp32_body("pr_features", &[100_000, 6], "-1"),
            ),
            2,
        ),
        (
            attack(
                "onnx-batch",
                "/v2/models/batch/infer",
                fp32_body("pr_features", &[100_000, 6], "3"),
            ),
            2,
        ),
        (
            attack(
                "invalid-json",
                GOOD_PATH,
                Bytes::from_static(b"{\"inputs\":[{\"name\":"),
            ),
            1,
        ),
        (
            attack(
                "unknown-model",
                "/v2/models/nobody/infer",
                Bytes::from_static(GOOD_BODY.as_bytes()),
            ),
            1,
        ),
        (
            Attack {
                name: "huge-header",
                path: GOOD_PATH,
                headers: vec![("x-padding", "a".repeat(16 << 10))],
                body: Bytes::from_static(GOOD_BODY.as_bytes()),
            },
            1,
        ),
        (
            Attack {
                name: "gzip-bomb",
                path: GOOD_PATH,
                headers: vec![("content-encoding", "gzip".into())],
                body: gzip_bomb,
            },
            1,
        ),
    ]
}

/// Sums of `metric` from a Prometheus text, by the value of `label`.
fn by_label(metrics: &str, metric: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    let key = format!("{label}=\"");
    for line in metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(rest) = series.split_once(&key).map(|(_, r)| r) else {
            continue;
        };
        let Some(name) = rest.split('"').next() else {
            continue;
        };
        *sums.entry(name.to_string()).or_default() += value.parse::<f64>().unwrap_or(0.0);
    }
    sums
}

/// What freed sandbox slots keep resident, by kind (memory, table, stack).
fn resident_by_kind(metrics: &str) -> BTreeMap<String, f64> {
    by_label(metrics, "gateway_sandbox_pool_resident_bytes", "kind")
}

fn pool_resident(addr: SocketAddr) -> BTreeMap<String, f64> {
    let metrics = common::once(addr, "GET", "/metrics", "")
        .map(|(_, b)| b)
        .unwrap_or_default();
    resident_by_kind(&metrics)
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at] as f64 / 1000.0
}

/// Throughput (requests/s) and p99 (ms) of the 200s in seconds `from..to`.
fn summary(good: &Good, from: u64, to: u64) -> (f64, f64, usize) {
    let mut all: Vec<u32> = good
        .latencies
        .range(from..to)
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    all.sort_unstable();
    let seconds = (to - from).max(1) as f64;
    (all.len() as f64 / seconds, quantile(&all, 0.99), all.len())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let args = args();
    let dir = tempfile::tempdir().expect("temp dir");
    policies(dir.path());
    let gateway = Gateway::start(dir.path());
    let addr = gateway.addr;
    // Good clients and attackers on threads of their own: reading a
    // multi-MB answer for an attacker never delays a good client's request.
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let attackers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("attackers")
        .enable_all()
        .build()
        .expect("attackers' runtime");

    let good = Arc::new(Mutex::new(Good::default()));
    let tally: Tally = Arc::default();
    let start = Instant::now();
    let stop_good = Arc::new(AtomicBool::new(false));
    let stop_hostile = Arc::new(AtomicBool::new(false));
    let mut rss: Vec<(u64, u64)> = Vec::new();
    let quiet_end = args.quiet_seconds;
    let soak_end = quiet_end + args.seconds;
    let recovery_end = soak_end + args.recovery_seconds;
    eprintln!(
        "soak: {} s quiet, {} s soak, {} s recovery, gateway on {addr}",
        args.quiet_seconds, args.seconds, args.recovery_seconds
    );
    let (rss_start, pool_start) = client.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            tasks.push(tokio::spawn(good_client(
                addr,
                start,
                stop_good.clone(),
                good.clone(),
            )));
        }
        let sample = |rss: &mut Vec<(u64, u64)>| {
            rss.push((start.elapsed().as_secs(), gateway.rss_kib()));
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while start.elapsed() < Duration::from_secs(quiet_end) {
            tick.tick().await;
            sample(&mut rss);
        }
        let rss_start = gateway.rss_kib();
        let pool_start = pool_resident(addr);
        eprintln!(
            "soak: quiet phase done, RSS {:.0} MiB; attacking",
            mib(rss_start)
        );
        let chosen = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
        for (attack, clients) in attacks().into_iter().filter(|(a, _)| chosen(a.name)) {
            let attack = Arc::new(attack);
            for _ in 0..clients {
                tasks.push(attackers.spawn(attacker(
                    addr,
                    attack.clone(),
                    stop_hostile.clone(),
                    tally.clone(),
                )));
            }
        }
        for _ in 0..if chosen("slow-body") { 8 } else { 0 } {
            tasks.push(attackers.spawn(trickler(addr, stop_hostile.clone(), tally.clone())));
        }
        while start.elapsed() < Duration::from_secs(soak_end) {
            tick.tick().await;
            sample(&mut rss);
            let now = start.elapsed().as_secs();
            if now.is_multiple_of(60) {
                eprintln!("soak: {now} s, RSS {:.0} MiB", mib(gateway.rss_kib()));
            }
        }
        // Recovery: the good traffic alone again.
        stop_hostile.store(true, Ordering::Relaxed);
        while start.elapsed() < Duration::from_secs(recovery_end) {
            tick.tick().await;
            sample(&mut rss);
        }
        stop_good.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = tokio::time::timeout(PATIENCE, task).await;
        }
        (rss_start, pool_start)
    });
    let rss_end = rss.last().map_or(0, |(_, kib)| *kib);
    let rss_peak = rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let metrics = common::once(addr, "GET", "/metrics", "")
        .map(|(_, b)| b)
        .unwrap_or_default();
    drop(gateway);

    let good = good.lock().expect("good traffic");
    let mut tally = tally.lock().expect("tally");
    let Outcomes {
        statuses,
        latencies,
    } = &mut *tally;
    // The first seconds of each phase warm up (connections, the attacks'
    // first calls); they are left out of the summaries.
    let warm = 5.min(args.quiet_seconds / 2);
    let (quiet_rps, quiet_p99, _) = summary(&good, warm, quiet_end);
    let (soak_rps, soak_p99, _) = summary(&good, quiet_end + warm, soak_end);
    let (after_rps, after_p99, _) = summary(&good, soak_end + warm, recovery_end);
    let served: usize = good.latencies.values().map(Vec::len).sum();
    let failed: u64 = good.failures.values().sum();

    let mut md = format!(
        "Soak: {} s of good and hostile traffic (quiet baseline {} s, recovery {} s), {} good connections.\n\n\
         | good traffic | requests/s | p99 |\n|---|---:|---:|\n\
         | quiet | {quiet_rps:.0} | {quiet_p99:.2} ms |\n\
         | during the attacks | {soak_rps:.0} ({:.2} of quiet) | {soak_p99:.2} ms ({:.2}x quiet) |\n\
         | after them | {after_rps:.0} ({:.2} of quiet) | {after_p99:.2} ms ({:.2}x quiet) |\n\n\
         Good requests served: {served}; failed: {failed} {:?}.\n\n\
         RSS: {:.0} MiB at the start of the attacks, {:.0} MiB at the peak, {:.0} MiB after {} s of recovery ({:+.0} %).\n\n",
        args.seconds,
        args.quiet_seconds,
        args.recovery_seconds,
        args.connections,
        soak_rps / quiet_rps.max(1e-9),
        soak_p99 / quiet_p99.max(1e-9),
        after_rps / quiet_rps.max(1e-9),
        after_p99 / quiet_p99.max(1e-9),
        good.failures,
        mib(rss_start),
        mib(rss_peak),
        mib(rss_end),
        args.recovery_seconds,
        (rss_end as f64 / rss_start.max(1) as f64 - 1.0) * 100.0,
    );
    let pool_end = resident_by_kind(&metrics);
    md += &format!(
        "Of that, freed sandbox slots kept resident (by kind: {}): {:.1} MiB at the start of the attacks, {:.1} MiB at the end.\n\n",
        pool_end.keys().cloned().collect::<Vec<_>>().join(", "),
        pool_start.values().sum::<f64>() / f64::from(1 << 20),
        pool_end.values().sum::<f64>() / f64::from(1 << 20),
    );
    md += "| attack | answers by status | median latency |\n|---|---|---:|\n";
    let mut by_attack: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((name, status), n) in statuses.iter() {
        let status = if *status == 0 {
            "no answer".to_string()
        } else {
            status.to_string()
        };
        by_attack
            .entry(name)
            .or_default()
            .push(format!("{status}: {n}"));
    }
    for (name, statuses) in &by_attack {
        let times = latencies.entry(name).or_default();
        times.sort_unstable();
        md += &format!(
            "| {name} | {} | {:.1} ms |\n",
            statuses.join(", "),
            quantile(times, 0.5)
        );
    }
    let refused = by_label(&metrics, "gateway_refused_total", "reason");
    let plugin_errors = by_label(&metrics, "gateway_plugin_errors_total", "kind");
    md += &format!(
        "\nThe gateway's own count: refused by reason {refused:?}; plugin errors by kind {plugin_errors:?}.\n\n"
    );
    md += "| minute | good requests/s | good p99 | RSS |\n|---:|---:|---:|---:|\n";
    let end = rss.last().map(|(s, _)| *s).unwrap_or(0);
    for minute in 0..=end / 60 {
        let (from, to) = (minute * 60, (minute + 1) * 60);
        let (rps, p99, n) = summary(&good, from, to.min(soak_end).max(from + 1));
        let rss_max = rss
            .iter()
            .filter(|(s, _)| (from..to).contains(s))
            .map(|(_, k)| *k)
            .max()
            .unwrap_or(0);
        let phase = if to <= quiet_end {
            "quiet"
        } else if from < soak_end {
            "soak"
        } else {
            "recovery"
        };
        if n == 0 {
            md += &format!("| {minute} ({phase}) | - | - | {:.0} MiB |\n", mib(rss_max));
        } else {
            md += &format!(
                "| {minute} ({phase}) | {rps:.0} | {p99:.2} ms | {:.0} MiB |\n",
                mib(rss_max)
            );
        }
    }
    let json = serde_json::json!({
        "seconds": args.seconds,
        "quiet": { "requests_per_second": quiet_rps, "p99_ms": quiet_p99 },
        "soak": { "requests_per_second": soak_rps, "p99_ms": soak_p99 },
        "good_served": served,
        "good_failed": good.failures.iter().map(|(s, n)| (s.to_string(), *n)).collect::<BTreeMap<_, _>>(),
        "after": { "requests_per_second": after_rps, "p99_ms": after_p99 },
        "attacks": statuses.iter().map(|((a, s), n)| (format!("{a} {s}"), *n)).collect::<BTreeMap<_, _>>(),
        "refused": refused,
        "plugin_errors": plugin_errors,
        "rss_kib": { "start": rss_start, "peak": rss_peak, "end": rss_end },
        "sandbox_pool_resident_bytes": { "start": pool_start, "end": pool_end },
        "rss_over_time": rss,
    });
    common::write_results("soak", &md, Some(json.to_string()));
}
