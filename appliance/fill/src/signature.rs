//! Manifest signatures: a detached minisign signature (`<manifest>.minisig`, Ed25519 over the
//! BLAKE2b-512 of the manifest's bytes, as `minisign -S` makes by default) checked against the
//! configured public keys. Pure: takes bytes and text; must not fetch, read files or parse the
//! manifest (a manifest is verified before a byte of it is parsed).

use crate::manifest::excerpt;
use minisign_verify::{Error, PublicKey, Signature};
use std::fmt;

/// What is appended to the manifest's URL path or file path to find its signature.
pub const SIGNATURE_SUFFIX: &str = ".minisig";
/// The largest signature accepted, in bytes: a minisign signature is about 300 bytes plus its
/// trusted comment.
pub const SIGNATURE_BYTES_MAX: u64 = 8192;

/// A public key a manifest may be signed with.
#[derive(Clone)]
pub struct ManifestKey {
    key: PublicKey,
    /// The base64 line, as configured (logs and errors name keys by it).
    text: String,
}

impl fmt::Debug for ManifestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ManifestKey({})", self.text)
    }
}

impl ManifestKey {
    /// A minisign public key: the base64 line of a `minisign.pub` file (`RWQ...`), or the
    /// whole file (its untrusted comment line, then that line).
    pub fn parse(text: &str) -> Result<ManifestKey, String> {
        let line = text
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .unwrap_or_default();
        let key = PublicKey::from_base64(line).map_err(|error| {
            format!("{:?} is not a minisign public key: {error}", excerpt(line))
        })?;
        Ok(ManifestKey {
            key,
            text: line.to_string(),
        })
    }
}

/// Checks `signature` (the text of a `.minisig` file) over `manifest` against `keys`: accepted
/// when one of them made it. Returns the signature's trusted comment.
pub fn verify_manifest(
    manifest: &[u8],
    signature: &[u8],
    keys: &[ManifestKey],
) -> Result<String, String> {
    let text = std::str::from_utf8(signature)
        .map_err(|_| "the signature is not minisign text (not UTF-8)".to_string())?;
    let signature = Signature::decode(text)
        .map_err(|error| format!("the signature is not a minisign signature: {error}"))?;
    let mut other_key = true;
    for key in keys {
        match key.key.verify(manifest, &signature, false) {
            Ok(()) => return Ok(excerpt(signature.trusted_comment())),
            Err(Error::UnexpectedKeyId) => {}
            Err(_) => other_key = false,
        }
    }
    if other_key {
        Err("the manifest is signed with a key that is not configured".into())
    } else {
        Err("the signature does not match the manifest (altered or damaged)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with the real minisign tool; test-only keys (see testdata/README.md).
    const MANIFEST: &[u8] = include_bytes!("../testdata/signed-manifest.json");
    const SIGNATURE: &[u8] = include_bytes!("../testdata/signed-manifest.json.minisig");
    const KEY_FILE: &str = include_str!("../testdata/test-only-key.pub");
    const OTHER_KEY_FILE: &str = include_str!("../testdata/test-only-other-key.pub");

    fn key(text: &str) -> ManifestKey {
        ManifestKey::parse(text).expect("test key")
    }

    #[test]
    fn a_minisign_signature_verifies_and_nothing_else_does() {
        let keys = [key(KEY_FILE)];
        let both = [key(OTHER_KEY_FILE), key(KEY_FILE.lines().nth(1).unwrap())];
        assert_eq!(
            verify_manifest(MANIFEST, SIGNATURE, &keys).as_deref(),
            Ok("test-only signature")
        );
        assert!(verify_manifest(MANIFEST, SIGNATURE, &both).is_ok());
        let mut tampered = MANIFEST.to_vec();
        let at = tampered.iter().position(|byte| *byte == b'4').unwrap();
        tampered[at] = b'5';
        let mut bad_comment = String::from_utf8(SIGNATURE.to_vec()).unwrap();
        bad_comment = bad_comment.replace("test-only signature", "test-only signaturE");
        type Case<'a> = (&'a [u8], &'a [u8], &'a [ManifestKey], &'a str);
        let cases: [Case; 6] = [
            (&tampered, SIGNATURE, &keys, "does not match"),
            (MANIFEST, bad_comment.as_bytes(), &keys, "does not match"),
            (
                MANIFEST,
                SIGNATURE,
                &[key(OTHER_KEY_FILE)],
                "not configured",
            ),
            (MANIFEST, b"", &keys, "not a minisign signature"),
            (MANIFEST, b"\xff\xfe", &keys, "not UTF-8"),
            (MANIFEST, MANIFEST, &keys, "not a minisign signature"),
        ];
        for (manifest, signature, keys, expected) in cases {
            let refused = verify_manifest(manifest, signature, keys).expect_err(expected);
            assert!(refused.contains(expected), "{refused} lacks {expected}");
        }
    }

    #[test]
    fn keys_parse_from_a_line_or_a_file() {
        assert_eq!(key(KEY_FILE).text, KEY_FILE.lines().nth(1).unwrap());
        assert_eq!(
            key(&format!("  {}  ", KEY_FILE.lines().nth(1).unwrap()))
                .text
                .len(),
            56
        );
        for bad in ["", "RWQ", "not base64 at all", &"A".repeat(5000)] {
            let refused = ManifestKey::parse(bad).expect_err(bad);
            assert!(refused.contains("not a minisign public key"), "{refused}");
            assert!(refused.len() < 200, "{refused}");
        }
    }
}
