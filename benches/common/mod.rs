//! What the benchmarks share: a keep-alive HTTP/1.1 client connection, the
//! options of an in-process gateway, and where results are written. Each
//! benchmark uses part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The benchmarks run on the binary's allocator, so what they measure is
/// what the gateway costs as shipped (glibc's allocator and mimalloc
/// differ in the cost of a request and in how they fail under load).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A runtime for an in-process gateway, built as the binary builds its
/// own, with the allocator set up as the binary sets it.
pub fn served_runtime(threads: usize) -> tokio::runtime::Runtime {
    gateway::process::tune_allocator();
    gateway::process::runtime(Some(threads)).expect("server runtime")
}

/// One keep-alive client connection.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        Connection {
            sender,
            host: addr.to_string(),
        }
    }

    /// One request; its body, or `None` on any failure or non-200 answer.
    pub async fn send(&mut self, path: &str, body: &Bytes) -> Option<Bytes> {
        match self.post(path, &[], body).await {
            Some((200, bytes)) => Some(bytes),
            _ => None,
        }
    }

    /// One POST with extra `headers`: the status and the body, or `None`
    /// when the connection failed (it is then unusable).
    pub async fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> Option<(u16, Bytes)> {
        let mut request = Request::post(path).header("host", &self.host);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.clone())).ok()?;
        self.sender.ready().await.ok()?;
        let response = self.sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, bytes))
    }
}

/// One request on a fresh connection (`connection: close`), read to its
/// end within 10 s: the status and the body.
pub fn once(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let status = reply.split(' ').nth(1)?.parse().ok()?;
    let body = reply.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// A free loopback port (for a gateway process to listen on).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Resident memory of process `pid`, in KiB (0 if it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    gateway::process::resident_kib(pid).unwrap_or(0)
}

/// Options for an in-process gateway on a free loopback port serving the
/// policies in `dir`, without the file watcher.
pub fn gateway_options(dir: &Path) -> gateway::server::ServeOptions {
    let mut options = gateway::server::ServeOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        dir.to_path_buf(),
        vec![],
    );
    options.watch_debounce = None;
    options
}

/// Prints `markdown` and writes it, and `json` if given, as `{name}.md` and
/// `{name}.json` in `$CARGO_TARGET_DIR` (or the repository's `target/`).
pub fn write_results(name: &str, markdown: &str, json: Option<String>) {
    println!("{markdown}");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    if std::fs::create_dir_all(&target).is_err() {
        return;
    }
    let _ = std::fs::write(target.join(format!("{name}.md")), markdown);
    if let Some(json) = json {
        let _ = std::fs::write(target.join(format!("{name}.json")), json);
    }
    println!("written to {}", target.join(format!("{name}.*")).display());
}
