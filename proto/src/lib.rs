//! corral's shared types: identifiers, the instance API (spec, status, state
//! machine) and capacity accounting.
//!
//! Everything here is pure: no I/O, no clocks, no randomness. Time enters as
//! arguments, so the logic is tested without root or a kernel.
#![forbid(unsafe_code)]

pub mod capacity;
pub mod exposition;
pub mod health;
pub mod ids;
pub mod instance;
pub mod policy;
pub mod service;
pub mod time;
pub mod wire;

pub use capacity::{Capacity, CapacityError};
pub use ids::{AppId, CellId, IdError, InstanceId, TenantId};
pub use instance::{
    Event, InstanceInfo, InstanceKind, InstanceSpec, InstanceState, Resources, SpecError, Status,
};
pub use time::Timestamp;
