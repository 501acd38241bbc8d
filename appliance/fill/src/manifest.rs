//! The fill manifest: parsing and validating the JSON document the operator's control plane
//! publishes. Pure: takes bytes, returns a `Manifest` or the first problem with its location;
//! must not fetch, read files or look at the store.
//!
//! # Format (version 1)
//!
//! ```json
//! {
//!   "version": 1,
//!   "generated_at": "2026-11-23T02:00:00Z",
//!   "files": [
//!     { "path": "/title/1080p.mp4", "size_bytes": 123456,
//!       "sha256": "<64 hexadecimal digits>", "rank": 1 }
//!   ]
//! }
//! ```
//!
//! - The document is one UTF-8 JSON object with exactly the fields `version`, `generated_at`
//!   and `files`; each file is an object with exactly `path`, `size_bytes`, `sha256` and
//!   `rank`. A field the box does not know is refused (a newer control plane must raise
//!   `version` rather than add fields an older box would silently ignore).
//! - `version`: the integer `1`. Any other value is refused.
//! - `generated_at`: when the control plane produced the manifest, an RFC 3339 timestamp with
//!   a UTC offset (`2026-11-23T02:00:00Z`, `2026-11-23T03:00:00+01:00`). Kept as given and
//!   reported by `status`; the box does not compare it with its clock.
//! - `files`: at most 10 000 000 entries, in any order.
//! - `path`: the content path clients request over HTTP, **decoded** (no percent-encoding: a
//!   `%` in the manifest is a literal `%`, which a client requests as `%25`). It starts with
//!   `/`, is at most 1024 bytes of UTF-8, contains no control character (NUL included) and no
//!   backslash, and has no empty (`//`), `.` or `..` segment and no trailing `/`. Each path
//!   appears once.
//! - `size_bytes`: the file's exact size, an integer from 0 to 2^40 (1 TiB).
//! - `sha256`: the SHA-256 of the file's bytes, 64 hexadecimal digits (either case).
//! - `rank`: popularity, an integer from 1 (most popular); files are filled in rank order and,
//!   when space is short, the least popular ones are left out. Ranks need not be unique.
//!
//! The manifest is accepted or refused as a whole: the first problem refuses it, with its
//! location (`files[12].sha256`, or `line 3 column 5` for malformed JSON). An error quotes at
//! most `EXCERPT_CHARS_MAX` characters of any piece of the manifest, with control and
//! direction-changing characters escaped, so a hostile manifest cannot flood or forge logs.

use serde::de::value::MapAccessDeserializer;
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

pub const MANIFEST_VERSION: u32 = 1;
/// 1 TiB: a larger file is absurd for a video cache and a sign of a broken manifest.
pub const FILE_SIZE_BYTES_MAX: u64 = 1 << 40;
pub const FILES_MAX: usize = 10_000_000;
/// The longest path a manifest may name, in bytes.
pub const PATH_BYTES_MAX: usize = 1024;
/// The most characters of outside text (manifest content, a header) an error message quotes.
pub const EXCERPT_CHARS_MAX: usize = 40;
/// The longest error message, in characters, once its quotes are shortened.
pub const MESSAGE_CHARS_MAX: usize = 300;

const _: () = assert!(PATH_BYTES_MAX <= appliance_store::layout::PATH_BYTES_MAX);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
    /// 1 = most popular.
    pub rank: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    /// RFC 3339, as given.
    pub generated_at: String,
    pub files: Vec<ManifestFile>,
}

/// Why a manifest was refused: where (`files[12].sha256`, `line 3 column 5`) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub location: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

impl std::error::Error for ManifestError {}

fn error(location: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        location: location.into(),
        message: shorten_quotes(&message.into()),
    }
}

/// Outside text made safe to quote in a message or a log: at most `limit` characters (then
/// `…`), control and direction-changing characters escaped (`\u{1b}`).
fn escaped_prefix(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit * 4));
    for (count, character) in text.chars().enumerate() {
        if count == limit {
            out.push('…');
            break;
        }
        let invisible = matches!(character,
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if character.is_control() || invisible {
            out.extend(character.escape_default());
        } else {
            out.push(character);
        }
    }
    out
}

/// A short excerpt of outside text: at most `EXCERPT_CHARS_MAX` characters, escaped.
pub fn excerpt(text: &str) -> String {
    escaped_prefix(text, EXCERPT_CHARS_MAX)
}

/// Shortens every quoted piece (between backticks or double quotes, as serde quotes what it
/// read) to an excerpt, escapes what is left, and caps the whole at `MESSAGE_CHARS_MAX`.
fn shorten_quotes(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MESSAGE_CHARS_MAX * 2));
    let mut rest = message;
    while let Some(start) = rest.find(['`', '"']) {
        let quote = if rest[start..].starts_with('`') {
            '`'
        } else {
            '"'
        };
        out.push_str(&rest[..start]);
        out.push(quote);
        let body = &rest[start + 1..];
        let end = closing_quote(body, quote).unwrap_or(body.len());
        out.push_str(&excerpt(&body[..end]));
        rest = &body[end..];
        if let Some(after) = rest.strip_prefix(quote) {
            out.push(quote);
            rest = after;
        }
    }
    out.push_str(rest);
    escaped_prefix(&out, MESSAGE_CHARS_MAX)
}

/// Where `quote` closes in `body`; a backslash escapes the next character inside `"`.
fn closing_quote(body: &str, quote: char) -> Option<usize> {
    let mut escaped = false;
    for (at, character) in body.char_indices() {
        match character {
            '\\' if quote == '"' && !escaped => escaped = true,
            found if found == quote && !escaped => return Some(at),
            _ => escaped = false,
        }
    }
    None
}

/// Parses and validates a manifest; refuses it as a whole on the first problem.
pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    parse_manifest_limited::<FILES_MAX>(bytes)
}

/// `parse_manifest` with the file-count limit as a parameter, so tests can reach it.
fn parse_manifest_limited<const FILES_LIMIT: usize>(
    bytes: &[u8],
) -> Result<Manifest, ManifestError> {
    let Object(raw): Object<RawManifest<FILES_LIMIT>> =
        serde_json::from_slice(bytes).map_err(|json_error| {
            let location = format!("line {} column {}", json_error.line(), json_error.column());
            let message = json_error.to_string();
            // serde_json appends " at line L column C"; the location already says it.
            let message = match message.rfind(" at line ") {
                Some(cut) => message.get(..cut).unwrap_or(&message).to_string(),
                None => message,
            };
            error(location, message)
        })?;
    let version = u32::try_from(raw.version)
        .ok()
        .filter(|version| *version == MANIFEST_VERSION)
        .ok_or_else(|| {
            error(
                "version",
                format!("unsupported manifest version {}", raw.version),
            )
        })?;
    if let Err(parse_error) = raw.generated_at.parse::<jiff::Timestamp>() {
        return Err(error(
            "generated_at",
            format!("not an RFC 3339 timestamp: {parse_error}"),
        ));
    }
    if raw.files.count > FILES_LIMIT {
        return Err(error(
            "files",
            format!(
                "{} files, more than the limit of {FILES_LIMIT}",
                raw.files.count
            ),
        ));
    }
    let files = validate_files(raw.files.files)?;
    Ok(Manifest {
        version,
        generated_at: raw.generated_at,
        files,
    })
}

fn validate_files(raw_files: Vec<RawFile>) -> Result<Vec<ManifestFile>, ManifestError> {
    let mut first_index: HashMap<&str, usize> = HashMap::with_capacity(raw_files.len());
    let mut digests = Vec::with_capacity(raw_files.len());
    for (index, raw) in raw_files.iter().enumerate() {
        let location = |field: &str| format!("files[{index}].{field}");
        check_path(&raw.path).map_err(|message| error(location("path"), message))?;
        if let Some(first) = first_index.insert(raw.path.as_str(), index) {
            return Err(error(
                location("path"),
                format!("duplicate path, first at files[{first}]"),
            ));
        }
        if raw.size_bytes > FILE_SIZE_BYTES_MAX {
            return Err(error(
                location("size_bytes"),
                format!(
                    "{} bytes is more than the limit of {FILE_SIZE_BYTES_MAX} (1 TiB)",
                    raw.size_bytes
                ),
            ));
        }
        let digest =
            parse_sha256_hex(&raw.sha256).map_err(|message| error(location("sha256"), message))?;
        digests.push(digest);
        if raw.rank == 0 {
            return Err(error(location("rank"), "rank must be at least 1"));
        }
    }
    drop(first_index);
    let files = raw_files
        .into_iter()
        .zip(digests)
        .map(|(raw, sha256)| ManifestFile {
            path: raw.path,
            size_bytes: raw.size_bytes,
            sha256,
            rank: raw.rank,
        })
        .collect();
    Ok(files)
}

/// Checks a content path against the rules in the module documentation.
fn check_path(path: &str) -> Result<(), String> {
    let Some(relative) = path.strip_prefix('/') else {
        return Err("path must start with '/'".into());
    };
    if path.len() > PATH_BYTES_MAX {
        return Err(format!(
            "path of {} bytes is longer than the limit of {PATH_BYTES_MAX}",
            path.len()
        ));
    }
    if let Some(control) = path.chars().find(|c| c.is_control()) {
        return Err(format!(
            "path contains the control character U+{:04X}",
            u32::from(control)
        ));
    }
    if path.contains('\\') {
        return Err("path contains a backslash".into());
    }
    if path.ends_with('/') {
        return Err("path ends with '/'".into());
    }
    for segment in relative.split('/') {
        match segment {
            "" => return Err("path has an empty segment ('//')".into()),
            "." => return Err("path has a '.' segment".into()),
            ".." => return Err("path has a '..' segment".into()),
            _ => {}
        }
    }
    Ok(())
}

/// 64 hexadecimal digits, either case, to 32 bytes.
fn parse_sha256_hex(text: &str) -> Result<[u8; 32], String> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return Err(format!(
            "expected 64 hexadecimal digits, found {} bytes",
            digits.len()
        ));
    }
    let mut sha256 = [0u8; 32];
    for (index, (byte, pair)) in sha256.iter_mut().zip(digits.chunks_exact(2)).enumerate() {
        let mut value = 0u8;
        for (offset, digit) in pair.iter().enumerate() {
            let Some(nibble) = hex_value(*digit) else {
                return Err(format!(
                    "not a hexadecimal digit at position {}",
                    index * 2 + offset
                ));
            };
            value = (value << 4) | nibble;
        }
        *byte = value;
    }
    Ok(sha256)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hexadecimal, as the manifest and logs spell a SHA-256.
pub fn sha256_hex(sha: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(64);
    for byte in sha {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest<const FILES_LIMIT: usize> {
    /// Wider than `MANIFEST_VERSION` so that any integer is reported as an unsupported version.
    version: u64,
    generated_at: String,
    files: RawFiles<FILES_LIMIT>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    size_bytes: u64,
    sha256: String,
    rank: u64,
}

/// The `files` array, holding at most `FILES_LIMIT` entries in memory; entries past the limit
/// are skipped and only counted, so an oversized manifest cannot exhaust memory.
struct RawFiles<const FILES_LIMIT: usize> {
    files: Vec<RawFile>,
    count: usize,
}

impl<'de, const FILES_LIMIT: usize> Deserialize<'de> for RawFiles<FILES_LIMIT> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(RawFilesVisitor::<FILES_LIMIT>)
    }
}

struct RawFilesVisitor<const FILES_LIMIT: usize>;

impl<'de, const FILES_LIMIT: usize> Visitor<'de> for RawFilesVisitor<FILES_LIMIT> {
    type Value = RawFiles<FILES_LIMIT>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of files")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut files = Vec::new();
        while files.len() < FILES_LIMIT {
            match seq.next_element::<Object<RawFile>>()? {
                Some(Object(file)) => files.push(file),
                None => {
                    let count = files.len();
                    return Ok(RawFiles { files, count });
                }
            }
        }
        let mut count = files.len();
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count = count.saturating_add(1);
        }
        Ok(RawFiles { files, count })
    }
}

/// A `T` that must be a JSON object: serde's derived structs also accept an array of the
/// field values in order, which a manifest must not be.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = Object<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(Object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const SHA_B: &str = "2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824";

    fn sha(text: &str) -> [u8; 32] {
        parse_sha256_hex(text).expect("test digest")
    }

    fn file_json(path: &str, size_bytes: &str, sha256: &str, rank: &str) -> String {
        format!(
            concat!(
                r#"{{"path": "{path}", "size_bytes": {size_bytes}, "#,
                r#""sha256": "{sha256}", "rank": {rank}}}"#
            ),
            path = path,
            size_bytes = size_bytes,
            sha256 = sha256,
            rank = rank,
        )
    }

    fn manifest_json(version: &str, generated_at: &str, files: &[String]) -> String {
        format!(
            r#"{{"version": {version}, "generated_at": "{generated_at}", "files": [{}]}}"#,
            files.join(",\n")
        )
    }

    fn one_file(path: &str, size_bytes: &str, sha256: &str, rank: &str) -> String {
        manifest_json(
            "1",
            "2026-11-23T02:00:00Z",
            &[file_json(path, size_bytes, sha256, rank)],
        )
    }

    fn valid_file(path: &str) -> String {
        file_json(path, "10", SHA_A, "1")
    }

    fn fails(location: &str, message: &str) -> Result<Manifest, ManifestError> {
        Err(error(location, message))
    }

    fn check(input: &str, expected: Result<Manifest, ManifestError>) {
        let actual = parse_manifest(input.as_bytes());
        assert_eq!(actual, expected, "input: {input}");
    }

    #[test]
    fn parse_valid() {
        let files = [
            file_json("/title/1080p.mp4", "123456", SHA_A, "1"),
            file_json("/title/720p.mp4", "0", SHA_B, "1"),
            file_json(
                "/other/a%20b.m4s",
                "1099511627776",
                SHA_A,
                "18446744073709551615",
            ),
        ];
        check(
            &manifest_json("1", "2026-11-23T03:00:00+01:00", &files),
            Ok(Manifest {
                version: 1,
                generated_at: "2026-11-23T03:00:00+01:00".into(),
                files: vec![
                    ManifestFile {
                        path: "/title/1080p.mp4".into(),
                        size_bytes: 123_456,
                        sha256: sha(SHA_A),
                        rank: 1,
                    },
                    ManifestFile {
                        path: "/title/720p.mp4".into(),
                        size_bytes: 0,
                        sha256: sha(SHA_B),
                        rank: 1,
                    },
                    ManifestFile {
                        path: "/other/a%20b.m4s".into(),
                        size_bytes: FILE_SIZE_BYTES_MAX,
                        sha256: sha(SHA_A),
                        rank: u64::MAX,
                    },
                ],
            }),
        );
        check(
            &manifest_json("1", "2026-11-23T02:00:00Z", &[]),
            Ok(Manifest {
                version: 1,
                generated_at: "2026-11-23T02:00:00Z".into(),
                files: vec![],
            }),
        );
    }

    #[test]
    fn parse_document_errors() {
        check("", fails("line 1 column 0", "EOF while parsing a value"));
        check(
            r#"{"version": 1, "generated_at": "2026-11-23T02:00:00Z", "files": [{"path": "/a""#,
            fails("line 1 column 78", "EOF while parsing an object"),
        );
        check(
            "[1, 2]",
            fails(
                "line 1 column 0",
                "invalid type: sequence, expected a JSON object",
            ),
        );
        check(
            "\"text\"",
            fails(
                "line 1 column 6",
                "invalid type: string \"text\", expected a JSON object",
            ),
        );
        check(
            &format!("{} x", manifest_json("1", "2026-11-23T02:00:00Z", &[])),
            fails("line 1 column 69", "trailing characters"),
        );
        check(
            r#"{"version": 1, "generated_at": "2026-11-23T02:00:00Z"}"#,
            fails("line 1 column 54", "missing field `files`"),
        );
        check(
            r#"{"version": 1, "generated_at": "2026-11-23T02:00:00Z", "files": [], "extra": 1}"#,
            fails(
                "line 1 column 75",
                "unknown field `extra`, expected one of `version`, `generated_at`, `files`",
            ),
        );
        check(
            &one_file("/a", "1", SHA_A, "1").replace("\"rank\"", "\"owner\": \"x\", \"rank\""),
            fails(
                "line 1 column 182",
                "unknown field `owner`, expected one of `path`, `size_bytes`, `sha256`, `rank`",
            ),
        );
        check(
            &manifest_json(
                "1",
                "2026-11-23T02:00:00Z",
                &[r#"["/a", 1, "x", 1]"#.into()],
            ),
            fails(
                "line 1 column 65",
                "invalid type: sequence, expected a JSON object",
            ),
        );
        check(
            r#"{
  "version": 1,
  "generated_at": "2026-11-23T02:00:00Z",
  "files": [
    {"path": "/a"
  ]
}"#,
            fails("line 6 column 3", "expected `,` or `}`"),
        );
        let invalid_utf8 = [
            b"{\"version\": 1, \"generated_at\": \"".as_slice(),
            &[0xff],
            b"\"}",
        ];
        assert_eq!(
            parse_manifest(&invalid_utf8.concat()),
            fails("line 1 column 33", "invalid unicode code point"),
        );
    }

    #[test]
    fn parse_version_and_time() {
        let files = [valid_file("/a")];
        check(
            &manifest_json("2", "2026-11-23T02:00:00Z", &files),
            fails("version", "unsupported manifest version 2"),
        );
        check(
            &manifest_json("0", "2026-11-23T02:00:00Z", &files),
            fails("version", "unsupported manifest version 0"),
        );
        check(
            &manifest_json("4294967297", "2026-11-23T02:00:00Z", &files),
            fails("version", "unsupported manifest version 4294967297"),
        );
        check(
            &manifest_json("-1", "2026-11-23T02:00:00Z", &files),
            fails(
                "line 1 column 14",
                "invalid value: integer `-1`, expected u64",
            ),
        );
        check(
            &manifest_json("1.0", "2026-11-23T02:00:00Z", &files),
            fails(
                "line 1 column 15",
                "invalid type: floating point `1.0`, expected u64",
            ),
        );
        for bad_time in [
            "",
            "yesterday",
            "2026-11-23T02:00:00",
            "2026-13-01T00:00:00Z",
        ] {
            let actual = parse_manifest(manifest_json("1", bad_time, &files).as_bytes());
            let actual_error = actual.expect_err(bad_time);
            assert_eq!(actual_error.location, "generated_at", "{bad_time}");
            assert!(
                actual_error
                    .message
                    .starts_with("not an RFC 3339 timestamp: "),
                "{bad_time}: {actual_error}"
            );
        }
    }

    #[test]
    fn parse_paths() {
        let long_path = format!("/{}", "x".repeat(PATH_BYTES_MAX - 1));
        let too_long_path = format!("/{}", "x".repeat(PATH_BYTES_MAX));
        check(
            &one_file(&long_path, "1", SHA_A, "1"),
            Ok(Manifest {
                version: 1,
                generated_at: "2026-11-23T02:00:00Z".into(),
                files: vec![ManifestFile {
                    path: long_path,
                    size_bytes: 1,
                    sha256: sha(SHA_A),
                    rank: 1,
                }],
            }),
        );
        let cases = [
            (
                too_long_path.as_str(),
                "path of 1025 bytes is longer than the limit of 1024",
            ),
            ("", "path must start with '/'"),
            ("title/a.mp4", "path must start with '/'"),
            ("/", "path ends with '/'"),
            ("/title/", "path ends with '/'"),
            ("/title//a.mp4", "path has an empty segment ('//')"),
            ("//a.mp4", "path has an empty segment ('//')"),
            ("/title/./a.mp4", "path has a '.' segment"),
            ("/.", "path has a '.' segment"),
            ("/title/../a.mp4", "path has a '..' segment"),
            ("/..", "path has a '..' segment"),
            ("/title\\\\a.mp4", "path contains a backslash"),
            ("/a\\u0000b", "path contains the control character U+0000"),
            ("/a\\nb", "path contains the control character U+000A"),
            ("/a\\u007fb", "path contains the control character U+007F"),
            ("/a\\u0085b", "path contains the control character U+0085"),
        ];
        for (path, message) in cases {
            check(
                &one_file(path, "1", SHA_A, "1"),
                fails("files[0].path", message),
            );
        }
        let files = [valid_file("/a"), valid_file("/b"), valid_file("/a")];
        check(
            &manifest_json("1", "2026-11-23T02:00:00Z", &files),
            fails("files[2].path", "duplicate path, first at files[0]"),
        );
    }

    #[test]
    fn parse_numbers_and_digests() {
        check(
            &one_file("/a", "1099511627777", SHA_A, "1"),
            fails(
                "files[0].size_bytes",
                "1099511627777 bytes is more than the limit of 1099511627776 (1 TiB)",
            ),
        );
        check(
            &one_file("/a", "18446744073709551616", SHA_A, "1"),
            fails(
                "line 1 column 114",
                "invalid type: floating point `1.8446744073709552e+19`, expected u64",
            ),
        );
        check(
            &one_file("/a", "-5", SHA_A, "1"),
            fails(
                "line 1 column 96",
                "invalid value: integer `-5`, expected u64",
            ),
        );
        check(
            &one_file("/a", "1e3", SHA_A, "1"),
            fails(
                "line 1 column 97",
                "invalid type: floating point `1000.0`, expected u64",
            ),
        );
        check(
            &one_file("/a", "\"5\"", SHA_A, "1"),
            fails(
                "line 1 column 97",
                "invalid type: string \"5\", expected u64",
            ),
        );
        check(
            &one_file("/a", "1", SHA_A, "0"),
            fails("files[0].rank", "rank must be at least 1"),
        );
        check(
            &one_file("/a", "1", SHA_A, "-1"),
            fails(
                "line 1 column 185",
                "invalid value: integer `-1`, expected u64",
            ),
        );
        let digest_cases = [
            (
                &SHA_A[..63],
                "expected 64 hexadecimal digits, found 63 bytes",
            ),
            ("", "expected 64 hexadecimal digits, found 0 bytes"),
            (
                &format!("{SHA_A}0")[..],
                "expected 64 hexadecimal digits, found 65 bytes",
            ),
            (
                &format!("{}g", &SHA_A[..63])[..],
                "not a hexadecimal digit at position 63",
            ),
            (
                &format!("é{}", &SHA_A[..62])[..],
                "not a hexadecimal digit at position 0",
            ),
            (
                &format!(" {}", &SHA_A[..63])[..],
                "not a hexadecimal digit at position 0",
            ),
        ];
        for (digest, message) in digest_cases {
            check(
                &one_file("/a", "1", digest, "1"),
                fails("files[0].sha256", message),
            );
        }
    }

    #[test]
    fn parse_file_count_limit() {
        let manifest = |count: usize| {
            let files: Vec<String> = (0..count).map(|n| valid_file(&format!("/f{n}"))).collect();
            manifest_json("1", "2026-11-23T02:00:00Z", &files)
        };
        let parse = |count: usize| {
            parse_manifest_limited::<3>(manifest(count).as_bytes()).map(|m| m.files.len())
        };
        assert_eq!(parse(3), Ok(3));
        assert_eq!(
            parse(5),
            Err(error("files", "5 files, more than the limit of 3"))
        );
    }

    #[test]
    fn errors_quote_only_short_escaped_excerpts() {
        let long = "A".repeat(1 << 20);
        let cases = [
            format!(r#"{{"{long}": 1}}"#),
            format!(r#"{{"version": "{long}"}}"#),
            format!(r#"{{"version": 1, "generated_at": "{long}", "files": []}}"#),
            r#"{"\u001b[31mred\u202e": 1}"#.to_string(),
            format!("{{\"version\": 1, \"generated_at\": \"x\", \"files\": [{{\"pa\\\"th{long}\": 1}}]}}"),
        ];
        for input in cases {
            let refused = parse_manifest(input.as_bytes()).expect_err("refused");
            let message = refused.message.clone();
            assert!(
                message.chars().count() <= MESSAGE_CHARS_MAX + 1,
                "{} characters",
                message.len()
            );
            assert!(
                !message.contains(&"A".repeat(EXCERPT_CHARS_MAX + 1)),
                "{message}"
            );
            assert!(
                !message.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{message:?}"
            );
        }
        let refused = parse_manifest(br#"{"\u001b[31m": 1}"#).expect_err("refused");
        assert_eq!(
            refused.message,
            "unknown field `\\u{1b}[31m`, expected one of `version`, `generated_at`, `files`"
        );
        let refused = parse_manifest(format!(r#"{{"{long}": 1}}"#).as_bytes()).expect_err("x");
        assert!(
            refused.message.starts_with(&format!(
                "unknown field `{}…`, expected one of",
                "A".repeat(EXCERPT_CHARS_MAX)
            )),
            "{}",
            refused.message
        );
        assert_eq!(excerpt("a\nb"), "a\\nb");
        assert_eq!(
            excerpt(&"é".repeat(50)),
            format!("{}…", "é".repeat(EXCERPT_CHARS_MAX))
        );
    }

    #[test]
    fn display_and_hex() {
        assert_eq!(
            error("files[12].sha256", "bad").to_string(),
            "files[12].sha256: bad"
        );
        assert_eq!(sha256_hex(&sha(SHA_A)), SHA_A);
        assert_eq!(sha256_hex(&sha(SHA_B)), SHA_B.to_ascii_lowercase());
        assert_eq!(sha256_hex(&[0; 32]), "0".repeat(64));
    }
}
