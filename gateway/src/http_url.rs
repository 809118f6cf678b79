//! The `http://` URLs the gateway sends to.

/// An `http://` URL a client of the gateway's sends to (the decision
/// sink, Prometheus's query API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// `host:port`, as connected to and sent in `Host`.
    pub(crate) authority: String,
    /// The path and query.
    pub(crate) path: String,
}

impl HttpUrl {
    /// Parses an `http://host[:port]/path` URL (port 80 by default).
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "`{text}`: only http:// is spoken, not {other} (go through a local proxy that forwards over TLS)"
                ));
            }
            None => return Err(format!("`{text}`: give the scheme, http://")),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{text}` names no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{text}`: credentials in the URL are not supported"
            ));
        }
        let authority = match authority.port_u16() {
            Some(_) => authority.as_str().to_string(),
            None => format!("{}:80", authority.host()),
        };
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(HttpUrl { authority, path })
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls() {
        let url = HttpUrl::parse("http://127.0.0.1:9000/events?x=1").unwrap();
        assert_eq!(url.authority, "127.0.0.1:9000");
        assert_eq!(url.path, "/events?x=1");
        assert_eq!(url.to_string(), "http://127.0.0.1:9000/events?x=1");
        let url = HttpUrl::parse("http://collector").unwrap();
        assert_eq!(
            (url.authority.as_str(), url.path.as_str()),
            ("collector:80", "/")
        );
        assert!(
            HttpUrl::parse("https://collector/")
                .unwrap_err()
                .contains("not https")
        );
        assert!(HttpUrl::parse("collector:9000").is_err());
        assert!(
            HttpUrl::parse("http://user:pw@collector/")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(HttpUrl::parse("not a url").is_err());
    }
}
