# shellcheck shell=bash
# Step "command N": the recipe's command KILN_COMMAND, run by /bin/sh in
# the tree.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

chroot_up
echo "+ $KILN_COMMAND"
chroot "$R" /bin/sh -c "$KILN_COMMAND"
