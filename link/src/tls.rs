//! Mutual TLS between cells and brains, and the QUIC endpoints built on it.
//!
//! Both sides verify the other's certificate chain against the cluster CA
//! (and its validity period), then its role: the brain accepts only cell
//! certificates from clients, a cell accepts only a brain certificate from
//! the server. Identity is the certificate's URI SAN (see
//! [`identity`](crate::identity)), not a DNS name: cells do not need to know
//! the brain's host name, and a brain certificate is valid on any address,
//! as in SPIFFE. The role is checked first, so a certificate of the wrong
//! role is refused with a message that says so, whatever else is wrong with
//! it; chain, validity and key usage are then checked by webpki exactly as
//! for any TLS peer.
//!
//! Everything uses the *ring* provider explicitly rather than a process-wide
//! default, so no other crate's choice can change it.

use crate::identity::{identity_of, leaf_paths, IdentityError, PeerIdentity, Role, CA_CERT_FILE};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, SignatureScheme,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The ALPN protocol of the cell ⇄ brain connection. The wire protocol
/// version is negotiated inside it (see `corral_proto::wire::negotiate`).
pub const ALPN: &[u8] = b"corral/1";

/// The TLS server name a cell sends. The brain's certificate is not checked
/// against it (identity is the URI SAN); QUIC just needs one.
pub const SERVER_NAME: &str = "brain.corral";

/// How often both ends send keep-alives, so that an idle connection neither
/// times out nor loses its NAT binding.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// How long a connection may hear nothing before it counts as dead: the
/// brain notices a cell that vanished (power cut, partition, kill -9 of the
/// agent's whole node) within this time, and the cell notices a lost brain.
/// Three keep-alives fit in it, so one or two lost packets do not end a
/// healthy connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    // A constant well inside QUIC's varint range.
    if let Ok(idle) = quinn::IdleTimeout::try_from(IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    Arc::new(transport)
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("our own certificate {path}: {source}")]
    OwnIdentity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("the cluster CA certificate {path} is unusable: {source}")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {source}")]
    Config {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier: {source}")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("cannot use the TLS configuration for QUIC: {reason}")]
    Quic { reason: String },
    #[error("cannot bind a QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the connection has no verified peer certificate")]
    NoPeerCertificate,
    #[error("the peer certificate: {0}")]
    PeerIdentity(#[source] IdentityError),
}

/// A node's TLS material: the cluster CA it trusts, its certificate chain and
/// key, and the identity its certificate names.
#[derive(Debug)]
pub struct Credentials {
    identity: PeerIdentity,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            identity: self.identity.clone(),
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Credentials {
    /// From PEM text; the paths only name the sources in errors.
    pub fn from_pem(
        ca: (&Path, &[u8]),
        cert: (&Path, &[u8]),
        key: (&Path, &[u8]),
    ) -> Result<Self, TlsError> {
        let read = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let ca_der = CertificateDer::from_pem_slice(ca.1).map_err(|e| read(ca.0, e))?;
        let chain = CertificateDer::pem_slice_iter(cert.1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| read(cert.0, e))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Missing {
                path: cert.0.to_owned(),
                what: "certificate",
            });
        };
        let identity = identity_of(leaf).map_err(|source| TlsError::OwnIdentity {
            path: cert.0.to_owned(),
            source,
        })?;
        let key_der = PrivateKeyDer::from_pem_slice(key.1).map_err(|e| read(key.0, e))?;
        Ok(Self {
            identity,
            ca: ca_der,
            chain,
            key: key_der,
        })
    }

    /// Reads `ca.pem`, `<role>-<id>.pem` and `<role>-<id>-key.pem` from a
    /// certificate directory as `corral-brain certs` lays it out.
    pub fn from_dir(dir: &Path, who: &PeerIdentity) -> Result<Self, TlsError> {
        let (cert, key) = leaf_paths(dir, who);
        Self::from_files(&dir.join(CA_CERT_FILE), &cert, &key)
    }

    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| TlsError::Read {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        let (ca_pem, cert_pem, key_pem) = (read(ca)?, read(cert)?, read(key)?);
        Self::from_pem((ca, &ca_pem), (cert, &cert_pem), (key, &key_pem))
    }

    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }

    fn expect_role(&self, role: Role) -> Result<(), TlsError> {
        self.identity
            .clone()
            .expect(role)
            .map(drop)
            .map_err(|source| TlsError::OwnIdentity {
                path: PathBuf::from(self.identity.file_stem() + ".pem"),
                source,
            })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|source| TlsError::Ca {
            path: PathBuf::from(CA_CERT_FILE),
            source,
        })?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls refusal carrying our typed reason, so the local side can log it
/// and the peer receives its text in the QUIC close.
fn refuse(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(e)))))
}

/// rustls shows `CertificateError::Other` with `{:?}`; this wrapper makes
/// that read as the error's message rather than its structure.
struct Refused(IdentityError);

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The brain's check of client certificates: a cell certificate, chained to
/// the cluster CA (webpki also checks validity and the client-auth usage).
#[derive(Debug)]
struct CellVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for CellVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        identity_of(end_entity)
            .and_then(|id| id.expect(Role::Cell))
            .map_err(refuse)?;
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A cell's check of the server certificate: a brain certificate (of the
/// expected name, if one is given), chained to the cluster CA. webpki checks
/// chain, validity and the server-auth usage; the host name is deliberately
/// not checked (see the module docs).
#[derive(Debug)]
struct BrainVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Option<PeerIdentity>,
}

impl ServerCertVerifier for BrainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = identity_of(end_entity)
            .and_then(|id| id.expect(Role::Brain))
            .map_err(refuse)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        match &self.expected {
            Some(expected) if *expected != found => Err(refuse(IdentityError::Unexpected {
                expected: expected.clone(),
                found,
            })),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// TLS for the brain: presents its brain certificate, requires a cell
/// certificate from every client. TLS 1.3 only (QUIC), no 0-RTT.
pub fn server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TlsError> {
    creds.expect_role(Role::Brain)?;
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(creds.roots()?, provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier { source })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .with_client_cert_verifier(Arc::new(CellVerifier { webpki }))
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|source| TlsError::Config { source })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// TLS for a cell: presents its cell certificate, accepts only a brain
/// certificate from the cluster CA, and only `expected_brain` if given.
pub fn client_config(
    creds: &Credentials,
    expected_brain: Option<&corral_proto::wire::BrainId>,
) -> Result<rustls::ClientConfig, TlsError> {
    creds.expect_role(Role::Cell)?;
    let provider = provider();
    let verifier = BrainVerifier {
        roots: creds.roots()?,
        algorithms: provider.signature_verification_algorithms,
        expected: expected_brain.map(|b| PeerIdentity::Brain(b.clone())),
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { source })?
        .dangerous()
        // Not a weakening: BrainVerifier does the full webpki chain check; it
        // replaces only the host-name check with a role check.
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|source| TlsError::Config { source })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

fn quic_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Quic {
        reason: e.to_string(),
    }
}

/// The receive buffer asked for the brain's UDP socket. Every cell's
/// packets arrive on this one socket: with the default (~200 KiB), a burst
/// from 1,000 cells overflowed it (hundreds of thousands of drops in
/// `UdpRcvbufErrors` per `bench auction --quic` run), and a cell whose
/// packets kept being dropped went silent until its connection timed out.
/// The kernel caps it at `net.core.rmem_max`; the size obtained is logged.
pub const SERVER_RECV_BUFFER: usize = 8 << 20;

/// The brain's QUIC endpoint, listening on `addr`. Needs a tokio runtime.
pub fn server_endpoint(addr: SocketAddr, creds: &Credentials) -> Result<quinn::Endpoint, TlsError> {
    let crypto = QuicServerConfig::try_from(server_config(creds)?).map_err(quic_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    let bind = |source| TlsError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(bind)?;
    match state
        .set_recv_buffer_size((&socket).into(), SERVER_RECV_BUFFER)
        .and_then(|()| state.recv_buffer_size((&socket).into()))
    {
        Ok(size) if size < SERVER_RECV_BUFFER => tracing::info!(
            "the QUIC socket's receive buffer is {size} bytes, not {SERVER_RECV_BUFFER}: \
             raise net.core.rmem_max for clusters of many cells"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot size the QUIC socket's receive buffer: {e}"),
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no async runtime found")))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )
    .map_err(bind)
}

/// A cell's QUIC endpoint, bound to `bind` (port 0 for any), connecting with
/// [`connect`]. Needs a tokio runtime.
pub fn client_endpoint(
    bind: SocketAddr,
    creds: &Credentials,
    expected_brain: Option<&corral_proto::wire::BrainId>,
) -> Result<quinn::Endpoint, TlsError> {
    let crypto =
        QuicClientConfig::try_from(client_config(creds, expected_brain)?).map_err(quic_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|source| TlsError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Starts a connection from a cell endpoint to the brain at `addr`.
pub fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connecting, quinn::ConnectError> {
    endpoint.connect(addr, SERVER_NAME)
}

/// Who is at the other end of an established connection, from its verified
/// certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf).map_err(TlsError::PeerIdentity)
}

/// Which side ended a connection during the TLS handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedBy {
    /// We refused the peer (its certificate, usually).
    Us,
    /// The peer refused us.
    Peer,
}

/// A handshake refusal read from a QUIC connection error: who refused, the
/// TLS alert, and the refusing side's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRefusal {
    pub by: RefusedBy,
    pub alert: AlertDescription,
    pub reason: String,
}

impl std::fmt::Display for HandshakeRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match self.by {
            RefusedBy::Us => "we refused the peer",
            RefusedBy::Peer => "the peer refused us",
        };
        write!(f, "{who} ({:?}): {}", self.alert, self.reason)
    }
}

/// QUIC carries a TLS alert as the transport error code 0x100 + alert.
fn alert_of(code: u64) -> Option<AlertDescription> {
    let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff)?;
    u8::try_from(alert).ok().map(AlertDescription::from)
}

/// Recognises a TLS refusal in a connection error, for operator-facing logs
/// ("the brain refused our certificate: certificate expired ...").
pub fn handshake_refusal(err: &quinn::ConnectionError) -> Option<HandshakeRefusal> {
    match err {
        quinn::ConnectionError::TransportError(e) => Some(HandshakeRefusal {
            by: RefusedBy::Us,
            alert: alert_of(u64::from(e.code))?,
            reason: e.reason.clone(),
        }),
        quinn::ConnectionError::ConnectionClosed(close) => Some(HandshakeRefusal {
            by: RefusedBy::Peer,
            alert: alert_of(u64::from(close.error_code))?,
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        }),
        _ => None,
    }
}
