#!/bin/sh
# mmdebstrap customize hook, for root.suite bootstraps ($1: the root): the
# real update-initramfs back in its place (defer-initramfs.sh), and an
# initramfs for each kernel, as the kernel's postinst would have made it.
set -eu
u=/usr/sbin/update-initramfs
# Only a deferral of defer-initramfs.sh's own is undone.
[ -x "$1/usr/bin/dpkg-divert" ] || exit 0
[ "$(chroot "$1" dpkg-divert --truename "$u")" = "$u.kiln-deferred" ] || exit 0
rm -f "$1$u"
chroot "$1" dpkg-divert --quiet --local --rename --divert "$u.kiln-deferred" --remove "$u"
# No initramfs generator among the packages: nothing to make.
chroot "$1" test -x "$u" || exit 0
for image in "$1"/boot/vmlinuz-*; do
    [ -e "$image" ] || continue
    version=${image##*/vmlinuz-}
    if [ -e "$1/boot/initrd.img-$version" ]; then
        chroot "$1" "$u" -u -k "$version"
    else
        chroot "$1" "$u" -c -k "$version"
    fi
done
