//! The configuration file (`--config`), through the real binary: its
//! values are served, relative paths are relative to it, flags override
//! it, and `gateway check --config` reports every problem of a broken one
//! (with its file, line and key) and of the TLS files it names.

use std::process::Command;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{ADMIN_TOKEN, Binary, repo_root, send};

fn check(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .arg("check")
        .args(args)
        .output()
        .expect("run gateway check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A folder with `gateway.toml`, a policy folder `models/` serving the
/// rule-based plugin, and an admin token file.
fn folder(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("models")).unwrap();
    std::fs::write(
        dir.path().join("models/time-to-merge.toml"),
        "model = \"time-to-merge\"\nchampion = \"v1\"\n\
         [versions.v1]\nplugin = \"ttm-rules-v1\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
    dir
}

fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, String)]) -> Request<Full<Bytes>> {
    let mut request = Request::get(path).header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_is_served_and_flags_override_it() {
    let dir = folder(
        "listen = \"127.0.0.1:0\"\n\
         [policies]\nfolder = \"models\"\nwatch = false\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\n\
         [connections]\nmax_header_value_bytes = 2048\nmax_headers = 50\n\
         [shutdown]\ndrain_delay_secs = 0\n",
    );
    let config = dir.path().join("gateway.toml");
    // Started from another folder: the file's paths are relative to it.
    let gateway = Binary::start(
        [
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--max-headers",
            "8",
        ],
        &[],
        2,
    );
    let (inference, admin) = (gateway.addresses[0], gateway.addresses[1]);

    let ready = send(inference, get(inference, "/v2/health/ready", &[])).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let models = send(inference, get(inference, "/v2/models/time-to-merge", &[])).await;
    assert_eq!(models.status, 200, "{}", models.text());

    // The file's header value cap, not the default 8 KiB.
    let long = send(
        inference,
        get(
            inference,
            "/v2/health/ready",
            &[("x-long", "a".repeat(3000))],
        ),
    )
    .await;
    long.assert_error(431, &["3000 bytes", "the limit is 2048 bytes"]);
    // The flag's header count (8), not the file's (50).
    let many: Vec<_> = (0..10).map(|i| ("x-many", i.to_string())).collect();
    send(inference, get(inference, "/v2/health/ready", &many))
        .await
        .assert_error(431, &["the limit is 8"]);

    // The admin listener from the file, with the token file beside it.
    let auth = [("authorization", format!("Bearer {ADMIN_TOKEN}"))];
    let policies = send(admin, get(admin, "/admin/policies", &auth)).await;
    assert_eq!(policies.status, 200, "{}", policies.text());
    assert!(policies.text().contains("time-to-merge"));
    let metrics = send(admin, get(admin, "/metrics", &[])).await;
    assert_eq!(metrics.status, 200);
    // /metrics left the inference listener for the admin one.
    assert_eq!(
        send(inference, get(inference, "/metrics", &[]))
            .await
            .status,
        404
    );
}

#[test]
fn the_example_configuration_checks() {
    let (code, stdout, stderr) = check(&[
        "--config",
        repo_root().join("gateway.toml").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok: configuration"), "{stdout}");
    assert!(stdout.contains("ok: model `time-to-merge`"), "{stdout}");
}

#[test]
fn check_lists_every_problem_of_a_broken_file() {
    let dir = folder(
        "listen = \"127.0.0.1:8080\"\n\
         [connections]\nmax = 0\nmax_per_peer = 10\nfirst_byte_timeout_ms = 0\n\
         [http2]\nmax_concurent_streams = 10\n",
    );
    let config = dir.path().join("gateway.toml");
    let (code, _, stderr) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    // A misspelt key is refused by the parser, before any value is read.
    let file = config.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:7:1: unknown field `max_concurent_streams`"
        )),
        "{stderr}"
    );

    std::fs::write(
        &config,
        "[connections]\nmax = 0\nmax_per_peer = 10\nfirst_byte_timeout_ms = 0\n\
         [shutdown]\ngrace_secs = -1\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    let expected = [
        format!("{file}:2:7: `connections.max`: 0 is out of range; allowed: 1 to 1000000"),
        format!(
            "{file}:4:25: `connections.first_byte_timeout_ms`: 0 is out of range; allowed: 1 to 3600000"
        ),
        format!("{file}:6:14: `shutdown.grace_secs`: -1 is out of range; allowed: 0 to 3600"),
    ];
    for line in &expected {
        assert!(stderr.contains(line.as_str()), "{line} not in\n{stderr}");
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");

    // `serve` refuses the same file, and says why.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&expected[0]));
}

#[test]
fn check_loads_the_tls_files_the_file_names() {
    let dir =
        folder("[policies]\nfolder = \"models\"\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n");
    let config = dir.path().join("gateway.toml");
    let one = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), one.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), one.signing_key.serialize_pem()).unwrap();
    let (code, stdout, stderr) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok: configuration"), "{stdout}");

    // A key that is not the certificate's.
    std::fs::write(
        dir.path().join("key.pem"),
        other.signing_key.serialize_pem(),
    )
    .unwrap();
    let (code, _, stderr) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    let key = dir.path().join("key.pem").display().to_string();
    assert!(
        stderr.contains(&format!("{key}: does not match the certificate")),
        "{stderr}"
    );

    // A missing file is named.
    std::fs::remove_file(dir.path().join("cert.pem")).unwrap();
    let (code, _, stderr) = check(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cert.pem"), "{stderr}");
}
