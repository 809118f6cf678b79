//! What the benchmarks share: a keep-alive HTTP/1.1 client connection.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

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
        let request = Request::post(path)
            .header("host", &self.host)
            .body(Full::new(body.clone()))
            .ok()?;
        self.sender.ready().await.ok()?;
        let response = self.sender.send_request(request).await.ok()?;
        let ok = response.status() == 200;
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        ok.then_some(bytes)
    }
}
