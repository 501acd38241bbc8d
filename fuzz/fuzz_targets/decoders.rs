//! Owns the libFuzzer target for the on-disk decoders in `appliance_store::layout`: none may panic
//! on any input, and whatever decodes must survive a re-encode and decode unchanged.
//!
//! Input: the first byte picks the decoder (modulo [`DECODERS`]); the rest are the bytes handed to
//! it. The "sealed" variants patch the magic, version and checksum into the bytes before
//! decoding, so the fuzzer reaches the field checks behind the CRC gate instead of spending its
//! time forging checksums; the raw variants keep the magic, version, checksum and length checks
//! covered.

#![no_main]
#![forbid(unsafe_code)]

use appliance_store::layout::{
    decode_link, encode_link, CheckpointHeader, Deletion, FileMeta, RecordHeader, RecordKind,
    SegmentRow, Superblock, CHECKPOINT_MAGIC, FORMAT_VERSION, RECORD_ALIGN_BYTES,
    RECORD_HEADER_BYTES, RECORD_MAGIC, SUPERBLOCK_MAGIC,
};
use libfuzzer_sys::fuzz_target;

/// How many decoder variants the first byte chooses between.
const DECODERS: u8 = 11;

/// Size of a sealed block (superblock copy, checkpoint header).
const BLOCK: usize = 4096;
/// Bytes a superblock or checkpoint header's fields take at the start of its block: magic 8,
/// version 4, a u32 (reserved / body CRC) 4, UUID 16, seven u64 fields 56.
const BLOCK_FIELD_BYTES: usize = 88;
/// The superblock's ignored reserved u32 right after the version.
const SUPERBLOCK_RESERVED: std::ops::Range<usize> = 12..16;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % DECODERS {
        0 => superblock(bytes),
        1 => superblock(&sealed_block(bytes, SUPERBLOCK_MAGIC)),
        2 => checkpoint_header(bytes),
        3 => checkpoint_header(&sealed_block(bytes, CHECKPOINT_MAGIC)),
        4 => {
            let (salt, rest) = split_salt(bytes);
            record(rest, salt);
        }
        5 => {
            let (salt, rest) = split_salt(bytes);
            record(&sealed_record(rest, salt, false), salt);
        }
        6 => {
            let (salt, rest) = split_salt(bytes);
            record(&sealed_record(rest, salt, true), salt);
        }
        7 => file_meta(bytes),
        8 => deletion(bytes),
        9 => link(bytes),
        _ => segment_row(bytes),
    }
});

/// `bytes` padded with zeros to a whole block, with the magic and version written in and the
/// CRC recomputed: a block that passes `open_block`, whatever its fields say.
fn sealed_block(bytes: &[u8], magic: u64) -> Vec<u8> {
    let mut block = bytes.to_vec();
    if block.len() < BLOCK {
        block.resize(BLOCK, 0);
    }
    block[0..8].copy_from_slice(&magic.to_le_bytes());
    block[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&block[..BLOCK - 4]);
    block[BLOCK - 4..BLOCK].copy_from_slice(&crc.to_le_bytes());
    block
}

/// The first four bytes as the record salt (zero-padded), and the rest.
fn split_salt(bytes: &[u8]) -> (u32, &[u8]) {
    let mut salt = [0u8; 4];
    let taken = bytes.len().min(4);
    salt[..taken].copy_from_slice(&bytes[..taken]);
    (u32::from_le_bytes(salt), &bytes[taken..])
}

/// `bytes` padded to a whole header with the magic written in and the header CRC recomputed
/// under `salt`; with `fit_payload`, the payload length and CRC are first set to describe the
/// bytes after the header, so the payload checks pass too.
fn sealed_record(bytes: &[u8], salt: u32, fit_payload: bool) -> Vec<u8> {
    let header = usize::try_from(RECORD_HEADER_BYTES).expect("32");
    let mut record = bytes.to_vec();
    if record.len() < header {
        record.resize(header, 0);
    }
    record[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    if fit_payload {
        let payload = &bytes[header.min(bytes.len())..];
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let crc = crc32c::crc32c(payload);
        record[16..20].copy_from_slice(&length.to_le_bytes());
        record[20..24].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(salt, &record[..28]);
    record[28..32].copy_from_slice(&crc.to_le_bytes());
    record
}

fn superblock(bytes: &[u8]) {
    let Ok(decoded) = Superblock::decode(bytes) else {
        return;
    };
    let encoded = decoded.encode();
    assert_eq!(encoded.len(), BLOCK);
    assert_eq!(
        Superblock::decode(&encoded),
        Ok(decoded.clone()),
        "superblock round trip"
    );
    // Every field byte was read: only the reserved word and the padding may differ.
    assert_eq!(
        encoded[..SUPERBLOCK_RESERVED.start],
        bytes[..SUPERBLOCK_RESERVED.start]
    );
    assert_eq!(
        encoded[SUPERBLOCK_RESERVED.end..BLOCK_FIELD_BYTES],
        bytes[SUPERBLOCK_RESERVED.end..BLOCK_FIELD_BYTES]
    );
    // Helpers the store calls on a decoded superblock.
    for offset in [
        0,
        decoded.segments_offset_bytes,
        decoded.drive_size_bytes,
        u64::MAX,
    ] {
        if let Some(segment) = decoded.segment_of(offset) {
            assert!(segment < decoded.segment_count);
        }
    }
}

fn checkpoint_header(bytes: &[u8]) {
    let Ok(decoded) = CheckpointHeader::decode(bytes) else {
        return;
    };
    let encoded = decoded.encode();
    assert_eq!(encoded.len(), BLOCK);
    assert_eq!(
        CheckpointHeader::decode(&encoded),
        Ok(decoded),
        "checkpoint header round trip"
    );
    assert_eq!(encoded[..BLOCK_FIELD_BYTES], bytes[..BLOCK_FIELD_BYTES]);
}

fn record(bytes: &[u8], salt: u32) {
    let Ok(header) = RecordHeader::decode(bytes, salt) else {
        return;
    };
    let encoded = header.encode(salt);
    assert_eq!(
        RecordHeader::decode(&encoded, salt),
        Ok(header),
        "record header round trip"
    );
    // Only the three padding bytes after the kind are not fields.
    assert_eq!(encoded[0..5], bytes[0..5]);
    assert_eq!(encoded[8..28], bytes[8..28]);
    if bytes[5..8] == [0, 0, 0] {
        assert_eq!(encoded[..], bytes[..32]);
    }
    let record_bytes = header.record_bytes();
    assert_eq!(record_bytes % RECORD_ALIGN_BYTES, 0);
    assert!(record_bytes >= RECORD_HEADER_BYTES + u64::from(header.payload_bytes));

    let payload = &bytes[32..];
    if header.check_payload(payload).is_err() {
        return;
    }
    assert_eq!(payload.len(), header.payload_bytes as usize);
    match header.kind {
        RecordKind::Pad => {}
        RecordKind::Link => link(payload),
        RecordKind::Publish => file_meta(payload),
        RecordKind::Delete => deletion(payload),
    }
}

fn file_meta(bytes: &[u8]) {
    let Ok(decoded) = FileMeta::decode(bytes) else {
        return;
    };
    let encoded = decoded.encode();
    assert_eq!(encoded, bytes, "file meta re-encodes to its bytes");
    assert_eq!(
        FileMeta::decode(&encoded),
        Ok(decoded),
        "file meta round trip"
    );
}

fn deletion(bytes: &[u8]) {
    let Ok(decoded) = Deletion::decode(bytes) else {
        return;
    };
    let encoded = decoded.encode();
    assert_eq!(encoded, bytes, "deletion re-encodes to its bytes");
    assert_eq!(
        Deletion::decode(&encoded),
        Ok(decoded),
        "deletion round trip"
    );
}

fn link(bytes: &[u8]) {
    let Ok(segment) = decode_link(bytes) else {
        return;
    };
    assert_eq!(encode_link(segment), bytes, "link re-encodes to its bytes");
}

fn segment_row(bytes: &[u8]) {
    let Ok(row) = SegmentRow::decode(bytes) else {
        return;
    };
    let mut encoded = Vec::new();
    row.encode(&mut encoded);
    assert_eq!(encoded, bytes[..16], "segment row re-encodes to its bytes");
    assert_eq!(
        SegmentRow::decode(&encoded),
        Ok(row),
        "segment row round trip"
    );
}
