//! The gateway's footprint: time from process start to ready, and resident
//! memory once ready, serving 1 and 10 model versions (each version its own
//! plugin file, so each is compiled), measured on the real binary.
//!
//!     cargo bench --bench footprint
//!
//! Each case starts `gateway serve` on a fresh policy folder, polls
//! `GET /v2/health/ready` every millisecond until it answers 200, reads
//! VmRSS from /proc, answers one request per version, reads VmRSS again, and
//! stops the process. Three runs per case; the median is reported.
//! Results: stdout and `$CARGO_TARGET_DIR/footprint.{md,json}`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

const RUNS: usize = 3;

/// The status of one request to the gateway on `port`.
fn request(port: u16, method: &str, path: &str, body: &str) -> Option<u16> {
    common::once(([127, 0, 0, 1], port).into(), method, path, body).map(|(status, _)| status)
}

/// A policy folder with `versions` versions of one model, each served by
/// its own copy of ttm-rules-v1 (so none is shared).
fn policies(dir: &Path, versions: usize) {
    let built = Path::new(gateway::artifacts::BUILT_PLUGIN_DIR).join("ttm-rules-v1.wasm");
    let mut text = String::from("model = \"m\"\nchampion = \"v0\"\n");
    for v in 0..versions {
        std::fs::copy(&built, dir.join(format!("p{v}.wasm"))).expect("copy plugin");
        text += &format!("[versions.v{v}]\nplugin = \"p{v}.wasm\"\n");
    }
    std::fs::write(dir.join("m.toml"), text).expect("write policy");
}

struct Sample {
    ready: Duration,
    rss_ready_kib: u64,
    rss_served_kib: u64,
}

fn run(versions: usize) -> Sample {
    let dir = tempfile::tempdir().expect("temp dir");
    policies(dir.path(), versions);
    let port = common::free_port();
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["serve", "--no-watch", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--policies")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway");
    loop {
        if request(port, "GET", "/v2/health/ready", "") == Some(200) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not ready in 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let ready = start.elapsed();
    let rss_ready_kib = common::rss_kib(child.id());
    let body = r#"{"inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,2,4,1]}]}"#;
    for v in 0..versions {
        let status = request(
            port,
            "POST",
            &format!("/v2/models/m/versions/v{v}/infer"),
            body,
        );
        assert_eq!(status, Some(200), "version v{v}");
    }
    let rss_served_kib = common::rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    Sample {
        ready,
        rss_ready_kib,
        rss_served_kib,
    }
}

fn median<T: Copy + Ord>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    let mut md = String::from(
        "| versions | start to ready | RSS when ready | RSS after one request each |\n|---:|---:|---:|---:|\n",
    );
    let mut json = Vec::new();
    for versions in [1usize, 10] {
        let samples: Vec<Sample> = (0..RUNS).map(|_| run(versions)).collect();
        let ready = median(samples.iter().map(|s| s.ready).collect());
        let rss_ready = median(samples.iter().map(|s| s.rss_ready_kib).collect());
        let rss_served = median(samples.iter().map(|s| s.rss_served_kib).collect());
        md += &format!(
            "| {versions} | {} ms | {:.1} MiB | {:.1} MiB |\n",
            ready.as_millis(),
            rss_ready as f64 / 1024.0,
            rss_served as f64 / 1024.0
        );
        json.push(serde_json::json!({
            "versions": versions,
            "ready_ms": ready.as_millis() as u64,
            "rss_ready_kib": rss_ready,
            "rss_served_kib": rss_served,
        }));
    }
    common::write_results(
        "footprint",
        &md,
        Some(serde_json::Value::Array(json).to_string()),
    );
}
