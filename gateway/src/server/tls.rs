//! TLS through rustls: TLS 1.3 and 1.2 only, ALPN `h2` then `http/1.1`,
//! an optional client-certificate requirement (a CA bundle), and files
//! that are reloaded when they change (a Kubernetes secret update, a
//! renewal, a new CA in the bundle) without touching open connections:
//! each new handshake uses the configuration in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
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

/// Bytes read from a file at most (certificates, keys and CA bundles
/// are a few KiB; a bundle of every public CA is under 300 KiB).
const MAX_FILE_BYTES: u64 = 4 << 20;

/// The contents of a listener's TLS files, read together: what a reload
/// compares (the bytes, so a rewrite within the file system's timestamp
/// granularity counts) and what the configuration is built from (the same
/// bytes, so nothing changes between the look and the load).
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that opening a FIFO does not wait for a writer; it
    // changes nothing for a regular file, the only kind read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    let meta = file.metadata().map_err(|e| file_error(path, e))?;
    if !meta.is_file() {
        return Err(file_error(path, "not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_error(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(file_error(
            path,
            format_args!("larger than {} MiB", MAX_FILE_BYTES >> 20),
        ));
    }
    Ok(bytes)
}

impl Files {
    /// Follows symlinks, so a swapped Kubernetes `..data` link counts.
    fn read(config: &TlsConfig) -> Result<Files, TlsError> {
        Ok(Files {
            cert: read(&config.cert)?,
            key: read(&config.key)?,
            client_ca: config.client_ca.as_deref().map(read).transpose()?,
        })
    }
}

/// A certificate chain and its key, checked to match.
fn key_pair(config: &TlsConfig, files: &Files) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&config.cert, e))?;
    if certs.is_empty() {
        return Err(file_error(&config.cert, "no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| file_error(&config.key, e))?;
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

/// The rustls configuration the files describe.
fn server_config(config: &TlsConfig, files: &Files) -> Result<rustls::ServerConfig, TlsError> {
    let pair = key_pair(config, files)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&config.client_ca, &files.client_ca) {
        (Some(path), Some(bundle)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(bundle) {
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
        _ => builder.with_no_client_auth(),
    };
    let mut server =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(pair)));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// A listener's TLS: the configuration in force, swapped by [`watch`].
pub(crate) struct Tls {
    current: ArcSwap<rustls::ServerConfig>,
}

impl Tls {
    /// An acceptor for one new connection, with the configuration in force.
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

/// A listener's TLS, and the task that reloads its files (it ends with
/// the listener).
pub(crate) fn load(config: &TlsConfig, telemetry: &Arc<Telemetry>) -> Result<Arc<Tls>, TlsError> {
    let files = Files::read(config)?;
    let tls = Arc::new(Tls {
        current: ArcSwap::from_pointee(server_config(config, &files)?),
    });
    tokio::spawn(watch(
        Arc::downgrade(&tls),
        config.clone(),
        files,
        telemetry.clone(),
    ));
    Ok(tls)
}

/// Checks a listener's TLS files as [`load`] reads them (`gateway
/// check`): the chain, its key, that they match, the client CA bundle.
pub fn check(config: &TlsConfig) -> Result<(), TlsError> {
    server_config(config, &Files::read(config)?).map(drop)
}

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(1);

/// Reloads the configuration when its files change, until the listener is
/// gone. Files that do not load keep the old configuration in force. The
/// files are read on the blocking pool: a hung mount stalls this loop,
/// never the server.
async fn watch(tls: Weak<Tls>, config: TlsConfig, mut seen: Files, telemetry: Arc<Telemetry>) {
    let config = Arc::new(config);
    // The client CA bundle in force: sessions resume across a reload only
    // while it stays the same (a resumed session skips client
    // authentication, so a new rule must not be met by an old session).
    let mut ca_in_force = seen.client_ca.clone();
    // The last read failure, warned of and counted once.
    let mut failing: Option<String> = None;
    loop {
        tokio::time::sleep(POLL).await;
        if tls.strong_count() == 0 {
            return;
        }
        let files = config.clone();
        let Ok(read) = tokio::task::spawn_blocking(move || Files::read(&files)).await else {
            continue;
        };
        let now = match read {
            Ok(now) => {
                failing = None;
                now
            }
            Err(e) => {
                let text = e.to_string();
                if failing.as_ref() != Some(&text) {
                    telemetry.record_tls_reload(false);
                    tracing::warn!(error = %text, "TLS files cannot be read; the previous ones stay in force");
                    failing = Some(text);
                }
                continue;
            }
        };
        if now == seen {
            continue;
        }
        let loaded = server_config(&config, &now);
        // Tried again at the next change; a half-written pair usually
        // completes within a poll or two.
        let ca = now.client_ca.clone();
        seen = now;
        let Some(tls) = tls.upgrade() else {
            return;
        };
        match loaded {
            Ok(mut server) => {
                if ca == ca_in_force {
                    // The tickets and the session cache of the
                    // configuration before: clients resume across a
                    // renewal of the certificate.
                    let before = tls.current.load();
                    server.session_storage = before.session_storage.clone();
                    server.ticketer = before.ticketer.clone();
                }
                ca_in_force = ca;
                // Counted first: whoever sees the new files in force sees
                // them counted.
                telemetry.record_tls_reload(true);
                tls.current.store(Arc::new(server));
                tracing::info!(cert = %config.cert.display(), "TLS files reloaded");
            }
            Err(e) => {
                telemetry.record_tls_reload(false);
                tracing::warn!(error = %e, "TLS files not reloaded; the previous ones stay in force");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A FIFO named as a certificate is refused at once, not waited on.
    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("cert.pem");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let err = super::read(&fifo).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
        let err = super::read(std::path::Path::new("/dev/zero")).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}
