//! Fuzz target for the HTTPS listener's first bytes: whatever a client sends before and during
//! its handshake goes to the listener's rustls configuration (certificate chosen by SNI,
//! TLS 1.3 and 1.2, ALPN), which must answer or refuse it and never panic.

#![no_main]
#![forbid(unsafe_code)]

use appliance_serve::tls::{first_bytes, user_space_config, Identities};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

/// The listener's configuration, with a certificate made once per run.
fn config() -> &'static Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec!["fuzz.example".to_string()])
            .expect("a name")
            .self_signed(&key)
            .expect("a certificate");
        let identities = Identities::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("the certificate loads");
        user_space_config(identities).expect("a configuration")
    })
}

fuzz_target!(|data: &[u8]| {
    first_bytes(config(), data);
});
