//! The per-drive cap on data writes in flight (`StoreConfig::writes_in_flight_per_drive_max`):
//! many writers on one drive, with reclaim relocating files under them, never have more full
//! write buffers at the drive than the cap, measured at the drive itself; every file publishes
//! byte-exact, and nothing deadlocks (the run is bounded by a timeout).

use appliance_device::{
    AlignedBuf, Completion, Drive, DriveInfo, SimConfig, SimDrive, SimFaults, SplitMix64, Ticket,
};
use appliance_store::{format_drive, DriveSource, FormatOptions, Store, StoreConfig};
use sha2::{Digest, Sha256};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

const WRITE_BUFFER_BYTES: usize = 128 << 10;
const WRITES_PER_DRIVE_MAX: usize = 3;
const WRITERS: u64 = 12;
const FILES_PER_WRITER: u64 = 8;
/// Each file is whole write buffers, so every data write is exactly one buffer long and the
/// drive tells data writes from log writes (a few blocks) by their length.
const FILE_BUFFERS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(120);

/// A write the completer thread carries out later.
struct Job {
    offset_bytes: u64,
    buf: AlignedBuf,
    reply: mpsc::SyncSender<Completion>,
    data: bool,
}

/// A simulated drive whose writes complete a little later, on a thread of their own, in order,
/// like a real drive's queue; it counts full-buffer writes between submission and completion.
struct SlowDrive {
    inner: Arc<SimDrive>,
    jobs: mpsc::Sender<Job>,
    data_in_flight: Arc<AtomicUsize>,
    data_in_flight_peak: Arc<AtomicUsize>,
}

impl SlowDrive {
    fn new(inner: Arc<SimDrive>) -> SlowDrive {
        let (jobs, queue) = mpsc::channel::<Job>();
        let data_in_flight = Arc::new(AtomicUsize::new(0));
        let completer_drive = Arc::clone(&inner);
        let completer_count = Arc::clone(&data_in_flight);
        std::thread::spawn(move || {
            for job in queue {
                std::thread::sleep(Duration::from_micros(200));
                let completion = completer_drive.write_at(job.offset_bytes, job.buf).wait();
                if job.data {
                    completer_count.fetch_sub(1, Ordering::SeqCst);
                }
                let _ = job.reply.send(completion);
            }
        });
        SlowDrive {
            inner,
            jobs,
            data_in_flight,
            data_in_flight_peak: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Drive for SlowDrive {
    fn info(&self) -> &DriveInfo {
        self.inner.info()
    }

    fn write_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        let data = buf.len() == WRITE_BUFFER_BYTES;
        if data {
            let now = self.data_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.data_in_flight_peak.fetch_max(now, Ordering::SeqCst);
        }
        let (reply, receiver) = mpsc::sync_channel(1);
        let job = Job {
            offset_bytes,
            buf,
            reply,
            data,
        };
        self.jobs.send(job).expect("the completer thread runs");
        Ticket::pending(receiver)
    }

    fn read_at(&self, offset_bytes: u64, buf: AlignedBuf) -> Ticket {
        self.inner.read_at(offset_bytes, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn discard(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        self.inner.discard(offset_bytes, length_bytes)
    }

    fn read_cached(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_cached(offset_bytes, buf)
    }

    fn drop_cached(&self, offset_bytes: u64, length_bytes: u64) -> io::Result<()> {
        self.inner.drop_cached(offset_bytes, length_bytes)
    }

    fn serve_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

fn file_bytes(writer: u64, number: u64) -> Vec<u8> {
    let mut rng = SplitMix64((writer << 32) | number);
    (0..FILE_BUFFERS * WRITE_BUFFER_BYTES / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect()
}

fn path(writer: u64, number: u64) -> String {
    format!("/w{writer:02}/f{number:02}")
}

/// One writer: publishes its files in turn, deleting the one before last so that reclaim
/// finds segments worth emptying.
fn write_files(store: &Store, writer: u64) {
    for number in 0..FILES_PER_WRITER {
        let bytes = file_bytes(writer, number);
        let mut file = store
            .create(&path(writer, number), bytes.len() as u64)
            .unwrap();
        for chunk in bytes.chunks(10_000) {
            file.append(chunk).unwrap();
        }
        file.publish(Sha256::digest(&bytes).into()).unwrap();
        if number >= 2 && number.is_multiple_of(2) {
            store.delete(&path(writer, number - 2)).unwrap();
        }
    }
}

fn is_deleted(number: u64) -> bool {
    number.is_multiple_of(2) && number + 2 < FILES_PER_WRITER
}

#[test]
fn many_writers_never_exceed_the_drives_write_slots_and_publish_byte_exact() {
    let sim = Arc::new(SimDrive::new(&SimConfig {
        name: "sim0".into(),
        size_bytes: 96 << 20,
        seed: 7,
        faults: SimFaults::default(),
    }));
    let options = FormatOptions {
        segment_bytes: 2 << 20,
        files_max: Some(512),
        force: false,
        drive_uuid: [1; 16],
        now_unix_s: 1_700_000_000,
    };
    format_drive(&*sim, &options).expect("format");
    let drive = Arc::new(SlowDrive::new(sim));
    let peak = Arc::clone(&drive.data_in_flight_peak);
    let config = StoreConfig {
        write_buffer_bytes: WRITE_BUFFER_BYTES,
        writes_in_flight_max: 2,
        writes_in_flight_per_drive_max: WRITES_PER_DRIVE_MAX,
        ..StoreConfig::default()
    };
    let store = Store::open(vec![DriveSource::Opened(drive)], config);
    let (done, finished) = mpsc::channel();
    let running = store.clone();
    std::thread::spawn(move || {
        let writing = AtomicBool::new(true);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while writing.load(Ordering::SeqCst) {
                    running.reclaim_now().expect("reclaim");
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let writers: Vec<_> = (0..WRITERS)
                .map(|writer| {
                    let store = &running;
                    scope.spawn(move || write_files(store, writer))
                })
                .collect();
            for writer in writers {
                writer.join().expect("a writer");
            }
            writing.store(false, Ordering::SeqCst);
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(DEADLINE)
        .expect("writers and reclaim finish (no deadlock)");
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= WRITES_PER_DRIVE_MAX,
        "{peak} data writes in flight at once, above the cap of {WRITES_PER_DRIVE_MAX}"
    );
    let relocated = store.stats().relocated_files;
    assert!(relocated > 0, "reclaim moved files while the writers wrote");
    assert_eq!(
        peak, WRITES_PER_DRIVE_MAX,
        "{WRITERS} writers keep the drive's write slots busy"
    );
    for writer in 0..WRITERS {
        for number in 0..FILES_PER_WRITER {
            let handle = store.open_file(&path(writer, number)).unwrap();
            if is_deleted(number) {
                assert!(handle.is_none(), "{} was deleted", path(writer, number));
                continue;
            }
            let handle = handle.unwrap_or_else(|| panic!("{} published", path(writer, number)));
            let expected = file_bytes(writer, number);
            let mut read = vec![0u8; expected.len()];
            handle.read_at(0, &mut read).unwrap();
            assert!(read == expected, "{}: bytes differ", path(writer, number));
        }
    }
}
