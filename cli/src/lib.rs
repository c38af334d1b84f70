//! The `corral` command line's library: a small blocking HTTP/1.1 client for
//! the agent's API, shared with the privileged tests.
#![forbid(unsafe_code)]

pub mod client;
