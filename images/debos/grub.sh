#!/bin/sh
# Runs in the deployed image (debos' `run` with chroot, the image's
# partitions mounted and their devices bound in): GRUB into the EFI system
# partition's removable path, so firmware boots it without NVRAM entries,
# the kernel on the serial console.
set -eu
sed -i 's|^GRUB_CMDLINE_LINUX=.*|GRUB_CMDLINE_LINUX="console=ttyS0"|' /etc/default/grub
sed -i 's|^GRUB_TIMEOUT=.*|GRUB_TIMEOUT=0|' /etc/default/grub
grub-install --target=x86_64-efi --removable --no-nvram
update-grub
# Without udev's link for the root's UUID, GRUB names the build's loop
# device instead, which the booted machine does not have.
if grep -q 'root=/dev/loop' /boot/grub/grub.cfg; then
    echo "grub.cfg names the build's loop device as the root: is udev running?" >&2
    exit 1
fi
