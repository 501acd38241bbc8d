//! Formatting a drive: refusing drives that hold other data, then writing superblocks and an
//! empty checkpoint.
//!
//! Without `force`, nothing is written to a drive that holds anything recognised: appliance
//! data of any format version (a newer one included: it is never taken for blank), or a
//! filesystem or partition signature.

use crate::layout::to_usize;
use crate::layout::{
    checkpoint_region_bytes, CheckpointHeader, LogPosition, SegmentKind, SegmentRow, Superblock,
    FORMAT_VERSION, SEGMENT_BYTES_MIN, SUPERBLOCK_BYTES,
};
use crate::recovery::version_refusal;
use appliance_device::{read_exact_at, write_all_at, AlignedBuf, Drive};
use std::fmt;
use std::io;

/// Segments start on this alignment, friendly to flash erase blocks.
const SEGMENTS_ALIGN_BYTES: u64 = 1 << 20;

/// How to lay out a drive.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    /// Size of one segment (a multiple of 4 KiB, at least 2 MiB).
    pub segment_bytes: u64,
    /// Most files the drive will hold; sizes its checkpoint. Default: one per MiB.
    pub files_max: Option<u64>,
    /// Format even over a filesystem signature or another appliance's data.
    pub force: bool,
    /// The new drive's UUID (the caller draws it at random).
    pub drive_uuid: [u8; 16],
    /// Creation time written into the superblock.
    pub now_unix_s: u64,
}

/// Why a drive was not formatted.
#[derive(Debug)]
pub enum FormatError {
    /// The drive holds something that must not be overwritten without `force`.
    Occupied(String),
    /// The drive holds appliance data in a format version this build does not read (the reason
    /// says which and what to do); only `force` overwrites it.
    UnreadableVersion(String),
    /// The drive is too small for the requested geometry.
    TooSmall {
        size_bytes: u64,
        needed_bytes: u64,
    },
    /// The options do not make sense.
    BadOptions(String),
    Io(io::Error),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Occupied(what) => {
                write!(
                    f,
                    "refusing to format: the drive {what} (use --force to overwrite)"
                )
            }
            FormatError::UnreadableVersion(reason) => write!(
                f,
                "refusing to format: the drive holds appliance data in a format this build \
                 cannot read: {reason}"
            ),
            FormatError::TooSmall {
                size_bytes,
                needed_bytes,
            } => write!(
                f,
                "drive of {size_bytes} bytes is too small: need {needed_bytes}"
            ),
            FormatError::BadOptions(why) => write!(f, "bad format options: {why}"),
            FormatError::Io(error) => write!(f, "I/O error: {error}"),
        }
    }
}

impl std::error::Error for FormatError {}

impl From<io::Error> for FormatError {
    fn from(error: io::Error) -> FormatError {
        FormatError::Io(error)
    }
}

/// Signatures of things that must not be overwritten silently: (offset, bytes, name).
const SIGNATURES: &[(usize, &[u8], &str)] = &[
    (0x438, &[0x53, 0xEF], "ext2/3/4 filesystem"),
    (0, b"XFSB", "XFS filesystem"),
    (0x10040, b"_BHRfS_M", "btrfs filesystem"),
    (512, b"EFI PART", "GPT partition table"),
    (512, b"LABELONE", "LVM physical volume"),
    (0, b"LUKS\xba\xbe", "LUKS encrypted volume"),
    (4086, b"SWAPSPACE2", "swap area"),
    (0x8001, b"CD001", "ISO 9660 filesystem"),
    (510, &[0x55, 0xAA], "DOS partition table or FAT boot sector"),
];

/// What the first bytes of a drive hold.
#[derive(Debug)]
pub enum DriveContents {
    /// Nothing recognised: a blank drive, or bytes of no known kind.
    Unrecognised,
    /// An appliance store this build opens (the first valid superblock copy).
    Appliance(Superblock),
    /// An appliance store in a format version this build does not read: why, and what to do.
    ApplianceUnreadable(String),
    /// A filesystem, partition table or volume signature (its name).
    Foreign(&'static str),
}

/// Looks at the first bytes of a drive: appliance superblocks first (a copy in a version this
/// build does not read decides, as it does at open), then known signatures. Reads only.
pub fn inspect_drive(drive: &dyn Drive) -> io::Result<DriveContents> {
    let probe_bytes = (128 * 1024).min(drive.info().size_bytes);
    let head = read_exact_at(drive, 0, AlignedBuf::new(to_usize(probe_bytes)))?;
    let copies: Vec<_> = (0..2usize)
        .filter_map(|copy| {
            let start = copy * to_usize(SUPERBLOCK_BYTES);
            head.get(start..start + to_usize(SUPERBLOCK_BYTES))
                .map(Superblock::decode)
        })
        .collect();
    for copy in &copies {
        if let Some(refusal) = copy.as_ref().err().and_then(version_refusal) {
            return Ok(DriveContents::ApplianceUnreadable(refusal));
        }
    }
    if let Some(superblock) = copies.into_iter().find_map(Result::ok) {
        return Ok(DriveContents::Appliance(superblock));
    }
    for (offset, magic, name) in SIGNATURES {
        if head.get(*offset..offset + magic.len()) == Some(*magic) {
            return Ok(DriveContents::Foreign(name));
        }
    }
    Ok(DriveContents::Unrecognised)
}

/// Refuses a drive that holds anything recognised (see [`inspect_drive`]).
fn refuse_occupied(drive: &dyn Drive) -> Result<(), FormatError> {
    match inspect_drive(drive)? {
        DriveContents::Unrecognised => Ok(()),
        DriveContents::Appliance(superblock) => Err(FormatError::Occupied(format!(
            "holds appliance data (drive {}, formatted at unix time {})",
            uuid_text(&superblock.drive_uuid),
            superblock.created_unix_s
        ))),
        DriveContents::ApplianceUnreadable(reason) => Err(FormatError::UnreadableVersion(reason)),
        DriveContents::Foreign(name) => {
            Err(FormatError::Occupied(format!("holds a {name} signature")))
        }
    }
}

/// The usual text form of a UUID.
pub fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Lays out `size_bytes` with the given options.
fn geometry(size_bytes: u64, options: &FormatOptions) -> Result<Superblock, FormatError> {
    let segment_bytes = options.segment_bytes;
    if segment_bytes < SEGMENT_BYTES_MIN || !segment_bytes.is_multiple_of(4096) {
        return Err(FormatError::BadOptions(format!(
            "segment size {segment_bytes} must be a multiple of 4096 and at least {SEGMENT_BYTES_MIN}"
        )));
    }
    let files_max = options
        .files_max
        .unwrap_or((size_bytes >> 20).max(1024))
        .max(1);
    let estimate = u32::try_from(size_bytes / segment_bytes)
        .map_err(|_| FormatError::BadOptions("too many segments".into()))?;
    let region = checkpoint_region_bytes(estimate, files_max)
        .ok_or_else(|| FormatError::BadOptions(format!("files_max {files_max} is too large")))?;
    let too_large = || FormatError::BadOptions(format!("files_max {files_max} is too large"));
    let reserved = region
        .checked_mul(2)
        .and_then(|regions| regions.checked_add(2 * SUPERBLOCK_BYTES))
        .ok_or_else(too_large)?;
    let segments_offset_bytes = reserved
        .div_ceil(SEGMENTS_ALIGN_BYTES)
        .checked_mul(SEGMENTS_ALIGN_BYTES)
        .ok_or_else(too_large)?;
    let needed_bytes = segment_bytes
        .checked_mul(4)
        .and_then(|segments| segments.checked_add(segments_offset_bytes))
        .ok_or_else(too_large)?;
    if size_bytes < needed_bytes {
        return Err(FormatError::TooSmall {
            size_bytes,
            needed_bytes,
        });
    }
    let segment_count = u32::try_from((size_bytes - segments_offset_bytes) / segment_bytes)
        .expect("below the estimate");
    let superblock = Superblock {
        format_version: FORMAT_VERSION,
        drive_uuid: options.drive_uuid,
        segment_bytes,
        segment_count,
        segments_offset_bytes,
        checkpoint_region_bytes: region,
        files_max,
        created_unix_s: options.now_unix_s,
        drive_size_bytes: size_bytes,
    };
    superblock
        .validate()
        .map_err(|error| FormatError::BadOptions(error.to_string()))?;
    Ok(superblock)
}

/// Formats `drive`: an empty store whose log starts in segment 0.
pub fn format_drive(drive: &dyn Drive, options: &FormatOptions) -> Result<Superblock, FormatError> {
    let superblock = geometry(drive.info().size_bytes, options)?;
    if !options.force {
        refuse_occupied(drive)?;
    }
    // Old checkpoints and the start of the first log segment are cleared, so nothing of an
    // earlier format can be mistaken for this one's (record checksums are also salted).
    let segment_area = u64::from(superblock.segment_count) * superblock.segment_bytes;
    let _ = drive.discard(superblock.segments_offset_bytes, segment_area);
    for offset in [
        0,
        superblock.checkpoint_offset_bytes(1),
        superblock.segments_offset_bytes,
    ] {
        write_all_at(
            drive,
            offset,
            AlignedBuf::new(SEGMENTS_ALIGN_BYTES.min(4096 * 16) as usize),
        )?;
    }
    let mut body = Vec::new();
    for segment in 0..superblock.segment_count {
        let kind = if segment == 0 {
            SegmentKind::Log
        } else {
            SegmentKind::Free
        };
        SegmentRow { kind, live: 0 }.encode(&mut body);
    }
    let header = CheckpointHeader {
        format_version: superblock.format_version,
        generation: 1,
        epoch: 1,
        log_head: LogPosition {
            offset_bytes: superblock.segments_offset_bytes,
            seq: 1,
        },
        segment_count: superblock.segment_count,
        entry_count: 0,
        body_bytes: body.len() as u64,
        body_crc: crc32c::crc32c(&body),
        drive_uuid: superblock.drive_uuid,
    };
    let mut checkpoint = header.encode();
    checkpoint.extend_from_slice(&body);
    write_all_at(
        drive,
        superblock.checkpoint_offset_bytes(0),
        AlignedBuf::from_slice_padded(&checkpoint),
    )?;
    drive.flush()?;
    let encoded = superblock.encode();
    for copy in 0..2 {
        write_all_at(
            drive,
            copy * SUPERBLOCK_BYTES,
            AlignedBuf::from_slice_padded(&encoded),
        )?;
    }
    drive.flush()?;
    Ok(superblock)
}
