//! Logging: `tracing` to the journal when systemd runs the daemon (JOURNAL_STREAM is set), to
//! standard error otherwise. The level comes from RUST_LOG, else the config's `log_level`,
//! else `info`, and SIGHUP can change it (RUST_LOG, when set, always wins).

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let journal = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    match journal {
        Some(journal) => registry.with(journal).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

/// Applies the configured level unless RUST_LOG sets one; returns an error for a bad level.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    let filter =
        EnvFilter::try_new(level).map_err(|error| format!("log_level {level:?}: {error}"))?;
    if let Some(handle) = FILTER.get() {
        handle
            .reload(filter)
            .map_err(|error| format!("log_level: {error}"))?;
    }
    Ok(())
}
