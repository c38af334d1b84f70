//! corral-agent: the cell daemon. See ARCHITECTURE.md for the map.
//!
//! Without the default `runtime` feature only the pure parsers are built
//! (the config file and the subnet arithmetic it needs): that is what
//! `agent/fuzz` links, so its sanitizer build stays small while fuzzing the
//! real code.
#![deny(rust_2018_idioms)]

pub mod config;

#[cfg(feature = "runtime")]
pub mod api;
#[cfg(feature = "runtime")]
pub mod cell_link;
#[cfg(feature = "runtime")]
pub mod cgroups;
#[cfg(feature = "runtime")]
pub mod executor;
#[cfg(feature = "runtime")]
pub mod health;
#[cfg(feature = "runtime")]
pub mod init;
#[cfg(feature = "runtime")]
pub mod layer;
#[cfg(feature = "runtime")]
pub mod logs;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod network;
#[cfg(feature = "runtime")]
pub mod oci;
#[cfg(feature = "runtime")]
pub mod paths;
#[cfg(feature = "runtime")]
pub mod preflight;
#[cfg(feature = "runtime")]
pub mod selfcheck;
#[cfg(feature = "runtime")]
pub mod shim;
#[cfg(feature = "runtime")]
pub mod sys;

/// Without the runtime: only the subnet arithmetic of `network/ipam.rs`,
/// the same file the full `network` module declares.
#[cfg(not(feature = "runtime"))]
pub mod network {
    pub mod ipam;
}
