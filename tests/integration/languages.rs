//! Plugins in other languages: the time-to-merge size rules written in
//! Python (componentize-py), JavaScript (componentize-js with SpiderMonkey,
//! componentize-qjs with QuickJS) and C (wasi-libc,
//! `wit-bindgen c`, wasm-component-ld), built from
//! their sources in `plugins/<language>/` by this test, served through the
//! real gateway beside the Rust `ttm-rules-v1`, answering exactly what it
//! answers, passing `gateway plugin test`, and loading from the compile
//! cache on the next start.
//!
//! The toolchains come from the package registries (`.ci/run` installs
//! them and sets `GATEWAY_REQUIRE_TOOLCHAINS=1`, so a missing one fails
//! there); elsewhere a missing toolchain skips its test with a message.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{TestGateway, repo_root};

/// How to build one language's plugin.
struct Toolchain {
    /// The plugin's name and its folder under `plugins/`.
    name: &'static str,
    folder: &'static str,
    /// The command whose presence says the toolchain is installed.
    probe: &'static [&'static str],
}

const PYTHON: Toolchain = Toolchain {
    name: "ttm-rules-py",
    folder: "python/ttm-rules-py",
    probe: &["componentize-py", "--version"],
};

const JAVASCRIPT: Toolchain = Toolchain {
    name: "ttm-rules-js",
    folder: "javascript/ttm-rules-js",
    probe: &["COMPONENTIZE_JS", "--version"],
};

/// The same app.js, built with QuickJS instead of SpiderMonkey.
const QUICKJS: Toolchain = Toolchain {
    name: "ttm-rules-qjs",
    folder: "javascript/ttm-rules-qjs",
    probe: &["COMPONENTIZE_QJS", "--help"],
};

const C: Toolchain = Toolchain {
    name: "ttm-rules-c",
    folder: "c/ttm-rules-c",
    // The bindings generator, a clang that links wasm32-wasi against
    // wasi-libc, and the component linker.
    probe: &[
        "sh",
        "-c",
        "set -e; \"${WIT_BINDGEN:-wit-bindgen}\" --version; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; \
         printf '#include <stdio.h>\\nint main(void) { return puts(\"\") < 0; }\\n' > \"$d/p.c\"; \
         \"$(command -v clang-19 || command -v clang)\" --target=wasm32-wasi \"$d/p.c\" -o \"$d/p.wasm\"; \
         ls \"$(rustc --print sysroot)\"/lib/rustlib/*/bin/wasm-component-ld",
    ],
};

impl Toolchain {
    /// The toolchain's command, with `COMPONENTIZE_JS` read from the
    /// environment.
    fn probe_command_named(&self) -> Command {
        Command::new(match self.probe[0] {
            "COMPONENTIZE_JS" => {
                std::env::var("COMPONENTIZE_JS").unwrap_or_else(|_| "componentize-js".into())
            }
            "COMPONENTIZE_QJS" => {
                std::env::var("COMPONENTIZE_QJS").unwrap_or_else(|_| "componentize-qjs".into())
            }
            other => other.to_string(),
        })
    }

    /// The command that says whether the toolchain is installed.
    fn probe_command(&self) -> Command {
        let mut command = self.probe_command_named();
        command.args(&self.probe[1..]);
        command
    }

    /// Builds the plugin into `dir`; `None` (after saying why) where the
    /// toolchain is missing and not required.
    fn build(&self, dir: &Path) -> Option<PathBuf> {
        let present = self
            .probe_command()
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            let message = format!(
                "{}: toolchain missing ({}); install it as .ci/run does",
                self.name,
                self.probe.join(" ")
            );
            if std::env::var_os("GATEWAY_REQUIRE_TOOLCHAINS").is_some() {
                panic!("{message}");
            }
            eprintln!("SKIPPED {message}");
            return None;
        }
        let out = dir.join(format!("{}.wasm", self.name));
        let script = repo_root()
            .join("plugins")
            .join(self.folder)
            .join("build.sh");
        let _machine = crate::machine::share();
        let built = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run the build script");
        assert!(
            built.status.success(),
            "{} did not build:\n{}{}",
            self.name,
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
        Some(out)
    }
}

/// Pull requests of every bucket, and the edges between them.
const ROWS: [[f32; 6]; 10] = [
    [3.0, 40.0, 12.0, 2.0, 4.0, 1.0],
    [12.0, 3000.0, 500.0, 9.0, 31.0, 4.0],
    [1.0, 5.0, 5.0, 1.0, 0.0, 0.0],
    [2.0, 100.0, 50.0, 1.0, 25.0, 1.0],
    [5.0, 600.0, 300.0, 3.0, 2.0, 2.0],
    [40.0, 3000.0, 2500.0, 10.0, 3.0, 1.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [1.0, 20.0, 0.0, 1.0, 19.0, 0.0],
    [3.0, 10.5, 9.5, 1.0, 20.0, 0.0],
    [9.0, 4000.0, 1000.0, 7.0, 100.0, 9.0],
];

fn request(rows: &[[f32; 6]]) -> serde_json::Value {
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    json!({"inputs": [{"name": "pr_features", "shape": [rows.len(), 6], "datatype": "FP32", "data": data}]})
}

fn policy(plugin: &Path) -> String {
    format!(
        "model = \"ttm\"\nchampion = \"rust\"\n[versions.rust]\nplugin = \"ttm-rules-v1\"\n\
         [versions.other]\nplugin = \"{}\"\n",
        plugin.display()
    )
}

async fn start(plugin: &Path, cache: &Path) -> (TestGateway, Duration) {
    let started = Instant::now();
    let cache = cache.to_path_buf();
    let gw = TestGateway::start_configured(&[("ttm.toml", &policy(plugin))], move |o| {
        o.runtime.compile_cache = Some(cache);
    })
    .await;
    let took = started.elapsed();
    (gw, took)
}

/// Same answers as the Rust rules, batch and row by row; the same
/// refusal for a negative count.
async fn answers_as_rust(gw: &TestGateway) {
    let mut cases: Vec<Vec<[f32; 6]>> = vec![ROWS.to_vec(), Vec::new()];
    cases.extend(ROWS.iter().map(|r| vec![*r]));
    for rows in cases {
        let body = request(&rows).to_string();
        let rust = gw
            .post("/v2/models/ttm/versions/rust/infer", body.clone())
            .await;
        let other = gw.post("/v2/models/ttm/versions/other/infer", body).await;
        assert_eq!(rust.status, 200, "{}", rust.text());
        assert_eq!(other.status, 200, "{}", other.text());
        assert_eq!(
            other.json()["outputs"],
            rust.json()["outputs"],
            "rows {rows:?}"
        );
    }
    for (row, because) in [
        ([1.0, -3.0, 5.0, 1.0, 0.0, 1.0], "feature `additions` is -3"),
        (
            [1.0, 3.0, 5.0, 1.0, 0.0, -0.5],
            "feature `review_count` is -0.5",
        ),
        // Rust writes an f32 with its shortest digits and no exponent.
        (
            [-1e30, 3.0, 5.0, 1.0, 0.0, 0.0],
            "feature `files_changed` is -1000000000000000000000000000000",
        ),
        (
            [1.0, 3.0, 5.0, 1.0, -1.5e-10, 0.0],
            "feature `comments` is -0.00000000015",
        ),
        // -2^87: the shortest digits are not the rounded ones.
        (
            [1.0, 3.0, -154742504910672534362390528.0, 1.0, 0.0, 0.0],
            "feature `deletions` is -154742510000000000000000000",
        ),
    ] {
        let body = request(&[row]).to_string();
        let rust = gw
            .post("/v2/models/ttm/versions/rust/infer", body.clone())
            .await;
        let other = gw.post("/v2/models/ttm/versions/other/infer", body).await;
        let reason = |reply: &crate::support::Reply| {
            let error = reply.error();
            error
                .split_once("rejected the input: ")
                .map(|(_, r)| r.to_string())
                .unwrap_or(error)
        };
        assert_eq!((rust.status, other.status), (400, 400), "{}", other.text());
        assert_eq!(reason(&other), reason(&rust));
        assert!(reason(&other).contains(because), "{}", other.text());
    }
}

fn plugin_test(plugin: &Path, cache: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "test"])
        .arg(plugin)
        .arg("--compile-cache")
        .arg(cache)
        .output()
        .expect("run gateway plugin test");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

async fn a_language(toolchain: Toolchain) {
    let dir = tempfile::tempdir().unwrap();
    let Some(plugin) = toolchain.build(dir.path()) else {
        return;
    };
    let size = std::fs::metadata(&plugin).unwrap().len();
    let cache = dir.path().join("cache");

    // First start: compiled, and stored in the cache.
    let (gw, cold) = start(&plugin, &cache).await;
    answers_as_rust(&gw).await;
    let m = gw.metrics().await;
    assert_eq!(m.value("gateway_plugin_compilations_total", &[]), 2.0);
    let meta = gw.get("/v2/models/ttm/versions/other").await.json();
    assert_eq!(meta["plugin"]["reported_name"], "ttm-rules", "{meta}");
    assert_eq!(
        meta["plugin"]["sha256"].as_str().map(str::len),
        Some(64),
        "{meta}"
    );
    gw.shutdown().await;

    // The conformance suite.
    let (passed, report) = plugin_test(&plugin, &cache);
    assert!(passed, "{report}");
    assert!(report.contains("passed all"), "{report}");

    // Second start: from the cache, no compilation.
    let (gw, warm) = start(&plugin, &cache).await;
    let m = gw.metrics().await;
    assert_eq!(
        m.value("gateway_plugin_compilations_total", &[]),
        0.0,
        "everything came from the cache"
    );
    assert_eq!(m.value("gateway_plugin_compile_cache_hits_total", &[]), 2.0);
    answers_as_rust(&gw).await;
    gw.shutdown().await;
    eprintln!(
        "{}: {:.1} MB; start with compilation {:.0} ms, from the cache {:.0} ms",
        toolchain.name,
        size as f64 / 1e6,
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3
    );
    // What the cache is for: a component of megabytes (an interpreter and
    // the app) starts in a fraction of its compile time. A small one's
    // start is mostly the server's own, so only the count above says it.
    if size > 1_000_000 {
        assert!(warm * 2 < cold, "cold {cold:?}, warm {warm:?}");
    }

    // A damaged entry is refused, and the plugin compiled again.
    for entry in std::fs::read_dir(&cache).unwrap().flatten() {
        let mut bytes = std::fs::read(entry.path()).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(entry.path(), bytes).unwrap();
    }
    let (gw, _) = start(&plugin, &cache).await;
    let m = gw.metrics().await;
    assert_eq!(m.value("gateway_plugin_compilations_total", &[]), 2.0);
    assert_eq!(m.value("gateway_plugin_compile_cache_hits_total", &[]), 0.0);
    answers_as_rust(&gw).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_plugins_serve_as_rust_ones() {
    a_language(PYTHON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_plugins_serve_as_rust_ones() {
    a_language(JAVASCRIPT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickjs_plugins_serve_as_rust_ones() {
    a_language(QUICKJS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_plugins_serve_as_rust_ones() {
    a_language(C).await;
}

/// `gateway plugin new NAME --lang LANG` in a fresh folder.
fn new_project(lang: &str, name: &str, dir: &Path) -> PathBuf {
    let project = dir.join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["plugin", "new", name, "--lang", lang, "--dir"])
        .arg(&project)
        .output()
        .expect("run gateway plugin new");
    assert!(out.status.success(), "{out:?}");
    project
}

fn run(command: &mut Command) -> String {
    let _machine = crate::machine::share();
    let out = command.output().expect("run a toolchain command");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{command:?}:\n{text}");
    text
}

/// The project's own policy serves what it built.
async fn serves_its_project(project: &Path, name: &str) {
    let policy = std::fs::read_to_string(project.join(format!("policies/{name}.toml")))
        .unwrap()
        .replace("\"../", &format!("\"{}/", project.display()));
    let gw = TestGateway::start(&[("p.toml", &policy)]).await;
    let body = std::fs::read_to_string(project.join("request.json")).unwrap();
    let reply = gw.post(&format!("/v2/models/{name}/infer"), body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["outputs"][0]["data"], json!([2.0, 4.0, 6.0]));
    gw.shutdown().await;
    let (passed, report) = plugin_test(
        &project.join(format!("{name}.wasm")),
        &project.join("cache"),
    );
    assert!(passed, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_python_plugin_builds_tests_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    // Only to find out whether the toolchain is there.
    if PYTHON.build(dir.path()).is_none() {
        return;
    }
    let project = new_project("python", "py-doubler", dir.path());
    let tests = run(Command::new("sh").arg(project.join("build.sh")).arg("test"));
    assert!(
        tests.contains("Ran 2 tests") && tests.contains("OK"),
        "{tests}"
    );
    run(Command::new("sh").arg(project.join("build.sh")));
    serves_its_project(&project, "py-doubler").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_javascript_plugin_builds_tests_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    if JAVASCRIPT.build(dir.path()).is_none() {
        return;
    }
    let project = new_project("js", "js-doubler", dir.path());
    let tests = run(Command::new("node").arg("--test").current_dir(&project));
    assert!(tests.contains("pass 2"), "{tests}");
    // What `npm run build` runs, with the toolchain already installed.
    run(JAVASCRIPT
        .probe_command_named()
        .args([
            "app.js",
            "--wit",
            "wit",
            "--world-name",
            "standalone",
            "-o",
            "js-doubler.wasm",
        ])
        .current_dir(&project));
    serves_its_project(&project, "js-doubler").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_c_plugin_builds_tests_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    if C.build(dir.path()).is_none() {
        return;
    }
    let project = new_project("c", "c-doubler", dir.path());
    let tests = run(Command::new("sh").arg(project.join("build.sh")).arg("test"));
    assert!(tests.contains("2 tests passed"), "{tests}");
    run(Command::new("sh").arg(project.join("build.sh")));
    serves_its_project(&project, "c-doubler").await;
}
