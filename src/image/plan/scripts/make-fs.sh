# shellcheck shell=bash
# Step "filesystems": makes partition KILN_PART's filesystem KILN_FS (vfat,
# btrfs, xfs or swap; ext4 is made on the host, from archive-tree.sh's tar)
# with label KILN_LABEL and UUID KILN_UUID, and fills it from KILN_TREE
# ("/" for the tree, a directory carve.sh made, or empty for none). vfat
# takes KILN_FAT32 (1 or 0) and its volume id as 4 bytes in
# $P/vfat-id-KILN_PART.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

n=$KILN_PART
dev=$(part "$n")
tree=
if [ -n "$KILN_TREE" ]; then
    src=$KILN_TREE
    [ "$src" != / ] || src=$R
    # The tree is read back through a squashfs: its files report ctime and
    # atime equal to mtime, which the populating tools copy; on the tree's
    # own filesystem they would be whenever the build touched them.
    mksquashfs "$src" "/build/frozen-$n.sqfs" -noappend -no-progress -quiet \
        -noI -noD -noF -noX >/dev/null
    mkdir -p "/build/frozen-$n"
    mount -o loop,ro "/build/frozen-$n.sqfs" "/build/frozen-$n"
    tree=/build/frozen-$n
fi
echo "partition $n: $KILN_LABEL"
case "$KILN_FS" in
    swap)
        mkswap --label "$KILN_LABEL" --uuid "$KILN_UUID" "$dev"
        ;;
    vfat)
        fat=()
        offsets=(0x27)
        if [ "$KILN_FAT32" = 1 ]; then
            fat=(-F 32)
            # FAT32 keeps a backup boot sector at sector 6.
            offsets=(0x43 $((6 * 512 + 0x43)))
        fi
        mkfs.fat "${fat[@]}" -n "$KILN_LABEL" --invariant "$dev" >/dev/null
        # --invariant fixes the times mkfs.fat would take from the clock,
        # but also the volume id: that is put in after, in the boot sector.
        for off in "${offsets[@]}"; do
            dd if="$P/vfat-id-$n" of="$dev" bs=1 seek=$((off)) conv=notrunc status=none
        done
        if [ -n "$tree" ] && [ -n "$(ls -A "$tree")" ]; then
            # In byte order, so the directory entries are in a fixed order.
            # shellcheck disable=SC2012 # names are read line by line, as before
            (cd "$tree" && ls -A | sort | while read -r f; do
                mcopy -s -p -m -Q -i "$dev" "$f" ::/
            done)
        fi
        ;;
    btrfs)
        populate=()
        [ -z "$tree" ] || populate=(--rootdir "$tree")
        mkfs.btrfs -q -f -L "$KILN_LABEL" -U "$KILN_UUID" "${populate[@]}" "$dev"
        ;;
    xfs)
        mkfs.xfs -q -f -L "$KILN_LABEL" -m "uuid=$KILN_UUID" "$dev"
        if [ -n "$tree" ]; then
            # xfsprogs here cannot populate offline: copy through a mount.
            mkdir -p /build/mnt
            mount "$dev" /build/mnt
            tar -C "$tree" --numeric-owner --xattrs -cf - . |
                tar -C /build/mnt --numeric-owner -p --xattrs --xattrs-include='*' -xf -
            umount /build/mnt
        fi
        ;;
    none) ;;
    *) echo "make-fs.sh: unknown filesystem '$KILN_FS'" >&2; exit 2 ;;
esac
