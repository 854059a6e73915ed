# shellcheck shell=bash
# Step "command N": the recipe's command KILN_COMMAND, run by /bin/sh in
# the tree; with the build VM's network if KILN_NETWORK is 1, else in a
# network namespace of its own, which has no interface but a loopback that
# is down, as in a build VM without a network.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

chroot_up
echo "+ $KILN_COMMAND"
if [ "$KILN_NETWORK" = 1 ]; then
    resolv_up
    chroot "$R" /bin/sh -c "$KILN_COMMAND"
else
    unshare --net chroot "$R" /bin/sh -c "$KILN_COMMAND"
fi
