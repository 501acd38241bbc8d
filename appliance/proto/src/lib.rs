//! The control-socket protocol between `applianced` and `appliance-ctl`: one JSON object per
//! line each way over a Unix stream socket. A request names the protocol version and a
//! command; the daemon answers with zero or more progress lines and one final response. An
//! unknown version or a malformed request gets an error response, never a dropped connection.
//! This crate holds only types and their (de)serialisation: no I/O. Every answer is a typed
//! value (`views`), so the daemon, `/health`, `/metrics` and `appliance-ctl` share one shape.

#![forbid(unsafe_code)]

mod views;

pub use views::*;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Version 2: typed replies (`Reply`) and typed
/// errors (`Error`) instead of free JSON.
pub const PROTOCOL_VERSION: u32 = 2;

/// The default socket path.
pub const DEFAULT_SOCKET: &str = "/run/appliance/control.sock";

/// Longest request line the daemon reads, in bytes.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// A request line (parsed with [`parse_request`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

/// What an operator asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Everything `appliance-ctl status` shows.
    Status,
    /// One row per data drive.
    Drives,
    /// Start an out-of-window fill, optionally from another manifest (URL or file).
    Fill { manifest: Option<String> },
    /// Stop the running fill.
    FillCancel,
    /// Progress of the running fill and the last result.
    FillStatus,
    /// Tell steering to send no new clients; report drained once sessions end.
    Drain,
    /// Serve normally again.
    Undrain,
    /// Re-read stored files (one path, or all) and check them against their checksums.
    Verify { path: Option<String> },
}

/// Why a command failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line is not a request this daemon understands.
    BadRequest,
    /// The request names a protocol version this daemon does not speak.
    UnsupportedVersion,
    /// A fill was asked to start while one runs.
    AlreadyRunning,
    /// The command ran and failed.
    Failed,
}

/// A command's failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        out.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A command's result (or progress), one variant per kind of answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    Drives(Vec<DriveRow>),
    FillStarted(FillStarted),
    FillCancelled(FillCancelled),
    FillStatus(Box<FillStatus>),
    /// The state after a drain or undrain.
    State(State),
    VerifyProgress(VerifyProgress),
    VerifyReport(VerifyReport),
}

/// A line the daemon sends back: progress lines (`done: false`), then one final line with
/// either a reply or an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub version: u32,
    pub done: bool,
    pub error: Option<Error>,
    pub reply: Option<Reply>,
}

impl Response {
    pub fn ok(reply: Reply) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            done: true,
            error: None,
            reply: Some(reply),
        }
    }

    pub fn progress(reply: Reply) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            done: false,
            error: None,
            reply: Some(reply),
        }
    }

    pub fn error(error: Error) -> Response {
        Response {
            version: PROTOCOL_VERSION,
            done: true,
            error: Some(error),
            reply: None,
        }
    }

    /// The final line for `result`.
    pub fn result(result: Result<Reply, Error>) -> Response {
        match result {
            Ok(reply) => Response::ok(reply),
            Err(error) => Response::error(error),
        }
    }

    /// The line to send (newline included).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("responses always encode");
        line.push('\n');
        line
    }
}

impl Request {
    pub fn new(command: Command) -> Request {
        Request {
            version: PROTOCOL_VERSION,
            command,
        }
    }

    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("requests always encode");
        line.push('\n');
        line
    }
}

/// Parses a request line; the error is the error response to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Error> {
    parse(line).map_err(|message| {
        let kind = if message.starts_with("unsupported protocol version") {
            ErrorKind::UnsupportedVersion
        } else {
            ErrorKind::BadRequest
        };
        Error::new(kind, message)
    })
}

fn parse(line: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|error| format!("malformed request: {error}"))?;
    let serde_json::Value::Object(mut fields) = value else {
        return Err("malformed request: not a JSON object".into());
    };
    let version = match fields
        .remove("version")
        .as_ref()
        .map(serde_json::Value::as_u64)
    {
        Some(Some(version)) => version,
        _ => return Err("malformed request: no protocol version".into()),
    };
    if version != u64::from(PROTOCOL_VERSION) {
        return Err(format!(
            "unsupported protocol version {version} (this daemon speaks {PROTOCOL_VERSION})"
        ));
    }
    let command: Command = serde_json::from_value(serde_json::Value::Object(fields.clone()))
        .map_err(|error| format!("malformed request: {error}"))?;
    // serde does not refuse extra fields next to a variant without fields: check by hand.
    let known = serde_json::to_value(&command).map_err(|error| error.to_string())?;
    if let Some(extra) = fields.keys().find(|key| known.get(key.as_str()).is_none()) {
        return Err(format!("malformed request: unknown field `{extra}`"));
    }
    Ok(Request {
        version: PROTOCOL_VERSION,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(line: &str, expected: Result<Command, &str>) {
        match (parse_request(line.as_bytes()), expected) {
            (Ok(request), Ok(command)) => assert_eq!(request.command, command, "{line}"),
            (Err(error), Err(fragment)) => {
                assert!(error.message.contains(fragment), "{line}: {error}")
            }
            (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn requests_parse_or_get_a_clear_error() {
        check(r#"{"version":2,"command":"status"}"#, Ok(Command::Status));
        check(
            r#"{"version":2,"command":"fill","manifest":"http://o/m.json"}"#,
            Ok(Command::Fill {
                manifest: Some("http://o/m.json".into()),
            }),
        );
        check(
            r#"{"version":2,"command":"verify","path":null}"#,
            Ok(Command::Verify { path: None }),
        );
        check(
            r#"{"version":1,"command":"status"}"#,
            Err("unsupported protocol version 1"),
        );
        check(r#"{"command":"status"}"#, Err("no protocol version"));
        check(
            r#"{"version":2,"command":"format_everything"}"#,
            Err("malformed"),
        );
        check(r#"{"version":2}"#, Err("malformed"));
        check("not json", Err("malformed"));
        check(
            r#"{"version":2,"command":"status","extra":1}"#,
            Err("malformed"),
        );
        check(
            r#"{"version":"1","command":"status"}"#,
            Err("no protocol version"),
        );
    }

    #[test]
    fn lines_round_trip() {
        let request = Request::new(Command::Drain);
        assert_eq!(
            parse_request(request.to_line().as_bytes()).unwrap(),
            request
        );
        for response in [
            Response::ok(Reply::State(State::Drained)),
            Response::progress(Reply::VerifyProgress(VerifyProgress {
                files_done: 1,
                files_total: 2,
            })),
            Response::error(Error::new(
                ErrorKind::AlreadyRunning,
                "a fill is already running",
            )),
        ] {
            let decoded: Response = serde_json::from_str(&response.to_line()).unwrap();
            assert_eq!(decoded, response);
        }
    }
}
