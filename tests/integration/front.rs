//! The front door: TLS (rustls's client and Python's), HTTP/2 over TLS by
//! ALPN and in cleartext by prior knowledge, client certificates,
//! certificate rotation under load, connection floods and caps, header
//! caps, clients that never read, the admin listener, and the drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::{ADMIN_TOKEN, TestGateway, fp32_request, repo_root};

// ---- certificates ----------------------------------------------------

/// A CA, and leaf certificates it signs, as PEM files in a folder.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn ca_pem(&self) -> Vec<u8> {
        self.ca.pem().into_bytes()
    }

    /// A certificate for `localhost` named `name`: (chain PEM, key PEM).
    fn leaf(&self, name: &str, client: bool) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a server certificate named `name` to `cert.pem`/`key.pem`.
    fn write_server(&self, name: &str) -> gateway::server::TlsConfig {
        let (cert, key) = self.leaf(name, false);
        // Key first, then the chain: the reloader sees a complete pair
        // once the certificate changes (and retries on the next change).
        std::fs::write(self.dir.path().join("key.pem"), key).unwrap();
        std::fs::write(self.dir.path().join("cert.pem"), cert).unwrap();
        gateway::server::TlsConfig {
            cert: self.dir.path().join("cert.pem"),
            key: self.dir.path().join("key.pem"),
            client_ca: None,
        }
    }
}

/// A TLS connection to `addr` trusting `ca_pem`, offering `alpn`, with a
/// client certificate when given.
async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &[u8],
    alpn: &[&[u8]],
    client: Option<&(String, String)>,
) -> std::io::Result<TlsStream<TcpStream>> {
    tls_connect_with(addr, Arc::new(client_config(ca_pem, alpn, client))).await
}

/// A connection with `config`, whose session cache lets it resume.
async fn tls_connect_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), stream)
        .await
}

fn client_config(
    ca_pem: &[u8],
    alpn: &[&[u8]],
    client: Option<&(String, String)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn infer_request(addr: SocketAddr) -> Request<Full<Bytes>> {
    let body = fp32_request("pr_features", &[1, 6], &[3.0, 40.0, 12.0, 4.0, 1.0, 2.0]);
    Request::post("/v2/models/time-to-merge/infer")
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// One request over HTTP/1.1 on `io`: the status and body.
async fn http1<I>(io: I, request: Request<Full<Bytes>>) -> hyper::Result<(u16, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// One request over HTTP/2 on `io`.
async fn http2<I>(io: I, request: Request<Full<Bytes>>) -> hyper::Result<(u16, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

async fn tls_gateway(tls: gateway::server::TlsConfig) -> TestGateway {
    TestGateway::example_configured(|o| o.server.tls = Some(tls)).await
}

/// A TLS gateway that requires client certificates `pki` signed.
async fn mtls_gateway(pki: &Pki) -> TestGateway {
    let mut tls = pki.write_server("gateway");
    tls.client_ca = Some(pki.ca_path());
    tls_gateway(tls).await
}

/// Whether a request over `connected` (a TLS connection, or the failure
/// to make one) is answered: with TLS 1.3 a refused client certificate
/// shows at the first read.
async fn served(connected: std::io::Result<TlsStream<TcpStream>>, addr: SocketAddr) -> bool {
    match connected {
        Err(_) => false,
        Ok(stream) => http1(stream, infer_request(addr)).await.is_ok(),
    }
}

/// Waits until `gateway_tls_reloads_total{outcome}` reaches 1.
async fn wait_for_tls_reload(gw: &TestGateway, outcome: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw
        .metrics()
        .await
        .value("gateway_tls_reloads_total", &[("outcome", outcome)])
        < 1.0
    {
        assert!(Instant::now() < deadline, "no TLS reload {outcome} in 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- TLS and HTTP/2 --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_http2_and_http1_by_alpn() {
    let pki = Pki::new("test CA");
    let gw = tls_gateway(pki.write_server("gateway")).await;
    let ca = pki.ca_pem();

    let h2 = tls_connect(gw.addr, &ca, &[b"h2", b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, body) = http2(h2, infer_request(gw.addr)).await.unwrap();
    assert_eq!(status, 200, "{body:?}");

    let h1 = tls_connect(gw.addr, &ca, &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, _) = http1(h1, infer_request(gw.addr)).await.unwrap();
    assert_eq!(status, 200);

    // No ALPN at all: HTTP/1.1.
    let plain_alpn = tls_connect(gw.addr, &ca, &[], None).await.unwrap();
    assert_eq!(
        http1(plain_alpn, infer_request(gw.addr)).await.unwrap().0,
        200
    );

    // A client that does not trust the CA, and cleartext on the TLS port.
    let other = Pki::new("another CA");
    assert!(
        tls_connect(gw.addr, &other.ca_pem(), &[b"h2"], None)
            .await
            .is_err()
    );
    let plain = TcpStream::connect(gw.addr).await.unwrap();
    assert!(http1(plain, infer_request(gw.addr)).await.is_err());
    // The server counts each failure when its side of the handshake ends,
    // which may be after the client gave up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw
        .metrics()
        .await
        .value("gateway_tls_handshake_failures_total", &[])
        < 2.0
    {
        assert!(
            Instant::now() < deadline,
            "the failed handshakes were not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_by_prior_knowledge() {
    let gw = TestGateway::example().await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (status, body) = http2(stream, infer_request(gw.addr)).await.unwrap();
    assert_eq!(status, 200, "{body:?}");
    // Errors over HTTP/2 are the same JSON.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let bad = Request::post("/v2/models/time-to-merge/infer")
        .header("host", "x")
        .body(Full::new(Bytes::from_static(b"{")))
        .unwrap();
    let (status, body) = http2(stream, bad).await.unwrap();
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("\"error\""));
    gw.shutdown().await;
}

/// Many streams on one HTTP/2 connection, more than it may open at once:
/// every one is answered (the client queues past the server's limit).
/// A flood of streams each reset at once ends in GOAWAY for that
/// connection, and the gateway keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_floods_and_resets() {
    let gw = TestGateway::example_configured(|o| {
        o.server.connections.http2.max_concurrent_streams = 8;
    })
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    // One answer first: the client then knows the server's SETTINGS (a
    // stream opened before them, past the limit, is refused, as RFC 9113
    // allows, and safe to retry).
    let mut first = sender.clone();
    first.ready().await.unwrap();
    assert_eq!(
        first
            .send_request(infer_request(gw.addr))
            .await
            .unwrap()
            .status(),
        200
    );
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let mut sender = sender.clone();
            let request = infer_request(gw.addr);
            tokio::spawn(async move {
                sender.ready().await.unwrap();
                sender
                    .send_request(request)
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), 200);
    }

    // Rapid reset (CVE-2023-44487): streams opened and reset at once,
    // before the server has accepted them. Past 20 such resets (or 256
    // streams the server had to reset itself) the connection gets GOAWAY
    // with ENHANCE_YOUR_CALM and is closed; the client may see the close
    // (a reset socket) before it reads the GOAWAY. hyper's client hides its
    // resets; h2's sends them as told. The connection is driven in the
    // flooding task, so each stream's HEADERS and RST_STREAM leave in one
    // write.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(stream).await.unwrap();
    let uri = format!("http://{}/v2/models/time-to-merge/infer", gw.addr);
    let flood = async move {
        let mut sent = 0;
        let mut ready = Some(client);
        while sent < 2_000
            && let Some(client) = ready.take()
        {
            let Ok(mut client) = client.ready().await else {
                break;
            };
            let request = Request::post(uri.as_str()).body(()).unwrap();
            let Ok((_response, mut body)) = client.send_request(request, false) else {
                break;
            };
            body.send_reset(h2::Reason::CANCEL);
            sent += 1;
            ready = Some(client);
        }
        // The handle is kept: without it the client would close the
        // connection itself once its streams are gone.
        (sent, ready)
    };
    let ((sent, _client), ended) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(flood, connection)
    })
    .await
    .expect("the connection is open 20 s after the resets began");
    let err = ended.expect_err("the connection ended without an error");
    let calm =
        err.is_go_away() && err.is_remote() && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(calm || err.is_io(), "{err} after {sent} resets");
    // Other clients are served.
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(http2(stream, infer_request(gw.addr)).await.unwrap().0, 200);
    assert_eq!(gw.get("/v2/health/ready").await.status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_when_configured() {
    let pki = Pki::new("test CA");
    let gw = mtls_gateway(&pki).await;
    let ca = pki.ca_pem();

    let good = pki.leaf("a client", true);
    let stream = tls_connect(gw.addr, &ca, &[b"h2"], Some(&good))
        .await
        .unwrap();
    assert_eq!(http2(stream, infer_request(gw.addr)).await.unwrap().0, 200);

    // Without a certificate, or with one another CA signed: refused (with
    // TLS 1.3 the client learns it at its first read).
    let stranger = Pki::new("another CA").leaf("a stranger", true);
    for client in [None, Some(&stranger)] {
        let connected = tls_connect(gw.addr, &ca, &[b"http/1.1"], client).await;
        assert!(
            !served(connected, gw.addr).await,
            "a client without a trusted certificate was served"
        );
    }

    // The bundle is reloaded when it changes: with the other CA added,
    // its clients are served too, and the first CA's still are.
    let other = Pki::new("another CA");
    let newcomer = other.leaf("a newcomer", true);
    let mut bundle = pki.ca_pem();
    bundle.extend(other.ca_pem());
    std::fs::write(pki.ca_path(), bundle).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let connected = tls_connect(gw.addr, &ca, &[b"http/1.1"], Some(&newcomer)).await;
        if served(connected, gw.addr).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new CA bundle was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stream = tls_connect(gw.addr, &ca, &[b"h2"], Some(&good))
        .await
        .unwrap();
    assert_eq!(http2(stream, infer_request(gw.addr)).await.unwrap().0, 200);
    // A bundle that does not load keeps the one in force.
    std::fs::write(pki.ca_path(), b"not a certificate").unwrap();
    wait_for_tls_reload(&gw, "refused").await;
    let stream = tls_connect(gw.addr, &ca, &[b"h2"], Some(&newcomer))
        .await
        .unwrap();
    assert_eq!(http2(stream, infer_request(gw.addr)).await.unwrap().0, 200);
    gw.shutdown().await;
}

/// A session from before a new CA bundle does not resume past it: a
/// resumed session skips client authentication, so a client whose CA was
/// removed must make a full handshake, and fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ca_bundle_is_not_met_by_resumed_sessions() {
    let pki = Pki::new("test CA");
    let gw = mtls_gateway(&pki).await;
    let ca = pki.ca_pem();
    let good = pki.leaf("a client", true);
    let config = Arc::new(client_config(&ca, &[b"http/1.1"], Some(&good)));
    // Two connections: the second resumes (TLS 1.3 tickets arrive after
    // the handshake, so the first request collects them).
    for resumed in [false, true] {
        let stream = tls_connect_with(gw.addr, config.clone()).await.unwrap();
        let kind = stream.get_ref().1.handshake_kind();
        assert_eq!(
            kind == Some(rustls::HandshakeKind::Resumed),
            resumed,
            "{kind:?}"
        );
        assert_eq!(http1(stream, infer_request(gw.addr)).await.unwrap().0, 200);
    }
    // The bundle now names another CA only.
    std::fs::write(pki.ca_path(), Pki::new("another CA").ca_pem()).unwrap();
    wait_for_tls_reload(&gw, "loaded").await;
    let connected = tls_connect_with(gw.addr, config.clone()).await;
    assert!(
        !served(connected, gw.addr).await,
        "a session from before the new bundle was resumed and served"
    );
    gw.shutdown().await;
}

/// A new certificate written over the old one is served to new
/// handshakes within seconds, while requests keep succeeding, on
/// connections opened before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failed_request() {
    let pki = Pki::new("test CA");
    let gw = tls_gateway(pki.write_server("first")).await;
    let ca = Arc::new(pki.ca_pem());
    let addr = gw.addr;
    let leaf_of = |stream: &TlsStream<TcpStream>| {
        stream.get_ref().1.peer_certificates().unwrap()[0]
            .as_ref()
            .to_vec()
    };
    let first = leaf_of(&tls_connect(addr, &ca, &[b"h2"], None).await.unwrap());

    // A keep-alive HTTP/2 connection opened before the rotation.
    let before = tls_connect(addr, &ca, &[b"h2"], None).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(before))
            .await
            .unwrap();
    tokio::spawn(connection);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (ca, stop, served) = (ca.clone(), stop.clone(), served.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let stream = tls_connect(addr, &ca, &[b"http/1.1"], None)
                        .await
                        .expect("handshake during the rotation");
                    let (status, _) = http1(stream, infer_request(addr)).await.unwrap();
                    assert_eq!(status, 200);
                    served.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pki.write_server("second");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = leaf_of(&tls_connect(addr, &ca, &[b"h2"], None).await.unwrap());
        if now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("no request failed during the rotation");
    }
    assert!(served.load(Ordering::Relaxed) > 10);
    let mut sender = sender;
    let response = sender.send_request(infer_request(addr)).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "the connection from before stays served"
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.value("gateway_tls_reloads_total", &[("outcome", "loaded")]),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_over_tls_and_http2() {
    let python = std::env::var("GATEWAY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let pki = Pki::new("test CA");
    let tls = tls_gateway(pki.write_server("gateway")).await;
    let plain = TestGateway::example().await;
    let script = repo_root().join("tests/compat/tls_clients.py");
    let args = [
        script.display().to_string(),
        format!("localhost:{}", tls.addr.port()),
        pki.ca_path().display().to_string(),
        plain.addr.to_string(),
        "time-to-merge".to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python).args(args).output()
    })
    .await
    .unwrap()
    .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "TLS/HTTP2 client checks failed:\n{stdout}\n{stderr}"
    );
    tls.shutdown().await;
    plain.shutdown().await;
}

// ---- connections -----------------------------------------------------

/// A connection from `source` (another loopback address) to `addr`.
async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Median time of `n` requests, each on a new connection from 127.0.0.1.
async fn probe_median(gw: &TestGateway, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        assert_eq!(gw.get("/v2/health/ready").await.status, 200);
        times.push(started.elapsed());
    }
    times.sort();
    times[n / 2]
}

/// 1,100 connections that never send a byte (from 127.0.0.2) do not
/// delay a client on a new connection (from 127.0.0.1), and are closed
/// once their time for a first byte is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_delay_other_clients() {
    let _alone = crate::machine::alone().await;
    let gw = TestGateway::example_configured(|o| {
        o.server.connections.first_byte_timeout = Duration::from_millis(1500);
        o.server.connections.max_connections_per_peer = 0;
    })
    .await;
    let quiet = probe_median(&gw, 30).await;
    let mut silent = Vec::with_capacity(1100);
    for _ in 0..1100 {
        silent.push(connect_from([127, 0, 0, 2], gw.addr).await);
    }
    let flooded = probe_median(&gw, 30).await;
    eprintln!(
        "new-connection request: quiet {quiet:?}, beside 1,100 silent connections {flooded:?}"
    );
    assert!(
        flooded <= quiet * 2 + Duration::from_millis(5),
        "quiet {quiet:?}, flooded {flooded:?}"
    );
    // Past the first-byte time each is closed by the gateway.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let mut closed = 0;
    for stream in silent.iter_mut().take(50) {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 50, "silent connections were left open");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_gets_at_most_its_connections() {
    let gw = TestGateway::example_configured(|o| {
        o.server.connections.max_connections_per_peer = 4;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 3], gw.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fifth = connect_from([127, 0, 0, 3], gw.addr).await;
    let _ = fifth
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the fifth connection was served"
    );
    // Another peer is served.
    assert_eq!(gw.get("/v2/health/live").await.status, 200);
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_connections_refused_total",
            &[
                ("listener", "inference"),
                ("reason", "max_connections_per_peer")
            ]
        ),
        1.0
    );
    // Once one closes (and the gateway has seen it close), the peer may
    // connect again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut again = connect_from([127, 0, 0, 3], gw.addr).await;
        let _ = again
            .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let n = again.read(&mut buf).await.unwrap_or(0);
        if buf[..n].starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed slot was not given back"
        );
    }
    gw.shutdown().await;
}

/// Sends a raw request head and returns the status line's code.
async fn status_of_head(addr: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_caps_are_enforced_with_431() {
    let gw = TestGateway::example().await;
    let head = |headers: String| {
        format!("GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{headers}\r\n")
    };
    // One 70 KiB header.
    let one = format!("x-big: {}\r\n", "a".repeat(70 << 10));
    let reply = status_of_head(gw.addr, &head(one)).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:.200}");
    // 60 headers of 1.5 KiB: 90 KiB in all, each under the value cap.
    let many: String = (0..60)
        .map(|i| format!("x-h{i}: {}\r\n", "b".repeat(1536)))
        .collect();
    let reply = status_of_head(gw.addr, &head(many)).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:.200}");
    assert!(
        reply.contains("the request line and headers are"),
        "{reply:.400}"
    );
    // 150 small headers.
    let count: String = (0..150).map(|i| format!("x-c{i}: 1\r\n")).collect();
    let reply = status_of_head(gw.addr, &head(count)).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:.200}");
    // Within the caps: served.
    let fine: String = (0..30)
        .map(|i| format!("x-f{i}: {}\r\n", "c".repeat(1024)))
        .collect();
    let reply = status_of_head(gw.addr, &head(fine)).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply:.200}");
    gw.shutdown().await;
}

/// The JSON head of a request to the echo plugin whose UINT8 input has
/// `n` values in binary after the head (its other inputs empty).
fn echo_header(n: usize) -> String {
    crate::support::echo_inputs(serde_json::json!({"name": "uint8", "shape": [n], "datatype": "UINT8", "parameters": {"binary_data_size": n}}))
        .to_string()
}

fn echo_request(n: usize) -> Request<Full<Bytes>> {
    let header = echo_header(n);
    let mut body = header.clone().into_bytes();
    body.extend(std::iter::repeat_n(7u8, n));
    Request::post("/v2/models/echo/infer")
        .header("host", "x")
        .header("inference-header-content-length", header.len().to_string())
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// An HTTP/2 client that never opens its streams' windows cannot make
/// the gateway hold answers outside the budget of bytes in flight: each
/// answer it does not take stays counted until its stream goes, so the
/// budget fills (503) instead of the memory, and empties when the client
/// leaves. With a window of one byte, hyper hands a whole body frame to
/// the connection (and drops the body) as soon as one byte of it may be
/// sent: the gateway's bodies yield 64 KiB frames so the rest stays
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_does_not_take_stay_in_the_byte_budget() {
    for window in [0, 1] {
        answers_stay_in_the_byte_budget(window).await;
    }
}

async fn answers_stay_in_the_byte_budget(window: u32) {
    let policy = crate::support::single_version_policy("echo", "echo", "");
    let gw = TestGateway::start_configured(&[("echo.toml", &policy)], |o| {
        o.pipeline.max_inflight_bytes = 12 << 20;
    })
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .initial_connection_window_size(64 << 20)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    // Answers of about 1.5 MiB each, whose bodies can never be sent.
    let mut stalled = Vec::new();
    let mut refused = None;
    for _ in 0..32 {
        let mut sender = sender.clone();
        sender.ready().await.unwrap();
        let response = sender.send_request(echo_request(512 << 10)).await.unwrap();
        if response.status() == 503 {
            // Its body cannot come either (the window is shut).
            refused = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
        stalled.push(response);
    }
    let refused = refused.unwrap_or_else(|| {
        panic!("32 answers held outside the budget of bytes in flight (window {window})")
    });
    assert_eq!(
        refused.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(
        stalled.len() >= 2,
        "refused after {} answers",
        stalled.len()
    );
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_refused_total",
            &[("model", "echo"), ("reason", "bytes_in_flight")]
        ),
        1.0
    );
    drop(refused);
    // The client goes: its answers leave the budget.
    drop(stalled);
    drop(sender);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = crate::support::send(gw.addr, echo_request(512 << 10)).await;
        if reply.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the budget was not given back: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
}

/// An HTTP/2 client that stops taking an answer (its stream's window
/// stays shut, while the socket is writable) is cut off after the write
/// timeout, and the answer leaves the budget of bytes in flight with it,
/// as an HTTP/1 client that stops reading is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_never_takes_its_answer_is_cut_off() {
    let policy = crate::support::single_version_policy("echo", "echo", "");
    let gw = TestGateway::start_configured(&[("echo.toml", &policy)], |o| {
        o.server.connections.write_timeout = Duration::from_millis(500);
    })
    .await;
    for window in [0, 1] {
        let stream = TcpStream::connect(gw.addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(window)
                .initial_connection_window_size(64 << 20)
                .handshake(TokioIo::new(stream))
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        sender.ready().await.unwrap();
        let response = sender.send_request(echo_request(512 << 10)).await.unwrap();
        assert_eq!(response.status(), 200);
        // Held, never read. The gateway closes the connection; the idle
        // time (60 s) does not apply, since an answer is in flight.
        let ended = tokio::time::timeout(Duration::from_secs(20), connection).await;
        assert!(
            ended.is_ok(),
            "the connection is open 20 s after its answer stalled (window {window})"
        );
        let body = response.into_body().collect().await;
        assert!(body.is_err(), "the whole answer arrived (window {window})");
    }
    gw.shutdown().await;
}

/// A client that asks for a large answer and never reads it is cut off
/// after the write timeout instead of holding its connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off() {
    let policy = crate::support::single_version_policy("echo", "echo", "");
    let gw = TestGateway::start_configured(&[("echo.toml", &policy)], |o| {
        o.server.max_body_bytes = 8 << 20;
        o.server.connections.write_timeout = Duration::from_millis(300);
    })
    .await;
    // 4 Mi UINT8 values in binary, answered in JSON: about 8 MiB.
    let n = 4usize << 20;
    let header = echo_header(n);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v2/models/echo/infer HTTP/1.1\r\nhost: x\r\ninference-header-content-length: {}\r\ncontent-length: {}\r\n\r\n",
        header.len(),
        header.len() + n
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(header.as_bytes()).await.unwrap();
    stream.write_all(&vec![7u8; n]).await.unwrap();
    // Not reading, for longer than the write timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => received.extend_from_slice(&chunk[..k]),
            Err(_) => panic!(
                "the connection is still open after the write timeout, {} bytes received: {}",
                received.len(),
                String::from_utf8_lossy(&received[..received.len().min(300)])
            ),
        }
    }
    let text = String::from_utf8_lossy(&received[..received.len().min(512)]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let declared: usize = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    assert!(
        received.len() < declared,
        "the whole answer arrived ({} of {declared} bytes): the write timeout did not cut it",
        received.len()
    );
    gw.shutdown().await;
}

// ---- the admin listener ------------------------------------------------

async fn admin_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> crate::support::Reply {
    let mut request = Request::get(path).header("host", "x");
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    crate::support::send(addr, request.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lives_on_its_own_listener() {
    let gw = TestGateway::example().await;
    // Not on the inference listener.
    admin_get(
        gw.addr,
        "/admin/policies",
        Some(&format!("Bearer {ADMIN_TOKEN}")),
    )
    .await
    .assert_error(404, &["served on the admin listener"]);
    assert_eq!(admin_get(gw.addr, "/metrics", None).await.status, 404);
    // Inference is not on the admin listener; health is on both.
    assert_eq!(
        admin_get(gw.admin, "/v2/models/time-to-merge", None)
            .await
            .status,
        404
    );
    assert_eq!(
        admin_get(gw.admin, "/v2/health/ready", None).await.status,
        200
    );
    // The scheme in any case (RFC 9110).
    let lower = admin_get(
        gw.admin,
        "/admin/policies",
        Some(&format!("bearer {ADMIN_TOKEN}")),
    )
    .await;
    assert_eq!(lower.status, 200, "{}", lower.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_admin_tokens_are_rate_limited_per_peer() {
    let gw = TestGateway::example().await;
    for _ in 0..10 {
        admin_get(
            gw.admin,
            "/admin/policies",
            Some("Bearer wrong-wrong-wrong"),
        )
        .await
        .assert_error(401, &["needs `Authorization: Bearer"]);
    }
    // Past ten, even the right token waits.
    let refused = admin_get(
        gw.admin,
        "/admin/policies",
        Some(&format!("Bearer {ADMIN_TOKEN}")),
    )
    .await;
    refused.assert_error(429, &["too many wrong admin tokens"]);
    let retry: u32 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "gateway_admin_auth_failures_total",
            &[("reason", "wrong_token")]
        ),
        10.0
    );
    assert_eq!(
        m.value(
            "gateway_admin_auth_failures_total",
            &[("reason", "rate_limited")]
        ),
        1.0
    );
    gw.shutdown().await;
}

// ---- the drain ---------------------------------------------------------

/// SIGTERM's sequence as a client sees it: readiness 503 at once while
/// new connections are still accepted, then refused; a request in flight
/// is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_kubernetes_understands() {
    let policy = "model = \"slow\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"slow-ttm\"\nlimits = { timeout_ms = 5000 }\n";
    let gw = TestGateway::start_configured(&[("slow.toml", policy)], |o| {
        o.server.drain_delay = Duration::from_millis(1500);
    })
    .await;
    let addr = gw.addr;
    // An idle keep-alive connection opened before.
    let mut idle = gw.client().await;
    assert_eq!(idle.get("/v2/health/ready").await.status, 200);
    let in_flight = gw.spawn_infer(
        "slow",
        &fp32_request("pr_features", &[1, 6], &[3.0, 40.0, 12.0, 4.0, 1.0, 2.0]),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let handle = gw.shutdown_handle();
    let started = Instant::now();
    handle.drain();
    // Still accepting, but not ready.
    let ready = gw.get("/v2/health/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(gw.get("/v2/health/live").await.status, 200);
    assert_eq!(in_flight.await.unwrap().status, 200);
    // After the delay the listener is closed.
    loop {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still accepting long after the drain delay"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "the listener closed before the drain delay: {:?}",
        started.elapsed()
    );
    // The idle keep-alive connection was closed too.
    assert!(idle.try_get("/v2/health/ready").await.is_err());
    gw.shutdown().await;
}

/// A keep-alive connection waits for its next request for the idle time,
/// not the (shorter) header time, and is closed once it has been idle
/// that long; a head that starts must end within the header time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_get_the_idle_time_and_heads_the_header_time() {
    let gw = TestGateway::example_configured(|o| {
        o.server.connections.header_read_timeout = Duration::from_millis(300);
        o.server.connections.idle_timeout = Duration::from_millis(1500);
    })
    .await;
    let mut client = gw.client().await;
    assert_eq!(client.get("/v2/health/live").await.status, 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        client
            .try_get("/v2/health/live")
            .await
            .map(|r| r.status)
            .ok(),
        Some(200),
        "closed before its idle time"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        client.try_get("/v2/health/live").await.is_err(),
        "still open after its idle time"
    );
    // Half a head, then nothing: closed after the header time.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a stalled head was kept {:?}",
        started.elapsed()
    );
    gw.shutdown().await;
}
