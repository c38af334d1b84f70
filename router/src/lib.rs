//! wip
#![deny(missing_docs)]
pub mod maglev;
