//! Owns the libFuzzer target for the control-socket protocol (`appliance_proto`): the daemon's
//! `parse_request` and the CLI's decoding of a `Response` line must never panic on any bytes;
//! an accepted request speaks this build's version and survives `to_line` and parse
//! unchanged; every line either side sends is one JSON object on exactly one line.
//!
//! Input: the first byte picks the decoder (even: request, as the daemon reads it, capped at
//! `REQUEST_BYTES_MAX`; odd: response, as `appliance-ctl` reads it); the rest is the line.

#![no_main]
#![forbid(unsafe_code)]

use appliance_proto::{parse_request, Response, PROTOCOL_VERSION, REQUEST_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, line)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        request(&line[..line.len().min(REQUEST_BYTES_MAX)]);
    } else {
        response(line);
    }
});

fn request(line: &[u8]) {
    let Ok(request) = parse_request(line) else {
        return;
    };
    assert_eq!(request.version, PROTOCOL_VERSION);
    let encoded = request.to_line();
    check_one_line(&encoded);
    assert_eq!(
        parse_request(encoded.as_bytes()),
        Ok(request),
        "request round trip"
    );
}

fn response(line: &[u8]) {
    let Ok(response) = serde_json::from_slice::<Response>(line) else {
        return;
    };
    let encoded = response.to_line();
    check_one_line(&encoded);
    // Floats in the body may move in their last digit (serde_json parses best-effort), so the
    // round trip is checked on the fields that carry the protocol.
    let again: Response = serde_json::from_str(&encoded).expect("an encoded response decodes");
    assert_eq!(
        (again.version, again.done, &again.error),
        (response.version, response.done, &response.error),
        "response round trip"
    );
}

/// One JSON value, one trailing newline, no newline inside.
fn check_one_line(encoded: &str) {
    let body = encoded.strip_suffix('\n').expect("a line ends with a newline");
    assert!(!body.contains('\n'), "a line holds a newline: {body:?}");
    serde_json::from_str::<serde_json::Value>(body).expect("a line is JSON");
}
