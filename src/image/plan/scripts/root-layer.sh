# shellcheck shell=bash
# Step "filesystems", for an ext4 root the host makes: what the output
# steps changed in the tree (grub's files, the trees cut out for other
# partitions) goes to the layers disk as one more layer. The host merges
# the base and every layer into the root filesystem (src/image/layers).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

echo "partition $KILN_PART: $KILN_LABEL (the tree's layers, for the host's mke2fs)"
# Nothing reads the tree after this.
unstack
layer_out "$KILN_ROOT_LAYER_MARK"
