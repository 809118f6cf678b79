//! The front door's cost: HTTPS against cleartext HTTP/1.1 at 1 and 64
//! keep-alive connections, HTTP/2 against HTTP/1.1 (cleartext and TLS,
//! the same number of requests in flight), and new connections per second
//! with and without a TLS handshake. Every figure is a ratio against
//! cleartext HTTP/1.1 measured in the same run, rounds interleaved.
//!
//! `cargo bench --bench front [-- --seconds S --rounds R]`

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const BODY: &str =
    r#"{"inputs":[{"name":"pr_features","shape":[1,6],"datatype":"FP32","data":[3,40,12,4,1,2]}]}"#;
const PATH: &str = "/v2/models/plain/infer";

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Http1,
    Http2,
}

#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<TlsConnector>,
}

/// A byte stream to the target, TLS or not.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn open(target: &Target) -> Box<dyn Io> {
    let stream = TcpStream::connect(target.addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    match &target.tls {
        None => Box::new(stream),
        Some(connector) => Box::new(
            connector
                .connect(ServerName::try_from("localhost").unwrap(), stream)
                .await
                .expect("handshake"),
        ),
    }
}

fn request() -> Request<Full<Bytes>> {
    Request::post(PATH)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

/// A connection's request sender, either protocol.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// One request, answered 200, its body read.
    async fn call(&mut self) {
        let response = match self {
            Sender::Http1(sender) => {
                sender.ready().await.expect("ready");
                sender.send_request(request()).await
            }
            Sender::Http2(sender) => {
                sender.ready().await.expect("ready");
                sender.send_request(request()).await
            }
        }
        .expect("response");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("body");
    }
}

/// Requests per second and p99 (µs) with `in_flight` requests at once for
/// `seconds`: HTTP/1.1 on that many connections, HTTP/2 as that many
/// streams on one connection.
async fn throughput(
    target: &Target,
    protocol: Protocol,
    in_flight: usize,
    seconds: f64,
) -> (f64, u64) {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let h2 = if protocol == Protocol::Http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            TokioIo::new(open(target).await),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(connection);
        Some(sender)
    } else {
        None
    };
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let target = target.clone();
            let h2 = h2.clone();
            tokio::spawn(async move {
                let mut sender = match h2 {
                    Some(sender) => Sender::Http2(sender),
                    None => {
                        let (sender, connection) = hyper::client::conn::http1::handshake(
                            TokioIo::new(open(&target).await),
                        )
                        .await
                        .expect("h1 handshake");
                        tokio::spawn(connection);
                        Sender::Http1(sender)
                    }
                };
                let mut latencies = Vec::new();
                while Instant::now() < end {
                    let start = Instant::now();
                    sender.call().await;
                    latencies.push(start.elapsed().as_micros() as u64);
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let p99 = all.get(all.len() * 99 / 100).copied().unwrap_or(0);
    (all.len() as f64 / elapsed, p99)
}

/// New connections per second, each answering one request.
async fn connections(target: &Target, seconds: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(open(target).await))
                .await
                .expect("h1 handshake");
        let connection = tokio::spawn(connection);
        let mut sender = Sender::Http1(sender);
        sender.call().await;
        drop(sender);
        let _ = connection.await;
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let mut seconds = 2.0;
    let mut rounds = 3;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds S")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds R")
            }
            "--bench" => {}
            other => panic!("unknown argument {other}; use --seconds S --rounds R"),
        }
    }
    let servers = common::served_runtime(2);
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");

    // A CA and a certificate for localhost.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("plain.toml"),
        "model = \"plain\"\nchampion = \"v1\"\n[versions.v1]\nplugin = \"ttm-rules-v1\"\n",
    )
    .unwrap();

    let plain = servers
        .block_on(gateway::server::start(common::gateway_options(&policies)))
        .expect("plain gateway");
    let mut options = common::gateway_options(&policies);
    options.server.tls = Some(gateway::server::TlsConfig {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        client_ca: None,
    });
    let tls = servers
        .block_on(gateway::server::start(options))
        .expect("TLS gateway");

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let connector = |alpn: &[&[u8]]| {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    };
    let cleartext = Target {
        addr: plain.local_addr(),
        tls: None,
    };
    let https_h1 = Target {
        addr: tls.local_addr(),
        tls: Some(connector(&[b"http/1.1"])),
    };
    let https_h2 = Target {
        addr: tls.local_addr(),
        tls: Some(connector(&[b"h2"])),
    };

    let mut table = String::from(
        "| in flight | cleartext HTTP/1.1 | HTTPS HTTP/1.1 | cleartext HTTP/2 | HTTPS HTTP/2 |\n|---:|---:|---:|---:|---:|\n",
    );
    let mut json = Vec::new();
    for in_flight in [1usize, 64] {
        let mut rates: [Vec<f64>; 4] = Default::default();
        let mut p99s: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            let runs = [
                (&cleartext, Protocol::Http1),
                (&https_h1, Protocol::Http1),
                (&cleartext, Protocol::Http2),
                (&https_h2, Protocol::Http2),
            ];
            for (i, (target, protocol)) in runs.into_iter().enumerate() {
                let (rate, p99) = client.block_on(throughput(target, protocol, in_flight, seconds));
                rates[i].push(rate);
                p99s[i].push(p99 as f64);
            }
        }
        let rate: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
        let p99: Vec<f64> = p99s.iter_mut().map(|r| median(r)).collect();
        let cell = |i: usize| {
            if i == 0 {
                format!("{:.0} req/s, p99 {:.2} ms", rate[0], p99[0] / 1000.0)
            } else {
                format!(
                    "{:.2} of it, p99 {:.2} ms",
                    rate[i] / rate[0],
                    p99[i] / 1000.0
                )
            }
        };
        table += &format!(
            "| {in_flight} | {} | {} | {} | {} |\n",
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        );
        json.push(format!(
            "{{\"in_flight\":{in_flight},\"rates\":{rate:?},\"p99_us\":{p99:?}}}"
        ));
    }
    let (mut plain_new, mut tls_new) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        plain_new.push(client.block_on(connections(&cleartext, seconds)));
        tls_new.push(client.block_on(connections(&https_h1, seconds)));
    }
    let (plain_new, tls_new) = (median(&mut plain_new), median(&mut tls_new));
    table += &format!(
        "\nNew connections, one request each: cleartext {plain_new:.0}/s, TLS (handshake included) {tls_new:.0}/s ({:.2} of cleartext).\n",
        tls_new / plain_new
    );
    let markdown = format!(
        "Front door: {rounds} rounds of {seconds} s, medians; ratios against cleartext HTTP/1.1 in the same run.\n\n{table}"
    );
    json.push(format!(
        "{{\"new_connections_per_s\":{{\"cleartext\":{plain_new},\"tls\":{tls_new}}}}}"
    ));
    common::write_results("front", &markdown, Some(format!("[{}]", json.join(","))));
    servers.block_on(async {
        plain.shutdown().await;
        tls.shutdown().await;
    });
}
