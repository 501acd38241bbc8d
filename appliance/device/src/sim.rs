//! A deterministic simulated drive for the store's simulation tests.
//!
//! Writes land in a volatile layer until `flush`; a simulated crash keeps, loses or tears each
//! unflushed write (in 4 KiB sectors) and applies the survivors in a shuffled order, the way a
//! drive's write cache may reorder them. Read and write errors are injected from the same seeded
//! generator, so a failing seed replays exactly. Single-threaded use is deterministic.

use crate::{assert_aligned, AlignedBuf, Drive, DriveInfo, DriveKind, Ticket, BLOCK_BYTES};
use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::Mutex;

/// Probabilities of injected faults, in parts per million of operations.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimFaults {
    /// A read fails with EIO.
    pub read_error_ppm: u32,
    /// A write fails with EIO (and writes nothing).
    pub write_error_ppm: u32,
    /// At a crash, an unflushed write is lost entirely.
    pub crash_lose_ppm: u32,
    /// At a crash, an unflushed write keeps only a random prefix of its sectors.
    pub crash_tear_ppm: u32,
}

/// How to build a simulated drive.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Name shown as the drive's path.
    pub name: String,
    /// Size in bytes, a multiple of 4 KiB.
    pub size_bytes: u64,
    /// Seed of the fault generator.
    pub seed: u64,
    /// Fault probabilities.
    pub faults: SimFaults,
}

struct SimState {
    durable: Vec<u8>,
    volatile: Vec<(u64, Vec<u8>)>,
    rng: SplitMix64,
    faults: SimFaults,
    failed: bool,
    /// Writes, flushes and discards left before the power is cut (None: never).
    operations_until_power_cut: Option<u64>,
}

/// An in-memory drive with a volatile write cache and seeded faults.
pub struct SimDrive {
    info: DriveInfo,
    state: Mutex<SimState>,
}

impl SimDrive {
    /// A zero-filled simulated drive.
    pub fn new(config: &SimConfig) -> SimDrive {
        assert_aligned("simulated drive size", config.size_bytes);
        let size = usize::try_from(config.size_bytes).expect("simulated drive fits in memory");
        SimDrive {
            info: DriveInfo {
                path: PathBuf::from(&config.name),
                kind: DriveKind::Simulated,
                size_bytes: config.size_bytes,
                logical_block_bytes: 4096,
                model: Some("simulated".to_string()),
                serial: None,
            },
            state: Mutex::new(SimState {
                durable: vec![0; size],
                volatile: Vec::new(),
                rng: SplitMix64(config.seed),
                faults: config.faults,
                failed: false,
                operations_until_power_cut: None,
            }),
        }
    }

    /// Cuts the power after `operations` more writes, flushes or discards: from then on every
    /// operation fails with EIO and changes nothing, until `crash` restores power.
    pub fn cut_power_after(&self, operations: u64) {
        self.lock().operations_until_power_cut = Some(operations);
    }

    /// Simulates a power cut: unflushed writes are kept, lost or torn, in shuffled order.
    /// Power comes back afterwards.
    pub fn crash(&self) {
        let mut state = self.lock();
        state.operations_until_power_cut = None;
        let mut pending = std::mem::take(&mut state.volatile);
        shuffle(&mut pending, &mut state.rng);
        for (offset, mut data) in pending {
            let roll = state.rng.below(1_000_000);
            let lose = state.faults.crash_lose_ppm;
            let tear = state.faults.crash_tear_ppm;
            if roll < u64::from(lose) {
                continue;
            }
            if roll < u64::from(lose) + u64::from(tear) {
                let sectors = data.len() as u64 / BLOCK_BYTES;
                let kept = state.rng.below(sectors);
                data.truncate(usize::try_from(kept * BLOCK_BYTES).expect("fits"));
            }
            apply(&mut state.durable, offset, &data);
        }
    }

    /// Makes the drive fail every later operation, as a pulled or dead drive does.
    pub fn fail(&self) {
        self.lock().failed = true;
    }

    /// Changes the fault probabilities (for example to stop injecting during a final check).
    pub fn set_faults(&self, faults: SimFaults) {
        self.lock().faults = faults;
    }

    /// Overwrites durable bytes directly, bypassing the store (to simulate bit rot).
    pub fn corrupt(&self, offset_bytes: u64, bytes: &[u8]) {
        apply(&mut self.lock().durable, offset_bytes, bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn check_range(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        match offset_bytes.checked_add(length_bytes) {
            Some(end) if end <= self.info.size_bytes => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("range {offset_bytes}+{length_bytes} is past the end of the drive"),
            )),
        }
    }

    fn read_into(&self, offset_bytes: u64, buf: &mut [u8], inject: bool) -> io::Result<()> {
        self.check_range(offset_bytes, buf.len() as u64)?;
        let mut state = self.lock();
        if state.failed || state.operations_until_power_cut == Some(0) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if inject && state.rng.below(1_000_000) < u64::from(state.faults.read_error_ppm) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let start = usize::try_from(offset_bytes).expect("fits");
        buf.copy_from_slice(&state.durable[start..start + buf.len()]);
        for (write_offset, data) in &state.volatile {
            overlay(buf, offset_bytes, *write_offset, data);
        }
        Ok(())
    }
}

impl Drive for SimDrive {
    fn info(&self) -> &DriveInfo {
        &self.info
    }

    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        assert_aligned("write offset", offset_bytes);
        assert_aligned("write length", buf.len() as u64);
        if let Err(error) = self.check_range(offset_bytes, buf.len() as u64) {
            return Ticket::ready(Err(error), buf);
        }
        let mut state = self.lock();
        let injected = state.rng.below(1_000_000) < u64::from(state.faults.write_error_ppm);
        if state.failed || state.power_is_cut() || injected {
            return Ticket::ready(Err(io::Error::from_raw_os_error(libc::EIO)), buf);
        }
        state.volatile.push((offset_bytes, buf.to_vec()));
        drop(state);
        Ticket::ready(Ok(()), buf)
    }

    fn read_at(&self, offset_bytes: u64, mut buf: AlignedBuf) -> Ticket {
        assert_aligned("read offset", offset_bytes);
        assert_aligned("read length", buf.len() as u64);
        let result = self.read_into(offset_bytes, &mut buf, true);
        Ticket::ready(result, buf)
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.lock();
        if state.failed || state.power_is_cut() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let pending = std::mem::take(&mut state.volatile);
        for (offset, data) in pending {
            apply(&mut state.durable, offset, &data);
        }
        Ok(())
    }

    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        assert_aligned("discard offset", offset_bytes);
        assert_aligned("discard length", length_bytes);
        self.check_range(offset_bytes, length_bytes)?;
        let zeros = vec![0u8; usize::try_from(length_bytes).expect("fits")];
        let mut state = self.lock();
        if state.failed || state.power_is_cut() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        state.volatile.push((offset_bytes, zeros));
        Ok(())
    }

    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_into(offset_bytes, buf, true)
    }

    fn drop_cached(&self, _offset_bytes: u64, _length_bytes: u64) -> io::Result<()> {
        Ok(())
    }

    fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl SimState {
    /// Counts one mutating operation toward the power cut; true once the power is off.
    fn power_is_cut(&mut self) -> bool {
        match &mut self.operations_until_power_cut {
            None => false,
            Some(0) => true,
            Some(left) => {
                *left -= 1;
                false
            }
        }
    }
}

fn apply(durable: &mut [u8], offset_bytes: u64, data: &[u8]) {
    let start = usize::try_from(offset_bytes).expect("fits");
    durable[start..start + data.len()].copy_from_slice(data);
}

/// Copies the part of a write (at `write_offset`) that overlaps a read (at `read_offset`).
fn overlay(buf: &mut [u8], read_offset: u64, write_offset: u64, data: &[u8]) {
    let read_end = read_offset + buf.len() as u64;
    let write_end = write_offset + data.len() as u64;
    let start = read_offset.max(write_offset);
    let end = read_end.min(write_end);
    if start >= end {
        return;
    }
    let to = usize::try_from(start - read_offset).expect("fits");
    let from = usize::try_from(start - write_offset).expect("fits");
    let length = usize::try_from(end - start).expect("fits");
    buf[to..to + length].copy_from_slice(&data[from..from + length]);
}

fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = usize::try_from(rng.below(i as u64 + 1)).expect("fits");
        items.swap(i, j);
    }
}

/// SplitMix64: a tiny, well-mixed generator whose sequence depends only on its seed.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (0 when bound is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        self.next_u64() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_exact_at, write_all_at};

    fn drive(faults: SimFaults) -> SimDrive {
        SimDrive::new(&SimConfig {
            name: "sim0".into(),
            size_bytes: 1 << 20,
            seed: 7,
            faults,
        })
    }

    #[test]
    fn flushed_writes_survive_a_crash_and_unflushed_ones_may_not() {
        let sim = drive(SimFaults {
            crash_lose_ppm: 1_000_000,
            ..SimFaults::default()
        });
        let mut block = AlignedBuf::new(4096);
        block.fill(0xAB);
        write_all_at(&sim, 0, block).unwrap();
        sim.flush().unwrap();
        let mut block = AlignedBuf::new(4096);
        block.fill(0xCD);
        write_all_at(&sim, 4096, block).unwrap();
        let seen = read_exact_at(&sim, 4096, AlignedBuf::new(4096)).unwrap();
        assert!(
            seen.iter().all(|&b| b == 0xCD),
            "unflushed writes are readable"
        );
        sim.crash();
        let first = read_exact_at(&sim, 0, AlignedBuf::new(4096)).unwrap();
        let second = read_exact_at(&sim, 4096, AlignedBuf::new(4096)).unwrap();
        assert!(first.iter().all(|&b| b == 0xAB));
        assert!(
            second.iter().all(|&b| b == 0),
            "a lost write leaves the old bytes"
        );
    }

    #[test]
    fn a_failed_drive_refuses_everything() {
        let sim = drive(SimFaults::default());
        sim.fail();
        assert!(read_exact_at(&sim, 0, AlignedBuf::new(4096)).is_err());
        assert!(sim.flush().is_err());
    }
}
