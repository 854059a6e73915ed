# shellcheck shell=bash
# Step "mount root": a fresh scratch filesystem at /build for everything
# the steps make; the base tree, which the host made as an ext4
# filesystem from the root archive (disk KILN_TREE_SERIAL,
# src/image/layers/base.rs), read-only at /build/base; the layers kiln reused
# from its cache unpacked over it (KILN_LAYERS: "OFFSET:SIZE" on the
# layers disk, oldest first; the disk is free from byte KILN_LAYERS_NEXT);
# and all of it stacked at $R (stack_up).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

S=$(disk "$KILN_SCRATCH_SERIAL")
# The scratch filesystem's seed and UUID are fixed too: the order in which
# directories list their entries (and so the populated images) follows them.
mkfs.ext4 -q -F -O ^has_journal -U 5c4a7c4e-0000-4000-8000-000000000001 \
    -E hash_seed=5c4a7c4e-0000-4000-8000-000000000002 "$S"
mkdir -p /build && mount -o noatime "$S" /build
mkdir -p /build/base "$R" "$L"
# Shared by every build on this root (kiln's cache): never written.
mount -o ro,noatime "$(disk "$KILN_TREE_SERIAL")" /build/base
echo 0 > "$L/count"
echo "$KILN_LAYERS_NEXT" > "$L/next"
for layer in $KILN_LAYERS; do
    layer_in "${layer%:*}" "${layer#*:}"
done
stack_up
# mke2fs made lost+found; it is not part of the tree (ext4 images get
# their own). It goes in the first step's layer, unless a reused one
# already removed it; the root keeps the time the archive gave it.
if [ -d "$R/lost+found" ] && rmdir "$R/lost+found" 2>/dev/null; then
    touch --reference=/build/base "$R"
fi
echo "root: $(df -h --output=used /build/base | tail -n 1 | tr -d ' ') used" \
    "and $(cat "$L/count") layers from the cache"
