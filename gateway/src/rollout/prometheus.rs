//! A client of Prometheus's HTTP query API (`/api/v1/query` and
//! `/api/v1/query_range`), as fleet rollouts read it: one POST per query
//! on a new connection, within [`TIMEOUT`], its answer read up to
//! [`MAX_ANSWER_BYTES`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use serde::Deserialize;

use crate::http_url::HttpUrl;

/// Connecting, asking and reading the answer of one query.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The most of an answer read; a bigger one is an error.
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// One series of an answer: its labels and its samples (time in seconds,
/// value), oldest first.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) points: Vec<(f64, f64)>,
}

/// Prometheus's query API at a URL.
pub(crate) struct Prometheus {
    url: HttpUrl,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resultType", content = "result", rename_all = "lowercase")]
enum Data {
    Matrix(Vec<MatrixSeries>),
    Vector(Vec<VectorSample>),
    Scalar((f64, String)),
    String(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct MatrixSeries {
    metric: BTreeMap<String, String>,
    values: Vec<(f64, String)>,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

impl Prometheus {
    pub(crate) fn new(url: HttpUrl) -> Self {
        Prometheus { url }
    }

    /// `query` evaluated at `time` (seconds since the Unix epoch).
    pub(crate) async fn instant(&self, query: &str, time: f64) -> Result<Vec<Series>, String> {
        let answer = self
            .post(
                "api/v1/query",
                &[("query", query), ("time", &format!("{time:.3}"))],
            )
            .await?;
        match answer {
            Data::Vector(samples) => Ok(samples
                .into_iter()
                .map(|s| Series {
                    labels: s.metric,
                    points: vec![(s.value.0, number(&s.value.1))],
                })
                .collect()),
            Data::Scalar((t, v)) => Ok(vec![Series {
                labels: BTreeMap::new(),
                points: vec![(t, number(&v))],
            }]),
            _ => Err(format!("`{query}` did not answer a vector")),
        }
    }

    /// `query` evaluated at every `step` seconds from `start` to `end`.
    pub(crate) async fn range(
        &self,
        query: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<Series>, String> {
        let answer = self
            .post(
                "api/v1/query_range",
                &[
                    ("query", query),
                    ("start", &format!("{start:.3}")),
                    ("end", &format!("{end:.3}")),
                    ("step", &format!("{step:.3}")),
                ],
            )
            .await?;
        match answer {
            Data::Matrix(series) => Ok(series
                .into_iter()
                .map(|s| Series {
                    labels: s.metric,
                    points: s.values.iter().map(|(t, v)| (*t, number(v))).collect(),
                })
                .collect()),
            _ => Err(format!("`{query}` did not answer a matrix")),
        }
    }

    async fn post(&self, api: &str, form: &[(&str, &str)]) -> Result<Data, String> {
        match tokio::time::timeout(TIMEOUT, self.exchange(api, form)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!(
                "Prometheus at {} did not answer within {} s",
                self.url,
                TIMEOUT.as_secs()
            )),
        }
    }

    async fn exchange(&self, api: &str, form: &[(&str, &str)]) -> Result<Data, String> {
        let url = &self.url;
        let stream = tokio::net::TcpStream::connect(&url.authority)
            .await
            .map_err(|e| format!("cannot connect to Prometheus at {url}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("cannot speak HTTP to Prometheus at {url}: {e}"))?;
        let connection = tokio::spawn(connection);
        let base = url.path.split('?').next().unwrap_or("/");
        let path = format!("{base}{}{api}", if base.ends_with('/') { "" } else { "/" });
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let request = http::Request::post(&path)
            .header(http::header::HOST, &url.authority)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("Prometheus at {url}: {e}"))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading Prometheus's answer from {url}{path}: {e}"))?
            .to_bytes();
        connection.abort();
        let answer: Answer = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "Prometheus at {url}{path} answered {status} with what is not its API's JSON: {e}"
            )
        })?;
        match (answer.status.as_str(), answer.data) {
            ("success", Some(data)) => Ok(data),
            _ => Err(format!(
                "Prometheus at {url}{path} answered {status}: {}",
                answer.error.unwrap_or_else(|| "no data".into())
            )),
        }
    }
}

/// A sample's value (Prometheus writes them as strings, `NaN` and
/// `+Inf` included).
fn number(text: &str) -> f64 {
    text.parse().unwrap_or(f64::NAN)
}

/// `application/x-www-form-urlencoded`, every byte but the unreserved
/// ones percent-encoded.
fn encode(text: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_and_literals_are_escaped() {
        assert_eq!(encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert!(number("NaN").is_nan());
        assert_eq!(number("+Inf"), f64::INFINITY);
        assert_eq!(number("12"), 12.0);
    }

    #[test]
    fn answers_are_read_as_the_api_writes_them() {
        let matrix: Answer = serde_json::from_str(
            r#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{"model":"m"},"values":[[10,"1"],[20,"3"]]}]}}"#,
        )
        .unwrap();
        assert!(matches!(matrix.data, Some(Data::Matrix(ref s)) if s[0].values.len() == 2));
        let error: Answer = serde_json::from_str(
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        )
        .unwrap();
        assert_eq!(error.error.as_deref(), Some("parse error"));
    }
}
