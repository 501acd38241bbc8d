//! Black-box tests of `UringDrive` on temporary files and, as root, on a loop device.
//!
//! Owns only its scratch files (under the target's tmp directory) and the loop device it
//! attaches (`appliance_testkit::LoopDevice`, detached when dropped).

use appliance_device::{
    read_exact_at, write_all_at, AlignedBuf, Drive, DriveKind, UringConfig, UringDrive,
};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;

const MIB: u64 = 1 << 20;

/// A scratch file of `size_bytes` that is removed when dropped.
struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    fn new(name: &str, size_bytes: u64) -> ScratchFile {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("uring-tests");
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let path = dir.join(format!("{name}-{}", std::process::id()));
        let file = File::create(&path).expect("create scratch file");
        file.set_len(size_bytes).expect("size scratch file");
        ScratchFile { path }
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn open(path: &Path, queue_depth: u32) -> UringDrive {
    UringDrive::open(path, &UringConfig { queue_depth }).expect("open drive")
}

/// A block-sized buffer whose bytes depend on where it is written and a seed.
fn pattern(offset_bytes: u64, length_bytes: u64, seed: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::new(usize::try_from(length_bytes).expect("fits"));
    for (index, byte) in buf.iter_mut().enumerate() {
        let position = offset_bytes + index as u64;
        let block_mark = u8::try_from(position / 4096 % 251).expect("below 251");
        let byte_mark = u8::try_from(position % 7).expect("below 7");
        *byte = block_mark ^ byte_mark ^ seed;
    }
    buf
}

/// Writes each `(offset, length, seed)`, then reads every one back and compares.
fn check_round_trip(drive: &dyn Drive, cases: &[(u64, u64, u8)]) {
    for &(offset, length, seed) in cases {
        write_all_at(drive, offset, pattern(offset, length, seed)).expect("write");
    }
    drive.flush().expect("flush");
    for &(offset, length, seed) in cases {
        let buf = AlignedBuf::new(usize::try_from(length).expect("fits"));
        let read = read_exact_at(drive, offset, buf).expect("read");
        assert!(
            read[..] == pattern(offset, length, seed)[..],
            "bytes at {offset}+{length} differ"
        );
    }
}

const ROUND_TRIP_CASES: &[(u64, u64, u8)] = &[
    (0, 4096, 1),
    (4096, 8192, 2),
    (MIB, 64 * 1024, 3),
    (5 * MIB + 12 * 4096, 3 * MIB, 4),
    (16 * MIB - 4096, 4096, 5),
];

/// The same ranges with other bytes, to check overwrites.
fn reseeded(cases: &[(u64, u64, u8)], seed: u8) -> Vec<(u64, u64, u8)> {
    cases
        .iter()
        .map(|&(offset, length, old)| (offset, length, old ^ seed))
        .collect()
}

#[test]
fn writes_read_back_at_several_offsets() {
    let scratch = ScratchFile::new("round-trip", 16 * MIB);
    let drive = open(&scratch.path, 32);
    let info = drive.info();
    assert_eq!(info.kind, DriveKind::RegularFile);
    assert_eq!(info.size_bytes, 16 * MIB);
    assert!(matches!(info.logical_block_bytes, 512 | 4096));
    assert_eq!(info.path, scratch.path);
    check_round_trip(&drive, ROUND_TRIP_CASES);
    check_round_trip(&drive, &reseeded(ROUND_TRIP_CASES, 0x5A));
}

#[test]
fn file_size_is_rounded_down_to_whole_blocks() {
    let scratch = ScratchFile::new("rounded", MIB + 100);
    assert_eq!(open(&scratch.path, 4).info().size_bytes, MIB);
}

/// Several threads each submit many writes before waiting for any, at every queue depth
/// (1 exercises a full submission queue); some flush with their writes still in flight.
#[test]
fn concurrent_writes_from_several_threads_read_back_after_flush() {
    const THREADS: u64 = 6;
    const WRITES_PER_THREAD: u64 = 48;
    const WRITE_BYTES: u64 = 16 * 1024;
    for queue_depth in [1, 4, 32] {
        let scratch = ScratchFile::new(&format!("concurrent-{queue_depth}"), 8 * MIB);
        let drive = Arc::new(open(&scratch.path, queue_depth));
        let offset_of = |thread: u64, write: u64| (write * THREADS + thread) * WRITE_BYTES;
        let workers: Vec<_> = (0..THREADS)
            .map(|thread_index| {
                let drive = Arc::clone(&drive);
                thread::spawn(move || {
                    let tickets: Vec<_> = (0..WRITES_PER_THREAD)
                        .map(|write| {
                            let offset = offset_of(thread_index, write);
                            drive.write_at(offset, pattern(offset, WRITE_BYTES, 9))
                        })
                        .collect();
                    if thread_index % 2 == 0 {
                        drive.flush().expect("flush with writes in flight");
                    }
                    for ticket in tickets {
                        ticket.wait().0.expect("write");
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("writer thread");
        }
        drive.flush().expect("flush");
        for thread_index in 0..THREADS {
            for write in 0..WRITES_PER_THREAD {
                let offset = offset_of(thread_index, write);
                let buf = AlignedBuf::new(usize::try_from(WRITE_BYTES).expect("fits"));
                let read = read_exact_at(&*drive, offset, buf).expect("read");
                assert!(
                    read[..] == pattern(offset, WRITE_BYTES, 9)[..],
                    "depth {queue_depth}"
                );
            }
        }
    }
}

#[test]
fn cached_reads_see_direct_writes() {
    let scratch = ScratchFile::new("cached", MIB);
    let drive = open(&scratch.path, 8);
    assert!(drive.serve_fd().is_some());
    let mut before = vec![0xFFu8; 10_000];
    drive
        .read_cached(100, &mut before)
        .expect("cached read fills the page cache");
    assert!(before.iter().all(|&b| b == 0));
    write_all_at(&drive, 0, pattern(0, 16_384, 3)).expect("write");
    let mut after = vec![0u8; 10_000];
    drive.read_cached(100, &mut after).expect("cached read");
    assert!(after[..] == pattern(0, 16_384, 3)[100..10_100]);
    drive.drop_cached(0, 16_384).expect("drop cached");
    drive.drop_cached(0, 0).expect("drop nothing");
    let error = drive
        .read_cached(MIB - 10, &mut after)
        .expect_err("past the end");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn a_second_open_is_refused_while_the_drive_is_in_use() {
    let scratch = ScratchFile::new("in-use", MIB);
    let first = open(&scratch.path, 4);
    let error = UringDrive::open(&scratch.path, &UringConfig::default())
        .err()
        .expect("second open must fail");
    let message = error.to_string();
    assert!(message.contains("in use by another process"), "{message}");
    assert!(
        message.contains(&scratch.path.display().to_string()),
        "{message}"
    );
    drop(first);
    let again = UringDrive::open(&scratch.path, &UringConfig::default());
    assert!(again.is_ok(), "dropping the drive releases its lock");
}

#[test]
fn open_errors_name_the_path() {
    let missing = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-such-drive");
    let directory = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let empty = ScratchFile::new("empty", 0);
    for path in [missing.as_path(), directory, empty.path.as_path()] {
        let error = UringDrive::open(path, &UringConfig::default())
            .err()
            .expect("open must fail");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }
}

#[test]
fn ranges_past_the_end_are_errors() {
    let scratch = ScratchFile::new("range", MIB);
    let drive = open(&scratch.path, 4);
    let cases: &[(u64, u64)] = &[(MIB, 4096), (MIB - 4096, 8192), (u64::MAX - 4095, 4096)];
    for &(offset, length) in cases {
        let buf = AlignedBuf::new(usize::try_from(length).expect("fits"));
        let (result, buf) = drive.write_at(offset, buf).wait();
        assert_eq!(buf.len() as u64, length, "the buffer comes back");
        let error = result.expect_err("write past the end");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let (result, _) = drive.read_at(offset, buf).wait();
        assert_eq!(
            result.expect_err("read").kind(),
            io::ErrorKind::InvalidInput
        );
        let error = drive
            .discard(offset, length)
            .expect_err("discard past the end");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
    read_exact_at(&drive, MIB - 4096, AlignedBuf::new(4096)).expect("the last block is fine");
}

#[test]
#[should_panic(expected = "not a multiple of 4096")]
fn unaligned_offsets_panic() {
    let scratch = ScratchFile::new("unaligned", MIB);
    let drive = open(&scratch.path, 4);
    let _ = drive.write_at(512, AlignedBuf::new(4096));
}

/// Writes three blocks, discards the middle one, and expects zeros there only.
fn check_discard(drive: &dyn Drive, offset: u64) {
    write_all_at(drive, offset, pattern(offset, 3 * 4096, 7)).expect("write");
    drive.flush().expect("flush");
    drive.discard(offset + 4096, 4096).expect("discard");
    let read = read_exact_at(drive, offset, AlignedBuf::new(3 * 4096)).expect("read");
    let expected = pattern(offset, 3 * 4096, 7);
    assert!(
        read[..4096] == expected[..4096],
        "the block before is intact"
    );
    assert!(
        read[4096..8192].iter().all(|&b| b == 0),
        "the discarded block reads zeros"
    );
    assert!(
        read[8192..] == expected[8192..],
        "the block after is intact"
    );
}

#[test]
fn discard_punches_a_hole_in_a_file() {
    let scratch = ScratchFile::new("discard", MIB);
    let drive = open(&scratch.path, 4);
    check_discard(&drive, 64 * 1024);
    drive.discard(0, 0).expect("an empty discard is fine");
}

#[test]
fn dropping_tickets_and_the_drive_with_operations_in_flight_is_clean() {
    let scratch = ScratchFile::new("drop", 4 * MIB);
    let drive = open(&scratch.path, 4);
    for block in 0..64u64 {
        drop(drive.write_at(block * 4096, pattern(block * 4096, 4096, 1)));
    }
    let tickets: Vec<_> = (0..64u64)
        .map(|block| drive.read_at(block * 4096, AlignedBuf::new(4096)))
        .collect();
    drop(drive);
    for ticket in tickets {
        ticket
            .wait()
            .0
            .expect("reads submitted before the drop complete");
    }
}

#[test]
fn loop_device_round_trip() {
    if !appliance_testkit::is_root() {
        eprintln!("skipping the loop device test: it needs root to run losetup");
        return;
    }
    let backing = ScratchFile::new("loop-backing", 64 * MIB);
    let loop_device = match appliance_testkit::LoopDevice::attach(&backing.path) {
        Ok(loop_device) => loop_device,
        Err(reason) => {
            eprintln!("skipping the loop device test: {reason}");
            return;
        }
    };
    let drive = open(&loop_device.path, 16);
    let info = drive.info();
    assert_eq!(info.kind, DriveKind::BlockDevice);
    assert_eq!(info.size_bytes, 64 * MIB);
    assert!(matches!(info.logical_block_bytes, 512 | 4096));
    let cases: Vec<_> = ROUND_TRIP_CASES
        .iter()
        .map(|&(offset, length, seed)| (offset % (60 * MIB), length, seed))
        .collect();
    check_round_trip(&drive, &cases);
    let mut cached = vec![0u8; 4096];
    drive.read_cached(MIB, &mut cached).expect("cached read");
    assert!(cached[..] == pattern(MIB, 64 * 1024, 3)[..4096]);
    check_discard(&drive, 32 * MIB);
    let error = UringDrive::open(&loop_device.path, &UringConfig::default())
        .err()
        .expect("a second open of the device must fail");
    assert!(error.to_string().contains("in use"), "{error}");
    drop(drive);
}
