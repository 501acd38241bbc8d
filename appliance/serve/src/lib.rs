//! Serving: HTTP/1.1 GET and HEAD of stored files with byte ranges, validators and keep-alive,
//! the body sent zero-copy with sendfile(2) from the drive the store names.
//!
//! `http` (request parsing, ranges, conditionals, response heads) and `signed` (signed URLs)
//! are pure; the connection loop, limits, drain and counters live in `server`.

pub mod access_log;
pub mod admin;
pub mod http;
pub mod metrics;
pub mod server;
pub mod signed;

pub use access_log::AccessLogTarget;
pub use admin::AdminExtension;
pub use server::{ServeConfig, Server, Shared};
