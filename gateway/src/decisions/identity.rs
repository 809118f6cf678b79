//! Who a request is: its id (the client's `x-request-id`, checked, or one
//! the gateway makes) and the W3C trace it belongs to (`traceparent`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;

/// The header that carries a request's id, both ways.
pub(crate) const REQUEST_ID_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-request-id");

/// The longest request id a client may send.
pub(crate) const MAX_REQUEST_ID_BYTES: usize = 128;

/// A request's id and trace, carried into its decision records and logs
/// (its shadow copies' records too).
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub request_id: Arc<str>,
    pub trace: Option<Trace>,
}

/// A W3C trace context (`traceparent: 00-<trace-id>-<parent-id>-<flags>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Trace {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

impl Trace {
    pub(crate) fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub(crate) fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

/// Why a request's identity headers are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadRequestId(pub String);

impl Identity {
    /// The identity of a request with these headers: the client's
    /// `x-request-id` if it is 1 to 128 visible ASCII characters (another
    /// one is refused, so a client never loses track of its request), else
    /// a new one; the trace of a valid `traceparent` (an invalid one is
    /// ignored, as the W3C specification says).
    pub(crate) fn of(headers: &HeaderMap) -> Result<Identity, BadRequestId> {
        let request_id = match headers.get(REQUEST_ID_HEADER) {
            Some(value) => {
                let bytes = value.as_bytes();
                check_id_bytes(bytes)
                    .map_err(|e| BadRequestId(format!("header `{REQUEST_ID_HEADER}` {e}")))?;
                // Checked: ASCII.
                Arc::from(String::from_utf8_lossy(bytes).as_ref())
            }
            None => new_request_id(),
        };
        let trace = headers
            .get("traceparent")
            .and_then(|v| parse_traceparent(v.as_bytes()));
        Ok(Identity { request_id, trace })
    }
}

/// Whether `id` may be a request id (1 to 128 visible ASCII characters).
pub(crate) fn check_request_id(id: &str) -> Result<(), String> {
    check_id_bytes(id.as_bytes())
}

fn check_id_bytes(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty()
        || bytes.len() > MAX_REQUEST_ID_BYTES
        || !bytes.iter().all(|b| (0x21..=0x7e).contains(b))
    {
        return Err(format!(
            "must be 1 to {MAX_REQUEST_ID_BYTES} visible ASCII characters (no spaces); it has {} bytes",
            bytes.len()
        ));
    }
    Ok(())
}

/// A new request id: 32 hexadecimal digits, a random prefix chosen once
/// per process and a counter, unique without a system call per request.
pub(crate) fn new_request_id() -> Arc<str> {
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut bytes = [0u8; 8];
        // No randomness: the time and the process id still tell processes apart.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            bytes = (now ^ u64::from(std::process::id()) << 32).to_le_bytes();
        }
        u64::from_le_bytes(bytes)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&prefix.to_be_bytes());
    id[8..].copy_from_slice(&n.to_be_bytes());
    Arc::from(hex(&id))
}

/// `00-<32 hex>-<16 hex>-<2 hex>`, lower-case, with neither id all zeros;
/// later versions may append fields after the flags.
fn parse_traceparent(value: &[u8]) -> Option<Trace> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let known_version = version == "00";
    if version.len() != 2
        || version == "ff"
        || (known_version && parts.next().is_some())
        || trace_id.len() != 32
        || parent_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let trace_id: [u8; 16] = unhex(trace_id)?.try_into().ok()?;
    let parent_id: [u8; 8] = unhex(parent_id)?.try_into().ok()?;
    let flags = unhex(flags)?[0];
    unhex(version)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(Trace {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(*pair.get(1)?)?))
        .collect()
}

/// Lower-case hex, two digits a byte. By hand: `write!` with padding costs
/// a formatter call per byte, and a request id is made on every request.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * bytes.len());
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn request_ids_are_kept_checked_or_made() {
        let id = Identity::of(&headers(&[("x-request-id", "abc-123")])).unwrap();
        assert_eq!(&*id.request_id, "abc-123");
        let made = Identity::of(&HeaderMap::new()).unwrap();
        let other = Identity::of(&HeaderMap::new()).unwrap();
        assert_eq!(made.request_id.len(), 32);
        assert!(
            made.request_id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        // The second half counts requests.
        let count = |id: &str| u64::from_str_radix(&id[16..], 16).unwrap();
        assert!(count(&other.request_id) > count(&made.request_id));
        assert_eq!(made.request_id[..16], other.request_id[..16]);
        assert_ne!(made.request_id, other.request_id);
        for bad in ["has space", &"x".repeat(129)] {
            let e = Identity::of(&headers(&[("x-request-id", bad)])).unwrap_err();
            assert!(e.0.contains("x-request-id"), "{e:?}");
        }
        assert!(Identity::of(&headers(&[("x-request-id", &"x".repeat(128))])).is_ok());
    }

    #[test]
    fn traceparent_follows_the_w3c_format() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = parse_traceparent(good.as_bytes()).unwrap();
        assert_eq!(trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert!(trace.sampled);
        // A later version may add fields; version 00 may not.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }
}
