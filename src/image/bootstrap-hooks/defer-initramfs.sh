#!/bin/sh
# mmdebstrap essential hook, for root.suite bootstraps ($1: the root).
# The kernel's postinst and then initramfs-tools' trigger each made the
# initramfs, about 19 s apiece on the development machine: a stand-in
# takes update-initramfs' place until the packages are in, and
# build-initramfs.sh then makes it once. The real one, when its package
# comes, goes to the diverted name (or is moved there, if it is already in).
set -eu
u=/usr/sbin/update-initramfs
# No dpkg yet (variant custom with nothing essential): nothing to defer.
[ -x "$1/usr/bin/dpkg-divert" ] || exit 0
# live-tools diverts update-initramfs itself, and dpkg refuses a second
# diversion of one file; so does any diversion already there.
case ",${MMDEBSTRAP_INCLUDE:-}," in *,live-tools,*) exit 0 ;; esac
[ "$(chroot "$1" dpkg-divert --truename "$u")" = "$u" ] || exit 0
chroot "$1" dpkg-divert --quiet --local --rename --divert "$u.kiln-deferred" --add "$u"
printf '#!/bin/sh\n# kiln: the initramfs is made once, at the end of the bootstrap.\nexit 0\n' \
    > "$1$u"
chmod 0755 "$1$u"
