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
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// How often the store's upkeep runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stop waits for a cancelled fill to record its report.
const FILL_STOP_WAIT: Duration = Duration::from_secs(5);

pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    crate::logging::set_level(&config.log_level).map_err(|error| anyhow::anyhow!(error))?;
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
    let upkeep = spawn_upkeep(store.clone());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.serve.worker_threads > 0 {
        runtime.worker_threads(config.serve.worker_threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let filler = Arc::new(
        appliance_fill::Filler::new(store.clone(), config.fill_config()?)
            .map_err(|error| anyhow::anyhow!(error))?,
    );
    let served = runtime.block_on(serve(
        store.clone(),
        serve_config,
        filler,
        &config.control_socket,
        config_path,
    ));
    upkeep.stop();
    runtime.shutdown_timeout(Duration::from_millis(300));
    store
        .checkpoint()
        .context("writing the shutdown checkpoint")?;
    tracing::info!("stopped");
    served
}

async fn serve(
    store: Store,
    serve_config: appliance_serve::ServeConfig,
    filler: Arc<appliance_fill::Filler>,
    control_socket: &Path,
    config_path: &Path,
) -> Result<()> {
    let seed = drive_seed(&store);
    let control_listener = crate::control::bind(control_socket)?;
    let extension = Arc::new(crate::fill_admin::FillAdmin {
        filler: Arc::clone(&filler),
        store: store.clone(),
    });
    let server = Server::bind_with(store.clone(), serve_config, Some(extension)).await?;
    tracing::info!(
        listen = %server.local_addr()?,
        admin = %server.admin_addr()?,
        "serving"
    );
    let shared = server.shared();
    let control = crate::control::Control::new(store, Arc::clone(&shared), Arc::clone(&filler));
    let control_task = tokio::spawn(crate::control::serve(
        control_listener,
        Arc::clone(&control),
    ));
    let sampler = tokio::spawn(Arc::clone(&control).sample());
    let watchdog = tokio::spawn(keep_watchdog_alive(control.store.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let serving = tokio::spawn(server.run(stopped.clone()));
    let schedule = tokio::spawn(Arc::clone(&filler).schedule(seed, stopped));
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload(config_path, &shared, &filler),
        }
    }
    tracing::info!("stopping: no new connections, finishing responses in flight");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop.send(true);
    filler.cancel();
    serving.await.context("the serving task failed")?;
    let _ = schedule.await;
    // An operator's fill, cancelled above, records its report before the runtime stops.
    let cancelled_by = Instant::now() + FILL_STOP_WAIT;
    while filler.is_running() && Instant::now() < cancelled_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in [control_task, sampler, watchdog] {
        task.abort();
    }
    let _ = std::fs::remove_file(control_socket);
    Ok(())
}

/// SIGHUP: reads the configuration again, applies what can change at run time (bandwidth cap,
/// access-log file reopened) and logs what changed and what needs a restart.
fn reload(config_path: &Path, shared: &appliance_serve::Shared, filler: &appliance_fill::Filler) {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            shared.reopen_access_log();
            tracing::error!(
                error = %format!("{error:#}"),
                "SIGHUP: configuration refused; access log reopened, nothing else changed"
            );
            return;
        }
    };
    filler.set_bandwidth(config.fill.bandwidth_bits_per_s);
    match config.fill_config() {
        Ok(fill) => filler.set_window(fill.window),
        Err(error) => tracing::error!(error = %format!("{error:#}"), "SIGHUP: fill window kept"),
    }
    if let Err(error) = crate::logging::set_level(&config.log_level) {
        tracing::error!(%error, "SIGHUP: log level not changed");
    }
    if let Ok(serve) = config.serve_config() {
        shared.retarget_access_log(serve.access_log);
    }
    tracing::info!(
        bandwidth_bits_per_s = config.fill.bandwidth_bits_per_s,
        window = %config.fill.window,
        log_level = %config.log_level,
        access_log = %config.serve.access_log,
        "SIGHUP: reloaded the fill bandwidth cap and window, the log level and the access-log \
         file; listeners, limits, drives and fill sources take effect at the next restart"
    );
}

/// Sends WATCHDOG=1 while the event loop runs and the store's drives answer: a stuck loop or
/// a wedged drive thread stops the keep-alives and systemd restarts the daemon.
async fn keep_watchdog_alive(store: Store) {
    let mut interval_us = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut interval_us) {
        return;
    }
    let period = Duration::from_micros(interval_us / 3).max(Duration::from_millis(100));
    loop {
        let probe = store.clone();
        let alive = tokio::time::timeout(
            period,
            tokio::task::spawn_blocking(move || probe.drives_alive()),
        )
        .await;
        if matches!(alive, Ok(Ok(true))) {
            let stats = store.stats();
            let failed = stats
                .drives
                .iter()
                .filter(|drive| drive.status != appliance_store::DriveStatus::Ok)
                .count();
            let summary = format!(
                "{} files on {} drives ({} failed)",
                stats.files,
                stats.drives.len(),
                failed
            );
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&summary),
                ],
            );
        } else {
            tracing::error!("a drive thread does not answer: withholding the watchdog keep-alive");
        }
        tokio::time::sleep(period).await;
    }
}

/// A per-box seed for the fill's start delay: the drives' UUIDs.
fn drive_seed(store: &Store) -> u64 {
    store
        .stats()
        .drives
        .iter()
        .filter_map(|drive| drive.uuid)
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, uuid| {
            uuid.iter().fold(hash, |hash, byte| {
                (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
            })
        })
}

/// `applianced fill`: one fill now, without serving; exits non-zero unless it succeeded.
pub fn fill_once(config_path: &Path, manifest: Option<&str>) -> Result<()> {
    let config = Config::load(config_path)?;
    let store = Store::open(
        drives::open_all(&config.drives),
        drives::store_config(&config.state_dir)?,
    );
    let upkeep = spawn_upkeep(store.clone());
    let filler = Arc::new(
        appliance_fill::Filler::new(store.clone(), config.fill_config()?)
            .map_err(|error| anyhow::anyhow!(error))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let location = manifest.map(appliance_fill::ManifestLocation::parse);
    let report: Result<appliance_fill::FillReport> = runtime.block_on(async {
        // Handlers first, so a signal that comes early cancels the fill instead of killing
        // the process.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let run = Arc::clone(&filler);
        let mut task = tokio::spawn(async move { run.run_once(location).await });
        loop {
            tokio::select! {
                done = &mut task => return done.context("the fill task failed"),
                _ = interrupt.recv() => filler.cancel(),
                _ = terminate.recv() => filler.cancel(),
            }
        }
    });
    upkeep.stop();
    store
        .checkpoint()
        .context("writing the shutdown checkpoint")?;
    let report = report?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    if !report.succeeded() {
        anyhow::bail!("the fill did not complete");
    }
    Ok(())
}

/// The store's upkeep thread; it stops (within moments) once `stop` is called.
struct Upkeep {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Upkeep {
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

fn spawn_upkeep(store: Store) -> Upkeep {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("store-upkeep".into())
        .spawn(move || loop {
            if let Err(error) = store.maintain() {
                tracing::warn!(%error, "store upkeep failed");
            }
            // Sleeps for the interval, or wakes at once when the sender is dropped.
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                stopped.recv_timeout(UPKEEP_INTERVAL)
            {
                return;
            }
        })
        .expect("spawning the upkeep thread");
    Upkeep { stop, thread }
}
