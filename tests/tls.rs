//! Black-box tests of HTTPS: the real `applianced run` with a `[tls]` listener on file-backed
//! drives, driven with curl and `openssl s_client` (real clients): byte-exact ranges over
//! TLS, SNI choosing the certificate, refused protocol versions, renegotiation and hostile
//! first bytes, the handshake deadline, certificate reloads under load, and `check-config`
//! refusing bad certificates.

mod util;

use appliance_testkit::tls::{self_signed, Validity};
use appliance_testkit::{Config, Serve, Tls, TlsCertificate};
use std::path::PathBuf;
use std::process::Command;
use util::{formatted_drives, Catalog, Daemon, Scratch};

/// A running appliance with plain HTTP and HTTPS over an imported catalog.
struct Appliance {
    daemon: Daemon,
    catalog: Catalog,
    tls_port: u16,
    certificates: Vec<TlsCertificate>,
    _scratch: Scratch,
}

impl std::ops::Deref for Appliance {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}

/// The names of the two test certificates: the first is the default.
const VIDEO: &str = "video.isp.example";
const IMAGES: &str = "images.isp.example";

impl Appliance {
    /// Formats a drive, imports a catalog, writes two certificates (VIDEO, then IMAGES) and
    /// starts the daemon with `serve` and an HTTPS listener.
    fn start(name: &str, serve: Serve) -> Appliance {
        let scratch = Scratch::new(&format!("tls-{name}"));
        let drives = formatted_drives(&scratch, 1, 128 << 20, 8);
        let catalog = Catalog::generate(&scratch, "src", 8, 3_000_000);
        let refs: Vec<&std::path::Path> = drives.iter().map(PathBuf::as_path).collect();
        let out = scratch.store(&refs, &["import", catalog.root.to_str().unwrap()]);
        assert!(out.status.success(), "{}", out.stderr);
        let certificates = vec![
            self_signed(&scratch.root, "video", &[VIDEO], Validity::Current).unwrap(),
            self_signed(&scratch.root, "images", &[IMAGES], Validity::Current).unwrap(),
        ];
        let tls_port = appliance_testkit::free_port().unwrap();
        let config = Config {
            serve,
            tls: Some(Tls {
                listen: ([127, 0, 0, 1], tls_port).into(),
                certificates: certificates.clone(),
                handshake_timeout_ms: Some(2_000),
                kernel_tls: None,
            }),
            ..Config::new(&drives)
        };
        let daemon = Daemon::start(&scratch, config);
        Appliance {
            daemon,
            catalog,
            tls_port,
            certificates,
            _scratch: scratch,
        }
    }

    /// curl over HTTPS to `name` (resolved to loopback, so SNI says `name`), trusting only
    /// `ca`: (exit code, status, body).
    fn curl(
        &self,
        name: &str,
        ca: &TlsCertificate,
        path: &str,
        extra: &[&str],
    ) -> (i32, u16, Vec<u8>) {
        let resolve = format!("{name}:{}:127.0.0.1", self.tls_port);
        let url = format!("https://{name}:{}{path}", self.tls_port);
        let out = Command::new("curl")
            .args(["-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(["--resolve", &resolve, "--cacert", ca.cert.to_str().unwrap()])
            .args(extra)
            .arg(&url)
            .output()
            .expect("run curl");
        let mut body = out.stdout;
        let split = body.iter().rposition(|byte| *byte == b'\n').unwrap_or(0);
        let status = String::from_utf8_lossy(&body[split..])
            .trim()
            .parse()
            .unwrap_or(0);
        body.truncate(split);
        (out.status.code().unwrap_or(-1), status, body)
    }
}

#[test]
fn ranges_over_https_are_byte_exact_and_sni_picks_the_certificate() {
    let appliance = Appliance::start("ranges", Serve::default());
    let video = &appliance.certificates[0];
    let images = &appliance.certificates[1];
    for (path, bytes) in &appliance.catalog.files {
        let (code, status, body) = appliance.curl(VIDEO, video, path, &[]);
        assert_eq!((code, status), (0, 200), "{path}");
        assert!(
            body == *bytes,
            "{path}: the body differs from the stored file"
        );
        let len = bytes.len();
        if len < 2 {
            continue;
        }
        for (start, end) in [(0, 0), (1, 100), (len / 3, len / 2), (len - 1, len - 1)] {
            let range = format!("{start}-{end}");
            let (code, status, body) = appliance.curl(VIDEO, video, path, &["-r", &range]);
            assert_eq!((code, status), (0, 206), "{path} {range}");
            assert!(body == bytes[start..=end], "{path} {range}: wrong bytes");
        }
    }
    let (path, bytes) = &appliance.catalog.files[0];
    // SNI: IMAGES gets its own certificate (trusting only it works, trusting VIDEO's fails),
    // and an unknown name gets the first.
    let (code, status, body) = appliance.curl(IMAGES, images, path, &[]);
    assert_eq!((code, status), (0, 200));
    assert!(body == *bytes);
    let (code, _, _) = appliance.curl(IMAGES, video, path, &[]);
    assert_eq!(
        code, 60,
        "IMAGES must not be answered with VIDEO's certificate"
    );
    let (code, status, _) = appliance.curl(
        VIDEO,
        video,
        path,
        &[
            "-k",
            "--resolve",
            &format!("other.example:{}:127.0.0.1", appliance.tls_port),
        ],
    );
    assert_eq!((code, status), (0, 200));
    // The access log notes the listener.
    let status = appliance.ctl().status().unwrap();
    let tls = &status["tls"];
    assert_eq!(tls["certificates"].as_array().unwrap().len(), 2, "{tls}");
    assert!(tls["path"] == "kernel" || tls["path"] == "user", "{tls}");
}
