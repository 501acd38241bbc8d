//! HTTPS: the TLS settings, certificates from PEM files chosen by SNI, the rustls server
//! configuration (aws-lc-rs; TLS 1.3 and 1.2, ECDHE with AES-GCM or ChaCha20-Poly1305, ALPN
//! `http/1.1`, session resumption by tickets under rotating keys), and the handshake that
//! hands a connection's keys to the kernel (kTLS) so bodies still go out with sendfile(2), or
//! keeps rustls in the process where the kernel has no TLS.
//!
//! Certificates are loaded whole or not at all: a reload (SIGHUP) that finds a bad file keeps
//! the certificates in use and says why. The ticket keys and the session cache live as long
//! as the server, so a reload does not end resumption.

use appliance_device::zerocopy;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;

/// TLS 1.2 sessions kept for resumption by session ID (TLS 1.3 resumes by ticket only).
const SESSION_CACHE_ENTRIES: usize = 64 * 1024;

/// A certificate chain (leaf first) and its private key, as PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether connections hand their keys to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelTls {
    /// kTLS where the kernel offers it (its TLS module and the negotiated cipher), else
    /// encryption in the process.
    Auto,
    /// Always encrypt in the process.
    Off,
}

/// The HTTPS listener's settings.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    /// The first is the default, for clients that send no server name or an unknown one.
    pub certificates: Vec<CertificateFiles>,
    /// From accept to the end of the handshake (a client stalling in its handshake is cut).
    pub handshake_timeout: Duration,
    pub kernel_tls: KernelTls,
}

/// One loaded certificate and what an operator sees of it.
pub struct Identity {
    key: Arc<CertifiedKey>,
    pub names: Vec<String>,
    pub not_before_unix_s: i64,
    pub not_after_unix_s: i64,
    pub cert_path: PathBuf,
}

impl fmt::Debug for Identity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Identity")
            .field("names", &self.names)
            .field("not_after_unix_s", &self.not_after_unix_s)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

/// Every certificate of the listener, by the names they are valid for.
#[derive(Debug)]
pub struct Identities {
    list: Vec<Identity>,
    exact: HashMap<String, usize>,
    /// `*.example.com` as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Identities {
    /// Loads every certificate and key, checking each: readable, PEM, a key that matches its
    /// certificate. The first failure is the error, naming the file. Whether each is valid
    /// now is `validity_problems`: an expired certificate must not keep the box from starting
    /// (plain HTTP and every other setting would go down with it).
    pub fn load(files: &[CertificateFiles]) -> Result<Identities, String> {
        if files.is_empty() {
            return Err("no certificate is configured".to_string());
        }
        let loaded = files
            .iter()
            .map(load_identity)
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Identities::of(loaded))
    }

    /// One certificate chain and key given as PEM bytes (tests, the fuzzer).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Identities, String> {
        let memory = Path::new("<memory>");
        let identity = identity_from_pem(cert_pem, key_pem, memory, memory)?;
        Ok(Identities::of(vec![identity]))
    }

    /// Indexes `list` by name; the first certificate naming a name wins it.
    fn of(list: Vec<Identity>) -> Identities {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (at, identity) in list.iter().enumerate() {
            for name in &identity.names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name),
                }
                .or_insert(at);
            }
        }
        Identities {
            list,
            exact,
            wildcard,
        }
    }

    /// The certificate for a client's server name: an exact name, else a wildcard one level
    /// up, else the first configured.
    pub fn choose(&self, server_name: Option<&str>) -> &Identity {
        let at = server_name
            .map(str::to_ascii_lowercase)
            .and_then(|name| {
                self.exact.get(&name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        &self.list[at]
    }

    pub fn list(&self) -> &[Identity] {
        &self.list
    }

    /// The certificates not valid at `now_unix_s` (expired, or not yet valid), one readable
    /// line each, naming the file.
    pub fn validity_problems(&self, now_unix_s: i64) -> Vec<String> {
        let date = |unix_s: i64| crate::http::http_date(u64::try_from(unix_s).unwrap_or(0));
        self.list
            .iter()
            .filter_map(|identity| {
                let file = identity.cert_path.display();
                if now_unix_s > identity.not_after_unix_s {
                    Some(format!(
                        "{file}: the certificate expired at {} (notAfter)",
                        date(identity.not_after_unix_s)
                    ))
                } else if now_unix_s < identity.not_before_unix_s {
                    Some(format!(
                        "{file}: the certificate is not valid before {} (notBefore)",
                        date(identity.not_before_unix_s)
                    ))
                } else {
                    None
                }
            })
            .collect()
    }
}

fn load_identity(files: &CertificateFiles) -> Result<Identity, String> {
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    identity_from_pem(&cert_pem, &key_pem, &files.cert, &files.key)
}

/// Parses and checks a chain and its key; errors name `cert_file` or `key_file`.
fn identity_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_file: &Path,
    key_file: &Path,
) -> Result<Identity, String> {
    let cert_path = cert_file.display();
    let key_path = key_file.display();
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{cert_path}: not a PEM certificate chain: {error}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!("{cert_path}: holds no PEM certificate"));
    };
    let (names, not_before, not_after) = leaf_facts(leaf)
        .map_err(|error| format!("{cert_path}: the certificate cannot be parsed: {error}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| {
        format!("{key_path}: holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {error}")
    })?;
    let signing_key = aws_lc_rs::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|error| format!("{key_path}: the private key cannot be used: {error}"))?;
    let key = CertifiedKey::new(chain, signing_key);
    match key.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "{key_path}: the key does not match the certificate in {cert_path}"
            ));
        }
        Err(error) => return Err(format!("{cert_path}: {error}")),
    }
    Ok(Identity {
        key: Arc::new(key),
        names,
        not_before_unix_s: not_before,
        not_after_unix_s: not_after,
        cert_path: cert_file.to_path_buf(),
    })
}

/// The largest certificate or key file read: a chain is a few KiB, and a path to a device
/// or a log must not fill the memory.
const PEM_FILE_BYTES_MAX: u64 = 1 << 20;

fn read(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let cannot = |error: io::Error| format!("{}: cannot be read: {error}", path.display());
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(cannot)?
        .take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(format!(
            "{}: larger than {} KiB, not a certificate or key file",
            path.display(),
            PEM_FILE_BYTES_MAX >> 10
        ));
    }
    Ok(bytes)
}

/// The leaf's DNS names (subjectAltName, else the subject's common name) and validity.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|error| error.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(alt)) = cert.subject_alternative_name() {
        for name in &alt.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_string());
            }
        }
    }
    if names.is_empty() {
        for common in cert.subject().iter_common_name() {
            if let Ok(text) = common.as_str() {
                names.push(text.to_string());
            }
        }
    }
    let validity = cert.validity();
    Ok((
        names,
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// Picks the certificate by SNI from the identities in use; a reload swaps them whole.
#[derive(Debug)]
pub struct SniResolver {
    current: RwLock<Arc<Identities>>,
}

impl SniResolver {
    pub fn current(&self) -> Arc<Identities> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, identities: Identities) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(identities);
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current().choose(hello.server_name()).key))
    }
}

/// Whether this kernel can take a connection's keys, and why not.
#[derive(Debug)]
pub struct KernelSupport {
    ciphers: Option<ktls::CompatibleCiphers>,
    /// Why connections are encrypted in the process (None when kTLS is in use).
    pub why_not: Option<String>,
}

impl KernelSupport {
    /// Asks the kernel: its TLS layer on a loopback connection, then each cipher.
    pub async fn probe(setting: KernelTls) -> KernelSupport {
        if setting == KernelTls::Off {
            return KernelSupport::without("kernel_tls = \"off\" in the configuration");
        }
        if let Err(error) = probe_tls_ulp().await {
            return KernelSupport::without(format!("the kernel has no TLS layer: {error}"));
        }
        match ktls::CompatibleCiphers::new().await {
            Ok(ciphers) => KernelSupport {
                ciphers: Some(ciphers),
                why_not: None,
            },
            Err(error) => KernelSupport::without(format!("probing the kernel's ciphers: {error}")),
        }
    }

    fn without(why: impl Into<String>) -> KernelSupport {
        KernelSupport {
            ciphers: None,
            why_not: Some(why.into()),
        }
    }

    pub fn available(&self) -> bool {
        self.ciphers.is_some()
    }
}

async fn probe_tls_ulp() -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let client = TcpStream::connect(listener.local_addr()?).await?;
    let (_server, _) = listener.accept().await?;
    zerocopy::enable_tls_ulp(client.as_fd())
}

/// The rustls configuration of the listener, with `resolver` choosing certificates. With
/// kernel TLS, only ciphers the kernel takes are offered, and the keys can be extracted.
pub fn server_config(
    resolver: Arc<SniResolver>,
    kernel: &KernelSupport,
) -> Result<Arc<ServerConfig>, String> {
    let mut provider = aws_lc_rs::default_provider();
    // The provider's suites are all ECDHE (TLS 1.2) or TLS 1.3 with AES-GCM or
    // ChaCha20-Poly1305; with kTLS, keep those the kernel can take over.
    if let Some(ciphers) = &kernel.ciphers {
        provider
            .cipher_suites
            .retain(|suite| ciphers.is_compatible(*suite));
        if provider.cipher_suites.is_empty() {
            return Err("the kernel takes none of the TLS ciphers".to_string());
        }
    }
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| format!("TLS versions: {error}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer =
        aws_lc_rs::Ticketer::new().map_err(|error| format!("TLS ticket keys: {error}"))?;
    config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    config.enable_secret_extraction = kernel.available();
    Ok(Arc::new(config))
}

/// A configuration that always encrypts in the process, over fixed `identities` (the
/// fuzzer's, tests').
pub fn user_space_config(identities: Identities) -> Result<Arc<ServerConfig>, String> {
    let resolver = Arc::new(SniResolver {
        current: RwLock::new(Arc::new(identities)),
    });
    server_config(resolver, &KernelSupport::without("user space only"))
}

/// The TLS state of a running server: its configuration, certificates and kernel support.
pub struct Tls {
    pub config: TlsConfig,
    resolver: Arc<SniResolver>,
    acceptor: tokio_rustls::TlsAcceptor,
    pub kernel: KernelSupport,
}

/// A connection after its handshake.
pub enum Secured {
    /// The kernel holds the keys: bytes written to the socket (send, sendfile) are encrypted
    /// by it.
    Kernel(ktls::KtlsStream<TcpStream>),
    /// rustls in the process encrypts.
    User(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Why a handshake failed.
#[derive(Debug)]
pub enum HandshakeError {
    /// The client sent what TLS refuses (garbage, an old version, no common cipher).
    Refused(io::Error),
    /// The keys could not be handed to the kernel.
    Kernel(String),
}

impl Tls {
    /// Loads the certificates and probes the kernel; an error says what is wrong.
    pub async fn start(config: TlsConfig) -> Result<Tls, String> {
        let identities = Identities::load(&config.certificates)?;
        // Served all the same: refusing to start would take plain HTTP down too, and an
        // operator sees the problem in the log, in `status` and in /health's problems.
        for problem in identities.validity_problems(now_unix_s()) {
            tracing::error!(%problem, "TLS certificate not valid now; clients will refuse it");
        }
        let resolver = Arc::new(SniResolver {
            current: RwLock::new(Arc::new(identities)),
        });
        let kernel = KernelSupport::probe(config.kernel_tls).await;
        let server = server_config(Arc::clone(&resolver), &kernel)?;
        Ok(Tls {
            config,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(server),
            kernel,
        })
    }

    /// Loads `files` and, when every one is good and valid now, serves new handshakes with
    /// them. On an error the certificates in use stay. Connections already open are not
    /// touched.
    pub fn reload(&self, files: &[CertificateFiles]) -> Result<(), String> {
        let identities = Identities::load(files)?;
        if let Some(problem) = identities
            .validity_problems(now_unix_s())
            .into_iter()
            .next()
        {
            return Err(problem);
        }
        self.resolver.replace(identities);
        Ok(())
    }

    pub fn identities(&self) -> Arc<Identities> {
        self.resolver.current()
    }

    /// The TLS handshake on an accepted connection, then the hand-off of its keys to the
    /// kernel when it can take them. The caller bounds the time.
    pub async fn handshake(&self, stream: TcpStream) -> Result<Secured, HandshakeError> {
        if self.kernel.available() {
            let tls = self
                .acceptor
                .accept(ktls::CorkStream::new(stream))
                .await
                .map_err(HandshakeError::Refused)?;
            let stream = ktls::config_ktls_server(tls)
                .await
                .map_err(|error| HandshakeError::Kernel(error.to_string()))?;
            // Published ranges are never rewritten while they can be read (the store's
            // rule), so the kernel may send file pages without copying them first.
            if let Err(error) = zerocopy::tls_tx_zerocopy_sendfile(stream.get_ref().as_fd()) {
                tracing::debug!(%error, "TLS_TX_ZEROCOPY_RO refused; the kernel copies");
            }
            Ok(Secured::Kernel(stream))
        } else {
            let tls = self
                .acceptor
                .accept(stream)
                .await
                .map_err(HandshakeError::Refused)?;
            Ok(Secured::User(Box::new(tls)))
        }
    }
}

/// The serving clock, as a certificate's validity times count (signed).
pub fn now_unix_s() -> i64 {
    i64::try_from(crate::server::now_unix_s()).unwrap_or(i64::MAX)
}

/// Feeds `bytes` to a fresh server connection as a client's first bytes, and answers what it
/// would: the listener's parsing of hostile input, for the fuzzer. Never panics.
pub fn first_bytes(config: &Arc<ServerConfig>, bytes: &[u8]) {
    let Ok(mut connection) = rustls::ServerConnection::new(Arc::clone(config)) else {
        return;
    };
    let mut input = bytes;
    while !input.is_empty() {
        match connection.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if connection.process_new_packets().is_err() {
            break;
        }
    }
    let mut sink = Vec::new();
    while connection.wants_write() {
        if connection.write_tls(&mut sink).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names`, loaded as the server would.
    fn identities(names: &[&str]) -> Identities {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Identities::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap()
    }

    #[test]
    fn sni_picks_exact_names_then_wildcards_then_the_first() {
        let mut list = identities(&["a.example"]).list;
        list.extend(identities(&["*.b.example", "b.example"]).list);
        let identities = Identities::of(list);
        let chosen = |name| identities.choose(name).names[0].clone();
        assert_eq!(chosen(Some("a.example")), "a.example");
        assert_eq!(chosen(Some("B.EXAMPLE")), "*.b.example");
        assert_eq!(chosen(Some("video.b.example")), "*.b.example");
        assert_eq!(chosen(Some("deep.video.b.example")), "a.example");
        assert_eq!(chosen(Some("other.example")), "a.example");
        assert_eq!(chosen(None), "a.example");
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let error = Identities::from_pem(cert.pem().as_bytes(), other.serialize_pem().as_bytes())
            .unwrap_err();
        assert!(error.contains("does not match"), "{error}");
        let error = Identities::from_pem(cert.pem().as_bytes(), b"junk").unwrap_err();
        assert!(error.contains("no PEM private key"), "{error}");
        let error = Identities::from_pem(b"junk", key.serialize_pem().as_bytes()).unwrap_err();
        assert!(error.contains("no PEM certificate"), "{error}");
    }

    #[test]
    fn files_that_are_not_certificates_are_refused_without_reading_them_whole() {
        let files = |cert: &str, key: &str| {
            vec![CertificateFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }]
        };
        let error = Identities::load(&files("/dev/zero", "/dev/zero")).unwrap_err();
        assert!(error.contains("/dev/zero: larger than 1024 KiB"), "{error}");
        let error = Identities::load(&files("/nonexistent.pem", "/dev/null")).unwrap_err();
        assert!(
            error.contains("/nonexistent.pem: cannot be read"),
            "{error}"
        );
        let error = Identities::load(&files("/", "/")).unwrap_err();
        assert!(error.contains("/: cannot be read"), "{error}");
        let error = Identities::load(&files("/dev/null", "/dev/null")).unwrap_err();
        assert!(
            error.contains("/dev/null: holds no PEM certificate"),
            "{error}"
        );
        assert!(Identities::load(&[]).is_err());
    }

    /// A ClientHello fragmented so that rustls' deframer buffer is almost full makes it offer
    /// the kTLS path's record-boundary reader (`ktls::CorkStream`) fewer than the 5 bytes of
    /// the next record header. Upstream ktls asserted that never happens: one client could
    /// abort the daemon. The handshake must fail cleanly instead.
    #[tokio::test]
    async fn cork_hands_out_a_record_header_in_pieces_when_rustls_has_little_room() {
        use tokio::io::AsyncWriteExt;
        let config = user_space_config(identities(&["a.example"])).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut records = Vec::new();
        let record = |records: &mut Vec<u8>, payload: &[u8]| {
            records.extend_from_slice(&[22, 3, 3]);
            records.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            records.extend_from_slice(payload);
        };
        // A ClientHello that claims 0xffff bytes, sent in fragments that fill the buffer.
        let mut first = vec![1, 0, 0xff, 0xff];
        first.resize(16_384, 0x42);
        record(&mut records, &first);
        for length in [16_384, 16_384, 16_360] {
            record(&mut records, &vec![0x42; length]);
        }
        record(&mut records, &[0x42; 64]);
        client.write_all(&records).await.unwrap();
        drop(client);
        let outcome = acceptor.accept(ktls::CorkStream::new(server)).await;
        assert!(
            outcome.is_err(),
            "a truncated, oversized ClientHello was accepted"
        );
    }

    #[test]
    fn hostile_first_bytes_never_panic() {
        let config = user_space_config(identities(&["a.example"])).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for length in 0..512usize {
            let bytes: Vec<u8> = (0..length)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed.to_le_bytes()[0]
                })
                .collect();
            first_bytes(&config, &bytes);
            // A record header that claims a handshake, with random contents.
            let mut record = vec![22, 3, 1, 2, 0];
            record.extend_from_slice(&bytes);
            first_bytes(&config, &record);
        }
    }
}
