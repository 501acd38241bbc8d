//! `cargo xtask bundle`: a signed RAUC bundle of the appliance's root slot (its filesystem with
//! kernel and initramfs inside), built by `image/build.sh --slot-image` from the same inputs as
//! `cargo xtask image`, plus the version string the box will report. Also the development
//! signing keys under `target/keys/` (never committed), which the image's keyring trusts unless
//! production keys are given.

use crate::{image, util};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// RAUC's `compatible`: a bundle for another kind of box is refused (image/overlay/etc/rauc).
pub const COMPATIBLE: &str = "appliance-x86_64";

/// The development keys: a CA (the image's keyring) and a signing certificate it issued.
pub struct Keys {
    pub ca_cert: PathBuf,
    pub signing_cert: PathBuf,
    pub signing_key: PathBuf,
}

/// Makes the development CA and signing key under `target/keys/` unless they exist.
pub fn development_keys() -> Result<Keys> {
    keys_in(
        &util::workspace_root().join("target/keys"),
        "dev",
        "Appliance development",
    )
}

/// A CA and a signing certificate it issued, named `PREFIX-ca.pem`, `PREFIX-signing.{pem,key}`
/// in `dir` (made with openssl unless they exist). The VM test makes a second, unrelated set.
pub fn keys_in(dir: &Path, prefix: &str, organisation: &str) -> Result<Keys> {
    let keys = Keys {
        ca_cert: dir.join(format!("{prefix}-ca.pem")),
        signing_cert: dir.join(format!("{prefix}-signing.pem")),
        signing_key: dir.join(format!("{prefix}-signing.key")),
    };
    if keys.ca_cert.exists() && keys.signing_cert.exists() && keys.signing_key.exists() {
        return Ok(keys);
    }
    std::fs::create_dir_all(dir)?;
    let ca_key = dir.join(format!("{prefix}-ca.key"));
    let request = dir.join(format!("{prefix}-signing.csr"));
    let extensions = dir.join(format!("{prefix}-signing.ext"));
    std::fs::write(
        &extensions,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=codeSigning\nsubjectKeyIdentifier=hash\n\
         authorityKeyIdentifier=keyid\n",
    )?;
    let text = |path: &Path| path.to_string_lossy().into_owned();
    let ca_subject = format!("/O={organisation}/CN={organisation} update CA");
    let signing_subject = format!("/O={organisation}/CN={organisation} bundle signing");
    util::output(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "3650",
            "-subj",
            &ca_subject,
            "-keyout",
            &text(&ca_key),
            "-out",
            &text(&keys.ca_cert),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    util::output(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &signing_subject,
            "-keyout",
            &text(&keys.signing_key),
            "-out",
            &text(&request),
        ],
    )?;
    util::output(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &text(&request),
            "-CA",
            &text(&keys.ca_cert),
            "-CAkey",
            &text(&ca_key),
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &text(&extensions),
            "-out",
            &text(&keys.signing_cert),
        ],
    )?;
    println!(
        "xtask bundle: made signing keys in {} ({prefix})",
        dir.display()
    );
    Ok(keys)
}

/// What `cargo xtask bundle` builds.
pub struct BundleOptions {
    pub version: Option<String>,
    /// Production signing: certificate and key (the development keys otherwise).
    pub signing: Option<(PathBuf, PathBuf)>,
    /// Where to write it (target/bundle/appliance-VERSION.raucb otherwise).
    pub out: Option<PathBuf>,
    /// The VM test's broken update: applianced exits at once.
    pub broken: bool,
}

/// `cargo xtask bundle [--version V] [--cert PEM --key PEM] [--out FILE]`.
pub fn run(args: &[&str]) -> Result<()> {
    let mut options = BundleOptions {
        version: None,
        signing: None,
        out: None,
        broken: false,
    };
    let (mut cert, mut key) = (None, None);
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = || {
            rest.next()
                .map(|value| value.to_string())
                .with_context(|| format!("{arg} needs a value"))
        };
        match *arg {
            "--version" => options.version = Some(value()?),
            "--cert" => cert = Some(PathBuf::from(value()?)),
            "--key" => key = Some(PathBuf::from(value()?)),
            "--out" => options.out = Some(PathBuf::from(value()?)),
            other => bail!(
                "cargo xtask bundle: unknown argument {other}; usage: cargo xtask bundle \
                 [--version V] [--cert PEM --key PEM] [--out FILE]"
            ),
        }
    }
    options.signing = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => bail!("--cert and --key go together"),
    };
    build(&options).map(|_| ())
}

/// The image's keyring: IMAGE_KEYRING (a production CA) or the development CA.
pub fn image_keyring() -> Result<PathBuf> {
    match std::env::var_os("IMAGE_KEYRING") {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(development_keys()?.ca_cert),
    }
}

/// Builds the bundle and returns its path.
pub fn build(options: &BundleOptions) -> Result<PathBuf> {
    if !util::is_root() {
        bail!("cargo xtask bundle needs root: the root tree's file owners (as cargo xtask image)");
    }
    let started = Instant::now();
    image::ensure_tools()?;
    image::ensure_packages(&[("rauc", "rauc"), ("mksquashfs", "squashfs-tools")], &[])?;
    let root = util::workspace_root();
    util::applianced()?;
    let keyring = image_keyring()?;
    let (cert, key) = match &options.signing {
        Some((cert, key)) => (cert.clone(), key.clone()),
        None => {
            let keys = development_keys()?;
            (keys.signing_cert, keys.signing_key)
        }
    };
    let work = root.join(if options.broken {
        "target/bundle/work-broken"
    } else {
        "target/bundle/work"
    });
    let content = work.join("content");
    std::fs::create_dir_all(&content)?;
    // build.sh keeps its up-to-date check beside the slot image (rootfs.ext4.inputs), outside
    // the bundle's content folder, which gets a hard link of the image.
    let slot_image = work.join("rootfs.ext4");
    let mut build_args = vec![
        "image/build.sh".to_string(),
        "--slot-image".into(),
        slot_image.to_string_lossy().into_owned(),
        "--keyring".into(),
        keyring.to_string_lossy().into_owned(),
    ];
    if let Some(version) = &options.version {
        build_args.extend(["--version".into(), version.clone()]);
    }
    if options.broken {
        build_args.push("--test-broken-applianced".into());
    }
    let build_args: Vec<&str> = build_args.iter().map(String::as_str).collect();
    util::run_in(&root, "bash", &build_args)?;
    let version = std::fs::read_to_string(work.join("rootfs.ext4.version"))
        .context("the slot image has no version file")?
        .trim()
        .to_string();
    let _ = std::fs::remove_file(content.join("rootfs.ext4"));
    std::fs::hard_link(&slot_image, content.join("rootfs.ext4"))?;
    std::fs::copy(root.join("image/rauc-hook"), content.join("hook"))?;
    std::fs::write(content.join("manifest.raucm"), manifest(&version))?;
    // RAUC checks the signature it just made against the keyring, with the box's own rules
    // (check-purpose=codesign, as /etc/rauc/system.conf says).
    let conf = rauc_conf(&work, &keyring)?;
    let out = options.out.clone().unwrap_or_else(|| {
        root.join("target/bundle")
            .join(format!("appliance-{version}.raucb"))
    });
    let _ = std::fs::remove_file(&out);
    let text = |path: &Path| path.to_string_lossy().into_owned();
    util::run_in(
        &root,
        "rauc",
        &[
            "--conf",
            &text(&conf),
            "bundle",
            "--cert",
            &text(&cert),
            "--key",
            &text(&key),
            "--keyring",
            &text(&keyring),
            "--mksquashfs-args=-comp zstd -Xcompression-level 3",
            &text(&content),
            &text(&out),
        ],
    )?;
    println!(
        "xtask bundle: {} (version {version}, {} MiB) in {:.1} s",
        out.display(),
        std::fs::metadata(&out)?.len() >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// Writes `dir/system.conf` for the build host's `rauc` (`--conf`): the keyring and its rules,
/// as on the box (check-purpose=codesign).
pub fn rauc_conf(dir: &Path, keyring: &Path) -> Result<PathBuf> {
    let conf = dir.join("system.conf");
    std::fs::write(
        &conf,
        format!(
            "[system]\ncompatible={COMPATIBLE}\nbootloader=noop\n\n\
             [keyring]\npath={}\ncheck-purpose=codesign\n",
            keyring.display()
        ),
    )?;
    Ok(conf)
}

/// The bundle's manifest: one ext4 image for the root slot class, verity format (each block
/// checked against the signed hash tree as it is read, which also lets RAUC stream a URL).
fn manifest(version: &str) -> String {
    format!(
        "[update]\ncompatible={COMPATIBLE}\nversion={version}\n\
         description=ISP cache appliance root filesystem\n\n\
         [bundle]\nformat=verity\n\n\
         [hooks]\nfilename=hook\n\n\
         [image.rootfs]\nfilename=rootfs.ext4\nhooks=post-install\n"
    )
}
