//! `applianced run`: the serving appliance. Opens and recovers the store, keeps it up (periodic
//! checkpoints and reclaim on a thread of its own), serves until SIGTERM or SIGINT, then stops
//! accepting, lets responses in flight finish, checkpoints and exits 0. SIGHUP reopens the
//! access log. systemd is told READY once recovery is done and the listeners are bound.

use crate::config::Config;
use crate::drives;
use anyhow::{Context, Result};
use appliance_serve::Server;
use appliance_store::Store;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// How often the store's upkeep runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    let serve_config = config.serve_config()?;
    let started = Instant::now();
    let store = Store::open(
        drives::open_all(&config.drives),
        drives::store_config(&config.state_dir)?,
    );
    let stats = store.stats();
    tracing::info!(
        files = stats.files,
        drives = stats.drives.len(),
        ready_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "store recovered"
    );
    let stopping = Arc::new(AtomicBool::new(false));
    let upkeep = spawn_upkeep(store.clone(), Arc::clone(&stopping));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.serve.worker_threads > 0 {
        runtime.worker_threads(config.serve.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let served = runtime.block_on(serve(store.clone(), serve_config));
    stopping.store(true, Ordering::SeqCst);
    let _ = upkeep.join();
    runtime.shutdown_timeout(Duration::from_secs(1));
    store
        .checkpoint()
        .context("writing the shutdown checkpoint")?;
    tracing::info!("stopped");
    served
}

async fn serve(store: Store, serve_config: appliance_serve::ServeConfig) -> Result<()> {
    let server = Server::bind(store, serve_config).await?;
    tracing::info!(
        listen = %server.local_addr()?,
        admin = %server.admin_addr()?,
        "serving"
    );
    let shared = server.shared();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let serving = tokio::spawn(server.run(stopped));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reopening the access log");
                shared.reopen_access_log();
            }
        }
    }
    tracing::info!("stopping: no new connections, finishing responses in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop.send(true);
    serving.await.context("the serving task failed")?;
    Ok(())
}

fn spawn_upkeep(store: Store, stopping: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("store-upkeep".into())
        .spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                if let Err(error) = store.maintain() {
                    tracing::warn!(%error, "store upkeep failed");
                }
                std::thread::sleep(UPKEEP_INTERVAL);
            }
        })
        .expect("spawning the upkeep thread")
}
