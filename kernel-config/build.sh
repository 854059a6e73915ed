#!/usr/bin/env bash
# Build kiln's guest kernel from Debian's linux-source-6.1 package.
#
#   build.sh FRAGMENT OUTDIR
#
# Applies FRAGMENT on top of `make allnoconfig`, checks that every option the
# fragment sets made it into the final .config, and writes vmlinux (PVH entry),
# bzImage, config and version into OUTDIR. The source tarball can be overridden
# with KILN_KERNEL_SOURCE (default /usr/src/linux-source-6.1.tar.xz).
set -euo pipefail

fragment=$(realpath "$1")
outdir=$2
src=${KILN_KERNEL_SOURCE:-/usr/src/linux-source-6.1.tar.xz}
jobs=${KILN_KERNEL_JOBS:-$(nproc)}

if [ ! -f "$src" ]; then
    echo "kernel source $src not found: install it with 'apt-get install linux-source-6.1'" >&2
    exit 1
fi
for tool in make gcc bc bison flex perl; do
    command -v "$tool" >/dev/null || { echo "missing build tool '$tool': apt-get install build-essential bc bison flex libelf-dev libssl-dev" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "==> unpacking $src"
tar -xf "$src" -C "$work"
tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
cd "$tree"

echo "==> configuring (allnoconfig + $(basename "$fragment"))"
KCONFIG_ALLCONFIG="$fragment" make -s allnoconfig

# Every CONFIG_X=... line of the fragment must be in the final config verbatim;
# a dependency Kconfig silently dropped would give a kernel that boots but
# lacks a feature kiln promises.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    if ! grep -qxF "$line" .config; then
        echo "kernel config: '$line' did not survive (unmet dependency?)" >&2
        missing=1
    fi
done < "$fragment"
[ "$missing" = 0 ] || exit 1

echo "==> building with $jobs jobs"
make -s -j"$jobs" vmlinux bzImage KBUILD_BUILD_TIMESTAMP="@0" KBUILD_BUILD_USER=kiln KBUILD_BUILD_HOST=kiln

mkdir -p "$outdir"
cp vmlinux "$outdir/vmlinux.tmp" && mv "$outdir/vmlinux.tmp" "$outdir/vmlinux"
cp arch/x86/boot/bzImage "$outdir/bzImage.tmp" && mv "$outdir/bzImage.tmp" "$outdir/bzImage"
cp .config "$outdir/config"
make -s kernelrelease > "$outdir/release"
echo "==> kernel $(cat "$outdir/release") in $outdir"
