//! The server side of mutual TLS, done here rather than by tonic so that a refused certificate gets
//! an answer and a record (invariant 4) instead of a bare handshake failure.
//!
//! The handshake requires a client certificate and proof of its private key (rustls checks the
//! `CertificateVerify` signature), but accepts a chain that does not verify against the configured
//! CAs; the chain is then verified with the same WebPKI verifier rustls would have used, and the
//! verdict travels with the connection ([`PeerInfo`]). Every request on a connection whose
//! certificate is expired, not yet valid or from a foreign CA is refused `UNAUTHENTICATED` by
//! [`crate::service::AppState::respond`] before any handler runs, and audited. Handshakes that fail
//! outright (no certificate, bad signature, not TLS) are logged and audited here.
//!
//! Must never let a request through whose verdict is not [`Verdict::Trusted`]: `respond` is the one
//! door, and it checks before anything else.
#![forbid(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("the server certificate file holds no PEM certificate")]
    NoServerCertificate,
    #[error("the server private key file holds no usable PEM private key")]
    NoServerKey,
    #[error("the client CA files hold no usable PEM certificate")]
    NoClientCa,
    #[error("TLS configuration refused: {0}")]
    Rustls(String),
}

/// Whether a connection's client certificate chains to a configured CA and is valid now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Trusted,
    /// The rule it broke, for the caller and the audit trail.
    Refused(String),
}

/// What a request knows about its connection (a request extension, set by tonic from
/// [`tonic::transport::server::Connected`]).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The identity the leaf certificate claims (URI SAN and fingerprint), parsed once per
    /// connection; why it could not be read otherwise.
    pub identity: Result<crate::identity::PeerIdentity, crate::identity::IdentityError>,
    pub verdict: Verdict,
}

/// A connection that finished its handshake.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Requires a client certificate and checks its signature over the handshake, but leaves the
/// trust decision to [`Verdict`] (see the module doc).
#[derive(Debug)]
struct DeferredTrust {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for DeferredTrust {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Judged after the handshake, per connection; see `verdict`.
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The TLS side of the listener: the rustls configuration and the verifier that judges chains.
#[derive(Clone)]
pub struct MutualTls {
    acceptor: TlsAcceptor,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl MutualTls {
    /// From PEM: the server's chain and key, and the client CAs (one or more files' contents).
    pub fn new(cert_pem: &[u8], key_pem: &[u8], client_ca_pems: &[Vec<u8>]) -> Result<MutualTls, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>().map_err(|_| TlsSetupError::NoServerCertificate)?;
        if chain.is_empty() {
            return Err(TlsSetupError::NoServerCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsSetupError::NoServerKey)?;
        let mut roots = rustls::RootCertStore::empty();
        for pem in client_ca_pems {
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|_| TlsSetupError::NoClientCa)?;
                roots.add(ca).map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(TlsSetupError::NoClientCa);
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?
            .with_client_cert_verifier(Arc::new(DeferredTrust { inner: Arc::clone(&verifier) }))
            .with_single_cert(chain, key)
            .map_err(|e| TlsSetupError::Rustls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(MutualTls { acceptor: TlsAcceptor::from(Arc::new(config)), verifier })
    }

    /// Accepts connections on `listener`, completes their handshakes concurrently, and yields the
    /// ones that finished. `on_failure` is told of each handshake that did not.
    pub fn incoming(
        self,
        listener: TcpListener,
        on_failure: impl Fn(Option<SocketAddr>, String) + Send + Sync + 'static,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, io::Error>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let on_failure = Arc::new(on_failure);
        tokio::spawn(async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                // Small gRPC frames must not wait for Nagle's algorithm (40 ms with delayed ACKs).
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                let tls = self.clone();
                let tx = tx.clone();
                let on_failure = Arc::clone(&on_failure);
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let certs: Vec<CertificateDer<'static>> = stream
                                .get_ref()
                                .1
                                .peer_certificates()
                                .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                                .unwrap_or_default();
                            let verdict = tls.verdict(&certs);
                            let identity = match certs.first() {
                                Some(leaf) => crate::identity::from_leaf_der(leaf.as_ref()),
                                None => Err(crate::identity::IdentityError::NoCertificate),
                            };
                            let info = PeerInfo { remote: Some(remote), identity, verdict };
                            let _ = tx.send(Ok(PeerStream { inner: stream, info })).await;
                        }
                        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                            tracing::debug!(%remote, "connection closed before the TLS handshake");
                        }
                        Ok(Err(e)) => on_failure(Some(remote), handshake_reason(&e)),
                        Err(_) => on_failure(Some(remote), "the TLS handshake did not finish in time".to_owned()),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Verifies the chain against the configured CAs, now.
    fn verdict(&self, certs: &[CertificateDer<'static>]) -> Verdict {
        let Some((leaf, intermediates)) = certs.split_first() else {
            return Verdict::Refused("no client certificate was presented".to_owned());
        };
        match self.verifier.verify_client_cert(leaf, intermediates, UnixTime::now()) {
            Ok(_) => Verdict::Trusted,
            Err(e) => Verdict::Refused(refusal(&e)),
        }
    }
}

/// The rule a chain broke, in words.
fn refusal(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "the client certificate has expired".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            "the client certificate is not valid yet".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the client certificate was not issued by a CA this service trusts".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "the client certificate is revoked".to_owned(),
        other => format!("the client certificate failed verification: {other}"),
    }
}

fn handshake_reason(e: &io::Error) -> String {
    let text = e.to_string();
    if text.contains("PeerSentNoCertificates") || text.contains("peer sent no certificates") {
        "no client certificate was presented".to_owned()
    } else {
        format!("the TLS handshake failed: {text}")
    }
}
