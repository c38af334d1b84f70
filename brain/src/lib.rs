//! corral's brain. For now: the cluster's certificates ([`certs`]), who a
//! certificate speaks for ([`identity`]), mutual TLS and the QUIC endpoints
//! between cells and brains ([`tls`]), and the brain's answer to a cell's
//! greeting ([`hello`]). The auctioneer, desired state, convergence, the
//! store and the management API are still to come.
//!
//! Identity comes from certificates only: a cell is the cell its certificate
//! names, whatever its messages claim.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod certs;
pub mod hello;
pub mod identity;
pub mod tls;

pub use identity::{identity_of, IdentityError, PeerIdentity, Role};
