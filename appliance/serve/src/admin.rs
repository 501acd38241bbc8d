//! The admin listener (loopback by default): `GET /health` for steering (JSON: serving,
//! draining or drained; drives; version), `GET /metrics` (Prometheus text), and
//! `POST /drain` / `POST /undrain` for maintenance. One request per connection.

use crate::http::{
    error_response, http_date, parse_request, request_method, write_response_head, Limits, Parse,
    ResponseHead,
};
use crate::server::Shared;
use appliance_store::DriveStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// More admin routes, provided by the daemon (the fill's, for one).
pub trait AdminExtension: Send + Sync {
    /// Answers `method path?query` with a status and a JSON body; `None` when the route is
    /// not the extension's.
    fn handle(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
    ) -> Option<(u16, serde_json::Value)>;

    /// More metrics in the OpenMetrics text format (without the closing `# EOF`).
    fn metrics(&self) -> String {
        String::new()
    }
}

/// How long an admin client may take to send its request.
const ADMIN_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The state steering sees.
pub fn state_name(shared: &Shared) -> &'static str {
    match (shared.is_draining(), shared.connections_active()) {
        (false, _) => "serving",
        (true, 0) => "drained",
        (true, _) => "draining",
    }
}

/// The `/health` document.
pub fn health_json(shared: &Shared) -> serde_json::Value {
    let stats = shared.store.stats();
    let drives: Vec<serde_json::Value> = stats
        .drives
        .iter()
        .map(|drive| {
            let (state, error) = match &drive.status {
                DriveStatus::Ok => ("ok", None),
                DriveStatus::Failed(reason) => ("failed", Some(reason.clone())),
            };
            serde_json::json!({
                "path": drive.path.display().to_string(),
                "state": state,
                "error": error,
                "files": drive.files,
            })
        })
        .collect();
    serde_json::json!({
        "state": state_name(shared),
        "version": env!("CARGO_PKG_VERSION"),
        "connections_active": shared.connections_active(),
        "files": stats.files,
        "drives": drives,
    })
}

pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = admin_request(stream, &shared).await;
        });
    }
}

async fn admin_request(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let limits = Limits::default();
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        let read = tokio::time::timeout(ADMIN_READ_TIMEOUT, stream.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
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
    let raw_method = first_word(&buf);
    let extended = shared.admin_extension().and_then(|extension| {
        extension
            .handle(raw_method, &head.path, head.query.as_deref())
            .map(|(status, body)| (status, "application/json", body.to_string() + "\n"))
    });
    let (status, content_type, body) = match extended {
        Some(answer) => answer,
        None => match (raw_method, head.path.as_str()) {
            ("GET", "/health") => {
                let status = if state_name(shared) == "serving" {
                    200
                } else {
                    503
                };
                (
                    status,
                    "application/json",
                    health_json(shared).to_string() + "\n",
                )
            }
            ("GET", "/metrics") => {
                let mut text = shared.metrics.encode();
                if let Some(extension) = shared.admin_extension() {
                    if let Some(stripped) = text.strip_suffix("# EOF\n") {
                        text = format!("{stripped}{}# EOF\n", extension.metrics());
                    }
                }
                (
                    200,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                )
            }
            ("POST", "/drain") => {
                shared.set_draining(true);
                tracing::info!("draining: steering is told to send no new clients");
                (
                    200,
                    "application/json",
                    health_json(shared).to_string() + "\n",
                )
            }
            ("POST", "/undrain") => {
                shared.set_draining(false);
                tracing::info!("serving again");
                (
                    200,
                    "application/json",
                    health_json(shared).to_string() + "\n",
                )
            }
            (_, "/health" | "/metrics" | "/drain" | "/undrain") => {
                error_response(405, false, head.method, &date, &mut out);
                return stream.write_all(&out).await;
            }
            _ => {
                error_response(404, false, head.method, &date, &mut out);
                return stream.write_all(&out).await;
            }
        },
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
    out.extend_from_slice(body.as_bytes());
    stream.write_all(&out).await?;
    stream.shutdown().await
}

fn first_word(buf: &[u8]) -> &str {
    let end = buf.iter().position(|&byte| byte == b' ').unwrap_or(0);
    std::str::from_utf8(&buf[..end]).unwrap_or("")
}
