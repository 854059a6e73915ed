# shellcheck shell=bash
# Step "unpack root": the root archive (disk KILN_ROOTFS_SERIAL) unpacked
# onto a fresh scratch filesystem. KILN_ROOT_TAR_FLAG: tar's decompression
# flag, or empty for a plain tar.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

S=$(disk "$KILN_SCRATCH_SERIAL")
# The scratch filesystem's seed and UUID are fixed too: the order in which
# directories list their entries (and so the populated images) follows them.
mkfs.ext4 -q -F -O ^has_journal -U 5c4a7c4e-0000-4000-8000-000000000001 \
    -E hash_seed=5c4a7c4e-0000-4000-8000-000000000002 "$S"
mkdir -p /build && mount -o noatime "$S" /build
mkdir -p "$R" && chmod 755 "$R"
flag=()
[ -z "$KILN_ROOT_TAR_FLAG" ] || flag=("$KILN_ROOT_TAR_FLAG")
tar -x "${flag[@]}" --numeric-owner -p --xattrs --xattrs-include='*' \
    -f "$(disk "$KILN_ROOTFS_SERIAL")" -C "$R"
echo "unpacked $(du -sh --apparent-size "$R" | cut -f1)"
