//! The timeouts of one connection's byte stream, which hyper does not
//! have: the first bytes must come soon after the connection opens, a
//! connection with no request in flight is closed after an idle time, and
//! a client that stops reading its response is cut off after a write
//! timeout. Each of them fails the stream's next read or write with
//! `TimedOut`, which ends the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The timeouts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamTimeouts {
    /// From the connection's start to its first byte.
    pub first_byte: Duration,
    /// With no request in flight, between two reads.
    pub idle: Duration,
    /// A write that makes no progress.
    pub write: Duration,
}

/// Requests of one connection being answered: while there are any, the
/// connection is not idle (a plugin call may take seconds without a byte
/// moving).
#[derive(Clone, Debug, Default)]
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts a request until the guard is dropped.
    pub(crate) fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.0.clone())
    }

    fn any(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

pub(crate) struct InFlightGuard(Arc<AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream with [`StreamTimeouts`]. One timer per connection, armed for
/// the earliest deadline that applies: the connection's future is one
/// task, so whichever side the timer wakes, both are polled again.
pub(crate) struct Guarded<S> {
    inner: S,
    timeouts: StreamTimeouts,
    in_flight: InFlight,
    timer: Pin<Box<Sleep>>,
    /// Whether a byte was ever read.
    started: bool,
    /// When the last read returned bytes (or the connection started).
    last_read: Instant,
    /// When the pending write started waiting.
    write_blocked: Option<Instant>,
}

impl<S> Guarded<S> {
    pub(crate) fn new(inner: S, timeouts: StreamTimeouts, in_flight: InFlight) -> Self {
        let now = Instant::now();
        Guarded {
            inner,
            timeouts,
            in_flight,
            timer: Box::pin(tokio::time::sleep_until(now + timeouts.first_byte)),
            started: false,
            last_read: now,
            write_blocked: None,
        }
    }

    /// When an idle reader times out, if it does.
    fn read_deadline(&self) -> Option<Instant> {
        if !self.started {
            Some(self.last_read + self.timeouts.first_byte)
        } else if self.in_flight.any() {
            None
        } else {
            Some(self.last_read + self.timeouts.idle)
        }
    }

    /// Arms the timer for `deadline` (and the write deadline, if earlier);
    /// whether `deadline` has passed already.
    fn arm(&mut self, cx: &mut Context<'_>, deadline: Option<Instant>) -> bool {
        let write = self.write_blocked.map(|since| since + self.timeouts.write);
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
                if buf.filled().len() > before {
                    this.started = true;
                    this.last_read = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = this.read_deadline();
                if this.arm(cx, deadline) && deadline.is_some_and(|d| Instant::now() >= d) {
                    return Poll::Ready(Err(timed_out(if this.started {
                        "the connection was idle for too long"
                    } else {
                        "the client sent nothing in time"
                    })));
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
        let deadline = self.read_deadline();
        self.arm(cx, deadline);
        if Instant::now() >= since + self.timeouts.write {
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
            idle: Duration::from_millis(100),
            write: Duration::from_millis(50),
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_then_an_idle_one() {
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = Guarded::new(server, timeouts(), InFlight::default());
        let mut buf = [0u8; 8];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("sent nothing"));

        let (mut client2, server) = tokio::io::duplex(64);
        let in_flight = InFlight::default();
        let mut guarded = Guarded::new(server, timeouts(), in_flight.clone());
        client2.write_all(b"x").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
        // A request in flight: no idle timeout however long it takes.
        let guard = in_flight.enter();
        let read = tokio::time::timeout(Duration::from_millis(400), guarded.read(&mut buf)).await;
        assert!(read.is_err(), "timed out with a request in flight");
        drop(guard);
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert!(err.to_string().contains("idle"));
        drop(client);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_is_cut_off() {
        let (_client, server) = tokio::io::duplex(16);
        let mut guarded = Guarded::new(server, timeouts(), InFlight::default());
        let err = guarded.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("did not read"));
    }
}
