//! Test-only manifest signing, made the way `minisign -S` makes signatures (Ed25519 over the
//! BLAKE2b-512 of the file, then over the signature and its trusted comment), with keys from
//! fixed seeds. These keys are generated here for the tests and trusted nowhere else.

#![allow(dead_code)]

use base64::Engine;
use blake2::Digest;
use ed25519_dalek::Signer;

/// A test-only minisign key pair.
pub struct TestKey {
    signing: ed25519_dalek::SigningKey,
    key_id: [u8; 8],
}

impl TestKey {
    /// The key pair of `seed` (any byte: every test key is derived from one).
    pub fn from_seed(seed: u8) -> TestKey {
        TestKey {
            signing: ed25519_dalek::SigningKey::from_bytes(&[seed; 32]),
            key_id: [seed ^ 0x5a; 8],
        }
    }

    /// The public key as `manifest_public_keys` takes it (the `RWQ...` line of minisign.pub).
    pub fn public(&self) -> String {
        let mut bytes = b"Ed".to_vec();
        bytes.extend_from_slice(&self.key_id);
        bytes.extend_from_slice(&self.signing.verifying_key().to_bytes());
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// The `.minisig` text of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        let base64 = base64::engine::general_purpose::STANDARD;
        let hashed = blake2::Blake2b512::digest(message);
        let signature = self.signing.sign(&hashed).to_bytes();
        let trusted_comment = "timestamp:1795000000\tfile:manifest.json\thashed";
        let mut global = signature.to_vec();
        global.extend_from_slice(trusted_comment.as_bytes());
        let global_signature = self.signing.sign(&global).to_bytes();
        let mut line = b"ED".to_vec();
        line.extend_from_slice(&self.key_id);
        line.extend_from_slice(&signature);
        format!(
            "untrusted comment: test-only signature\n{}\ntrusted comment: {trusted_comment}\n{}\n",
            base64.encode(line),
            base64.encode(global_signature)
        )
    }
}
