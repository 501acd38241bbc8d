//! The serving loop: listeners, connections, request handling, and the zero-copy body path.
//!
//! Each connection is a tokio task that reads one request head at a time (bounded by the
//! header limits and a header timeout), answers it in order (pipelining), and sends the body
//! with sendfile(2) from the drive's buffered descriptor at the store's device offsets: on the
//! worker when the range is in the page cache, else on a thread of the drive's cold-read pool
//! after asking the kernel to read the range ahead (`cold.rs`). The head goes out with MSG_MORE so it shares a
//! packet with the first body bytes. No body byte passes through user space. Every write,
//! head or body, runs under the response's `SendMeter`: a client that takes nothing for the
//! send timeout, or less than the minimum send rate over a window, is cut (the connection is
//! reset, so the kernel drops what it still held for it). Nothing here takes a lock shared by
//! all connections: counters are atomics, the access log a channel.

use crate::access_log::{AccessLog, AccessLogTarget};
use crate::cold::{ColdConfig, ColdReads, DirectPiece, Route};
use crate::http::{
    content_type, error_response, etag_from_sha256, http_date, parse_request, request_method,
    response_has_content, write_response_head, HttpError, Limits, Method, Parse, Representation,
    RequestHead, ResponseHead, Selection,
};
use crate::metrics::Metrics;
use crate::send_rate::{SendCut, SendMeter, SendRateMin};
use crate::signed::UrlSigner;
use crate::tls::{HandshakeError, Secured, Tls, TlsConfig};
use appliance_device::zerocopy;
use appliance_store::{FileHandle, Store};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Largest sendfile(2) call; the kernel sends what the socket buffer takes anyway.
const SENDFILE_CHUNK_BYTES: u64 = 4 << 20;
/// Largest piece of a body read into user space to be encrypted by rustls in the process.
const TLS_PIECE_BYTES: u64 = 64 << 10;
/// How long a closing TLS connection may take to send its close_notify alert.
const TLS_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bodies at least this long get an explicit read-ahead hint first; shorter ones are left to
/// the kernel's own read-ahead, which saves a system call on the small-range path.
const PREFETCH_BYTES_MIN: u64 = 256 << 10;

thread_local! {
    /// The Date header value of the current second, formatted once per second per thread.
    static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

/// The current IMF-fixdate, cached for the second.
fn date_now() -> String {
    let now = now_unix_s();
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != now {
            *cached = (now, http_date(now));
        }
        cached.1.clone()
    })
}

/// Every serving limit and option; each has a configured value.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The plain HTTP listener; None for HTTPS only.
    pub listen: Option<SocketAddr>,
    /// The HTTPS listener and its certificates; None for plain HTTP only.
    pub tls: Option<TlsConfig>,
    pub limits: Limits,
    /// From a request's first byte (or the connection's start) to its complete head.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a send may make no progress (a client that stopped reading).
    pub send_timeout: Duration,
    /// The least a client must take, over each window, while a response is sent to it (a
    /// client reading a trickle, which the send timeout alone never cuts).
    pub send_rate_min: SendRateMin,
    /// Connections served at once; further ones wait in the listen backlog.
    pub connections_max: usize,
    /// Requests on one connection before it is closed.
    pub requests_per_connection_max: u64,
    /// On a miss, redirect (302) to this base URL with the same path and query.
    pub miss_redirect_base: Option<String>,
    /// When set, every request needs a valid signed URL (see `signed`).
    pub url_signing_key: Option<Vec<u8>>,
    pub access_log: AccessLogTarget,
    /// How long a stop waits for responses in flight.
    pub shutdown_grace: Duration,
    /// Where ranges not in the page cache are read.
    pub cold: ColdConfig,
}

impl Default for ServeConfig {
    fn default() -> ServeConfig {
        ServeConfig {
            listen: Some(SocketAddr::from(([0, 0, 0, 0], 8080))),
            tls: None,
            limits: Limits::default(),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            send_rate_min: SendRateMin {
                bytes_per_s: 4096,
                window: Duration::from_secs(30),
            },
            connections_max: 20_000,
            requests_per_connection_max: 10_000,
            miss_redirect_base: None,
            url_signing_key: None,
            access_log: AccessLogTarget::Off,
            shutdown_grace: Duration::from_secs(30),
            cold: ColdConfig::default(),
        }
    }
}

/// What every connection shares. The daemon reaches it only through methods.
pub struct Shared {
    store: Store,
    config: ServeConfig,
    metrics: Metrics,
    draining: AtomicBool,
    access_log: AccessLog,
    signer: Option<UrlSigner>,
    cold: ColdReads,
    tls: Option<Tls>,
}

/// Serving's counters, as operators see them.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficCounts {
    pub responses: u64,
    pub bytes_sent: u64,
    pub hits: u64,
    pub misses: u64,
    pub connections_active: u64,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    pub fn connections_active(&self) -> u64 {
        u64::try_from(self.metrics.connections_active.get()).unwrap_or(0)
    }

    /// The counters since start.
    pub fn traffic(&self) -> TrafficCounts {
        TrafficCounts {
            responses: self.metrics.responses.get(),
            bytes_sent: self.metrics.bytes_sent.get(),
            hits: self.metrics.hits.get(),
            misses: self.metrics.misses.get(),
            connections_active: self.connections_active(),
        }
    }

    /// Registers serving's metrics in the daemon's registry.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register(registry);
        self.cold.counts.register(registry);
    }

    /// Points the access log at another destination (SIGHUP with a changed config).
    pub fn retarget_access_log(&self, target: AccessLogTarget) {
        self.access_log.retarget(target);
    }

    /// Asks the access-log writer to reopen its file (after rotation).
    pub fn reopen_access_log(&self) {
        self.access_log.reopen();
    }

    /// The HTTPS listener's state; None when there is no HTTPS listener.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// TLS connections open now: (keys in the kernel, encrypted in the process).
    pub fn tls_connections_active(&self) -> (u64, u64) {
        let count = |path| u64::try_from(self.metrics.tls_active(path).get()).unwrap_or(0);
        (count(TlsPath::Kernel), count(TlsPath::User))
    }

    /// The send limits of a response whose sending starts now.
    fn send_meter(&self) -> SendMeter {
        SendMeter::start(
            self.config.send_timeout,
            self.config.send_rate_min,
            Instant::now(),
        )
    }
}

/// Which subscriber listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Http,
    Https,
}

impl Listener {
    pub fn label(self) -> &'static str {
        match self {
            Listener::Http => "http",
            Listener::Https => "https",
        }
    }
}

/// How a TLS connection is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPath {
    /// kTLS: the kernel encrypts what sendfile and send put on the socket.
    Kernel,
    /// rustls in the process, bodies read into buffers.
    User,
}

impl TlsPath {
    pub fn label(self) -> &'static str {
        match self {
            TlsPath::Kernel => "kernel",
            TlsPath::User => "user",
        }
    }
}

/// A bound server: the subscriber listeners.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, Listener)>,
}

async fn bind_listener(address: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|error| io::Error::new(error.kind(), format!("listening on {address}: {error}")))
}

impl Server {
    /// Loads the certificates, probes the kernel's TLS and binds the listeners; must run
    /// inside a tokio runtime.
    pub async fn bind(store: Store, config: ServeConfig) -> io::Result<Server> {
        let mut listeners = Vec::new();
        if let Some(address) = config.listen {
            listeners.push((bind_listener(address).await?, Listener::Http));
        }
        let tls = match &config.tls {
            Some(tls_config) => {
                let tls = Tls::start(tls_config.clone())
                    .await
                    .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
                match &tls.kernel.why_not {
                    None => tracing::info!("TLS: connections hand their keys to the kernel (kTLS)"),
                    Some(why) => {
                        tracing::info!(%why, "TLS: connections are encrypted in the process")
                    }
                }
                listeners.push((bind_listener(tls_config.listen).await?, Listener::Https));
                Some(tls)
            }
            None => None,
        };
        if listeners.is_empty() {
            let error = "no subscriber listener: plain HTTP is off and there is no [tls]";
            return Err(io::Error::new(io::ErrorKind::InvalidInput, error));
        }
        let signer = config.url_signing_key.as_deref().map(UrlSigner::new);
        let metrics = Metrics::new();
        if let Some(tls) = &tls {
            metrics.tls_kernel.set(i64::from(tls.kernel.available()));
        }
        let shared = Arc::new(Shared {
            cold: ColdReads::new(config.cold),
            store,
            access_log: AccessLog::start(config.access_log.clone()),
            config,
            metrics,
            draining: AtomicBool::new(false),
            signer,
            tls,
        });
        Ok(Server { shared, listeners })
    }

    /// The first listener's address (plain HTTP when it is on).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners[0].0.local_addr()
    }

    /// Every listener with its address.
    pub fn local_addrs(&self) -> io::Result<Vec<(Listener, SocketAddr)>> {
        self.listeners
            .iter()
            .map(|(listener, kind)| Ok((*kind, listener.local_addr()?)))
            .collect()
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves until `stop` turns true; then stops accepting and waits up to the grace period
    /// for the connections in flight.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let Server { shared, listeners } = self;
        // One limit for all listeners: a TLS handshake holds a slot like a request does.
        let slots = Arc::new(Semaphore::new(shared.config.connections_max));
        let accepting: Vec<_> = listeners
            .into_iter()
            .map(|(listener, kind)| {
                tokio::spawn(accept_loop(
                    listener,
                    kind,
                    Arc::clone(&shared),
                    Arc::clone(&slots),
                    stop.clone(),
                ))
            })
            .collect();
        for task in accepting {
            let _ = task.await;
        }
        shared.set_draining(true);
        let deadline = Instant::now() + shared.config.shutdown_grace;
        while shared.connections_active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Accepts connections on one listener until `stop` turns true; the listener closes then.
async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("never closed"),
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    connection(stream, peer, kind, &shared).await;
                    drop(permit);
                });
            }
            Err(error) => {
                tracing::warn!(%error, listener = kind.label(), "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A client connection's byte stream: the socket itself, or TLS over it.
enum Transport {
    /// Plain HTTP: heads go out with send(2), bodies with sendfile(2).
    Plain(TcpStream),
    /// TLS with the keys in the kernel: written exactly like `Plain`, encrypted by the kernel.
    Kernel(Box<ktls::KtlsStream<TcpStream>>),
    /// TLS encrypted in the process: bodies are read into buffers and written through rustls.
    User(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Where a response's bytes go.
enum Sink<'a> {
    /// A socket the kernel sends from (and, with kTLS, encrypts for).
    Socket(&'a TcpStream),
    /// rustls, which encrypts in the process and writes to the socket.
    Tls(&'a mut tokio_rustls::server::TlsStream<TcpStream>),
}

impl Transport {
    fn sink(&mut self) -> Sink<'_> {
        match self {
            Transport::Plain(stream) => Sink::Socket(stream),
            Transport::Kernel(stream) => Sink::Socket(stream.get_ref()),
            Transport::User(stream) => Sink::Tls(stream),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(stream) => stream,
            Transport::Kernel(stream) => stream.get_ref(),
            Transport::User(stream) => stream.get_ref().0,
        }
    }

    fn tls_path(&self) -> Option<TlsPath> {
        match self {
            Transport::Plain(_) => None,
            Transport::Kernel(_) => Some(TlsPath::Kernel),
            Transport::User(_) => Some(TlsPath::User),
        }
    }

    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Transport::Plain(stream) => stream.read_buf(buf).await,
            Transport::Kernel(stream) => stream.read_buf(buf).await,
            Transport::User(stream) => {
                // Into `buf` itself: a buffer of its own here would be part of every
                // connection's future, plain ones included.
                let filled = buf.len();
                buf.resize(filled + 4096, 0);
                let read = tls_read(stream, &mut buf[filled..]).await;
                buf.truncate(filled + *read.as_ref().unwrap_or(&0));
                read
            }
        }
    }

    /// Ends a connection whose last response was sent whole: a TLS connection says
    /// close_notify (within a short bound) before the socket closes.
    async fn close(mut self) {
        let shutdown = async {
            match &mut self {
                Transport::Plain(_) => Ok(()),
                Transport::Kernel(stream) => stream.shutdown().await,
                Transport::User(stream) => stream.shutdown().await,
            }
        };
        let _ = tokio::time::timeout(TLS_CLOSE_TIMEOUT, shutdown).await;
    }
}

/// Reads decrypted bytes into `chunk` (the count; 0 at the end). What rustls queued while
/// reading goes out while the read waits, not with the next response: the alert that refuses
/// a renegotiation would otherwise reach the client only when the connection times out, and
/// leave it hanging in its handshake until then.
async fn tls_read(
    stream: &mut tokio_rustls::server::TlsStream<TcpStream>,
    chunk: &mut [u8],
) -> io::Result<usize> {
    use std::pin::Pin;
    use std::task::Poll;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    std::future::poll_fn(|context| {
        let mut read = ReadBuf::new(chunk);
        match Pin::new(&mut *stream).poll_read(context, &mut read) {
            Poll::Ready(outcome) => Poll::Ready(outcome.map(|()| read.filled().len())),
            Poll::Pending => {
                if stream.get_ref().1.wants_write() {
                    if let Poll::Ready(Err(error)) = Pin::new(&mut *stream).poll_flush(context) {
                        return Poll::Ready(Err(error));
                    }
                }
                Poll::Pending
            }
        }
    })
    .await
}

/// The TLS handshake of a connection on the HTTPS listener, within the handshake timeout;
/// None (counted, logged) when it fails.
async fn secure(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> Option<Transport> {
    let tls = shared.tls.as_ref()?;
    let failed = |reason: &str| shared.metrics.tls_handshake_failures(reason).inc();
    match tokio::time::timeout(tls.config.handshake_timeout, tls.handshake(stream)).await {
        Err(_) => {
            failed("timeout");
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
        Ok(Err(HandshakeError::Refused(error))) => {
            failed("refused");
            tracing::debug!(%peer, %error, "TLS handshake refused");
            None
        }
        Ok(Err(HandshakeError::Kernel(error))) => {
            // A client can cause this (bad bytes right after its Finished): not worth a warning.
            failed("kernel");
            tracing::debug!(%peer, %error, "handing TLS keys to the kernel failed");
            None
        }
        Ok(Ok(Secured::Kernel(stream))) => Some(Transport::Kernel(Box::new(stream))),
        Ok(Ok(Secured::User(stream))) => Some(Transport::User(stream)),
    }
}

/// Counts an open TLS connection by path for as long as it lives.
struct TlsGuard<'a>(&'a Metrics, TlsPath);

impl Drop for TlsGuard<'_> {
    fn drop(&mut self) {
        self.0.tls_active(self.1).dec();
    }
}

/// Why a response could not be sent to its end.
#[derive(Debug)]
enum SendError {
    Io(io::Error),
    /// The send timeout or the minimum send rate cut the client off.
    Cut(SendCut),
}

impl From<io::Error> for SendError {
    fn from(error: io::Error) -> SendError {
        SendError::Io(error)
    }
}

impl From<SendCut> for SendError {
    fn from(cut: SendCut) -> SendError {
        SendError::Cut(cut)
    }
}

/// Why reading a request head stopped.
enum ReadError {
    Http(HttpError),
    Timeout,
    Closed,
}

/// How one request was answered: for the access log, and for the connection loop, which goes on
/// only when the response did not say `Connection: close`.
#[derive(Clone, Copy, Debug)]
struct Answered {
    status: u16,
    bytes_sent: u64,
    hit: bool,
    /// What the response head said; false means the connection closes after it.
    keep_alive: bool,
}

/// Counts an open connection for as long as it lives.
struct ConnectionGuard<'a>(&'a Metrics);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_active.dec();
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, listener: Listener, shared: &Shared) {
    shared.metrics.connections_total.inc();
    shared.metrics.listener(listener).connections.inc();
    shared.metrics.connections_active.inc();
    let _guard = ConnectionGuard(&shared.metrics);
    let _ = stream.set_nodelay(true);
    let mut conn = match listener {
        Listener::Http => Transport::Plain(stream),
        Listener::Https => match secure(stream, peer, shared).await {
            Some(conn) => conn,
            None => return,
        },
    };
    let _tls_guard = conn.tls_path().map(|path| {
        shared.metrics.tls_connections(path).inc();
        shared.metrics.tls_active(path).inc();
        TlsGuard(&shared.metrics, path)
    });
    if serve_requests(&mut conn, peer, listener, shared).await == Ending::Clean {
        conn.close().await;
    }
}

/// How a connection's requests ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The last response went out whole (or the client left between requests).
    Clean,
    /// The connection was reset (a client cut by the send limits) or failed mid-response.
    Broken,
}

/// Answers a connection's requests in order until it closes.
async fn serve_requests(
    conn: &mut Transport,
    peer: SocketAddr,
    listener: Listener,
    shared: &Shared,
) -> Ending {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut served = 0u64;
    loop {
        let (head, consumed) = match read_head(conn, &mut buf, shared, served == 0).await {
            Ok(parsed) => parsed,
            Err(ReadError::Closed) => return Ending::Clean,
            Err(ReadError::Timeout) => {
                shared.metrics.timeouts.inc();
                if !buf.is_empty() {
                    let _ = send_error(conn, shared, 408, false, request_method(&buf)).await;
                }
                return Ending::Clean;
            }
            Err(ReadError::Http(error)) => {
                let method = request_method(&buf);
                let _ = send_error(conn, shared, error.status(), false, method).await;
                return Ending::Clean;
            }
        };
        served += 1;
        let keep_alive = head.keep_alive
            && served < shared.config.requests_per_connection_max
            && !shared.is_draining();
        let started = Instant::now();
        let outcome = respond(conn, &head, keep_alive, shared).await;
        if let Ok(answered) = &outcome {
            let counts = shared.metrics.listener(listener);
            counts.responses.inc();
            counts.bytes_sent.inc_by(answered.bytes_sent);
            log_access(shared, peer, listener, &head, answered, started);
        }
        if let Err(error) = &outcome {
            count_send_error(shared, peer, &head, error);
            if matches!(error, SendError::Cut(_)) {
                // Reset rather than close: a FIN would queue behind the bytes the client is
                // not taking, and the kernel would hold them (and the socket) for minutes.
                let _ = conn.tcp().set_zero_linger();
            }
            return Ending::Broken;
        }
        buf.drain(..consumed);
        if !outcome.is_ok_and(|answered| answered.keep_alive) {
            return Ending::Clean;
        }
    }
}

/// Counts a response that could not be sent to its end; a cut client is also traced.
fn count_send_error(shared: &Shared, peer: SocketAddr, head: &RequestHead, error: &SendError) {
    match error {
        SendError::Cut(SendCut::NoProgress) => {
            shared.metrics.timeouts.inc();
            shared.metrics.client_aborts.inc();
            tracing::info!(
                %peer,
                path = %head.path,
                send_timeout_ms = u64::try_from(shared.config.send_timeout.as_millis())
                    .unwrap_or(u64::MAX),
                "cut a client that took no byte for the send timeout"
            );
        }
        SendError::Cut(SendCut::TooSlow {
            window_bytes,
            window_bytes_min,
        }) => {
            shared.metrics.slow_clients.inc();
            tracing::info!(
                %peer,
                path = %head.path,
                window_bytes,
                window_bytes_min,
                window_ms = u64::try_from(shared.config.send_rate_min.window.as_millis())
                    .unwrap_or(u64::MAX),
                "cut a client taking less than the minimum send rate"
            );
        }
        SendError::Io(error) => {
            let aborted = matches!(
                error.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::TimedOut
            );
            if aborted {
                shared.metrics.client_aborts.inc();
            } else {
                // The server's side failed (a drive's read, a cold-read thread): the client
                // saw a response end early, so say why.
                shared.metrics.errors.inc();
                tracing::warn!(
                    %peer,
                    path = %head.path,
                    %error,
                    "a response ended early: sending its body failed"
                );
            }
        }
    }
}

/// Reads until `buf` holds a complete request head; returns it and its length.
async fn read_head(
    conn: &mut Transport,
    buf: &mut Vec<u8>,
    shared: &Shared,
    first: bool,
) -> Result<(RequestHead, usize), ReadError> {
    let config = &shared.config;
    let limit = config
        .limits
        .header_bytes_max
        .max(config.limits.request_line_bytes_max)
        + 1;
    let mut deadline =
        (first || !buf.is_empty()).then(|| Instant::now() + config.header_read_timeout);
    loop {
        if !buf.is_empty() {
            match parse_request(buf, &config.limits) {
                Ok(Parse::Complete {
                    head,
                    consumed_bytes,
                }) => return Ok((head, consumed_bytes)),
                Ok(Parse::Incomplete) => {}
                Err(error) => return Err(ReadError::Http(error)),
            }
        }
        let wait = match deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()),
            None => config.idle_timeout,
        };
        if buf.len() >= limit {
            return Err(ReadError::Http(HttpError::HeadersTooLarge));
        }
        buf.reserve(4096.min(limit - buf.len()));
        let read = match tokio::time::timeout(wait, conn.read_buf(buf)).await {
            Err(_) => return Err(ReadError::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(ReadError::Closed),
            Ok(Ok(read)) => read,
        };
        if read > 0 && deadline.is_none() {
            deadline = Some(Instant::now() + config.header_read_timeout);
        }
    }
}

pub(crate) fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// Answers one request. `keep_alive` is what the connection allows; the answer says whether
/// the response kept the connection open (a server error closes it).
async fn respond(
    conn: &mut Transport,
    head: &RequestHead,
    keep_alive: bool,
    shared: &Shared,
) -> Result<Answered, SendError> {
    if head.method == Method::Other {
        return send_error(conn, shared, 405, keep_alive, head.method).await;
    }
    if let Some(signer) = &shared.signer {
        if signer
            .verify(&head.path, head.query.as_deref(), now_unix_s())
            .is_err()
        {
            return send_error(conn, shared, 403, keep_alive, head.method).await;
        }
    }
    let handle = match shared.store.open_file(&head.path) {
        Ok(Some(handle)) => Arc::new(handle),
        Ok(None) => {
            shared.metrics.misses.inc();
            return miss(conn, head, keep_alive, shared).await;
        }
        Err(error) => {
            tracing::error!(path = %head.path, %error, "lookup failed");
            return send_error(conn, shared, 500, false, head.method).await;
        }
    };
    shared.metrics.hits.inc();
    let representation = Representation {
        size_bytes: handle.size_bytes(),
        etag: etag_from_sha256(&handle.sha256()),
        last_modified_unix_s: handle.published_unix_s(),
    };
    let selection = crate::http::select(head, &representation);
    let date = date_now();
    let mut extra = vec![
        ("Content-Type", content_type(&head.path).to_string()),
        ("ETag", representation.etag.clone()),
        (
            "Last-Modified",
            http_date(representation.last_modified_unix_s),
        ),
    ];
    let size = representation.size_bytes;
    let (status, body) = match selection {
        Selection::Full => (200, Some((0, size))),
        Selection::Partial {
            start,
            end_inclusive,
        } => {
            extra.push((
                "Content-Range",
                format!("bytes {start}-{end_inclusive}/{size}"),
            ));
            (206, Some((start, end_inclusive - start + 1)))
        }
        Selection::NotModified => (304, None),
        Selection::PreconditionFailed => {
            let answered = send_error(conn, shared, 412, keep_alive, head.method).await?;
            return Ok(Answered {
                hit: true,
                ..answered
            });
        }
        Selection::RangeNotSatisfiable => {
            extra.push(("Content-Range", format!("bytes */{size}")));
            (416, None)
        }
    };
    let content_length = body.map_or(0, |(_, length)| length);
    let mut out = Vec::with_capacity(512);
    write_response_head(
        &ResponseHead {
            status,
            keep_alive,
            version_minor: head.version_minor,
            date: &date,
            content_length,
            extra: &extra,
        },
        &mut out,
    );
    let send_body = response_has_content(head.method, status) && content_length > 0;
    let mut meter = shared.send_meter();
    let mut sent = send_all(conn, &out, send_body, shared, &mut meter).await? as u64;
    if send_body {
        let (start, length) = body.expect("a body was selected");
        sent += match conn.sink() {
            Sink::Socket(stream) => {
                send_file_range(stream, &handle, start, length, shared, &mut meter).await?
            }
            Sink::Tls(tls) => {
                tls_send_file_range(tls, &handle, start, length, shared, &mut meter).await?
            }
        };
    }
    shared.metrics.count_status(status);
    Ok(Answered {
        status,
        bytes_sent: sent,
        hit: true,
        keep_alive,
    })
}

/// A path the box does not hold: 404, or a 302 to the configured upstream.
async fn miss(
    conn: &mut Transport,
    head: &RequestHead,
    keep_alive: bool,
    shared: &Shared,
) -> Result<Answered, SendError> {
    let Some(base) = &shared.config.miss_redirect_base else {
        return send_error(conn, shared, 404, keep_alive, head.method).await;
    };
    let mut location = base.trim_end_matches('/').to_string();
    location.extend(percent_encoding::utf8_percent_encode(
        &head.path,
        PATH_ESCAPES,
    ));
    if let Some(query) = &head.query {
        location.push('?');
        location.push_str(query);
    }
    let date = date_now();
    let extra = [("Location", location)];
    let mut out = Vec::with_capacity(256);
    write_response_head(
        &ResponseHead {
            status: 302,
            keep_alive,
            version_minor: head.version_minor,
            date: &date,
            content_length: 0,
            extra: &extra,
        },
        &mut out,
    );
    let sent = send_all(conn, &out, false, shared, &mut shared.send_meter()).await?;
    shared.metrics.count_status(302);
    Ok(Answered {
        status: 302,
        bytes_sent: sent as u64,
        hit: false,
        keep_alive,
    })
}

/// Characters escaped when a decoded path goes back into a URL.
const PATH_ESCAPES: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Sends an error response (no content after it for HEAD); a miss, as nothing was served.
async fn send_error(
    conn: &mut Transport,
    shared: &Shared,
    status: u16,
    keep_alive: bool,
    method: Method,
) -> Result<Answered, SendError> {
    let mut out = Vec::with_capacity(256);
    error_response(status, keep_alive, method, &date_now(), &mut out);
    shared.metrics.count_status(status);
    let sent = send_all(conn, &out, false, shared, &mut shared.send_meter()).await?;
    Ok(Answered {
        status,
        bytes_sent: sent as u64,
        hit: false,
        keep_alive,
    })
}

/// Waits for one write to finish, within the send limits `meter` keeps: the count written.
/// A deadline that passes first only has the meter judge the client; the same write goes on
/// being awaited, never dropped, because a write under way may already have put bytes on the
/// socket, and a second write of the same bytes would corrupt the body.
async fn metered_write(
    meter: &mut SendMeter,
    attempt: impl Future<Output = io::Result<usize>>,
) -> Result<usize, SendError> {
    let mut attempt = std::pin::pin!(attempt);
    loop {
        let outcome = match meter.deadline() {
            Some(deadline) => {
                let deadline = tokio::time::Instant::from_std(deadline);
                tokio::time::timeout_at(deadline, attempt.as_mut())
                    .await
                    .ok()
            }
            None => Some(attempt.as_mut().await),
        };
        match outcome {
            Some(result) => {
                let count = result?;
                meter.record(count as u64, Instant::now())?;
                return Ok(count);
            }
            None => meter.check(Instant::now())?,
        }
    }
}

/// Writes all of `bytes`, within the send limits `meter` keeps, and counts them as sent.
async fn send_all(
    conn: &mut Transport,
    bytes: &[u8],
    more_follows: bool,
    shared: &Shared,
    meter: &mut SendMeter,
) -> Result<usize, SendError> {
    let written = match conn.sink() {
        Sink::Socket(stream) => write_all(stream, bytes, more_follows, meter).await?,
        Sink::Tls(tls) => tls_write_all(tls, bytes, !more_follows, meter).await?,
    };
    shared.metrics.bytes_sent.inc_by(written as u64);
    Ok(written)
}

/// Writes all of `bytes`, within the send limits `meter` keeps (the caller counts them).
async fn write_all(
    stream: &TcpStream,
    bytes: &[u8],
    more_follows: bool,
    meter: &mut SendMeter,
) -> Result<usize, SendError> {
    let mut written = 0;
    while written < bytes.len() {
        let attempt = stream.async_io(Interest::WRITABLE, || {
            zerocopy::send(stream_fd(stream), &bytes[written..], more_follows)
        });
        written += metered_write(meter, attempt).await?;
    }
    Ok(written)
}

/// Writes all of `bytes` through rustls, within the send limits `meter` keeps, and with
/// `flush` pushes out every encrypted byte it holds (the caller counts them).
async fn tls_write_all(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    bytes: &[u8],
    flush: bool,
    meter: &mut SendMeter,
) -> Result<usize, SendError> {
    let mut written = 0;
    while written < bytes.len() {
        written += metered_write(meter, tls.write(&bytes[written..])).await?;
    }
    if flush {
        tls_flush(tls, meter).await?;
    }
    Ok(written)
}

/// Pushes out every encrypted byte rustls holds, within the send limits `meter` keeps.
async fn tls_flush(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    meter: &mut SendMeter,
) -> Result<(), SendError> {
    metered_write(meter, async { tls.flush().await.map(|()| 0) }).await?;
    Ok(())
}

/// The drive's descriptor that a file's bytes are sent or read from.
fn serve_source(handle: &FileHandle) -> Result<std::os::fd::BorrowedFd<'_>, SendError> {
    handle
        .serve_fd()
        .ok_or_else(|| io::Error::other("the drive has no descriptor to send from").into())
}

/// A piece that came back empty: the drive ended inside a stored extent.
fn ended_inside_extent() -> SendError {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the drive ended inside a stored extent",
    )
    .into()
}

/// Sends file bytes `start..start + length` through rustls: each piece read into a buffer on
/// the worker when it is in the page cache, else by direct I/O on a thread of the drive's
/// pool (`ColdReads::read_direct`), so a worker never waits for a drive here either.
async fn tls_send_file_range(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    handle: &Arc<FileHandle>,
    start: u64,
    length: u64,
    shared: &Shared,
    meter: &mut SendMeter,
) -> Result<u64, SendError> {
    let source = serve_source(handle)?;
    let mut resident = Vec::new();
    let mut total = 0u64;
    for range in handle.ranges(start, length) {
        let mut offset = range.offset_bytes;
        let end = range.offset_bytes + range.length_bytes;
        while offset < end {
            let chunk = (end - offset).min(TLS_PIECE_BYTES);
            let written = if shared.cold.route(handle, offset, chunk) == Route::Inline {
                shared.cold.counts.inline_sends.inc();
                resident.resize(usize::try_from(chunk).expect("a piece fits in memory"), 0);
                let read = zerocopy::pread(source, offset, &mut resident)?;
                tls_write_all(tls, &resident[..read], false, meter).await?
            } else {
                let piece =
                    direct_piece(shared, meter, handle, start + total, offset, chunk).await?;
                tls_write_all(tls, piece.bytes.bytes(), false, meter).await?
            };
            if written == 0 {
                return Err(ended_inside_extent());
            }
            offset += written as u64;
            total += written as u64;
            shared.metrics.bytes_sent.inc_by(written as u64);
        }
    }
    tls_flush(tls, meter).await?;
    Ok(total)
}

fn stream_fd(stream: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    stream.as_fd()
}

/// Sends file bytes `start..start + length` with sendfile(2), extent by extent, within the send
/// limits `meter` keeps: inline when the piece is in the page cache, else on a thread of the
/// drive's cold-read pool.
async fn send_file_range(
    stream: &TcpStream,
    handle: &Arc<FileHandle>,
    start: u64,
    length: u64,
    shared: &Shared,
    meter: &mut SendMeter,
) -> Result<u64, SendError> {
    let source = serve_source(handle)?;
    let ranges = handle.ranges(start, length);
    let mut total = 0u64;
    for range in ranges {
        let mut offset = range.offset_bytes;
        let end = range.offset_bytes + range.length_bytes;
        let mut hinted = false;
        while offset < end {
            let chunk = usize::try_from((end - offset).min(SENDFILE_CHUNK_BYTES))
                .expect("chunk fits usize");
            let route = shared.cold.route(handle, offset, chunk as u64);
            // One read-ahead hint per range: always before a cold piece (so the drive sees
            // its reads at once), and before a long resident one.
            // (A direct read bypasses the page cache: a hint would only read the bytes twice.)
            if !hinted
                && route != Route::Direct
                && (route == Route::Pool || end - offset >= PREFETCH_BYTES_MIN)
            {
                let _ = zerocopy::prefetch(source, offset, end - offset);
                hinted = true;
            }
            if route == Route::Warm {
                let warm = shared.cold.warm(handle, offset, chunk as u64);
                if let Err(error) = on_the_drive(meter, warm).await? {
                    tracing::debug!(%error, "warming a cold piece failed; sending it anyway");
                }
            }
            let sent = match route {
                Route::Inline | Route::Warm => {
                    if route == Route::Inline {
                        shared.cold.counts.inline_sends.inc();
                    }
                    let attempt = stream.async_io(Interest::WRITABLE, || {
                        zerocopy::sendfile(stream_fd(stream), source, &mut offset, chunk)
                    });
                    metered_write(meter, attempt).await?
                }
                Route::Pool => {
                    let sent = pool_sendfile(stream, handle, offset, chunk, shared, meter).await?;
                    offset += sent as u64;
                    sent
                }
                Route::Direct => {
                    let piece =
                        direct_piece(shared, meter, handle, start + total, offset, chunk as u64)
                            .await?;
                    let written = write_all(stream, piece.bytes.bytes(), false, meter).await?;
                    offset += written as u64;
                    written
                }
            };
            if sent == 0 {
                return Err(ended_inside_extent());
            }
            total += sent as u64;
            shared.metrics.bytes_sent.inc_by(sent as u64);
        }
    }
    Ok(total)
}

/// Waits for `work` on the drive (a cold piece read or warmed on a drive's thread); its time is
/// the server's, not the client's, so `meter` excuses it (up to one send timeout).
async fn on_the_drive<T>(
    meter: &mut SendMeter,
    work: impl Future<Output = T>,
) -> Result<T, SendError> {
    let began = Instant::now();
    let outcome = until_the_drive_deadline(meter, work).await?;
    meter.excuse(began.elapsed(), Instant::now());
    Ok(outcome)
}

/// Waits for `work` no later than the meter's drive deadline: past it, the response is given
/// up as stalled (the connection is then reset, so a write the drive's thread may still make
/// lands nowhere that matters, and dropping the wait is safe).
async fn until_the_drive_deadline<T>(
    meter: &SendMeter,
    work: impl Future<Output = T>,
) -> Result<T, SendError> {
    match meter.drive_deadline() {
        Some(deadline) => {
            let deadline = tokio::time::Instant::from_std(deadline);
            tokio::time::timeout_at(deadline, work)
                .await
                .map_err(|_| SendError::Cut(SendCut::NoProgress))
        }
        None => Ok(work.await),
    }
}

/// A cold piece read by direct I/O (`ColdReads::read_direct`: file bytes from `file_offset`,
/// drive bytes `offset..+length`), waited for no later than the meter's drive deadline. Only
/// its time on the drive is excused, not its wait for the in-flight budget.
async fn direct_piece(
    shared: &Shared,
    meter: &mut SendMeter,
    handle: &Arc<FileHandle>,
    file_offset: u64,
    offset: u64,
    length: u64,
) -> Result<DirectPiece, SendError> {
    let read = shared.cold.read_direct(handle, file_offset, offset, length);
    let piece = until_the_drive_deadline(meter, read).await??;
    meter.excuse(piece.drive_time, Instant::now());
    Ok(piece)
}

/// One sendfile of a cold piece on the drive's pool, once the socket can take bytes, within
/// the send limits `meter` keeps: the count sent.
async fn pool_sendfile(
    stream: &TcpStream,
    handle: &Arc<FileHandle>,
    offset: u64,
    chunk: usize,
    shared: &Shared,
    meter: &mut SendMeter,
) -> Result<usize, SendError> {
    write_elsewhere(stream, meter, |socket| {
        shared.cold.sendfile(socket, handle, offset, chunk)
    })
    .await
}

/// Runs `write` (a write to a duplicate of the stream's socket, done by another thread) once
/// the socket is writable, until it writes or fails with more than a full socket. Waiting for
/// the socket is the client's time and `meter` judges it; the write's own time (its place in
/// the drive's queue, and the drive's read inside sendfile) is excused. A write handed to the
/// other thread is never dropped while the response goes on (it may already be putting bytes
/// on the socket, and a second write of the same bytes would corrupt the body); only the
/// meter's drive deadline drops it, and that ends the response.
///
/// A socket the other thread found full is probed again here before its write readiness is
/// cleared. The client may have taken every byte since, and the runtime may already have
/// seen that edge: clearing the readiness blindly would then wait for an edge that never
/// comes. The probe looks at the socket after the readiness is read (as tokio's own `try_io`
/// has its closure do), so only a socket still full is cleared.
async fn write_elsewhere<F, W>(
    stream: &TcpStream,
    meter: &mut SendMeter,
    mut write: W,
) -> Result<usize, SendError>
where
    W: FnMut(std::os::fd::OwnedFd) -> F,
    F: Future<Output = io::Result<usize>>,
{
    loop {
        metered_write(meter, async { stream.writable().await.map(|()| 0) }).await?;
        let socket = stream_fd(stream).try_clone_to_owned()?;
        match on_the_drive(meter, write(socket)).await? {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                let probe = stream.try_io(Interest::WRITABLE, || {
                    if zerocopy::writable_now(stream_fd(stream))? {
                        Ok(())
                    } else {
                        Err(io::Error::from(io::ErrorKind::WouldBlock))
                    }
                });
                match probe {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error.into()),
                }
            }
            Ok(count) => {
                meter.record(count as u64, Instant::now())?;
                return Ok(count);
            }
            Err(error) => return Err(error.into()),
        }
    }
}

fn log_access(
    shared: &Shared,
    peer: SocketAddr,
    listener: Listener,
    head: &RequestHead,
    answered: &Answered,
    started: Instant,
) {
    if !shared.access_log.enabled() {
        return;
    }
    let method = match head.method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Other => "OTHER",
    };
    let line = format!(
        "{} {} {} {} {} {} {} {:.3} {} {}\n",
        date_now(),
        peer,
        method,
        head.path,
        head.range.as_deref().unwrap_or("-"),
        answered.status,
        answered.bytes_sent,
        started.elapsed().as_secs_f64() * 1000.0,
        if answered.hit { "hit" } else { "miss" },
        listener.label()
    );
    if !shared.access_log.log(line) {
        shared.metrics.access_log_dropped.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// Runs `test` on a runtime of its own with a loopback connection: the server's end, as
    /// the worker holds it, and the client's.
    fn on_a_connection<F: Future<Output = ()>>(
        test: impl FnOnce(TcpStream, std::net::TcpStream) -> F,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().await.unwrap();
            test(server, client).await;
        });
    }

    /// The lost wake-up of the cold path: the socket is full when the other thread writes,
    /// the client then takes every byte (so no later edge will come) and the runtime sees that
    /// edge before the worker learns of the full socket. The write must still go on.
    #[test]
    fn a_write_elsewhere_that_found_the_socket_full_is_not_left_waiting() {
        on_a_connection(|server, mut client| async move {
            // The runtime holds a write readiness it saw earlier, and the socket (with the
            // client's receive buffer) is full: as after a cold write that filled it.
            let chunk = vec![7u8; 1 << 16];
            let fill = || {
                let mut queued = 0usize;
                loop {
                    match zerocopy::send(stream_fd(&server), &chunk, false) {
                        Ok(count) => queued += count,
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break queued,
                        Err(error) => panic!("{error}"),
                    }
                }
            };
            server.writable().await.unwrap();
            let queued = fill();
            let mut calls = 0;
            let mut meter =
                SendMeter::start(Duration::from_secs(60), SendRateMin::OFF, Instant::now());
            let written = write_elsewhere(&server, &mut meter, |socket| {
                calls += 1;
                let first = calls == 1;
                let (reply, answer) = tokio::sync::oneshot::channel();
                let mut client = client.try_clone().unwrap();
                let total = queued;
                std::thread::spawn(move || {
                    let outcome = if first {
                        // Full now; then the client takes it all, and the kernel's edge has
                        // time to reach the runtime before the worker hears back.
                        let mut taken = vec![0u8; total];
                        client.read_exact(&mut taken).unwrap();
                        std::thread::sleep(Duration::from_millis(200));
                        Err(io::Error::from(io::ErrorKind::WouldBlock))
                    } else {
                        zerocopy::send(socket.as_fd(), b"after", false)
                    };
                    drop(socket);
                    let _ = reply.send(outcome);
                });
                async move { answer.await.unwrap() }
            });
            let written = tokio::time::timeout(Duration::from_secs(5), written)
                .await
                .expect("the write waited for a readiness edge that had already passed");
            assert_eq!(written.ok(), Some(5));
            let mut after = [0u8; 5];
            client.read_exact(&mut after).unwrap();
            assert_eq!(&after, b"after");
        });
    }

    /// A cold piece that waits on a slow drive for longer than the send timeout is sent, not
    /// cut: the drive's time is not the client's, who takes every byte at once (up to one
    /// send timeout per wait). A client that takes nothing is still cut at the send timeout.
    #[test]
    fn a_slow_drive_is_not_held_against_the_client() {
        on_a_connection(|server, mut client| async move {
            let timeout = Duration::from_millis(500);
            // A write on the drive's thread after `drive_ms`.
            let slow = |drive_ms: u64| {
                move |socket: std::os::fd::OwnedFd| {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(drive_ms));
                        let _ = reply.send(zerocopy::send(socket.as_fd(), b"late", false));
                    });
                    async move { answer.await.unwrap() }
                }
            };
            // The drive's queue and read take longer than the send timeout: excused.
            let mut meter = SendMeter::start(timeout, SendRateMin::OFF, Instant::now());
            let written = write_elsewhere(&server, &mut meter, slow(700)).await;
            assert_eq!(written.ok(), Some(4), "a slow drive cut the client");
            let mut late = [0u8; 4];
            client.read_exact(&mut late).unwrap();
            assert_eq!(&late, b"late");
            // Beyond twice the send timeout the response ends as a stall would.
            let mut meter = SendMeter::start(timeout, SendRateMin::OFF, Instant::now());
            let written = write_elsewhere(&server, &mut meter, slow(1200)).await;
            assert!(
                matches!(written, Err(SendError::Cut(SendCut::NoProgress))),
                "a drive wait without end held the connection"
            );
            client.read_exact(&mut late).unwrap();

            // A client that stops reading: the socket fills and stays full.
            let chunk = vec![7u8; 1 << 16];
            let mut meter = SendMeter::start(timeout, SendRateMin::OFF, Instant::now());
            let began = Instant::now();
            let outcome = loop {
                let outcome = write_elsewhere(&server, &mut meter, |socket| {
                    let sent = zerocopy::send(socket.as_fd(), &chunk, false);
                    async move { sent }
                })
                .await;
                if outcome.is_err() {
                    break outcome;
                }
            };
            assert!(
                matches!(outcome, Err(SendError::Cut(SendCut::NoProgress))),
                "a stalled client was not cut"
            );
            assert!(began.elapsed() < Duration::from_secs(5));
            drop(client);
        });
    }
}
