# shellcheck shell=bash
# Step "configure", last part: what each machine makes for itself at its
# first boot is left out of the image (the machine id; the SSH host keys
# when KILN_SSH_HOST_KEYS_AT_FIRST_BOOT is 1).
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

# systemd makes a machine id at first boot when the file is empty.
if [ -e "$R/etc/machine-id" ]; then : > "$R/etc/machine-id"; fi
if [ -f "$R/var/lib/dbus/machine-id" ] && [ ! -L "$R/var/lib/dbus/machine-id" ]; then
    rm -f "$R/var/lib/dbus/machine-id"
fi
if [ "$KILN_SSH_HOST_KEYS_AT_FIRST_BOOT" = 1 ] && [ -d "$R/etc/ssh" ]; then
    # Host keys are made on the machine that boots the image, not baked in.
    rm -f "$R/etc/ssh/ssh_host_"*_key*
    mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
    cat > "$R/etc/systemd/system/kiln-ssh-host-keys.service" <<'UNIT'
[Unit]
Description=Generate SSH host keys on first boot
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
    ln -sf /etc/systemd/system/kiln-ssh-host-keys.service \
        "$R/etc/systemd/system/multi-user.target.wants/kiln-ssh-host-keys.service"
fi
