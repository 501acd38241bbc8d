//! The fill: keeping the box holding what its manifest says, downloaded during the fill window
//! from sibling appliances and then the origin, verified against the manifest's SHA-256 before
//! anything becomes visible.
//!
//! `manifest`, `plan`, `schedule` and `bucket` are pure and table-tested; `fetch` and `runner`
//! do the network and store work.

pub mod bucket;
pub mod fetch;
pub mod manifest;
pub mod plan;
pub mod runner;
pub mod schedule;

pub use runner::{FillConfig, FillReport, Filler, ManifestLocation};
