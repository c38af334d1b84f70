//! Who a certificate speaks for. A corral certificate names exactly one
//! identity in a URI subject alternative name, `corral://cell/<id>` or
//! `corral://brain/<name>`; that SAN, in a certificate chained to the cluster
//! CA, is the only thing either side believes about the other.

use corral_proto::wire::BrainId;
use corral_proto::{CellId, IdError};
use rustls::pki_types::CertificateDer;
use std::fmt;
use std::path::{Path, PathBuf};
use x509_parser::extensions::GeneralName;

pub const URI_SCHEME: &str = "corral://";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Cell,
    Brain,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cell => "cell",
            Self::Brain => "brain",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A peer as its certificate identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    Cell(CellId),
    Brain(BrainId),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot parse the certificate: {reason}")]
    Unparsable { reason: String },
    #[error(
        "the certificate names no corral identity (a URI SAN {URI_SCHEME}cell/<id> or {URI_SCHEME}brain/<name>)"
    )]
    Missing,
    #[error("the certificate names several corral identities ({}); exactly one is allowed", .uris.join(", "))]
    Ambiguous { uris: Vec<String> },
    #[error("{uri:?} is not a corral identity: expected {URI_SCHEME}cell/<id> or {URI_SCHEME}brain/<name>")]
    BadUri { uri: String },
    #[error("{uri:?} is not a corral identity: {source}")]
    BadId {
        uri: String,
        #[source]
        source: IdError,
    },
    #[error("the peer presented a {} certificate ({found}) where a {expected} certificate is required", .found.role())]
    WrongRole { expected: Role, found: PeerIdentity },
    #[error("the peer is {found}, not the expected {expected}")]
    Unexpected {
        expected: PeerIdentity,
        found: PeerIdentity,
    },
}

impl PeerIdentity {
    pub fn role(&self) -> Role {
        match self {
            Self::Cell(_) => Role::Cell,
            Self::Brain(_) => Role::Brain,
        }
    }

    pub fn id(&self) -> &str {
        match self {
            Self::Cell(id) => id.as_str(),
            Self::Brain(id) => id.as_str(),
        }
    }

    /// The URI SAN that carries this identity.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role(), self.id())
    }

    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadUri {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix(URI_SCHEME).ok_or_else(bad)?;
        let (role, id) = rest.split_once('/').ok_or_else(bad)?;
        let bad_id = |source| IdentityError::BadId {
            uri: uri.to_owned(),
            source,
        };
        match role {
            "cell" => CellId::new(id).map(Self::Cell).map_err(bad_id),
            "brain" => BrainId::new(id).map(Self::Brain).map_err(bad_id),
            _ => Err(bad()),
        }
    }

    /// File name stem of this identity's certificate and key in a
    /// certificate directory: `cell-<id>`, `brain-<name>`. The role prefix
    /// keeps a cell and a brain of the same name apart.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.role(), self.id())
    }

    /// Refuses any other role.
    pub fn expect(self, expected: Role) -> Result<Self, IdentityError> {
        if self.role() == expected {
            Ok(self)
        } else {
            Err(IdentityError::WrongRole {
                expected,
                found: self,
            })
        }
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role(), self.id())
    }
}

/// Reads the identity a certificate claims. This checks the claim's form
/// only: whether the certificate is to be believed (chain, validity) is the
/// TLS verifier's business, which calls this too.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<PeerIdentity, IdentityError> {
    let (_, x509) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| IdentityError::Unparsable {
            reason: e.to_string(),
        })?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable {
            reason: format!("subject alternative names: {e}"),
        })?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with(URI_SCHEME) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::Missing),
        [uri] => PeerIdentity::parse_uri(uri),
        _ => Err(IdentityError::Ambiguous {
            uris: uris.iter().map(|u| (*u).to_owned()).collect(),
        }),
    }
}

/// The cluster CA certificate's file name in a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";

/// Where `who`'s certificate and key live in a certificate directory:
/// `DIR/<stem>.pem` and `DIR/<stem>-key.pem`.
pub fn leaf_paths(dir: &Path, who: &PeerIdentity) -> (PathBuf, PathBuf) {
    let stem = who.file_stem();
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_refuse_junk() {
        let cell = PeerIdentity::Cell(CellId::new("c-1").unwrap());
        assert_eq!(cell.uri(), "corral://cell/c-1");
        assert_eq!(PeerIdentity::parse_uri(&cell.uri()).unwrap(), cell);
        let brain = PeerIdentity::Brain(BrainId::new("b.1").unwrap());
        assert_eq!(
            PeerIdentity::parse_uri("corral://brain/b.1").unwrap(),
            brain
        );
        assert_eq!(brain.file_stem(), "brain-b.1");
        for bad in [
            "corral://cell/",
            "corral://cell/../x",
            "corral://cell/a/b",
            "corral://tenant/x",
            "corral:/cell/x",
            "https://cell/x",
        ] {
            assert!(PeerIdentity::parse_uri(bad).is_err(), "{bad}");
        }
        let e = PeerIdentity::parse_uri("corral://cell/a b").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("\"corral://cell/a b\" is not a corral identity: cell id"));
    }

    #[test]
    fn role_checks_say_what_was_presented() {
        let cell = PeerIdentity::Cell(CellId::new("c1").unwrap());
        assert!(cell.clone().expect(Role::Cell).is_ok());
        assert_eq!(
            cell.expect(Role::Brain).unwrap_err().to_string(),
            "the peer presented a cell certificate (cell c1) where a brain certificate is required"
        );
    }
}
