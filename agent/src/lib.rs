//! corral-agent: the cell daemon. See ARCHITECTURE.md for the map.
#![deny(rust_2018_idioms)]

pub mod api;
pub mod cell_link;
pub mod cgroups;
pub mod config;
pub mod executor;
pub mod health;
pub mod layer;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod oci;
pub mod paths;
pub mod preflight;
pub mod selfcheck;
pub mod shim;
pub mod sys;
