# shellcheck shell=bash
# Step "command N": the recipe's command KILN_COMMAND, run by /bin/sh in
# the tree, with the network if KILN_NETWORK is 1 (see in_tree).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

chroot_up
echo "+ $KILN_COMMAND"
if [ "${KILN_NETWORK:-0}" = 1 ]; then
    resolv_up
    debs_up
fi
status=0
in_tree /bin/sh -c "$KILN_COMMAND" || status=$?
[ "$status" != 0 ] || debs_out
exit "$status"
