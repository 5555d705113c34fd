//! TLS for every server and client of ours (rustls, ring). One set of files per process: its
//! certificate and key (PEM), which it presents as a server and, to internal services, as a
//! client; and the CA (PEM) that signed the certificates of its peers.
//!
//! - Internal servers (shard, tenant-service) require a client certificate from that CA:
//!   mTLS. The gateway's public port asks for none (clients present tokens).
//! - Clients verify the server's certificate against the CA and the host name they dialed.
//! - A rotated certificate or key (cert-manager rewrites the files) is picked up without a
//!   restart: the files are checked at most every [`RELOAD_CHECK`] when a connection is
//!   made, and a pair that does not parse keeps the old one in use. The CA is read at start.
//!
//! A process turns TLS on once, at start, with [`init`]; [`crate::server::incoming`] and
//! [`crate::client::channel`] then speak TLS. Without it they speak plaintext (`pm dev`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::{Stream, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::connections::{Admitted, FIRST_BYTE_TIMEOUT, Places};

/// How often a connection may look at the certificate files for a rotation.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; more wait to be accepted.
pub const MAX_HANDSHAKES: usize = 256;
/// Pause after a failed accept (EMFILE...), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The files of one process.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This process's certificate chain and private key (PEM; the key PKCS#8, PKCS#1 or
    /// SEC1). Servers need them; a client without them presents no certificate.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The CA that signed its peers' certificates (PEM).
    pub ca: PathBuf,
}

/// The TLS flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// This process's certificate (PEM, leaf first): turns TLS on, with --tls-key and
    /// --tls-ca. Reloaded when the file changes.
    #[arg(long, env = "PM_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "PM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the peers' certificates (PEM). Alone (a client): verify the
    /// server, present no certificate.
    #[arg(long, env = "PM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Turns TLS on as the flags say. A server (`server`) needs all three files or none.
    pub fn init(&self, server: bool) -> Result<bool, TlsError> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() {
                return Err(err("--tls-cert needs --tls-ca"));
            }
            return Ok(false);
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) if !server => None,
            _ => {
                return Err(err(
                    "a server needs --tls-cert, --tls-key and --tls-ca together",
                ));
            }
        };
        init(&TlsFiles {
            identity,
            ca: ca.clone(),
        })?;
        Ok(true)
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn err(what: impl std::fmt::Display) -> TlsError {
    TlsError(what.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A certificate and key read from files, read again when the files change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl ReloadingCert {
    pub fn new(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let stamps = (modified(cert), modified(key));
        Ok(Self {
            key: key.to_owned(),
            state: Mutex::new(Loaded {
                key: Arc::new(Self::load(cert, key)?),
                stamps,
                checked: Instant::now(),
            }),
            cert: cert.to_owned(),
        })
    }

    fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(err(format!("{}: no certificate", cert.display())));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| err(format!("{}: {e}", key.display())))?;
        CertifiedKey::from_der(chain, private, &provider())
            .map_err(|e| err(format!("{} and {}: {e}", cert.display(), key.display())))
    }

    /// The current pair, read again first if the files changed since it was read.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().expect("cert lock");
        if state.checked.elapsed() >= RELOAD_CHECK {
            state.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != state.stamps {
                match Self::load(&self.cert, &self.key) {
                    Ok(key) => {
                        state.key = Arc::new(key);
                        state.stamps = stamps;
                        tracing::info!(cert = %self.cert.display(), "certificate reloaded");
                    }
                    // Half-written files during a rotation: the next check reads them again.
                    Err(e) => {
                        tracing::warn!(error = %e, "rotated certificate not loaded; keeping the old one")
                    }
                }
            }
        }
        state.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).map_err(|e| err(format!("{}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| err(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(err(format!("{}: no CA certificate", ca.display())));
    }
    Ok(Arc::new(roots))
}

/// The configurations of one process.
#[derive(Clone)]
pub struct Tls {
    /// Requires a client certificate signed by the CA (internal servers); `None` without an
    /// identity of its own.
    pub mutual: Option<Arc<ServerConfig>>,
    /// Asks for no client certificate (the gateway's public port).
    pub public: Option<Arc<ServerConfig>>,
    pub client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    pub fn new(files: &TlsFiles) -> Result<Tls, TlsError> {
        let roots = roots(&files.ca)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_root_certificates(roots.clone());
        let Some((cert, key)) = &files.identity else {
            let mut client = client.with_no_client_auth();
            client.alpn_protocols = vec![b"h2".to_vec()];
            return Ok(Tls {
                mutual: None,
                public: None,
                client: Arc::new(client),
            });
        };
        let cert = Arc::new(ReloadingCert::new(cert, key)?);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(err)?;
        let server = |verifier| -> Result<Arc<ServerConfig>, TlsError> {
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(err)?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(cert.clone());
            // gRPC over HTTP/2; grpc-web also over HTTP/1.1.
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        };
        let mutual = server(verifier)?;
        let public = server(WebPkiClientVerifier::no_client_auth())?;
        let mut client = client.with_client_cert_resolver(cert);
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            mutual: Some(mutual),
            public: Some(public),
            client: Arc::new(client),
        })
    }
}

static TLS: OnceLock<Tls> = OnceLock::new();

/// Turns TLS on for this process: every later server and client of ours speaks it. Call once,
/// at start, before serving or connecting.
pub fn init(files: &TlsFiles) -> Result<(), TlsError> {
    let tls = Tls::new(files)?;
    TLS.set(tls)
        .map_err(|_| err("TLS was already set up in this process"))
}

/// This process's TLS, if turned on.
pub fn get() -> Option<&'static Tls> {
    TLS.get()
}

/// A connection a server accepted, holding its place among the listener's
/// ([`crate::connections`]).
pub type ServerIo = Admitted<Transport>;

/// How a connection speaks: plaintext, or TLS over TCP.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self.get_ref() {
            Transport::Plain(s) => s.connect_info(),
            Transport::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on `listener` (TCP_NODELAY set), through TLS with `config` if given,
/// within the process's connection limit ([`crate::connections`]).
pub fn accept(
    listener: TcpListener,
    config: Option<Arc<ServerConfig>>,
) -> impl Stream<Item = io::Result<ServerIo>> + Send + 'static {
    accept_with(listener, config, Places::new(), FIRST_BYTE_TIMEOUT)
}

/// [`accept`] with `places` and a deadline for a plaintext peer's first byte. Handshakes
/// run concurrently (at most [`MAX_HANDSHAKES`], each within [`HANDSHAKE_TIMEOUT`]); a
/// failed one (no client certificate, another CA, plaintext) drops that connection only.
/// A connection that finds no place is closed at once.
pub fn accept_with(
    listener: TcpListener,
    config: Option<Arc<ServerConfig>>,
    places: Places,
    first_byte: Duration,
) -> impl Stream<Item = io::Result<ServerIo>> + Send + 'static {
    let accepted = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await;
        if next.is_err() {
            // Out of file descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
        }
        Some((next, listener))
    });
    let acceptor = config.map(TlsAcceptor::from);
    accepted
        .map(move |next: io::Result<(TcpStream, SocketAddr)>| {
            let acceptor = acceptor.clone();
            let places = places.clone();
            async move {
                let (stream, peer) = match next {
                    Ok(s) => s,
                    // Accept errors (EMFILE...) are the listener's: logged, not fatal.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        return None;
                    }
                };
                // No place: dropped here, which closes it.
                let place = places.take(peer)?;
                let _ = stream.set_nodelay(true);
                let Some(acceptor) = acceptor else {
                    return Some(Admitted::new(
                        Transport::Plain(stream),
                        place,
                        Some(first_byte),
                    ));
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => Some(Admitted::new(Transport::Tls(Box::new(tls)), place, None)),
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        None
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_HANDSHAKES)
        .filter_map(|io| async move { io.map(Ok) })
}

/// The client side: a TCP connection to the URI's host and port, then TLS verifying the
/// server's certificate for that host name, presenting this process's certificate.
pub async fn connect(
    config: Arc<ClientConfig>,
    uri: http::Uri,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let stream = TcpStream::connect((host.as_str(), port)).await?;
    stream.set_nodelay(true)?;
    let name = ServerName::try_from(host.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
    TlsConnector::from(config).connect(name, stream).await
}
