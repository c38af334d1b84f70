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
//!
//! Without the default `server` feature only the pure parsers are built
//! ([`config`] and the API bodies of [`desired`]): that is what
//! `brain/fuzz` links, so its sanitizer build stays small while fuzzing the
//! real code.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod auction;
#[cfg(feature = "server")]
pub mod backoff;
#[cfg(feature = "server")]
pub mod certs;
#[cfg(feature = "server")]
pub mod claims;
#[cfg(feature = "server")]
pub mod cluster;
pub mod config;
#[cfg(feature = "server")]
pub mod converge;
pub mod desired;
#[cfg(feature = "server")]
pub mod hello;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod model;
#[cfg(feature = "server")]
pub mod run;
#[cfg(feature = "server")]
pub mod sim;
#[cfg(feature = "server")]
pub mod store;

#[cfg(feature = "server")]
pub use corral_link::identity::{identity_of, IdentityError, PeerIdentity, Role};
#[cfg(feature = "server")]
pub use corral_link::{identity, tls};
