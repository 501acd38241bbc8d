//! The admin listener's transport: read-only HTTP for steering and Prometheus. `GET` (or
//! `HEAD`) `/health` and `/metrics` only; any other method on them gets 405, any other path
//! 404, so it can face a management network. The answers come from an [`AdminView`] the daemon
//! provides (its operations service); this module only speaks HTTP. Connections are capped
//! (the excess is closed at once) and each gets one whole-request deadline covering the read
//! of its head and the write of its answer. One request per connection.

use crate::http::{
    error_response, http_date, parse_request, request_method, response_has_content,
    write_response_head, Limits, Method, Parse, ResponseHead,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// What the admin listener shows.
pub trait AdminView: Send + Sync {
    /// The `/health` JSON document, and whether steering should send clients (200) or not
    /// (503).
    fn health(&self) -> (bool, String);

    /// The whole `/metrics` exposition in the OpenMetrics text format (`# EOF` included).
    fn metrics(&self) -> String;
}

/// Admin connections open at once; more are closed as soon as they are accepted.
pub const ADMIN_CONNECTIONS_MAX: usize = 16;
/// Everything an admin client gets: reading its request and writing the answer.
pub const ADMIN_REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Request heads are small: a scraper's head fits in a few hundred bytes.
const ADMIN_HEAD_BYTES_MAX: usize = 8 * 1024;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers admin requests until `stop` turns true.
pub async fn serve_admin(
    listener: TcpListener,
    view: Arc<dyn AdminView>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!("admin connection limit reached: closing a new connection");
            continue;
        };
        let view = Arc::clone(&view);
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(ADMIN_REQUEST_DEADLINE, admin_request(stream, &*view)).await;
            drop(permit);
        });
    }
}

async fn admin_request(mut stream: TcpStream, view: &dyn AdminView) -> std::io::Result<()> {
    let limits = Limits {
        header_bytes_max: ADMIN_HEAD_BYTES_MAX,
        ..Limits::default()
    };
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        match parse_request(&buf, &limits) {
            Ok(Parse::Complete { head, .. }) => break Ok(head),
            Ok(Parse::Incomplete) if buf.len() < limits.header_bytes_max => continue,
            Ok(Parse::Incomplete) => break Err(431),
            Err(error) => break Err(error.status()),
        }
    };
    let date = http_date(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0),
    );
    let mut out = Vec::new();
    let head = match head {
        Ok(head) => head,
        Err(status) => {
            error_response(status, false, request_method(&buf), &date, &mut out);
            return stream.write_all(&out).await;
        }
    };
    let (status, content_type, body) = match head.path.as_str() {
        "/health" | "/metrics" if head.method == Method::Other => {
            error_response(405, false, head.method, &date, &mut out);
            return stream.write_all(&out).await;
        }
        "/health" => {
            let (healthy, body) = view.health();
            (
                if healthy { 200 } else { 503 },
                "application/json",
                body + "\n",
            )
        }
        "/metrics" => (200, OPENMETRICS, view.metrics()),
        _ => {
            error_response(404, false, head.method, &date, &mut out);
            return stream.write_all(&out).await;
        }
    };
    let extra = [("Content-Type", content_type.to_string())];
    write_response_head(
        &ResponseHead {
            status,
            keep_alive: false,
            version_minor: head.version_minor,
            date: &date,
            content_length: body.len() as u64,
            extra: &extra,
        },
        &mut out,
    );
    if response_has_content(head.method, status) {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await?;
    stream.shutdown().await
}
