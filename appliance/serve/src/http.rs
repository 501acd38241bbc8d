//! HTTP/1.1 request heads, representation selection (conditionals and byte ranges) and response
//! heads (RFC 9110, RFC 9112): pure functions over bytes and values. Must not do I/O, hold
//! state between calls, read request bodies, contain `unsafe`, or panic on any input.
//!
//! Choices a reader of the RFCs would want to know:
//! - Every request is answered `HTTP/1.1` (RFC 9110 §2.5), whatever minor version it used.
//! - A request with a body is refused (400); the caller closes the connection after the answer.
//! - `httparse` recognises only `HTTP/1.x`; a request line ending in another `HTTP/d.d` is
//!   answered 505, any other version token 400.
//! - The path is percent-decoded and normalised here, once: no `..` is ever resolved, empty
//!   and `.` segments disappear (so `/a/b/` becomes `/a/b`), and the result has no NUL,
//!   backslash or control character. Signed URLs are computed over this normalised path.
//! - A request with more than one range is answered with the full representation (200), which
//!   RFC 9110 §14.2 allows: players ask for one range, and we never build multipart bodies.
//! - A syntactically invalid `Range`, or one in a unit other than bytes, is ignored (200).

use std::time::{Duration, UNIX_EPOCH};

use http_range_header::{EndPosition, RangeUnsatisfiableError, StartPosition};

/// Size of the header array handed to `httparse`; `Limits::headers_count_max` is capped at it.
const HEADERS_COUNT_CAPACITY: usize = 64;

/// The last second `httpdate` can format: 9999-12-31T23:59:59Z.
const HTTP_DATE_UNIX_S_MAX: u64 = 253_402_300_799;

/// Bounds on a request head; anything larger is refused before more of it is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line, without its CRLF (longer: 414).
    pub request_line_bytes_max: usize,
    /// Longest head, request line and blank line included (longer: 431).
    pub header_bytes_max: usize,
    /// Most header fields (more: 431); values above 64 act as 64.
    pub headers_count_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_line_bytes_max: 8192,
            header_bytes_max: 16384,
            headers_count_max: HEADERS_COUNT_CAPACITY,
        }
    }
}

/// The request method, as far as serving cares; `Other` is answered 405 by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// A parsed and checked request head: the fields serving needs, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// Percent-decoded and normalised; starts with '/', no empty, `.` or `..` segments.
    pub path: String,
    /// The raw query string without '?', not decoded.
    pub query: Option<String>,
    /// 0 or 1 (HTTP/1.0 or HTTP/1.1).
    pub version_minor: u8,
    /// HTTP/1.1: true unless `Connection: close`; HTTP/1.0: only with `Connection: keep-alive`.
    pub keep_alive: bool,
    /// The raw `Range` value.
    pub range: Option<String>,
    /// Raw validator values; repeated fields are joined with ", " (RFC 9110 §5.3), which makes
    /// a repeated date invalid, and so ignored, as RFC 9110 §13.1.3 asks.
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub if_unmodified_since: Option<String>,
    pub if_range: Option<String>,
}

/// The outcome of parsing the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "one per request, moved once into the caller; boxing would allocate for nothing"
)]
pub enum Parse {
    /// The head is not complete yet and no limit is exceeded: read more.
    Incomplete,
    /// `consumed_bytes` is the length of the head, blank line included; what follows it in the
    /// buffer is the next (pipelined) request.
    Complete {
        head: RequestHead,
        consumed_bytes: usize,
    },
}

/// A request the server refuses; `status` is the code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpError {
    BadRequest(&'static str),
    UriTooLong,
    HeadersTooLarge,
    VersionNotSupported,
    /// Never produced by `parse_request`; for the caller, which answers 405 to `Method::Other`.
    MethodNotAllowed,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::UriTooLong => 414,
            HttpError::HeadersTooLarge => 431,
            HttpError::VersionNotSupported => 505,
            HttpError::MethodNotAllowed => 405,
        }
    }
}

/// Parses the request head at the start of `buf` (the bytes read so far on a connection).
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parse, HttpError> {
    let line = first_line(buf);
    if line.bytes.len() > limits.request_line_bytes_max {
        return Err(HttpError::UriTooLong);
    }
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_COUNT_CAPACITY];
    let headers_count = limits.headers_count_max.min(HEADERS_COUNT_CAPACITY);
    let mut request = httparse::Request::new(&mut headers[..headers_count]);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > limits.header_bytes_max => {
            Err(HttpError::HeadersTooLarge)
        }
        Ok(httparse::Status::Partial) => Ok(Parse::Incomplete),
        Ok(httparse::Status::Complete(consumed_bytes)) => {
            if consumed_bytes > limits.header_bytes_max {
                return Err(HttpError::HeadersTooLarge);
            }
            let head = request_head(&request)?;
            Ok(Parse::Complete {
                head,
                consumed_bytes,
            })
        }
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadersTooLarge),
        Err(httparse::Error::Version) => version_error(&line),
        Err(httparse::Error::HeaderName) => Err(HttpError::BadRequest("invalid header name")),
        Err(httparse::Error::HeaderValue) => Err(HttpError::BadRequest("invalid header value")),
        Err(httparse::Error::NewLine) => Err(HttpError::BadRequest("invalid line ending")),
        Err(httparse::Error::Token) => Err(HttpError::BadRequest("invalid method or target")),
        Err(httparse::Error::Status) => Err(HttpError::BadRequest("malformed request")),
    }
}

/// The request line: leading empty lines skipped (as `httparse` does), CR LF not included.
struct FirstLine<'a> {
    bytes: &'a [u8],
    complete: bool,
}

fn first_line(buf: &[u8]) -> FirstLine<'_> {
    let start = buf
        .iter()
        .position(|byte| *byte != b'\r' && *byte != b'\n')
        .unwrap_or(buf.len());
    let rest = buf.get(start..).unwrap_or_default();
    let (line, complete) = match rest.iter().position(|byte| *byte == b'\n') {
        Some(end) => (rest.get(..end).unwrap_or_default(), true),
        None => (rest, false),
    };
    let bytes = line.strip_suffix(b"\r").unwrap_or(line);
    FirstLine { bytes, complete }
}

/// `httparse` stops at a version other than HTTP/1.0 or HTTP/1.1: a well-formed `HTTP/d.d` is
/// 505, a prefix of one on an unfinished line needs more bytes, anything else is 400.
fn version_error(line: &FirstLine) -> Result<Parse, HttpError> {
    const TEMPLATE: &[u8] = b"HTTP/#.#";
    let token = line
        .bytes
        .rsplit(|byte| *byte == b' ')
        .next()
        .unwrap_or_default();
    let fits = token.len() <= TEMPLATE.len()
        && token
            .iter()
            .zip(TEMPLATE)
            .all(|(byte, expected)| match expected {
                b'#' => byte.is_ascii_digit(),
                _ => byte == expected,
            });
    match (fits, line.complete) {
        (true, true) if token.len() == TEMPLATE.len() => Err(HttpError::VersionNotSupported),
        (true, false) => Ok(Parse::Incomplete),
        _ => Err(HttpError::BadRequest("invalid HTTP version")),
    }
}

/// Header fields collected from a complete head, before the request-level checks.
#[derive(Default)]
struct Fields {
    host_count: usize,
    range_count: usize,
    content_length: Option<u64>,
    transfer_encoding: bool,
    connection_close: bool,
    connection_keep_alive: bool,
    range: Option<String>,
    if_match: Option<String>,
    if_none_match: Option<String>,
    if_modified_since: Option<String>,
    if_unmodified_since: Option<String>,
    if_range: Option<String>,
}

fn request_head(request: &httparse::Request) -> Result<RequestHead, HttpError> {
    let method = match request.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        _ => Method::Other,
    };
    let version_minor = match request.version {
        Some(0) => 0,
        Some(1) => 1,
        _ => return Err(HttpError::VersionNotSupported),
    };
    let target = request.path.unwrap_or_default();
    let (raw_path, query) = split_target(target)?;
    let path = normalise_path(raw_path)?;
    let fields = collect_fields(request.headers)?;
    if fields.host_count > 1 {
        return Err(HttpError::BadRequest("more than one Host"));
    }
    if fields.host_count == 0 && version_minor == 1 {
        return Err(HttpError::BadRequest("HTTP/1.1 request without Host"));
    }
    if fields.range_count > 1 {
        return Err(HttpError::BadRequest("more than one Range"));
    }
    if fields.transfer_encoding || fields.content_length.is_some_and(|length| length > 0) {
        return Err(HttpError::BadRequest("request bodies are not accepted"));
    }
    let keep_alive = match version_minor {
        0 => fields.connection_keep_alive && !fields.connection_close,
        _ => !fields.connection_close,
    };
    Ok(RequestHead {
        method,
        path,
        query: query.map(str::to_owned),
        version_minor,
        keep_alive,
        range: fields.range,
        if_match: fields.if_match,
        if_none_match: fields.if_none_match,
        if_modified_since: fields.if_modified_since,
        if_unmodified_since: fields.if_unmodified_since,
        if_range: fields.if_range,
    })
}

fn collect_fields(headers: &[httparse::Header]) -> Result<Fields, HttpError> {
    let mut fields = Fields::default();
    for header in headers {
        let name = header.name;
        let is = |expected: &str| name.eq_ignore_ascii_case(expected);
        if is("host") {
            fields.host_count = fields.host_count.saturating_add(1);
        } else if is("content-length") {
            let length = parse_content_length(header.value)?;
            if fields
                .content_length
                .is_some_and(|previous| previous != length)
            {
                return Err(HttpError::BadRequest("conflicting Content-Length"));
            }
            fields.content_length = Some(length);
        } else if is("transfer-encoding") {
            fields.transfer_encoding = true;
        } else if is("connection") {
            for option in header.value.split(|byte| *byte == b',') {
                let option = option.trim_ascii();
                fields.connection_close |= option.eq_ignore_ascii_case(b"close");
                fields.connection_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is("range") {
            fields.range_count = fields.range_count.saturating_add(1);
            fields.range = Some(field_value(header.value));
        } else if is("if-match") {
            join_field(&mut fields.if_match, header.value);
        } else if is("if-none-match") {
            join_field(&mut fields.if_none_match, header.value);
        } else if is("if-modified-since") {
            join_field(&mut fields.if_modified_since, header.value);
        } else if is("if-unmodified-since") {
            join_field(&mut fields.if_unmodified_since, header.value);
        } else if is("if-range") {
            join_field(&mut fields.if_range, header.value);
        }
    }
    Ok(fields)
}

/// A field value as text: trimmed; bytes that are not UTF-8 (obs-text) become U+FFFD, which
/// no validator, date or range of ours contains, so such a value simply never matches.
fn field_value(value: &[u8]) -> String {
    String::from_utf8_lossy(value.trim_ascii()).into_owned()
}

fn join_field(slot: &mut Option<String>, value: &[u8]) {
    let value = field_value(value);
    match slot {
        Some(joined) => {
            joined.push_str(", ");
            joined.push_str(&value);
        }
        None => *slot = Some(value),
    }
}

/// `Content-Length` is 1*DIGIT, or a list of identical values (RFC 9112 §6.3).
fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let mut length = None;
    for member in value.split(|byte| *byte == b',') {
        let member = member.trim_ascii();
        let parsed = std::str::from_utf8(member)
            .ok()
            .filter(|text| !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or(HttpError::BadRequest("invalid Content-Length"))?;
        if length.is_some_and(|previous| previous != parsed) {
            return Err(HttpError::BadRequest("conflicting Content-Length"));
        }
        length = Some(parsed);
    }
    length.ok_or(HttpError::BadRequest("invalid Content-Length"))
}

/// Splits a request target into its raw path and raw query. Origin-form (`/path?query`) and
/// absolute-form (`http://host/path?query`, whose path is taken) are accepted; `*`,
/// authority-form, fragments and anything else are not.
fn split_target(target: &str) -> Result<(&str, Option<&str>), HttpError> {
    if target.contains('#') {
        return Err(HttpError::BadRequest("fragment in request target"));
    }
    let path_and_query = if target.starts_with('/') {
        target
    } else {
        let after_scheme = strip_prefix_ignore_case(target, "http://")
            .or_else(|| strip_prefix_ignore_case(target, "https://"))
            .ok_or(HttpError::BadRequest("unsupported request target"))?;
        let authority_end = after_scheme.find(['/', '?']).unwrap_or(after_scheme.len());
        if authority_end == 0 {
            return Err(HttpError::BadRequest("absolute target without authority"));
        }
        after_scheme.get(authority_end..).unwrap_or_default()
    };
    Ok(match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    })
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// Percent-decodes and normalises a raw path (see the module comment).
fn normalise_path(raw_path: &str) -> Result<String, HttpError> {
    let bytes = raw_path.as_bytes();
    for (index, byte) in bytes.iter().enumerate() {
        if *byte == b'%' {
            let digits = bytes.get(index.saturating_add(1)..index.saturating_add(3));
            if !digits.is_some_and(|digits| digits.iter().all(u8::is_ascii_hexdigit)) {
                return Err(HttpError::BadRequest("invalid percent escape in path"));
            }
        }
    }
    let decoded = percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .map_err(|_| HttpError::BadRequest("path is not UTF-8"))?;
    if decoded.chars().any(|c| c == '\\' || c.is_control()) {
        return Err(HttpError::BadRequest(
            "NUL, backslash or control character in path",
        ));
    }
    let mut path = String::with_capacity(decoded.len().saturating_add(1));
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err(HttpError::BadRequest("'..' segment in path")),
            _ => {
                path.push('/');
                path.push_str(segment);
            }
        }
    }
    if path.is_empty() {
        path.push('/');
    }
    Ok(path)
}

/// What the server knows about the file it would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Representation {
    pub size_bytes: u64,
    /// A strong entity tag, quoted, as `etag_from_sha256` makes it.
    pub etag: String,
    pub last_modified_unix_s: u64,
}

/// A strong ETag: the quoted lowercase hex of the first 16 bytes of the content's SHA-256.
pub fn etag_from_sha256(sha256: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut etag = String::with_capacity(34);
    etag.push('"');
    for byte in sha256.iter().take(16) {
        etag.push(char::from(HEX[usize::from(byte >> 4)]));
        etag.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    etag.push('"');
    etag
}

/// What to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// 200 with the whole representation.
    Full,
    /// 206 with the bytes `start..=end_inclusive` (always inside the representation).
    Partial { start: u64, end_inclusive: u64 },
    /// 304.
    NotModified,
    /// 412.
    PreconditionFailed,
    /// 416; the caller sends `Content-Range: bytes */SIZE`.
    RangeNotSatisfiable,
}

/// Evaluates the preconditions, then the range, in the order of RFC 9110 §13.2.2. Call it only
/// for a representation that exists: a 404 ignores preconditions (RFC 9110 §13.2.1). An
/// If-Range date matches only when equal to Last-Modified; two versions of a path published
/// within one second would share it (RFC 9110 §8.8.2.2), a risk we accept as clients send our
/// ETag, which is strong, far more often than the date.
pub fn select(head: &RequestHead, rep: &Representation) -> Selection {
    if let Some(refusal) = evaluate_preconditions(head, rep) {
        return refusal;
    }
    let range = match (&head.method, &head.range) {
        (Method::Get, Some(range)) => range,
        _ => return Selection::Full,
    };
    if let Some(if_range) = &head.if_range {
        if !if_range_matches(if_range, rep) {
            return Selection::Full;
        }
    }
    select_range(range, rep.size_bytes)
}

/// Steps 1 to 4 of RFC 9110 §13.2.2; `None` when the request goes on to the range step.
fn evaluate_preconditions(head: &RequestHead, rep: &Representation) -> Option<Selection> {
    if let Some(if_match) = &head.if_match {
        let matched = if_match.trim() == "*" || any_entity_tag(if_match, &rep.etag, strong_eq);
        if !matched {
            return Some(Selection::PreconditionFailed);
        }
    } else if let Some(date) = head.if_unmodified_since.as_deref().and_then(parse_date) {
        if rep.last_modified_unix_s > date {
            return Some(Selection::PreconditionFailed);
        }
    }
    let safe = matches!(head.method, Method::Get | Method::Head);
    if let Some(if_none_match) = &head.if_none_match {
        let matched =
            if_none_match.trim() == "*" || any_entity_tag(if_none_match, &rep.etag, weak_eq);
        if matched {
            let refusal = if safe {
                Selection::NotModified
            } else {
                Selection::PreconditionFailed
            };
            return Some(refusal);
        }
    } else if safe {
        if let Some(date) = head.if_modified_since.as_deref().and_then(parse_date) {
            if rep.last_modified_unix_s <= date {
                return Some(Selection::NotModified);
            }
        }
    }
    None
}

/// If-Range holds either an entity tag (strong comparison) or an HTTP-date (equal to
/// Last-Modified); anything else, or a weak tag, never matches.
fn if_range_matches(if_range: &str, rep: &Representation) -> bool {
    let value = if_range.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return match (
            parse_single_entity_tag(value),
            parse_single_entity_tag(&rep.etag),
        ) {
            (Some(requested), Some(current)) => strong_eq(requested, current),
            _ => false,
        };
    }
    parse_date(value) == Some(rep.last_modified_unix_s)
}

/// Resolves a `Range` value against a representation of `size_bytes` (RFC 9110 §14.1.1).
///
/// `http_range_header` parses; satisfiability is decided here because its `validate` differs
/// from RFC 9110 in three ways: a suffix longer than the file is an error there (the RFC takes
/// the whole file), `0-` on an empty file validates as `0..=0`, and a reversed `5-3` (invalid:
/// ignore) is not told apart from a start past the end (unsatisfiable: 416).
fn select_range(value: &str, size_bytes: u64) -> Selection {
    let Some((unit, specs)) = value.split_once('=') else {
        return Selection::Full;
    };
    if !unit.eq_ignore_ascii_case("bytes") {
        return Selection::Full;
    }
    let parsed = match http_range_header::parse_range_header(&format!("bytes={specs}")) {
        Ok(parsed) => parsed,
        // `-0` is valid syntax but never satisfiable; the crate refuses it while parsing.
        Err(RangeUnsatisfiableError::ZeroSuffix) if !specs.contains(',') => {
            return Selection::RangeNotSatisfiable;
        }
        Err(_) => return Selection::Full,
    };
    // A reversed range (`5-3`) makes the whole header invalid: ignore it.
    if parsed.ranges.iter().any(is_reversed) {
        return Selection::Full;
    }
    let resolved: Vec<Resolved> = parsed
        .ranges
        .iter()
        .map(|range| resolve(range.start, range.end, size_bytes))
        .collect();
    match resolved.as_slice() {
        [Resolved::Bytes {
            start,
            end_inclusive,
        }] => Selection::Partial {
            start: *start,
            end_inclusive: *end_inclusive,
        },
        [] => Selection::Full,
        ranges if ranges.iter().all(|range| *range == Resolved::Unsatisfiable) => {
            Selection::RangeNotSatisfiable
        }
        // Several ranges with one satisfiable, or a suffix of an empty file (satisfiable, but
        // no 206 can express an empty range): the whole representation.
        _ => Selection::Full,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    Bytes {
        start: u64,
        end_inclusive: u64,
    },
    /// A suffix range of an empty representation: satisfiable (RFC 9110 §14.1.1), but empty.
    EmptySuffix,
    Unsatisfiable,
}

fn is_reversed(range: &http_range_header::SyntacticallyCorrectRange) -> bool {
    matches!(
        (range.start, range.end),
        (StartPosition::Index(first), EndPosition::Index(last)) if last < first
    )
}

fn resolve(start: StartPosition, end: EndPosition, size_bytes: u64) -> Resolved {
    let Some(last_byte) = size_bytes.checked_sub(1) else {
        return match start {
            StartPosition::FromLast(_) => Resolved::EmptySuffix,
            StartPosition::Index(_) => Resolved::Unsatisfiable,
        };
    };
    match start {
        StartPosition::FromLast(suffix_bytes) => Resolved::Bytes {
            start: size_bytes.saturating_sub(suffix_bytes),
            end_inclusive: last_byte,
        },
        StartPosition::Index(first) if first > last_byte => Resolved::Unsatisfiable,
        StartPosition::Index(first) => Resolved::Bytes {
            start: first,
            end_inclusive: match end {
                EndPosition::Index(last) => last.min(last_byte),
                EndPosition::LastByte => last_byte,
            },
        },
    }
}

/// An entity tag: `weak` for a `W/` prefix; `opaque` is the quoted part, quotes included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    opaque: &'a str,
}

fn strong_eq(a: EntityTag, b: EntityTag) -> bool {
    !a.weak && !b.weak && a.opaque == b.opaque
}

fn weak_eq(a: EntityTag, b: EntityTag) -> bool {
    a.opaque == b.opaque
}

/// Whether any tag of the list `#entity-tag` matches `current` under `eq`. A malformed list, or
/// a malformed `current`, matches nothing.
fn any_entity_tag(list: &str, current: &str, eq: fn(EntityTag, EntityTag) -> bool) -> bool {
    let Some(current) = parse_single_entity_tag(current) else {
        return false;
    };
    let mut rest = list;
    let mut matched = false;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return matched;
        }
        let Some((tag, after)) = parse_entity_tag(rest) else {
            return false;
        };
        matched |= eq(tag, current);
        let after_spaces = after.trim_start_matches([' ', '\t']);
        if !(after_spaces.is_empty() || after_spaces.starts_with(',')) {
            return false;
        }
        rest = after_spaces;
    }
}

fn parse_single_entity_tag(text: &str) -> Option<EntityTag<'_>> {
    match parse_entity_tag(text.trim())? {
        (tag, "") => Some(tag),
        _ => None,
    }
}

/// Parses `[W/] DQUOTE *etagc DQUOTE` at the start of `text`; returns the tag and the rest.
fn parse_entity_tag(text: &str) -> Option<(EntityTag<'_>, &str)> {
    let (weak, quoted) = match text.strip_prefix("W/") {
        Some(quoted) => (true, quoted),
        None => (false, text),
    };
    let inner = quoted.strip_prefix('"')?;
    let close = inner.find('"')?;
    let is_etagc = |c: char| c == '!' || ('#'..='~').contains(&c) || !c.is_ascii();
    if !inner.get(..close)?.chars().all(is_etagc) {
        return None;
    }
    let opaque_end = close.checked_add(2)?;
    let opaque = quoted.get(..opaque_end)?;
    Some((EntityTag { weak, opaque }, quoted.get(opaque_end..)?))
}

/// An HTTP-date (any of the three forms) as Unix seconds; `None` when invalid.
fn parse_date(text: &str) -> Option<u64> {
    let time = httpdate::parse_http_date(text.trim()).ok()?;
    Some(time.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// IMF-fixdate of a Unix time; times after the year 9999 are formatted as its last second.
pub fn http_date(unix_s: u64) -> String {
    let unix_s = unix_s.min(HTTP_DATE_UNIX_S_MAX);
    let time = UNIX_EPOCH
        .checked_add(Duration::from_secs(unix_s))
        .unwrap_or(UNIX_EPOCH);
    httpdate::fmt_http_date(time)
}

/// The media type for a path: streaming formats first (mime_guess lacks or misnames them),
/// then mime_guess, then application/octet-stream.
pub fn content_type(path: &str) -> &'static str {
    const STREAMING: [(&str, &str); 4] = [
        ("m4s", "video/iso.segment"),
        ("mpd", "application/dash+xml"),
        ("m3u8", "application/vnd.apple.mpegurl"),
        ("ts", "video/mp2t"),
    ];
    const DEFAULT: &str = "application/octet-stream";
    let name = path.rsplit('/').next().unwrap_or_default();
    let Some((_, extension)) = name.rsplit_once('.') else {
        return DEFAULT;
    };
    if let Some((_, media_type)) = STREAMING
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(extension))
    {
        return media_type;
    }
    mime_guess::from_ext(extension)
        .first_raw()
        .unwrap_or(DEFAULT)
}

/// A response head to serialise.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead<'a> {
    pub status: u16,
    pub keep_alive: bool,
    /// The request's minor version: an HTTP/1.0 client is told `Connection: keep-alive`.
    pub version_minor: u8,
    /// An IMF-fixdate (`http_date`).
    pub date: &'a str,
    /// Not written for 1xx, 204 and 304, which have no body.
    pub content_length: u64,
    /// Further fields, written in order. A field whose name or value holds CR, LF or NUL is
    /// dropped (it would split the response).
    pub extra: &'a [(&'a str, String)],
}

/// Appends the status line and header fields, ending with the blank line, to `out`.
pub fn write_response_head(head: &ResponseHead, out: &mut Vec<u8>) {
    let status = head.status;
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    out.extend_from_slice(b"Server: applianced\r\n");
    put_field(out, "Date", head.date);
    if !(status < 200 || status == 204 || status == 304) {
        put_field(out, "Content-Length", &head.content_length.to_string());
    }
    match (head.keep_alive, head.version_minor) {
        (false, _) => put_field(out, "Connection", "close"),
        (true, 0) => put_field(out, "Connection", "keep-alive"),
        (true, _) => {}
    }
    out.extend_from_slice(b"Accept-Ranges: bytes\r\n");
    for (name, value) in head.extra {
        put_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

fn put_field(out: &mut Vec<u8>, name: &str, value: &str) {
    let splits = |text: &str| text.bytes().any(|byte| matches!(byte, b'\r' | b'\n' | 0));
    if name.is_empty() || splits(name) || splits(value) {
        tracing::warn!(
            name,
            "dropped a response header field holding CR, LF or NUL"
        );
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase of a status code ("Unknown" for codes serving never sends).
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Whether a response carries content after its head: never one to HEAD (RFC 9110 §9.3.2: the
/// head is the one GET would get, `Content-Length` included, and nothing follows it), nor a
/// 1xx, 204 or 304 (RFC 9110 §6.4.1). A byte sent where the client expects none would be read
/// as the start of the next response on a keep-alive connection.
pub fn response_has_content(method: Method, status: u16) -> bool {
    method != Method::Head && !(status < 200 || status == 204 || status == 304)
}

/// The method named by the request line at the start of `buf`, complete or not, for answering
/// a request that did not parse: `Other` when it is neither GET nor HEAD, or not there yet.
pub fn request_method(buf: &[u8]) -> Method {
    let line = first_line(buf);
    match line.bytes.split(|byte| *byte == b' ').next() {
        Some(b"GET") => Method::Get,
        Some(b"HEAD") => Method::Head,
        _ => Method::Other,
    }
}

/// Appends a complete error response with a small text body ("404 Not Found\n") to `out`; to a
/// HEAD (`method`), the same head with nothing after it (`response_has_content`).
/// 405 carries `Allow: GET, HEAD`. 416 needs `Content-Range`, so the caller builds it with
/// `write_response_head`. `Connection: keep-alive` is always explicit here, as the request's
/// version may be unknown (a request that did not parse).
pub fn error_response(
    status: u16,
    keep_alive: bool,
    method: Method,
    date: &str,
    out: &mut Vec<u8>,
) {
    let body = format!("{status} {}\n", reason(status));
    let mut extra = vec![("Content-Type", "text/plain; charset=utf-8".to_owned())];
    if status == 405 {
        extra.push(("Allow", "GET, HEAD".to_owned()));
    }
    let head = ResponseHead {
        status,
        keep_alive,
        version_minor: 0,
        date,
        content_length: u64::try_from(body.len()).unwrap_or(u64::MAX),
        extra: &extra,
    };
    write_response_head(&head, out);
    if response_has_content(method, status) {
        out.extend_from_slice(body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "Host: cache.example\r\n";

    /// A GET of `path` over HTTP/1.1 with keep-alive and nothing else.
    fn get(path: &str) -> RequestHead {
        RequestHead {
            method: Method::Get,
            path: path.to_owned(),
            query: None,
            version_minor: 1,
            keep_alive: true,
            range: None,
            if_match: None,
            if_none_match: None,
            if_modified_since: None,
            if_unmodified_since: None,
            if_range: None,
        }
    }

    /// `Ok(Some(head))`: a complete head consuming all of `input`; `Ok(None)`: incomplete.
    fn check(input: &str, expected: Result<Option<RequestHead>, HttpError>) {
        let actual = parse_request(input.as_bytes(), &Limits::default());
        let expected = expected.map(|head| match head {
            Some(head) => Parse::Complete {
                head,
                consumed_bytes: input.len(),
            },
            None => Parse::Incomplete,
        });
        assert_eq!(actual, expected, "input: {input:?}");
    }

    fn bad(reason: &'static str) -> Result<Option<RequestHead>, HttpError> {
        Err(HttpError::BadRequest(reason))
    }

    #[test]
    fn parse_paths() {
        let target = |target: &str| format!("GET {target} HTTP/1.1\r\n{HOST}\r\n");
        let dots = || bad("'..' segment in path");
        let escape = || bad("invalid percent escape in path");
        let control = || bad("NUL, backslash or control character in path");
        let unsupported = || bad("unsupported request target");
        let with_query = |path: &str, query: &str| {
            Ok(Some(RequestHead {
                query: Some(query.to_owned()),
                ..get(path)
            }))
        };
        let cases: &[(&str, Result<Option<RequestHead>, HttpError>)] = &[
            ("/", Ok(Some(get("/")))),
            ("/video/a.mp4", Ok(Some(get("/video/a.mp4")))),
            ("/a/./b", Ok(Some(get("/a/b")))),
            ("//a//b", Ok(Some(get("/a/b")))),
            ("/a/b/", Ok(Some(get("/a/b")))),
            ("/./.", Ok(Some(get("/")))),
            ("/a/%2e/b", Ok(Some(get("/a/b")))),
            ("/a%2fb", Ok(Some(get("/a/b")))),
            ("/...", Ok(Some(get("/...")))),
            ("/a..b/.c", Ok(Some(get("/a..b/.c")))),
            ("/%c3%a9t%C3%A9", Ok(Some(get("/été")))),
            ("/a%20b", Ok(Some(get("/a b")))),
            ("/a/../b", dots()),
            ("/..", dots()),
            ("/a/..", dots()),
            ("/%2e%2e/etc", dots()),
            ("/a/%2E%2e/b", dots()),
            ("/a/..?x=1", dots()),
            ("/%00", control()),
            ("/a%0a", control()),
            ("/a%7f", control()),
            ("/a%c2%85", control()),
            ("/%5c", control()),
            ("/a%5Cb", control()),
            ("/a\\b", control()),
            ("/%zz", escape()),
            ("/%2", escape()),
            ("/a%", escape()),
            ("/%%41", escape()),
            ("/%ff", bad("path is not UTF-8")),
            ("/a?b=%zz&c", with_query("/a", "b=%zz&c")),
            ("/a?", with_query("/a", "")),
            ("/a?../..", with_query("/a", "../..")),
            ("/a?x?y", with_query("/a", "x?y")),
            ("http://cache.example/x//y", Ok(Some(get("/x/y")))),
            ("HTTP://cache.example", Ok(Some(get("/")))),
            ("https://h:8080?q", with_query("/", "q")),
            ("http://h/a/../b", dots()),
            ("http:///x", bad("absolute target without authority")),
            ("ftp://h/x", unsupported()),
            ("*", unsupported()),
            ("cache.example:443", unsupported()),
            ("a/b", unsupported()),
            ("/a#frag", bad("fragment in request target")),
        ];
        for (input, expected) in cases {
            check(&target(input), expected.clone());
        }
    }

    #[test]
    fn parse_heads() {
        let get_1_0 = |path: &str| RequestHead {
            version_minor: 0,
            keep_alive: false,
            ..get(path)
        };
        let cases: &[(String, Result<Option<RequestHead>, HttpError>)] = &[
            (format!("GET / HTTP/1.1\r\n{HOST}\r\n"), Ok(Some(get("/")))),
            (
                format!("\r\nGET / HTTP/1.1\r\n{HOST}\r\n"),
                Ok(Some(get("/"))),
            ),
            (
                format!("HEAD /a HTTP/1.1\r\n{HOST}\r\n"),
                Ok(Some(RequestHead {
                    method: Method::Head,
                    ..get("/a")
                })),
            ),
            (
                format!("DELETE /a HTTP/1.1\r\n{HOST}\r\n"),
                Ok(Some(RequestHead {
                    method: Method::Other,
                    ..get("/a")
                })),
            ),
            (
                format!("get /a HTTP/1.1\r\n{HOST}\r\n"),
                Ok(Some(RequestHead {
                    method: Method::Other,
                    ..get("/a")
                })),
            ),
            // Keep-alive: HTTP/1.1 by default, HTTP/1.0 only when asked; options are a list.
            (
                "GET /a HTTP/1.0\r\n\r\n".to_owned(),
                Ok(Some(get_1_0("/a"))),
            ),
            (
                "GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n".to_owned(),
                Ok(Some(RequestHead {
                    keep_alive: true,
                    ..get_1_0("/a")
                })),
            ),
            (
                "GET /a HTTP/1.0\r\nconnection: foo, keep-alive\r\n\r\n".to_owned(),
                Ok(Some(RequestHead {
                    keep_alive: true,
                    ..get_1_0("/a")
                })),
            ),
            (
                "GET /a HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n".to_owned(),
                Ok(Some(get_1_0("/a"))),
            ),
            (
                format!("GET /a HTTP/1.1\r\n{HOST}Connection: close\r\n\r\n"),
                Ok(Some(RequestHead {
                    keep_alive: false,
                    ..get("/a")
                })),
            ),
            (
                format!("GET /a HTTP/1.1\r\n{HOST}Connection: te\r\nConnection: CLOSE\r\n\r\n"),
                Ok(Some(RequestHead {
                    keep_alive: false,
                    ..get("/a")
                })),
            ),
            (
                format!("GET /a HTTP/1.1\r\n{HOST}Connection: keep-alive\r\n\r\n"),
                Ok(Some(get("/a"))),
            ),
            // Fields kept raw; names are case-insensitive; lists are joined.
            (
                "GET /a HTTP/1.1\r\nhOsT: x\r\nrange: bytes=0-1 \r\nIF-MATCH: \"a\"\r\n\
                 If-None-Match: \"b\"\r\nIf-None-Match: W/\"c\"\r\n\
                 If-Modified-Since: Sun, 09 Sep 2001 01:46:40 GMT\r\n\
                 If-Unmodified-Since: x\r\nIf-Range: \"d\"\r\nX-Other: y\r\n\r\n"
                    .to_owned(),
                Ok(Some(RequestHead {
                    range: Some("bytes=0-1".to_owned()),
                    if_match: Some("\"a\"".to_owned()),
                    if_none_match: Some("\"b\", W/\"c\"".to_owned()),
                    if_modified_since: Some("Sun, 09 Sep 2001 01:46:40 GMT".to_owned()),
                    if_unmodified_since: Some("x".to_owned()),
                    if_range: Some("\"d\"".to_owned()),
                    ..get("/a")
                })),
            ),
            // Host.
            (
                "GET / HTTP/1.1\r\n\r\n".to_owned(),
                bad("HTTP/1.1 request without Host"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}host: b\r\n\r\n"),
                bad("more than one Host"),
            ),
            (
                "GET / HTTP/1.1\r\nHost:\r\n\r\n".to_owned(),
                Ok(Some(get("/"))),
            ),
            // Bodies.
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: 5\r\n\r\nhello"),
                Err(HttpError::BadRequest("request bodies are not accepted")),
            ),
            (
                format!("POST / HTTP/1.1\r\n{HOST}Transfer-Encoding: chunked\r\n\r\n"),
                bad("request bodies are not accepted"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: 0\r\n\r\n"),
                Ok(Some(get("/"))),
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\n{HOST}Content-Length: 0, 0\r\ncontent-length: 0\r\n\r\n"
                ),
                Ok(Some(get("/"))),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: 0\r\nContent-Length: 1\r\n\r\n"),
                bad("conflicting Content-Length"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: 1, 2\r\n\r\n"),
                bad("conflicting Content-Length"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: -1\r\n\r\n"),
                bad("invalid Content-Length"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: +0\r\n\r\n"),
                bad("invalid Content-Length"),
            ),
            (
                format!("GET / HTTP/1.1\r\n{HOST}Content-Length: 99999999999999999999\r\n\r\n"),
                bad("invalid Content-Length"),
            ),
            // Range.
            (
                format!("GET / HTTP/1.1\r\n{HOST}Range: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n"),
                bad("more than one Range"),
            ),
            // Malformed heads.
            (
                format!("GET / HTTP/1.1\r\n{HOST}X-Folded: a\r\n b\r\n\r\n"),
                bad("invalid header name"),
            ),
            (
                "GET / HTTP/1.1\r\nHost : a\r\n\r\n".to_owned(),
                bad("invalid header name"),
            ),
            ("GET /\r\n\r\n".to_owned(), bad("invalid method or target")),
            (
                "GET / FOO/1.1\r\n\r\n".to_owned(),
                bad("invalid HTTP version"),
            ),
            (
                "GET / HTTP/3\r\n\r\n".to_owned(),
                bad("invalid HTTP version"),
            ),
            (
                "GET  / HTTP/1.1\r\n\r\n".to_owned(),
                bad("invalid method or target"),
            ),
            ("GET / HTTP/1.1\nHost: a\n\n".to_owned(), Ok(Some(get("/")))),
            // Versions.
            (
                "GET / HTTP/2.0\r\n\r\n".to_owned(),
                Err(HttpError::VersionNotSupported),
            ),
            (
                "GET / HTTP/1.2\r\n\r\n".to_owned(),
                Err(HttpError::VersionNotSupported),
            ),
            (
                "GET / HTTP/0.9\r\n\r\n".to_owned(),
                Err(HttpError::VersionNotSupported),
            ),
            // Incomplete.
            (String::new(), Ok(None)),
            ("\r\n".to_owned(), Ok(None)),
            ("GET / HT".to_owned(), Ok(None)),
            ("GET / HTTP/2".to_owned(), Ok(None)),
            (format!("GET / HTTP/1.1\r\n{HOST}"), Ok(None)),
            (format!("GET / HTTP/1.1\r\n{HOST}\r"), Ok(None)),
        ];
        for (input, expected) in cases {
            check(input, expected.clone());
        }
    }

    #[test]
    fn parse_pipelined() {
        let first = format!("GET /a HTTP/1.1\r\n{HOST}Range: bytes=0-9\r\n\r\n");
        let second = format!("HEAD /b HTTP/1.1\r\n{HOST}Connection: close\r\n\r\n");
        let third_partial = "GET /c HTTP/1.1\r\nHo";
        let buffer = format!("{first}{second}{third_partial}");
        let limits = Limits::default();
        let mut offset = 0;
        let mut heads = Vec::new();
        while let Ok(Parse::Complete {
            head,
            consumed_bytes,
        }) = parse_request(&buffer.as_bytes()[offset..], &limits)
        {
            heads.push(head);
            offset += consumed_bytes;
        }
        assert_eq!(offset, first.len() + second.len());
        assert_eq!(
            heads,
            [
                RequestHead {
                    range: Some("bytes=0-9".to_owned()),
                    ..get("/a")
                },
                RequestHead {
                    method: Method::Head,
                    keep_alive: false,
                    ..get("/b")
                },
            ]
        );
        assert_eq!(
            parse_request(&buffer.as_bytes()[offset..], &limits),
            Ok(Parse::Incomplete)
        );
    }

    #[test]
    fn parse_every_prefix_is_incomplete() {
        let request = format!("GET /a/b.m4s?x=1 HTTP/1.1\r\n{HOST}Range: bytes=0-\r\n\r\n");
        for end in 0..request.len() {
            let prefix = &request.as_bytes()[..end];
            assert_eq!(
                parse_request(prefix, &Limits::default()),
                Ok(Parse::Incomplete),
                "prefix {:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[test]
    fn parse_limits() {
        let limits = Limits {
            request_line_bytes_max: 32,
            header_bytes_max: 128,
            headers_count_max: 3,
        };
        // A request line of `line_bytes`, CRLF not included.
        let line = |line_bytes: usize| format!("GET /{} HTTP/1.1", "a".repeat(line_bytes - 14));
        let filler = |count: usize| "X: y\r\n".repeat(count);
        let complete = |input: &str| {
            Ok(Parse::Complete {
                head: get(&format!(
                    "/{}",
                    "a".repeat(input.find(" HTTP").unwrap_or(5) - 5)
                )),
                consumed_bytes: input.len(),
            })
        };
        let exact_line = format!("{}\r\n{HOST}\r\n", line(32));
        let cases: Vec<(String, Limits, Result<Parse, HttpError>)> = vec![
            (exact_line.clone(), limits, complete(&exact_line)),
            (
                format!("{}\r\n{HOST}\r\n", line(33)),
                limits,
                Err(HttpError::UriTooLong),
            ),
            (line(32), limits, Ok(Parse::Incomplete)),
            (format!("{}\r", line(32)), limits, Ok(Parse::Incomplete)),
            (line(33), limits, Err(HttpError::UriTooLong)),
            (
                format!("GET /{}", "a".repeat(100)),
                limits,
                Err(HttpError::UriTooLong),
            ),
            (
                format!("GET /{} HTTP/1.1\r\n{HOST}\r\n", "a".repeat(9000)),
                Limits::default(),
                Err(HttpError::UriTooLong),
            ),
            (
                format!("{}\r\n{HOST}{}", line(18), "Y".repeat(120)),
                limits,
                Err(HttpError::HeadersTooLarge),
            ),
            (
                format!("{}\r\n{HOST}{}\r\n", line(18), "Y: ".repeat(40)),
                limits,
                Err(HttpError::HeadersTooLarge),
            ),
            (
                format!("{}\r\n{HOST}{}\r\n", line(18), filler(2)),
                limits,
                complete(&format!("{}\r\n{HOST}{}\r\n", line(18), filler(2))),
            ),
            (
                format!("{}\r\n{HOST}{}\r\n", line(18), filler(3)),
                limits,
                Err(HttpError::HeadersTooLarge),
            ),
            (
                format!("{}\r\n{HOST}{}\r\n", line(18), filler(63)),
                Limits::default(),
                complete(&format!("{}\r\n{HOST}{}\r\n", line(18), filler(63))),
            ),
            (
                format!("{}\r\n{HOST}{}\r\n", line(18), filler(64)),
                Limits {
                    headers_count_max: 1000,
                    ..Limits::default()
                },
                Err(HttpError::HeadersTooLarge),
            ),
            (
                format!("{}\r\n{}", line(18), "\r\n".repeat(100)),
                Limits::default(),
                Err(HttpError::BadRequest("HTTP/1.1 request without Host")),
            ),
            ("\r\n".repeat(100), limits, Err(HttpError::HeadersTooLarge)),
        ];
        for (input, limits, expected) in cases {
            let actual = parse_request(input.as_bytes(), &limits);
            assert_eq!(actual, expected, "input: {input:?}");
        }
    }

    /// Random and mutated inputs: never a panic, and a complete head never claims more bytes
    /// than it was given.
    #[test]
    fn parse_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let seed = format!(
            "GET /a/%41/b?q HTTP/1.1\r\n{HOST}Range: bytes=0-5\r\nIf-None-Match: \"x\"\r\n\
             If-Modified-Since: Sun, 09 Sep 2001 01:46:40 GMT\r\n\r\n"
        );
        let alphabet = b"GET /%.?\r\n:HTP1\\\x00\xff\"W,-=bytes";
        let rep = Representation {
            size_bytes: 10,
            etag: "\"x\"".to_owned(),
            last_modified_unix_s: 1_000_000_000,
        };
        for round in 0..20_000 {
            let mut input = seed.as_bytes().to_vec();
            for _ in 0..(next() % 6) {
                let at = usize::try_from(next() % 80)
                    .unwrap_or(0)
                    .min(input.len() - 1);
                let byte = alphabet[usize::try_from(next()).unwrap_or(0) % alphabet.len()];
                match next() % 3 {
                    0 => input[at] = byte,
                    1 => input.insert(at, byte),
                    _ => drop(input.remove(at)),
                }
            }
            if round % 2 == 0 {
                input.truncate(usize::try_from(next()).unwrap_or(0) % (input.len() + 1));
            }
            if let Ok(Parse::Complete {
                head,
                consumed_bytes,
            }) = parse_request(&input, &Limits::default())
            {
                assert!(consumed_bytes <= input.len());
                assert!(head.path.starts_with('/'));
                assert!(!head.path.split('/').any(|segment| segment == ".."));
                let _selection = select(&head, &rep);
            }
        }
    }

    const LAST_MODIFIED_UNIX_S: u64 = 1_000_000_000;
    const ETAG: &str = "\"0123abcd\"";

    /// `fields` are (name, value) pairs; in values, `LM`, `LM-1` and `LM+1` stand for the
    /// HTTP-date of Last-Modified and one second either side.
    fn check_select(method: Method, size_bytes: u64, fields: &[(&str, &str)], expected: Selection) {
        let mut head = RequestHead {
            method,
            ..get("/f")
        };
        for (name, value) in fields {
            let value = match *value {
                "LM" => http_date(LAST_MODIFIED_UNIX_S),
                "LM-1" => http_date(LAST_MODIFIED_UNIX_S - 1),
                "LM+1" => http_date(LAST_MODIFIED_UNIX_S + 1),
                other => other.to_owned(),
            };
            let slot = match *name {
                "Range" => &mut head.range,
                "If-Match" => &mut head.if_match,
                "If-None-Match" => &mut head.if_none_match,
                "If-Modified-Since" => &mut head.if_modified_since,
                "If-Unmodified-Since" => &mut head.if_unmodified_since,
                "If-Range" => &mut head.if_range,
                _ => panic!("unknown field {name}"),
            };
            *slot = Some(value);
        }
        let rep = Representation {
            size_bytes,
            etag: ETAG.to_owned(),
            last_modified_unix_s: LAST_MODIFIED_UNIX_S,
        };
        assert_eq!(
            select(&head, &rep),
            expected,
            "{method:?} size {size_bytes} {fields:?}"
        );
    }

    fn partial(start: u64, end_inclusive: u64) -> Selection {
        Selection::Partial {
            start,
            end_inclusive,
        }
    }

    #[test]
    fn select_ranges() {
        use Selection::{Full, RangeNotSatisfiable};
        let cases: &[(u64, &str, Selection)] = &[
            (1000, "bytes=0-499", partial(0, 499)),
            (1000, "bytes=500-", partial(500, 999)),
            (1000, "bytes=-500", partial(500, 999)),
            (1000, "bytes=-1", partial(999, 999)),
            (1000, "bytes=-1000", partial(0, 999)),
            (1000, "bytes=-5000", partial(0, 999)),
            (1000, "bytes=999-", partial(999, 999)),
            (1000, "bytes=0-0", partial(0, 0)),
            (1000, "bytes=0-5000", partial(0, 999)),
            (1000, "Bytes=1-2", partial(1, 2)),
            (1000, "bytes=-0", RangeNotSatisfiable),
            (1000, "bytes=1000-", RangeNotSatisfiable),
            (1000, "bytes=1000-2000", RangeNotSatisfiable),
            (1000, "bytes=18446744073709551615-", RangeNotSatisfiable),
            (1000, "bytes=5-3", Full),
            (1000, "bytes=x", Full),
            (1000, "bytes=", Full),
            (1000, "bytes=1", Full),
            (1000, "bytes=1-2-3", Full),
            (1000, "bytes=01-2", Full),
            (1000, "bytes=0-99999999999999999999", Full),
            (1000, "bytes= 0-1", Full),
            (1000, "items=0-1", Full),
            (1000, "0-1", Full),
            (1000, "bytes=0-1,5-6", Full),
            (1000, "bytes=0-1, 500-", Full),
            (1000, "bytes=0-10,5-20", Full),
            (1000, "bytes=0-1,2000-3000", Full),
            (1000, "bytes=0-1,-0", Full),
            (1000, "bytes=0-1,7-3", Full),
            (1000, "bytes=2000-3000,4000-", RangeNotSatisfiable),
            (0, "bytes=0-", RangeNotSatisfiable),
            (0, "bytes=0-0", RangeNotSatisfiable),
            (0, "bytes=-0", RangeNotSatisfiable),
            (0, "bytes=-5", Full),
            (0, "bytes=x", Full),
            (1, "bytes=0-", partial(0, 0)),
            (1, "bytes=1-", RangeNotSatisfiable),
            (u64::MAX, "bytes=-1", partial(u64::MAX - 1, u64::MAX - 1)),
        ];
        for (size_bytes, range, expected) in cases {
            check_select(Method::Get, *size_bytes, &[("Range", range)], *expected);
        }
        // Range applies to GET only.
        check_select(Method::Head, 1000, &[("Range", "bytes=0-1")], Full);
        check_select(Method::Other, 1000, &[("Range", "bytes=0-1")], Full);
    }

    #[test]
    fn select_conditionals() {
        use Method::{Get, Head, Other};
        use Selection::{Full, NotModified, PreconditionFailed};
        let range = ("Range", "bytes=0-9");
        type Fields<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Method, Fields, Selection)] = &[
            (Get, &[], Full),
            // If-Match: strong comparison; `*` matches any current representation.
            (Get, &[("If-Match", ETAG)], Full),
            (Get, &[("If-Match", "*")], Full),
            (Get, &[("If-Match", "\"other\", \"0123abcd\"")], Full),
            (Get, &[("If-Match", "\"other\"")], PreconditionFailed),
            (Get, &[("If-Match", "W/\"0123abcd\"")], PreconditionFailed),
            (Get, &[("If-Match", "0123abcd")], PreconditionFailed),
            (
                Get,
                &[("If-Match", "\"0123abcd\" junk")],
                PreconditionFailed,
            ),
            (Head, &[("If-Match", "\"other\"")], PreconditionFailed),
            // If-Unmodified-Since, only without If-Match.
            (Get, &[("If-Unmodified-Since", "LM")], Full),
            (Get, &[("If-Unmodified-Since", "LM+1")], Full),
            (Get, &[("If-Unmodified-Since", "LM-1")], PreconditionFailed),
            (Get, &[("If-Unmodified-Since", "yesterday")], Full),
            (
                Get,
                &[("If-Match", ETAG), ("If-Unmodified-Since", "LM-1")],
                Full,
            ),
            // If-None-Match: weak comparison; 304 for GET and HEAD, 412 otherwise.
            (Get, &[("If-None-Match", ETAG)], NotModified),
            (Get, &[("If-None-Match", "W/\"0123abcd\"")], NotModified),
            (
                Get,
                &[("If-None-Match", "\"a\",, W/\"0123abcd\"")],
                NotModified,
            ),
            (Get, &[("If-None-Match", "*")], NotModified),
            (Head, &[("If-None-Match", ETAG)], NotModified),
            (Other, &[("If-None-Match", ETAG)], PreconditionFailed),
            (Get, &[("If-None-Match", "\"other\"")], Full),
            (Get, &[("If-None-Match", "\"0123abcd")], Full),
            // If-Modified-Since, only without If-None-Match, only for GET and HEAD.
            (Get, &[("If-Modified-Since", "LM")], NotModified),
            (Get, &[("If-Modified-Since", "LM+1")], NotModified),
            (Head, &[("If-Modified-Since", "LM")], NotModified),
            (Get, &[("If-Modified-Since", "LM-1")], Full),
            (Get, &[("If-Modified-Since", "not a date")], Full),
            (Other, &[("If-Modified-Since", "LM")], Full),
            (
                Get,
                &[("If-Modified-Since", "Sun, 09 Sep 2001 01:46:40 GMT, x")],
                Full,
            ),
            (
                Get,
                &[("If-Modified-Since", "Sunday, 09-Sep-01 01:46:40 GMT")],
                NotModified,
            ),
            (
                Get,
                &[("If-Modified-Since", "Sun Sep  9 01:46:40 2001")],
                NotModified,
            ),
            (
                Get,
                &[("If-None-Match", "\"other\""), ("If-Modified-Since", "LM")],
                Full,
            ),
            // Precedence between the steps.
            (
                Get,
                &[("If-Match", "\"other\""), ("If-None-Match", ETAG)],
                PreconditionFailed,
            ),
            (
                Get,
                &[("If-Unmodified-Since", "LM-1"), ("If-Modified-Since", "LM")],
                PreconditionFailed,
            ),
            (
                Get,
                &[("If-Match", ETAG), ("If-None-Match", ETAG)],
                NotModified,
            ),
            (Get, &[("If-None-Match", ETAG), range], NotModified),
            (Get, &[("If-Modified-Since", "LM"), range], NotModified),
            (Get, &[("If-Match", "\"other\""), range], PreconditionFailed),
            (Get, &[("If-Modified-Since", "LM-1"), range], partial(0, 9)),
            // If-Range: strong tag or the exact Last-Modified date, else the full representation.
            (Get, &[("If-Range", ETAG), range], partial(0, 9)),
            (Get, &[("If-Range", "\"other\""), range], Full),
            (Get, &[("If-Range", "W/\"0123abcd\""), range], Full),
            (Get, &[("If-Range", "LM"), range], partial(0, 9)),
            (Get, &[("If-Range", "LM+1"), range], Full),
            (Get, &[("If-Range", "LM-1"), range], Full),
            (Get, &[("If-Range", "garbage"), range], Full),
            (
                Get,
                &[("If-Range", "\"0123abcd\", \"0123abcd\""), range],
                Full,
            ),
            (Get, &[("If-Range", ETAG)], Full),
            (
                Get,
                &[("If-Range", ETAG), ("Range", "bytes=5000-")],
                Selection::RangeNotSatisfiable,
            ),
        ];
        for (method, fields, expected) in cases {
            check_select(*method, 1000, fields, *expected);
        }
    }

    #[test]
    fn etags() {
        let mut counting = [0_u8; 32];
        for (index, byte) in counting.iter_mut().enumerate() {
            *byte = u8::try_from(index).unwrap_or(0);
        }
        let cases: &[([u8; 32], &str)] = &[
            ([0; 32], "\"00000000000000000000000000000000\""),
            ([0xab; 32], "\"abababababababababababababababab\""),
            (counting, "\"000102030405060708090a0b0c0d0e0f\""),
        ];
        for (sha256, expected) in cases {
            let etag = etag_from_sha256(sha256);
            assert_eq!(etag, *expected);
            assert!(parse_single_entity_tag(&etag).is_some_and(|tag| !tag.weak));
        }
    }

    #[test]
    fn http_dates() {
        let cases: &[(u64, &str)] = &[
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (LAST_MODIFIED_UNIX_S, "Sun, 09 Sep 2001 01:46:40 GMT"),
            (HTTP_DATE_UNIX_S_MAX, "Fri, 31 Dec 9999 23:59:59 GMT"),
            (HTTP_DATE_UNIX_S_MAX + 1, "Fri, 31 Dec 9999 23:59:59 GMT"),
            (u64::MAX, "Fri, 31 Dec 9999 23:59:59 GMT"),
        ];
        for (unix_s, expected) in cases {
            assert_eq!(http_date(*unix_s), *expected, "{unix_s}");
            assert_eq!(
                parse_date(expected),
                Some((*unix_s).min(HTTP_DATE_UNIX_S_MAX))
            );
        }
    }

    #[test]
    fn content_types() {
        let cases: &[(&str, &str)] = &[
            ("/v/seg-1.m4s", "video/iso.segment"),
            ("/v/manifest.mpd", "application/dash+xml"),
            ("/v/MANIFEST.MPD", "application/dash+xml"),
            ("/v/index.m3u8", "application/vnd.apple.mpegurl"),
            ("/v/seg-1.ts", "video/mp2t"),
            ("/v/movie.mp4", "video/mp4"),
            ("/v/subs.vtt", "text/vtt"),
            ("/v/data.json", "application/json"),
            ("/v/noextension", "application/octet-stream"),
            ("/v.d/noextension", "application/octet-stream"),
            ("/v/unknown.zzzq", "application/octet-stream"),
            ("/v/trailing.", "application/octet-stream"),
            ("/", "application/octet-stream"),
            ("", "application/octet-stream"),
        ];
        for (path, expected) in cases {
            assert_eq!(content_type(path), *expected, "{path}");
        }
    }

    fn check_response(head: ResponseHead, expected: &str) {
        let mut out = b"before|".to_vec();
        write_response_head(&head, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), format!("before|{expected}"));
    }

    #[test]
    fn response_heads() {
        const DATE: &str = "Sun, 09 Sep 2001 01:46:40 GMT";
        let base = ResponseHead {
            status: 200,
            keep_alive: true,
            version_minor: 1,
            date: DATE,
            content_length: 1000,
            extra: &[],
        };
        let common = format!("Server: applianced\r\nDate: {DATE}\r\n");
        let content_range = [("Content-Range", "bytes 0-499/1000".to_owned())];
        let injected = [
            ("X-Bad", "a\r\nSet-Cookie: x".to_owned()),
            ("X-Bad\n", "a".to_owned()),
            ("", "a".to_owned()),
            ("X-Good", "b".to_owned()),
        ];
        let cases: Vec<(ResponseHead, String)> = vec![
            (
                base,
                format!(
                    "HTTP/1.1 200 OK\r\n{common}Content-Length: 1000\r\n\
                     Accept-Ranges: bytes\r\n\r\n"
                ),
            ),
            (
                ResponseHead {
                    status: 206,
                    content_length: 500,
                    extra: &content_range,
                    ..base
                },
                format!(
                    "HTTP/1.1 206 Partial Content\r\n{common}Content-Length: 500\r\n\
                     Accept-Ranges: bytes\r\nContent-Range: bytes 0-499/1000\r\n\r\n"
                ),
            ),
            (
                ResponseHead {
                    version_minor: 0,
                    ..base
                },
                format!(
                    "HTTP/1.1 200 OK\r\n{common}Content-Length: 1000\r\n\
                     Connection: keep-alive\r\nAccept-Ranges: bytes\r\n\r\n"
                ),
            ),
            (
                ResponseHead {
                    keep_alive: false,
                    ..base
                },
                format!(
                    "HTTP/1.1 200 OK\r\n{common}Content-Length: 1000\r\n\
                     Connection: close\r\nAccept-Ranges: bytes\r\n\r\n"
                ),
            ),
            (
                ResponseHead {
                    status: 304,
                    ..base
                },
                format!("HTTP/1.1 304 Not Modified\r\n{common}Accept-Ranges: bytes\r\n\r\n"),
            ),
            (
                ResponseHead {
                    extra: &injected,
                    ..base
                },
                format!(
                    "HTTP/1.1 200 OK\r\n{common}Content-Length: 1000\r\n\
                     Accept-Ranges: bytes\r\nX-Good: b\r\n\r\n"
                ),
            ),
        ];
        for (head, expected) in cases {
            check_response(head, &expected);
        }
    }

    #[test]
    fn error_responses() {
        const DATE: &str = "Sun, 09 Sep 2001 01:46:40 GMT";
        let common = format!("Server: applianced\r\nDate: {DATE}\r\n");
        let text = "Content-Type: text/plain; charset=utf-8\r\n";
        let cases: &[(u16, bool, Method, String)] = &[
            (
                404,
                true,
                Method::Get,
                format!(
                    "HTTP/1.1 404 Not Found\r\n{common}Content-Length: 14\r\n\
                     Connection: keep-alive\r\nAccept-Ranges: bytes\r\n{text}\r\n\
                     404 Not Found\n"
                ),
            ),
            (
                405,
                false,
                Method::Other,
                format!(
                    "HTTP/1.1 405 Method Not Allowed\r\n{common}Content-Length: 23\r\n\
                     Connection: close\r\nAccept-Ranges: bytes\r\n{text}\
                     Allow: GET, HEAD\r\n\r\n405 Method Not Allowed\n"
                ),
            ),
            (
                431,
                false,
                Method::Get,
                format!(
                    "HTTP/1.1 431 Request Header Fields Too Large\r\n{common}\
                     Content-Length: 36\r\nConnection: close\r\nAccept-Ranges: bytes\r\n\
                     {text}\r\n431 Request Header Fields Too Large\n"
                ),
            ),
            // To HEAD: the head GET would get, Content-Length included, and not one byte more.
            (
                404,
                true,
                Method::Head,
                format!(
                    "HTTP/1.1 404 Not Found\r\n{common}Content-Length: 14\r\n\
                     Connection: keep-alive\r\nAccept-Ranges: bytes\r\n{text}\r\n"
                ),
            ),
            (
                403,
                true,
                Method::Head,
                format!(
                    "HTTP/1.1 403 Forbidden\r\n{common}Content-Length: 14\r\n\
                     Connection: keep-alive\r\nAccept-Ranges: bytes\r\n{text}\r\n"
                ),
            ),
            (
                412,
                true,
                Method::Head,
                format!(
                    "HTTP/1.1 412 Precondition Failed\r\n{common}Content-Length: 24\r\n\
                     Connection: keep-alive\r\nAccept-Ranges: bytes\r\n{text}\r\n"
                ),
            ),
            (
                500,
                false,
                Method::Head,
                format!(
                    "HTTP/1.1 500 Internal Server Error\r\n{common}Content-Length: 26\r\n\
                     Connection: close\r\nAccept-Ranges: bytes\r\n{text}\r\n"
                ),
            ),
            (
                400,
                false,
                Method::Head,
                format!(
                    "HTTP/1.1 400 Bad Request\r\n{common}Content-Length: 16\r\n\
                     Connection: close\r\nAccept-Ranges: bytes\r\n{text}\r\n"
                ),
            ),
        ];
        for (status, keep_alive, method, expected) in cases {
            let mut out = Vec::new();
            error_response(*status, *keep_alive, *method, DATE, &mut out);
            assert_eq!(
                String::from_utf8_lossy(&out),
                *expected,
                "{status} {method:?}"
            );
        }
    }

    #[test]
    fn content_follows_a_head_only_where_allowed() {
        let cases: &[(Method, u16, bool)] = &[
            (Method::Get, 200, true),
            (Method::Get, 206, true),
            (Method::Get, 404, true),
            (Method::Get, 500, true),
            (Method::Other, 405, true),
            (Method::Get, 100, false),
            (Method::Get, 204, false),
            (Method::Get, 304, false),
            (Method::Head, 200, false),
            (Method::Head, 206, false),
            (Method::Head, 403, false),
            (Method::Head, 404, false),
            (Method::Head, 412, false),
            (Method::Head, 500, false),
        ];
        for (method, status, expected) in cases {
            assert_eq!(
                response_has_content(*method, *status),
                *expected,
                "{method:?} {status}"
            );
        }
    }

    #[test]
    fn request_methods_of_unparsed_heads() {
        let cases: &[(&[u8], Method)] = &[
            (b"HEAD /x HTTP/1.1\r\n\r\n", Method::Head),
            (b"HEAD /x HTT", Method::Head),
            (b"\r\nHEAD /x HTTP/1.1\r\n", Method::Head),
            (b"GET /x HTTP/1.1\r\n", Method::Get),
            (b"GET", Method::Get),
            (b"HEA", Method::Other),
            (b"HEADER /x HTTP/1.1\r\n", Method::Other),
            (b"head /x HTTP/1.1\r\n", Method::Other),
            (b"POST /x HTTP/1.1\r\n", Method::Other),
            (b"", Method::Other),
            (b"\x00\xff\r\n", Method::Other),
        ];
        for (buf, expected) in cases {
            assert_eq!(
                request_method(buf),
                *expected,
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
    }

    #[test]
    fn statuses_and_reasons() {
        let cases: &[(HttpError, u16, &str)] = &[
            (HttpError::BadRequest("x"), 400, "Bad Request"),
            (HttpError::UriTooLong, 414, "URI Too Long"),
            (
                HttpError::HeadersTooLarge,
                431,
                "Request Header Fields Too Large",
            ),
            (
                HttpError::VersionNotSupported,
                505,
                "HTTP Version Not Supported",
            ),
            (HttpError::MethodNotAllowed, 405, "Method Not Allowed"),
        ];
        for (error, status, phrase) in cases {
            assert_eq!(error.status(), *status);
            assert_eq!(reason(*status), *phrase);
        }
        let others: &[(u16, &str)] = &[
            (200, "OK"),
            (206, "Partial Content"),
            (304, "Not Modified"),
            (404, "Not Found"),
            (412, "Precondition Failed"),
            (416, "Range Not Satisfiable"),
            (503, "Service Unavailable"),
            (299, "Unknown"),
        ];
        for (status, phrase) in others {
            assert_eq!(reason(*status), *phrase);
        }
    }
}
