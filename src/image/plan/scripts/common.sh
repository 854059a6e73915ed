# shellcheck shell=bash
# Sourced by every build step. kiln passes the step's parameters in the
# environment (KILN_*, set in src/image/plan/mod.rs), never in the text.
set -euo pipefail
export LC_ALL=C TZ=UTC MTOOLS_SKIP_CHECK=1
export SOURCE_DATE_EPOCH="$KILN_EPOCH" E2FSPROGS_FAKE_TIME="$KILN_EPOCH"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# The tree being made into the image, and the files kiln rendered for it
# (both used by the steps that source this).
# shellcheck disable=SC2034
{
    R=/build/root
    P="$KILN_PLAN"
}

# The device of the build VM's disk with virtio serial $1.
disk() { readlink -f "/dev/disk/by-id/virtio-$1"; }

# The node of partition $1 of the target disk, once the kernel has added it
# (it does right after the table is re-read).
part() {
    local p i=0
    p="$(disk "$KILN_TARGET_SERIAL")$1"
    while [ ! -b "$p" ]; do
        i=$((i + 1))
        [ "$i" -lt 100 ] || { echo "partition $p did not appear" >&2; exit 1; }
        sleep 0.05
    done
    echo "$p"
}

# Mounts /proc, /sys and /dev into the tree for commands run in it, and
# keeps services from starting while packages are configured there; both
# undone when the step ends.
chroot_up() {
    local d
    for d in proc sys dev; do mkdir -p "$R/$d"; done
    mount -t proc proc "$R/proc"
    mount -t sysfs sys "$R/sys"
    mount --bind /dev "$R/dev"
    KILN_POLICY=
    trap chroot_down EXIT
    if [ -d "$R/usr/sbin" ] && [ ! -e "$R/usr/sbin/policy-rc.d" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"
        chmod 755 "$R/usr/sbin/policy-rc.d"
        KILN_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive HOME=/root
}

chroot_down() {
    [ -z "${KILN_DEBS_UP:-}" ] || debs_down || true
    umount -l "$R/dev" "$R/sys" "$R/proc" 2>/dev/null || true
    [ -z "$KILN_POLICY" ] || rm -f "$R/usr/sbin/policy-rc.d" || true
    [ -z "${KILN_RESOLV:-}" ] || resolv_down || true
}

# Gives apt in the tree kiln's package cache as its own: the packages
# kiln offers (KILN_DEBS: "OFFSET:SIZE" of their archive on the layers
# disk, src/image/apt_cache.rs), unpacked once into /build/debs, bound
# over the tree's /var/cache/apt/archives. What apt downloads lands there
# too, and in no layer. Only with the network, and only in a tree that
# has apt's cache directory.
debs_up() {
    [ -n "${KILN_DEBS:-}" ] && [ -d "$R/var/cache/apt/archives" ] || return 0
    if [ ! -d /build/debs ]; then
        mkdir /build/debs
        dd if="$(disk "$KILN_LAYERS_SERIAL")" bs=1M iflag=skip_bytes,count_bytes \
            skip="${KILN_DEBS%:*}" count="${KILN_DEBS#*:}" status=none |
            tar -C /build/debs -x --ignore-zeros -f -
        ls /build/debs > /build/debs.offered
    fi
    mount --bind /build/debs "$R/var/cache/apt/archives"
    KILN_DEBS_UP=1
}

debs_down() {
    umount "$R/var/cache/apt/archives" || umount -l "$R/var/cache/apt/archives" || true
}

# What apt downloaded so far (the packages kiln did not offer), with the
# tree's package lists and their signed Release files: kiln keeps only a
# package whose SHA-256 a list gives that a Release file it verifies
# itself vouches for. One archive on the layers disk, said after
# KILN_DEBS_MARK.
debs_out() {
    [ -n "${KILN_DEBS_UP:-}" ] || return 0
    local f o=/build/debs-out
    rm -rf "$o"
    mkdir -p "$o/out" "$o/lists"
    for f in /build/debs/*.deb; do
        [ -f "$f" ] || continue
        grep -qxF "${f##*/}" /build/debs.offered || ln "$f" "$o/out/"
    done
    for f in "$R"/var/lib/apt/lists/*_Packages "$R"/var/lib/apt/lists/*_InRelease; do
        [ ! -f "$f" ] || cp "$f" "$o/lists/"
    done
    archive_out "$o" "$KILN_DEBS_MARK"
}

# Runs its arguments in the tree (chroot) as root: with the build VM's
# network if KILN_NETWORK is 1 (a recipe command that asked for it), else
# in a network namespace of its own, with no interface but a loopback that
# is down, as in a build VM without a network.
in_tree() {
    if [ "${KILN_NETWORK:-0}" = 1 ]; then
        chroot "$R" "$@"
    else
        unshare --net chroot "$R" "$@"
    fi
}

# Gives commands in the tree the build VM's DNS server: the tree's own
# /etc/resolv.conf (often a link to systemd-resolved's file, which nothing
# serves here) is set aside, and put back as it was when the step ends,
# unless the command made one of its own, which is then kept.
resolv_up() {
    mkdir -p "$R/etc"
    if [ -e "$R/etc/resolv.conf" ] || [ -L "$R/etc/resolv.conf" ]; then
        mv "$R/etc/resolv.conf" "$R/etc/.resolv.conf.kiln"
        KILN_RESOLV=saved
    fi
    cp /etc/resolv.conf "$R/etc/resolv.conf"
    KILN_RESOLV="${KILN_RESOLV:-ours}"
}

resolv_down() {
    if [ -f "$R/etc/resolv.conf" ] && [ ! -L "$R/etc/resolv.conf" ] &&
        cmp -s /etc/resolv.conf "$R/etc/resolv.conf"; then
        rm -f "$R/etc/resolv.conf"
        [ "$KILN_RESOLV" != saved ] || mv "$R/etc/.resolv.conf.kiln" "$R/etc/resolv.conf"
    else
        echo "kiln: keeping the /etc/resolv.conf the command made"
        rm -f "$R/etc/.resolv.conf.kiln"
    fi
}

# The kernel the tree boots (found by the normalize step), and its version.
kernel() {
    [ -n "${KILN_KERNEL:-}" ] || {
        echo "no kernel in /boot of the image: add a kernel package (linux-image-amd64) to root.packages" >&2
        exit 1
    }
    K="$KILN_KERNEL"
    # shellcheck disable=SC2034 # used by the steps
    V="${K#vmlinuz-}"
}

# Copies grub's modules for platform $1 (i386-pc, x86_64-efi) to $2.
copy_grub_modules() {
    cp "/usr/lib/grub/$1/"*.mod "/usr/lib/grub/$1/"*.lst "$2/"
}

# Sets the grub_modules array from KILN_GRUB_MODULES (space-separated).
# shellcheck disable=SC2034 # used by the steps
read -ra grub_modules <<< "${KILN_GRUB_MODULES:-}"

# The tree's layers (src/image/layers): the base tree the host made
# (/build/base, read-only), under one directory per step in $L (1, 2, …:
# each a step's overlayfs upper directory as it was archived), under the
# upper directory the running step writes (/build/upper). overlayfs
# stacks them at $R. The layers disk (KILN_LAYERS_SERIAL) holds each
# layer's archive: those kiln reused, from its cache, then those made here.
# shellcheck disable=SC2034
L=/build/layers

# Unmounts the tree at $R, and all below it. A step may leave processes
# in the tree (a gpg-agent, a daemon a package started) or mounts (a
# tmpfs on /tmp): the processes are ended first, as the step is over.
unstack() {
    local pids
    # One find, not a readlink for each process: a fork is dear under TCG.
    mapfile -t pids < <(find /proc -mindepth 2 -maxdepth 2 -name root -lname "$R" \
        -printf '%h\n' 2>/dev/null | sed 's|^/proc/||')
    [ "${#pids[@]}" = 0 ] || kill -9 "${pids[@]}" 2>/dev/null || true
    umount -R "$R" 2>/dev/null || { sleep 0.2; umount -R "$R"; }
}

# Mounts the tree at $R: every layer in $L, newest on top, over the base,
# under a new, empty upper directory. Only the upper is ever written; no
# redirects, index or metacopy, so an upper directory holds whole files
# and whiteouts that any tar can carry (src/image/layers/merge.rs).
stack_up() {
    local lowers=/build/base top=/build/base i n
    n=$(cat "$L/count")
    for ((i = 1; i <= n; i++)); do
        lowers="$L/$i:$lowers"
        top="$L/$i"
    done
    rm -rf /build/upper /build/work
    mkdir /build/upper /build/work
    # The tree's root takes its owner, mode and time from the upper
    # directory: those the layers below gave it.
    chown --reference="$top" /build/upper
    chmod --reference="$top" /build/upper
    touch --reference="$top" /build/upper
    mount -t overlay overlay -o "noatime,lowerdir=$lowers,upperdir=/build/upper,workdir=/build/work,redirect_dir=off,index=off,metacopy=off,xino=off" "$R"
}

# Archives the upper directory to the layers disk (archive_out), with
# the mark $1 for kiln. Times later than SOURCE_DATE_EPOCH become it
# first, in the upper directory itself (so no file is copied up for it):
# a layer is the same whether kiln made it now or earlier, and no time in
# the tree is later than the epoch (normalize.sh relies on it).
layer_out() {
    find /build/upper -depth -newermt "@$SOURCE_DATE_EPOCH" \
        -exec touch --no-dereference --date="@$SOURCE_DATE_EPOCH" {} +
    archive_out /build/upper "$1"
}

# Archives directory $1 to the layers disk at the next free place, sets
# layer_off and layer_size, and prints them after the mark $2.
archive_out() {
    local dir=$1 mark=$2 stats
    layer_off=$(cat "$L/next")
    stats=$(mktemp)
    # In name order, with overlayfs' xattrs (trusted.overlay.opaque) and
    # whiteouts (0/0 character devices) as they are; 1 MiB records for
    # dd's direct writes, as in archive-tree.sh.
    if ! tar -C "$dir" --sort=name --format=pax --numeric-owner -b 2048 \
        --xattrs --xattrs-include='*' \
        --pax-option="hdrcharset:=BINARY,atime:=$SOURCE_DATE_EPOCH,ctime:=$SOURCE_DATE_EPOCH" \
        -cf - . |
        dd of="$(disk "$KILN_LAYERS_SERIAL")" bs=1M iflag=fullblock \
            seek="$layer_off" oflag=seek_bytes,direct 2> "$stats"; then
        cat "$stats" >&2
        echo "$dir could not be written out to the layers disk" >&2
        exit 1
    fi
    layer_size=$(sed -n 's/^\([0-9]*\) bytes .*/\1/p' "$stats")
    rm -f "$stats"
    [ -n "$layer_size" ] || { echo "dd did not say how much it wrote" >&2; exit 1; }
    echo $((layer_off + layer_size)) > "$L/next"
    echo "$mark$layer_off $layer_size"
}

# Unpacks the layer archived at byte $1, $2 bytes long, on the layers
# disk as the next layer in $L. A layer kiln just made is unpacked too,
# rather than its upper directory kept: later steps then see the same
# directories, listed in the same order, as when the layer comes from
# the cache.
layer_in() {
    local n
    n=$(($(cat "$L/count") + 1))
    mkdir "$L/$n"
    # Read to the end of its span (the zeros after tar's end marker too),
    # so dd is not cut off by a closed pipe; tar knows hdrcharset only as
    # a writer.
    dd if="$(disk "$KILN_LAYERS_SERIAL")" bs=1M iflag=skip_bytes,count_bytes \
        skip="$1" count="$2" status=none |
        tar -C "$L/$n" -x --ignore-zeros --warning=no-unknown-keyword \
            --xattrs --xattrs-include='*' --numeric-owner \
            --same-permissions --same-owner -f -
    echo "$n" > "$L/count"
}
