# shellcheck shell=bash
# Installs file $1 as $2 in the tree, with mode $3 and owner $4 (user:group,
# resolved in the tree).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

src=$1 dest=$2 mode=$3 owner=$4
chroot_up
install -D -m "$mode" "$src" "$R$dest"
in_tree chown "$owner" "$dest"
