#!/bin/bash
# Builds target/image/appliance.img: the raw disk image an operator writes to the boot drive.
# Called by `cargo xtask image` (which builds the release binaries first); can be run by hand:
#
#   image/build.sh [--applianced PATH] [--appliance-ctl PATH]
#
# Needs root (mmdebstrap in root mode, files owned by other users in the filesystems) and
# Debian's mmdebstrap, e2fsprogs, gdisk and grub-pc-bin. Layout, boot chain and the A/B plan:
# image/README.md.
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

while [ $# -gt 0 ]; do
    case "$1" in
    --applianced) APPLIANCED=$2; shift 2 ;;
    --appliance-ctl) APPLIANCE_CTL=$2; shift 2 ;;
    *) echo "usage: $0 [--applianced PATH] [--appliance-ctl PATH]" >&2; exit 2 ;;
    esac
done

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
FS_BOOT=fc0c2b1c-6599-404a-a9d1-5177d49af0da
FS_ROOT_A=4a13a0ef-b639-4da4-aaff-b7ccbcfeaf7a
FS_VAR=dcc85cc5-6e0d-4457-bd94-922c69ca6709

# Partition sizes in MiB (the layout is in image/README.md).
BIOS_MIB=1
BOOT_MIB=31
ROOT_MIB=1024
VAR_MIB=512

GRUB_DIR=/usr/lib/grub/i386-pc

say() { printf '\033[1mimage:\033[0m %s\n' "$*"; }
die() { echo "image: $*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap root mode, file owners in the filesystems)"
for tool in mmdebstrap mkfs.ext4 sgdisk grub-mkimage "$GRUB_DIR/grub-bios-setup" \
    grub-editenv tar zstd; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] ||
        die "missing $tool (apt-get install mmdebstrap e2fsprogs gdisk grub-pc-bin grub-common zstd)"
done
[ -x "$APPLIANCED" ] || die "no $APPLIANCED (cargo build --release)"
[ -x "$APPLIANCE_CTL" ] || die "no $APPLIANCE_CTL (cargo build --release)"

mkdir -p "$CACHE"
START=$(date +%s)
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
    sysusers.d/appliance.conf tmpfiles.d/appliance.conf
)
INPUTS=$({
    echo "rootfs $ROOTFS_KEY"
    sha256sum "$APPLIANCED" "$APPLIANCE_CTL" | cut -d' ' -f1
    (cd "$ROOT/systemd" && sha256sum "${SYSTEMD_FILES[@]}")
    (cd "$ROOT/image" && find . -type f ! -name README.md | LC_ALL=C sort | xargs sha256sum)
    sha256sum "$ROOT/README.md" | cut -d' ' -f1
} | sha256sum | cut -d' ' -f1)
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
install -D -m 0644 "$SYS/sysusers.d/appliance.conf" "$STAGE/usr/lib/sysusers.d/appliance.conf"
install -D -m 0644 "$SYS/tmpfiles.d/appliance.conf" "$STAGE/usr/lib/tmpfiles.d/appliance.conf"
install -D -m 0644 "$SYS/60-appliance-nvme.rules" "$STAGE/usr/lib/udev/rules.d/60-appliance-nvme.rules"
install -D -m 0644 "$SYS/appliance.toml.example" "$STAGE/usr/share/doc/appliance/appliance.toml.example"
install -D -m 0644 "$ROOT/README.md" "$STAGE/usr/share/doc/appliance/README.md"
install -D -m 0644 "$ROOT/image/README.md" "$STAGE/usr/share/doc/appliance/image.md"
install -D -m 0755 "$ROOT/image/appliance-firstboot" "$STAGE/usr/lib/appliance/appliance-firstboot"

# The image's own files (hostname, fstab, network, journald, the default configuration...).
cp -a --no-preserve=ownership "$ROOT/image/overlay/." "$STAGE/"
sed -i -e "s/@PART_VAR@/$PART_VAR/g" "$STAGE/etc/fstab"
chmod 0755 "$STAGE/etc/appliance"
echo "APPLIANCE_IMAGE_INPUTS=${INPUTS:0:16}" > "$STAGE/etc/appliance-image"
echo "APPLIANCE_IMAGE_BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >> "$STAGE/etc/appliance-image"

# Users, groups and enabled units (systemd's tools working on the tree offline).
chroot "$STAGE" systemd-sysusers
systemctl --root="$STAGE" enable --quiet applianced.socket applianced.service \
    appliance-firstboot.service \
    appliance-security-report.service systemd-networkd.service
# A new machine ID at first boot (each box gets its own).
: > "$STAGE/etc/machine-id"
rm -f "$STAGE/var/lib/dbus/machine-id"

# /var gets a partition of its own: move its contents there, keep an empty mount point.
mv "$STAGE/var" "$WORK/var"
mkdir -m 0755 "$STAGE/var"
say "root tree: $(du -sh --exclude=./var "$STAGE" | cut -f1) root, $(du -sh "$WORK/var" | cut -f1) /var ($(elapsed "$step"))"

# --- 4. GRUB's partition -----------------------------------------------------------------
# The boot partition holds only GRUB (modules, grub.cfg, grubenv); each root slot carries its
# own kernel and initramfs (/vmlinuz, /initrd.img), which grub.cfg loads from the chosen slot.
cp -r "$GRUB_DIR" "$WORK/boot/grub/i386-pc"
rm -f "$WORK/boot/grub/i386-pc/"*.image "$WORK/boot/grub/i386-pc/grub-bios-setup"
sed -e "s/@PART_ROOT_A@/$PART_ROOT_A/g" -e "s/@PART_ROOT_B@/$PART_ROOT_B/g" \
    "$ROOT/image/grub.cfg" > "$WORK/boot/grub/grub.cfg"
grub-editenv "$WORK/boot/grub/grubenv" create
grub-editenv "$WORK/boot/grub/grubenv" set ORDER="A B" A_OK=1 A_TRY=0 B_OK=0 B_TRY=0

# --- 5. The disk ---------------------------------------------------------------------------
step=$(date +%s)
MIB=$((1024 * 1024))
BIOS_START=1
BOOT_START=$((BIOS_START + BIOS_MIB))
ROOT_A_START=$((BOOT_START + BOOT_MIB))
ROOT_B_START=$((ROOT_A_START + ROOT_MIB))
VAR_START=$((ROOT_B_START + ROOT_MIB))
TOTAL_MIB=$((VAR_START + VAR_MIB + 1)) # + the backup GPT
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
    "$IMAGE.tmp" >/dev/null

# Each filesystem is written straight into its partition (mke2fs -E offset), from a tree.
# Features GRUB 2.06 reads: no orphan_file, no metadata_csum_seed (mke2fs 1.47 may add them).
mkfs() { # start-MiB size-MiB label uuid tree
    mkfs.ext4 -q -F -t ext4 -O ^orphan_file,^metadata_csum_seed -L "$3" -U "$4" \
        -E "offset=$(($1 * MIB)),root_owner=0:0" -d "$5" "$IMAGE.tmp" "$(($2 * 1024))k"
}
mkfs "$BOOT_START" "$BOOT_MIB" boot "$FS_BOOT" "$WORK/boot"
mkfs "$ROOT_A_START" "$ROOT_MIB" root-a "$FS_ROOT_A" "$STAGE"
mkfs "$VAR_START" "$VAR_MIB" var "$FS_VAR" "$WORK/var"
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
