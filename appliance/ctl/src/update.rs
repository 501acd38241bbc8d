//! A/B image updates on the box, through RAUC: `appliance-ctl update` (install a signed bundle
//! into the slot not booted), `appliance-ctl confirm-slot` (the health gate that marks the
//! booted slot good, and notices a fallback), and the slots shown by `appliance-ctl status`.
//! RAUC does the work that must be right (signatures, writing the slot, grubenv); this module
//! runs its command line, reads grubenv, and keeps the appliance's own record of confirmed
//! slots and failed updates under /var/lib/appliance-update (on /var, which both slots share).
//! It must not write grubenv itself: every change of slot state goes through `rauc status`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// RAUC's description of the box; its presence means the box updates through RAUC.
pub const RAUC_SYSTEM_CONF: &str = "/etc/rauc/system.conf";
/// The image's own description: `APPLIANCE_VERSION=...` is the booted slot's version.
const IMAGE_FILE: &str = "/etc/appliance-image";
/// The appliance's update records (shared by both slots).
const RECORD_DIR: &str = "/var/lib/appliance-update";
/// Where a bundle given by URL is downloaded before RAUC installs it (removed afterwards).
const DOWNLOAD_DIR: &str = "/var/tmp/appliance-update";
/// The largest bundle accepted (as RAUC's max-bundle-download-size in system.conf).
const BUNDLE_BYTES_MAX: u64 = 2 << 30;

/// One root slot as the operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct SlotView {
    /// RAUC's name (`rootfs.0`).
    pub name: String,
    /// GRUB's name (`A`).
    pub bootname: String,
    pub device: String,
    /// True for the slot running now.
    pub booted: bool,
    /// True for the slot the next boot starts, by the rule of image/grub.cfg over grubenv.
    pub primary: bool,
    /// `good` (may boot) or `bad` (RAUC's boot status).
    pub boot_status: String,
    /// True while GRUB has booted it and nothing has marked it good since.
    pub on_trial: bool,
    /// The image version the slot holds, when known.
    pub version: Option<String>,
    /// When RAUC last wrote the slot (its own timestamp), or None for the factory image.
    pub installed: Option<String>,
}

/// Both slots, and the last update that did not stick.
#[derive(Clone, Debug, Serialize)]
pub struct Slots {
    pub booted: String,
    pub slots: Vec<SlotView>,
    pub last_failed_update: Option<FailedUpdate>,
}

/// A slot that GRUB booted and that never got marked good, so the box fell back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedUpdate {
    pub slot: String,
    pub version: Option<String>,
    pub installed: Option<String>,
    pub fell_back_to: String,
    pub detected_unix_s: u64,
    #[serde(default)]
    pub kind: FallbackKind,
}

/// Why GRUB skipped a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    /// New contents that never got marked good: the update failed.
    #[default]
    FailedUpdate,
    /// Contents confirmed before, whose boot was cut short (power cut, hang).
    InterruptedBoot,
}

/// What the appliance remembers per slot: the install it confirmed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Confirmed {
    version: Option<String>,
    /// RAUC's install timestamp of the confirmed contents; None for the factory image.
    installed: Option<String>,
    confirmed_unix_s: u64,
}

/// The appliance's records under [`RECORD_DIR`].
struct Records {
    dir: PathBuf,
}

impl Records {
    fn new() -> Records {
        Records {
            dir: PathBuf::from(RECORD_DIR),
        }
    }

    fn confirmed(&self) -> BTreeMap<String, Confirmed> {
        read_json(&self.dir.join("confirmed.json")).unwrap_or_default()
    }

    fn failed(&self) -> Option<FailedUpdate> {
        read_json(&self.dir.join("failed-update.json"))
    }

    fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::File::open(&temporary)?.sync_all()?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("renaming to {}", path.display()))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// True on a box that updates through RAUC.
pub fn available() -> bool {
    Path::new(RAUC_SYSTEM_CONF).exists()
}

/// Runs a program and returns its standard output, or an error with its standard error.
fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The grubenv variables (`ORDER`, `A_OK`, ...), read with grub-editenv from the file that
/// RAUC's system.conf names.
fn grubenv() -> Result<BTreeMap<String, String>> {
    let conf = std::fs::read_to_string(RAUC_SYSTEM_CONF)
        .with_context(|| format!("reading {RAUC_SYSTEM_CONF}"))?;
    let path = conf
        .lines()
        .find_map(|line| line.trim().strip_prefix("grubenv="))
        .context("system.conf names no grubenv")?
        .trim()
        .to_string();
    // grub-editenv rewrites the file in place (truncate, then write): a reader that comes in
    // between sees "invalid environment block". Tries over a second ride that out.
    let text = retrying(Duration::from_secs(1), Duration::from_millis(200), || {
        output("grub-editenv", &[&path, "list"])
    })?;
    Ok(parse_grubenv(&text))
}

/// Calls `attempt` until it succeeds or `patience` has passed, `pause` apart; the last error.
fn retrying<T>(
    patience: Duration,
    pause: Duration,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) if started.elapsed() >= patience => return Err(error),
            Err(_) => std::thread::sleep(pause),
        }
    }
}

/// `rauc status` as JSON.
fn rauc_status() -> Result<Value> {
    let text = output("rauc", &["status", "--detailed", "--output-format=json"])?;
    serde_json::from_str(&text).context("rauc status printed no JSON")
}

fn parse_grubenv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

fn booted_version() -> Option<String> {
    let text = std::fs::read_to_string(IMAGE_FILE).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("APPLIANCE_VERSION="))
        .map(str::to_string)
}

/// Reads both slots from `rauc status`, grubenv and the appliance's records.
pub fn slots() -> Result<Slots> {
    let status = rauc_status()?;
    let env = grubenv()?;
    let records = Records::new();
    Ok(slots_from(
        &status,
        &env,
        &records.confirmed(),
        records.failed(),
        booted_version(),
    ))
}

fn slots_from(
    status: &Value,
    env: &BTreeMap<String, String>,
    confirmed: &BTreeMap<String, Confirmed>,
    last_failed_update: Option<FailedUpdate>,
    booted_version: Option<String>,
) -> Slots {
    let text = |value: &Value| value.as_str().map(str::to_string);
    let booted = text(&status["booted"]).unwrap_or_default();
    let next = next_boot(env);
    let mut slots = Vec::new();
    for entry in status["slots"].as_array().into_iter().flatten() {
        let Some((name, slot)) = entry.as_object().and_then(|object| object.iter().next()) else {
            continue;
        };
        let bootname = text(&slot["bootname"]).unwrap_or_default();
        if bootname.is_empty() {
            continue;
        }
        let installed = text(&slot["slot_status"]["installed"]["timestamp"]);
        let is_booted = bootname == booted;
        // The booted root says its own version; another slot's is the bundle RAUC last wrote
        // into it, else the version the appliance confirmed there (the factory image).
        let version = if is_booted {
            booted_version.clone()
        } else {
            text(&slot["slot_status"]["bundle"]["version"])
                .or_else(|| confirmed.get(&bootname).and_then(|c| c.version.clone()))
        };
        let flag = |suffix: &str| env.get(&format!("{bootname}_{suffix}")).map(String::as_str);
        slots.push(SlotView {
            name: name.clone(),
            device: text(&slot["device"]).unwrap_or_default(),
            booted: is_booted,
            primary: next.as_deref() == Some(bootname.as_str()),
            boot_status: text(&slot["boot_status"]).unwrap_or_else(|| "unknown".into()),
            on_trial: flag("OK") == Some("1") && flag("TRY") == Some("1"),
            version,
            installed,
            bootname,
        });
    }
    slots.sort_by(|a, b| a.bootname.cmp(&b.bootname));
    Slots {
        booted,
        slots,
        last_failed_update,
    }
}

/// True when RAUC wrote the slot after the contents the appliance last confirmed in it.
fn slot_rewritten_since_confirmed(
    confirmed: &BTreeMap<String, Confirmed>,
    bootname: &str,
    installed: &Option<String>,
) -> bool {
    match confirmed.get(bootname) {
        Some(record) => record.installed != *installed,
        None => installed.is_some(),
    }
}

/// The slot GRUB boots next, by image/grub.cfg's rule: the first slot of ORDER that is OK and
/// not tried; else the last OK one; None when no slot is OK (GRUB then boots A).
fn next_boot(env: &BTreeMap<String, String>) -> Option<String> {
    let order: Vec<&str> = env
        .get("ORDER")
        .map_or(Vec::new(), |order| order.split_whitespace().collect());
    let flag = |slot: &str, suffix: &str| {
        env.get(&format!("{slot}_{suffix}")).map(String::as_str) == Some("1")
    };
    order
        .iter()
        .find(|slot| flag(slot, "OK") && !flag(slot, "TRY"))
        .or_else(|| order.iter().rev().find(|slot| flag(slot, "OK")))
        .map(|slot| slot.to_string())
}

/// The slots that GRUB tried before the booted one and that never got marked good: the box
/// fell back from them.
fn fallen_back_from(env: &BTreeMap<String, String>, booted: &str) -> Vec<String> {
    let order = env.get("ORDER").map(String::as_str).unwrap_or("");
    let mut fallen = Vec::new();
    for slot in order.split_whitespace() {
        if slot == booted {
            break;
        }
        let flag = |suffix: &str| env.get(&format!("{slot}_{suffix}")).map(String::as_str);
        if flag("OK") == Some("1") && flag("TRY") == Some("1") {
            fallen.push(slot.to_string());
        }
    }
    fallen
}

/// Prints the slots section of `appliance-ctl status`.
pub fn print_slots(slots: &Slots) {
    println!();
    for slot in &slots.slots {
        let mut notes = Vec::new();
        if slot.booted {
            notes.push("booted".to_string());
        }
        if slot.primary {
            notes.push("next boot".to_string());
        }
        // RAUC calls a slot on trial "bad" (not OK=1 TRY=0): say what it is.
        let state = if slot.on_trial {
            "on trial (not yet marked good)"
        } else {
            slot.boot_status.as_str()
        };
        let version = match (&slot.version, &slot.installed, slot.booted) {
            (Some(version), _, _) => version.as_str(),
            (None, None, false) => "none (no update has written it)",
            (None, _, _) => "unknown",
        };
        println!(
            "slot {} ({}): {}, version {}{}{}",
            slot.bootname,
            slot.name,
            state,
            version,
            slot.installed
                .as_deref()
                .map_or(String::new(), |at| format!(", installed {at}")),
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join(", "))
            }
        );
    }
    if let Some(failed) = &slots.last_failed_update {
        let what = match failed.kind {
            FallbackKind::FailedUpdate => "last failed update",
            FallbackKind::InterruptedBoot => "last interrupted boot (not an update's fault)",
        };
        println!(
            "{what}: slot {} (version {}{}) was not marked good in its boot; the box fell back \
             to slot {} (noticed at unix time {})",
            failed.slot,
            failed.version.as_deref().unwrap_or("unknown"),
            failed
                .installed
                .as_deref()
                .map_or(String::new(), |at| format!(", installed {at}")),
            failed.fell_back_to,
            failed.detected_unix_s
        );
    }
}

/// `appliance-ctl update SOURCE [--reboot]`: installs a bundle (a file on the box or an http(s)
/// URL, downloaded first) into the slot not booted, then reboots when asked.
pub fn install(source: &str, reboot: bool) -> Result<()> {
    if !available() {
        bail!("this system does not update through RAUC (no {RAUC_SYSTEM_CONF})");
    }
    let before = slots()?;
    let booted = ready_to_install(&before)?;
    let target = before.slots.iter().find(|slot| !slot.booted);
    println!(
        "installing {source} into slot {} (booted: slot {}, version {})",
        target.map_or("?", |slot| slot.bootname.as_str()),
        booted.bootname,
        booted.version.as_deref().unwrap_or("unknown")
    );
    let is_url = source.starts_with("http://") || source.starts_with("https://");
    let file = if is_url {
        download(source)?
    } else {
        PathBuf::from(source)
    };
    // RAUC checks the signature against /etc/rauc/keyring.pem before it touches a slot, and
    // prints its progress; its refusal reason goes to our standard error as it is.
    let status = Command::new("rauc")
        .arg("install")
        .arg("--")
        .arg(&file)
        .status()
        .context("running rauc install");
    if is_url {
        let _ = std::fs::remove_file(&file);
    }
    let status = status?;
    if !status.success() {
        // RAUC refuses a bundle before it touches a slot; a failure while writing (a stream
        // cut short, a payload block that fails its hash) leaves the target marked bad.
        let target_state = slots().ok().and_then(|after| {
            after
                .slots
                .into_iter()
                .find(|slot| !slot.booted)
                .map(|slot| format!("slot {} is {}", slot.bootname, slot.boot_status))
        });
        bail!(
            "RAUC refused or failed the update (its reason is above); the booted slot {} and the \
             next boot are unchanged; {}",
            booted.bootname,
            target_state.unwrap_or_else(|| "the other slot's state is unknown".into())
        );
    }
    let after = slots()?;
    if let Some(slot) = after.slots.iter().find(|slot| slot.primary) {
        println!(
            "installed version {} into slot {}; the next boot starts it (on trial until \
             applianced is healthy)",
            slot.version.as_deref().unwrap_or("unknown"),
            slot.bootname
        );
    }
    if reboot {
        println!("rebooting");
        output("systemctl", &["reboot"])?;
    } else {
        println!("reboot to run it (systemctl reboot, or appliance-ctl update --reboot)");
    }
    Ok(())
}

/// Downloads a bundle into [`DOWNLOAD_DIR`], printing progress; refuses one larger than
/// [`BUNDLE_BYTES_MAX`]. RAUC checks it afterwards exactly as a file given by the operator.
fn download(url: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(DOWNLOAD_DIR).with_context(|| format!("creating {DOWNLOAD_DIR}"))?;
    let path = Path::new(DOWNLOAD_DIR).join("bundle.raucb");
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(3600))
        .build()?;
    let mut response = client
        .get(url)
        .send()
        .with_context(|| format!("fetching {url}"))?;
    if !response.status().is_success() {
        bail!("fetching {url}: the server answered {}", response.status());
    }
    let expected = response.content_length();
    if expected.is_some_and(|bytes| bytes > BUNDLE_BYTES_MAX) {
        bail!(
            "{url} is larger than the {} MiB a bundle may be",
            BUNDLE_BYTES_MAX >> 20
        );
    }
    let mut out =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut buffer = vec![0u8; 1 << 20];
    let (mut received, mut shown) = (0u64, 0u64);
    loop {
        let read = std::io::Read::read(&mut response, &mut buffer)
            .with_context(|| format!("reading {url}"))?;
        if read == 0 {
            break;
        }
        received += read as u64;
        if received > BUNDLE_BYTES_MAX {
            let _ = std::fs::remove_file(&path);
            bail!(
                "{url} is larger than the {} MiB a bundle may be",
                BUNDLE_BYTES_MAX >> 20
            );
        }
        if let Err(error) = std::io::Write::write_all(&mut out, &buffer[..read]) {
            let _ = std::fs::remove_file(&path);
            return Err(error).with_context(|| {
                format!(
                    "writing {} (is /var full? a file on the box also works)",
                    path.display()
                )
            });
        }
        if received >= shown + (32 << 20) {
            shown = received;
            println!(
                "downloaded {} MiB{}",
                received >> 20,
                expected.map_or(String::new(), |all| format!(" of {}", all >> 20))
            );
        }
    }
    if expected.is_some_and(|bytes| bytes != received) {
        let _ = std::fs::remove_file(&path);
        bail!("{url}: the download ended after {received} bytes");
    }
    println!("downloaded {url} ({} MiB)", received >> 20);
    Ok(path)
}

/// The booted slot, when an install may go ahead: RAUC names one and it is marked good. While
/// the booted slot is on trial, an install would leave both slots tried and GRUB with no good
/// slot to fall back to.
fn ready_to_install(slots: &Slots) -> Result<&SlotView> {
    let booted =
        slots.slots.iter().find(|slot| slot.booted).context(
            "rauc status names no booted slot (is rauc.slot= on the kernel command line?)",
        )?;
    if booted.boot_status != "good" || booted.on_trial {
        bail!(
            "slot {} (booted) is not marked good yet: appliance-update-confirm.service marks it \
             once applianced has been healthy for a while. An update now would leave no good slot \
             to fall back to; wait for it (journalctl -u appliance-update-confirm)",
            booted.bootname
        );
    }
    Ok(booted)
}

/// A number of seconds from a setting, or `default` (with a warning) when it is not one.
pub fn seconds_or(name: &str, value: &str, default: u64) -> Duration {
    match value.trim().parse::<u64>() {
        Ok(seconds) if seconds <= 7 * 24 * 3600 => Duration::from_secs(seconds),
        _ => {
            eprintln!(
                "{name} {value:?} is not a number of seconds up to a week: using {default} \
                 (check /etc/appliance/update.conf)"
            );
            Duration::from_secs(default)
        }
    }
}

/// How `confirm-slot` asks whether the daemon is healthy (the status over the control socket).
pub type HealthProbe<'a> = &'a dyn Fn() -> Result<bool>;

/// `appliance-ctl confirm-slot`: run by appliance-update-confirm.service at every boot.
pub fn confirm(healthy_for: Duration, deadline: Duration, healthy: HealthProbe) -> Result<()> {
    let started = Instant::now();
    let status = wait_for_rauc(Duration::from_secs(120))?;
    let env = grubenv()?;
    let records = Records::new();
    let confirmed = records.confirmed();
    let view = slots_from(
        &status,
        &env,
        &confirmed,
        records.failed(),
        booted_version(),
    );
    let booted = view
        .slots
        .iter()
        .find(|slot| slot.booted)
        .context("rauc status names no booted slot (is rauc.slot= on the kernel command line?)")?
        .clone();
    for slot in fallen_back_from(&env, &booted.bootname) {
        note_fallback(&records, &view, &confirmed, &slot, &booted.bootname)?;
    }
    let new_contents =
        slot_rewritten_since_confirmed(&confirmed, &booted.bootname, &booted.installed);
    if !new_contents {
        // Contents that were healthy here before (or the factory image): an ordinary reboot.
        // Marked good at once, so that a reboot during this boot does not fall back to the
        // older slot.
        output("rauc", &["status", "mark-good", "booted"])?;
        record_confirmed(&records, confirmed, &booted)?;
        println!(
            "slot {} (version {}) booted; its contents were confirmed before: marked good",
            booted.bootname,
            booted.version.as_deref().unwrap_or("unknown")
        );
        return Ok(());
    }
    println!(
        "slot {} (version {}) booted for the first time since an update; waiting for applianced \
         to be healthy for {} s (deadline {} s)",
        booted.bootname,
        booted.version.as_deref().unwrap_or("unknown"),
        healthy_for.as_secs(),
        deadline.as_secs()
    );
    let mut healthy_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        match healthy() {
            Ok(true) => {
                let since = *healthy_since.get_or_insert(now);
                if now.duration_since(since) >= healthy_for {
                    break;
                }
            }
            Ok(false) | Err(_) => healthy_since = None,
        }
        if healthy_since.is_none() && now.duration_since(started) >= deadline {
            return not_healthy_in_time(&view, &booted, deadline);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    output("rauc", &["status", "mark-good", "booted"])?;
    record_confirmed(&records, confirmed, &booted)?;
    println!(
        "slot {} (version {}) marked good after {} s",
        booted.bootname,
        booted.version.as_deref().unwrap_or("unknown"),
        started.elapsed().as_secs()
    );
    Ok(())
}

/// Remembers the booted slot's contents as confirmed (its version, for when another slot is
/// booted, and RAUC's install time, to tell new contents from confirmed ones).
fn record_confirmed(
    records: &Records,
    mut confirmed: BTreeMap<String, Confirmed>,
    booted: &SlotView,
) -> Result<()> {
    confirmed.insert(
        booted.bootname.clone(),
        Confirmed {
            version: booted.version.clone(),
            installed: booted.installed.clone(),
            confirmed_unix_s: now_unix_s(),
        },
    );
    records.write("confirmed.json", &confirmed)
}

/// What to do when new contents never got healthy by the deadline.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Reboot: GRUB then falls back to this good slot.
    RebootTo(String),
    /// Stay, unconfirmed, and say why a reboot would not help.
    Stay(&'static str),
}

fn verdict(view: &Slots, booted: &SlotView) -> Verdict {
    let fallback = view
        .slots
        .iter()
        .find(|slot| !slot.booted && slot.boot_status == "good");
    match fallback {
        // Only when GRUB recorded this boot as a try: otherwise it would boot this slot again.
        Some(other) if booted.on_trial => Verdict::RebootTo(other.bootname.clone()),
        Some(_) => Verdict::Stay("GRUB did not record this boot as a try"),
        None => Verdict::Stay("no other good slot to fall back to"),
    }
}

/// New contents never got healthy: reboot into the other slot when GRUB will fall back to it;
/// otherwise leave the slot unconfirmed and fail (a reboot would not help).
fn not_healthy_in_time(view: &Slots, booted: &SlotView, deadline: Duration) -> Result<()> {
    match verdict(view, booted) {
        Verdict::RebootTo(other) => {
            println!(
                "applianced was not healthy within {} s of the first boot of slot {} (version \
                 {}); rebooting so that GRUB falls back to slot {other}",
                deadline.as_secs(),
                booted.bootname,
                booted.version.as_deref().unwrap_or("unknown"),
            );
            output("systemctl", &["reboot"])?;
            Ok(())
        }
        Verdict::Stay(why) => bail!(
            "applianced was not healthy within {} s; slot {} stays unconfirmed ({why})",
            deadline.as_secs(),
            booted.bootname,
        ),
    }
}

/// GRUB skipped `slot`, tried and never marked good, and booted this one. New contents there
/// are a failed update: RAUC marks the slot bad and the booted one primary. Contents that were
/// confirmed before only had their boot cut short (a power cut, a hang): that slot becomes the
/// next boot again.
fn note_fallback(
    records: &Records,
    view: &Slots,
    confirmed: &BTreeMap<String, Confirmed>,
    slot: &str,
    booted: &str,
) -> Result<()> {
    let skipped = view.slots.iter().find(|view| view.bootname == slot);
    let installed = skipped.and_then(|slot| slot.installed.clone());
    let failed_update = slot_rewritten_since_confirmed(confirmed, slot, &installed);
    let record = FailedUpdate {
        slot: slot.to_string(),
        version: skipped.and_then(|slot| slot.version.clone()),
        installed,
        fell_back_to: booted.to_string(),
        detected_unix_s: now_unix_s(),
        kind: if failed_update {
            FallbackKind::FailedUpdate
        } else {
            FallbackKind::InterruptedBoot
        },
    };
    let version = record.version.as_deref().unwrap_or("unknown");
    // grubenv first: it decides the next boot; the record only reports.
    if failed_update {
        eprintln!(
            "slot {slot} (version {version}) was booted after an update and never marked good: \
             the box fell back to slot {booted}; marking slot {slot} bad"
        );
        output("rauc", &["status", "mark-bad", "other"])?;
        output("rauc", &["status", "mark-active", "booted"])?;
    } else {
        eprintln!(
            "the boot of slot {slot} (version {version}, confirmed before) was cut short and the \
             box fell back to slot {booted}; slot {slot} boots again at the next reboot"
        );
        output("rauc", &["status", "mark-active", "other"])?;
    }
    records.write("failed-update.json", &record)
}

/// `rauc status` as JSON, waiting for RAUC's service to come up (D-Bus activation at boot).
fn wait_for_rauc(patience: Duration) -> Result<Value> {
    retrying(patience, Duration::from_secs(2), rauc_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(text: &str) -> BTreeMap<String, String> {
        parse_grubenv(text)
    }

    fn status(installed_b: Option<&str>) -> Value {
        let slot_status = installed_b.map(|at| {
            serde_json::json!({
                "bundle": {"version": "2.0"},
                "installed": {"timestamp": at, "count": 1}
            })
        });
        serde_json::json!({
            "booted": "A",
            "boot_primary": "rootfs.0",
            "slots": [
                {"rootfs.1": {"bootname": "B", "device": "/dev/b", "state": "inactive",
                              "boot_status": "bad", "slot_status": slot_status}},
                {"rootfs.0": {"bootname": "A", "device": "/dev/a", "state": "booted",
                              "boot_status": "good"}}
            ]
        })
    }

    #[test]
    fn a_slot_tried_ahead_of_the_booted_one_is_a_fallback() {
        let fallen = env("ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\n");
        assert_eq!(fallen_back_from(&fallen, "A"), vec!["B".to_string()]);
        // The normal case: the booted slot is first.
        let normal = env("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=1\nB_TRY=0\n");
        assert!(fallen_back_from(&normal, "A").is_empty());
        // A slot marked bad was not tried by GRUB: no fallback to report.
        let bad = env("ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n");
        assert!(fallen_back_from(&bad, "A").is_empty());
    }

    #[test]
    fn slots_combine_rauc_grubenv_and_records() {
        let grub = env("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=0\nB_TRY=0\n");
        let view = slots_from(
            &status(None),
            &grub,
            &BTreeMap::new(),
            None,
            Some("1.0".into()),
        );
        assert_eq!(view.booted, "A");
        let names: Vec<_> = view.slots.iter().map(|s| s.bootname.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        let a = &view.slots[0];
        assert!(a.booted && a.primary && a.on_trial);
        assert_eq!(a.version.as_deref(), Some("1.0"));
        assert_eq!(view.slots[1].version, None);
        // After an install into B, B reports the bundle's version and its install time.
        let view = slots_from(
            &status(Some("2026-12-03T12:00:00Z")),
            &grub,
            &BTreeMap::new(),
            None,
            Some("1.0".into()),
        );
        assert_eq!(view.slots[1].version.as_deref(), Some("2.0"));
        assert_eq!(
            view.slots[1].installed.as_deref(),
            Some("2026-12-03T12:00:00Z")
        );
    }

    #[test]
    fn an_install_waits_until_the_booted_slot_is_marked_good() {
        let on_trial = env("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=0\nB_TRY=0\n");
        let view = slots_from(&status(None), &on_trial, &BTreeMap::new(), None, None);
        let refusal = ready_to_install(&view).unwrap_err().to_string();
        assert!(refusal.contains("not marked good yet"), "{refusal}");
        let confirmed = env("ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n");
        let view = slots_from(&status(None), &confirmed, &BTreeMap::new(), None, None);
        assert_eq!(ready_to_install(&view).unwrap().bootname, "A");
        // RAUC naming no booted slot (no rauc.slot= on the command line): refused.
        let mut unbooted = status(None);
        unbooted["booted"] = Value::Null;
        let view = slots_from(&unbooted, &confirmed, &BTreeMap::new(), None, None);
        assert!(ready_to_install(&view).is_err());
    }

    #[test]
    fn a_bad_setting_falls_back_to_the_default() {
        assert_eq!(seconds_or("x", "10", 60), Duration::from_secs(10));
        assert_eq!(seconds_or("x", " 10 ", 60), Duration::from_secs(10));
        for junk in ["abc", "", "-5", "1e3", "99999999999999999999", "604801"] {
            assert_eq!(
                seconds_or("x", junk, 60),
                Duration::from_secs(60),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn the_next_boot_follows_grub_cfg() {
        for (grubenv, next) in [
            // The factory image: A only.
            ("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=0\nB_TRY=0\n", Some("A")),
            // An update written into B, not booted yet.
            ("ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=0\n", Some("B")),
            // B tried and never marked good: back to A.
            ("ORDER=B A\nA_OK=1\nA_TRY=0\nB_OK=1\nB_TRY=1\n", Some("A")),
            // Both tried (the fallback boot was cut short too): the last OK one, the old slot.
            ("ORDER=B A\nA_OK=1\nA_TRY=1\nB_OK=1\nB_TRY=1\n", Some("A")),
            // B marked bad after the fallback.
            ("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=0\nB_TRY=0\n", Some("A")),
            ("ORDER=A B\nA_OK=0\nB_OK=0\n", None),
        ] {
            assert_eq!(next_boot(&env(grubenv)).as_deref(), next, "{grubenv}");
        }
    }

    #[test]
    fn a_reboot_to_fall_back_needs_a_good_slot_and_a_recorded_try() {
        let view = |grubenv: &str| {
            slots_from(
                &status(Some("t1")),
                &env(grubenv),
                &BTreeMap::new(),
                None,
                None,
            )
        };
        // Booted A on trial, B good: reboot to B.
        let mut both = view("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=1\nB_TRY=0\n");
        both.slots[1].boot_status = "good".into();
        let booted = both.slots[0].clone();
        assert_eq!(verdict(&both, &booted), Verdict::RebootTo("B".into()));
        // GRUB did not record the try: a reboot would come back here.
        let mut untried = booted.clone();
        untried.on_trial = false;
        assert!(matches!(verdict(&both, &untried), Verdict::Stay(_)));
        // No good slot to fall back to.
        let alone = view("ORDER=A B\nA_OK=1\nA_TRY=1\nB_OK=0\nB_TRY=0\n");
        let booted = alone.slots[0].clone();
        assert!(matches!(verdict(&alone, &booted), Verdict::Stay(_)));
    }

    #[test]
    fn new_contents_are_those_rauc_wrote_after_the_last_confirmation() {
        let mut confirmed = BTreeMap::new();
        assert!(!slot_rewritten_since_confirmed(&confirmed, "A", &None));
        assert!(slot_rewritten_since_confirmed(
            &confirmed,
            "B",
            &Some("t1".into())
        ));
        confirmed.insert(
            "B".to_string(),
            Confirmed {
                version: Some("2.0".into()),
                installed: Some("t1".into()),
                confirmed_unix_s: 1,
            },
        );
        assert!(!slot_rewritten_since_confirmed(
            &confirmed,
            "B",
            &Some("t1".into())
        ));
        assert!(slot_rewritten_since_confirmed(
            &confirmed,
            "B",
            &Some("t2".into())
        ));
    }
}
