//! Shared by the store's simulations: two simulated drives with crash faults, formatted alike.

use appliance_device::{SimConfig, SimDrive, SimFaults};
use appliance_store::{format_drive, FormatOptions};
use std::sync::Arc;

/// Simulated drives `sim0`, `sim1`, ... of `size_bytes`, one per fault seed, that lose and
/// tear unflushed writes at a crash; formatted with 2 MiB segments for 256 files each.
pub fn crash_prone_drives(size_bytes: u64, fault_seeds: &[u64]) -> Vec<Arc<SimDrive>> {
    let faults = SimFaults {
        read_error_ppm: 0,
        write_error_ppm: 0,
        crash_lose_ppm: 300_000,
        crash_tear_ppm: 300_000,
    };
    let mut drives = Vec::new();
    for (number, seed) in fault_seeds.iter().enumerate() {
        let drive = Arc::new(SimDrive::new(&SimConfig {
            name: format!("sim{number}"),
            size_bytes,
            seed: *seed,
            faults,
        }));
        let options = FormatOptions {
            segment_bytes: 2 << 20,
            files_max: Some(256),
            force: false,
            drive_uuid: [u8::try_from(number + 1).expect("few drives"); 16],
            now_unix_s: 1_700_000_000,
        };
        format_drive(&*drive, &options).expect("format");
        drives.push(drive);
    }
    drives
}
