//! The link between a cell and a brain, shared by both sides:
//!
//! - [`identity`]: who a certificate speaks for (a URI SAN
//!   `corral://cell/<id>` or `corral://brain/<id>`), and where certificates
//!   live in a certificate directory;
//! - [`tls`]: mutual-TLS QUIC endpoints that refuse a peer from another CA,
//!   an expired certificate or the wrong role, with a clear reason;
//! - [`framed`]: [`corral_proto::wire`] messages over a QUIC stream.
//!
//! Identity comes from certificates only: a cell is the cell its certificate
//! names, whatever its messages claim.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod framed;
pub mod identity;
pub mod tls;

pub use identity::{identity_of, IdentityError, PeerIdentity, Role};
