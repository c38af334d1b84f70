//! The brain's answer to a cell's [`Hello`]: pure, given who the certificate
//! says the peer is.

use corral_link::identity::PeerIdentity;
use corral_proto::wire::{
    negotiate, BrainId, CloseCode, Hello, HelloAck, Ipv4Net, VersionRange, WireError,
};
use corral_proto::CellId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("only cells say hello; the peer's certificate is for {peer}")]
    NotACell { peer: PeerIdentity },
    #[error("the hello claims to be cell {claimed}, but the certificate is for cell {certified}")]
    IdentityMismatch { certified: CellId, claimed: CellId },
    #[error(transparent)]
    Version(#[from] WireError),
}

impl HelloError {
    /// The QUIC close code that tells the cell why.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::NotACell { .. } | Self::IdentityMismatch { .. } => CloseCode::Identity,
            Self::Version(_) => CloseCode::Version,
        }
    }
}

/// Accepts a hello from `peer` (as its certificate names it) or says why not.
/// The certificate decides who the cell is; the hello's own claim must agree.
pub fn accept_hello(
    peer: &PeerIdentity,
    hello: &Hello,
    ours: VersionRange,
    brain: &BrainId,
    subnet: Option<Ipv4Net>,
) -> Result<HelloAck, HelloError> {
    let PeerIdentity::Cell(certified) = peer else {
        return Err(HelloError::NotACell { peer: peer.clone() });
    };
    if *certified != hello.cell {
        return Err(HelloError::IdentityMismatch {
            certified: certified.clone(),
            claimed: hello.cell.clone(),
        });
    }
    let version = negotiate(ours, hello.versions)?;
    Ok(HelloAck {
        version,
        brain: brain.clone(),
        subnet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::wire::{Zone, SUPPORTED_VERSIONS};
    use corral_proto::Capacity;

    fn hello(cell: &str, min: u16, max: u16) -> Hello {
        Hello {
            versions: VersionRange::new(min, max).unwrap(),
            cell: CellId::new(cell).unwrap(),
            zone: Zone::new("z").unwrap(),
            tags: Default::default(),
            total: Capacity::default(),
            available: Capacity::default(),
            subnet: None,
            addresses: vec![],
        }
    }

    #[test]
    fn the_certificate_decides() {
        let brain = BrainId::new("b1").unwrap();
        let peer = PeerIdentity::Cell(CellId::new("c1").unwrap());
        let ack =
            accept_hello(&peer, &hello("c1", 1, 9), SUPPORTED_VERSIONS, &brain, None).unwrap();
        assert_eq!(ack.version, 1);
        assert_eq!(ack.brain, brain);

        let err =
            accept_hello(&peer, &hello("c2", 1, 1), SUPPORTED_VERSIONS, &brain, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the hello claims to be cell c2, but the certificate is for cell c1"
        );
        assert_eq!(err.close_code(), CloseCode::Identity);

        let err =
            accept_hello(&peer, &hello("c1", 7, 9), SUPPORTED_VERSIONS, &brain, None).unwrap_err();
        assert_eq!(err.close_code(), CloseCode::Version);

        let other_brain = PeerIdentity::Brain(BrainId::new("b2").unwrap());
        assert!(matches!(
            accept_hello(
                &other_brain,
                &hello("c1", 1, 1),
                SUPPORTED_VERSIONS,
                &brain,
                None
            ),
            Err(HelloError::NotACell { .. })
        ));
    }
}
