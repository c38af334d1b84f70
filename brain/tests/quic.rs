//! Real QUIC on 127.0.0.1 (ephemeral ports, no root): mutual TLS between a
//! brain and cells with certificates from `certs`, every refusal observed on
//! both sides, and framed wire messages over a bidirectional stream.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{bail, Context, Result};
use corral_brain::certs::{Ca, Pems, Validity};
use corral_brain::hello::accept_hello;
use corral_brain::tls::{
    self, client_endpoint, handshake_refusal, peer_identity, server_endpoint, Credentials,
    HandshakeRefusal, RefusedBy,
};
use corral_brain::PeerIdentity;
use corral_proto::wire::{
    encode, BrainId, CloseCode, FrameDecoder, Hello, Message, StateSnapshot, Zone,
    SUPPORTED_VERSIONS,
};
use corral_proto::{Capacity, CellId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::AlertDescription;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const LOCALHOST: &str = "127.0.0.1:0";
const DEADLINE: Duration = Duration::from_secs(10);

fn cell(id: &str) -> PeerIdentity {
    PeerIdentity::Cell(CellId::new(id).unwrap())
}

fn brain(name: &str) -> PeerIdentity {
    PeerIdentity::Brain(BrainId::new(name).unwrap())
}

fn valid() -> Validity {
    Validity::days_from(SystemTime::now(), 1)
}

fn expired() -> Validity {
    let now = SystemTime::now();
    Validity {
        not_before: now - Duration::from_secs(10 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    }
}

/// A cluster CA and the means to hand out credentials under it.
struct Cluster {
    ca: Ca,
}

impl Cluster {
    fn new() -> Self {
        Self {
            ca: Ca::generate(Validity::days_from(SystemTime::now(), 30))
                .unwrap()
                .0,
        }
    }

    fn pems(&self, who: &PeerIdentity, validity: Validity) -> Pems {
        self.ca.issue(who, validity).unwrap()
    }

    /// Credentials for `who` issued by `issuer`, trusting this cluster's CA.
    fn creds_from(&self, issuer: &Cluster, who: &PeerIdentity, validity: Validity) -> Credentials {
        let pems = issuer.pems(who, validity);
        Credentials::from_pem(
            (Path::new("ca.pem"), self.ca.cert_pem().as_bytes()),
            (Path::new("leaf.pem"), pems.cert.as_bytes()),
            (Path::new("leaf-key.pem"), pems.key.as_bytes()),
        )
        .unwrap()
    }

    fn creds(&self, who: &PeerIdentity, validity: Validity) -> Credentials {
        self.creds_from(self, who, validity)
    }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("test step timed out")
}

/// The brain side of one handshake: the accepted connection, or the error.
async fn accept_one(ep: &quinn::Endpoint) -> Result<quinn::Connection, quinn::ConnectionError> {
    let incoming = ep.accept().await.expect("endpoint open");
    incoming.await
}

/// The cell side of a handshake that the brain may refuse after the cell
/// considers it complete (TLS 1.3: the client finishes first): the
/// connection's eventual error either way.
async fn connect_and_wait_for_error(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> quinn::ConnectionError {
    match tls::connect(ep, addr).unwrap().await {
        Err(e) => e,
        Ok(conn) => conn.closed().await,
    }
}

/// Runs one handshake that must fail, returning what each side saw.
async fn refused_handshake(
    brain_ep: &quinn::Endpoint,
    cell_ep: &quinn::Endpoint,
) -> (HandshakeRefusal, HandshakeRefusal) {
    let addr = brain_ep.local_addr().unwrap();
    let (brain_side, cell_side) = within(async {
        tokio::join!(
            accept_one(brain_ep),
            connect_and_wait_for_error(cell_ep, addr)
        )
    })
    .await;
    let brain_err = brain_side.expect_err("the brain must not accept this connection");
    let brain_saw = handshake_refusal(&brain_err)
        .unwrap_or_else(|| panic!("brain: not a handshake refusal: {brain_err}"));
    let cell_saw = handshake_refusal(&cell_side)
        .unwrap_or_else(|| panic!("cell: not a handshake refusal: {cell_side}"));
    eprintln!("brain: {brain_saw}\ncell:  {cell_saw}");
    (brain_saw, cell_saw)
}

fn assert_refusal(r: &HandshakeRefusal, by: RefusedBy, alert: AlertDescription, words: &str) {
    assert_eq!(r.by, by, "{r}");
    assert_eq!(r.alert, alert, "{r}");
    assert!(r.reason.contains(words), "{r:?} should mention {words:?}");
}

/// Reads framed messages from a QUIC stream in deliberately small reads, so
/// frames arrive split across chunks.
struct Framed {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
    pending: Vec<u8>,
    pos: usize,
}

impl Framed {
    fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            dec: FrameDecoder::new(),
            pending: Vec::new(),
            pos: 0,
        }
    }

    async fn next(&mut self) -> Result<Option<Message>> {
        loop {
            let mut input = &self.pending[self.pos..];
            let msg = self.dec.decode(&mut input)?;
            self.pos = self.pending.len() - input.len();
            if let Some(msg) = msg {
                return Ok(Some(msg));
            }
            self.pending.clear();
            self.pos = 0;
            let mut buf = [0u8; 7];
            match self.recv.read(&mut buf).await? {
                Some(n) => self.pending.extend_from_slice(&buf[..n]),
                None => {
                    self.dec.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

async fn send(stream: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    stream.write_all(&encode(msg)?).await?;
    Ok(())
}

fn hello_from(cell_id: &str) -> Hello {
    Hello {
        versions: SUPPORTED_VERSIONS,
        cell: CellId::new(cell_id).unwrap(),
        zone: Zone::new("z1").unwrap(),
        tags: Default::default(),
        total: Capacity {
            memory_mb: 1024,
            disk_mb: 4096,
            containers: 10,
        },
        available: Capacity {
            memory_mb: 1024,
            disk_mb: 4096,
            containers: 10,
        },
        subnet: None,
        addresses: vec![],
    }
}

/// The brain's side of a conversation, as far as the brain exists today:
/// learn who the peer is from its certificate, answer its hello (or close
/// the connection saying why), then answer pings and acknowledge snapshots
/// until the cell finishes.
async fn serve_one(ep: &quinn::Endpoint, me: &BrainId) -> Result<(PeerIdentity, Vec<Message>)> {
    let conn = accept_one(ep).await?;
    let peer = peer_identity(&conn)?;
    let (mut tx, rx) = conn.accept_bi().await?;
    let mut rx = Framed::new(rx);
    let Some(Message::Hello(hello)) = rx.next().await? else {
        bail!("the first message must be a hello");
    };
    match accept_hello(&peer, &hello, SUPPORTED_VERSIONS, me, None, None) {
        Ok(ack) => send(&mut tx, &Message::HelloAck(ack)).await?,
        Err(e) => {
            conn.close(e.close_code().as_u32().into(), e.to_string().as_bytes());
            return Ok((peer, vec![Message::Hello(hello)]));
        }
    }
    let mut seen = vec![Message::Hello(hello)];
    while let Some(msg) = rx.next().await? {
        if let Message::Ping { seq } = msg {
            send(&mut tx, &Message::Pong { seq }).await?;
        }
        seen.push(msg);
    }
    tx.finish()?;
    // Wait until the cell has read everything and closed.
    let _ = conn.closed().await;
    Ok((peer, seen))
}

#[tokio::test]
async fn a_cell_connects_and_the_brain_learns_who_it_is_from_its_certificate() -> Result<()> {
    let cluster = Cluster::new();
    let me = BrainId::new("b1")?;
    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        Some(&me),
    )?;
    let addr = brain_ep.local_addr()?;

    let snapshot = Message::StateSnapshot(StateSnapshot {
        seq: 1,
        available: Capacity::default(),
        evacuating: false,
        instances: vec![],
    });
    let sent = vec![
        Message::Hello(hello_from("c1")),
        snapshot,
        Message::Ping { seq: 1 },
        Message::Ping { seq: 2 },
    ];
    let cell_side = async {
        let conn = tls::connect(&cell_ep, addr)?.await?;
        // The cell learns the brain's identity the same way.
        assert_eq!(peer_identity(&conn)?, brain("b1"));
        let (mut tx, rx) = conn.open_bi().await?;
        let mut rx = Framed::new(rx);
        for msg in &sent {
            send(&mut tx, msg).await?;
        }
        tx.finish()?;
        let mut got = Vec::new();
        while let Some(msg) = rx.next().await? {
            got.push(msg);
        }
        conn.close(CloseCode::Normal.as_u32().into(), b"done");
        Ok::<_, anyhow::Error>(got)
    };
    let (brain_result, cell_result) =
        within(async { tokio::join!(serve_one(&brain_ep, &me), cell_side) }).await;
    let (peer, brain_saw) = brain_result.context("brain")?;
    let cell_saw = cell_result.context("cell")?;

    assert_eq!(peer, cell("c1"));
    assert_eq!(brain_saw, sent, "the brain decoded every frame as sent");
    let Message::HelloAck(ack) = &cell_saw[0] else {
        bail!("expected a hello-ack first, got {cell_saw:?}");
    };
    assert_eq!(
        (ack.version, &ack.brain),
        (corral_proto::wire::PROTOCOL_VERSION, &me)
    );
    assert_eq!(
        &cell_saw[1..],
        [Message::Pong { seq: 1 }, Message::Pong { seq: 2 }]
    );
    Ok(())
}

#[tokio::test]
async fn a_hello_claiming_another_cell_is_refused() -> Result<()> {
    let cluster = Cluster::new();
    let me = BrainId::new("b1")?;
    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        None,
    )?;
    let addr = brain_ep.local_addr()?;
    let cell_side = async {
        let conn = tls::connect(&cell_ep, addr)?.await?;
        let (mut tx, _rx) = conn.open_bi().await?;
        // Lies about who it is; the certificate says c1.
        send(&mut tx, &Message::Hello(hello_from("c2"))).await?;
        Ok::<_, anyhow::Error>(conn.closed().await)
    };
    let (brain_result, cell_result) =
        within(async { tokio::join!(serve_one(&brain_ep, &me), cell_side) }).await;
    let (peer, _) = brain_result?;
    assert_eq!(peer, cell("c1"), "identity comes from the certificate");
    match cell_result? {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, CloseCode::Identity.as_u32().into());
            assert_eq!(
                String::from_utf8_lossy(&close.reason),
                "the hello claims to be cell c2, but the certificate is for cell c1"
            );
        }
        other => bail!("expected an application close, got {other}"),
    }
    Ok(())
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused() -> Result<()> {
    let cluster = Cluster::new();
    let stranger = Cluster::new();

    // A cell whose certificate another CA issued.
    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds_from(&stranger, &cell("c1"), valid()),
        None,
    )?;
    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &cell_ep).await;
    assert_refusal(
        &brain_saw,
        RefusedBy::Us,
        AlertDescription::UnknownCA,
        "UnknownIssuer",
    );
    assert_refusal(
        &cell_saw,
        RefusedBy::Peer,
        AlertDescription::UnknownCA,
        "UnknownIssuer",
    );

    // A brain whose certificate another CA issued.
    let brain_ep = server_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds_from(&stranger, &brain("b1"), valid()),
    )?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        None,
    )?;
    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &cell_ep).await;
    assert_refusal(
        &cell_saw,
        RefusedBy::Us,
        AlertDescription::UnknownCA,
        "UnknownIssuer",
    );
    assert_refusal(
        &brain_saw,
        RefusedBy::Peer,
        AlertDescription::UnknownCA,
        "UnknownIssuer",
    );
    Ok(())
}

#[tokio::test]
async fn expired_certificates_are_refused() -> Result<()> {
    let cluster = Cluster::new();

    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), expired()),
        None,
    )?;
    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &cell_ep).await;
    for (side, by) in [(&brain_saw, RefusedBy::Us), (&cell_saw, RefusedBy::Peer)] {
        assert_refusal(
            side,
            by,
            AlertDescription::CertificateExpired,
            "certificate expired",
        );
    }

    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), expired()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        None,
    )?;
    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &cell_ep).await;
    for (side, by) in [(&cell_saw, RefusedBy::Us), (&brain_saw, RefusedBy::Peer)] {
        assert_refusal(
            side,
            by,
            AlertDescription::CertificateExpired,
            "certificate expired",
        );
    }
    Ok(())
}

/// What a misbehaving node could configure by hand: any certificate, and a
/// verifier that accepts whatever the other side shows.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn chain_and_key(pems: &Pems) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = CertificateDer::pem_slice_iter(pems.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pems.key.as_bytes()).unwrap();
    (chain, key)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn the_brain_refuses_a_brain_certificate_from_a_client() -> Result<()> {
    let cluster = Cluster::new();
    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;

    // Our own constructors refuse to build this...
    let err = tls::client_config(&cluster.creds(&brain("b2"), valid()), None).unwrap_err();
    assert!(
        err.to_string()
            .contains("a brain certificate (brain b2) where a cell certificate is required"),
        "{err}"
    );
    // ...so build it by hand, as an impostor would, with a genuine brain
    // certificate from the same CA.
    let (chain, key) = chain_and_key(&cluster.pems(&brain("b2"), valid()));
    let mut config = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(ring())))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let mut impostor = quinn::Endpoint::client(LOCALHOST.parse()?)?;
    impostor.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config)?,
    )));

    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &impostor).await;
    let words =
        "the peer presented a brain certificate (brain b2) where a cell certificate is required";
    assert_refusal(
        &brain_saw,
        RefusedBy::Us,
        AlertDescription::CertificateUnknown,
        words,
    );
    assert_refusal(
        &cell_saw,
        RefusedBy::Peer,
        AlertDescription::CertificateUnknown,
        words,
    );
    Ok(())
}

#[tokio::test]
async fn a_cell_refuses_a_cell_certificate_presented_as_the_brain() -> Result<()> {
    let cluster = Cluster::new();
    let err = tls::server_config(&cluster.creds(&cell("c9"), valid())).unwrap_err();
    assert!(
        err.to_string()
            .contains("a cell certificate (cell c9) where a brain certificate is required"),
        "{err}"
    );
    // An impostor brain with a genuine cell certificate from the same CA.
    let (chain, key) = chain_and_key(&cluster.pems(&cell("c9"), valid()));
    let mut config = rustls::ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    let impostor = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(config)?,
        )),
        LOCALHOST.parse()?,
    )?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        None,
    )?;

    let (brain_saw, cell_saw) = refused_handshake(&impostor, &cell_ep).await;
    let words =
        "the peer presented a cell certificate (cell c9) where a brain certificate is required";
    assert_refusal(
        &cell_saw,
        RefusedBy::Us,
        AlertDescription::CertificateUnknown,
        words,
    );
    assert_refusal(
        &brain_saw,
        RefusedBy::Peer,
        AlertDescription::CertificateUnknown,
        words,
    );
    Ok(())
}

#[tokio::test]
async fn a_cell_can_insist_on_a_particular_brain() -> Result<()> {
    let cluster = Cluster::new();
    let brain_ep = server_endpoint(LOCALHOST.parse()?, &cluster.creds(&brain("b1"), valid()))?;
    let cell_ep = client_endpoint(
        LOCALHOST.parse()?,
        &cluster.creds(&cell("c1"), valid()),
        Some(&BrainId::new("b2")?),
    )?;
    let (brain_saw, cell_saw) = refused_handshake(&brain_ep, &cell_ep).await;
    let words = "the peer is brain b1, not the expected brain b2";
    assert_refusal(
        &cell_saw,
        RefusedBy::Us,
        AlertDescription::CertificateUnknown,
        words,
    );
    assert_refusal(
        &brain_saw,
        RefusedBy::Peer,
        AlertDescription::CertificateUnknown,
        words,
    );
    Ok(())
}

#[test]
fn credentials_name_their_source_when_unusable() {
    let err = Credentials::from_pem(
        (Path::new("/x/ca.pem"), b"junk"),
        (Path::new("/x/cell-c1.pem"), b"junk"),
        (Path::new("/x/cell-c1-key.pem"), b"junk"),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("cannot read /x/ca.pem"),
        "{err}"
    );
    let err = Credentials::from_dir(Path::new("/nonexistent"), &cell("c1")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read /nonexistent/ca.pem"),
        "{err}"
    );
}
