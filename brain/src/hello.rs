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
    #[error(
        "cell {cell}'s instance subnet {subnet} overlaps the brain's VIP range {vips}: \
         give the cell another [network] subnet (or the brain another vip_range)"
    )]
    SubnetOverlapsVips {
        cell: CellId,
        subnet: Ipv4Net,
        vips: Ipv4Net,
    },
    #[error(transparent)]
    Version(#[from] WireError),
}

impl HelloError {
    /// The QUIC close code that tells the cell why.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::NotACell { .. } | Self::IdentityMismatch { .. } => CloseCode::Identity,
            Self::Version(_) => CloseCode::Version,
            Self::SubnetOverlapsVips { .. } => CloseCode::Conflict,
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
    vips: Option<Ipv4Net>,
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
    if let (Some(subnet), Some(vips)) = (hello.subnet, vips) {
        if subnet.overlaps(vips) {
            return Err(HelloError::SubnetOverlapsVips {
                cell: certified.clone(),
                subnet,
                vips,
            });
        }
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
    use corral_proto::wire::{Zone, PROTOCOL_VERSION as V, SUPPORTED_VERSIONS};
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
        let ack = accept_hello(
            &peer,
            &hello("c1", 1, 9),
            SUPPORTED_VERSIONS,
            &brain,
            None,
            None,
        )
        .unwrap();
        assert_eq!(ack.version, V);
        assert_eq!(ack.brain, brain);

        let err = accept_hello(
            &peer,
            &hello("c2", V, V),
            SUPPORTED_VERSIONS,
            &brain,
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the hello claims to be cell c2, but the certificate is for cell c1"
        );
        assert_eq!(err.close_code(), CloseCode::Identity);

        let err = accept_hello(
            &peer,
            &hello("c1", 7, 9),
            SUPPORTED_VERSIONS,
            &brain,
            None,
            None,
        )
        .unwrap_err();
        assert_eq!(err.close_code(), CloseCode::Version);

        let other_brain = PeerIdentity::Brain(BrainId::new("b2").unwrap());
        assert!(matches!(
            accept_hello(
                &other_brain,
                &hello("c1", V, V),
                SUPPORTED_VERSIONS,
                &brain,
                None,
                None
            ),
            Err(HelloError::NotACell { .. })
        ));
    }

    #[test]
    fn a_subnet_overlapping_the_vip_range_is_refused() {
        let brain = BrainId::new("b1").unwrap();
        let peer = PeerIdentity::Cell(CellId::new("c1").unwrap());
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let mut h = hello("c1", V, V);
        h.subnet = Some(net("10.96.4.0/24"));
        let err = accept_hello(
            &peer,
            &h,
            SUPPORTED_VERSIONS,
            &brain,
            h.subnet,
            Some(net("10.96.0.0/16")),
        )
        .unwrap_err();
        assert_eq!(err.close_code(), CloseCode::Conflict);
        assert!(
            err.to_string()
                .contains("overlaps the brain's VIP range 10.96.0.0/16"),
            "{err}"
        );
        h.subnet = Some(net("10.0.0.0/8"));
        assert!(accept_hello(
            &peer,
            &h,
            SUPPORTED_VERSIONS,
            &brain,
            h.subnet,
            Some(net("10.96.0.0/16"))
        )
        .is_err());
        h.subnet = Some(net("10.244.1.0/24"));
        assert!(accept_hello(
            &peer,
            &h,
            SUPPORTED_VERSIONS,
            &brain,
            h.subnet,
            Some(net("10.96.0.0/16"))
        )
        .is_ok());
    }
}
