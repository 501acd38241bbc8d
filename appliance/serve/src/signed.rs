//! Signed URLs: making and checking the `expires` and `signature` query parameters that let a
//! steering service hand out links valid until a given time. Pure: must not read clocks, keys
//! from disk or the network (the caller passes the key and the time), must not panic.
//!
//! # Token format
//!
//! A signed URL carries two query parameters, in any order, among any others (which are
//! ignored and not signed):
//!
//! ```text
//! /video/a/seg-00042.m4s?expires=1767225600&signature=5c1f...e2 (64 hex digits)
//! ```
//!
//! - `expires`: Unix seconds, decimal, no sign, no leading zeros. The URL is good up to and
//!   including that second.
//! - `signature`: lowercase hex (uppercase is accepted) of
//!   `HMAC-SHA256(key, "<path>\n<expires>")`, where `<path>` is the path as the appliance
//!   normalises it (`http::parse_request`): percent-decoded, UTF-8, starting with '/', with
//!   empty and `.` segments removed (`/a//./b/` is signed as `/a/b`), and `<expires>` is
//!   the same decimal text as in the query.
//!
//! Example for a steering service (shell), with the key in the file the appliance reads (whose
//! bytes are the key, exactly; a binary key cannot go through `-hmac`, so pass it as hex):
//! `printf '%s\n%s' "$path" "$expires" | openssl dgst -sha256 -mac HMAC -macopt
//! hexkey:"$(od -An -v -tx1 KEYFILE | tr -d ' \n')"`.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The SHA-256 block size: HMAC keys are hashed or zero-padded to it (RFC 2104).
const KEY_BLOCK_BYTES: usize = 64;
const SIGNATURE_HEX_BYTES: usize = 64;

/// Why a signed URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedUrlError {
    /// No query, or `expires` or `signature` absent.
    Missing,
    /// `expires` not a canonical decimal, `signature` not 64 hex digits, or either repeated.
    Malformed,
    /// Genuine, but `expires` has passed.
    Expired,
    /// The signature does not match the path and expiry under our key.
    BadSignature,
}

/// Signs and verifies URLs with one HMAC-SHA256 key.
#[derive(Clone)]
pub struct UrlSigner {
    /// HMAC state with the key already absorbed; cloned for each message.
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("UrlSigner { key: <redacted> }")
    }
}

impl UrlSigner {
    /// Any key length works; 32 random bytes is the sensible choice.
    pub fn new(key: &[u8]) -> UrlSigner {
        // RFC 2104: a key longer than the block is hashed, a shorter one is zero-padded. Doing
        // it here lets us use the infallible `KeyInit::new`; the MAC is the same.
        let mut block = [0_u8; KEY_BLOCK_BYTES];
        if key.len() > KEY_BLOCK_BYTES {
            let digest = Sha256::digest(key);
            block
                .iter_mut()
                .zip(digest.iter())
                .for_each(|(to, from)| *to = *from);
        } else {
            block.iter_mut().zip(key).for_each(|(to, from)| *to = *from);
        }
        UrlSigner {
            mac: <Hmac<Sha256> as KeyInit>::new(&block.into()),
        }
    }

    /// The query parameters that make `path` (normalised) valid until `expires_unix_s`:
    /// `expires=<seconds>&signature=<hex>`.
    pub fn sign(&self, path: &str, expires_unix_s: u64) -> String {
        let tag = self.keyed(path, expires_unix_s).finalize().into_bytes();
        let mut query = format!("expires={expires_unix_s}&signature=");
        for byte in tag {
            query.push_str(&format!("{byte:02x}"));
        }
        query
    }

    /// Checks the `expires` and `signature` parameters of `query` for `path` (normalised).
    /// The signature is checked before the time, so `Expired` only ever names a genuine URL.
    pub fn verify(
        &self,
        path: &str,
        query: Option<&str>,
        now_unix_s: u64,
    ) -> Result<(), SignedUrlError> {
        let token = Token::from_query(query.unwrap_or_default())?;
        self.keyed(path, token.expires_unix_s)
            .verify_slice(&token.signature)
            .map_err(|_| SignedUrlError::BadSignature)?;
        if now_unix_s > token.expires_unix_s {
            return Err(SignedUrlError::Expired);
        }
        Ok(())
    }

    fn keyed(&self, path: &str, expires_unix_s: u64) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(path.as_bytes());
        mac.update(b"\n");
        mac.update(expires_unix_s.to_string().as_bytes());
        mac
    }
}

/// The two parameters, parsed.
struct Token {
    expires_unix_s: u64,
    signature: [u8; 32],
}

impl Token {
    fn from_query(query: &str) -> Result<Token, SignedUrlError> {
        let mut expires = None;
        let mut signature = None;
        for parameter in query.split('&') {
            let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            let slot = match name {
                "expires" => &mut expires,
                "signature" => &mut signature,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SignedUrlError::Malformed);
            }
        }
        let (Some(expires), Some(signature)) = (expires, signature) else {
            return Err(SignedUrlError::Missing);
        };
        Ok(Token {
            expires_unix_s: parse_expires(expires).ok_or(SignedUrlError::Malformed)?,
            signature: parse_signature(signature).ok_or(SignedUrlError::Malformed)?,
        })
    }
}

/// Canonical decimal only (what `sign` writes), so one URL has exactly one signed form.
fn parse_expires(text: &str) -> Option<u64> {
    let canonical = !text.is_empty()
        && text.bytes().all(|byte| byte.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return None;
    }
    text.parse().ok()
}

fn parse_signature(text: &str) -> Option<[u8; 32]> {
    if text.len() != SIGNATURE_HEX_BYTES {
        return None;
    }
    let mut signature = [0_u8; 32];
    for (byte, pair) in signature.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let high = hex_digit(*pair.first()?)?;
        let low = hex_digit(*pair.get(1)?)?;
        *byte = (high << 4) | low;
    }
    Some(signature)
}

fn hex_digit(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"steering-shared-secret-0123456789";
    const PATH: &str = "/video/a/seg-00042.m4s";
    const EXPIRES: u64 = 1_767_225_600;

    fn check(
        path: &str,
        query: Option<&str>,
        now_unix_s: u64,
        expected: Result<(), SignedUrlError>,
    ) {
        let actual = UrlSigner::new(KEY).verify(path, query, now_unix_s);
        assert_eq!(actual, expected, "{path} {query:?} at {now_unix_s}");
    }

    #[test]
    fn verify() {
        use SignedUrlError::{BadSignature, Expired, Malformed, Missing};
        let good = UrlSigner::new(KEY).sign(PATH, EXPIRES);
        let signature = good
            .split_once("&signature=")
            .map_or("", |(_, hex)| hex)
            .to_owned();
        let other_key = UrlSigner::new(b"another key").sign(PATH, EXPIRES);
        let with =
            |expires: &str, signature: &str| format!("expires={expires}&signature={signature}");
        let later = (EXPIRES + 1).to_string();
        type Case = (
            &'static str,
            Option<String>,
            u64,
            Result<(), SignedUrlError>,
        );
        let cases: Vec<Case> = vec![
            (PATH, Some(good.clone()), EXPIRES - 3600, Ok(())),
            (PATH, Some(good.clone()), EXPIRES, Ok(())),
            (PATH, Some(good.clone()), EXPIRES + 1, Err(Expired)),
            (PATH, Some(format!("a=1&{good}&b&c=")), EXPIRES, Ok(())),
            (
                PATH,
                Some(format!("signature={signature}&expires={EXPIRES}")),
                EXPIRES,
                Ok(()),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), &signature.to_uppercase())),
                EXPIRES,
                Ok(()),
            ),
            (PATH, None, EXPIRES, Err(Missing)),
            (PATH, Some(String::new()), EXPIRES, Err(Missing)),
            (
                PATH,
                Some(format!("expires={EXPIRES}")),
                EXPIRES,
                Err(Missing),
            ),
            (
                PATH,
                Some(format!("signature={signature}")),
                EXPIRES,
                Err(Missing),
            ),
            (
                PATH,
                Some(format!("Expires={EXPIRES}&signature={signature}")),
                EXPIRES,
                Err(Missing),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), &"z".repeat(64))),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), &signature[..62])),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), "")),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), "é".repeat(32).as_str())),
                0,
                Err(Malformed),
            ),
            (PATH, Some(with("", &signature)), EXPIRES, Err(Malformed)),
            (PATH, Some(with("-1", &signature)), EXPIRES, Err(Malformed)),
            (
                PATH,
                Some(with(&format!("0{EXPIRES}"), &signature)),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(with("99999999999999999999", &signature)),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(format!("{good}&expires={EXPIRES}")),
                EXPIRES,
                Err(Malformed),
            ),
            (
                PATH,
                Some(format!("{good}&{good}")),
                EXPIRES,
                Err(Malformed),
            ),
            (PATH, Some(other_key), EXPIRES, Err(BadSignature)),
            (
                "/video/a/seg-00043.m4s",
                Some(good.clone()),
                EXPIRES,
                Err(BadSignature),
            ),
            (
                "/video/a/seg-00042.m4",
                Some(good.clone()),
                EXPIRES,
                Err(BadSignature),
            ),
            (
                PATH,
                Some(with(&later, &signature)),
                EXPIRES,
                Err(BadSignature),
            ),
            (
                PATH,
                Some(with(&later, &signature)),
                EXPIRES + 2,
                Err(BadSignature),
            ),
            (
                PATH,
                Some(with(&EXPIRES.to_string(), &"0".repeat(64))),
                EXPIRES,
                Err(BadSignature),
            ),
        ];
        for (path, query, now_unix_s, expected) in cases {
            check(path, query.as_deref(), now_unix_s, expected);
        }
    }

    #[test]
    fn sign_format() {
        let query = UrlSigner::new(KEY).sign("/a", 0);
        let hex = query
            .strip_prefix("expires=0&signature=")
            .unwrap_or_default();
        assert_eq!(hex.len(), 64, "{query}");
        assert!(
            hex.bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')),
            "{query}"
        );
        assert_eq!(
            format!("{:?}", UrlSigner::new(KEY)),
            "UrlSigner { key: <redacted> }"
        );
    }

    /// The key is padded or hashed to a block by hand; check against RFC 4231 and against
    /// `hmac`'s own handling of every key length around the block size.
    #[test]
    fn hmac_matches_reference() {
        let hex = |bytes: &[u8]| {
            bytes
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        };
        let cases: &[(Vec<u8>, &[u8], &str)] = &[
            (
                vec![0x0b; 20],
                b"Hi There",
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (key, message, expected) in cases {
            let mut mac = UrlSigner::new(key).mac;
            mac.update(message);
            assert_eq!(hex(&mac.finalize().into_bytes()), *expected);
        }
        for key_bytes in [0, 1, 32, 63, 64, 65, 200] {
            let key = vec![0x5a; key_bytes];
            let mut ours = UrlSigner::new(&key).mac;
            let mut reference =
                <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
            ours.update(b"message");
            reference.update(b"message");
            assert_eq!(
                ours.finalize().into_bytes(),
                reference.finalize().into_bytes()
            );
        }
    }
}
