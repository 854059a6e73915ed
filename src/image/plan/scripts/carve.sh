# shellcheck shell=bash
# Step "filesystems", first part: the tree under mount point $1 moves out
# to /build/parts/$2, to become partition $2's filesystem, leaving an
# empty directory with the same mode and a fixed time. The tree is a
# filesystem of its own (the host made it), so the move is a copy: cheap for
# the /home, /var or /srv a recipe gives a partition.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

m=$1 n=$2
mkdir -p /build/parts "$R$m"
mv "$R$m" "/build/parts/$n"
mkdir "$R$m"
chmod --reference="/build/parts/$n" "$R$m"
touch --no-dereference --date="@$SOURCE_DATE_EPOCH" "$R$m" "$(dirname "$R$m")"
