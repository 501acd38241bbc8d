//! `cargo xtask vm-test`: boots the appliance image (`cargo xtask image`) in QEMU from its own
//! bootloader, under software emulation (`-accel tcg`), with four emulated NVMe data drives,
//! and drives it from the host:
//!
//! 1. boot: `/health` answers and systemd reported `applianced` started (serial console); the
//!    first boot formatted the four blank data drives and left out a fifth NVMe drive that
//!    holds an ext4 filesystem (another kind of data), which stays untouched;
//! 2. fill from nginx on the host's loopback, which the guest reaches only through QEMU's
//!    `guestfwd` rule, started and awaited with `appliance-ctl --json fill --wait` in the
//!    guest, then ranges of every file compared byte by byte through `hostfwd`; the guest's
//!    `appliance-ctl status`, and its man page and bash completion in place; HTTPS ranges
//!    through another `hostfwd` port are byte-exact, and the guest kernel's TLS counters
//!    (/proc/net/tls_stat) show that it encrypted them (kTLS: the keys went to the kernel
//!    after the handshake, and the bodies went out with sendfile);
//! 3. one data drive hot-removed (`device_del` over QMP): the other drives keep serving, the
//!    drive is reported failed in `/health` and `/metrics`, and the daemon was not restarted
//!    (same PID on the serial console, no restart by systemd);
//! 4. bundle v2 installed with `appliance-ctl update` from the guestfwd origin, then a clean
//!    reboot (ACPI power button, then reset) into it: v2 boots from slot B and is marked good,
//!    what the other drives hold is served after recovery without a refill, and the next fill
//!    restores the lost files onto them;
//! 5. the guest's `systemd-analyze security applianced.service` (printed on the console by
//!    appliance-security-report.service at every boot);
//! 6. and 7. the rest of the update story (`vm/update.rs`): unsigned, wrongly signed and
//!    tampered bundles refused with the slots unchanged; a broken bundle rolled back from by
//!    the box itself;
//! 8. the same disks booted by OVMF (UEFI): healthy, byte-exact, and an update installed,
//!    booted and marked good under UEFI.
//!
//! The guest's network is QEMU user mode with `restrict=on`: it reaches nothing but the
//! `guestfwd` origin, and the host reaches it only on 127.0.0.1 (`hostfwd`: serving, and the
//! read-only admin port's `/health` and `/metrics`). Actions run `appliance-ctl` in the guest
//! through the QEMU guest agent (`guest-exec` on a virtio-serial port; `guest_agent.rs`).
//! Everything started here (QEMU, nginx) is stopped by guards when the test ends, fails or
//! panics.
//! Work files: target/vm-test/ (serial.log is the guest's console).

mod update;

use crate::guest_agent::GuestAgent;
use crate::{image, util};
use anyhow::{anyhow, bail, Context, Result};
use appliance_testkit::{free_port, Manifest, Nginx};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Tools the VM test runs, and the Debian packages that carry them.
const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
    ("nginx", "nginx"),
    ("socat", "socat"),
    ("mkfs.ext4", "e2fsprogs"),
    ("rauc", "rauc"),
    ("mksquashfs", "squashfs-tools"),
];

/// Files the VM test reads from packages that put no program on the PATH.
const VM_FILES: &[(&str, &str)] = &[(OVMF_CODE, "ovmf"), (OVMF_VARS, "ovmf")];

const DATA_DRIVES: usize = 4;
const DATA_DRIVE_BYTES: u64 = 512 << 20;
/// A drive holding another kind of data (an ext4 filesystem): never a data drive.
const FOREIGN_DRIVE_BYTES: u64 = 64 << 20;
/// The origin's address inside the guest (QEMU's guestfwd rule).
const ORIGIN: &str = "10.0.2.100";
const CATALOG_FILES: usize = 40;
/// Boot to healthy under single-threaded TCG took 208 s on this machine alone and over 240 s
/// in a CI run (the whole boot is uniformly slow there, not one unit): room for a slow host.
const BOOT_TIMEOUT: Duration = Duration::from_secs(540);
const FILL_TIMEOUT: Duration = Duration::from_secs(240);
/// How long a short `appliance-ctl` command (status) may take in the guest.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Where the image installs the CLI, its man page and its bash completion.
const GUEST_CTL: &str = "/usr/bin/appliance-ctl";
const GUEST_CTL_COMPLETION: &str = "/usr/share/bash-completion/completions/appliance-ctl";
const GUEST_MAN_PAGES: &[&str] = &[
    "/usr/share/man/man1/appliance-ctl.1.gz",
    "/usr/share/man/man1/appliance-ctl-fill.1.gz",
    "/usr/share/man/man8/applianced.8.gz",
];

/// The guest's base configuration, handed over through QEMU's fw_cfg (appliance-firstboot
/// prefers it to /etc/appliance/appliance.base.toml): the admin listener on every address so
/// that the hostfwd rule reaches it, and the origin behind guestfwd as the only source.
const LAB_CONFIG: &str = r#"# The VM test's lab configuration (tools/xtask/src/vm.rs), from QEMU fw_cfg.
state_dir = "/var/lib/appliance"
log_level = "info"

[serve]
listen = "0.0.0.0:80"
# In the VM only: QEMU's hostfwd rule exposes it on the host's 127.0.0.1, nowhere else.
admin_listen = "0.0.0.0:8081"
access_log = "off"
shutdown_grace_ms = 5000

[fill]
sources = ["http://10.0.2.100"]
window = ""
concurrency = 4
attempts_per_source = 3
backoff_initial_ms = 200

# HTTPS with the certificate the test made (fw_cfg, installed by appliance-firstboot); the
# Debian kernel's TLS module is loaded at boot, so connections use kTLS.
[tls]
listen = "0.0.0.0:443"
certificates = [{ cert = "/etc/appliance/tls/lab.pem", key = "/etc/appliance/tls/lab.key" }]
"#;

/// The name on the lab certificate (the host's curl resolves it to the hostfwd port).
const TLS_NAME: &str = "appliance.lab.example";

pub fn test() -> Result<()> {
    let started = Instant::now();
    image::ensure_packages(VM_TOOLS, VM_FILES)?;
    // Again: installing Debian 12's qemu-system-x86 removes a newer qemu-utils (a backport)
    // that conflicts with it, and qemu-img with it.
    image::ensure_packages(VM_TOOLS, VM_FILES)?;
    let mut timings = Timings::default();
    let step = Instant::now();
    let image = image::image()?;
    timings.add("image build (cached when nothing changed)", step);

    let work = util::workspace_root().join("target/vm-test");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let catalog = Catalog::write(&work.join("origin"))?;
    println!(
        "vm-test: catalog of {} files, {} MiB, on nginx (loopback), {ORIGIN}:80 in the guest",
        catalog.files.len(),
        catalog
            .files
            .iter()
            .map(|file| file.bytes.len())
            .sum::<usize>()
            >> 20
    );
    let step = Instant::now();
    let bundles = update::build_bundles(&work.join("origin"), &work)?;
    timings.add(
        "bundles: v2, broken, unsigned, wrongly signed, tampered",
        step,
    );
    let nginx = Nginx::builder(&work.join("nginx"), &work.join("origin"))
        .access_log(true)
        .start()?;
    let bios = Start {
        firmware: Firmware::Bios,
        fresh_disks: true,
        removed: Vec::new(),
    };
    let mut vm = Vm::start(&work, &image, nginx.port, &bios)?;
    let mut result = run_steps(&mut vm, &catalog, &bundles, &mut timings)
        .and_then(|()| update::run(&mut vm, &catalog, &bundles, &mut timings));
    if result.is_ok() {
        // 9. The same disks under UEFI firmware (OVMF).
        let step = Instant::now();
        result = vm.power_off();
        timings.add("power off (SeaBIOS VM)", step);
    }
    if result.is_ok() {
        vm.stop();
        let uefi = Start {
            firmware: Firmware::Uefi,
            fresh_disks: false,
            removed: vm.removed.clone(),
        };
        result = match Vm::start(&work, &image, nginx.port, &uefi) {
            Ok(next) => {
                vm = next;
                update::under_uefi(&mut vm, &catalog, &bundles, &mut timings)
            }
            Err(error) => Err(error),
        };
    }
    if let Err(error) = &result {
        println!("vm-test: FAILED: {error:#}");
        println!(
            "vm-test: the guest's console, last lines ({}):",
            vm.serial.display()
        );
        let text = vm.serial_text();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(60)..] {
            println!("  | {line}");
        }
        // How the daemon saw its responses end (a cut, a client abort, a server error).
        match vm.admin_text("/metrics") {
            Ok(metrics) => {
                println!("vm-test: the daemon's serving counters:");
                let serving = [
                    "appliance_http_",
                    "appliance_sendfile_",
                    "appliance_drive_up",
                ];
                for line in metrics.lines().filter(|line| {
                    !line.starts_with('#') && serving.iter().any(|name| line.starts_with(name))
                }) {
                    println!("  | {line}");
                }
            }
            Err(error) => println!("vm-test: no /metrics: {error:#}"),
        }
    }
    drop(vm);
    drop(nginx);
    if result.is_ok() {
        // Keep the logs (serial.log, qemu.log, nginx/); drop the disks.
        for number in 0..DATA_DRIVES {
            let _ = std::fs::remove_file(work.join(format!("data{number}.img")));
        }
        let _ = std::fs::remove_file(work.join("boot.qcow2"));
        let _ = std::fs::remove_file(work.join("foreign.img"));
        let _ = std::fs::remove_dir_all(work.join("origin"));
    }
    timings.print();
    println!(
        "vm-test: {} in {:.0} s",
        if result.is_ok() { "passed" } else { "failed" },
        started.elapsed().as_secs_f64()
    );
    result
}

fn run_steps(
    vm: &mut Vm,
    catalog: &Catalog,
    bundles: &update::Bundles,
    timings: &mut Timings,
) -> Result<()> {
    // 1. Boot to healthy.
    let step = Instant::now();
    let boot = vm.wait_healthy(0, vm.started)?;
    let pid = boot.pid;
    println!(
        "vm-test: 1. healthy {:.1} s after QEMU started (applianced PID {pid}); drives: {}",
        vm.started.elapsed().as_secs_f64(),
        drive_summary(&boot.health)
    );
    let drives = boot.health["drives"].as_array().map_or(0, Vec::len);
    if drives != DATA_DRIVES || boot.health.to_string().contains("foreign") {
        bail!(
            "/health lists {drives} drives, expected the {DATA_DRIVES} blank ones: {}",
            boot.health
        );
    }
    let console = vm.serial_text();
    let refused = console.lines().find(|line| {
        line.contains("appliance-firstboot[")
            && line.contains("Ctrl_foreign_1")
            && line.contains("left out")
    });
    let Some(refused) = refused else {
        bail!("the console does not show the ext4 drive left out by appliance-firstboot");
    };
    println!(
        "vm-test: 1. the drive holding ext4 was left out: {}",
        refused
            .split("appliance-firstboot")
            .nth(1)
            .unwrap_or(refused)
            .trim()
    );
    timings.add(
        "1. boot to healthy (QEMU start to /health 200, applianced active)",
        step,
    );

    // 2. Fill from the origin through guestfwd; verify every file through hostfwd.
    let step = Instant::now();
    let report = vm.fill()?;
    if report["files_fetched"] != catalog.files.len() {
        bail!(
            "the fill fetched {} files, not {}",
            report["files_fetched"],
            catalog.files.len()
        );
    }
    let served = vm.check_catalog(catalog)?;
    if served.missing.is_empty() {
        println!(
            "vm-test: 2. filled {} files ({} bytes); ranges of every file equal the origin's",
            catalog.files.len(),
            report["bytes_fetched"]
        );
    } else {
        bail!("after the fill, not served: {:?}", served.missing);
    }
    timings.add(
        "2. fill through guestfwd + byte-exact ranges through hostfwd",
        step,
    );
    let step = Instant::now();
    vm.show_status_and_docs()?;
    timings.add(
        "2. appliance-ctl status, man page and completion in the guest",
        step,
    );
    let step = Instant::now();
    vm.check_https(catalog)?;
    timings.add(
        "2. HTTPS ranges through hostfwd, carried by the guest's kTLS",
        step,
    );

    // 3. Hot-remove the data drive holding the most files.
    let step = Instant::now();
    let health = vm.admin_json("/health")?;
    let (victim_path, victim_files) = health["drives"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|drive| {
            (
                drive["path"].as_str().unwrap_or("").to_string(),
                drive["files"].as_u64().unwrap_or(0),
            )
        })
        .max_by_key(|(_, files)| *files)
        .ok_or_else(|| anyhow!("/health lists no drives"))?;
    let victim = drive_number(&victim_path)
        .ok_or_else(|| anyhow!("cannot tell which QEMU device {victim_path} is"))?;
    println!("vm-test: 3. device_del nvme-data{victim} ({victim_path}, {victim_files} files)");
    vm.removed.push(victim);
    vm.qmp.execute(
        "device_del",
        serde_json::json!({ "id": format!("nvme-data{victim}") }),
    )?;
    vm.qmp
        .wait_event("DEVICE_DELETED", Duration::from_secs(60), |event| {
            event["data"]["device"] == format!("nvme-data{victim}").as_str()
        })
        .context("waiting for the guest to release the NVMe device")?;
    let removed_at = Instant::now();
    // The daemon notices at its next read of the drive: a request for one of its files, or
    // the watchdog's keep-alive read of every drive.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let _ = vm.check_catalog(catalog);
        let health = vm.admin_json("/health")?;
        let failed = health["drives"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|drive| drive["path"] == victim_path.as_str() && drive["state"] == "failed");
        if failed {
            break;
        }
        if Instant::now() > deadline {
            bail!("90 s after device_del, /health still does not report {victim_path} failed");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let detected = removed_at.elapsed();
    // A wedged drive thread would stop the watchdog keep-alives and systemd would kill and
    // restart the daemon WatchdogSec= later: keep serving past that before judging.
    let watchdog = watchdog_sec()?;
    let settle = removed_at + watchdog + Duration::from_secs(5);
    while Instant::now() < settle {
        vm.check_alive()?;
        let (status, _) = http(vm.admin_port, "GET", "/health", None)?;
        if status != 200 {
            bail!("/health answered {status} after the drive was lost");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let served = vm.check_catalog(catalog)?;
    if served.missing.len() as u64 != victim_files {
        bail!(
            "after losing a drive of {victim_files} files, {} files are missing: {:?}",
            served.missing.len(),
            served.missing
        );
    }
    let metrics = vm.admin_text("/metrics")?;
    let down = format!("appliance_drive_up{{drive=\"{victim_path}\"}} 0");
    if !metrics.lines().any(|line| line == down) {
        bail!("/metrics lacks `{down}`");
    }
    let up = metrics
        .lines()
        .filter(|line| line.starts_with("appliance_drive_up{") && line.ends_with(" 1"))
        .count();
    if up != DATA_DRIVES - 1 {
        bail!("/metrics shows {up} drives up, not {}", DATA_DRIVES - 1);
    }
    let console = vm.serial_since(boot.serial_offset);
    let pid_now = last_pid(&console, "applianced")
        .ok_or_else(|| anyhow!("no applianced line on the console"))?;
    for restart in [
        "applianced.service: Main process exited",
        "applianced.service: Scheduled restart job",
        "applianced.service: Watchdog timeout",
        "applianced.service: Failed with result",
    ] {
        if console.contains(restart) {
            bail!("systemd restarted the daemon: the console says `{restart}`");
        }
    }
    if pid_now != pid {
        bail!("applianced's PID changed from {pid} to {pid_now}: it was restarted");
    }
    println!(
        "vm-test: 3. drive failed {:.1} s after removal; {:.0} s later (WatchdogSec={} s + 5): \
         {} of {} files still served byte-exact, {} gone with the drive; /metrics: {down}; \
         applianced PID {pid} unchanged, no restart",
        detected.as_secs_f64(),
        removed_at.elapsed().as_secs_f64(),
        watchdog.as_secs(),
        served.ok.len(),
        catalog.files.len(),
        served.missing.len()
    );
    let survivors = served.ok;
    timings.add(
        "3. hot-remove a drive: detected, others serving, no restart",
        step,
    );

    // 4. An update to v2, and the reboot into it: v2 boots from slot B and is marked good,
    // what the other drives hold comes back without a refill, and the next fill restores the
    // rest.
    let step = Instant::now();
    update::install_before_reboot(vm, bundles)?;
    timings.add("4. update to v2 installed into slot B", step);
    let step = Instant::now();
    let offset = vm.serial_text().len();
    let how = vm.reboot()?;
    let boot = vm.wait_healthy(offset, step)?;
    println!(
        "vm-test: 4. {how}: healthy again {:.1} s after the reboot began; drives: {}",
        step.elapsed().as_secs_f64(),
        drive_summary(&boot.health)
    );
    update::check_after_reboot(vm, bundles)?;
    let served = vm.check_catalog(catalog)?;
    if served.ok != survivors {
        bail!(
            "after the reboot, served {:?}, expected the survivors {:?}",
            served.ok,
            survivors
        );
    }
    let reboot_healthy = step.elapsed();
    let refill = Instant::now();
    let report = vm.fill()?;
    if report["files_fetched"].as_u64() != Some(victim_files) {
        bail!(
            "the refill fetched {} files, not the {victim_files} lost",
            report["files_fetched"]
        );
    }
    let served = vm.check_catalog(catalog)?;
    if !served.missing.is_empty() {
        bail!("after the refill, still not served: {:?}", served.missing);
    }
    let health = vm.admin_json("/health")?;
    if health["files"].as_u64() != Some(catalog.files.len() as u64) {
        bail!("/health counts {} files after the refill", health["files"]);
    }
    println!(
        "vm-test: 4. v2 booted from slot B and was marked good; survivors served after recovery \
         ({:.1} s) without a refill; refill restored {victim_files} files onto the {} remaining \
         drives in {:.1} s; all {} files byte-exact",
        reboot_healthy.as_secs_f64(),
        DATA_DRIVES - 1,
        refill.elapsed().as_secs_f64(),
        catalog.files.len()
    );
    timings.add(
        "4. reboot into v2: marked good, recovery, refill of the lost files",
        step,
    );

    // 5. The exposure of applianced.service, as the guest's systemd sees it.
    let step = Instant::now();
    let text = vm.serial_text();
    let begin = "==== systemd-analyze security applianced.service ====";
    let end = "==== end of systemd-analyze security ====";
    let from = text
        .rfind(begin)
        .ok_or_else(|| anyhow!("no security report on the console"))?;
    let block = &text[from..];
    let block = &block[..block.find(end).map_or(block.len(), |at| at + end.len())];
    println!("vm-test: 5. from the guest's console:");
    // Journal lines copied to the console meanwhile (qemu-ga's guest-exec notes) are not
    // part of the report.
    for line in block.lines().filter(|line| !is_journal_line(line)) {
        println!("  {}", line.trim_end_matches('\r'));
    }
    timings.add("5. systemd-analyze security from the guest", step);
    let mut magic = [0u8; 2];
    let mut foreign = std::fs::File::open(&vm.foreign)?;
    std::io::Seek::seek(&mut foreign, std::io::SeekFrom::Start(0x438))?;
    foreign.read_exact(&mut magic)?;
    if magic != [0x53, 0xEF] {
        bail!("the ext4 drive lost its superblock: the appliance wrote to it");
    }
    println!("vm-test: the ext4 drive still holds its filesystem, untouched");
    Ok(())
}

/// Step timings, printed at the end.
#[derive(Default)]
struct Timings(Vec<(String, Duration)>);

impl Timings {
    fn add(&mut self, name: &str, since: Instant) {
        let elapsed = since.elapsed();
        println!("vm-test: [{:6.1} s] {name}", elapsed.as_secs_f64());
        self.0.push((name.to_string(), elapsed));
    }

    fn print(&self) {
        println!("vm-test: timings");
        for (name, elapsed) in &self.0 {
            println!("  {:6.1} s  {name}", elapsed.as_secs_f64());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The catalog on the origin.

struct CatalogFile {
    path: String,
    bytes: Vec<u8>,
}

struct Catalog {
    files: Vec<CatalogFile>,
}

impl Catalog {
    /// Writes `CATALOG_FILES` files of seeded pseudo-random bytes (sizes from 1 byte to about
    /// 6 MiB, about 120 MiB in all; a few on 4 KiB boundaries) and their manifest under `root`.
    fn write(root: &Path) -> Result<Catalog> {
        let mut rng = appliance_testkit::SplitMix64(0x9E37_79B9_7F4A_7C15);
        let mut files = Vec::new();
        let mut manifest = Manifest::default();
        for number in 0..CATALOG_FILES {
            let size = match number {
                0 => 1,
                1 => 4096,
                2 => 1 << 20,
                _ => 64 * 1024 + usize::try_from(rng.below(6 << 20))?,
            };
            let bytes = appliance_testkit::seeded_bytes(rng.next_u64(), size);
            let path = format!("/video/title-{number:03}/main.mp4");
            let disk = root.join(&path[1..]);
            std::fs::create_dir_all(disk.parent().expect("a folder"))?;
            std::fs::write(&disk, &bytes)?;
            manifest.add(&path, &bytes);
            files.push(CatalogFile { path, bytes });
        }
        manifest.write(&root.join("manifest.json"))?;
        Ok(Catalog { files })
    }
}

/// Which catalog files the appliance serves (byte-exact) and which it answers 404 for.
struct Served {
    ok: Vec<String>,
    missing: Vec<String>,
}

// ---------------------------------------------------------------------------------------
// The VM.

/// The firmware QEMU boots the image with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Firmware {
    /// SeaBIOS (QEMU's default): GRUB's BIOS build from the protective MBR.
    Bios,
    /// OVMF (UEFI): GRUB's UEFI build from the EFI system partition.
    Uefi,
}

/// OVMF's code (read-only) and the template of its variable store (Debian's `ovmf`).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How to start a VM.
struct Start {
    firmware: Firmware,
    /// Make new disks (the first boot), or keep those of the VM before (the boot disk's
    /// overlay, the data drives, the ext4 drive).
    fresh_disks: bool,
    /// Data drives left out (hot-removed before).
    removed: Vec<usize>,
}

struct Vm {
    child: Child,
    qmp: Qmp,
    agent: GuestAgent,
    serial: PathBuf,
    foreign: PathBuf,
    http_port: u16,
    admin_port: u16,
    /// The host port forwarded to the guest's HTTPS listener.
    https_port: u16,
    /// The lab certificate, the only one the host's curl trusts.
    ca: PathBuf,
    started: Instant,
    /// Data drives hot-removed during the test (left out of a later VM on the same disks).
    removed: Vec<usize>,
}

/// What a boot came up with.
struct Boot {
    health: Value,
    pid: u32,
    serial_offset: usize,
}

impl Vm {
    fn start(work: &Path, image: &Path, origin_port: u16, start: &Start) -> Result<Vm> {
        // The image stays as built: the guest writes to a copy-on-write overlay.
        let boot = work.join("boot.qcow2");
        let foreign = work.join("foreign.img");
        if start.fresh_disks {
            Vm::make_disks(work, image, &boot, &foreign)?;
        }
        let lab = work.join("lab.toml");
        std::fs::write(&lab, LAB_CONFIG)?;
        let certificate = appliance_testkit::tls::self_signed(
            work,
            "lab",
            &[TLS_NAME],
            appliance_testkit::tls::Validity::Current,
        )?;
        let serial = work.join("serial.log");
        let qmp_path = work.join("qmp.sock");
        let agent_path = work.join("qga.sock");
        let http_port = free_port()?;
        let admin_port = free_port()?;
        let https_port = free_port()?;
        let mut args: Vec<String> = Vec::new();
        if start.firmware == Firmware::Uefi {
            let vars = work.join("OVMF_VARS.fd");
            std::fs::copy(OVMF_VARS, &vars).context("copying OVMF's variable store")?;
            args.extend([
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        args.extend(
            [
                // One host thread runs both vCPUs in turn. With multi-threaded TCG, the guest
                // kernel's live text patching (a static key flipped at boot: int3 written,
                // then the new instruction, then the int3 removed) can race with the other
                // vCPU still running stale translated code. The result is an "Oops: int3" and
                // a kernel panic early in boot, before any of our code runs. A CI run on
                // 77f3741 hit this at the reboot of step 4.
                "-accel",
                "tcg,thread=single",
                "-machine",
                "pc",
                "-m",
                "2048",
                "-smp",
                "2",
                "-display",
                "none",
                "-nodefaults",
                "-no-user-config",
                // A guest power-off stops the VM instead of ending QEMU: the reboot of step 4
                // resets and continues the same VM (the removed drive stays removed).
                "-no-shutdown",
            ]
            .iter()
            .map(|arg| arg.to_string()),
        );
        Vm::add_devices(
            &mut args,
            work,
            &boot,
            &foreign,
            &start.removed,
            [&lab, &certificate.cert, &certificate.key],
        );
        args.extend([
            "-serial".into(),
            format!("file:{}", serial.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            // The guest agent's port: qemu-ga in the guest runs appliance-ctl for the host.
            "-chardev".into(),
            format!(
                "socket,path={},server=on,wait=off,id=qga0",
                agent_path.display()
            ),
            "-device".into(),
            "virtio-serial".into(),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            "-netdev".into(),
            format!(
                "user,id=n0,restrict=on,\
                 hostfwd=tcp:127.0.0.1:{http_port}-:80,\
                 hostfwd=tcp:127.0.0.1:{admin_port}-:8081,\
                 hostfwd=tcp:127.0.0.1:{https_port}-:443,\
                 guestfwd=tcp:{ORIGIN}:80-cmd:socat - TCP:127.0.0.1:{origin_port}"
            ),
            // No option ROM: nothing boots from the network, and the BIOS is faster.
            "-device".into(),
            "virtio-net-pci,netdev=n0,romfile=".into(),
        ]);
        println!("$ qemu-system-x86_64 {}", args.join(" "));
        // The console of every VM of the run, one after the other.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join("qemu.log"))?;
        if !start.fresh_disks {
            let _ = std::fs::remove_file(&serial);
        }
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let started = Instant::now();
        let mut vm = Vm {
            child,
            qmp: Qmp::placeholder(),
            agent: GuestAgent { socket: agent_path },
            serial,
            foreign,
            http_port,
            admin_port,
            https_port,
            ca: certificate.cert,
            started,
            removed: start.removed.clone(),
        };
        vm.qmp = Qmp::connect(&qmp_path, &mut vm.child)?;
        Ok(vm)
    }

    /// The boot disk's copy-on-write overlay, blank data drives and a drive holding ext4.
    fn make_disks(work: &Path, image: &Path, boot: &Path, foreign: &Path) -> Result<()> {
        util::output(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                &image.display().to_string(),
                &boot.display().to_string(),
            ],
        )?;
        std::fs::File::create(foreign)?.set_len(FOREIGN_DRIVE_BYTES)?;
        util::output("mkfs.ext4", &["-q", "-F", &foreign.display().to_string()])?;
        for number in 0..DATA_DRIVES {
            let file = work.join(format!("data{number}.img"));
            std::fs::File::create(&file)?.set_len(DATA_DRIVE_BYTES)?;
        }
        Ok(())
    }

    /// The lab files through fw_cfg, the boot drive and the data drives (all NVMe), and the
    /// ext4 drive.
    fn add_devices(
        args: &mut Vec<String>,
        work: &Path,
        boot: &Path,
        foreign: &Path,
        removed: &[usize],
        [lab, cert, key]: [&Path; 3],
    ) {
        args.extend([
            "-fw_cfg".into(),
            format!(
                "name=opt/appliance/appliance.base.toml,file={}",
                lab.display()
            ),
            "-fw_cfg".into(),
            format!("name=opt/appliance/tls.pem,file={}", cert.display()),
            "-fw_cfg".into(),
            format!("name=opt/appliance/tls.key,file={}", key.display()),
            // The boot drive: NVMe too, so the guest must tell it from the data drives.
            "-drive".into(),
            format!("file={},if=none,id=boot,format=qcow2", boot.display()),
            "-device".into(),
            "nvme,serial=appliance-boot,drive=boot,bootindex=0,id=nvme-boot".into(),
        ]);
        for number in (0..DATA_DRIVES).filter(|number| !removed.contains(number)) {
            let file = work.join(format!("data{number}.img"));
            args.extend([
                "-drive".into(),
                format!("file={},if=none,id=data{number},format=raw", file.display()),
                "-device".into(),
                format!("nvme,serial=data{number},drive=data{number},id=nvme-data{number}"),
            ]);
        }
        args.extend([
            "-drive".into(),
            format!("file={},if=none,id=foreign,format=raw", foreign.display()),
            "-device".into(),
            "nvme,serial=foreign,drive=foreign,id=nvme-foreign".into(),
        ]);
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn serial_since(&self, offset: usize) -> String {
        let text = self.serial_text();
        text.get(offset..).unwrap_or("").to_string()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("QEMU exited: {status}");
        }
        Ok(())
    }

    /// Waits until `/health` answers 200 and the console (from `offset` on) shows systemd
    /// started applianced.service (Type=notify: after READY=1).
    fn wait_healthy(&mut self, offset: usize, since: Instant) -> Result<Boot> {
        self.wait_healthy_within(offset, since, BOOT_TIMEOUT, false)
    }

    /// [`Vm::wait_healthy`] with its own time limit; `through_failures` lets the daemon fail
    /// to start on the way (a broken update's boot, before the fallback).
    fn wait_healthy_within(
        &mut self,
        offset: usize,
        since: Instant,
        timeout: Duration,
        through_failures: bool,
    ) -> Result<Boot> {
        let deadline = since + timeout;
        loop {
            self.check_alive()?;
            let console = self.serial_since(offset);
            if console.contains("Started applianced.service") {
                if let Ok((200, body)) = http(self.admin_port, "GET", "/health", None) {
                    let health: Value = serde_json::from_slice(&body)?;
                    let pid = last_pid(&console, "applianced")
                        .ok_or_else(|| anyhow!("no applianced line on the console"))?;
                    return Ok(Boot {
                        health,
                        pid,
                        serial_offset: offset,
                    });
                }
            }
            for failure in [
                "Kernel panic",
                "Failed to start applianced.service",
                "grub rescue>",
            ] {
                let tolerated = through_failures && failure.contains("applianced");
                if console.contains(failure) && !tolerated {
                    bail!("the guest's console says `{failure}`");
                }
            }
            if Instant::now() > deadline {
                bail!("not healthy within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn admin_json(&self, path: &str) -> Result<Value> {
        let (status, body) = http(self.admin_port, "GET", path, None)?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    fn admin_text(&self, path: &str) -> Result<String> {
        let (status, body) = http(self.admin_port, "GET", path, None)?;
        if status != 200 {
            bail!("GET {path}: {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Runs `appliance-ctl --json fill --manifest ... --wait` in the guest and returns the
    /// fill's report; fails unless the fill succeeded (the CLI's exit code and the report).
    fn fill(&mut self) -> Result<Value> {
        self.check_alive()?;
        let manifest = format!("http://{ORIGIN}/manifest.json");
        let args = ["--json", "fill", "--manifest", &manifest, "--wait"];
        let run = self.agent.run(GUEST_CTL, &args, FILL_TIMEOUT)?;
        let report: Value = serde_json::from_str(&run.stdout).with_context(|| {
            format!(
                "appliance-ctl {args:?} in the guest (exit code {:?}) printed no report: {}{}",
                run.exit_code, run.stdout, run.stderr
            )
        })?;
        let failed = run.exit_code != Some(0)
            || report["files_failed"].as_u64() != Some(0)
            || !report["error"].is_null()
            || report["cancelled"] == true
            || report["cannot_fit"]
                .as_array()
                .is_some_and(|list| !list.is_empty());
        if failed {
            bail!(
                "the fill did not succeed (appliance-ctl exit code {:?}): {report} {}",
                run.exit_code,
                run.stderr
            );
        }
        Ok(report)
    }

    /// Prints the guest's `appliance-ctl status`; checks that the image installed the CLI's
    /// man pages (gzipped) and that its bash completion loads in the guest's bash.
    fn show_status_and_docs(&mut self) -> Result<()> {
        let status = self
            .agent
            .run(GUEST_CTL, &["status"], CTL_TIMEOUT)?
            .success("appliance-ctl status")?;
        println!("vm-test: 2. appliance-ctl status, in the guest:");
        for line in status.stdout.lines() {
            println!("  {line}");
        }
        // `complete -p` prints the completion that sourcing the file registered.
        let script = r#"ls -l "$@" && . "$1" && complete -p appliance-ctl"#;
        let mut args = vec!["-c", script, "bash", GUEST_CTL_COMPLETION];
        args.extend(GUEST_MAN_PAGES);
        let docs = self
            .agent
            .run("/bin/bash", &args, CTL_TIMEOUT)?
            .success("the CLI's man pages and bash completion")?;
        println!("vm-test: 2. in the guest, the CLI's man pages and bash completion:");
        for line in docs.stdout.lines() {
            println!("  {line}");
        }
        Ok(())
    }

    /// Requests ranges of every catalog file: the start, a middle stretch, the last 4097
    /// bytes (a suffix range) and, for small files, the whole file. A file served must be
    /// byte-exact in every range; a 404 counts it missing; anything else fails.
    fn check_catalog(&self, catalog: &Catalog) -> Result<Served> {
        let mut served = Served {
            ok: Vec::new(),
            missing: Vec::new(),
        };
        for file in &catalog.files {
            let size = file.bytes.len();
            let mut ranges: Vec<(Option<String>, std::ops::Range<usize>)> = Vec::new();
            if size <= 256 * 1024 {
                ranges.push((None, 0..size));
            }
            let head = size.min(65_536);
            ranges.push((Some(format!("bytes=0-{}", head - 1)), 0..head));
            if size > 300_000 {
                let start = size / 2 - 50_000;
                ranges.push((
                    Some(format!("bytes={start}-{}", start + 99_999)),
                    start..start + 100_000,
                ));
            }
            let tail = size.min(4097);
            ranges.push((Some(format!("bytes=-{tail}")), size - tail..size));
            let mut missing = false;
            for (range, expected) in ranges {
                let (status, body) = http(self.http_port, "GET", &file.path, range.as_deref())?;
                match (status, &range) {
                    (404, _) => {
                        missing = true;
                        break;
                    }
                    (200, None) | (206, Some(_)) => {
                        if body != file.bytes[expected.clone()] {
                            bail!(
                                "{} {:?}: {} bytes served differ from the origin's {} bytes",
                                file.path,
                                range,
                                body.len(),
                                expected.len()
                            );
                        }
                    }
                    _ => bail!("{} {range:?}: status {status}", file.path),
                }
            }
            if missing {
                served.missing.push(file.path.clone());
            } else {
                served.ok.push(file.path.clone());
            }
        }
        Ok(served)
    }

    /// HTTPS through the hostfwd port: ranges of several files, fetched by curl trusting only
    /// the lab certificate, must be byte-exact, the guest kernel's TLS counters must show that
    /// it took over the connections' encryption (kTLS), and the daemon must say so.
    fn check_https(&mut self, catalog: &Catalog) -> Result<()> {
        let before = self.tls_stat()?;
        let resolve = format!("{TLS_NAME}:{}:127.0.0.1", self.https_port);
        let mut checked = 0;
        for file in catalog
            .files
            .iter()
            .filter(|file| !file.bytes.is_empty())
            .take(8)
        {
            let size = file.bytes.len();
            for (first, last) in [(0, size.min(65_536) - 1), (size / 2, size - 1)] {
                let out = Command::new("curl")
                    .args(["-sf", "--max-time", "60", "--resolve", &resolve, "--cacert"])
                    .arg(&self.ca)
                    .args(["-r", &format!("{first}-{last}")])
                    .arg(format!(
                        "https://{TLS_NAME}:{}{}",
                        self.https_port, file.path
                    ))
                    .output()
                    .context("running curl")?;
                if !out.status.success() {
                    bail!(
                        "https {} {first}-{last}: curl failed ({})",
                        file.path,
                        out.status
                    );
                }
                if out.stdout != file.bytes[first..=last] {
                    bail!(
                        "https {} {first}-{last}: {} bytes differ from the origin's",
                        file.path,
                        out.stdout.len()
                    );
                }
                checked += 1;
            }
        }
        let after = self.tls_stat()?;
        let sent = |stat: &std::collections::BTreeMap<String, u64>| {
            stat.get("TlsTxSw").copied().unwrap_or(0)
                + stat.get("TlsTxDevice").copied().unwrap_or(0)
        };
        if sent(&after) < sent(&before) + checked {
            bail!(
                "{checked} HTTPS connections, but the guest kernel set up TLS transmission for \
                 {} (kTLS not in use): before {before:?}, after {after:?}",
                sent(&after) - sent(&before)
            );
        }
        let metrics = self.admin_text("/metrics")?;
        if !metrics.lines().any(|line| line == "appliance_tls_kernel 1") {
            bail!("the daemon does not report kTLS in use (appliance_tls_kernel)");
        }
        println!(
            "vm-test: 2. HTTPS: {checked} ranges byte-exact through hostfwd; the guest kernel \
             encrypted them (kTLS): /proc/net/tls_stat TlsTxSw {} -> {}",
            before.get("TlsTxSw").copied().unwrap_or(0),
            after.get("TlsTxSw").copied().unwrap_or(0)
        );
        Ok(())
    }

    /// The guest kernel's TLS counters (/proc/net/tls_stat), read through the guest agent.
    fn tls_stat(&mut self) -> Result<std::collections::BTreeMap<String, u64>> {
        let out = self
            .agent
            .run("/bin/cat", &["/proc/net/tls_stat"], CTL_TIMEOUT)?
            .success("cat /proc/net/tls_stat (is the tls module loaded?)")?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
            })
            .collect())
    }

    /// A clean reboot: the ACPI power button (systemd powers off; `-no-shutdown` keeps QEMU),
    /// then a reset. A reset alone if the guest does not power off within 120 s.
    fn reboot(&mut self) -> Result<&'static str> {
        self.qmp.execute("system_powerdown", Value::Null)?;
        let how = match self
            .qmp
            .wait_event("SHUTDOWN", Duration::from_secs(120), |_| true)
        {
            Ok(_) => "clean power-off, then reset",
            Err(_) => "no power-off within 120 s: hard reset",
        };
        self.qmp.execute("system_reset", Value::Null)?;
        self.qmp.execute("cont", Value::Null)?;
        Ok(how)
    }
}

impl Vm {
    /// A clean power-off: the ACPI power button, until QEMU reports the guest's shutdown.
    fn power_off(&mut self) -> Result<()> {
        self.qmp.execute("system_powerdown", Value::Null)?;
        self.qmp
            .wait_event("SHUTDOWN", Duration::from_secs(180), |_| true)
            .context("the guest did not power off")?;
        Ok(())
    }

    /// Ends QEMU (and its locks on the disk files).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `WatchdogSec=` of systemd/applianced.service (the unit the image installs).
fn watchdog_sec() -> Result<Duration> {
    let unit = std::fs::read_to_string(util::workspace_root().join("systemd/applianced.service"))?;
    let value = unit
        .lines()
        .find_map(|line| line.trim().strip_prefix("WatchdogSec="))
        .ok_or_else(|| anyhow!("no WatchdogSec= in systemd/applianced.service"))?;
    let seconds: u64 = value
        .trim()
        .trim_end_matches('s')
        .parse()
        .with_context(|| format!("WatchdogSec={value}: expected seconds"))?;
    Ok(Duration::from_secs(seconds))
}

/// A kernel or journal line on the console: `[  132.627033] ...`.
fn is_journal_line(line: &str) -> bool {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(stamp, _)| {
            let stamp = stamp.trim();
            !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
}

/// The PID of the last `NAME[PID]:` journal line on the console.
fn last_pid(console: &str, name: &str) -> Option<u32> {
    let marker = format!("{name}[");
    console.rmatch_indices(&marker).find_map(|(at, _)| {
        let rest = &console[at + marker.len()..];
        let end = rest.find("]:")?;
        rest[..end].parse().ok()
    })
}

/// `dataN` in a drive path (`/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_data2_1`).
fn drive_number(path: &str) -> Option<usize> {
    let at = path.rfind("_data")?;
    path[at + 5..]
        .chars()
        .next()?
        .to_digit(10)
        .map(|digit| digit as usize)
}

fn drive_summary(health: &Value) -> String {
    health["drives"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|drive| {
            format!(
                "{} {} ({} files)",
                drive["path"]
                    .as_str()
                    .unwrap_or("?")
                    .rsplit('/')
                    .next()
                    .unwrap_or("?"),
                drive["state"].as_str().unwrap_or("?"),
                drive["files"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 over loopback (one request per connection) and QMP.

/// Sends one request to 127.0.0.1:`port` (with a Range header when given); returns the
/// status and the body.
fn http(port: u16, method: &str, target: &str, range: Option<&str>) -> Result<(u16, Vec<u8>)> {
    let range: Vec<(&str, &str)> = range.map(|range| ("Range", range)).into_iter().collect();
    let response = appliance_testkit::http(port, method, target, &range)?;
    Ok((response.status, response.body))
}

/// QEMU's machine protocol on a unix socket: commands, and the events that arrive between.
struct Qmp {
    reader: Option<BufReader<UnixStream>>,
    events: Vec<Value>,
}

impl Qmp {
    fn placeholder() -> Qmp {
        Qmp {
            reader: None,
            events: Vec::new(),
        }
    }

    fn connect(path: &Path, qemu: &mut Child) -> Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(path) {
                break stream;
            }
            if let Some(status) = qemu.try_wait()? {
                bail!("QEMU exited at start: {status} (see target/vm-test/qemu.log)");
            }
            if Instant::now() > deadline {
                bail!("no QMP socket at {}", path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut qmp = Qmp {
            reader: Some(BufReader::new(stream)),
            events: Vec::new(),
        };
        qmp.read(Duration::from_secs(10))?; // the greeting
        qmp.execute("qmp_capabilities", Value::Null)?;
        Ok(qmp)
    }

    fn read(&mut self, timeout: Duration) -> Result<Value> {
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| anyhow!("QMP not connected"))?;
        reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut request = serde_json::json!({ "execute": command });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let reader = self
            .reader
            .as_mut()
            .ok_or_else(|| anyhow!("QMP not connected"))?;
        reader
            .get_mut()
            .write_all(format!("{request}\n").as_bytes())?;
        loop {
            let message = self.read(Duration::from_secs(30))?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(error) = message.get("error") {
                bail!("QMP {command}: {error}");
            } else {
                return Ok(message["return"].clone());
            }
        }
    }

    fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self
                .events
                .iter()
                .position(|event| event["event"] == name && matches(event))
            {
                return Ok(self.events.remove(at));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no QMP event {name} within {} s", timeout.as_secs());
            }
            match self.read(left.min(Duration::from_secs(1))) {
                Ok(message) => self.events.push(message),
                Err(error) => {
                    let timed_out = error.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(
                            io.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        )
                    });
                    if !timed_out {
                        return Err(error);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_journal_line;

    #[test]
    fn journal_lines_are_told_from_the_security_report() {
        for (line, expected) in [
            (
                "[  132.627033] qemu-ga[352]: info: guest-exec called: \"/usr/bin/x\"",
                true,
            ),
            ("[    0.000000] Linux version 6.12", true),
            (
                "  ✓ RemoveIPC=      Service user cannot leave SysV IPC objects around",
                false,
            ),
            ("  NAME         DESCRIPTION        EXPOSURE", false),
            (
                "→ Overall exposure level for applianced.service: 1.6 OK",
                false,
            ),
            ("[  OK  ] Started qemu-guest-agent.service", false),
            ("[] empty", false),
        ] {
            assert_eq!(is_journal_line(line), expected, "{line}");
        }
    }
}
