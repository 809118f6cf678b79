//! The network sink: the records the log writes, sent on to an HTTP
//! endpoint as CloudEvents in batched content mode
//! (`application/cloudevents-batch+json`, one JSON array of events per
//! POST), what fleets' event brokers and collectors receive. KServe's
//! payload logger sends the same kind of event, one per request.
//!
//! It never slows a request, and never the file log: the writer hands each
//! batch it wrote to a queue of bounded bytes ([`QUEUE_BYTES`]) and goes on;
//! a thread of its own sends what queued, coalesced into POSTs of at most
//! [`POST_BYTES`], over one kept-alive connection, each POST within
//! [`SEND_TIMEOUT`] and retried twice. A full queue, or a batch the endpoint
//! still refuses after its retries, is dropped and counted
//! (`gateway_decisions_sink_dropped_total{reason="queue_full"|"send_failed"}`);
//! the file keeps every record either way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender as Queue};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

use super::Counters;
use crate::http_url::HttpUrl;

/// The bytes of records waiting to be sent; more are dropped.
const QUEUE_BYTES: usize = 16 << 20;

/// A POST carries at most this much (records coalesced from the queue,
/// with their envelopes), or one record if that alone is more.
const POST_BYTES: usize = 1 << 20;

/// An event's envelope around its record, at most (the attributes; the
/// request id is at most 128 bytes).
const ENVELOPE_BYTES: usize = 512;

/// Connecting, sending and getting the answer of one POST.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits before the second and third attempt of a POST.
const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

/// The most of an endpoint's answer read (and then dropped).
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// How long a stopping gateway waits for the sink to send what it holds.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// The events' `type`; the schema of their `data` is the record's.
pub(crate) const EVENT_TYPE: &str = "wasm-model-gateway.decision.v1";

/// One record as the sink sends it.
pub(super) struct Event {
    /// The SHA-256 of the record's line: the event's `id` (unique, and
    /// the next record's `prev`).
    pub hash: String,
    pub request_id: Arc<str>,
    pub time: String,
    pub line: String,
}

/// The writer's handle on the sink.
pub(super) struct Forwarder {
    /// `None` once dropped (closing the queue ends the sender).
    queue: Option<Queue<Vec<Event>>>,
    queued_bytes: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    stopped: std::sync::mpsc::Receiver<()>,
}

impl Drop for Forwarder {
    /// Closes the queue and gives the sender [`FLUSH_WAIT`] to send what
    /// it holds.
    fn drop(&mut self) {
        self.queue.take();
        let _ = self.stopped.recv_timeout(FLUSH_WAIT);
    }
}

impl Forwarder {
    /// Starts the sender thread for `url`.
    pub(super) fn start(url: HttpUrl, counters: Arc<Counters>) -> Result<Self, String> {
        // Batches are at most a megabyte: the byte bound is what limits.
        let (queue, receiver) = tokio::sync::mpsc::channel(QUEUE_BYTES / 4096);
        let (done, stopped) = std::sync::mpsc::channel();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let sender = Sender {
            url,
            source: source(),
            queued_bytes: queued_bytes.clone(),
            counters: counters.clone(),
            last_failure_log: None,
        };
        std::thread::Builder::new()
            .name("decision-sink".into())
            .spawn(move || {
                sender.run(receiver);
                let _ = done.send(());
            })
            .map_err(|e| format!("cannot start the decision sink's sender: {e}"))?;
        Ok(Forwarder {
            queue: Some(queue),
            queued_bytes,
            counters,
            stopped,
        })
    }

    /// Queues records the log wrote; never waits. Past [`QUEUE_BYTES`]
    /// they are dropped and counted.
    pub(super) fn send(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        let bytes: usize = events.iter().map(|e| e.line.len()).sum();
        let full = || {
            self.counters.sink_full.fetch_add(n, Ordering::Relaxed);
        };
        if self.queued_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return full();
        }
        let sent = match &self.queue {
            Some(queue) => queue.try_send(events),
            None => Err(TrySendError::Closed(events)),
        };
        if sent.is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            full();
        }
    }
}

/// The bytes of the records in `events`.
fn size(events: &VecDeque<Event>) -> usize {
    events.iter().map(|e| e.line.len() + ENVELOPE_BYTES).sum()
}

/// The events' `source`: this gateway, by host name.
fn source() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
        .unwrap_or_else(|| "localhost".into());
    format!("/wasm-model-gateway/{host}")
}

struct Sender {
    url: HttpUrl,
    source: String,
    queued_bytes: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    last_failure_log: Option<Instant>,
}

type Connection = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Why a POST failed, and whether another attempt may succeed.
struct Failure {
    message: String,
    retry: bool,
}

impl From<String> for Failure {
    /// A failure of the connection: worth another attempt.
    fn from(message: String) -> Self {
        Failure {
            message,
            retry: true,
        }
    }
}

impl Sender {
    /// Sends until the queue is closed and empty. The runtime runs for
    /// the thread's whole life, so the kept connection's task notices
    /// when the endpoint closes it between POSTs.
    fn run(self, queue: Receiver<Vec<Event>>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(
                    "decision sink: cannot start its runtime: {e}; records are not sent"
                );
                return;
            }
        };
        runtime.block_on(self.send_all(queue));
    }

    async fn send_all(mut self, mut queue: Receiver<Vec<Event>>) {
        let mut connection: Option<Connection> = None;
        let mut pending: VecDeque<Event> = VecDeque::new();
        loop {
            if pending.is_empty() {
                match queue.recv().await {
                    Some(events) => pending.extend(events),
                    None => return,
                }
            }
            // One POST: what is pending and queued, up to POST_BYTES.
            while let Ok(more) = queue.try_recv() {
                pending.extend(more);
                if size(&pending) >= POST_BYTES {
                    break;
                }
            }
            let mut events = Vec::new();
            let mut bytes = 0;
            while let Some(next) = pending.front() {
                let more = next.line.len() + ENVELOPE_BYTES;
                if !events.is_empty() && bytes + more > POST_BYTES {
                    break;
                }
                bytes += more;
                events.extend(pending.pop_front());
            }
            let body = Bytes::from(self.body(&events));
            let mut result = Ok(());
            for wait in std::iter::once(Duration::ZERO).chain(RETRY_WAITS) {
                tokio::time::sleep(wait).await;
                result = self.post(&mut connection, body.clone()).await;
                match &result {
                    Ok(()) => break,
                    Err(failure) => {
                        connection = None;
                        if !failure.retry {
                            break;
                        }
                    }
                }
            }
            self.done(&events);
            let n = events.len() as u64;
            match result {
                Ok(()) => {
                    self.counters.sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(failure) => {
                    self.counters.sink_failed.fetch_add(n, Ordering::Relaxed);
                    if self
                        .last_failure_log
                        .is_none_or(|at| at.elapsed().as_secs() >= 60)
                    {
                        self.last_failure_log = Some(Instant::now());
                        tracing::error!(
                            sink = %self.url,
                            dropped = n,
                            "decision sink: {}; the records stay in the log's files and are counted (gateway_decisions_sink_dropped_total{{reason=\"send_failed\"}})",
                            failure.message
                        );
                    }
                }
            }
        }
    }

    /// Gives back the queue's bytes of `events`.
    fn done(&self, events: &[Event]) {
        let bytes: usize = events.iter().map(|e| e.line.len()).sum();
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// The POST's body: a JSON array of structured CloudEvents, each
    /// record verbatim as its `data`.
    fn body(&self, events: &[Event]) -> Vec<u8> {
        let bytes: usize = events.iter().map(|e| e.line.len() + 320).sum();
        let mut body = Vec::with_capacity(bytes + 2);
        body.push(b'[');
        let source = json_string(&self.source);
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(
                format!(
                    r#"{{"specversion":"1.0","id":"{}","source":{source},"type":"{EVENT_TYPE}","time":"{}","subject":{},"datacontenttype":"application/json","data":"#,
                    e.hash,
                    e.time,
                    json_string(&e.request_id),
                )
                .as_bytes(),
            );
            body.extend_from_slice(e.line.as_bytes());
            body.push(b'}');
        }
        body.push(b']');
        body
    }

    /// One POST, on the kept connection or a new one, within
    /// [`SEND_TIMEOUT`]; any answer but 2xx is a failure, worth another
    /// attempt unless it is a 4xx other than 408 and 429 (the endpoint
    /// refuses these records).
    async fn post(&self, connection: &mut Option<Connection>, body: Bytes) -> Result<(), Failure> {
        let attempt = async {
            let mut sender = match connection.take() {
                Some(sender) if !sender.is_closed() => sender,
                _ => self.connect().await?,
            };
            sender
                .ready()
                .await
                .map_err(|e| format!("the connection to {} failed: {e}", self.url))?;
            let request = http::Request::post(&self.url.path)
                .header(http::header::HOST, &self.url.authority)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/cloudevents-batch+json; charset=utf-8",
                )
                .body(Full::new(body))
                .map_err(|e| format!("cannot build the request: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("sending to {} failed: {e}", self.url))?;
            let status = response.status();
            // The answer is read (boundedly) so the connection can be
            // kept; one longer than that is not read, and its connection
            // not kept.
            let mut body = response.into_body();
            let mut read = 0;
            let mut keep = true;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| format!("reading {}'s answer: {e}", self.url))?;
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > MAX_ANSWER_BYTES {
                    keep = false;
                    break;
                }
            }
            if !status.is_success() {
                let refused = status.is_client_error()
                    && status != http::StatusCode::REQUEST_TIMEOUT
                    && status != http::StatusCode::TOO_MANY_REQUESTS;
                return Err(Failure {
                    message: format!("{} answered {status}", self.url),
                    retry: !refused,
                });
            }
            if keep {
                *connection = Some(sender);
            }
            Ok(())
        };
        match tokio::time::timeout(SEND_TIMEOUT, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Failure::from(format!(
                "{} did not answer within {} s",
                self.url,
                SEND_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let stream = tokio::net::TcpStream::connect(&self.url.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.url))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("cannot speak HTTP to {}: {e}", self.url))?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}
