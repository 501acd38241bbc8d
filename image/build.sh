#!/bin/bash
# Builds target/image/appliance.img: the raw disk image an operator writes to the boot drive.
# Called by `cargo xtask image` (which builds the release binaries first); can be run by hand:
#
#   image/build.sh [--applianced PATH] [--appliance-ctl PATH] [--version V] [--keyring PEM]
#                  [--slot-image OUT [--test-broken-applianced]]
#
# Without --slot-image it writes the disk image; with it, only the root slot's ext4 filesystem
# (sized to its contents), which `cargo xtask bundle` puts into a signed RAUC bundle. Both come
# from the same inputs. --version is the version string the box reports (default: the
# workspace's version and the inputs' hash); --keyring the CA certificate(s) RAUC checks
# bundles against (default: target/keys/dev-ca.pem, made by `cargo xtask image`).
# --test-broken-applianced replaces applianced with a program that exits at once: the VM test's
# broken update, never for a box.
#
# Needs root (mmdebstrap in root mode, files owned by other users in the filesystems) and
# Debian's mmdebstrap, e2fsprogs, gdisk, grub-pc-bin, grub-efi-amd64-bin, dosfstools and mtools.
# Layout, boot chain and A/B updates: image/README.md.
#
# Two caches make a rebuild with nothing changed fast:
#  1. target/image/cache/rootfs-KEY.tar: the Debian root from mmdebstrap. KEY hashes the
#     suite, the mirrors, image/packages.txt, image/initramfs/ and ROOTFS_RECIPE below. A
#     changed package list builds a new one; IMAGE_REFRESH=1 rebuilds it anyway (security
#     updates: the same list then resolves to newer packages).
#  2. target/image/appliance.img.inputs: a hash of the rootfs key, the two binaries, the unit
#     files of systemd/, everything under image/ and this script. When it matches, the image
#     is up to date and nothing is done.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/target/image"
CACHE="$OUT/cache"
WORK="$OUT/work"
IMAGE="$OUT/appliance.img"
APPLIANCED="$ROOT/target/release/applianced"
APPLIANCE_CTL="$ROOT/target/release/appliance-ctl"
KEYRING="$ROOT/target/keys/dev-ca.pem"
VERSION=
SLOT_IMAGE=
BROKEN=0

while [ $# -gt 0 ]; do
    case "$1" in
    --applianced) APPLIANCED=$2; shift 2 ;;
    --appliance-ctl) APPLIANCE_CTL=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --keyring) KEYRING=$2; shift 2 ;;
    --slot-image) SLOT_IMAGE=$2; shift 2 ;;
    --test-broken-applianced) BROKEN=1; shift ;;
    *) echo "usage: $0 [--applianced PATH] [--appliance-ctl PATH] [--version V]" \
        "[--keyring PEM] [--slot-image OUT [--test-broken-applianced]]" >&2; exit 2 ;;
    esac
done
case "$VERSION" in
*[!A-Za-z0-9.+~_-]*) echo "image: --version: letters, digits and . + ~ _ - only" >&2; exit 2 ;;
esac
[ "$BROKEN" = 0 ] || [ -n "$SLOT_IMAGE" ] || {
    echo "image: --test-broken-applianced goes with --slot-image only" >&2; exit 2; }

# Debian stable at the time of writing; IMAGE_SUITE overrides it (the cache key follows).
SUITE=${IMAGE_SUITE:-trixie}
MIRROR=${IMAGE_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${IMAGE_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# Bump when the mmdebstrap invocation below changes in a way the key would not see.
ROOTFS_RECIPE=1

# The partition table and filesystems carry fixed identifiers, so that grub.cfg and fstab
# can name them. Every box flashed from this image has the same ones (as with any image).
DISK_GUID=2b753fd6-58bf-4e3d-adcb-d987175475e9
PART_BIOS=bf265d56-4e0d-4434-ba82-68f3f011bd78
PART_BOOT=c715a77b-9570-4698-8b1e-7e1682b49e20
PART_ROOT_A=04491226-1f7e-417a-bdbd-79eec16ebdd6
PART_ROOT_B=bc6e57b9-4e1e-4529-9ada-783be8d11c16
PART_VAR=f35c45c7-85c5-4145-8b6f-7149dc25e07f
PART_ESP=6a3c5e4b-8d0e-4f63-9a3e-2f1b7c9d4e10
FS_BOOT=fc0c2b1c-6599-404a-a9d1-5177d49af0da
FS_ROOT_A=4a13a0ef-b639-4da4-aaff-b7ccbcfeaf7a
FS_VAR=dcc85cc5-6e0d-4457-bd94-922c69ca6709
FS_ESP=A7E5C0DE  # the FAT volume ID

# Partition sizes in MiB (the layout is in image/README.md).
BIOS_MIB=1
BOOT_MIB=31
ROOT_MIB=1024
VAR_MIB=512
ESP_MIB=64

GRUB_DIR=/usr/lib/grub/i386-pc
GRUB_EFI_DIR=/usr/lib/grub/x86_64-efi

say() { printf '\033[1mimage:\033[0m %s\n' "$*"; }
die() { echo "image: $*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap root mode, file owners in the filesystems)"
for tool in mmdebstrap mkfs.ext4 sgdisk grub-mkimage "$GRUB_DIR/grub-bios-setup" \
    "$GRUB_EFI_DIR/linux.mod" grub-editenv tar zstd mkfs.fat mcopy mmd; do
    command -v "$tool" >/dev/null || [ -e "$tool" ] ||
        die "missing $tool (apt-get install mmdebstrap e2fsprogs gdisk grub-pc-bin" \
            "grub-efi-amd64-bin grub-common zstd dosfstools mtools)"
done
[ -x "$APPLIANCED" ] || die "no $APPLIANCED (cargo build --release)"
[ -x "$APPLIANCE_CTL" ] || die "no $APPLIANCE_CTL (cargo build --release)"
[ -r "$KEYRING" ] || die "no keyring $KEYRING (cargo xtask image makes the development one)"

mkdir -p "$CACHE"
START=$(date +%s)
if [ -n "$SLOT_IMAGE" ]; then
    IMAGE=$SLOT_IMAGE
    WORK="$OUT/work-slot"
fi
trap 'rm -f "$IMAGE.tmp" "$CACHE"/rootfs-*.tar.tmp' EXIT

# --- 1. The Debian root (cached) ---------------------------------------------------------
PACKAGES=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$ROOT/image/packages.txt" | tr -s ' \n' ',,' | sed 's/,$//')
ROOTFS_KEY=$({
    echo "recipe $ROOTFS_RECIPE suite $SUITE mirror $MIRROR $SECURITY_MIRROR packages $PACKAGES"
    (cd "$ROOT/image/initramfs" && find . -type f | LC_ALL=C sort | xargs sha256sum)
} | sha)
ROOTFS="$CACHE/rootfs-$ROOTFS_KEY.tar"
if [ -f "$ROOTFS" ] && [ "${IMAGE_REFRESH:-0}" != 1 ]; then
    say "Debian root: cached ($(basename "$ROOTFS"))"
else
    say "Debian root: mmdebstrap $SUITE with $PACKAGES"
    step=$(date +%s)
    rm -f "$ROOTFS.tmp"
    mmdebstrap --mode=root --variant=essential --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include="$PACKAGES" \
        --aptopt='Acquire::Languages "none"' \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --essential-hook="mkdir -p \"\$1/etc/initramfs-tools\" && cp -r '$ROOT/image/initramfs/.' \"\$1/etc/initramfs-tools/\"" \
        "$SUITE" "$ROOTFS.tmp" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main"
    mv "$ROOTFS.tmp" "$ROOTFS"
    find "$CACHE" -name 'rootfs-*.tar' ! -name "$(basename "$ROOTFS")" -delete
    say "Debian root: built in $(elapsed "$step") ($(du -h "$ROOTFS" | cut -f1))"
fi

# --- 2. Up to date? ----------------------------------------------------------------------
SYSTEMD_FILES=(
    applianced.service applianced.socket appliance-fill.service appliance-fill.timer
    appliance-firstboot.service 60-appliance-nvme.rules appliance.toml.example
    sysusers.d/appliance.conf tmpfiles.d/appliance.conf appliance-update-confirm.service
)
# The inputs of the root tree (the version string aside, which defaults to a hash of them).
TREE_INPUTS=$({
    echo "rootfs $ROOTFS_KEY broken $BROKEN"
    sha256sum "$APPLIANCED" "$APPLIANCE_CTL" "$KEYRING" | cut -d' ' -f1
    (cd "$ROOT/systemd" && sha256sum "${SYSTEMD_FILES[@]}")
    (cd "$ROOT/image" && find . -type f ! -name README.md | LC_ALL=C sort | xargs sha256sum)
    sha256sum "$ROOT/README.md" | cut -d' ' -f1
    if [ -n "$SLOT_IMAGE" ]; then echo slot; else echo disk; fi
} | sha256sum | cut -d' ' -f1)
[ -n "$VERSION" ] || VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)+${TREE_INPUTS:0:12}"
INPUTS=$(echo "$TREE_INPUTS version $VERSION" | sha256sum | cut -d' ' -f1)
if [ -f "$IMAGE" ] && [ "$(cat "$IMAGE.inputs" 2>/dev/null)" = "$INPUTS" ]; then
    say "$IMAGE is up to date (inputs ${INPUTS:0:16}); nothing to do ($(elapsed "$START"))"
    exit 0
fi
rm -f "$IMAGE.inputs"

# --- 3. The root slot's tree -------------------------------------------------------------
step=$(date +%s)
rm -rf "$WORK"
mkdir -p "$WORK/root" "$WORK/boot/grub"
STAGE="$WORK/root"
tar -xpf "$ROOTFS" -C "$STAGE" --numeric-owner --xattrs --xattrs-include='*'

# The appliance's binaries (debug sections stripped: line tables are for the build host).
install -D -m 0755 "$APPLIANCED" "$STAGE/usr/bin/applianced"
install -D -m 0755 "$APPLIANCE_CTL" "$STAGE/usr/bin/appliance-ctl"
strip --strip-debug "$STAGE/usr/bin/applianced" "$STAGE/usr/bin/appliance-ctl"

# Shell completions (bash, zsh, fish) and man pages (gzipped, as Debian ships them), written
# by the binaries themselves from their command lines (`generate-docs`: appliance/clidocs);
# the build host runs the release binaries it just built, for its own architecture.
DOCS="$WORK/docs"
for program in applianced appliance-ctl; do
    binary=$APPLIANCED
    [ "$program" = appliance-ctl ] && binary=$APPLIANCE_CTL
    "$binary" generate-docs --out "$DOCS/$program" >/dev/null
    install -D -m 0644 "$DOCS/$program/bash/$program" \
        "$STAGE/usr/share/bash-completion/completions/$program"
    install -D -m 0644 "$DOCS/$program/zsh/_$program" \
        "$STAGE/usr/share/zsh/vendor-completions/_$program"
    install -D -m 0644 "$DOCS/$program/fish/$program.fish" \
        "$STAGE/usr/share/fish/vendor_completions.d/$program.fish"
done
for page in "$DOCS"/*/man[18]/*; do
    section=$(basename "$(dirname "$page")")
    install -D -m 0644 "$page" "$STAGE/usr/share/man/$section/$(basename "$page")"
    gzip -9n "$STAGE/usr/share/man/$section/$(basename "$page")"
done

# The units and snippets of systemd/, where the files themselves say they belong.
SYS="$ROOT/systemd"
install -D -m 0644 "$SYS/applianced.service" "$STAGE/usr/lib/systemd/system/applianced.service"
install -D -m 0644 "$SYS/applianced.socket" "$STAGE/usr/lib/systemd/system/applianced.socket"
install -D -m 0644 "$SYS/appliance-fill.service" "$STAGE/usr/lib/systemd/system/appliance-fill.service"
install -D -m 0644 "$SYS/appliance-fill.timer" "$STAGE/usr/lib/systemd/system/appliance-fill.timer"
install -D -m 0644 "$SYS/appliance-firstboot.service" "$STAGE/usr/lib/systemd/system/appliance-firstboot.service"
install -D -m 0644 "$SYS/appliance-update-confirm.service" "$STAGE/usr/lib/systemd/system/appliance-update-confirm.service"
install -D -m 0644 "$SYS/sysusers.d/appliance.conf" "$STAGE/usr/lib/sysusers.d/appliance.conf"
install -D -m 0644 "$SYS/tmpfiles.d/appliance.conf" "$STAGE/usr/lib/tmpfiles.d/appliance.conf"
install -D -m 0644 "$SYS/60-appliance-nvme.rules" "$STAGE/usr/lib/udev/rules.d/60-appliance-nvme.rules"
install -D -m 0644 "$SYS/appliance.toml.example" "$STAGE/usr/share/doc/appliance/appliance.toml.example"
install -D -m 0644 "$ROOT/README.md" "$STAGE/usr/share/doc/appliance/README.md"
install -D -m 0644 "$ROOT/image/README.md" "$STAGE/usr/share/doc/appliance/image.md"
install -D -m 0755 "$ROOT/image/appliance-firstboot" "$STAGE/usr/lib/appliance/appliance-firstboot"

# The image's own files (hostname, fstab, network, journald, the default configuration...).
cp -a --no-preserve=ownership "$ROOT/image/overlay/." "$STAGE/"
sed -i -e "s/@PART_VAR@/$PART_VAR/g" -e "s/@PART_BOOT@/$PART_BOOT/g" "$STAGE/etc/fstab"
sed -i -e "s/@PART_ROOT_A@/$PART_ROOT_A/g" -e "s/@PART_ROOT_B@/$PART_ROOT_B/g" \
    "$STAGE/etc/rauc/system.conf"
install -D -m 0644 "$KEYRING" "$STAGE/etc/rauc/keyring.pem"
mkdir -p "$STAGE/boot/loader"
chmod 0755 "$STAGE/etc/appliance"
# The version the box reports (appliance-ctl status, hostnamectl), and what it was built from.
echo "APPLIANCE_VERSION=$VERSION" > "$STAGE/etc/appliance-image"
echo "APPLIANCE_IMAGE_INPUTS=${INPUTS:0:16}" >> "$STAGE/etc/appliance-image"
echo "APPLIANCE_IMAGE_BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$STAGE/etc/appliance-image"
printf 'IMAGE_ID=appliance\nIMAGE_VERSION=%s\n' "$VERSION" >> "$STAGE/usr/lib/os-release"
if [ "$BROKEN" = 1 ]; then
    printf '#!/bin/sh\necho "applianced: this is the VM test'"'"'s broken build" >&2\nexit 1\n' \
        > "$STAGE/usr/bin/applianced"
fi

# Users, groups and enabled units (systemd's tools working on the tree offline).
chroot "$STAGE" systemd-sysusers
systemctl --root="$STAGE" enable --quiet applianced.socket applianced.service \
    appliance-firstboot.service appliance-update-confirm.service \
    appliance-security-report.service systemd-networkd.service
# A new machine ID at first boot (each box gets its own).
: > "$STAGE/etc/machine-id"
rm -f "$STAGE/var/lib/dbus/machine-id"

# The dpkg database describes the root filesystem it sits beside, so it stays in the slot:
# /var (shared by both slots) keeps only a link to the booted slot's copy.
mv "$STAGE/var/lib/dpkg" "$STAGE/usr/lib/appliance/dpkg"
ln -s ../../usr/lib/appliance/dpkg "$STAGE/var/lib/dpkg"

# /var gets a partition of its own: move its contents there, keep an empty mount point.
mv "$STAGE/var" "$WORK/var"
mkdir -m 0755 "$STAGE/var"
say "root tree: $(du -sh --exclude=./var "$STAGE" | cut -f1) root, $(du -sh "$WORK/var" | cut -f1) /var ($(elapsed "$step"))"

MIB=$((1024 * 1024))
# Each filesystem is written straight into its file or partition (mke2fs -E offset), from a
# tree. Features GRUB 2.06 reads: no orphan_file, no metadata_csum_seed (mke2fs 1.47 may add
# them).
mkfs() { # file start-MiB size-MiB label uuid tree
    mkfs.ext4 -q -F -t ext4 -O ^orphan_file,^metadata_csum_seed -L "$4" -U "$5" \
        -E "offset=$(($2 * MIB)),root_owner=0:0" -d "$6" "$1" "$(($3 * 1024))k"
}

if [ -n "$SLOT_IMAGE" ]; then
    # The slot's filesystem alone, for a bundle: its contents and a quarter more (at least 64
    # MiB free), never more than the slot. RAUC writes it into the slot not booted and grows it
    # to the partition (resize=true in /etc/rauc/system.conf).
    used_mib=$(du -sm "$STAGE" | cut -f1)
    slack_mib=$((used_mib / 4 < 64 ? 64 : used_mib / 4))
    size_mib=$((used_mib + slack_mib))
    [ "$size_mib" -le "$ROOT_MIB" ] || die "the root ($used_mib MiB) does not fit a $ROOT_MIB MiB slot"
    rm -f "$IMAGE.tmp"
    truncate -s "$((size_mib * MIB))" "$IMAGE.tmp"
    mkfs "$IMAGE.tmp" 0 "$size_mib" root "$(cat /proc/sys/kernel/random/uuid)" "$STAGE"
    mv "$IMAGE.tmp" "$IMAGE"
    echo "$INPUTS" > "$IMAGE.inputs"
    echo "$VERSION" > "$IMAGE.version"
    rm -rf "$WORK"
    say "slot image: $IMAGE, version $VERSION, $size_mib MiB ($(elapsed "$START"))"
    exit 0
fi

# --- 4. GRUB's partition -----------------------------------------------------------------
# The boot partition holds only GRUB (modules, grub.cfg, grubenv); each root slot carries its
# own kernel and initramfs (/vmlinuz, /initrd.img), which grub.cfg loads from the chosen slot.
cp -r "$GRUB_DIR" "$WORK/boot/grub/i386-pc"
rm -f "$WORK/boot/grub/i386-pc/"*.image "$WORK/boot/grub/i386-pc/grub-bios-setup"
# GRUB's UEFI build loads its modules from the same partition.
cp -r "$GRUB_EFI_DIR" "$WORK/boot/grub/x86_64-efi"
rm -f "$WORK/boot/grub/x86_64-efi/"*.image "$WORK/boot/grub/x86_64-efi/"*.efi
sed -e "s/@PART_ROOT_A@/$PART_ROOT_A/g" -e "s/@PART_ROOT_B@/$PART_ROOT_B/g" \
    "$ROOT/image/grub.cfg" > "$WORK/boot/grub/grub.cfg"
grub-editenv "$WORK/boot/grub/grubenv" create
grub-editenv "$WORK/boot/grub/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0

# --- 5. The disk ---------------------------------------------------------------------------
step=$(date +%s)
BIOS_START=1
BOOT_START=$((BIOS_START + BIOS_MIB))
ROOT_A_START=$((BOOT_START + BOOT_MIB))
ROOT_B_START=$((ROOT_A_START + ROOT_MIB))
VAR_START=$((ROOT_B_START + ROOT_MIB))
ESP_START=$((VAR_START + VAR_MIB))
TOTAL_MIB=$((ESP_START + ESP_MIB + 1)) # + the backup GPT
rm -f "$IMAGE.tmp"
truncate -s "$((TOTAL_MIB * MIB))" "$IMAGE.tmp"
part() { # number start-MiB size-MiB type guid name
    echo "-n $1:$(($2 * 2048)):$((($2 + $3) * 2048 - 1)) -t $1:$4 -u $1:$5 -c $1:$6"
}
# shellcheck disable=SC2046
sgdisk --clear --disk-guid="$DISK_GUID" \
    $(part 1 "$BIOS_START" "$BIOS_MIB" ef02 "$PART_BIOS" bios-boot) \
    $(part 2 "$BOOT_START" "$BOOT_MIB" 8300 "$PART_BOOT" boot) \
    $(part 3 "$ROOT_A_START" "$ROOT_MIB" 8304 "$PART_ROOT_A" root-a) \
    $(part 4 "$ROOT_B_START" "$ROOT_MIB" 8304 "$PART_ROOT_B" root-b) \
    $(part 5 "$VAR_START" "$VAR_MIB" 8310 "$PART_VAR" var) \
    $(part 6 "$ESP_START" "$ESP_MIB" ef00 "$PART_ESP" esp) \
    "$IMAGE.tmp" >/dev/null

mkfs "$IMAGE.tmp" "$BOOT_START" "$BOOT_MIB" boot "$FS_BOOT" "$WORK/boot"
mkfs "$IMAGE.tmp" "$ROOT_A_START" "$ROOT_MIB" root-a "$FS_ROOT_A" "$STAGE"
mkfs "$IMAGE.tmp" "$VAR_START" "$VAR_MIB" var "$FS_VAR" "$WORK/var"
# Slot B stays empty (zeros) until an A/B update writes a root into it.

# GRUB: core.img in the BIOS boot partition, finding the boot partition by filesystem UUID;
# boot.img in the protective MBR's code area, pointing at core.img. This is what
# grub-bios-setup does for a BIOS boot partition, done on the image file (grub-bios-setup
# wants the OS device of its own directory; this way needs no loop device and no mount).
cat > "$WORK/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $FS_BOOT
set prefix=(\$root)/grub
EOF
grub-mkimage -O i386-pc -d "$GRUB_DIR" -o "$WORK/core.img" -c "$WORK/early.cfg" \
    -p /grub biosdisk part_gpt ext2 search search_fs_uuid

# UEFI: the EFI system partition (FAT) holds GRUB's UEFI build at the removable-media path
# (EFI/BOOT/BOOTX64.EFI: firmware boots it with no boot entry in NVRAM). It finds the same boot
# partition the same way, so both firmware types read one grub.cfg and one grubenv.
grub-mkimage -O x86_64-efi -d "$GRUB_EFI_DIR" -o "$WORK/BOOTX64.EFI" -c "$WORK/early.cfg" \
    -p /grub part_gpt ext2 fat search search_fs_uuid
rm -f "$WORK/esp.img"
mkfs.fat -C -F 32 -S 512 -s 1 -i "$FS_ESP" -n ESP "$WORK/esp.img" $((ESP_MIB * 1024)) >/dev/null
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.img" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
dd if="$WORK/esp.img" of="$IMAGE.tmp" bs=1M seek="$ESP_START" conv=notrunc status=none
CORE_SECTOR=$((BIOS_START * 2048))
[ "$(stat -c %s "$WORK/core.img")" -le $((BIOS_MIB * MIB)) ] || die "core.img does not fit"
le64() { # the 8 little-endian bytes of $1, as printf escapes
    for shift in 0 8 16 24 32 40 48 56; do printf '\\%03o' $((($1 >> shift) & 255)); done
}
put() { # offset, printf-escaped bytes
    # shellcheck disable=SC2059
    printf "$2" | dd of="$IMAGE.tmp" bs=1 seek="$1" conv=notrunc status=none
}
dd if="$WORK/core.img" of="$IMAGE.tmp" bs=512 seek="$CORE_SECTOR" conv=notrunc status=none
# diskboot.img (core.img's first sector) loads the rest from the next sector on: its
# blocklist at 0x1f4 (grub-mkimage wrote the length).
put $((CORE_SECTOR * 512 + 0x1f4)) "$(le64 $((CORE_SECTOR + 1)))"
# boot.img: its code only (440 bytes; the partition table stays), the sector of core.img at
# 0x5c, and at 0x66 the check of the BIOS's boot drive number replaced by two NOPs (for
# BIOSes that pass a wrong one), as grub-bios-setup does for hard disks.
dd if="$GRUB_DIR/boot.img" of="$IMAGE.tmp" bs=440 count=1 conv=notrunc status=none
put $((0x5c)) "$(le64 "$CORE_SECTOR")"
put $((0x66)) '\220\220'
mv "$IMAGE.tmp" "$IMAGE"
echo "$INPUTS" > "$IMAGE.inputs"
rm -rf "$WORK"
say "disk: $IMAGE, $TOTAL_MIB MiB, $(du -h "$IMAGE" | cut -f1) allocated ($(elapsed "$step"))"
say "done in $(elapsed "$START")"
