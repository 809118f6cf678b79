//! `gateway check` (the real binary) on good and broken policy folders: each
//! problem is reported with its file, line and key, and the exit code says
//! whether the folder may be served. `gateway serve` refuses the same folders.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::repo_root;

fn gateway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .expect("run gateway")
}

/// `gateway check --policies DIR`: exit code, stdout, stderr.
pub fn check(dir: &Path) -> (i32, String, String) {
    let out = gateway(&["check", "--policies", dir.to_str().unwrap()]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A folder with the given policy files.
fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

const GOOD: &str = "model = \"m\"\nchampion = \"v1\"\n\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n";

/// Runs `check` on one bad file and returns stderr with the folder replaced by `D`.
fn refused(text: &str) -> String {
    let dir = folder(&[("m.toml", text)]);
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1, "check accepted:\n{text}\n{stderr}");
    stderr.replace(&dir.path().display().to_string(), "D")
}

#[test]
fn the_example_policies_pass() {
    let (code, stdout, stderr) = check(&repo_root().join("policies"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok: model `time-to-merge`"), "{stdout}");
    assert!(
        stdout
            .contains("champion v1, versions v1 (ttm-rules-v1), v2 (ttm-onnx), v3 (ttm-rules-v3)"),
        "{stdout}"
    );
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let stderr = refused(&GOOD.replace("plugin =", "plugn ="));
    assert!(stderr.contains("error: D/m.toml:5:1: unknown field `plugn`, expected one of `plugin`, `onnx`, `models`, `description`, `limits`"), "{stderr}");
    let stderr = refused(&format!("{GOOD}[limits]\ntimeout = 5\n"));
    assert!(
        stderr.contains("error: D/m.toml:7:1: unknown field `timeout`"),
        "{stderr}"
    );
    let stderr = refused(&format!("canary_percent = 5\n{GOOD}"));
    assert!(
        stderr.contains("error: D/m.toml:1:1: unknown field `canary_percent`"),
        "{stderr}"
    );
}

#[test]
fn a_missing_plugin_is_named() {
    let stderr = refused(&GOOD.replace("ttm-rules-v1", "ttm-rules-v9"));
    assert!(
        stderr.contains("error: D/m.toml:5:10: `versions.v1.plugin`: plugin `ttm-rules-v9` not found: no ttm-rules-v9.wasm in"),
        "{stderr}"
    );
    let stderr = refused(&GOOD.replace("\"ttm-rules-v1\"", "\"../nowhere/x.wasm\""));
    assert!(
        stderr.contains("`versions.v1.plugin`: plugin file D/../nowhere/x.wasm does not exist"),
        "{stderr}"
    );
    let stderr = refused("model = \"m\"\nchampion = \"v1\"\n[versions.v1]\n");
    assert!(
        stderr.contains("D/m.toml:3:11: `versions.v1`: a version needs `plugin` (a Wasm plugin) or `onnx` (an ONNX model served directly)"),
        "{stderr}"
    );
}

#[test]
fn a_champion_that_is_not_a_version_is_named() {
    let stderr = refused(&GOOD.replace("champion = \"v1\"", "champion = \"v2\""));
    assert!(
        stderr.contains(
            "error: D/m.toml:2:12: `champion`: `v2` is not a version of this model (versions: v1)"
        ),
        "{stderr}"
    );
}

#[test]
fn two_files_claiming_one_model_are_refused() {
    let dir = folder(&[("a.toml", GOOD), ("b.toml", GOOD)]);
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1);
    let stderr = stderr.replace(&dir.path().display().to_string(), "D");
    assert!(
        stderr.contains("error: D/b.toml: `model`: model `m` is already defined by D/a.toml; each model has exactly one policy file"),
        "{stderr}"
    );
}

#[test]
fn invalid_toml_and_limits_are_refused() {
    let stderr = refused("model = \"m\"\nchampion = \"v1\n");
    assert!(stderr.contains("error: D/m.toml:2:"), "{stderr}");
    let stderr = refused(&format!(
        "{GOOD}[limits]\ntimeout_ms = 0\nmemory_mebibytes = 99999\nmax_concurrency = -1\ncalls_per_instance = 0\n"
    ));
    assert!(
        stderr.contains(
            "D/m.toml:7:14: `limits.timeout_ms`: 0 is out of range; allowed: 1 to 600000"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "D/m.toml:8:20: `limits.memory_mebibytes`: 99999 is out of range; allowed: 1 to 1024"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("D/m.toml:9:19: `limits.max_concurrency`: -1 is out of range"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "D/m.toml:10:22: `limits.calls_per_instance`: 0 is out of range; allowed: 1 to 1000000"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("4 problem(s)"), "{stderr}");
    let stderr = refused(&format!(
        "{GOOD}[versions.v2]\nplugin = \"ttm-rules-v2\"\nlimits = {{ timeout_ms = \"fast\" }}\n"
    ));
    assert!(stderr.contains("D/m.toml:8:"), "{stderr}");
    assert!(
        stderr.contains("invalid type: string \"fast\", expected i64"),
        "{stderr}"
    );
}

#[test]
fn record_settings_out_of_range_are_refused() {
    let stderr = refused(&format!(
        "{GOOD}[record]\nsample_percent = 120\nmax_kib = 4096\n"
    ));
    assert!(
        stderr.contains(
            "D/m.toml:7:18: `record.sample_percent`: 120 is out of range; allowed: 0 to 100"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("D/m.toml:8:11: `record.max_kib`: 4096 is out of range; allowed: 1 to 512"),
        "{stderr}"
    );
    let stderr = refused(&format!("{GOOD}[record]\ninputs = true\n"));
    assert!(stderr.contains("D/m.toml:7:"), "{stderr}");
    assert!(stderr.contains("unknown field `inputs`"), "{stderr}");
}

#[test]
fn a_plugin_that_does_not_compile_is_refused() {
    let dir = folder(&[(
        "m.toml",
        &GOOD.replace("\"ttm-rules-v1\"", "\"broken.wasm\""),
    )]);
    std::fs::write(dir.path().join("broken.wasm"), b"\0asm\x01\0\0\0garbage").unwrap();
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("`versions.v1.plugin`: plugin "), "{stderr}");
    assert!(
        stderr.contains("broken.wasm is not a valid WebAssembly component"),
        "{stderr}"
    );
}

#[test]
fn a_memory_cap_below_what_the_plugin_needs_to_start_is_refused() {
    let stderr = refused(&format!("{GOOD}[limits]\nmemory_mebibytes = 1\n"));
    assert!(
        stderr.contains("`versions.v1.plugin`: plugin `ttm-rules-v1` needs"),
        "{stderr}"
    );
    assert!(
        stderr.contains("more than the version's memory_mebibytes allows (1024 KiB)"),
        "{stderr}"
    );
}

#[test]
fn every_problem_of_a_folder_is_reported_at_once() {
    let dir = folder(&[
        ("a.toml", &GOOD.replace("plugin =", "plugn =")),
        (
            "b.toml",
            &GOOD
                .replace("model = \"m\"", "model = \"n\"")
                .replace("ttm-rules-v1", "nope"),
        ),
        ("notes.txt", "not a policy"),
    ]);
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1);
    assert!(
        stderr.contains("a.toml:5:1: unknown field `plugn`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("b.toml:5:10: `versions.v1.plugin`: plugin `nope` not found"),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}

#[test]
fn serve_refuses_to_start_on_broken_policies() {
    let dir = folder(&[(
        "m.toml",
        &GOOD.replace("champion = \"v1\"", "champion = \"v2\""),
    )]);
    let out = gateway(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--policies",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the policies are invalid"), "{stderr}");
    assert!(
        stderr.contains("`champion`: `v2` is not a version of this model"),
        "{stderr}"
    );
}

#[test]
fn help_is_available_everywhere() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check", "--help"],
        &["help", "serve"],
    ] {
        let out = gateway(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Usage: gateway"), "{args:?}: {stdout}");
    }
    let serve = String::from_utf8_lossy(&gateway(&["serve", "--help"]).stdout).into_owned();
    for flag in [
        "--listen",
        "--policies",
        "--plugin-dir",
        "--max-body-bytes",
        "[default: 127.0.0.1:8080]",
        "[default: policies]",
    ] {
        assert!(serve.contains(flag), "serve --help lacks {flag}:\n{serve}");
    }
    let bad = gateway(&["serve", "--no-such-flag"]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Every problem of every file in one run: a file that does not parse
/// does not hide another file's plugin that does not exist.
#[test]
fn every_problem_of_every_file_is_reported() {
    let dir = folder(&[
        (
            "a.toml",
            "model = \"a\"\nchampion = \"v1\"\nspeed = 3\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n",
        ),
        (
            "b.toml",
            &GOOD
                .replace("\"m\"", "\"b\"")
                .replace("ttm-rules-v1", "no-such-plugin"),
        ),
    ]);
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("a.toml"), "{stderr}");
    assert!(stderr.contains("speed"), "{stderr}");
    assert!(stderr.contains("b.toml"), "{stderr}");
    assert!(stderr.contains("no-such-plugin"), "{stderr}");
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}
