#!/bin/sh
# debos in kiln's guest, as root, without fakemachine: `build.sh [debos
# options] RECIPE` (README.md has the whole `kiln run` line). debos expects
# a host with udev: it has udev settle the image's partition devices, and
# GRUB names the root by the UUID link udev makes for it. kiln's guest runs
# no udev of its own, so this runs one for as long as debos does. Scratch
# space is debos' working directory; the image goes to /src, the share.
set -eu
/lib/systemd/systemd-udevd --daemon
trap 'udevadm control --exit' EXIT
debos --disable-fakemachine --artifactdir /src "$@"
