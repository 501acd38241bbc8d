//! `appliance-testkit`: the helpers that the black-box tests (`tests/`), the crates' own tests
//! and the automation (`tools/xtask`) share, so each exists once: free ports and a small
//! HTTP/1.1 client (`http`), nginx as an origin or a benchmark peer (`nginx`), process guards
//! and launching (`process`), manifests and daemon configurations built with serde
//! (`manifest`, `config`), loop devices (`loop_device`), seeded bytes (`seeded`), test
//! certificates (`tls`) and the `appliance-ctl` runner (`ctl`). Dev-only: never a dependency of a shipped crate, and it
//! holds no appliance logic (it drives the real binaries the way an operator does).

#![forbid(unsafe_code)]

pub mod config;
pub mod ctl;
pub mod http;
pub mod loop_device;
pub mod manifest;
pub mod nginx;
pub mod process;
pub mod seeded;
pub mod tls;

pub use config::{Config, Fill, Scrub, Serve, Tls, TlsCertificate};
pub use ctl::{Ctl, Output, BUILD_APPLIANCE_ARGS};
pub use http::{free_port, get, http, wait_for_ok, Response};
pub use loop_device::LoopDevice;
pub use manifest::{sha256_hex, Manifest, ManifestFile};
pub use nginx::Nginx;
pub use process::{have, is_root, parent_of, pids, send_signal, Guard, Launch};
pub use seeded::{fill_seeded, seeded_bytes, write_seeded_file, SplitMix64};

/// An error of this kit: what failed, in words (an `io::Error` of kind `Other`).
fn error(message: impl Into<String>) -> std::io::Error {
    std::io::Error::other(message.into())
}

/// An error of a library this kit uses, as an `io::Error`.
fn error_from(failure: impl std::fmt::Display) -> std::io::Error {
    error(failure.to_string())
}
