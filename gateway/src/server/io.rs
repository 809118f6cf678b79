//! The timeouts of one connection's byte stream, which hyper does not
//! have (or has only in part): the first bytes must come soon after the
//! connection opens; an HTTP/1 request head must be complete within the
//! header timeout of its first byte; a connection with no request in
//! flight is closed after the idle time, counted from the end of its last
//! response, whatever bytes (HTTP/2 pings) move meanwhile; and a client
//! that stops reading is cut off after the write timeout, as is an HTTP/2
//! client that stops taking one of its answers (its stream's window stays
//! shut). Each of them fails the stream's next read or write with
//! `TimedOut`, which ends the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The timeouts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamTimeouts {
    /// From the connection's start to its first byte.
    pub first_byte: Duration,
    /// HTTP/1: from the first byte of a request head to its end.
    pub head: Duration,
    /// With no request in flight, from the end of the last response (or
    /// the connection's start).
    pub idle: Duration,
    /// A write that makes no progress.
    pub write: Duration,
}

/// Requests of one connection being answered, and since when there have
/// been none: while there are any, the connection is not idle (a plugin
/// call may take seconds without a byte moving). A request counts until
/// its response body is dropped (sent, or abandoned).
#[derive(Clone, Debug)]
pub(crate) struct InFlight(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    count: AtomicUsize,
    /// Nanoseconds after `base` at which the count last fell to zero.
    idle_since: AtomicU64,
    base: Instant,
    /// Whether the connection speaks HTTP/2 (no HTTP/1 head timeout).
    http2: AtomicBool,
    /// The reader that found requests in flight and so armed no idle
    /// timer: woken when the last one ends, to arm it.
    reader: std::sync::Mutex<Option<std::task::Waker>>,
    /// HTTP/2: the answers being sent, and when each last took a step.
    answers: std::sync::Mutex<Answers>,
}

#[derive(Debug, Default)]
struct Answers {
    next: u64,
    live: Vec<(u64, Arc<AtomicU64>)>,
}

impl Shared {
    fn nanos(&self) -> u64 {
        self.base.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        // Nothing is left half-done under this lock.
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl InFlight {
    pub(crate) fn new() -> Self {
        InFlight(Arc::new(Shared {
            count: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            base: Instant::now(),
            http2: AtomicBool::new(false),
            reader: std::sync::Mutex::new(None),
            answers: std::sync::Mutex::new(Answers::default()),
        }))
    }

    /// When the answer that has waited longest took its last step.
    fn oldest_answer(&self) -> Option<Instant> {
        if !self.http2() {
            return None;
        }
        let answers = self.0.answers();
        let nanos = answers
            .live
            .iter()
            .map(|(_, at)| at.load(Ordering::Acquire))
            .min()?;
        Some(self.0.base + Duration::from_nanos(nanos))
    }

    /// Counts a request until the guard is dropped.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }

    /// The connection speaks HTTP/2 (ALPN said so, or its preface).
    pub(crate) fn set_http2(&self) {
        self.0.http2.store(true, Ordering::Release);
    }

    /// Wakes `cx`'s task when the last request in flight ends.
    fn wait_for_idle(&self, cx: &Context<'_>) {
        if let Ok(mut reader) = self.0.reader.lock() {
            *reader = Some(cx.waker().clone());
        }
        // Ended meanwhile: look again at once.
        if !self.any() {
            cx.waker().wake_by_ref();
        }
    }

    fn any(&self) -> bool {
        self.0.count.load(Ordering::Acquire) > 0
    }

    fn idle_since(&self) -> Instant {
        self.0.base + Duration::from_nanos(self.0.idle_since.load(Ordering::Acquire))
    }

    fn http2(&self) -> bool {
        self.0.http2.load(Ordering::Acquire)
    }
}

pub(crate) struct InFlightGuard(Arc<Shared>);

impl InFlightGuard {
    /// HTTP/2: watches an answer's body from now until it is dropped. An
    /// HTTP/2 body waits for its stream's window, which the client opens,
    /// while the socket may stay writable (other streams, pings): the
    /// write timeout of the socket never sees it, so the connection times
    /// out when an answer takes no step for the write timeout.
    pub(crate) fn watch_answer(&self) -> Option<AnswerProgress> {
        if !self.0.http2.load(Ordering::Acquire) {
            return None;
        }
        let at = Arc::new(AtomicU64::new(self.0.nanos()));
        let mut answers = self.0.answers();
        let id = answers.next;
        answers.next += 1;
        answers.live.push((id, at.clone()));
        drop(answers);
        Some(AnswerProgress {
            shared: self.0.clone(),
            id,
            at,
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle_since.store(self.0.nanos(), Ordering::Release);
            // The connection may be waiting to read with no timer armed
            // (it was busy when it last looked): it arms the idle one now.
            let reader = self.0.reader.lock().map(|mut r| r.take()).unwrap_or(None);
            if let Some(reader) = reader {
                reader.wake();
            }
        }
    }
}

/// An HTTP/2 answer being sent: when its body last took a step.
pub(crate) struct AnswerProgress {
    shared: Arc<Shared>,
    id: u64,
    at: Arc<AtomicU64>,
}

impl AnswerProgress {
    fn step(&self) {
        self.at.store(self.shared.nanos(), Ordering::Release);
    }
}

impl Drop for AnswerProgress {
    fn drop(&mut self) {
        let mut answers = self.shared.answers();
        if let Some(i) = answers.live.iter().position(|(id, _)| *id == self.id) {
            answers.live.swap_remove(i);
        }
    }
}

/// The largest frame a response body yields. hyper hands a whole frame to
/// the connection once the stream can take one byte of it (HTTP/2) or its
/// write buffer has room (HTTP/1), and then drops the body: in frames of
/// this size, the rest of an answer a client does not take stays in the
/// body, and so in the budget of bytes in flight.
const FRAME_BYTES: usize = 64 << 10;

/// A response body that keeps its request counted in flight, and its
/// bytes in the budget of bytes in flight, until it is dropped; yields at
/// most [`FRAME_BYTES`] at a time, and tells the connection of each step
/// (HTTP/2).
pub(crate) struct CountedBody<B> {
    inner: B,
    /// The part of the inner body's last frame not yet yielded.
    rest: Bytes,
    progress: Option<AnswerProgress>,
    _guard: InFlightGuard,
    _bytes: Option<crate::pipeline::AnswerBytes>,
}

impl<B> CountedBody<B> {
    pub(crate) fn new(
        inner: B,
        guard: InFlightGuard,
        bytes: Option<crate::pipeline::AnswerBytes>,
        progress: Option<AnswerProgress>,
    ) -> Self {
        CountedBody {
            inner,
            rest: Bytes::new(),
            progress,
            _guard: guard,
            _bytes: bytes,
        }
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(progress) = &this.progress {
            progress.step();
        }
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.len() > FRAME_BYTES => this.rest = data,
                    Ok(data) => return Poll::Ready(Some(Ok(hyper::body::Frame::data(data)))),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let take = this.rest.len().min(FRAME_BYTES);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(this.rest.split_to(take)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// The HTTP/2 connection preface's first bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A stream with [`StreamTimeouts`]. One timer per connection, armed for
/// the earliest deadline that applies: the connection's future is one
/// task, so whichever side the timer wakes, both are polled again.
pub(crate) struct Guarded<S> {
    inner: S,
    timeouts: StreamTimeouts,
    in_flight: InFlight,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    /// Whether a byte was ever read.
    read_any: bool,
    /// Whether to look for the HTTP/2 preface in the first bytes
    /// (cleartext; under TLS, ALPN tells).
    sniff: bool,
    /// When the first byte read since the connection went idle came: a
    /// request head in progress (HTTP/1).
    head_since: Option<Instant>,
    /// When the pending write started waiting.
    write_blocked: Option<Instant>,
}

/// `at + after`, or far in the future if that does not fit.
fn later(at: Instant, after: Duration) -> Instant {
    at.checked_add(after)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 3600))
}

impl<S> Guarded<S> {
    /// `sniff`: whether the stream is cleartext HTTP (the first bytes say
    /// whether it is HTTP/2).
    pub(crate) fn new(
        inner: S,
        timeouts: StreamTimeouts,
        in_flight: InFlight,
        sniff: bool,
    ) -> Self {
        let now = Instant::now();
        Guarded {
            inner,
            timeouts,
            in_flight,
            timer: Box::pin(tokio::time::sleep_until(later(now, timeouts.first_byte))),
            started: now,
            read_any: false,
            sniff,
            head_since: None,
            write_blocked: None,
        }
    }

    /// When a waiting reader times out, if it does, and why.
    fn read_deadline(&self) -> Option<(Instant, &'static str)> {
        if !self.read_any {
            return Some((
                later(self.started, self.timeouts.first_byte),
                "the client sent nothing in time",
            ));
        }
        if self.in_flight.any() {
            return self.in_flight.oldest_answer().map(|at| {
                (
                    later(at, self.timeouts.write),
                    "the client did not take an answer in time",
                )
            });
        }
        let idle_since = self.in_flight.idle_since().max(self.started);
        match self.head_since {
            Some(head) if head >= idle_since && !self.in_flight.http2() => Some((
                later(head, self.timeouts.head),
                "the request head did not arrive in time",
            )),
            _ => Some((
                later(idle_since, self.timeouts.idle),
                "the connection was idle for too long",
            )),
        }
    }

    /// Arms the timer for `deadline` (and the write deadline, if earlier);
    /// whether `deadline` has passed already.
    fn arm(&mut self, cx: &mut Context<'_>, deadline: Option<Instant>) -> bool {
        let write = self
            .write_blocked
            .map(|since| later(since, self.timeouts.write));
        let Some(at) = [deadline, write].into_iter().flatten().min() else {
            return false;
        };
        if self.timer.deadline() != at {
            self.timer.as_mut().reset(at);
        }
        // Registers the waker; ready means the earliest deadline passed.
        self.timer.as_mut().poll(cx).is_ready()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let filled = &buf.filled()[before..];
                if !filled.is_empty() {
                    if !this.read_any && this.sniff && filled.starts_with(H2_PREFACE) {
                        this.in_flight.set_http2();
                    }
                    this.read_any = true;
                    let now = Instant::now();
                    let idle_since = this.in_flight.idle_since();
                    if !this.in_flight.any() && this.head_since.is_none_or(|h| h < idle_since) {
                        this.head_since = Some(now);
                    }
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                // The waker first: a request that ends between the two
                // wakes this read, which then arms the idle timer.
                if this.in_flight.any() {
                    this.in_flight.wait_for_idle(cx);
                }
                let deadline = this.read_deadline();
                let fired = this.arm(cx, deadline.map(|(at, _)| at));
                if let Some((at, why)) = deadline
                    && fired
                    && Instant::now() >= at
                {
                    return Poll::Ready(Err(timed_out(why)));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                this.write_blocked = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.write_pending(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.write_blocked = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.write_pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(result) => {
                this.write_blocked = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.write_pending(cx).map_ok(|_| ()),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> Guarded<S> {
    /// A write that cannot proceed: fails once it has waited the write
    /// timeout.
    fn write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let since = *self.write_blocked.get_or_insert_with(Instant::now);
        let deadline = self.read_deadline().map(|(at, _)| at);
        self.arm(cx, deadline);
        if Instant::now() >= later(since, self.timeouts.write) {
            return Poll::Ready(Err(timed_out(
                "the client did not read its response in time",
            )));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timeouts() -> StreamTimeouts {
        StreamTimeouts {
            first_byte: Duration::from_millis(50),
            head: Duration::from_millis(80),
            idle: Duration::from_millis(150),
            write: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (_client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, timeouts(), InFlight::new(), true);
        let err = guarded.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("sent nothing"));
    }

    #[tokio::test]
    async fn a_head_has_its_time_and_idle_counts_from_the_last_response() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = InFlight::new();
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone(), true);
        let mut buf = [0u8; 8];
        client.write_all(b"G").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
        // The rest of the head never comes.
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("request head"), "{err}");

        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone(), true);
        client.write_all(b"GET").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
        // A request in flight: no timeout however long it takes.
        let guard = in_flight.enter();
        let read = tokio::time::timeout(Duration::from_millis(400), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "timed out with a request in flight");
        // Idle from the end of the response, not from the last read.
        drop(guard);
        let ended = std::time::Instant::now();
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        assert!(ended.elapsed() >= Duration::from_millis(140));
    }

    /// A read already waiting when the last request ends (it saw the
    /// request in flight and armed no timer) still times out as idle.
    #[tokio::test]
    async fn a_waiting_reader_learns_that_the_last_request_ended() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = InFlight::new();
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone(), true);
        client.write_all(b"GET").await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 3);
        let guard = in_flight.enter();
        let reader = tokio::spawn(async move { guarded.read(&mut [0u8; 8]).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(guard);
        let read = tokio::time::timeout(Duration::from_secs(2), reader).await;
        let err = read
            .expect("the reader was never woken")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        drop(client);
    }

    #[tokio::test]
    async fn http2_pings_do_not_keep_an_idle_connection() {
        let (mut client, server) = tokio::io::duplex(256);
        let in_flight = InFlight::new();
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone(), true);
        let mut buf = [0u8; 64];
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        assert!(guarded.read(&mut buf).await.unwrap() > 0);
        let started = std::time::Instant::now();
        let pinging = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if client.write_all(b"p").await.is_err() {
                    return;
                }
            }
        });
        let err = loop {
            match guarded.read(&mut buf).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("idle"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
        pinging.abort();
    }

    #[tokio::test]
    async fn bodies_yield_bounded_frames_and_count_until_dropped() {
        use http_body_util::{BodyExt, Full};
        use hyper::body::Body;
        let in_flight = InFlight::new();
        let data = Bytes::from(vec![1u8; FRAME_BYTES * 2 + 10]);
        let mut body = CountedBody::new(Full::new(data.clone()), in_flight.enter(), None, None);
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let (mut sizes, mut all) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            sizes.push(chunk.len());
            all.extend_from_slice(&chunk);
            let left = (data.len() - all.len()) as u64;
            assert_eq!(body.size_hint().exact(), Some(left));
            assert_eq!(body.is_end_stream(), left == 0);
        }
        assert_eq!(sizes, [FRAME_BYTES, FRAME_BYTES, 10]);
        assert_eq!(all, data);
        assert!(in_flight.any());
        drop(body);
        assert!(!in_flight.any());
    }

    /// HTTP/2: an answer that takes no step for the write timeout times
    /// the connection out, even with the socket idle; one that does not
    /// exist any more does not.
    #[tokio::test]
    async fn a_stalled_http2_answer_times_the_connection_out() {
        let (mut client, server) = tokio::io::duplex(256);
        let in_flight = InFlight::new();
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone(), true);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(guarded.read(&mut buf).await.unwrap() > 0);
        let guard = in_flight.enter();
        let progress = guard.watch_answer().expect("watched on HTTP/2");
        let started = std::time::Instant::now();
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("did not take an answer"), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(45));
        drop(progress);
        // Only the answer's own steps count: with it gone and the request
        // still in flight, the connection waits.
        let read = tokio::time::timeout(Duration::from_millis(300), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "timed out with no answer to wait for");
        drop(guard);
        drop(client);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_is_cut_off() {
        let (_client, server) = tokio::io::duplex(16);
        let mut guarded = Guarded::new(server, timeouts(), InFlight::new(), true);
        let err = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not read"));
    }
}
