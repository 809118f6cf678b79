//! Instructions per request on the hot path, counted by callgrind: a figure
//! that does not move with the machine's noise.
//!
//!     cargo bench --bench instructions
//!
//! The benchmark runs itself twice under `valgrind --tool=callgrind`, each
//! time starting an in-process gateway (champion only, ttm-rules-v1) and
//! sending N and 2N sequential requests over one keep-alive connection; the
//! difference of the two totals divided by N is what one request costs,
//! start-up excluded. Threads that sleep on wall time are not counted
//! (see `count`). Needs valgrind (Debian's package); without it, says so
//! and exits.

use std::process::Command;

use bytes::Bytes;
use gateway::server;

mod common;
use common::Connection;

const N: usize = 300;
const CHILD: &str = "GATEWAY_INSTRUCTIONS_CHILD";

/// Under callgrind: serve, send `n` requests, stop.
fn child(n: usize) {
    // The binary's allocator, without the purges and collections that
    // run on wall time (valgrind stretches it, so they would run many
    // times more often per request than natively).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio");
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("m.toml"),
        "model = \"m\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n",
    )
    .expect("policy");
    let mut options = common::gateway_options(dir.path());
    // valgrind cannot reserve the pooling allocator's default address space
    // (256 sandboxes with guard regions); one request at a time needs two.
    options.runtime.max_instances = 2;
    options.runtime.max_memory_bytes = 64 << 20;
    rt.block_on(async {
        let server = server::start(options).await.expect("gateway");
        let mut connection = Connection::open(server.local_addr()).await;
        let body = Bytes::from_static(
            br#"{"inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,2,4,1]}]}"#,
        );
        for _ in 0..n {
            connection
                .send("/v2/models/m/infer", &body)
                .await
                .expect("200");
        }
        server.shutdown().await;
    });
}

/// Instructions (Ir) of one callgrind run with `n` requests, on every
/// thread but those that sleep on wall time (the epoch ticker, metrics
/// upkeep): valgrind runs the process tens of times slower, so those wake
/// far more often per request than they do natively, and they made runs of
/// one build differ by up to 25 %.
fn count(n: usize) -> Option<u64> {
    let dir = tempfile::tempdir().ok()?;
    let out_file = dir.path().join("callgrind.out");
    let status = Command::new("valgrind")
        .args(["--tool=callgrind", "--quiet", "--separate-threads=yes"])
        .arg(format!("--callgrind-out-file={}", out_file.display()))
        .arg(std::env::current_exe().ok()?)
        .env(CHILD, n.to_string())
        .status()
        .ok()?;
    if !status.success() {
        return None;
    }
    let mut total = 0;
    // One file per thread: callgrind.out-01, -02, ...
    for entry in std::fs::read_dir(dir.path()).ok()? {
        let text = std::fs::read_to_string(entry.ok()?.path()).ok()?;
        let on_wall_time = text.lines().any(|l| {
            (l.starts_with("fn=") || l.starts_with("cfn="))
                && (l.ends_with(" std::thread::functions::sleep")
                    || l.ends_with(" std::thread::sleep"))
        });
        if on_wall_time {
            continue;
        }
        // The file without a thread suffix is empty.
        total += text
            .lines()
            .find_map(|l| {
                l.strip_prefix("totals:")
                    .or_else(|| l.strip_prefix("summary:"))
            })
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

fn main() {
    if let Ok(n) = std::env::var(CHILD) {
        child(n.parse().expect("a request count"));
        return;
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("valgrind is not installed: no instruction counts (apt-get install valgrind)");
        return;
    }
    let (Some(one), Some(two)) = (count(N), count(2 * N)) else {
        println!("callgrind did not run to the end");
        return;
    };
    let per_request = two.saturating_sub(one) / N as u64;
    let md = format!(
        "| what | instructions |\n|---|---:|\n| start-up + {N} requests | {one} |\n| start-up + {} requests | {two} |\n| one request (difference / {N}) | {per_request} |\n",
        2 * N
    );
    common::write_results("instructions", &md, None);
}
