//! Fuzz target for the request path of serving: `parse_request` on arbitrary bytes under tight
//! and default limits, and `select` (ranges and conditionals) on whatever parses. Neither may
//! panic; a parsed head's path must be normalised.

#![no_main]
#![forbid(unsafe_code)]

use appliance_serve::http::{parse_request, select, Limits, Parse, Representation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tight = Limits {
        request_line_bytes_max: 64,
        header_bytes_max: 256,
        headers_count_max: 8,
    };
    for limits in [Limits::default(), tight] {
        let Ok(Parse::Complete { head, consumed_bytes }) = parse_request(data, &limits) else {
            continue;
        };
        assert!(consumed_bytes <= data.len());
        assert!(head.path.starts_with('/'));
        assert!(!head.path.contains("/../") && !head.path.ends_with("/..") && !head.path.contains('\0'));
        for size_bytes in [0u64, 1, 1000, u64::MAX / 2] {
            let representation = Representation {
                size_bytes,
                etag: "\"0123456789abcdef\"".to_string(),
                last_modified_unix_s: 1_700_000_000,
            };
            let _ = select(&head, &representation);
        }
    }
});
