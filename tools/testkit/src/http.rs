//! Loopback HTTP for tests and tools: free ports, one blocking HTTP/1.1 request per
//! connection (`Connection: close`, read to the end), and waiting for a server to answer.
//! Must not grow into a general client: no TLS, no chunked bodies, no redirects, no
//! keep-alive (tests of those speak raw sockets or curl on purpose).

use crate::error;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// How long a request waits for the server's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a request waits to be sent.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `wait_for_ok` asks again.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A free port on 127.0.0.1: bound, read and released, so another process may take it before
/// the caller binds it (a race every caller accepts).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What a server answered.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// The status line and header fields, without the blank line that ends them.
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    /// The value of the first header field called `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field
                .trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim())
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method target` to 127.0.0.1:`port` on a fresh connection with `headers` (such as
/// `("Range", "bytes=0-99")`) and reads the response to the end. Fails when the connection
/// fails, no complete head arrives, or a body is not as long as its Content-Length says.
pub fn http(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let has_length = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-length"));
    if method == "POST" && !has_length {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes())?;
    let mut received = Vec::new();
    stream.read_to_end(&mut received).map_err(|failure| {
        io::Error::new(failure.kind(), format!("{method} {target}: {failure}"))
    })?;
    parse(method, target, received)
}

/// `GET path` from 127.0.0.1:`port`, of the bytes `first..=last` when `range` is given.
pub fn get(port: u16, path: &str, range: Option<(u64, u64)>) -> io::Result<Response> {
    match range {
        Some((first, last)) => {
            let range = format!("bytes={first}-{last}");
            http(port, "GET", path, &[("Range", &range)])
        }
        None => http(port, "GET", path, &[]),
    }
}

/// Splits a whole response into status, head and body, and checks the body's length.
fn parse(method: &str, target: &str, mut received: Vec<u8>) -> io::Result<Response> {
    let end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| error(format!("{method} {target}: no complete response head")))?;
    let head = String::from_utf8_lossy(&received[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| error(format!("{method} {target}: no status in {head:?}")))?;
    let body = received.split_off(end + 4);
    let response = Response { status, head, body };
    // RFC 9110 6.4.1: these carry no content whatever their Content-Length says.
    let without_content = method == "HEAD" || status < 200 || status == 204 || status == 304;
    let length = response.header("content-length").map(str::parse::<usize>);
    if let (Some(Ok(length)), false) = (length, without_content) {
        if length != response.body.len() {
            return Err(error(format!(
                "{method} {target}: Content-Length {length} but {} body bytes",
                response.body.len()
            )));
        }
    }
    Ok(response)
}

/// Asks `GET path` of 127.0.0.1:`port` until it answers 200. Fails after `within`, or at once
/// when `alive` says the server's process is gone.
pub fn wait_for_ok(
    port: u16,
    path: &str,
    within: Duration,
    mut alive: impl FnMut() -> bool,
) -> io::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let answer = http(port, "GET", path, &[]);
        if answer.as_ref().is_ok_and(|response| response.status == 200) {
            return Ok(());
        }
        if !alive() {
            return Err(error(format!(
                "the server on port {port} exited before GET {path} answered 200"
            )));
        }
        if Instant::now() > deadline {
            let last = match answer {
                Ok(response) => format!("HTTP {}", response.status),
                Err(failure) => failure.to_string(),
            };
            return Err(error(format!(
                "GET {path} on port {port} did not answer 200 within {within:?} (last: {last})"
            )));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers one connection with `answer` and returns the request it read.
    fn serve_once(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                request.push(byte[0]);
            }
            stream.write_all(answer).unwrap();
            String::from_utf8(request).unwrap()
        });
        (port, thread)
    }

    #[test]
    fn a_request_carries_its_headers_and_the_answer_is_split() {
        let (port, server) =
            serve_once(b"HTTP/1.1 206 Partial\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc");
        let response = http(port, "GET", "/x.mp4", &[("Range", "bytes=0-2")]).unwrap();
        let request = server.join().unwrap();
        assert!(request.starts_with("GET /x.mp4 HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nRange: bytes=0-2\r\n"), "{request}");
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
        assert_eq!(response.status, 206);
        assert_eq!(response.body, b"abc");
        assert_eq!(response.header("x-a"), Some("b"));
        assert_eq!(response.header("content-LENGTH"), Some("3"));
        assert_eq!(response.header("missing"), None);
    }

    #[test]
    fn bodies_are_checked_against_their_length() {
        let cases: [(&str, &[u8], Result<usize, &str>); 5] = [
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab",
                Err("Content-Length 4 but 2"),
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
                Err("Content-Length 1 but 2"),
            ),
            (
                "HEAD",
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                Ok(0),
            ),
            (
                "GET",
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                Ok(0),
            ),
            (
                "GET",
                b"HTTP/1.1 200 OK\r\n",
                Err("no complete response head"),
            ),
        ];
        for (method, answer, expected) in cases {
            let result = parse(method, "/t", answer.to_vec());
            match (result, expected) {
                (Ok(response), Ok(length)) => assert_eq!(response.body.len(), length),
                (Err(failure), Err(words)) => {
                    assert!(failure.to_string().contains(words), "{failure}");
                }
                (result, expected) => {
                    panic!("{method} {answer:?}: {result:?}, wanted {expected:?}")
                }
            }
        }
    }

    #[test]
    fn waiting_stops_when_the_server_is_gone() {
        let port = free_port().unwrap();
        let started = Instant::now();
        let failure = wait_for_ok(port, "/health", Duration::from_secs(30), || false).unwrap_err();
        assert!(failure.to_string().contains("exited"), "{failure}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
