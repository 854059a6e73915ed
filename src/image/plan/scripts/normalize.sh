# shellcheck shell=bash
# Step "normalize": what would differ between two builds (caches, logs,
# seeds) goes. No time in the tree is later than SOURCE_DATE_EPOCH
# without a walk through it here: the host made the base tree with its
# times clamped (src/image/layers/base.rs), and every layer's are clamped
# as it is sealed, this step's too (layer_out in common.sh).
# Then says which kernel the tree boots: KILN_KERNEL_MARK and the newest
# /boot/vmlinuz-*, if there is one.
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

rm -f "$R/var/cache/ldconfig/aux-cache" "$R/var/lib/systemd/random-seed" \
      "$R"/var/cache/apt/*.bin "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old \
      2>/dev/null || true
[ ! -d "$R/var/log" ] || find "$R/var/log" -type f -exec truncate -s 0 {} +
# shellcheck disable=SC2012 # kernel file names are plain
K=$(cd "$R/boot" 2>/dev/null && ls vmlinuz-* 2>/dev/null | sort -V | tail -n 1) || true
[ -z "$K" ] || echo "$KILN_KERNEL_MARK$K"
