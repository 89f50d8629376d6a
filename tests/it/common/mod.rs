//! Integration-test harness: the real `portcullis` binary on ephemeral
//! ports, in front of the recording mock router, driven over raw sockets.

mod fixtures;
mod gateway;
mod http;
mod keys;
mod otlp;
mod redis;

pub use fixtures::*;
pub use gateway::*;
pub use http::*;
pub use keys::*;
pub use otlp::*;
pub use redis::*;
