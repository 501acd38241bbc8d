//! The control socket: a Unix stream socket (mode 0660, group `appliance` when it exists)
//! speaking `appliance-proto`, one JSON line per request. Under systemd the socket comes from
//! `applianced.socket` (socket activation: systemd owns the path, its mode and group, and
//! clients queue while the daemon restarts); outside systemd the daemon binds the configured
//! path itself. Every mutation the operator can make goes through here; this module only
//! speaks the protocol and hands each command to the operations service (`operations.rs`). A
//! malformed request or an unknown protocol version gets an error line, never a crash.

use crate::operations::Operations;
use anyhow::{Context, Result};
use appliance_proto::{
    parse_request, Command, Error, ErrorKind, Reply, Response, REQUEST_BYTES_MAX,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};

/// The control listener, and whether the daemon made its path (and so removes it at exit).
pub struct ControlListener {
    pub listener: UnixListener,
    pub bound_path: Option<std::path::PathBuf>,
}

/// The socket systemd passed (`LISTEN_FDS`, socket activation), else a fresh bind of `path`.
pub fn listen(path: &Path) -> Result<ControlListener> {
    let mut passed = listenfd::ListenFd::from_env();
    for index in 0..passed.len() {
        if let Ok(Some(listener)) = passed.take_unix_listener(index) {
            listener.set_nonblocking(true)?;
            tracing::info!(index, "control socket from systemd (socket activation)");
            return Ok(ControlListener {
                listener: UnixListener::from_std(listener)?,
                bound_path: None,
            });
        }
    }
    Ok(ControlListener {
        listener: bind(path)?,
        bound_path: Some(path.to_path_buf()),
    })
}

/// Binds the socket: replaces a stale one, sets mode 0660 and the `appliance` group.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another applianced is running",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group_id("appliance") {
        let _ = std::os::unix::fs::lchown(path, None, Some(gid));
    }
    Ok(listener)
}

/// The id of a group, from /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

pub async fn serve(listener: UnixListener, operations: Arc<Operations>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let operations = Arc::clone(&operations);
        tokio::spawn(async move {
            if let Err(error) = connection(stream, &operations).await {
                tracing::debug!(%error, "control connection ended");
            }
        });
    }
}

/// `uid N` of the peer, for the log.
fn actor(stream: &UnixStream) -> String {
    match stream.peer_cred() {
        Ok(credentials) => format!("uid {}", credentials.uid()),
        Err(_) => "unknown peer".to_string(),
    }
}

async fn connection(stream: UnixStream, operations: &Arc<Operations>) -> Result<()> {
    let actor = actor(&stream);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(u64::try_from(REQUEST_BYTES_MAX).unwrap_or(u64::MAX) + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.len() > REQUEST_BYTES_MAX {
            let error = Error::new(ErrorKind::BadRequest, "request too long");
            send(&mut write, &Response::error(error)).await?;
            return Ok(());
        }
        match parse_request(&line) {
            Ok(request) => answer(request.command, operations, &actor, &mut write).await?,
            Err(error) => send(&mut write, &Response::error(error)).await?,
        }
    }
}

async fn send(write: &mut OwnedWriteHalf, response: &Response) -> Result<()> {
    write.write_all(response.to_line().as_bytes()).await?;
    Ok(())
}

async fn answer(
    command: Command,
    operations: &Arc<Operations>,
    actor: &str,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    let result = match command {
        Command::Status => Ok(Reply::Status(Box::new(operations.status()))),
        Command::Drives => Ok(Reply::Drives(operations.drives())),
        Command::Fill { manifest } => operations
            .start_fill(manifest, actor)
            .map(Reply::FillStarted),
        Command::FillCancel => Ok(Reply::FillCancelled(operations.cancel_fill(actor))),
        Command::FillStatus => Ok(Reply::FillStatus(Box::new(operations.fill_status()))),
        Command::Drain => Ok(Reply::State(operations.set_draining(true, actor))),
        Command::Undrain => Ok(Reply::State(operations.set_draining(false, actor))),
        Command::Verify { path } => return verify(path, operations, write).await,
    };
    send(write, &Response::result(result)).await
}

/// Verifies on a blocking thread, sending a progress line every half second.
async fn verify(
    path: Option<String>,
    operations: &Arc<Operations>,
    write: &mut OwnedWriteHalf,
) -> Result<()> {
    let (progress_sender, mut progress) = tokio::sync::mpsc::channel(4);
    let verifying = Arc::clone(operations);
    let work = tokio::task::spawn_blocking(move || {
        verifying.verify(path, |update| {
            let _ = progress_sender.try_send(update);
        })
    });
    tokio::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => {
                let result = match result {
                    Ok(result) => result.map(Reply::VerifyReport),
                    Err(error) => Err(Error::new(ErrorKind::Failed, format!("verify failed: {error}"))),
                };
                return send(write, &Response::result(result)).await;
            }
            Some(update) = progress.recv() => {
                send(write, &Response::progress(Reply::VerifyProgress(update))).await?;
            }
        }
    }
}
