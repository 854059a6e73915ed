# shellcheck shell=bash
# Step "grub-bios": the BIOS boot code (boot.img and core.img, made by the
# bootloader step) written to the target disk.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

T=$(disk "$KILN_TARGET_SERIAL")
echo "(hd0) $T" > /build/grub-i386/device.map
/usr/lib/grub/i386-pc/grub-bios-setup --directory=/build/grub-i386 \
    --device-map=/build/grub-i386/device.map "$T"
