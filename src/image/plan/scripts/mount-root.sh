# shellcheck shell=bash
# Step "mount root": the root tree, which the host made as an ext4
# filesystem from the root archive (disk KILN_TREE_SERIAL, src/image/ext4.rs),
# mounted at $R, on a fresh scratch filesystem at /build for everything
# else the steps make.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

S=$(disk "$KILN_SCRATCH_SERIAL")
# The scratch filesystem's seed and UUID are fixed too: the order in which
# directories list their entries (and so the populated images) follows them.
mkfs.ext4 -q -F -O ^has_journal -U 5c4a7c4e-0000-4000-8000-000000000001 \
    -E hash_seed=5c4a7c4e-0000-4000-8000-000000000002 "$S"
mkdir -p /build && mount -o noatime "$S" /build
mkdir -p "$R" && mount -o noatime "$(disk "$KILN_TREE_SERIAL")" "$R"
# mke2fs made it; it is not part of the tree (ext4 images get their own).
# The root keeps the time the archive gave it.
stamp=$(stat -c %Y "$R")
rmdir "$R/lost+found" 2>/dev/null || true
touch --date="@$stamp" "$R"
echo "root: $(df -h --output=used "$R" | tail -n 1 | tr -d ' ') used"
