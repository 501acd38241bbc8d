//! Black-box tests of HTTPS: the real `applianced run` with a `[tls]` listener on file-backed
//! drives, driven with curl and `openssl s_client` (real clients) and raw sockets: byte-exact
//! ranges over TLS and SNI choosing the certificate; TLS 1.0 and 1.1, non-ECDHE ciphers,
//! ALPN without `http/1.1` and renegotiation refused; hostile first bytes, half handshakes and
//! slowloris cut within the handshake deadline while served clients go on; certificates
//! reloaded by SIGHUP under load (a bad set kept out); `check-config` refusing bad
//! certificates; every answer over HTTPS the same as over HTTP; HTTPS only
//! (`plain_http = false`); and drain closing HTTPS keep-alive connections. This machine's
//! kernel may lack TLS, so nothing here depends on kTLS; `https_behaves_like_http` turns it off.

mod util;

use appliance_testkit::tls::{replace_key, self_signed, Validity};
use appliance_testkit::{seeded_bytes, send_signal, Config, Guard, Serve, Tls, TlsCertificate};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use util::{curl, formatted_drives, metric, Catalog, Daemon, Fetched, Scratch};

/// The names of the two test certificates: the first is the default.
const VIDEO: &str = "video.isp.example";
const IMAGES: &str = "images.isp.example";

/// `tls.handshake_timeout_ms` of every test appliance.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(2_000);

/// What a loaded machine may add to a deadline the server keeps.
const SLACK: Duration = Duration::from_millis(1_500);

const HANDSHAKE_TIMEOUTS: &str = "appliance_tls_handshake_failures_total{reason=\"timeout\"}";
const HANDSHAKE_REFUSALS: &str = "appliance_tls_handshake_failures_total{reason=\"refused\"}";

/// A running appliance with plain HTTP and HTTPS over an imported catalog.
struct Appliance {
    daemon: Daemon,
    catalog: Catalog,
    tls_port: u16,
    certificates: Vec<TlsCertificate>,
    scratch: Scratch,
}

impl std::ops::Deref for Appliance {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

impl Appliance {
    /// An appliance with the configuration every test starts from.
    fn start(name: &str) -> Appliance {
        Appliance::start_with(name, |_, _| {})
    }

    /// Formats a drive, imports a catalog, writes two certificates (VIDEO, then IMAGES) and
    /// starts the daemon with an HTTPS listener (handshake timeout `HANDSHAKE_TIMEOUT`), after
    /// `adjust` changed the configuration (the scratch folder is at hand for its files).
    fn start_with(name: &str, adjust: impl FnOnce(&Scratch, &mut Config)) -> Appliance {
        let scratch = Scratch::new(&format!("tls-{name}"));
        let drives = formatted_drives(&scratch, 1, 128 << 20, 8);
        let catalog = Catalog::generate(&scratch, "src", 8, 3_000_000);
        let refs: Vec<&Path> = drives.iter().map(PathBuf::as_path).collect();
        let out = scratch.store(&refs, &["import", catalog.root.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
        let certificates = vec![
            self_signed(&scratch.root, "video", &[VIDEO], Validity::Current).unwrap(),
            self_signed(&scratch.root, "images", &[IMAGES], Validity::Current).unwrap(),
        ];
        let tls_port = appliance_testkit::free_port().unwrap();
        let mut config = Config {
            tls: Some(Tls {
                listen: ([127, 0, 0, 1], tls_port).into(),
                certificates: certificates.clone(),
                handshake_timeout_ms: Some(millis(HANDSHAKE_TIMEOUT)),
                kernel_tls: None,
            }),
            ..Config::new(&drives)
        };
        adjust(&scratch, &mut config);
        let daemon = Daemon::start(&scratch, config);
        Appliance {
            daemon,
            catalog,
            tls_port,
            certificates,
            scratch,
        }
    }

    fn https_url(&self, name: &str, target: &str) -> String {
        format!("https://{name}:{}{target}", self.tls_port)
    }

    /// curl's options for HTTPS to `name` (resolved to loopback, so SNI says `name`), trusting
    /// only the certificates in the PEM file `ca`.
    fn https_options(&self, name: &str, ca: &Path) -> Vec<String> {
        vec![
            "--resolve".to_string(),
            format!("{name}:{}:127.0.0.1", self.tls_port),
            "--cacert".to_string(),
            ca.display().to_string(),
        ]
    }

    /// curl over HTTPS to `name`, trusting only `ca`, with `extra` options.
    fn curl(&self, name: &str, ca: &Path, target: &str, extra: &[&str]) -> Fetched {
        let mut args = self.https_options(name, ca);
        args.extend(extra.iter().map(ToString::to_string));
        args.push(self.https_url(name, target));
        curl(&args)
    }

    /// A connection to the HTTPS port, no TLS spoken yet.
    fn connect_tls_port(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.tls_port)).unwrap()
    }

    /// A keep-alive HTTPS connection asking for `server_name`.
    fn session(&self, server_name: &str) -> Session {
        Session::open(self.tls_port, server_name)
    }

    /// Runs `openssl s_client -connect` to the HTTPS port with `args`. With `input`, writes it
    /// and keeps standard input open (a person at the terminal) until the client exits or
    /// `within` passes, when it is stopped; without, standard input is empty and the client
    /// ends after its handshake.
    fn s_client(&self, args: &[&str], input: Option<&[u8]>, within: Duration) -> ClientRun {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let log_path = self.scratch.path(&format!("s_client-{run}.log"));
        let log = fs::File::create(&log_path).unwrap();
        let started = Instant::now();
        let child = Command::new("openssl")
            .arg("s_client")
            .args(["-connect", &format!("127.0.0.1:{}", self.tls_port)])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run openssl s_client");
        let mut client = Guard::new("openssl s_client", child).with_grace(Duration::from_secs(1));
        let _held_open = input.map(|bytes| {
            let mut stdin = client.child().stdin.take().unwrap();
            stdin.write_all(bytes).unwrap();
            stdin
        });
        let status = client.wait_exit(within).unwrap();
        let elapsed = started.elapsed();
        drop(client);
        ClientRun {
            exit_code: status.and_then(|status| status.code()),
            output: String::from_utf8_lossy(&fs::read(&log_path).unwrap()).into_owned(),
            elapsed,
        }
    }

    /// The certificate the server presents to a client sending `server_name` (none: no
    /// SNI), as the base64 of its PEM block.
    fn served_certificate(&self, server_name: Option<&str>) -> String {
        let args = match server_name {
            Some(name) => vec!["-servername", name],
            None => vec!["-noservername"],
        };
        let run = self.s_client(&args, None, Duration::from_secs(10));
        assert_eq!(run.exit_code, Some(0), "{server_name:?}: {}", run.output);
        pem_base64(&run.output)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap()
}

/// The base64 of the first PEM certificate in `text`, without line breaks.
fn pem_base64(text: &str) -> String {
    let (_, rest) = text
        .split_once("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate in: {text}"));
    let (body, _) = rest.split_once("-----END CERTIFICATE-----").unwrap();
    body.split_whitespace().collect()
}

/// What one `openssl s_client` run wrote (standard output and error, in one file), how it
/// ended (None: it was stopped) and how long it ran.
struct ClientRun {
    exit_code: Option<i32>,
    output: String,
    elapsed: Duration,
}

impl ClientRun {
    /// Panics, showing all the client printed, unless it exited with `exit_code` and printed
    /// every one of `parts`.
    fn expect(&self, what: &str, exit_code: i32, parts: &[&str]) {
        assert_eq!(self.exit_code, Some(exit_code), "{what}: {}", self.output);
        for part in parts {
            assert!(
                self.output.contains(part),
                "{what}: no {part:?} in: {}",
                self.output
            );
        }
    }
}

/// One TLS connection held open by `openssl s_client -quiet`, on which requests go one after
/// another (keep-alive), as a player keeps its connection.
struct Session {
    stdin: ChildStdin,
    /// What the server sent, as the client's reader thread got it; closed at its end.
    received: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    _client: Guard,
}

impl Session {
    fn open(port: u16, server_name: &str) -> Session {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["-servername", server_name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_client");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (sender, received) = mpsc::channel();
        std::thread::spawn(move || {
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(count @ 1..) = stdout.read(&mut chunk) {
                if sender.send(chunk[..count].to_vec()).is_err() {
                    break;
                }
            }
        });
        Session {
            stdin,
            received,
            pending: Vec::new(),
            _client: Guard::new("openssl s_client", child).with_grace(Duration::from_secs(1)),
        }
    }

    /// GETs `range` of `path` on this connection: (response head in lowercase, body).
    fn get(&mut self, path: &str, range: &str) -> (String, Vec<u8>) {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {VIDEO}\r\nRange: bytes={range}\r\n\r\n");
        self.stdin.write_all(request.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
        let head_bytes = self.receive_until(|pending| {
            pending
                .windows(4)
                .position(|window| window == b"\r\n\r\n")
                .map(|at| at + 4)
        });
        let head = String::from_utf8_lossy(&self.pending[..head_bytes]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length: "))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("no content-length: {head}"));
        let end = self.receive_until(|pending| {
            (pending.len() >= head_bytes + length).then_some(head_bytes + length)
        });
        let body = self.pending[head_bytes..end].to_vec();
        self.pending.drain(..end);
        (head, body)
    }

    /// Receives until `complete` finds where what is wanted ends; panics when the connection
    /// ends first or after 15 s.
    fn receive_until(&mut self, complete: impl Fn(&[u8]) -> Option<usize>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(end) = complete(&self.pending) {
                return end;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.received.recv_timeout(wait) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(error) => panic!(
                    "the connection ended or stalled ({error:?}) after: {}",
                    String::from_utf8_lossy(&self.pending)
                ),
            }
        }
    }

    /// True when the server closes the connection within `within`, sending nothing more.
    fn closes_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.received.recv_timeout(wait) {
                Ok(chunk) => self.pending.extend_from_slice(&chunk),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.pending.is_empty(),
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
    }
}

/// Reads from `stream` until the server closes it or `within` after `opened` passes: what
/// came, and how long after `opened` it was closed (None: still open).
fn read_until_closed(
    stream: &mut TcpStream,
    opened: Instant,
    within: Duration,
) -> (Vec<u8>, Option<Duration>) {
    let deadline = opened + within;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (received, None);
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return (received, Some(opened.elapsed())),
            Ok(count) => received.extend_from_slice(&chunk[..count]),
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(error) if error.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (received, Some(opened.elapsed())),
        }
    }
}

/// Waits up to 5 s for the metric `name` to reach `at_least` (the server counts a failed
/// handshake just after the client sees it fail); its value then.
fn metric_reaching(daemon: &Daemon, name: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric(daemon, name);
        if value >= at_least || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `done` every 50 ms for up to `within`; whether it came true.
fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ranges_over_https_are_byte_exact_and_sni_picks_the_certificate() {
    let appliance = Appliance::start("ranges");
    let video = &appliance.certificates[0].cert;
    let images = &appliance.certificates[1].cert;
    for (path, bytes) in &appliance.catalog.files {
        let fetched = appliance.curl(VIDEO, video, path, &[]);
        assert_eq!((fetched.exit_code, fetched.status), (0, 200), "{path}");
        assert!(
            fetched.body == *bytes,
            "{path}: the body differs from the stored file"
        );
        let len = bytes.len();
        if len < 2 {
            continue;
        }
        for (start, end) in [(0, 0), (1, 100), (len / 3, len / 2), (len - 1, len - 1)] {
            let range = format!("{start}-{end}");
            let fetched = appliance.curl(VIDEO, video, path, &["-r", &range]);
            assert_eq!(
                (fetched.exit_code, fetched.status),
                (0, 206),
                "{path} {range}"
            );
            assert!(
                fetched.body == bytes[start..=end],
                "{path} {range}: wrong bytes"
            );
        }
    }
    let (path, bytes) = &appliance.catalog.files[0];
    // SNI: IMAGES gets its own certificate (trusting only it works, trusting VIDEO's fails).
    let fetched = appliance.curl(IMAGES, images, path, &[]);
    assert_eq!((fetched.exit_code, fetched.status), (0, 200));
    assert!(fetched.body == *bytes);
    let fetched = appliance.curl(IMAGES, video, path, &[]);
    assert_eq!(
        fetched.exit_code, 60,
        "IMAGES must not be answered with VIDEO's certificate"
    );
    // Names match without regard to case; an unknown name and no name get the first.
    let video_pem = pem_base64(&fs::read_to_string(video).unwrap());
    let images_pem = pem_base64(&fs::read_to_string(images).unwrap());
    assert_eq!(appliance.served_certificate(Some(VIDEO)), video_pem);
    assert_eq!(appliance.served_certificate(Some(IMAGES)), images_pem);
    assert_eq!(
        appliance.served_certificate(Some("IMAGES.isp.EXAMPLE")),
        images_pem
    );
    assert_eq!(
        appliance.served_certificate(Some("other.example")),
        video_pem
    );
    assert_eq!(appliance.served_certificate(None), video_pem);
    // Status lists both certificates with the file each came from.
    let status = appliance.ctl().status().unwrap();
    let tls = &status["tls"];
    let listed = tls["certificates"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{tls}");
    assert_eq!(listed[0]["names"][0], VIDEO, "{tls}");
    assert_eq!(listed[1]["file"], images.display().to_string(), "{tls}");
    assert!(tls["path"] == "kernel" || tls["path"] == "user", "{tls}");
}

#[test]
fn old_protocol_versions_and_renegotiation_are_refused() {
    // A short header-read timeout: the renegotiating client below is only told no when the
    // server gives up waiting for its request (see the next test).
    let appliance = Appliance::start_with("protocols", |_, config| {
        config.serve.header_read_timeout_ms = Some(1_000);
    });
    let within = Duration::from_secs(10);
    let refusals_before = metric(&appliance, HANDSHAKE_REFUSALS);
    // TLS 1.0 and 1.1, and TLS 1.2 offering only ciphers without ECDHE or with CBC. The client
    // allows them (SECLEVEL=0), so the refusal is the server's: a handshake_failure alert
    // (40), the only 7 bytes the client reads.
    let weak_ciphers = "ECDHE-ECDSA-AES128-SHA:AES128-GCM-SHA256:AES128-SHA:@SECLEVEL=0";
    let refused: [&[&str]; 3] = [
        &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"],
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        &["-tls1_2", "-cipher", weak_ciphers],
    ];
    for args in refused {
        let run = appliance.s_client(args, None, within);
        let alert = ["alert handshake failure", "SSL alert number 40"];
        let nothing_else = ["SSL handshake has read 7 bytes", "Cipher is (NONE)"];
        run.expect(
            &format!("{args:?}"),
            1,
            &[&alert[..], &nothing_else].concat(),
        );
    }
    let refusals = metric_reaching(&appliance, HANDSHAKE_REFUSALS, refusals_before + 3.0);
    assert_eq!(refusals - refusals_before, 3.0, "each refusal is counted");
    // TLS 1.2 (with ECDHE) and 1.3 are taken, and ALPN settles on http/1.1.
    for (version, new) in [
        ("-tls1_2", "New, TLSv1.2, Cipher is ECDHE-ECDSA-"),
        ("-tls1_3", "New, TLSv1.3, Cipher is TLS_"),
    ] {
        let run = appliance.s_client(&[version, "-alpn", "http/1.1"], None, within);
        run.expect(version, 0, &[new, "ALPN protocol: http/1.1"]);
    }
    let run = appliance.s_client(&["-alpn", "h2,http/1.1"], None, within);
    run.expect("h2 or http/1.1", 0, &["ALPN protocol: http/1.1"]);
    // A client speaking only h2 is refused with no_application_protocol (120). OpenSSL still
    // prints "New, TLSv1.3": the exit status and the alert tell the refusal.
    let run = appliance.s_client(&["-alpn", "h2"], None, within);
    let alert = ["alert no application protocol", "SSL alert number 120"];
    run.expect(
        "h2 only",
        1,
        &[&alert[..], &["No ALPN negotiated"]].concat(),
    );
    // Renegotiation ("R" at s_client's prompt; -ign_eof or -quiet would turn its commands
    // off): rustls answers the second ClientHello with a no_renegotiation warning and no
    // second ServerHello, and OpenSSL gives up.
    let args = ["-tls1_2", "-msg", "-servername", VIDEO];
    let run = appliance.s_client(&args, Some(b"R\n"), within);
    let warning = "<<< TLS 1.2, Alert [length 0002], warning no_renegotiation";
    run.expect("R", 1, &["RENEGOTIATING", warning, ":no renegotiation:"]);
    assert_eq!(hellos(&run.output, "ClientHello"), 2, "{}", run.output);
    let second = "a second handshake happened";
    assert_eq!(
        hellos(&run.output, "ServerHello"),
        1,
        "{second}: {}",
        run.output
    );
}

/// How many `-msg` lines of `output` show a handshake message of type `kind`.
fn hellos(output: &str, kind: &str) -> usize {
    let suffix = format!("], {kind}");
    output
        .lines()
        .filter(|line| line.ends_with(&suffix))
        .count()
}

/// A TLS 1.2 client asking to renegotiate must be told no at once. Today it is not: rustls
/// queues its no_renegotiation alert when it reads the ClientHello, but the server writes only
/// when it answers a request or closes, so the client waits mid-handshake for the header-read
/// timeout (the idle timeout on a connection that had requests) before the alert comes.
#[test]
fn renegotiation_is_refused_at_once_not_when_the_connection_times_out() {
    let header_read_timeout = Duration::from_secs(5);
    let appliance = Appliance::start_with("renegotiation-latency", |_, config| {
        config.serve.header_read_timeout_ms = Some(millis(header_read_timeout));
    });
    let run = appliance.s_client(
        &["-tls1_2", "-msg", "-servername", VIDEO],
        Some(b"R\n"),
        Duration::from_secs(15),
    );
    assert!(
        run.output.contains("warning no_renegotiation"),
        "{}",
        run.output
    );
    assert!(
        run.elapsed < Duration::from_secs(2),
        "the no_renegotiation alert came {:?} after the client started, with the header-read \
         timeout at {header_read_timeout:?}",
        run.elapsed
    );
}

/// The first bytes `openssl s_client` sends: its ClientHello record, caught by a listener.
fn client_hello() -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", VIDEO])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    let _client = Guard::new("openssl s_client", child).with_grace(Duration::from_secs(1));
    let (mut stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let [22, 3, _, high, low, ..] = hello[..] {
            if hello.len() >= 5 + usize::from(u16::from_be_bytes([high, low])) {
                return hello;
            }
        }
        let count = stream.read(&mut chunk).unwrap();
        assert!(
            count > 0,
            "openssl closed before its ClientHello: {hello:?}"
        );
        hello.extend_from_slice(&chunk[..count]);
    }
}

/// Sends `first_bytes` to the HTTPS port: they are refused at once (within 1 s, well before
/// the handshake timeout) with a TLS alert record, and the connection closed.
fn check_refused_at_once(appliance: &Appliance, what: &str, first_bytes: &[u8]) {
    let mut stream = appliance.connect_tls_port();
    let opened = Instant::now();
    stream.write_all(first_bytes).unwrap();
    let (received, closed) = read_until_closed(&mut stream, opened, Duration::from_secs(5));
    let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 5 s"));
    assert!(
        closed < Duration::from_secs(1),
        "{what}: closed after {closed:?}"
    );
    let alert: &[u8] = &[21, 3, 3];
    assert_eq!(received.get(..3), Some(alert), "{what}: {received:?}");
}

/// Each of `stalled` (a connection, and when it was opened) is closed by the server, with
/// nothing sent, at the handshake timeout (give or take `SLACK` on a loaded machine).
fn check_cut_at_the_handshake_timeout(stalled: &mut [(TcpStream, Instant)]) {
    for (at, (stream, opened)) in stalled.iter_mut().enumerate() {
        let (received, closed) = read_until_closed(stream, *opened, HANDSHAKE_TIMEOUT + SLACK);
        let closed = closed.unwrap_or_else(|| panic!("stalled connection {at} still open"));
        assert!(
            closed >= HANDSHAKE_TIMEOUT - Duration::from_millis(100),
            "stalled connection {at} cut after {closed:?}, before the handshake timeout"
        );
        assert!(received.is_empty(), "{at}: {received:?}");
    }
}

/// TLS connections open past their handshake, wherever they are encrypted.
fn tls_connections_active(daemon: &Daemon) -> f64 {
    let active = "appliance_tls_connections_active";
    metric(daemon, &format!("{active}{{path=\"user\"}}"))
        + metric(daemon, &format!("{active}{{path=\"kernel\"}}"))
}

#[test]
fn hostile_first_bytes_and_stalled_handshakes_are_cut_in_bounded_time() {
    let appliance = Appliance::start("hostile");
    let (path, bytes) = appliance.catalog.largest();
    let mut held = appliance.session(VIDEO);
    let (head, body) = held.get(&path, "0-99");
    assert!(head.starts_with("http/1.1 206"), "{head}");
    assert!(body == bytes[..100]);
    let refusals_before = metric(&appliance, HANDSHAKE_REFUSALS);
    let plain_http = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    check_refused_at_once(&appliance, "plain HTTP", plain_http);
    check_refused_at_once(&appliance, "random bytes", &seeded_bytes(0x5EED, 512));
    let ssl2_hello = [0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15];
    check_refused_at_once(&appliance, "an SSL 2 hello", &ssl2_hello);
    let refusals = metric_reaching(&appliance, HANDSHAKE_REFUSALS, refusals_before + 3.0);
    assert_eq!(refusals - refusals_before, 3.0, "each refusal is counted");
    // Half a real ClientHello, then nothing; and 50 connections that send nothing at all.
    let hello = client_hello();
    assert!(hello.len() > 100, "{} bytes", hello.len());
    let timeouts_before = metric(&appliance, HANDSHAKE_TIMEOUTS);
    let mut stalled = Vec::new();
    let mut half = appliance.connect_tls_port();
    half.write_all(&hello[..50]).unwrap();
    stalled.push((half, Instant::now()));
    for _ in 0..50 {
        stalled.push((appliance.connect_tls_port(), Instant::now()));
    }
    // Meanwhile a new client and the connection held since before are served.
    let video = &appliance.certificates[0].cert;
    let fetched = appliance.curl(VIDEO, video, &path, &["-r", "1000-299999"]);
    assert_eq!((fetched.exit_code, fetched.status), (0, 206));
    assert!(
        fetched.body == bytes[1000..300_000],
        "wrong bytes beside the stalled"
    );
    let (_, body) = held.get(&path, "5000-5999");
    assert!(body == bytes[5000..6000]);
    check_cut_at_the_handshake_timeout(&mut stalled);
    let timeouts = metric_reaching(&appliance, HANDSHAKE_TIMEOUTS, timeouts_before + 51.0);
    assert_eq!(
        timeouts - timeouts_before,
        51.0,
        "each stalled handshake is counted"
    );
    // None of them counted as a TLS connection; the held one does, and still works.
    assert_eq!(tls_connections_active(&appliance), 1.0);
    let (_, body) = held.get(&path, "0-0");
    assert!(body == bytes[..1]);
}

/// A `[tls]` section with `certificates` (its listener is never bound by `check-config`).
fn tls_section(certificates: &[&TlsCertificate]) -> Tls {
    Tls {
        listen: ([127, 0, 0, 1], 8443).into(),
        certificates: certificates.iter().copied().cloned().collect(),
        handshake_timeout_ms: None,
        kernel_tls: None,
    }
}

/// Writes `config` to `path` and runs `applianced check-config` on it: accepted when
/// `refusal` is None, else refused with a message holding every part of `refusal`.
fn check_config(path: &Path, config: &Config, what: &str, refusal: Option<&[String]>) {
    config.write(path).unwrap();
    let out = util::applianced(&["check-config", path.to_str().unwrap()]);
    match refusal {
        None => assert!(out.status.success(), "{what}: {}", out.stderr),
        Some(parts) => {
            assert!(!out.status.success(), "{what}: accepted");
            for part in parts {
                assert!(out.stderr.contains(part), "{what}: {}", out.stderr);
            }
        }
    }
}

/// Writes the DER form of the PEM file `pem` to `der`: what an operator may give by mistake.
fn write_der(pem: &Path, der: &Path) {
    use base64::Engine;
    let text = fs::read_to_string(pem).unwrap();
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    fs::write(der, bytes).unwrap();
}

/// `applianced run` on the configuration file `path`, which it must refuse within 10 s: what
/// it printed on standard error.
fn run_refused(path: &Path) -> String {
    let child = Command::new(util::APPLIANCED)
        .args(["run", "--config", path.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start applianced");
    let mut daemon = Guard::new("applianced", child).with_grace(Duration::from_secs(5));
    let status = daemon.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.is_some_and(|status| !status.success()), "{status:?}");
    let mut stderr = String::new();
    let mut pipe = daemon.child().stderr.take().unwrap();
    pipe.read_to_string(&mut stderr).unwrap();
    stderr
}

#[test]
fn check_config_refuses_bad_certificates() {
    let scratch = Scratch::new("tls-check-config");
    let root = &scratch.root;
    let shown = |path: &Path| path.display().to_string();
    let video = self_signed(root, "video", &[VIDEO], Validity::Current).unwrap();
    let images = self_signed(root, "images", &[IMAGES], Validity::Current).unwrap();
    let expired = self_signed(root, "expired", &[VIDEO], Validity::Expired).unwrap();
    let mismatched = self_signed(root, "mismatched", &[VIDEO], Validity::Current).unwrap();
    replace_key(&mismatched).unwrap();
    let pair = |cert: PathBuf, key: PathBuf| TlsCertificate { cert, key };
    let der_cert = pair(root.join("video.der"), video.key.clone());
    write_der(&video.cert, &der_cert.cert);
    let der_key = pair(video.cert.clone(), root.join("video-key.der"));
    write_der(&video.key, &der_key.key);
    let swapped = pair(video.key.clone(), video.cert.clone());
    let missing = pair(root.join("missing.pem"), video.key.clone());
    let folder_as_key = pair(video.cert.clone(), root.clone());
    let refused: Vec<(&str, Tls, Vec<String>)> = vec![
        (
            "a key of another certificate",
            tls_section(&[&mismatched]),
            vec![
                shown(&mismatched.key),
                "the key does not match the certificate in".into(),
                shown(&mismatched.cert),
            ],
        ),
        (
            "an expired certificate second",
            tls_section(&[&video, &expired]),
            vec![shown(&expired.cert), "expired".into()],
        ),
        (
            "a missing certificate file",
            tls_section(&[&missing]),
            vec![shown(&missing.cert), "cannot be read".into()],
        ),
        (
            "a folder as the key",
            tls_section(&[&folder_as_key]),
            vec![format!("{}: cannot be read", shown(root))],
        ),
        (
            "a DER certificate",
            tls_section(&[&der_cert]),
            vec![shown(&der_cert.cert), "holds no PEM certificate".into()],
        ),
        (
            "a DER key",
            tls_section(&[&der_key]),
            vec![shown(&der_key.key), "holds no PEM private key".into()],
        ),
        (
            "certificate and key swapped",
            tls_section(&[&swapped]),
            vec![shown(&swapped.cert), "holds no PEM certificate".into()],
        ),
        (
            "no certificate",
            tls_section(&[]),
            vec!["tls.certificates: at least one certificate".into()],
        ),
        (
            "a handshake timeout of 0",
            Tls {
                handshake_timeout_ms: Some(0),
                ..tls_section(&[&video])
            },
            vec!["tls.handshake_timeout_ms".into()],
        ),
        (
            "an unknown kernel_tls",
            Tls {
                kernel_tls: Some("sometimes".into()),
                ..tls_section(&[&video])
            },
            vec!["kernel_tls".into(), "expected `auto` or `off`".into()],
        ),
    ];
    let config_path = scratch.path("check.toml");
    let with_tls = |tls| Config {
        tls,
        ..Config::new(&["/dev/null"])
    };
    let good = with_tls(Some(tls_section(&[&video, &images])));
    check_config(&config_path, &good, "two good certificates", None);
    for (what, tls, parts) in refused {
        check_config(&config_path, &with_tls(Some(tls)), what, Some(&parts));
    }
    // HTTPS only needs a [tls] listener.
    let https_only = |tls| Config {
        serve: Serve {
            plain_http: Some(false),
            ..Serve::default()
        },
        ..with_tls(tls)
    };
    let what = "plain_http = false without [tls]";
    let refusal = ["serve.plain_http: false needs a [tls] listener".to_string()];
    check_config(&config_path, &https_only(None), what, Some(&refusal));
    let with = https_only(Some(tls_section(&[&video])));
    check_config(&config_path, &with, "plain_http = false with [tls]", None);
    // The daemon refuses to start on a certificate it cannot use, with the same message.
    // (An expired one it serves all the same: see the next test.)
    with_tls(Some(tls_section(&[&mismatched])))
        .write(&config_path)
        .unwrap();
    let stderr = run_refused(&config_path);
    assert!(
        stderr.contains(&shown(&mismatched.key)) && stderr.contains("does not match"),
        "{stderr}"
    );
}

/// A certificate that expired (a renewal that failed) must not take the box down at its next
/// start: plain HTTP serves, HTTPS serves the certificate (clients refuse it), and status
/// names the problem. A reload to an expired certificate keeps the valid one in use.
#[test]
fn an_expired_certificate_is_a_problem_not_a_dead_box() {
    let appliance = Appliance::start_with("expired", |scratch, config| {
        let expired = self_signed(&scratch.root, "old", &[VIDEO], Validity::Expired).unwrap();
        config.tls.as_mut().unwrap().certificates = vec![expired];
    });
    let (path, bytes) = appliance.catalog.largest();
    assert!(
        appliance.get(&path) == Some(bytes),
        "plain HTTP does not serve"
    );
    let status = appliance.ctl().status().unwrap();
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("old.pem") && problems.contains("expired"),
        "{status}"
    );
    let video = &appliance.certificates[0];
    let fetched = curl(&[
        "--cacert".to_string(),
        video.cert.display().to_string(),
        "--resolve".to_string(),
        format!("{VIDEO}:{}:127.0.0.1", appliance.tls_port),
        appliance.https_url(VIDEO, &path),
    ]);
    assert_eq!(
        fetched.exit_code, 60,
        "the expired certificate is what is served"
    );
}

/// The load of the reload test: workers that each run curl with four range requests on one
/// connection, over and over, trusting the old and the new certificate; every failure is
/// kept with what went wrong.
struct Load {
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    workers: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(appliance: &Appliance, ca: &Path, path: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let mut args = appliance.https_options(VIDEO, ca);
        args.extend(["-r", "100-4195", "-w", "%{http_code} %{size_download}\\n"].map(String::from));
        for _ in 0..4 {
            args.extend(["-o".to_string(), "/dev/null".to_string()]);
            args.push(appliance.https_url(VIDEO, path));
        }
        let workers = (0..workers)
            .map(|_| {
                let (stop, requests, args) = (stop.clone(), requests.clone(), args.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let out = Command::new("curl")
                            .args(["-s", "--max-time", "20"])
                            .args(&args)
                            .output()
                            .expect("run curl");
                        let written = String::from_utf8_lossy(&out.stdout).into_owned();
                        if !out.status.success() || written != "206 4096\n".repeat(4) {
                            failures.push(format!("{}: {written:?}", out.status));
                        }
                        requests.fetch_add(4, Ordering::SeqCst);
                    }
                    failures
                })
            })
            .collect();
        Load {
            stop,
            requests,
            workers,
        }
    }

    /// Waits until `more` requests beyond those made so far are done.
    fn wait_for(&self, more: u64) {
        let target = self.requests.load(Ordering::SeqCst) + more;
        let made = eventually(Duration::from_secs(30), || {
            self.requests.load(Ordering::SeqCst) >= target
        });
        assert!(made, "the load stalled");
    }

    /// Stops the workers: (requests made, failures).
    fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failures = self
            .workers
            .into_iter()
            .flat_map(|worker| worker.join().unwrap())
            .collect();
        (self.requests.load(Ordering::SeqCst), failures)
    }
}

/// Sends SIGHUP and waits up to 5 s until the daemon has handled it: the access log, renamed
/// away first, is opened again (every reload, taken or refused, reopens it).
fn reload(appliance: &Appliance, rotation: u32) {
    let access_log = PathBuf::from(appliance.config.serve.access_log.clone().unwrap());
    let rotated = appliance.scratch.path(&format!("access.log.{rotation}"));
    fs::rename(&access_log, rotated).unwrap();
    send_signal(appliance.pid(), "HUP").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || access_log.exists()),
        "SIGHUP {rotation} was not handled within 5 s"
    );
}

#[test]
fn certificates_reload_on_sighup_under_load_without_a_failed_request() {
    let appliance = Appliance::start("reload");
    let (path, bytes) = appliance.catalog.largest();
    let configured = appliance.certificates[0].clone();
    // The old certificate kept aside, the new one made aside, and a bundle trusting both.
    let old_pem = appliance.scratch.path("old.pem");
    fs::copy(&configured.cert, &old_pem).unwrap();
    let aside = appliance.scratch.path("next");
    fs::create_dir_all(&aside).unwrap();
    let next = self_signed(&aside, "video", &[VIDEO], Validity::Current).unwrap();
    let bundle = appliance.scratch.path("old-and-new.pem");
    let both = [fs::read(&old_pem).unwrap(), fs::read(&next.cert).unwrap()].concat();
    fs::write(&bundle, both).unwrap();
    let trusting = |ca: &Path| appliance.curl(VIDEO, ca, &path, &["-r", "0-0"]).exit_code;
    assert_eq!(trusting(&old_pem), 0);
    assert_eq!(
        trusting(&next.cert),
        60,
        "the new certificate is served too soon"
    );
    // A connection held across the reloads, and the load.
    let mut held = appliance.session(VIDEO);
    assert!(held.get(&path, "0-999").1 == bytes[..1000]);
    let load = Load::start(&appliance, &bundle, &path, 2);
    load.wait_for(16);
    // The new certificate over the old files, then SIGHUP: new handshakes get it.
    fs::copy(&next.cert, &configured.cert).unwrap();
    fs::copy(&next.key, &configured.key).unwrap();
    reload(&appliance, 1);
    assert!(
        eventually(Duration::from_secs(5), || trusting(&next.cert) == 0),
        "the new certificate is not served 5 s after SIGHUP"
    );
    assert_eq!(
        trusting(&old_pem),
        60,
        "the old certificate is still served"
    );
    assert!(held.get(&path, "1000-1999").1 == bytes[1000..2000]);
    load.wait_for(16);
    // A certificate with another's key over the files, then SIGHUP: refused, the good one
    // stays.
    let bad = self_signed(
        &appliance.scratch.root,
        "video",
        &[VIDEO],
        Validity::Current,
    );
    replace_key(&bad.unwrap()).unwrap();
    let bad_pem = appliance.scratch.path("bad.pem");
    fs::copy(&configured.cert, &bad_pem).unwrap();
    reload(&appliance, 2);
    assert_eq!(trusting(&next.cert), 0, "the good certificate was dropped");
    assert_eq!(trusting(&bad_pem), 60, "the bad certificate is served");
    load.wait_for(16);
    let (status, _) = appliance.admin("GET", "/health");
    assert_eq!(
        status, 200,
        "the daemon is not healthy after a refused reload"
    );
    assert!(held.get(&path, "2000-2999").1 == bytes[2000..3000]);
    let (requests, failures) = load.stop();
    let failed = failures.len();
    let what = format!("{failed} curl runs (of 4 requests each) failed among {requests} requests");
    assert!(failures.is_empty(), "{what}: {failures:?}");
    eprintln!("{requests} requests across two reloads, none failed");
}

/// The response head without its Date field (it may tick between two requests).
fn without_date(head: &str) -> String {
    head.lines()
        .filter(|line| !line.starts_with("date: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asks for `target` with curl `options` over plain HTTP, then over HTTPS: both are answered
/// `expected`, with the same head (but its Date) and the same body.
fn check_same_answer(appliance: &Appliance, target: &str, options: &[String], expected: u16) {
    let mut plain_args = options.to_vec();
    plain_args.push(appliance.url(target));
    let plain = curl(&plain_args);
    let mut https_args = appliance.https_options(VIDEO, &appliance.certificates[0].cert);
    https_args.extend_from_slice(options);
    https_args.push(appliance.https_url(VIDEO, target));
    let https = curl(&https_args);
    let what = format!("{options:?} {target}");
    assert_eq!((plain.status, https.status), (expected, expected), "{what}");
    assert_eq!(
        without_date(&https.head),
        without_date(&plain.head),
        "{what}"
    );
    assert!(https.body == plain.body, "{what}: the bodies differ");
}

/// The access-log lines of responses on `listener` (`http` or `https`, the last field).
fn access_log_lines(appliance: &Appliance, listener: &str) -> Vec<String> {
    let path = appliance.config.serve.access_log.clone().unwrap();
    let suffix = format!(" {listener}");
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.ends_with(&suffix))
        .map(String::from)
        .collect()
}

/// curl's `-w` line for each of `count` requests for `target` in one run over HTTPS: how
/// many connections each opened, and its status.
fn connections_per_request(appliance: &Appliance, target: &str, count: usize) -> String {
    let mut args = appliance.https_options(VIDEO, &appliance.certificates[0].cert);
    args.extend(["-r", "0-9", "-w", "%{num_connects} %{http_code}\\n"].map(String::from));
    for _ in 0..count {
        args.extend(["-o".to_string(), "/dev/null".to_string()]);
        args.push(appliance.https_url(VIDEO, target));
    }
    String::from_utf8_lossy(&curl(&args).body).into_owned()
}

#[test]
fn https_behaves_like_http() {
    const KEY: &[u8] = b"tls-like-http-key-0123456789abcdef";
    let appliance = Appliance::start_with("like-http", |scratch, config| {
        let key_file = scratch.path("signing.key");
        fs::write(&key_file, KEY).unwrap();
        config.serve.url_signing_key_file = Some(key_file);
        config.tls.as_mut().unwrap().kernel_tls = Some("off".to_string());
    });
    let (path, bytes) = appliance.catalog.largest();
    let size = bytes.len();
    let signer = appliance_serve::signed::UrlSigner::new(KEY);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signed = |target: &str| format!("{target}?{}", signer.sign(target, now + 600));
    let good = signed(&path);
    let etag = curl(&["-I", appliance.url(&good).as_str()])
        .head
        .lines()
        .find_map(|line| line.strip_prefix("etag: "))
        .expect("an etag")
        .trim()
        .to_string();
    let options = |list: &[&str]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
    let expired = format!("{path}?{}", signer.sign(&path, now - 1));
    let cases = [
        (&good, options(&[]), 200),
        (&good, options(&["-r", "0-9"]), 206),
        (&good, options(&["-H", "Range: bytes=-50"]), 206),
        (&good, options(&["-r", &format!("{size}-")]), 416),
        (&good, options(&["-I", "-o", "/dev/null"]), 200),
        (
            &good,
            options(&["-H", &format!("If-None-Match: {etag}")]),
            304,
        ),
        (&good, options(&["-H", "If-Match: \"other\""]), 412),
        (
            &good,
            options(&["-r", "0-9", "-H", &format!("If-Range: {etag}")]),
            206,
        ),
        (&good, options(&["-X", "DELETE"]), 405),
        (&signed("/not/stored.mp4"), options(&[]), 404),
        (&path, options(&["-r", "0-0"]), 403),
        (&expired, options(&["-r", "0-0"]), 403),
        // The request limits: a request line and a head beyond their defaults.
        (
            &format!("{good}&pad={}", "a".repeat(9000)),
            options(&[]),
            414,
        ),
        (
            &good,
            options(&["-H", &format!("X-Pad: {}", "b".repeat(20_000))]),
            431,
        ),
    ];
    for (target, options, expected) in &cases {
        check_same_answer(&appliance, target, options, *expected);
    }
    let fetched = appliance.curl(
        VIDEO,
        &appliance.certificates[0].cert,
        &good,
        &["-r", "1000-1999"],
    );
    assert!(fetched.body == bytes[1000..2000]);
    // Keep-alive: the second request goes on the first one's connection.
    assert_eq!(
        connections_per_request(&appliance, &good, 2),
        "1 206\n0 206\n"
    );
    // The access log names the listener last; metrics count by listener and TLS path. (A
    // request refused at parsing, 414 and 431, is answered but not logged: it has no path.)
    let logged = cases.len() - 2;
    let https_answered = logged + 3;
    assert!(
        eventually(Duration::from_secs(5), || {
            access_log_lines(&appliance, "https").len() >= https_answered
        }),
        "{:?}",
        access_log_lines(&appliance, "https")
    );
    let unsatisfiable = format!("GET {path} bytes={size}- 416 ");
    let lines = access_log_lines(&appliance, "https");
    assert!(
        lines.iter().any(|line| line.contains(&unsatisfiable)),
        "{lines:?}"
    );
    assert!(access_log_lines(&appliance, "http").len() > logged);
    let count = |name: &str| metric(&appliance, name);
    let responses = "appliance_http_listener_responses_total";
    assert!(count(&format!("{responses}{{listener=\"https\"}}")) >= 15.0);
    assert!(count(&format!("{responses}{{listener=\"http\"}}")) >= 13.0);
    assert!(count("appliance_http_listener_sent_bytes_total{listener=\"https\"}") > 0.0);
    assert!(count("appliance_tls_connections_total{path=\"user\"}") >= 14.0);
    assert_eq!(
        count("appliance_tls_connections_total{path=\"kernel\"}"),
        0.0
    );
    assert_eq!(count("appliance_tls_kernel"), 0.0);
    let status = appliance.ctl().status().unwrap();
    let tls = &status["tls"];
    assert_eq!(tls["path"], "user", "{tls}");
    let why = tls["why_user"].as_str().unwrap_or_default();
    assert!(why.contains("kernel_tls = \"off\""), "{tls}");
}

#[test]
fn plain_http_off_serves_https_only() {
    let appliance = Appliance::start_with("https-only", |_, config| {
        config.serve.plain_http = Some(false);
    });
    let (path, bytes) = appliance.catalog.largest();
    let video = &appliance.certificates[0].cert;
    let refused = TcpStream::connect(("127.0.0.1", appliance.port)).map(drop);
    assert_eq!(
        refused.map_err(|error| error.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the plain HTTP port listens"
    );
    let fetched = appliance.curl(VIDEO, video, &path, &["-r", "0-99"]);
    assert_eq!((fetched.exit_code, fetched.status), (0, 206));
    assert!(fetched.body == bytes[..100]);
    // (The response is counted once sent whole, which may be just after curl has it.)
    let responses = "appliance_http_listener_responses_total{listener=\"https\"}";
    assert_eq!(metric_reaching(&appliance, responses, 1.0), 1.0);
    assert_eq!(
        metric(
            &appliance,
            "appliance_http_listener_connections_total{listener=\"http\"}"
        ),
        0.0
    );
}

#[test]
fn drain_closes_https_keep_alive_connections_at_their_next_response() {
    let appliance = Appliance::start("drain");
    // The CLI first: building it can take longer than the held connection may idle.
    let ctl = appliance.ctl();
    let (path, bytes) = appliance.catalog.largest();
    let video = &appliance.certificates[0].cert;
    let mut held = appliance.session(VIDEO);
    let (head, body) = held.get(&path, "0-9");
    assert!(head.starts_with("http/1.1 206"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert!(body == bytes[..10]);
    ctl.ok(&["drain"]).unwrap();
    let (head, body) = held.get(&path, "10-19");
    assert!(head.starts_with("http/1.1 206"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body == bytes[10..20]);
    assert!(
        held.closes_within(Duration::from_secs(5)),
        "the connection stays open after Connection: close"
    );
    let fetched = appliance.curl(VIDEO, video, &path, &["-r", "0-0"]);
    assert_eq!(fetched.status, 206);
    assert!(
        fetched.head.contains("connection: close"),
        "{}",
        fetched.head
    );
    assert!(
        eventually(Duration::from_secs(10), || appliance
            .admin("GET", "/health")
            .1
            .contains("\"state\":\"drained\"")),
        "never drained"
    );
}

/// Sessions resume: TLS 1.3 and 1.2 by ticket, TLS 1.2 by session ID (a client that offers
/// no ticket), and a session from before a certificate reload still resumes after it (the
/// ticket keys and the session cache outlive reloads).
#[test]
fn sessions_resume_by_ticket_and_by_session_id_across_a_reload() {
    let appliance = Appliance::start("resume");
    let (path, _) = appliance.catalog.largest();
    // HTTP/1.0: the server closes after the answer, so the client has read every ticket
    // before it writes its session out.
    let request = format!("HEAD {path} HTTP/1.0\r\n\r\n");
    let shapes: [(&str, &str, &[&str]); 3] = [
        ("TLS 1.3 by ticket", "TLSv1.3", &["-tls1_3"]),
        ("TLS 1.2 by ticket", "TLSv1.2", &["-tls1_2"]),
        (
            "TLS 1.2 by session ID",
            "TLSv1.2",
            &["-tls1_2", "-no_ticket"],
        ),
    ];
    let mut sessions = Vec::new();
    for (number, (what, version, options)) in shapes.iter().enumerate() {
        let session = appliance.scratch.path(&format!("session-{number}.pem"));
        let session_arg = session.to_str().unwrap().to_string();
        let mut args: Vec<&str> = options.to_vec();
        args.extend(["-sess_out", &session_arg]);
        let first = appliance.s_client(&args, Some(request.as_bytes()), Duration::from_secs(10));
        assert!(
            first.output.contains(&format!("New, {version}")) && session.exists(),
            "{what}: the first connection: {}",
            first.output
        );
        sessions.push((what, version, options, session_arg));
    }
    let resume = |round: &str| {
        for (what, version, options, session) in &sessions {
            let mut args: Vec<&str> = options.to_vec();
            args.extend(["-sess_in", session.as_str()]);
            let run = appliance.s_client(&args, Some(request.as_bytes()), Duration::from_secs(10));
            assert!(
                run.output.contains(&format!("Reused, {version}")),
                "{what}, {round}: the session was not resumed: {}",
                run.output
            );
            assert!(
                run.output.contains(" 200 OK"),
                "{what}, {round}: {}",
                run.output
            );
        }
    };
    resume("before the reload");
    reload(&appliance, 0);
    resume("after a certificate reload");
}
