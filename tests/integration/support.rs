//! What every end-to-end test uses: a real gateway on 127.0.0.1:0 serving
//! policies written to a temporary folder, a plain HTTP/1.1 client, and a
//! parser for the Prometheus text format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gateway::runtime::RuntimeConfig;
use gateway::server::{self, RunningServer, ServeOptions};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("gateway/ has a parent")
        .to_path_buf()
}

/// A policy file serving one built plugin as version `v1` of `model`.
pub fn single_version_policy(model: &str, plugin: &str, limits: &str) -> String {
    format!(
        "model = \"{model}\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"{plugin}\"\n[limits]\n{limits}\n"
    )
}

/// The admin token test gateways use.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A running gateway and the folder its policies live in.
pub struct TestGateway {
    server: Option<RunningServer>,
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/admin/*`).
    pub admin: SocketAddr,
    /// Holds the policy folder for as long as the gateway runs.
    _policies: tempfile::TempDir,
    /// Its part of the machine (see `machine`).
    _machine: crate::machine::Shared,
}

impl TestGateway {
    /// Serves the given `(file name, contents)` policies.
    pub async fn start(policies: &[(&str, &str)]) -> TestGateway {
        let dir = policy_folder();
        for (name, text) in policies {
            std::fs::write(dir.path().join(name), text).expect("write policy");
        }
        Self::start_in(dir).await
    }

    /// Serves the example policies of `policies/` (copied, so tests may not
    /// change them).
    pub async fn example() -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repo_root().join("policies"), dir.path());
        Self::start_in(dir).await
    }

    /// Serves the example policies with options changed by `configure`.
    pub async fn example_configured(configure: impl FnOnce(&mut ServeOptions)) -> TestGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        copy_dir(&repo_root().join("policies"), dir.path());
        Self::start_full(dir, false, configure).await
    }

    /// Starts and ends drains, as the signal handlers do.
    pub fn shutdown_handle(&self) -> server::ShutdownHandle {
        self.server
            .as_ref()
            .expect("a running gateway")
            .shutdown_handle()
    }

    /// Restarts on the same policy folder: a new process image in all but
    /// name (new engine, new routing state).
    pub async fn restart(mut self) -> TestGateway {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        Self::start_in(self._policies).await
    }

    /// Restarts on the same policy folder with options changed by
    /// `configure`.
    pub async fn restart_configured(
        mut self,
        configure: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        Self::start_full(self._policies, false, configure).await
    }

    /// A request to the admin listener with the admin token.
    pub async fn admin(&self, method: Method, path: &str) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.admin.to_string())
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        send(self.admin, request).await
    }

    /// The policy folder.
    pub fn policy_dir(&self) -> &std::path::Path {
        self._policies.path()
    }

    /// Replaces a policy file.
    pub fn write_policy(&self, name: &str, text: &str) {
        std::fs::write(self._policies.path().join(name), text).expect("write policy");
    }

    /// `POST /admin/reload` with the admin token.
    pub async fn reload(&self) -> Reply {
        let request = Request::post("/admin/reload")
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        send(self.admin, request).await
    }

    /// `GET /admin/policies` with the admin token, as JSON.
    pub async fn policies_view(&self) -> Value {
        let request = Request::get("/admin/policies")
            .header("host", self.addr.to_string())
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let reply = send(self.admin, request).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }

    /// A keep-alive connection to this gateway.
    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Serves a prepared policy folder.
    pub async fn start_in(dir: tempfile::TempDir) -> TestGateway {
        Self::start_with(dir, false).await
    }

    /// Serves the given policies and reloads when their files change.
    pub async fn start_watching(policies: &[(&str, &str)]) -> TestGateway {
        let dir = policy_folder();
        for (name, text) in policies {
            std::fs::write(dir.path().join(name), text).expect("write policy");
        }
        Self::start_with(dir, true).await
    }

    /// Serves a prepared policy folder and reloads when its files change.
    pub async fn start_watching_in(dir: tempfile::TempDir) -> TestGateway {
        Self::start_with(dir, true).await
    }

    /// Serves the given policies with options changed by `configure`.
    pub async fn start_configured(
        policies: &[(&str, &str)],
        configure: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        let dir = policy_folder();
        for (name, text) in policies {
            std::fs::write(dir.path().join(name), text).expect("write policy");
        }
        Self::start_full(dir, false, configure).await
    }

    async fn start_with(dir: tempfile::TempDir, watch: bool) -> TestGateway {
        Self::start_full(dir, watch, |_| {}).await
    }

    async fn start_full(
        dir: tempfile::TempDir,
        watch: bool,
        configure: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        let mut options = ServeOptions::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            dir.path().to_path_buf(),
            vec![],
        );
        // Small pools: many test gateways share one process's address space.
        options.runtime = RuntimeConfig {
            max_instances: 32,
            ..RuntimeConfig::default()
        };
        options.server.max_body_bytes = 1 << 20;
        options.server.body_read_timeout = Duration::from_secs(2);
        options.server.admin_token = Some(ADMIN_TOKEN.to_string());
        options.server.admin = Some(server::AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
        });
        // Test gateways stop at once (no drain delay, short grace).
        options.server.drain_delay = Duration::ZERO;
        // Tests reload explicitly unless they test the watcher.
        options.watch_debounce = watch.then_some(Duration::from_millis(200));
        configure(&mut options);
        let machine = crate::machine::share();
        let server = server::start(options)
            .await
            .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
        TestGateway {
            addr: server.local_addr(),
            admin: server.admin_addr().expect("an admin listener"),
            server: Some(server),
            _policies: dir,
            _machine: machine,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.request(Method::POST, path, body.into()).await
    }

    /// POSTs a JSON value to `/v2/models/{model}/infer`.
    pub async fn infer(&self, model: &str, body: &Value) -> Reply {
        self.post(&format!("/v2/models/{model}/infer"), body.to_string())
            .await
    }

    /// Sends an inference request from a task of its own; the handle yields
    /// the reply.
    pub fn spawn_infer(&self, model: &str, body: &Value) -> tokio::task::JoinHandle<Reply> {
        let request = Request::post(format!("/v2/models/{model}/infer"))
            .header("host", self.addr.to_string())
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        tokio::spawn(send(self.addr, request))
    }

    pub async fn request(&self, method: Method, path: &str, body: Bytes) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(body))
            .expect("request");
        send(self.addr, request).await
    }

    /// The current `/metrics` page, parsed.
    pub async fn metrics(&self) -> Metrics {
        let request = Request::get("/metrics")
            .header("host", self.admin.to_string())
            .body(Full::new(Bytes::new()))
            .expect("request");
        let reply = send(self.admin, request).await;
        assert_eq!(reply.status, 200);
        Metrics::parse(&reply.text())
    }

    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// One keep-alive HTTP/1.1 connection, for many requests.
pub struct Client {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Client { addr, sender }
    }

    /// POSTs `body` to `path` with extra headers.
    pub async fn post(&mut self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = Request::post(path).header("host", self.addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.send(request).await
    }

    /// GETs `path` on this connection.
    pub async fn get(&mut self, path: &str) -> Reply {
        self.try_get(path).await.expect("response")
    }

    /// GETs `path` on this connection; an error if the connection is gone.
    pub async fn try_get(&mut self, path: &str) -> hyper::Result<Reply> {
        let request = Request::get(path)
            .header("host", self.addr.to_string())
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.sender.ready().await?;
        let started = Instant::now();
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        })
    }

    /// Sends a request on this connection and reads the whole response.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Reply {
        self.sender.ready().await.expect("connection ready");
        let started = Instant::now();
        let response = self.sender.send_request(request).await.expect("response");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
            elapsed: started.elapsed(),
        }
    }
}

/// Sends one request on a new connection.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Reply {
    Client::connect(addr).await.send(request).await
}

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `error` of an error body, checking the body has exactly that shape.
    pub fn error(&self) -> String {
        let json = self.json();
        let object = json
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {json}"));
        assert_eq!(object.len(), 1, "error body has extra fields: {json}");
        object["error"]
            .as_str()
            .unwrap_or_else(|| panic!("error is not a string: {json}"))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status and that the error message contains every part.
    pub fn assert_error(&self, status: u16, parts: &[&str]) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let error = self.error();
        for part in parts {
            assert!(error.contains(part), "error {error:?} lacks {part:?}");
        }
    }
}

/// The latencies of `n` sequential POSTs of `body` to `path` on one
/// keep-alive connection, each answered 200, sorted.
pub async fn latencies(gw: &TestGateway, path: &str, body: &Value, n: usize) -> Vec<Duration> {
    let mut client = gw.client().await;
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let reply = client.post(path, body, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        times.push(reply.elapsed);
    }
    times.sort();
    times
}

/// The `q` quantile of sorted latencies.
pub fn quantile(times: &[Duration], q: f64) -> Duration {
    times[((times.len() as f64 * q) as usize).min(times.len() - 1)]
}

/// A V2 request with one FP32 input.
pub fn fp32_request(name: &str, shape: &[i64], data: &[f32]) -> Value {
    serde_json::json!({"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data}]})
}

type Labels = BTreeMap<String, String>;

/// Samples of a Prometheus text page: name -> [(labels, value)].
pub struct Metrics {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples: BTreeMap<String, Vec<_>> = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                    (name.to_string(), parse_labels(body))
                }
            };
            samples.entry(name).or_default().push((labels, value));
        }
        Metrics { samples }
    }

    /// The values of the samples whose labels include all of `labels`.
    fn matching<'a>(
        &'a self,
        name: &str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = f64> + 'a {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(move |(l, _)| {
                labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
    }

    /// The value of the sample whose labels include all of `labels`; 0 if
    /// there is none. Panics if several samples match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<f64> = self.matching(name, labels).collect();
        assert!(
            matching.len() <= 1,
            "{name}{labels:?} matches {} samples",
            matching.len()
        );
        matching.first().copied().unwrap_or(0.0)
    }

    /// Every sample of `name`, for failure messages.
    pub fn samples_of(&self, name: &str) -> Vec<(Labels, f64)> {
        self.samples.get(name).cloned().unwrap_or_default()
    }

    /// The sum over all samples whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).sum()
    }
}

fn parse_labels(body: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad labels {body:?}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = after[end..].trim_start_matches(',');
    }
    labels
}

/// Copies a folder and its subfolders (policies and their model files).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("read folder") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy file");
        }
    }
}

/// A fresh policy folder holding the example's model files (`models/`), so
/// test policies may name them as the example policy does.
pub fn policy_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    copy_dir(
        &repo_root().join("policies/models"),
        &dir.path().join("models"),
    );
    dir
}

/// The echo plugin's twelve inputs, empty but for `input`.
pub fn echo_inputs(input: serde_json::Value) -> serde_json::Value {
    let mut inputs: Vec<serde_json::Value> = [
        ("bool", "BOOL"),
        ("int8", "INT8"),
        ("int16", "INT16"),
        ("int32", "INT32"),
        ("int64", "INT64"),
        ("uint8", "UINT8"),
        ("uint16", "UINT16"),
        ("uint32", "UINT32"),
        ("uint64", "UINT64"),
        ("fp32", "FP32"),
        ("fp64", "FP64"),
        ("bytes", "BYTES"),
    ]
    .into_iter()
    .filter(|(name, _)| *name != input["name"])
    .map(|(name, datatype)| {
        let shape: &[i64] = if name == "fp32" { &[0, 0] } else { &[0] };
        serde_json::json!({"name": name, "shape": shape, "datatype": datatype, "data": []})
    })
    .collect();
    inputs.push(input);
    serde_json::json!({ "inputs": inputs })
}

/// The real `gateway serve` binary, stopped (SIGKILL) when dropped.
pub struct Binary {
    pub child: std::process::Child,
    /// The addresses it logged, in the order it logged them: the inference
    /// listener, then the admin listener if there is one.
    pub addresses: Vec<SocketAddr>,
    /// Its part of the machine (see `machine`).
    _machine: crate::machine::Shared,
}

impl Binary {
    /// Starts `gateway` with `args` (and `env`) and waits until it logs
    /// the addresses of `listeners` listeners.
    pub fn start<S: AsRef<std::ffi::OsStr>>(
        args: impl IntoIterator<Item = S>,
        env: &[(&str, &str)],
        listeners: usize,
    ) -> Binary {
        use std::io::{BufRead, BufReader};
        let machine = crate::machine::share();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(args)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start gateway");
        // Read the log on a thread of its own, so a gateway that never says
        // where it listens fails the test instead of hanging it.
        let stderr = child.stderr.take().expect("piped stderr");
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut binary = Binary {
            child,
            addresses: Vec::new(),
            _machine: machine,
        };
        while binary.addresses.len() < listeners {
            let line = lines_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the gateway did not log its addresses");
            if let Some(at) = line.find("address=") {
                let addr = line[at + "address=".len()..].split_whitespace().next();
                binary
                    .addresses
                    .push(addr.and_then(|a| a.parse().ok()).expect("an address"));
            }
        }
        binary
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        gateway::process::resident_kib(self.child.id()).expect("the gateway's VmRSS")
    }

    /// Sends `signal` (`"TERM"`, `"HUP"`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The label (the first row of the `label` output) of a V2 answer.
pub fn label_of(answer: &Value) -> String {
    answer["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .find(|o| o["name"] == "label")
        .map(|o| o["data"][0].as_str().expect("a label").to_string())
        .expect("a label output")
}

/// The features of made-up pull request `i` (varied sizes, discussions
/// and reviews, so that the rule versions disagree on some).
pub fn pr_features(i: usize) -> [f32; 6] {
    let i = i as f32;
    [
        i % 17.0 + 1.0,
        i * 53.0 % 1500.0,
        i * 13.0 % 400.0,
        2.0,
        i % 23.0,
        i % 4.0,
    ]
}
