//! corral's brain, as parts not yet wired into a running brain:
//!
//! - security: the cluster's certificates ([`certs`]), who a certificate
//!   speaks for ([`identity`]), mutual TLS and the QUIC endpoints between cells
//!   and brains ([`tls`]), the answer to a cell's greeting ([`hello`]);
//! - pure decisions, time as an input: placement ([`auction`]), crash
//!   restarts ([`backoff`]), desired vs actual ([`converge`]), over the shared
//!   types of [`model`];
//! - state and API: configuration ([`config`]), the desired-state model
//!   ([`desired`]), the transactional store behind a trait ([`store`], redb),
//!   and the management API with tenant tokens ([`api`]).
//!
//! Still missing: the brain's run loop tying these to cells over QUIC, and
//! the cell side of the protocol in the agent.
//!
//! Identity comes from certificates only: a cell is the cell its certificate
//! names, whatever its messages claim.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod api;
pub mod auction;
pub mod backoff;
pub mod certs;
pub mod claims;
pub mod cluster;
pub mod config;
pub mod converge;
pub mod desired;
pub mod hello;
pub mod metrics;
pub mod model;
pub mod run;
pub mod sim;
pub mod store;

pub use corral_link::identity::{identity_of, IdentityError, PeerIdentity, Role};
pub use corral_link::{identity, tls};
