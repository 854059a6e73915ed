# shellcheck shell=bash
# Runs its arguments as a command in the tree (chroot), as root.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

chroot_up
in_tree "$@"
