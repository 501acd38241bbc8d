//! `applianced run`: the serving appliance. Opens and recovers the store, keeps it up (periodic
//! checkpoints and reclaim on a thread of its own, `upkeep.rs`; the scrubber on another,
//! `scrub.rs`), runs the fill on a runtime of its own whose threads are lowered to idle
//! priority, serves until SIGTERM or SIGINT,
//! then stops accepting, lets responses in flight finish, checkpoints and exits 0. SIGHUP
//! reads the configuration again and applies what can change at run time (`reload`). systemd is told READY once recovery is done and the listeners are
//! bound, and WATCHDOG=1 only while the event loop, every drive's ring thread and the upkeep
//! thread make progress.

use crate::config::Config;
use crate::drives;
use crate::test_faults::{Place, TestFaults};
use crate::upkeep::{Heartbeat, Upkeep, UpkeepState};
use anyhow::{Context, Result};
use appliance_serve::Server;
use appliance_store::Store;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};

/// How long a stop waits for a cancelled fill to record its report.
const FILL_STOP_WAIT: Duration = Duration::from_secs(5);

pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    crate::logging::set_level(&config.log_level).map_err(|error| anyhow::anyhow!(error))?;
    let serve_config = config.serve_config()?;
    let faults = TestFaults::from_env();
    let watchdog_interval = watchdog_interval();
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
    // Under the watchdog an upkeep pass may last two watchdog intervals before it counts as
    // stuck; then the keep-alives stop and systemd kills the daemon one interval later.
    let upkeep = Upkeep::spawn(
        store.clone(),
        watchdog_interval.map(|every| every * 2),
        faults,
    );
    let mut scrubber = crate::scrub::Scrubber::spawn(store.clone(), config.scrub_config());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.serve.worker_threads > 0 {
        runtime.worker_threads(config.serve.worker_threads);
    }
    let runtime = runtime
        .thread_name("serve")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let fill_config = config.fill_config()?;
    let fill_runtime = fill_runtime(fill_config.concurrency)?;
    let filler = Arc::new(
        appliance_fill::Filler::new(store.clone(), fill_config, fill_runtime.handle().clone())
            .map_err(|error| anyhow::anyhow!(error))?,
    );
    let served = runtime.block_on(serve(
        Serving {
            store: store.clone(),
            serve_config,
            admin_listen: config.serve.admin_listen,
            filler,
            heartbeat: Arc::clone(&upkeep.heartbeat),
            watchdog_interval,
            faults,
        },
        &mut scrubber,
        &config.control_socket,
        config_path,
    ));
    upkeep.stop();
    scrubber.stop();
    runtime.shutdown_timeout(Duration::from_millis(300));
    // The fill was cancelled and given FILL_STOP_WAIT to record its report; whatever is left
    // (a download's writer, dropped with its task) leaves nothing visible.
    fill_runtime.shutdown_timeout(Duration::from_secs(1));
    store
        .checkpoint()
        .context("writing the shutdown checkpoint")?;
    tracing::info!("stopped");
    served
}

/// What the serving event loop runs with.
struct Serving {
    store: Store,
    serve_config: appliance_serve::ServeConfig,
    /// The read-only admin listener (`/health`, `/metrics`).
    admin_listen: std::net::SocketAddr,
    filler: Arc<appliance_fill::Filler>,
    heartbeat: Arc<Heartbeat>,
    /// WATCHDOG_USEC, when systemd (or a test) expects keep-alives.
    watchdog_interval: Option<Duration>,
    faults: TestFaults,
}

/// Serves until SIGTERM or SIGINT; status shows `scrubber`, and SIGHUP reconfigures it.
async fn serve(
    serving: Serving,
    scrubber: &mut crate::scrub::Scrubber,
    control_socket: &Path,
    config_path: &Path,
) -> Result<()> {
    let Serving {
        store,
        serve_config,
        admin_listen,
        filler,
        heartbeat,
        watchdog_interval,
        faults,
    } = serving;
    let seed = drive_seed(&store);
    let control = crate::control::listen(control_socket)?;
    let server = Server::bind(store.clone(), serve_config).await?;
    let admin_listener = tokio::net::TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("admin listener on {admin_listen}"))?;
    let listening = server
        .local_addrs()?
        .iter()
        .map(|(kind, address)| format!("{} {address}", kind.label()))
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(
        listen = %listening,
        admin = %admin_listener.local_addr()?,
        "serving"
    );
    let shared = server.shared();
    let operations = crate::operations::Operations::new(
        store.clone(),
        Arc::clone(&shared),
        Arc::clone(&filler),
        Arc::clone(&heartbeat),
        scrubber.progress.clone(),
    );
    let admin_plane = Arc::new(crate::metrics::AdminPlane::new(
        Arc::clone(&operations),
        &shared,
    ));
    let control_serve = crate::control::serve(control.listener, Arc::clone(&operations));
    let control_task = tokio::spawn(async move {
        if faults.panics_in(Place::Control) {
            panic!("test fault: the control-socket task panics (APPLIANCED_TEST_PANIC=control)");
        }
        control_serve.await;
    });
    let sampler = tokio::spawn(Arc::clone(&operations).sample());
    let watchdog = tokio::spawn(keep_watchdog_alive(
        store.clone(),
        heartbeat,
        watchdog_interval,
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let serving = tokio::spawn(server.run(stopped.clone()));
    let admin = tokio::spawn(appliance_serve::admin::serve_admin(
        admin_listener,
        admin_plane,
        stopped.clone(),
    ));
    let schedule = filler.spawn_schedule(seed, stopped);
    if faults.panics_in(Place::Serve) {
        tokio::spawn(async {
            panic!("test fault: a task of the serving runtime panics (APPLIANCED_TEST_PANIC=serve)")
        });
    }
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => reload(config_path, &shared, &filler, scrubber),
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
    for task in [control_task, sampler, watchdog, admin] {
        task.abort();
    }
    // A socket systemd passed is systemd's to keep (clients queue on it across a restart).
    if let Some(path) = control.bound_path {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// SIGHUP: reads the configuration again, applies what can change at run time (fill bandwidth
/// cap and window, log level, access-log file reopened, TLS certificates, `[scrub]`) and logs
/// what changed and what needs a restart. A refused file changes nothing but the access log.
fn reload(
    config_path: &Path,
    shared: &appliance_serve::Shared,
    filler: &appliance_fill::Filler,
    scrubber: &mut crate::scrub::Scrubber,
) {
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
    reload_certificates(&config, shared);
    // The pass under way goes on at the new pace; `enabled` stops or starts the thread.
    scrubber.reconfigure(config.scrub_config());
    tracing::info!(
        bandwidth_bits_per_s = config.fill.bandwidth_bits_per_s,
        window = %config.fill.window,
        log_level = %config.log_level,
        access_log = %config.serve.access_log,
        scrub_enabled = config.scrub.enabled,
        scrub_period_s = config.scrub.period_s,
        scrub_bytes_per_s_max = config.scrub.bytes_per_s_max,
        "SIGHUP: reloaded the fill bandwidth cap and window, the log level, the access-log \
         file, the TLS certificates and [scrub]; listeners, limits, drives and fill sources \
         take effect at the next restart"
    );
}

/// SIGHUP with HTTPS: new handshakes get the certificates in the files now; connections
/// already open keep theirs. (`Config::load` refused a bad file before this is reached, and
/// the certificates in use stay.)
fn reload_certificates(config: &Config, shared: &appliance_serve::Shared) {
    let (Some(tls), Some(running)) = (&config.tls, shared.tls()) else {
        if config.tls.is_some() != shared.tls().is_some() {
            tracing::warn!("SIGHUP: adding or removing [tls] takes effect at the next restart");
        }
        return;
    };
    match running.reload(&tls.tls_config().certificates) {
        Ok(()) => {
            let names: Vec<String> = running
                .identities()
                .list()
                .iter()
                .map(|identity| identity.names.join(" "))
                .collect();
            tracing::info!(certificates = %names.join(", "), "SIGHUP: TLS certificates loaded");
        }
        Err(error) => {
            tracing::error!(%error, "SIGHUP: TLS certificates refused; the ones in use stay")
        }
    }
}

/// WATCHDOG_USEC, when systemd expects keep-alives from this process (WATCHDOG_PID).
fn watchdog_interval() -> Option<Duration> {
    let mut interval_us = 0u64;
    sd_notify::watchdog_enabled(false, &mut interval_us).then(|| Duration::from_micros(interval_us))
}

/// Sends WATCHDOG=1 while the event loop runs, the store's drives answer and the upkeep thread
/// makes progress: a stuck loop, a wedged drive thread or a stuck upkeep thread stops the
/// keep-alives and systemd restarts the daemon (a panic anywhere aborts it at once).
async fn keep_watchdog_alive(
    store: Store,
    upkeep: Arc<Heartbeat>,
    watchdog_interval: Option<Duration>,
) {
    let Some(interval) = watchdog_interval else {
        return;
    };
    let period = (interval / 3).max(Duration::from_millis(100));
    loop {
        let probe = store.clone();
        let alive = tokio::time::timeout(
            period,
            tokio::task::spawn_blocking(move || probe.drives_alive()),
        )
        .await;
        let upkeep_state = upkeep.state();
        if !matches!(alive, Ok(Ok(true))) {
            tracing::error!("a drive thread does not answer: withholding the watchdog keep-alive");
        } else if !matches!(upkeep_state, UpkeepState::Ok { .. }) {
            tracing::error!(
                upkeep = ?upkeep_state,
                "the store upkeep thread makes no progress: withholding the watchdog keep-alive"
            );
        } else {
            let _ = sd_notify::notify(
                false,
                &[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&status_summary(&store)),
                ],
            );
        }
        tokio::time::sleep(period).await;
    }
}

/// The STATUS= line systemctl shows.
fn status_summary(store: &Store) -> String {
    let stats = store.stats();
    let failed = stats
        .drives
        .iter()
        .filter(|drive| drive.status != appliance_store::DriveStatus::Ok)
        .count();
    format!(
        "{} files on {} drives ({} failed)",
        stats.files,
        stats.drives.len(),
        failed
    )
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
    let upkeep = Upkeep::spawn(store.clone(), None, TestFaults::default());
    let fill_config = config.fill_config()?;
    let runtime = fill_runtime(fill_config.concurrency)?;
    let filler = Arc::new(
        appliance_fill::Filler::new(store.clone(), fill_config, runtime.handle().clone())
            .map_err(|error| anyhow::anyhow!(error))?,
    );
    let location = manifest.map(appliance_fill::ManifestLocation::parse);
    let report: Result<appliance_fill::FillReport> = runtime.block_on(async {
        // Handlers first, so a signal that comes early cancels the fill instead of killing
        // the process.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut task = match filler.start(location) {
            Ok(started) => started.task,
            Err(appliance_fill::AlreadyRunning) => unreachable!("a new filler runs no fill"),
        };
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

/// Worker threads of the fill's runtime: downloads, hashing and store writes of `concurrency`
/// files share them; the blocking work (parsing, planning, listing, store writes in
/// `block_in_place`) runs on the runtime's blocking pool.
const FILL_WORKER_THREADS: usize = 2;
/// Blocking threads besides one per download: manifest load, planning, deletes, DNS.
const FILL_BLOCKING_THREADS_SPARE: usize = 4;

/// The fill's own runtime, threads named `fill`, each lowered (SCHED_IDLE, else nice 19, and
/// the idle I/O class) as it starts: the fill takes CPU only when serving leaves it idle. Its
/// blocking pool holds one thread per download (each may sit in a store write) plus spares,
/// so a download waiting for the drive never keeps another from reaching its next append.
fn fill_runtime(concurrency: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(FILL_WORKER_THREADS)
        .max_blocking_threads(concurrency + FILL_BLOCKING_THREADS_SPARE)
        .thread_name("fill")
        .on_thread_start(lower_fill_thread)
        .enable_all()
        .build()
        .context("starting the fill runtime")
}

fn lower_fill_thread() {
    static REFUSED: std::sync::Once = std::sync::Once::new();
    if let Err(error) = appliance_device::priority::lower_current_thread() {
        REFUSED.call_once(|| {
            tracing::warn!(%error, "fill threads run at normal priority: lowering refused");
        });
    }
}
