# shellcheck shell=bash
# Installs the keys in file $3 as user $2's authorized_keys, in home $1.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

home=$1 owner=$2 keys=$3
chroot_up
install -d -m 700 "$R$home/.ssh"
cat "$keys" > "$R$home/.ssh/authorized_keys"
chmod 600 "$R$home/.ssh/authorized_keys"
in_tree chown -R "$owner:" "$home/.ssh"
