//! Owns the libFuzzer target for the fill manifest decoder, `appliance_fill::manifest::
//! parse_manifest`: it must never panic; an accepted manifest must obey every rule of the
//! format (docs/manifest.md), survive a re-encode and parse unchanged, and every path it
//! accepts must be servable: percent-encoded into a request line, serving's `parse_request`
//! decodes it back to the same path.
//!
//! Input: the first byte picks the mode (even: the rest is the manifest's raw bytes; odd: the
//! rest, split at 0xFF bytes, gives the paths of a well-formed manifest, so the fuzzer spends
//! its time on path validation instead of on JSON syntax).

#![no_main]
#![forbid(unsafe_code)]

use appliance_fill::manifest::{
    parse_manifest, sha256_hex, Manifest, FILES_MAX, FILE_SIZE_BYTES_MAX, MANIFEST_VERSION,
    PATH_BYTES_MAX,
};
use appliance_serve::http::{parse_request, Limits, Parse};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let document = if mode % 2 == 0 {
        bytes.to_vec()
    } else {
        manifest_around_paths(bytes).into_bytes()
    };
    let Ok(manifest) = parse_manifest(&document) else {
        return;
    };
    check_rules(&manifest);
    let again = parse_manifest(encode(&manifest).as_bytes()).expect("a re-encoded manifest parses");
    assert_eq!(again, manifest, "manifest round trip");
    for file in &manifest.files {
        check_servable(&file.path);
    }
});

/// A well-formed manifest whose paths are the 0xFF-separated pieces of `bytes` (as UTF-8,
/// lossily), with sizes and ranks taken from the pieces' lengths.
fn manifest_around_paths(bytes: &[u8]) -> String {
    let rows: Vec<String> = bytes
        .split(|&byte| byte == 0xFF)
        .enumerate()
        .map(|(number, piece)| {
            let path = String::from_utf8_lossy(piece);
            format!(
                "{{\"path\":{},\"size_bytes\":{},\"sha256\":\"{}\",\"rank\":{}}}",
                serde_json::to_string(&path).expect("strings encode"),
                piece.len() * 1000,
                sha256_hex(&[u8::try_from(number % 256).expect("< 256"); 32]),
                number + 1
            )
        })
        .collect();
    format!(
        "{{\"version\":1,\"generated_at\":\"2026-11-23T02:00:00Z\",\"files\":[{}]}}",
        rows.join(",")
    )
}

/// The rules of the format, checked on what the decoder accepted.
fn check_rules(manifest: &Manifest) {
    assert_eq!(manifest.version, MANIFEST_VERSION);
    assert!(manifest.files.len() <= FILES_MAX);
    let mut seen = HashSet::new();
    for file in &manifest.files {
        let path = file.path.as_str();
        assert!(path.starts_with('/'), "{path:?}");
        assert!(path.len() <= PATH_BYTES_MAX, "{path:?}");
        assert!(!path.chars().any(char::is_control), "{path:?}");
        assert!(!path.contains('\\') && !path.ends_with('/'), "{path:?}");
        assert!(
            path[1..]
                .split('/')
                .all(|segment| !matches!(segment, "" | "." | "..")),
            "{path:?}"
        );
        assert!(seen.insert(path), "duplicate {path:?}");
        assert!(file.size_bytes <= FILE_SIZE_BYTES_MAX);
        assert!(file.rank >= 1);
    }
}

/// The manifest in the documented format (the decoder must accept what it describes).
fn encode(manifest: &Manifest) -> String {
    let rows: Vec<String> = manifest
        .files
        .iter()
        .map(|file| {
            format!(
                "{{\"path\":{},\"size_bytes\":{},\"sha256\":\"{}\",\"rank\":{}}}",
                serde_json::to_string(&file.path).expect("strings encode"),
                file.size_bytes,
                sha256_hex(&file.sha256),
                file.rank
            )
        })
        .collect();
    format!(
        "{{\"version\":{},\"generated_at\":{},\"files\":[{}]}}",
        manifest.version,
        serde_json::to_string(&manifest.generated_at).expect("strings encode"),
        rows.join(",")
    )
}

/// A client asking for `path` (every byte but unreserved ones and '/' percent-encoded) gets
/// it: serving decodes the request line back to exactly the manifest's path.
fn check_servable(path: &str) {
    let mut target = String::with_capacity(path.len() * 3);
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-._~".contains(&byte) {
            target.push(char::from(byte));
        } else {
            target.push_str(&format!("%{byte:02X}"));
        }
    }
    let request = format!("GET {target} HTTP/1.1\r\nHost: appliance\r\n\r\n");
    let limits = Limits {
        request_line_bytes_max: 16 * 1024,
        header_bytes_max: 32 * 1024,
        ..Limits::default()
    };
    match parse_request(request.as_bytes(), &limits) {
        Ok(Parse::Complete { head, .. }) => {
            assert_eq!(head.path, path, "serving decodes {target:?} to another path")
        }
        other => panic!("a manifest path is not servable: {path:?} as {target:?}: {other:?}"),
    }
}
