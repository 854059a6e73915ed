#!/bin/sh
# Runs in the image's root (debos' `run` with chroot) before the kernel is
# installed. initramfs-tools' default, MODULES=most, copies every storage
# driver, which takes minutes in an emulated VM; this image boots only as
# a virtual machine with a virtio disk (kiln boot, QEMU, clouds), so the
# initramfs carries just what mounts that root.
set -eu
mkdir -p /etc/initramfs-tools/conf.d
echo MODULES=list >/etc/initramfs-tools/conf.d/kiln-debos.conf
cat >>/etc/initramfs-tools/modules <<'MODULES'
virtio_pci
virtio_blk
crc32c_generic
ext4
MODULES
