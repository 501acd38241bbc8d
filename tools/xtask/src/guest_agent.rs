//! The host's side of the QEMU guest agent (qemu-ga in the guest, on the virtio-serial port
//! `org.qemu.guest_agent.0`, a unix socket on the host): runs a program in the guest with
//! `guest-exec` and collects its exit code and output with `guest-exec-status`. The VM test
//! uses it to run `appliance-ctl`: the guest has no SSH and no network but QEMU's user mode.
//! It holds no knowledge of what it runs.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long the agent may take to answer `guest-sync` (it may still be starting).
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `guest-sync` attempt waits before it is sent again.
const SYNC_ATTEMPT: Duration = Duration::from_secs(5);
/// How often a running program's status is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The agent's socket on the host (QEMU's `-chardev socket,server=on`).
pub struct GuestAgent {
    pub socket: PathBuf,
}

/// What a program run in the guest did.
#[derive(Debug)]
pub struct GuestRun {
    /// The exit code; `None` when a signal ended it.
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

impl GuestRun {
    /// Fails unless the program exited 0; the error carries what it printed.
    pub fn success(self, what: &str) -> Result<GuestRun> {
        if self.exit_code == Some(0) {
            return Ok(self);
        }
        bail!(
            "{what} in the guest: exit code {:?}\n{}{}",
            self.exit_code,
            self.stdout,
            self.stderr
        );
    }
}

impl GuestAgent {
    /// Runs `path` with `args` in the guest and waits for it to exit, `timeout` at most.
    pub fn run(&self, path: &str, args: &[&str], timeout: Duration) -> Result<GuestRun> {
        let mut connection = Connection::open(self)?;
        let started = connection.execute(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = started["pid"]
            .as_i64()
            .ok_or_else(|| anyhow!("guest-exec {path}: no pid in {started}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let status = connection.execute("guest-exec-status", json!({ "pid": pid }))?;
            if status["exited"] == true {
                return Ok(GuestRun {
                    exit_code: status["exitcode"].as_i64(),
                    stdout: decode(&status["out-data"])?,
                    stderr: decode(&status["err-data"])?,
                });
            }
            if Instant::now() > deadline {
                bail!("{path} {args:?} still running in the guest after {timeout:?}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// One connection to the agent, past `guest-sync-delimited`: the next line is the answer to
/// the next command.
struct Connection {
    reader: BufReader<UnixStream>,
}

impl Connection {
    fn open(agent: &GuestAgent) -> Result<Connection> {
        let stream = UnixStream::connect(&agent.socket)
            .with_context(|| format!("the guest agent's socket {}", agent.socket.display()))?;
        let mut connection = Connection {
            reader: BufReader::new(stream),
        };
        connection.sync()?;
        Ok(connection)
    }

    /// Sends 0xFF (which resets the agent's parser) and `guest-sync-delimited` with a fresh
    /// id until the agent answers that id: it then has nothing left over from an earlier
    /// connection or a command sent before it started. The agent puts 0xFF before its answer.
    fn sync(&mut self) -> Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut id = u64::from(std::process::id()) << 20;
        loop {
            id += 1;
            let request = json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } });
            let stream = self.reader.get_mut();
            stream.write_all(&[0xFF])?;
            stream.write_all(format!("{request}\n").as_bytes())?;
            stream.set_read_timeout(Some(SYNC_ATTEMPT))?;
            match self.read_sync_answer(id) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() > deadline => {
                    return Err(error.context(format!(
                        "the guest agent did not answer guest-sync within {} s",
                        SYNC_TIMEOUT.as_secs()
                    )))
                }
                Err(_) => {}
            }
        }
    }

    /// Reads up to each 0xFF and the line after it until that line answers `id`.
    fn read_sync_answer(&mut self, id: u64) -> Result<()> {
        loop {
            let mut skipped = Vec::new();
            self.reader.read_until(0xFF, &mut skipped)?;
            if skipped.last() != Some(&0xFF) {
                bail!("the guest agent closed the connection");
            }
            let answer = self.read_line()?;
            if answer["return"].as_u64() == Some(id) {
                return Ok(());
            }
        }
    }

    fn read_line(&mut self) -> Result<Value> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            bail!("the guest agent closed the connection");
        }
        serde_json::from_slice(&line).with_context(|| {
            format!(
                "the guest agent's answer {:?}",
                String::from_utf8_lossy(&line)
            )
        })
    }

    /// Sends a command and returns its `return` value (an `error` becomes an error).
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({ "execute": command, "arguments": arguments });
        let stream = self.reader.get_mut();
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let answer = self.read_line()?;
        if let Some(error) = answer.get("error") {
            bail!("guest agent {command}: {error}");
        }
        answer
            .get("return")
            .cloned()
            .ok_or_else(|| anyhow!("guest agent {command}: no return in {answer}"))
    }
}

/// `out-data`/`err-data`: base64, absent when the program printed nothing.
fn decode(data: &Value) -> Result<String> {
    let Some(text) = data.as_str() else {
        return Ok(String::new());
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("the guest agent's output is not base64")?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// An agent that answers as qemu-ga does: a stale answer left from an earlier connection
    /// first, 0xFF before each guest-sync-delimited answer, a program still running at the
    /// first status and exited with base64 output at the second.
    fn fake_agent(listener: UnixListener) -> Vec<Value> {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        writer.write_all(b"{\"return\": {\"pid\": 1}}\n").unwrap();
        let mut requests = Vec::new();
        let mut statuses = 0;
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).unwrap() == 0 {
                return requests;
            }
            let text: Vec<u8> = line.into_iter().filter(|byte| *byte != 0xFF).collect();
            let request: Value = serde_json::from_slice(&text).unwrap();
            let answer = match request["execute"].as_str().unwrap() {
                "guest-sync-delimited" => {
                    writer.write_all(&[0xFF]).unwrap();
                    json!({ "return": request["arguments"]["id"] })
                }
                "guest-exec" => json!({ "return": { "pid": 4242 } }),
                "guest-exec-status" if statuses == 0 => {
                    statuses += 1;
                    json!({ "return": { "exited": false } })
                }
                "guest-exec-status" => json!({ "return": {
                    "exited": true, "exitcode": 3,
                    "out-data": "c3RhdGU6IHNlcnZpbmcK", "out-truncated": false,
                } }),
                _ => json!({ "error": { "class": "CommandNotFound", "desc": "no" } }),
            };
            writer.write_all(format!("{answer}\n").as_bytes()).unwrap();
            requests.push(request);
        }
    }

    #[test]
    fn runs_a_program_through_the_agent() {
        let socket = std::env::temp_dir().join(format!("xtask-qga-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).unwrap();
        let agent_thread = std::thread::spawn(move || fake_agent(listener));
        let agent = GuestAgent {
            socket: socket.clone(),
        };
        let run = agent
            .run(
                "/usr/bin/appliance-ctl",
                &["status"],
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(run.exit_code, Some(3));
        assert_eq!(run.stdout, "state: serving\n");
        assert_eq!(run.stderr, "");
        let error = run.success("appliance-ctl status").unwrap_err().to_string();
        assert!(error.contains("exit code Some(3)") && error.contains("state: serving"));
        let requests = agent_thread.join().unwrap();
        let commands: Vec<&str> = requests
            .iter()
            .map(|request| request["execute"].as_str().unwrap())
            .collect();
        assert_eq!(
            commands,
            [
                "guest-sync-delimited",
                "guest-exec",
                "guest-exec-status",
                "guest-exec-status"
            ]
        );
        assert_eq!(
            requests[1]["arguments"],
            json!({ "path": "/usr/bin/appliance-ctl", "arg": ["status"], "capture-output": true })
        );
        assert_eq!(requests[2]["arguments"], json!({ "pid": 4242 }));
        let _ = std::fs::remove_file(&socket);
    }
}
