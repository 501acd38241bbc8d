//! Serving: HTTP/1.1 GET and HEAD of stored files with byte ranges, validators and keep-alive,
//! the body sent zero-copy with sendfile(2) from the drive the store names, over plain HTTP and
//! over HTTPS (`tls`: kTLS where the kernel has it, so sendfile stays).
//!
//! `http` (request parsing, ranges, conditionals, response heads), `signed` (signed URLs) and
//! `send_rate` (the send timeout and minimum send rate of a response) are pure; the connection
//! loop, limits, drain and counters live in `server`.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod cold;
pub mod http;
pub mod metrics;
pub mod send_rate;
pub mod server;
pub mod signed;
pub mod tls;

pub use access_log::AccessLogTarget;
pub use admin::AdminView;
pub use cold::{ColdConfig, ColdRead};
pub use send_rate::SendRateMin;
pub use server::{Listener, ServeConfig, Server, Shared, TlsPath, TrafficCounts};
pub use tls::{CertificateFiles, KernelTls, TlsConfig};
