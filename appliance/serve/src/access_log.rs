//! The access log: one line per response, handed to a writer task through a bounded channel
//! (serving never waits for the log: a full channel drops the line and counts it), buffered,
//! flushed every second, and reopened on request so that log rotation works.

use std::io::Write;
use std::path::PathBuf;
use tokio::sync::mpsc;

/// Lines the channel holds before new ones are dropped.
const CHANNEL_LINES: usize = 65_536;

/// Where access-log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stderr,
    File(PathBuf),
}

enum Message {
    Line(String),
    Reopen,
    Retarget(AccessLogTarget),
}

/// The sending side, cloned into every connection.
#[derive(Clone)]
pub struct AccessLog {
    sender: Option<mpsc::Sender<Message>>,
}

impl AccessLog {
    /// Starts the writer task (on the current runtime) for `target`.
    pub fn start(target: AccessLogTarget) -> AccessLog {
        if target == AccessLogTarget::Off {
            return AccessLog { sender: None };
        }
        let (sender, receiver) = mpsc::channel(CHANNEL_LINES);
        tokio::spawn(write_lines(target, receiver));
        AccessLog {
            sender: Some(sender),
        }
    }

    /// Queues a line; false when it had to be dropped.
    pub fn log(&self, line: String) -> bool {
        match &self.sender {
            Some(sender) => sender.try_send(Message::Line(line)).is_ok(),
            None => true,
        }
    }

    /// Reopens the file (after an external rotation renamed it).
    pub fn reopen(&self) {
        if let Some(sender) = &self.sender {
            let _ = sender.try_send(Message::Reopen);
        }
    }

    /// Switches to another file (or stderr); turning the log on or off needs a restart.
    pub fn retarget(&self, target: AccessLogTarget) {
        if let Some(sender) = &self.sender {
            let _ = sender.try_send(Message::Retarget(target));
        }
    }

    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }
}

fn open(target: &AccessLogTarget) -> Box<dyn Write + Send> {
    match target {
        AccessLogTarget::File(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Box::new(std::io::BufWriter::with_capacity(1 << 16, file)),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot open the access log");
                Box::new(std::io::sink())
            }
        },
        _ => Box::new(std::io::BufWriter::new(std::io::stderr())),
    }
}

async fn write_lines(mut target: AccessLogTarget, mut receiver: mpsc::Receiver<Message>) {
    let mut out = open(&target);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            message = receiver.recv() => match message {
                Some(Message::Line(line)) => {
                    let _ = out.write_all(line.as_bytes());
                }
                Some(Message::Reopen) => {
                    let _ = out.flush();
                    out = open(&target);
                }
                Some(Message::Retarget(new_target)) => {
                    let _ = out.flush();
                    if new_target != AccessLogTarget::Off {
                        target = new_target;
                    }
                    out = open(&target);
                }
                None => break,
            },
            _ = tick.tick() => {
                let _ = out.flush();
            }
        }
    }
    let _ = out.flush();
}
