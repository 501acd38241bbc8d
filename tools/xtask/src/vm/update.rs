//! The VM test's update story (image/README.md, "A/B updates"), run on the booted guest after
//! the serving steps: a signed bundle v2 installed through `appliance-ctl update` from the
//! guestfwd origin (downloaded by appliance-ctl), a reboot into v2 that serves the same files without a
//! refill and gets marked good; unsigned, wrongly signed and tampered bundles refused with
//! nothing changed; a broken bundle (its applianced exits at start) that the box rolls back
//! from by itself. Bundles are built here on the host with `cargo xtask bundle`'s code.

use super::{Catalog, Timings, Vm, CTL_TIMEOUT, GUEST_CTL, ORIGIN};
use crate::bundle::{self, BundleOptions};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long an install may take in the guest (TCG: verity checks and the slot write).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
/// The guest's update settings for the test (/etc/appliance/update.conf): a short health gate
/// and deadline, so that a broken update rolls back within minutes.
const UPDATE_CONF: &str = "HEALTHY_FOR_S=10\nDEADLINE_S=60\n";
/// A broken boot: up to the deadline for the daemon, the reboot, and the fallback boot.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(1200);

/// The bundles served to the guest, by their URL path on the origin.
pub(super) struct Bundles {
    v2_version: String,
    broken_version: String,
}

const V2: &str = "/bundles/v2.raucb";
const BROKEN: &str = "/bundles/broken.raucb";
const UNSIGNED: &str = "/bundles/unsigned.raucb";
const WRONGLY_SIGNED: &str = "/bundles/wrongly-signed.raucb";
const TAMPERED: &str = "/bundles/tampered.raucb";

/// Builds the bundles into the origin's folder: v2, the broken one, and three a box must
/// refuse (no signature; signed by a CA the box does not trust; one payload byte changed).
pub(super) fn build_bundles(origin: &Path, work: &Path) -> Result<Bundles> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let v2_version = format!("vm-test-v2.{stamp}");
    let broken_version = format!("vm-test-broken.{stamp}");
    let path = |url: &str| origin.join(&url[1..]);
    std::fs::create_dir_all(origin.join("bundles"))?;
    bundle::build(&BundleOptions {
        version: Some(v2_version.clone()),
        signing: None,
        out: Some(path(V2)),
        broken: false,
    })?;
    bundle::build(&BundleOptions {
        version: Some(broken_version.clone()),
        signing: None,
        out: Some(path(BROKEN)),
        broken: true,
    })?;
    let signed = std::fs::read(path(V2))?;
    // A RAUC bundle ends with its CMS signature and the signature's size (8 bytes, big-endian):
    // the payload alone is a bundle with no signature.
    let size_at = signed.len().checked_sub(8).context("bundle too short")?;
    let signature_bytes = u64::from_be_bytes(signed[size_at..].try_into()?);
    let payload_end = size_at
        .checked_sub(usize::try_from(signature_bytes)?)
        .context("bundle signature size out of range")?;
    std::fs::write(path(UNSIGNED), &signed[..payload_end])?;
    // One byte of the payload's first block (the squashfs superblock) changed: the signed
    // verity hash tree no longer matches.
    let mut tampered = signed.clone();
    tampered[100] ^= 0x01;
    std::fs::write(path(TAMPERED), &tampered)?;
    // The same bundle signed by another CA, which the box's keyring does not hold.
    let rogue = bundle::keys_in(
        &work.join("rogue-keys"),
        "rogue",
        "Not the appliance vendor",
    )?;
    let development = bundle::development_keys()?;
    let text = |path: &Path| path.to_string_lossy().into_owned();
    let conf = bundle::rauc_conf(work, &development.ca_cert)?;
    crate::util::output(
        "rauc",
        &[
            "--conf",
            &text(&conf),
            "resign",
            "--cert",
            &text(&rogue.signing_cert),
            "--key",
            &text(&rogue.signing_key),
            "--keyring",
            &text(&development.ca_cert),
            "--signing-keyring",
            &text(&rogue.ca_cert),
            &text(&path(V2)),
            &text(&path(WRONGLY_SIGNED)),
        ],
    )?;
    Ok(Bundles {
        v2_version,
        broken_version,
    })
}

/// Step 4, before its reboot: the test's update settings, the status before, and v2 installed
/// into slot B (the reboot of step 4 then boots it).
pub(super) fn install_before_reboot(vm: &mut Vm, bundles: &Bundles) -> Result<()> {
    vm.agent
        .run(
            "/bin/sh",
            &[
                "-c",
                &format!(
                    "printf '{}' > /etc/appliance/update.conf",
                    UPDATE_CONF.replace('\n', "\\n")
                ),
            ],
            CTL_TIMEOUT,
        )?
        .success("writing /etc/appliance/update.conf")?;
    wait_confirmed(vm, "A", Duration::from_secs(300))?;
    print_status(vm, "4. before the update")?;
    install_v2(vm, bundles, "B")
}

/// Step 4, after its reboot: v2 runs from slot B and is marked good, and /etc/appliance came
/// along (the test's update.conf).
pub(super) fn check_after_reboot(vm: &mut Vm, bundles: &Bundles) -> Result<()> {
    confirmed_v2(vm, bundles, "B")?;
    vm.agent
        .run("/bin/cat", &["/etc/appliance/update.conf"], CTL_TIMEOUT)?
        .success("the update carried /etc/appliance to the new slot")?;
    print_status(vm, "4. after the update")
}

/// Steps 6 and 7.
pub(super) fn run(
    vm: &mut Vm,
    catalog: &Catalog,
    bundles: &Bundles,
    timings: &mut Timings,
) -> Result<()> {
    let files_before = vm.admin_json("/health")?["files"].clone();
    // 6. Bundles the box must refuse; nothing changes.
    let step = Instant::now();
    let before = slots(vm)?;
    for (what, url) in [
        ("unsigned", UNSIGNED),
        ("signed by an unknown CA", WRONGLY_SIGNED),
        ("tampered", TAMPERED),
    ] {
        let run = install(vm, url, false)?;
        if run.exit_code == Some(0) {
            bail!(
                "the {what} bundle was installed:\n{}{}",
                run.stdout,
                run.stderr
            );
        }
        // RAUC's reason: its LastError line, else the first line that says what failed.
        let lines: Vec<&str> = run.stdout.lines().chain(run.stderr.lines()).collect();
        let reason = lines
            .iter()
            .find(|line| line.contains("LastError"))
            .or_else(|| lines.iter().find(|line| line.contains("rror")))
            .or_else(|| lines.iter().find(|line| line.contains("ailed")))
            .copied()
            .unwrap_or("(no reason printed)")
            .trim()
            .to_string();
        println!("vm-test: 6. {what} bundle refused: {reason}");
    }
    let after = slots(vm)?;
    if after != before {
        bail!("a refused bundle changed the slots:\nbefore {before}\nafter  {after}");
    }
    timings.add(
        "6. unsigned, wrongly signed, tampered bundles refused",
        step,
    );

    // 7. A broken update: the box comes back on v2 by itself.
    let step = Instant::now();
    let offset = vm.serial_text().len();
    match install(vm, BROKEN, true) {
        Ok(run) if run.exit_code != Some(0) => {
            bail!(
                "installing the broken bundle failed:\n{}{}",
                run.stdout,
                run.stderr
            )
        }
        // The guest reboots under the agent's feet: an answer or none are both fine.
        _ => {}
    }
    vm.wait_healthy_within(offset, step, ROLLBACK_TIMEOUT, true)?;
    let console = vm.serial_since(offset);
    if !console.contains("the VM test's broken build") {
        bail!("the console never showed the broken build's applianced running");
    }
    let rolled = wait_confirmed(vm, "B", Duration::from_secs(300))?;
    let failed = &rolled["last_failed_update"];
    if failed["slot"] != "A" || failed["version"] != bundles.broken_version.as_str() {
        bail!("the status does not report the failed update of slot A: {rolled}");
    }
    if slot(&rolled, "A")?["boot_status"] != "bad" {
        bail!("slot A is not marked bad after the rollback: {rolled}");
    }
    let served = vm.check_catalog(catalog)?;
    if !served.missing.is_empty() || vm.admin_json("/health")?["files"] != files_before {
        bail!(
            "after the rollback, {} files are not served",
            served.missing.len()
        );
    }
    print_status(vm, "7. after the rollback")?;
    println!(
        "vm-test: 7. the broken update ({}) booted in slot A, never got healthy, and the box \
         rolled back to v2 in slot B by itself in {:.0} s; all {} files byte-exact, drives \
         untouched",
        bundles.broken_version,
        step.elapsed().as_secs_f64(),
        served.ok.len()
    );
    timings.add(
        "7. broken update: boot, deadline, reboot, fall back to v2",
        step,
    );
    Ok(())
}

/// Installs v2 from the origin into `target` (the slot not booted); it must be the next boot.
fn install_v2(vm: &mut Vm, bundles: &Bundles, target: &str) -> Result<()> {
    let installing = install(vm, V2, false)?.success("appliance-ctl update (v2)")?;
    // RAUC's progress, without its line per percent of the copy.
    for line in installing
        .stdout
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.contains("% Copying image to"))
    {
        println!("  | {line}");
    }
    let installed = slots(vm)?;
    let new = slot(&installed, target)?;
    if new["primary"] != true || new["version"] != bundles.v2_version.as_str() {
        bail!("after the install, slot {target} is not the next boot with v2: {installed}");
    }
    Ok(())
}

/// Waits until v2 in `target` is booted and marked good.
fn confirmed_v2(vm: &mut Vm, bundles: &Bundles, target: &str) -> Result<Value> {
    let after = wait_confirmed(vm, target, Duration::from_secs(300))?;
    if slot(&after, target)?["version"] != bundles.v2_version.as_str() {
        bail!("slot {target} booted but does not report v2: {after}");
    }
    Ok(after)
}

/// `appliance-ctl update http://ORIGIN/URL` in the guest.
fn install(vm: &mut Vm, url: &str, reboot: bool) -> Result<crate::guest_agent::GuestRun> {
    let source = format!("http://{ORIGIN}{url}");
    let mut args = vec!["update", source.as_str()];
    if reboot {
        args.push("--reboot");
    }
    vm.agent.run(GUEST_CTL, &args, INSTALL_TIMEOUT)
}

/// The guest's `appliance-ctl --json status`, its `slots` part.
fn slots(vm: &mut Vm) -> Result<Value> {
    let run = vm
        .agent
        .run(GUEST_CTL, &["--json", "status"], CTL_TIMEOUT)?
        .success("appliance-ctl --json status")?;
    let status: Value = serde_json::from_str(&run.stdout)?;
    if let Some(error) = status["slots_error"].as_str() {
        bail!("appliance-ctl status could not read the slots: {error}");
    }
    Ok(status["slots"].clone())
}

fn slot<'a>(slots: &'a Value, bootname: &str) -> Result<&'a Value> {
    slots["slots"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|slot| slot["bootname"] == bootname)
        .ok_or_else(|| anyhow!("no slot {bootname} in {slots}"))
}

/// Waits until `bootname` is booted, marked good and off trial; returns the slots.
fn wait_confirmed(vm: &mut Vm, bootname: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let slots = slots(vm)?;
        let booted = slot(&slots, bootname)?;
        if booted["booted"] == true
            && booted["boot_status"] == "good"
            && booted["on_trial"] == false
        {
            return Ok(slots);
        }
        if Instant::now() > deadline {
            bail!(
                "slot {bootname} not booted and marked good within {} s: {slots}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Prints the guest's `appliance-ctl status`: its state line and the slot lines.
fn print_status(vm: &mut Vm, when: &str) -> Result<()> {
    let run = vm
        .agent
        .run(GUEST_CTL, &["status"], CTL_TIMEOUT)?
        .success("appliance-ctl status")?;
    println!("vm-test: {when}, appliance-ctl status in the guest (state and slots):");
    for line in run.stdout.lines().filter(|line| {
        line.starts_with("state:") || line.starts_with("slot") || line.starts_with("last failed")
    }) {
        println!("  {line}");
    }
    Ok(())
}

/// Step 8: the same disks booted by OVMF (UEFI) instead of SeaBIOS. GRUB's UEFI build on the
/// EFI system partition reads the same grub.cfg and grubenv: it boots slot B (v2), which
/// serves every file, and an update to slot A boots and gets marked good under UEFI too.
pub(super) fn under_uefi(
    vm: &mut Vm,
    catalog: &Catalog,
    bundles: &Bundles,
    timings: &mut Timings,
) -> Result<()> {
    let step = Instant::now();
    let boot = vm.wait_healthy(0, vm.started)?;
    let firmware = vm
        .agent
        .run(
            "/bin/sh",
            &[
                "-c",
                "test -d /sys/firmware/efi && cat /sys/firmware/efi/fw_platform_size",
            ],
            CTL_TIMEOUT,
        )?
        .success("the guest booted by UEFI (/sys/firmware/efi)")?;
    wait_confirmed(vm, "B", Duration::from_secs(300))?;
    let served = vm.check_catalog(catalog)?;
    if !served.missing.is_empty() {
        bail!("under UEFI, not served: {:?}", served.missing);
    }
    println!(
        "vm-test: 8. UEFI ({}-bit OVMF): healthy {:.0} s after QEMU started, slot B (v2) \
         booted and marked good; drives: {}; all {} files byte-exact",
        firmware.stdout.trim(),
        vm.started.elapsed().as_secs_f64(),
        super::drive_summary(&boot.health),
        served.ok.len()
    );
    timings.add("8. boot under UEFI (OVMF), serve byte-exact", step);

    let step = Instant::now();
    install_v2(vm, bundles, "A")?;
    let offset = vm.serial_text().len();
    vm.reboot()?;
    vm.wait_healthy_within(offset, step, super::BOOT_TIMEOUT, false)?;
    confirmed_v2(vm, bundles, "A")?;
    let served = vm.check_catalog(catalog)?;
    if !served.missing.is_empty() {
        bail!(
            "under UEFI, after the update, not served: {:?}",
            served.missing
        );
    }
    print_status(vm, "8. under UEFI, after an update into slot A")?;
    println!(
        "vm-test: 8. under UEFI: v2 installed into slot A, booted and marked good; all {} files \
         byte-exact",
        served.ok.len()
    );
    timings.add("8. update under UEFI: install, reboot, marked good", step);
    Ok(())
}
