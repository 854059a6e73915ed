# shellcheck shell=bash
# Step "bootloader files": grub.cfg on the root filesystem, the EFI binary
# on the ESP (KILN_GRUB_EFI=1; the ESP mounted at KILN_ESP_MOUNT in the
# tree, or outside it when that is empty) and the BIOS core image
# (KILN_GRUB_BIOS=1), all finding the root by its fixed UUID. Rendered
# files: grub.cfg and early.cfg in $P. KILN_GRUB_MODULES: what every image
# needs.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

kernel
[ -e "$R/boot/initrd.img-$V" ] || {
    echo "no /boot/initrd.img-$V in the image: add initramfs-tools" >&2
    exit 1
}
mkdir -p "$R/boot/grub"
cp "$P/grub.cfg" "$R/boot/grub/grub.cfg"
cp "$P/early.cfg" /build/early.cfg
if [ "$KILN_GRUB_EFI" = 1 ]; then
    esp=/build/esp
    [ -z "$KILN_ESP_MOUNT" ] || esp="$R$KILN_ESP_MOUNT"
    mkdir -p "$esp/EFI/BOOT" "$R/boot/grub/x86_64-efi"
    copy_grub_modules x86_64-efi "$R/boot/grub/x86_64-efi"
    # The removable-media path: firmware finds it without NVRAM entries.
    grub-mkimage -O x86_64-efi -o "$esp/EFI/BOOT/BOOTX64.EFI" -p /boot/grub \
        -c /build/early.cfg "${grub_modules[@]}" efi_gop all_video
fi
if [ "$KILN_GRUB_BIOS" = 1 ]; then
    mkdir -p /build/grub-i386 "$R/boot/grub/i386-pc"
    copy_grub_modules i386-pc "$R/boot/grub/i386-pc"
    cp /usr/lib/grub/i386-pc/boot.img /build/grub-i386/
    grub-mkimage -O i386-pc -o /build/grub-i386/core.img -p /boot/grub \
        -c /build/early.cfg biosdisk "${grub_modules[@]}"
fi
find "$R/boot" -depth -newermt "@$SOURCE_DATE_EPOCH" \
    -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
