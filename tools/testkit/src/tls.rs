//! Test certificates: self-signed ECDSA P-256 certificates for given DNS names, written as PEM
//! files the way an operator's would be (chain file and key file), valid now, expired, or with
//! a key that does not match.

use crate::config::TlsCertificate;
use rcgen::{CertificateParams, KeyPair};
use std::io;
use std::path::Path;

/// When a test certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From 2020 to 2100.
    Current,
    /// From 2020 to 2021: long expired.
    Expired,
}

/// Writes `<dir>/<stem>.pem` (the certificate) and `<dir>/<stem>.key` (its key) for `names`;
/// returns the pair as a `[tls]` certificate entry.
pub fn self_signed(
    dir: &Path,
    stem: &str,
    names: &[&str],
    validity: Validity,
) -> io::Result<TlsCertificate> {
    let key = KeyPair::generate().map_err(crate::error_from)?;
    let mut params = CertificateParams::new(
        names
            .iter()
            .map(|name| name.to_string())
            .collect::<Vec<_>>(),
    )
    .map_err(crate::error_from)?;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = match validity {
        Validity::Current => rcgen::date_time_ymd(2100, 1, 1),
        Validity::Expired => rcgen::date_time_ymd(2021, 1, 1),
    };
    let cert = params.self_signed(&key).map_err(crate::error_from)?;
    let entry = TlsCertificate {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    };
    std::fs::write(&entry.cert, cert.pem())?;
    std::fs::write(&entry.key, key.serialize_pem())?;
    Ok(entry)
}

/// Writes a fresh key over `entry`'s key file: the certificate and key no longer match.
pub fn replace_key(entry: &TlsCertificate) -> io::Result<()> {
    let key = KeyPair::generate().map_err(crate::error_from)?;
    std::fs::write(&entry.key, key.serialize_pem())
}
