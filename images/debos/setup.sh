#!/bin/sh
# Runs in the image's root (debos' `run` with chroot): a name, and a root
# login without a password, for a throwaway test machine.
set -eu
echo kiln-debos >/etc/hostname
passwd --delete root
