//! Black-box tests of serving: the real `applianced run` on file-backed drives, driven with
//! curl (a real client) and raw sockets: full GETs, every range form, conditionals, HEAD,
//! keep-alive and pipelining, misses with and without redirect, signed URLs, drain, every
//! limit, malformed requests, and served bytes equal to stored bytes for random ranges.

// Test data generation truncates on purpose; sizes here are small.
#![allow(clippy::cast_possible_truncation)]

mod util;

use appliance_testkit::{seeded_bytes, Config, Serve, SplitMix64};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use util::{formatted_drives, metric, Catalog, Daemon, Scratch};

/// A running appliance over an imported catalog.
struct Appliance {
    daemon: Daemon,
    catalog: Catalog,
    drives: Vec<PathBuf>,
    _scratch: Scratch,
}

impl std::ops::Deref for Appliance {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl Appliance {
    /// Formats two drives, imports a catalog, and starts the daemon with `serve` as its
    /// `[serve]` settings.
    fn start(name: &str, serve: Serve) -> Appliance {
        let scratch = Scratch::new(&format!("serve-{name}"));
        let drives = formatted_drives(&scratch, 2, 128 << 20, 8);
        let catalog = Catalog::generate(&scratch, "src", 12, 3_000_000);
        let refs: Vec<&std::path::Path> = drives.iter().map(PathBuf::as_path).collect();
        let out = scratch.store(&refs, &["import", catalog.root.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
        let config = Config {
            serve,
            ..Config::new(&drives)
        };
        let daemon = Daemon::start(&scratch, config);
        Appliance {
            daemon,
            catalog,
            drives,
            _scratch: scratch,
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream
    }
}

/// curl with `args`; returns (status, headers text, body bytes).
fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let fetched = util::curl(args);
    (fetched.status, fetched.head, fetched.body)
}

/// One raw exchange: sends `request`, reads until the server closes or `timeout` passes.
fn raw(stream: &mut TcpStream, request: &[u8]) -> String {
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(count) => response.extend_from_slice(&chunk[..count]),
        }
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn gets_ranges_conditionals_and_head_follow_rfc_9110() {
    let appliance = Appliance::start("protocol", Serve::default());
    let (path, bytes) = appliance.catalog.largest();
    let url = appliance.url(&path);
    let size = bytes.len();
    let (status, headers, body) = curl(&[&url]);
    assert_eq!(status, 200);
    assert!(body == bytes, "full body differs");
    assert!(headers.contains("accept-ranges: bytes"));
    assert!(headers.contains("content-type: video/mp4"), "{headers}");
    let etag = headers
        .lines()
        .find_map(|line| line.strip_prefix("etag: "))
        .expect("etag")
        .trim()
        .to_string();
    assert!(headers.contains("last-modified: "));
    // Every range form.
    let cases: Vec<(String, u16, std::ops::Range<usize>)> = vec![
        ("0-9".into(), 206, 0..10),
        ("100-".into(), 206, 100..size),
        ("-50".into(), 206, size - 50..size),
        (format!("{}-{}", size - 1, size + 100), 206, size - 1..size),
        (format!("{}-", size), 416, 0..0),
        ("0-0,5-9".into(), 200, 0..size),
        ("junk".into(), 200, 0..size),
    ];
    for (range, expected, slice) in cases {
        let (status, headers, body) = curl(&["-H", &format!("Range: bytes={range}"), &url]);
        assert_eq!(status, expected, "range {range}");
        if expected == 416 {
            assert!(
                headers.contains(&format!("content-range: bytes */{size}")),
                "{headers}"
            );
        } else {
            assert!(body == bytes[slice.clone()], "range {range} body");
        }
        if expected == 206 {
            let expect = format!(
                "content-range: bytes {}-{}/{size}",
                slice.start,
                slice.end - 1
            );
            assert!(headers.contains(&expect), "{headers}");
        }
    }
    // Conditionals.
    let cases: Vec<(Vec<String>, u16)> = vec![
        (vec![format!("If-None-Match: {etag}")], 304),
        (vec!["If-None-Match: \"other\"".into()], 200),
        (vec!["If-Match: \"other\"".into()], 412),
        (vec![format!("If-Match: {etag}")], 200),
        (
            vec!["If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT".into()],
            304,
        ),
        (
            vec!["If-Unmodified-Since: Thu, 01 Jan 1970 00:00:00 GMT".into()],
            412,
        ),
        (
            vec!["Range: bytes=0-9".into(), format!("If-Range: {etag}")],
            206,
        ),
        (
            vec!["Range: bytes=0-9".into(), "If-Range: \"stale\"".into()],
            200,
        ),
    ];
    for (headers, expected) in cases {
        let mut args: Vec<String> = Vec::new();
        for header in &headers {
            args.extend(["-H".to_string(), header.clone()]);
        }
        args.push(url.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(curl(&refs).0, expected, "{headers:?}");
    }
    // HEAD: headers only, with the length of the body a GET would send.
    let (status, headers, body) = curl(&["-I", &url]);
    assert_eq!(status, 200);
    assert!(headers.contains(&format!("content-length: {size}")));
    assert!(body.is_empty() || String::from_utf8_lossy(&body).starts_with("HTTP/1.1 200"));
    // Misses and other methods.
    assert_eq!(curl(&[&appliance.url("/not/stored.mp4")]).0, 404);
    assert_eq!(curl(&["-X", "DELETE", &url]).0, 405);
    assert_eq!(
        curl(&[&format!("{url}?token=abc")]).0,
        200,
        "the query is not part of the path"
    );
    // HTTP/1.0.
    assert_eq!(curl(&["-0", "-H", "Range: bytes=0-0", &url]).0, 206);
}

#[test]
fn served_bytes_equal_stored_bytes_for_random_ranges() {
    let appliance = Appliance::start("random", Serve::default());
    let mut rng = SplitMix64(0x1234_5678_9ABC_DEF1);
    let mut stream = appliance.connect();
    for (path, bytes) in &appliance.catalog.files {
        if bytes.is_empty() {
            continue;
        }
        for _ in 0..4 {
            let start = rng.below(bytes.len() as u64) as usize;
            let end = start + rng.below((bytes.len() - start) as u64) as usize;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes={start}-{end}\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let body = read_response(&mut stream);
            assert!(body == bytes[start..=end], "{path} {start}-{end}");
        }
    }
}

/// Reads one keep-alive response and returns its body.
fn read_response(stream: &mut TcpStream) -> Vec<u8> {
    let head = read_head(stream);
    let mut body = vec![0u8; content_length(&head)];
    stream.read_exact(&mut body).unwrap();
    body
}

/// Reads one response head, byte by byte up to its blank line, and returns it lowercased: not
/// one byte of what follows is consumed.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// The Content-Length of a lowercased response head.
fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .unwrap_or_else(|| panic!("no content-length: {head}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn keep_alive_pipelining_and_request_limits() {
    let appliance = Appliance::start(
        "pipeline",
        Serve {
            requests_per_connection_max: Some(3),
            ..Serve::default()
        },
    );
    let (path, bytes) = appliance.catalog.largest();
    let mut stream = appliance.connect();
    let one = format!("GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes=0-3\r\n\r\n");
    let two = format!("GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes=4-7\r\n\r\n");
    stream.write_all(format!("{one}{two}").as_bytes()).unwrap();
    assert_eq!(read_response(&mut stream), bytes[0..4]);
    assert_eq!(read_response(&mut stream), bytes[4..8]);
    // The third request is the last this connection may carry: it is answered and closed.
    let response = raw(&mut stream, one.as_bytes());
    assert!(response.starts_with("HTTP/1.1 206"), "{response}");
    assert!(response.to_ascii_lowercase().contains("connection: close"));
    // Connection: close is honoured; HTTP/1.0 closes unless asked to keep alive.
    let mut stream = appliance.connect();
    let response = raw(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\nRange: bytes=0-0\r\n\r\n")
            .as_bytes(),
    );
    assert!(response.starts_with("HTTP/1.1 206"));
    let mut stream = appliance.connect();
    let response = raw(
        &mut stream,
        format!("GET {path} HTTP/1.0\r\nRange: bytes=0-0\r\n\r\n").as_bytes(),
    );
    assert!(response.contains(" 206 "), "{response}");
}

#[test]
fn malformed_requests_get_400_and_the_connection_closes() {
    let appliance = Appliance::start(
        "malformed",
        Serve {
            request_line_bytes_max: Some(1024),
            header_bytes_max: Some(4096),
            ..Serve::default()
        },
    );
    let long_path = "/a".repeat(2000);
    let big_header = "x".repeat(5000);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), "400"),
        (b"GET /x HTTP/1.1\r\n\r\n".to_vec(), "400"),
        (
            b"GET /../etc/passwd HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            "400",
        ),
        (
            b"GET /a/%2e%2e/b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
            "400",
        ),
        (b"GET /a%00b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), "400"),
        (b"GET /a\\b HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), "400"),
        (b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), "400"),
        (
            b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
            "400",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            "400",
        ),
        (
            b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n".to_vec(),
            "400",
        ),
        (b"\x00\x01\x02\r\n\r\n".to_vec(), "400"),
        (
            format!("GET {long_path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes(),
            "414",
        ),
        (
            format!("GET /x HTTP/1.1\r\nHost: a\r\nX: {big_header}\r\n\r\n").into_bytes(),
            "431",
        ),
    ];
    for (request, status) in cases {
        let mut stream = appliance.connect();
        let response = raw(&mut stream, &request);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{:?} -> {response:?}",
            String::from_utf8_lossy(&request)
        );
    }
    // The daemon is still serving.
    let (path, _) = appliance.catalog.largest();
    assert_eq!(curl(&["-r", "0-0", &appliance.url(&path)]).0, 206);
}

#[test]
fn slow_idle_and_stalled_clients_are_cut_off() {
    let appliance = Appliance::start(
        "timeouts",
        Serve {
            header_read_timeout_ms: Some(800),
            idle_timeout_ms: Some(800),
            send_timeout_ms: Some(800),
            ..Serve::default()
        },
    );
    // Slowloris: a byte every 300 ms never completes a head within the header timeout.
    let mut stream = appliance.connect();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Padding: aaaaaaaaaaaaaaaa" {
        if stream.write_all(&[*byte]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(4) {
            break;
        }
    }
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(closed || started.elapsed() < Duration::from_secs(6));
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408") || rest.is_empty());
    // Idle keep-alive connection: closed after the idle timeout.
    let mut stream = appliance.connect();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(5));
    // A client that stops reading a large body is dropped after the send timeout.
    let (path, _) = appliance.catalog.largest();
    let mut stalled = appliance.connect();
    for _ in 0..20 {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
        if stalled.write_all(request.as_bytes()).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let (_, metrics) = appliance.admin("GET", "/metrics");
    let timeouts: f64 = metrics
        .lines()
        .find(|line| line.starts_with("appliance_http_timeouts_total"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0);
    assert!(
        timeouts >= 3.0,
        "slowloris, idle and stalled clients counted: {metrics}"
    );
    // Others are still served.
    assert_eq!(curl(&["-r", "0-0", &appliance.url(&path)]).0, 206);
}

#[test]
fn connections_beyond_the_limit_wait_without_harming_others() {
    let appliance = Appliance::start(
        "connlimit",
        Serve {
            connections_max: Some(2),
            ..Serve::default()
        },
    );
    let (path, bytes) = appliance.catalog.largest();
    let mut first = appliance.connect();
    let mut second = appliance.connect();
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes=0-3\r\n\r\n");
    first.write_all(request.as_bytes()).unwrap();
    assert_eq!(read_response(&mut first), bytes[0..4]);
    second.write_all(request.as_bytes()).unwrap();
    assert_eq!(read_response(&mut second), bytes[0..4]);
    // A third connection waits: no answer while both slots are taken.
    let mut third = appliance.connect();
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    third.write_all(request.as_bytes()).unwrap();
    let mut probe = [0u8; 1];
    assert!(
        third.read(&mut probe).is_err(),
        "served beyond the connection limit"
    );
    // The served connections keep working; when one leaves, the waiting one is served.
    first.write_all(request.as_bytes()).unwrap();
    assert_eq!(read_response(&mut first), bytes[0..4]);
    drop(first);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = [0u8; 12];
    third.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 206");
}

#[test]
fn misses_redirect_when_configured() {
    let appliance = Appliance::start(
        "redirect",
        Serve {
            miss_redirect_base: Some("http://upstream.example/base/".into()),
            ..Serve::default()
        },
    );
    let (status, headers, _) = curl(&[&appliance.url("/not/here.mp4?token=1&x=2")]);
    assert_eq!(status, 302);
    assert!(
        headers.contains("location: http://upstream.example/base/not/here.mp4?token=1&x=2"),
        "{headers}"
    );
}

#[test]
fn signed_urls_are_enforced_when_a_key_is_set() {
    let scratch = Scratch::new("serve-signed-key");
    let key = scratch.path("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let appliance = Appliance::start(
        "signed",
        Serve {
            url_signing_key_file: Some(key),
            ..Serve::default()
        },
    );
    let (path, _) = appliance.catalog.largest();
    let signer = appliance_serve::signed::UrlSigner::new(b"0123456789abcdef0123456789abcdef");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = signer.sign(&path, now + 600);
    let expired = signer.sign(&path, now - 1);
    let other = signer.sign("/another/path.mp4", now + 600);
    let cases = [
        (format!("{path}?{good}"), 206),
        (path.clone(), 403),
        (format!("{path}?{expired}"), 403),
        (format!("{path}?{other}"), 403),
        (format!("{path}?expires={}&signature=00", now + 600), 403),
    ];
    for (target, expected) in cases {
        assert_eq!(
            curl(&["-r", "0-0", &appliance.url(&target)]).0,
            expected,
            "{target}"
        );
    }
}

#[test]
fn drain_tells_steering_and_reports_drained_when_idle() {
    let appliance = Appliance::start("drain", Serve::default());
    // The CLI first (built here if need be, which can take longer than the held
    // connection's idle timeout: the box would then drain before it is asked about).
    let ctl = appliance.ctl();
    let (path, _) = appliance.catalog.largest();
    let (status, body) = appliance.admin("GET", "/health");
    assert_eq!(status, 200);
    assert!(body.contains("\"state\":\"serving\""), "{body}");
    let mut held = appliance.connect();
    held.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes=0-0\r\n\r\n").as_bytes(),
    )
    .unwrap();
    read_response(&mut held);
    ctl.ok(&["drain"]).unwrap();
    let (status, body) = appliance.admin("GET", "/health");
    assert_eq!(status, 503);
    assert!(body.contains("\"state\":\"draining\""), "{body}");
    // New requests are still served while draining, and told to close.
    let (status, headers, _) = curl(&["-r", "0-0", &appliance.url(&path)]);
    assert_eq!(status, 206);
    assert!(headers.contains("connection: close"));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = appliance.admin("GET", "/health");
        if body.contains("\"state\":\"drained\"") {
            break;
        }
        assert!(Instant::now() < deadline, "never drained: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl.ok(&["undrain"]).unwrap();
    assert!(appliance
        .admin("GET", "/health")
        .1
        .contains("\"state\":\"serving\""));
    let (status, metrics) = appliance.admin("GET", "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("appliance_http_requests_total{status=\"206\"}"),
        "{metrics}"
    );
}

/// Flips the last byte of each of `paths` wherever it is written on the drives (only in its
/// Publish record: paths live nowhere else), so that the record fails its checksum the next
/// time the daemon reads it. The store reports that lookup as an error, which is answered 500.
/// The drives are mostly holes: all-zero chunks are skipped with one comparison each.
fn corrupt_records(drives: &[PathBuf], paths: &[&str]) {
    use std::os::unix::fs::FileExt;
    const CHUNK_BYTES: usize = 1 << 20;
    const OVERLAP_BYTES: usize = 4096;
    let zeros = vec![0u8; CHUNK_BYTES + OVERLAP_BYTES];
    let mut chunk = vec![0u8; CHUNK_BYTES + OVERLAP_BYTES];
    let mut flipped = vec![0; paths.len()];
    for drive in drives {
        let file = std::fs::File::open(drive).unwrap();
        let size_bytes = file.metadata().unwrap().len() as usize;
        for offset in (0..size_bytes).step_by(CHUNK_BYTES) {
            let length = (CHUNK_BYTES + OVERLAP_BYTES).min(size_bytes - offset);
            file.read_exact_at(&mut chunk[..length], offset as u64)
                .unwrap();
            if chunk[..length] == zeros[..length] {
                continue;
            }
            let starts = (0..length.min(CHUNK_BYTES)).filter(|at| chunk[*at] == b'/');
            for at in starts {
                for (path, count) in paths.iter().zip(&mut flipped) {
                    if chunk[at..length].starts_with(path.as_bytes()) {
                        let last = at + path.len() - 1;
                        let position = (offset + last) as u64;
                        util::write_at(drive, position, &[chunk[last] ^ 0x20]);
                        *count += 1;
                    }
                }
            }
        }
    }
    assert!(
        flipped.iter().all(|count| *count > 0),
        "{paths:?}: {flipped:?}"
    );
}

/// A HEAD answered with an error on a keep-alive connection, followed by a pipelined GET over a
/// raw socket: the error head must end the first response exactly (its Content-Length saying
/// what a GET would get, and nothing after it), so that the GET's 206 is read intact. A 500
/// says `Connection: close` and the connection closes: the pipelined GET is never answered.
#[test]
fn error_answers_to_head_carry_no_content_and_close_when_they_say_so() {
    const KEY: &[u8] = b"head-errors-key-0123456789abcdef";
    let key_scratch = Scratch::new("serve-head-errors-key");
    let key_file = key_scratch.path("key");
    std::fs::write(&key_file, KEY).unwrap();
    let appliance = Appliance::start(
        "head-errors",
        Serve {
            url_signing_key_file: Some(key_file),
            ..Serve::default()
        },
    );
    let signer = appliance_serve::signed::UrlSigner::new(KEY);
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let signed = |path: &str| format!("{path}?{}", signer.sign(path, expires));
    let (path, bytes) = appliance.catalog.largest();
    let pipelined_get = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n",
        signed(&path)
    );
    let cases: Vec<(u16, String, &str)> = vec![
        (
            403,
            format!("{path}?expires={expires}&signature={}", "0".repeat(64)),
            "",
        ),
        (404, signed("/not/stored.mp4"), ""),
        (412, signed(&path), "If-Match: \"other\"\r\n"),
    ];
    for (status, target, fields) in cases {
        // What a GET of the same target gets: its Content-Length and as many content bytes.
        let mut stream = appliance.connect();
        let answer = raw(
            &mut stream,
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{fields}\r\n")
                .as_bytes(),
        );
        let (get_head, get_content) = answer.split_once("\r\n\r\n").unwrap();
        let get_length = content_length(&get_head.to_ascii_lowercase());
        assert_eq!(get_content.len(), get_length, "GET {status}");
        assert!(get_length > 0, "GET {status} has content");
        let mut stream = appliance.connect();
        let request = format!("HEAD {target} HTTP/1.1\r\nHost: x\r\n{fields}\r\n{pipelined_get}");
        stream.write_all(request.as_bytes()).unwrap();
        let head = read_head(&mut stream);
        assert!(head.starts_with(&format!("http/1.1 {status} ")), "{head}");
        assert_eq!(content_length(&head), get_length, "HEAD {status}: {head}");
        assert!(!head.contains("connection: close"), "{head}");
        let next = read_head(&mut stream);
        assert!(
            next.starts_with("http/1.1 206 "),
            "after HEAD {status}: {next}"
        );
        assert_eq!(content_length(&next), 10, "{next}");
        let mut content = [0u8; 10];
        stream.read_exact(&mut content).unwrap();
        assert_eq!(content, bytes[..10], "after HEAD {status}");
        // Nothing more: the connection stays open and silent.
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut stray = [0u8; 64];
        match stream.read(&mut stray) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("after HEAD {status}: expected silence, got {other:?}"),
        }
    }
    // 500: a file whose record no longer passes its checksum, once with GET, once with HEAD.
    let (get_broken, head_broken) = (&appliance.catalog.files[1].0, &appliance.catalog.files[2].0);
    corrupt_records(&appliance.drives, &[get_broken, head_broken]);
    let mut stream = appliance.connect();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\n\r\n{pipelined_get}",
        signed(get_broken)
    );
    let answer = raw(&mut stream, request.as_bytes());
    let (get_head, get_content) = answer.split_once("\r\n\r\n").unwrap();
    let get_head = get_head.to_ascii_lowercase();
    assert!(get_head.starts_with("http/1.1 500 "), "{answer}");
    assert!(get_head.contains("connection: close"), "{answer}");
    assert_eq!(
        get_content.len(),
        content_length(&get_head),
        "the 500 is the last response; the pipelined GET is not answered: {answer:?}"
    );
    let mut stream = appliance.connect();
    let request = format!(
        "HEAD {} HTTP/1.1\r\nHost: x\r\n\r\n{pipelined_get}",
        signed(head_broken)
    );
    let answer = raw(&mut stream, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n"),
        "the head alone, then the connection closes: {answer:?}"
    );
    let head = answer.to_ascii_lowercase();
    assert!(head.contains("connection: close"), "{answer}");
    assert_eq!(content_length(&head), content_length(&get_head), "{answer}");
}

/// The URL-signing key is the key file's bytes, exactly: keys that begin and end with a
/// whitespace or NUL byte validate URLs signed with the whole key, and refuse URLs signed with
/// the key stripped of those bytes. `check-config` refuses empty and short keys.
#[test]
fn signing_keys_are_the_key_files_bytes_exactly() {
    let scratch = Scratch::new("serve-signing-keys");
    let drives = formatted_drives(&scratch, 1, 64 << 20, 8);
    let source = scratch.path("src");
    std::fs::create_dir_all(source.join("video")).unwrap();
    std::fs::write(source.join("video/a.mp4"), b"0123456789").unwrap();
    let out = scratch.store(&[&drives[0]], &["import", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let key_file = scratch.path("key");
    let serve = Serve {
        url_signing_key_file: Some(key_file.clone()),
        ..Serve::default()
    };
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut rng = SplitMix64(0x9E37_79B9_7F4A_7C15);
    for edge in [b'\n', b' ', b'\t', b'\r', b'\0'] {
        let mut key = vec![edge];
        key.extend(seeded_bytes(rng.next_u64(), 30));
        key.push(edge);
        std::fs::write(&key_file, &key).unwrap();
        let config = Config {
            serve: serve.clone(),
            ..Config::new(&drives)
        };
        let daemon = Daemon::start(&scratch, config);
        let url = |signing_key: &[u8]| {
            let signer = appliance_serve::signed::UrlSigner::new(signing_key);
            daemon.url(&format!(
                "/video/a.mp4?{}",
                signer.sign("/video/a.mp4", expires)
            ))
        };
        let (status, _, body) = curl(&[&url(&key)]);
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"0123456789"[..]),
            "{key:?}"
        );
        let stripped = &key[1..key.len() - 1];
        assert_eq!(curl(&[&url(stripped)]).0, 403, "stripped {key:?}");
        assert_eq!(
            curl(&[&url(&key[1..])]).0,
            403,
            "without the first byte {key:?}"
        );
    }
    let config = scratch.path("check.toml");
    let check = Config {
        serve,
        ..Config::new(&["/dev/null"])
    };
    check.write(&config).unwrap();
    let cases: &[(&[u8], Option<&str>)] = &[
        (b"", Some("the key file is empty")),
        (
            b"\n",
            Some("too short: 16 bytes at least, the file holds 1"),
        ),
        (
            b" 0123456789abcd",
            Some("too short: 16 bytes at least, the file holds 15"),
        ),
        (b" 0123456789abcd\n", None),
        (b"\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n", None),
    ];
    for (key, expected_error) in cases {
        std::fs::write(&key_file, key).unwrap();
        let out = util::applianced(&["check-config", config.to_str().unwrap()]);
        match expected_error {
            None => assert!(out.status.success(), "{key:?}: {}", out.stderr),
            Some(expected) => {
                assert!(!out.status.success(), "{key:?} accepted");
                assert!(out.stderr.contains(expected), "{key:?}: {}", out.stderr);
                assert!(
                    out.stderr.contains("serve.url_signing_key_file"),
                    "{key:?}: {}",
                    out.stderr
                );
            }
        }
    }
}

/// A client with a tiny receive buffer that takes 64 bytes every 100 ms of a large file makes
/// progress all the time, so the send timeout never cuts it; the minimum send rate does, within
/// a few windows, and frees its slot. A normal client on the same server gets the whole file.
#[test]
fn clients_taking_less_than_the_minimum_send_rate_are_cut_off() {
    let scratch = Scratch::new("serve-slow-reader");
    let drives = formatted_drives(&scratch, 1, 128 << 20, 8);
    let source = scratch.path("src");
    std::fs::create_dir_all(source.join("video")).unwrap();
    // Far more than the kernel buffers between the daemon and a client can hold.
    let big = seeded_bytes(24, 24 << 20);
    std::fs::write(source.join("video/big.mp4"), &big).unwrap();
    let out = scratch.store(&[&drives[0]], &["import", source.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out.stderr);
    let config = Config {
        serve: Serve {
            send_rate_min_bytes_per_s: Some(65536),
            send_rate_window_ms: Some(1000),
            send_timeout_ms: Some(60_000),
            ..Serve::default()
        },
        ..Config::new(&drives)
    };
    let daemon = Daemon::start(&scratch, config);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], daemon.port));
    socket.connect(&address.into()).unwrap();
    let mut slow: TcpStream = socket.into();
    slow.write_all(b"GET /video/big.mp4 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let (status, _, body) = curl(&[&daemon.url("/video/big.mp4")]);
    assert_eq!(status, 200);
    assert!(body == big, "the normal client's body differs");
    let mut taken = 0;
    while metric(&daemon, "appliance_http_slow_clients_total") < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "a client taking ~640 bytes/s still served after {:?}",
            started.elapsed()
        );
        let mut bytes = [0u8; 64];
        if let Ok(count) = slow.read(&mut bytes) {
            taken += count;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The connection is gone: what is left in the client's buffer, then reset or end.
    slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut rest = vec![0u8; 1 << 20];
    loop {
        match slow.read(&mut rest) {
            Ok(0) => break,
            Ok(count) => taken += count,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(error) => panic!("the slow client's connection is still open: {error}"),
        }
    }
    assert!(taken < big.len() / 2, "{taken} bytes taken before the cut");
    assert_eq!(metric(&daemon, "appliance_http_timeouts_total"), 0.0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while metric(&daemon, "appliance_http_connections_active") > 0.0 {
        assert!(
            Instant::now() < deadline,
            "the slow client's slot is still taken"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Drops the page cache of every drive file (GNU dd's `iflag=nocache count=0` advises
/// POSIX_FADV_DONTNEED over the whole file), so the next reads of the daemon go to the drive.
fn evict(drives: &[PathBuf]) {
    for drive in drives {
        let status = Command::new("dd")
            .arg(format!("if={}", drive.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .unwrap();
        assert!(status.success(), "dd nocache {}", drive.display());
    }
}

/// Many clients at once ask for random ranges of files that are not in the page cache: with
/// the pools (2 threads per drive, so jobs queue), every byte is the stored byte, the sends go
/// through the pools, and the gauge of cold sends in flight returns to zero. A client that
/// hangs up in the middle of a cold range harms nobody. The warm mode (io_uring reads into the
/// page cache, then sendfile) and the inline mode serve the same bytes; inline uses no thread.
///
/// The direct passes read cold pieces by direct I/O into the RAM cache (64 MiB, then 1 MiB so
/// that entries are evicted all the time) and send them from there.
///
/// The fourth pass has one thread per drive and 1 ms send-rate windows (at 1 byte/s, so no
/// client is ever too slow): a window ends while nearly every cold send waits in its drive's
/// queue, and the worker must go on awaiting that send, not hand the same bytes to the pool a
/// second time (which would put them on the wire twice).
#[test]
fn cold_ranges_are_sent_by_the_drives_threads_byte_exact_under_load() {
    let passes = [
        ("pool", 2, None, None),
        ("warm", 2, None, None),
        ("inline", 2, None, None),
        ("pool", 1, Some(1), None),
        ("direct", 2, None, None),
        ("direct", 2, None, Some(1)),
    ];
    for (pass, (mode, threads, window_ms, cache_mib)) in passes.into_iter().enumerate() {
        let appliance = Appliance::start(
            &format!("cold-{pass}-{mode}"),
            Serve {
                cold_read: Some(mode.into()),
                cold_threads_per_drive: Some(threads),
                send_rate_window_ms: window_ms,
                send_rate_min_bytes_per_s: window_ms.map(|_| 1),
                cold_direct_cache_mib: cache_mib,
                ..Serve::default()
            },
        );
        for round in 0..3u64 {
            evict(&appliance.drives);
            let clients: Vec<_> = (0..12u64)
                .map(|client| {
                    let files = appliance.catalog.files.clone();
                    let port = appliance.port;
                    std::thread::spawn(move || {
                        let mut rng = SplitMix64(round * 100 + client + 1);
                        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(30)))
                            .unwrap();
                        for _ in 0..8 {
                            let (path, bytes) = &files[rng.below(files.len() as u64) as usize];
                            if bytes.is_empty() {
                                continue;
                            }
                            let start = rng.below(bytes.len() as u64) as usize;
                            let end = (start + rng.below(1 << 20) as usize).min(bytes.len() - 1);
                            let request = format!(
                                "GET {path} HTTP/1.1\r\nHost: a\r\nRange: bytes={start}-{end}\r\n\r\n"
                            );
                            stream.write_all(request.as_bytes()).unwrap();
                            let body = read_response(&mut stream);
                            assert!(body == bytes[start..=end], "{path} {start}-{end}");
                        }
                        // Asks for a whole file and goes away after its first bytes.
                        let (path, _) = &files[rng.below(files.len() as u64) as usize];
                        let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
                        stream.write_all(request.as_bytes()).unwrap();
                        let mut first = [0u8; 512];
                        let _ = stream.read(&mut first);
                    })
                })
                .collect();
            for client in clients {
                client
                    .join()
                    .expect("a client saw a wrong byte or an error");
            }
        }
        // Every response is checked: a cut one would have failed its client above. The
        // gauge comes back to zero once the hung-up clients' jobs are done.
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&appliance, "appliance_sendfile_cold_in_flight") != 0.0 {
            assert!(Instant::now() < deadline, "cold sends still in flight");
            std::thread::sleep(Duration::from_millis(50));
        }
        let cold = metric(&appliance, "appliance_sendfile_cold_total");
        let inline = metric(&appliance, "appliance_sendfile_inline_total");
        if mode != "inline" {
            assert!(cold > 0.0, "no cold piece went to the drive's threads");
        } else {
            assert_eq!(cold, 0.0, "inline mode used a pool");
            assert!(inline > 0.0);
        }
        if mode == "direct" && cache_mib.is_none() {
            // The same cold range twice: the second is answered from the cache, byte-exact.
            evict(&appliance.drives);
            let (path, bytes) = appliance.catalog.largest();
            let url = format!("http://127.0.0.1:{}{path}", appliance.port);
            for _ in 0..2 {
                let (status, _, body) = curl(&["-r", "4096-200000", &url]);
                assert_eq!(status, 206);
                assert!(body == bytes[4096..=200_000]);
            }
            assert!(metric(&appliance, "appliance_direct_cache_hits_total") >= 1.0);
        }
        // Still serving, byte-exact, after all of it.
        let (path, bytes) = appliance.catalog.largest();
        let (status, _, body) = curl(&[&format!("http://127.0.0.1:{}{path}", appliance.port)]);
        assert_eq!(status, 200);
        assert!(body == bytes);
    }
}
