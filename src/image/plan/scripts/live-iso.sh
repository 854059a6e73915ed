# shellcheck shell=bash
# Step "live iso": a hybrid iso made from parts kiln controls rather than
# by grub-mkrescue, which stamps the clock into its EFI image and file
# times: El Torito for BIOS (with an MBR so a USB stick boots too), an EFI
# system image for UEFI (also a GPT partition), all times and GUIDs fixed.
# Written to disk KILN_ISO_SERIAL; its size is printed after KILN_ISO_SIZE_MARK.
# Parameters: KILN_KERNEL, KILN_ISO_LABEL, KILN_ISO_ID (the GPT disk GUID),
# KILN_ISO_MARKER (the file grub finds the iso by), KILN_GRUB_MODULES;
# rendered files iso-grub.cfg, iso-early.cfg and iso-marker in $P.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

kernel
[ -e "$R/usr/share/initramfs-tools/scripts/live" ] || {
    echo "the root has no live-boot: add live-boot to root.packages" >&2
    exit 1
}
I=/build/iso-tree
E=/build/efi-tree
rm -rf "$I" "$E"
mkdir -p "$I/live" "$I/boot/grub/i386-pc" "$I/boot/grub/x86_64-efi" "$E/EFI/BOOT"
cp "$R/boot/$K" "$I/live/vmlinuz"
cp "$R/boot/initrd.img-$V" "$I/live/initrd.img"
# mksquashfs takes its times from SOURCE_DATE_EPOCH. zstd, not xz: several
# times faster to compress under emulation, and the kernel reads it natively.
# squashfs cannot hold POSIX ACLs (system.* xattrs); mksquashfs drops them
# with a line each, which is noise here.
mksquashfs "$R" "$I/live/filesystem.squashfs" -noappend -no-progress -comp zstd \
    -Xcompression-level 6 -e boot/efi >/dev/null 2>/build/mksquashfs.log || {
    cat /build/mksquashfs.log >&2
    exit 1
}
grep -v '^Unrecognised xattr prefix system\.' /build/mksquashfs.log >&2 || true
cp "$P/iso-grub.cfg" "$I/boot/grub/grub.cfg"
# grub finds the iso by a file only it has, whether it booted from CD or USB.
cp "$P/iso-marker" "$I$KILN_ISO_MARKER"
cp "$P/iso-early.cfg" /build/iso-early.cfg
copy_grub_modules i386-pc "$I/boot/grub/i386-pc"
copy_grub_modules x86_64-efi "$I/boot/grub/x86_64-efi"
grub-mkimage -O i386-pc-eltorito -o "$I/boot/grub/i386-pc/eltorito.img" -p /boot/grub \
    -c /build/iso-early.cfg biosdisk "${grub_modules[@]}"
grub-mkimage -O x86_64-efi -o "$E/EFI/BOOT/BOOTX64.EFI" -p /boot/grub \
    -c /build/iso-early.cfg "${grub_modules[@]}" efi_gop all_video
find "$I" "$E" -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
# The EFI system image: FAT with fixed times and volume id, filled by mtools.
kib=$(( ( $(stat -c %s "$E/EFI/BOOT/BOOTX64.EFI") / 1024 + 512 ) / 32 * 32 ))
mkfs.fat -C -n EFIBOOT --invariant "$I/efi.img" "$kib" >/dev/null
mcopy -s -p -m -Q -i "$I/efi.img" "$E/EFI" ::/
touch --date="@$SOURCE_DATE_EPOCH" "$I/efi.img"
D=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S00)
xorriso -as mkisofs -graft-points -r -V "$KILN_ISO_LABEL" \
    --modification-date="$D" --set_all_file_dates "$D" --gpt_disk_guid "$KILN_ISO_ID" \
    -b boot/grub/i386-pc/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table \
    --grub2-boot-info --grub2-mbr /usr/lib/grub/i386-pc/boot_hybrid.img \
    --efi-boot efi.img -efi-boot-part --efi-boot-image --protective-msdos-label \
    -o /build/live.iso "$I" >/dev/null 2>/build/xorriso.log || {
    cat /build/xorriso.log >&2
    exit 1
}
O=$(disk "$KILN_ISO_SERIAL")
size=$(stat -c %s /build/live.iso)
[ "$size" -le "$(blockdev --getsize64 "$O")" ] || {
    echo "the iso ($size bytes) is larger than its output disk" >&2
    exit 1
}
dd if=/build/live.iso of="$O" bs=1M conv=fsync status=none
echo "$KILN_ISO_SIZE_MARK$size"
