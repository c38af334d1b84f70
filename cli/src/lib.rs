//! The `corral` command line's library: a small blocking HTTP/1.1 client
//! for the agent's and the brain's APIs (shared with the privileged tests
//! and xtask), a server-sent events parser, and the brain commands' pure
//! parts (request bodies, tables, messages).
#![forbid(unsafe_code)]

pub mod brain;
pub mod client;
pub mod sse;
