//! The fill: keeping the box holding what its manifest says, downloaded during the fill window
//! from sibling appliances and then the origin, verified against the manifest's SHA-256 before
//! anything becomes visible.
//!
//! `manifest`, `signature`, `plan`, `schedule` and `bucket` are pure and table-tested; `load`,
//! `fetch` and `runner` do the network and store work.

#![forbid(unsafe_code)]

pub mod bucket;
pub mod fetch;
pub mod load;
pub mod manifest;
pub mod plan;
pub mod runner;
pub mod schedule;
pub mod signature;

pub use load::LoadConfig;
pub use runner::{AlreadyRunning, FillConfig, FillReport, Filler, ManifestLocation, StartedFill};
pub use signature::ManifestKey;
