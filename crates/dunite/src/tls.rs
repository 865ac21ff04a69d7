//! Serving over TLS (`--tls-cert`, `--tls-key`): the certificate and key loaded from PEM files
//! into a rustls [`ServerConfig`], replaced on SIGHUP without touching open connections, and
//! a listener that hands [`axum::serve()`] connections whose handshake is done.
//!
//! Why a listener and not a server loop of our own: `axum::serve` already owns the connection
//! tasks and their graceful shutdown; a [`TlsListener`] only has to turn accepted TCP
//! connections into TLS streams. The handshakes run in tasks of their own (a slow client
//! never holds up the next one), each bounded by [`HANDSHAKE_TIMEOUT`].
//!
//! A reload builds a new `ServerConfig` and swaps it in; each handshake takes the one current
//! when it starts, so connections already open keep theirs. A new configuration comes with a
//! new session cache: a client cannot resume a session authenticated by the certificate
//! before (if that certificate was replaced because its key leaked, old sessions must not
//! live on), and sees the new certificate on its next connection.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::serve::Listener;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to complete its TLS handshake before the connection is closed:
/// a client that connects and stalls holds a socket and a task no longer than this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's certificate chain and private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`--tls-cert`).
    pub cert: PathBuf,
    /// The leaf's private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`--tls-key`).
    pub key: PathBuf,
}

/// Why a certificate and key could not be loaded. Messages name the setting and the file,
/// never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read `{setting}` {path}: {source}")]
    Read {
        /// `tls-cert` or `tls-key`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file is not PEM, or holds nothing usable.
    #[error("bad `{setting}` {path}: {message}")]
    Pem {
        /// `tls-cert` or `tls-key`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The key is not one rustls can sign with, or does not belong to the certificate.
    #[error("`tls-key` {key} does not fit `tls-cert` {cert}: {source}")]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// rustls refused the server configuration.
    #[error("cannot configure TLS: {0}")]
    Config(#[source] rustls::Error),
}

/// The server's TLS: a rustls [`ServerConfig`] (HTTP/1.1 by ALPN) for the certificate and
/// key in [`TlsFiles`], which [`reload`](Self::reload) replaces while serving. Cheap to clone;
/// clones share what is served.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Arc<RwLock<Served>>,
}

/// What handshakes get now.
struct Served {
    config: Arc<ServerConfig>,
    summary: CertificateSummary,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("certificate", &self.summary())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Read and check `files`: the certificate chain must parse, and the key must be one
    /// rustls signs with and match the leaf certificate. Blocking file I/O; the crypto is
    /// aws-lc-rs, the provider reqwest and sqlx use too (passed explicitly: nothing depends
    /// on a process-wide default provider).
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let served = build(&files, &provider)?;
        Ok(Self { files, provider, current: Arc::new(RwLock::new(served)) })
    }

    /// Read the files again and, if they load, serve the new certificate on every handshake
    /// from now on. Connections already open are not touched; TLS sessions from before the
    /// reload are not resumed (a new configuration has a new session cache), so every client
    /// sees the new certificate on its next connection. If the files do not load, what is
    /// served stays as it was. Blocking file I/O.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load); what is served is then unchanged.
    pub fn reload(&self) -> Result<CertificateSummary, TlsError> {
        let served = build(&self.files, &self.provider)?;
        let summary = served.summary.clone();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = served;
        Ok(summary)
    }

    /// What the certificate served now is (for logs).
    #[must_use]
    pub fn summary(&self) -> CertificateSummary {
        self.current.read().unwrap_or_else(PoisonError::into_inner).summary.clone()
    }

    /// The files this was loaded from.
    #[must_use]
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The rustls configuration of a handshake starting now.
    #[must_use]
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner).config)
    }
}

/// A configuration serving `files`' certificate.
fn build(files: &TlsFiles, provider: &Arc<CryptoProvider>) -> Result<Served, TlsError> {
    let key = Arc::new(load_key(files, provider)?);
    let summary = CertificateSummary::of(&key);
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCertificate(key)));
    // The server speaks HTTP/1.1 only (axum's `http1`); a client offering h2 and HTTP/1.1
    // gets HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Served { config: Arc::new(config), summary })
}

/// The one certificate, whatever the client hello says (no SNI-based choice).
#[derive(Debug)]
struct OneCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// What identifies a leaf certificate in a log line: its SHA-256 fingerprint (as
/// `openssl x509 -noout -fingerprint -sha256` shows it, without the colons), its subject's
/// common name and its expiry, the latter two when the certificate's DER reads as expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Lower-case hex SHA-256 of the leaf's DER.
    pub sha256: String,
    /// The subject's common name, if it has one.
    pub subject_cn: Option<String>,
    /// `notAfter` as `YYYY-MM-DDTHH:MM:SSZ`.
    pub not_after: Option<String>,
}

impl CertificateSummary {
    fn of(key: &CertifiedKey) -> Self {
        let leaf = key.cert.first().map_or(&[][..], |c| c.as_ref());
        let fields = der::leaf_fields(leaf);
        Self {
            sha256: hex::encode(sha2::Sha256::digest(leaf)),
            subject_cn: fields.as_ref().and_then(|f| f.subject_cn.clone()),
            not_after: fields.and_then(|f| f.not_after),
        }
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "subject CN {}, expires {}, sha256 {}",
            self.subject_cn.as_deref().unwrap_or("-"),
            self.not_after.as_deref().unwrap_or("-"),
            self.sha256
        )
    }
}

fn load_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |setting, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { setting, path: path.to_owned(), source })
    };
    let pem =
        |setting, path: &Path, message: String| TlsError::Pem { setting, path: path.to_owned(), message };
    let cert_pem = read("tls-cert", &files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("tls-cert", &files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem("tls-cert", &files.cert, "no CERTIFICATE in it".to_owned()));
    }
    let key_pem = read("tls-key", &files.key)?;
    // The message is rustls-pki-types' (a section kind or a base64 error), never the bytes.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        pem("tls-key", &files.key, format!("no usable private key in it ({e}); PKCS#8, RSA and EC keys are"))
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

/// Reload `tls` on every SIGHUP, logging the certificate now served, or an error and the
/// certificate kept. The signal handler is registered when this is called, not when the
/// future is first polled: call it before anything slow, so an early SIGHUP does not kill the
/// process (its default action). Requires a Tokio runtime; spawn the future.
///
/// # Errors
///
/// If the signal handler cannot be registered.
#[cfg(unix)]
pub fn reload_on_sighup(tls: ServerTls) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(async move {
        while hangup.recv().await.is_some() {
            let reloading = tls.clone();
            let result = tokio::task::spawn_blocking(move || reloading.reload()).await;
            let files = tls.files();
            match result {
                Ok(Ok(summary)) => tracing::info!(
                    cert = %files.cert.display(),
                    certificate = %summary,
                    "SIGHUP: TLS certificate reloaded; new connections get it"
                ),
                Ok(Err(error)) => tracing::error!(
                    error = %crate::error_chain(&error),
                    certificate = %tls.summary(),
                    "SIGHUP: cannot reload the TLS certificate; still serving the one before"
                ),
                Err(error) => tracing::error!(%error, "SIGHUP: the TLS reload failed"),
            }
        }
    })
}

/// A listener whose connections are TLS streams with their handshake done, for
/// [`axum::serve()`]. Dropping it stops accepting (and drops the handshakes in progress).
pub struct TlsListener<L: Listener> {
    ready: mpsc::Receiver<(TlsStream<L::Io>, L::Addr)>,
    local_addr: std::io::Result<L::Addr>,
    /// Accepts and runs the handshakes; aborted (with its handshakes) when this is dropped.
    accepting: tokio::task::JoinHandle<()>,
}

impl<L: Listener> fmt::Debug for TlsListener<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsListener").finish_non_exhaustive()
    }
}

impl<L> TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + fmt::Debug + Sync,
{
    /// Accept on `inner` and run the TLS handshake of each connection with `tls`, each in a
    /// task of its own and bounded by [`HANDSHAKE_TIMEOUT`]. A connection whose handshake fails
    /// or times out (a plain-HTTP request among them) is closed, logged at debug level. Must be
    /// called within a Tokio runtime.
    pub fn new(inner: L, tls: &ServerTls) -> Self {
        Self::with_handshake_timeout(inner, tls, HANDSHAKE_TIMEOUT)
    }

    /// As [`new`](Self::new) with another handshake timeout (for tests).
    pub fn with_handshake_timeout(inner: L, tls: &ServerTls, timeout: Duration) -> Self {
        let local_addr = inner.local_addr();
        let (send, ready) = mpsc::channel(16);
        let accepting = tokio::spawn(accept_loop(inner, tls.clone(), timeout, send));
        Self { ready, local_addr, accepting }
    }
}

impl<L: Listener> Drop for TlsListener<L> {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl<L> Listener for TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + fmt::Debug + Sync,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop never ends while its receiver lives (only a panic ends it):
            // accept nothing more rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local_addr {
            Ok(addr) => Ok(addr.clone()),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

async fn accept_loop<L>(
    mut inner: L,
    tls: ServerTls,
    timeout: Duration,
    ready: mpsc::Sender<(TlsStream<L::Io>, L::Addr)>,
) where
    L: Listener,
    L::Addr: fmt::Debug + Send,
{
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            (io, addr) = inner.accept() => {
                // The configuration current as the handshake starts.
                let acceptor = TlsAcceptor::from(tls.server_config());
                let ready = ready.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => {
                            // Fails only when the server no longer accepts: the stream closes.
                            let _ = ready.send((stream, addr)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(?addr, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(?addr, "TLS handshake timed out"),
                    }
                });
            }
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            () = ready.closed() => return,
        }
    }
}

/// Just enough DER to read a leaf certificate's subject CN and expiry for a log line.
mod der {
    pub(super) struct LeafFields {
        pub(super) subject_cn: Option<String>,
        pub(super) not_after: Option<String>,
    }

    /// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
    /// signature, issuer, validity SEQUENCE { notBefore, notAfter }, subject, ... }, ... }
    pub(super) fn leaf_fields(cert: &[u8]) -> Option<LeafFields> {
        let (_, certificate, _) = tlv(cert)?;
        let (_, mut tbs, _) = tlv(certificate)?;
        let mut next = || {
            let (tag, content, rest) = tlv(tbs)?;
            tbs = rest;
            Some((tag, content))
        };
        let (mut tag, _) = next()?;
        if tag == 0xa0 {
            (tag, _) = next()?; // the serial number
        }
        if tag != 0x02 {
            return None;
        }
        let _signature = next()?;
        let _issuer = next()?;
        let (_, validity) = next()?;
        let (_, subject) = next()?;
        let (_, _, validity_rest) = tlv(validity)?;
        let not_after = tlv(validity_rest).and_then(|(tag, time, _)| format_time(tag, time));
        Some(LeafFields { subject_cn: common_name(subject), not_after })
    }

    /// Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value }; the CN's OID is 2.5.4.3.
    fn common_name(mut name: &[u8]) -> Option<String> {
        while let Some((_, mut set, rest)) = tlv(name) {
            name = rest;
            while let Some((_, attribute, rest)) = tlv(set) {
                set = rest;
                let (_, oid, value) = tlv(attribute)?;
                if oid == [0x55, 0x04, 0x03] {
                    let (_, value, _) = tlv(value)?;
                    return std::str::from_utf8(value).ok().map(str::to_owned);
                }
            }
        }
        None
    }

    /// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049) or GeneralizedTime `YYYYMMDDHHMMSSZ`.
    pub(super) fn format_time(tag: u8, time: &[u8]) -> Option<String> {
        let text = std::str::from_utf8(time).ok().filter(|t| t.is_ascii())?;
        let full = match tag {
            0x17 if text.len() == 13 => {
                let century = if text[..2].parse::<u8>().ok()? < 50 { "20" } else { "19" };
                format!("{century}{text}")
            }
            0x18 if text.len() == 15 => text.to_owned(),
            _ => return None,
        };
        if !full[..14].bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(format!(
            "{}-{}-{}T{}:{}:{}Z",
            &full[..4],
            &full[4..6],
            &full[6..8],
            &full[8..10],
            &full[10..12],
            &full[12..14]
        ))
    }

    /// One tag-length-value: (tag, content, what follows).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let octets = usize::from(first & 0x7f);
            if octets == 0 || octets > 4 || rest.len() < octets {
                return None;
            }
            let (len_bytes, after) = rest.split_at(octets);
            rest = after;
            len_bytes.iter().fold(0usize, |len, &b| (len << 8) | usize::from(b))
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and a leaf for 127.0.0.1 it signed, as PEM.
    struct Pki {
        ca: String,
        cert: String,
        key: String,
    }

    fn pki(cn: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("{cn} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, cn);
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        Pki { ca: ca_cert.pem(), cert: cert.pem(), key: key.serialize_pem() }
    }

    fn write(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        let files = TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&files.cert, cert).unwrap();
        std::fs::write(&files.key, key).unwrap();
        files
    }

    #[test]
    fn loads_a_certificate_and_names_what_is_wrong_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pki("a.test"), pki("b.test"));
        let tls = ServerTls::load(write(dir.path(), &a.cert, &a.key)).unwrap();
        let summary = tls.summary();
        assert_eq!(summary.subject_cn.as_deref(), Some("a.test"));
        assert_eq!(summary.sha256.len(), 64);
        assert!(summary.not_after.as_deref().is_some_and(|t| t.len() == 20 && t.ends_with('Z')), "{summary}");

        let error = ServerTls::load(write(dir.path(), &a.cert, &b.key)).unwrap_err();
        assert!(matches!(error, TlsError::Mismatch { .. }), "{error}");
        let error = ServerTls::load(write(dir.path(), "not pem", &a.key)).unwrap_err();
        assert!(matches!(error, TlsError::Pem { setting: "tls-cert", .. }), "{error}");
        let error = ServerTls::load(write(dir.path(), &a.cert, &a.cert)).unwrap_err();
        assert!(matches!(error, TlsError::Pem { setting: "tls-key", .. }), "{error}");
        assert!(!error.to_string().contains("BEGIN"), "{error}");
        let missing = TlsFiles { cert: dir.path().join("none.pem"), key: dir.path().join("key.pem") };
        let error = ServerTls::load(missing).unwrap_err();
        assert!(matches!(error, TlsError::Read { setting: "tls-cert", .. }), "{error}");
        assert!(error.to_string().contains("none.pem"), "{error}");
        // A key's PEM never shows in an error.
        let error = ServerTls::load(write(dir.path(), &a.key, &a.key)).unwrap_err();
        assert!(!error.to_string().contains(a.key.lines().nth(1).unwrap()), "{error}");
    }

    #[test]
    fn a_reload_swaps_the_certificate_or_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (pki("a.test"), pki("b.test"));
        let files = write(dir.path(), &a.cert, &a.key);
        let tls = ServerTls::load(files.clone()).unwrap();
        let clone = tls.clone();
        let before = tls.server_config();
        write(dir.path(), &b.cert, &b.key);
        assert_eq!(tls.reload().unwrap().subject_cn.as_deref(), Some("b.test"));
        assert!(!Arc::ptr_eq(&before, &clone.server_config()), "handshakes from now on get the new one");
        assert_eq!(clone.summary().subject_cn.as_deref(), Some("b.test"), "clones share it");
        write(dir.path(), &a.cert, &b.key);
        let kept = tls.server_config();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&kept, &tls.server_config()));
        assert_eq!(clone.summary().subject_cn.as_deref(), Some("b.test"), "a bad reload keeps the old one");
    }

    #[test]
    fn reads_both_time_forms_and_no_garbage() {
        assert_eq!(der::format_time(0x17, b"491231235959Z").as_deref(), Some("2049-12-31T23:59:59Z"));
        assert_eq!(der::format_time(0x17, b"500101000000Z").as_deref(), Some("1950-01-01T00:00:00Z"));
        assert_eq!(der::format_time(0x18, b"20610101120000Z").as_deref(), Some("2061-01-01T12:00:00Z"));
        assert_eq!(der::format_time(0x18, b"2061010112000xZ"), None);
        assert!(der::leaf_fields(&[]).is_none());
        assert!(der::leaf_fields(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }

    /// A client that connects and sends nothing is closed after the handshake timeout, and
    /// does not hold up the next client's handshake.
    #[tokio::test]
    async fn a_stalled_handshake_is_dropped_and_does_not_block_others() {
        use tokio::io::AsyncReadExt as _;
        let dir = tempfile::tempdir().unwrap();
        let a = pki("a.test");
        let tls = ServerTls::load(write(dir.path(), &a.cert, &a.key)).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = TlsListener::with_handshake_timeout(tcp, &tls, Duration::from_millis(300));

        let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A real handshake, started after the stalled one, completes first.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(a.ca.as_bytes()).unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connecting = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await.unwrap()
        });
        let (server_side, _) = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await.unwrap();
        assert_eq!(server_side.get_ref().1.alpn_protocol(), None, "the client offered no ALPN");
        let _client = connecting.await.unwrap();

        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the stalled connection is closed after the handshake timeout: {read:?}"
        );
    }
}
