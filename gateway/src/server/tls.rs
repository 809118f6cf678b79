//! TLS through rustls: TLS 1.3 and 1.2 only, ALPN `h2` then `http/1.1`,
//! an optional client-certificate requirement (a CA bundle), and a
//! certificate that is reloaded when its files change (a Kubernetes
//! secret update, a renewal) without touching open connections: each new
//! handshake picks the certificate in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::telemetry::Telemetry;

/// Where a listener's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it
    /// signed.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {detail}", .path.display())]
    File { path: PathBuf, detail: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, detail: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key.
fn load_key_pair(config: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| file_error(&config.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&config.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(&config.cert, "no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| file_error(&config.key, e))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_error(&config.key, e))?;
    let pair = CertifiedKey::new(certs, signing);
    pair.keys_match().map_err(|e| {
        file_error(
            &config.key,
            format!(
                "does not match the certificate in {}: {e}",
                config.cert.display()
            ),
        )
    })?;
    Ok(pair)
}

/// The certificate in force; swapped by [`watch`].
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A listener's TLS: the acceptor, and the task that reloads its
/// certificate (ends with the acceptor).
pub(crate) fn acceptor(
    config: &TlsConfig,
    telemetry: &Arc<Telemetry>,
) -> Result<TlsAcceptor, TlsError> {
    // Stamped before loading: a change while loading is seen next poll.
    let seen = stamp(config);
    let resolver = Arc::new(Resolver {
        current: ArcSwap::from_pointee(load_key_pair(config)?),
    });
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_error(path, e))? {
                let cert = cert.map_err(|e| file_error(path, e))?;
                roots.add(cert).map_err(|e| file_error(path, e))?;
            }
            if roots.is_empty() {
                return Err(file_error(path, "no PEM certificate in the CA bundle"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_error(path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(resolver.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio::spawn(watch(
        Arc::downgrade(&resolver),
        config.clone(),
        seen,
        telemetry.clone(),
    ));
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// How often the certificate files are looked at.
const POLL: Duration = Duration::from_secs(1);

/// What identifies a version of the files: their modification times and
/// sizes (through symlinks, so a swapped Kubernetes `..data` link counts).
fn stamp(config: &TlsConfig) -> Option<[(SystemTime, u64); 2]> {
    let one = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    Some([one(&config.cert)?, one(&config.key)?])
}

/// Reloads the certificate when its files change, until the listener is
/// gone. A pair that does not load keeps the old one in force.
async fn watch(
    resolver: Weak<Resolver>,
    config: TlsConfig,
    mut seen: Option<[(SystemTime, u64); 2]>,
    telemetry: Arc<Telemetry>,
) {
    loop {
        tokio::time::sleep(POLL).await;
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        let now = stamp(&config);
        if now == seen || now.is_none() {
            continue;
        }
        match load_key_pair(&config) {
            Ok(pair) => {
                // Counted first: whoever sees the new certificate sees it
                // counted.
                telemetry.record_tls_reload(true);
                resolver.current.store(Arc::new(pair));
                seen = now;
                tracing::info!(cert = %config.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Tried again at the next change; a half-written pair
                // usually completes within a poll or two.
                seen = now;
                telemetry.record_tls_reload(false);
                tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays in force");
            }
        }
    }
}
