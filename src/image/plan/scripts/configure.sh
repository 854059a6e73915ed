# shellcheck shell=bash
# Step "configure", first part: the host name, /etc/hosts and /etc/fstab
# kiln rendered (each only if the recipe asks for it), and a directory for
# every mount point given as an argument.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

if [ -e "$P/hostname" ]; then
    cat "$P/hostname" > "$R/etc/hostname"
    cat "$P/hosts" > "$R/etc/hosts"
fi
if [ -e "$P/fstab" ]; then
    mkdir -p "$R/etc"
    cat "$P/fstab" > "$R/etc/fstab"
fi
for m in "$@"; do
    mkdir -p "$R$m"
done
