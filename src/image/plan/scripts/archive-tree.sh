# shellcheck shell=bash
# Step "filesystems", for an ext4 partition: its tree (KILN_TREE: "/" for
# the tree, or the directory carve.sh made) as one tar on the trees disk,
# at byte KILN_TREE_OFFSET and in at most KILN_TREE_ROOM bytes. The host
# makes partition KILN_PART's filesystem from it after the VM (mke2fs -d,
# src/image/ext4.rs), at native speed.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

src=$KILN_TREE
[ "$src" != / ] || src=$R
echo "partition $KILN_PART: $KILN_LABEL (its tree, for the host's mke2fs)"
# In name order: mke2fs lays files out in the order it reads them. atime
# and ctime are the epoch: the tree's own are whenever the build touched
# the files. Numeric owners: the tree's names are not the tools image's.
# Names as bytes (hdrcharset): libarchive in mke2fs would otherwise convert
# them from UTF-8 and stop at the first name that is not.
# Records of 1 MiB through dd, written past the guest's page cache (tar
# writing to a loop device took 2.7 times as long under TCG); dd stops at
# the room, and a tar longer than that then fails on the closed pipe: its
# next 1 MiB record cannot all sit in the pipe's buffer, so the write
# fails rather than completing unread.
if ! tar -C "$src" --sort=name --format=pax --numeric-owner -b 2048 \
    --xattrs --xattrs-include='*' \
    --pax-option="hdrcharset:=BINARY,atime:=$SOURCE_DATE_EPOCH,ctime:=$SOURCE_DATE_EPOCH" \
    -cf - . |
    dd of="$(disk "$KILN_TREES_SERIAL")" bs=1M iflag=fullblock,count_bytes \
        count="$KILN_TREE_ROOM" seek="$KILN_TREE_OFFSET" oflag=seek_bytes,direct \
        status=none; then
    echo "partition $KILN_PART ($KILN_LABEL): its tree could not be written out" \
        "(above); a tree larger than its partition ends this way" >&2
    exit 1
fi
