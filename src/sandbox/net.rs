//! The guest's network under `--net`: user-mode networking, the same
//! addresses on both backends, so a guest cannot tell them apart. They are
//! QEMU's user-networking defaults; the guest kernel sets the interface up
//! itself from the command line (`ip=`), and lists the DNS server in
//! /proc/net/pnp, which the agent makes /etc/resolv.conf.
//!
//! QEMU serves the network itself (its user networking); kiln-vmm's
//! virtio-net device exchanges frames with passt (Debian's `passt`, the
//! user-mode stack podman and libvirt use), which kiln starts for the VM
//! on a socket pair and ends with it ([`Passt`]).
//!
//! Without `--net` the VM has no network device at all.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::sandbox::socket_daemon::SocketDaemon;
use crate::util::process::inherit_fd;
use crate::util::which::which;

/// The guest's IPv4 address, its gateway (the host, NATed) and the DNS
/// server the user-mode stack answers on.
pub const GUEST_IPV4: &str = "10.0.2.15";
pub const GATEWAY_IPV4: &str = "10.0.2.2";
pub const NETMASK_IPV4: &str = "255.255.255.0";
pub const DNS_IPV4: &str = "10.0.2.3";
/// The IPv6 prefix QEMU's user networking announces (the guest takes its
/// address by SLAAC): unique local, like 10.0.2.0/24 private. passt
/// gives the guest the host's own prefix instead.
pub const IPV6_NET: &str = "fd00:0:0:2::/64";
/// A locally administered MAC (QEMU's default one).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// The kernel argument that configures the interface at boot:
/// `ip=client:server:gateway:netmask:hostname:device:autoconf:dns0`.
pub fn kernel_arg() -> String {
    format!("ip={GUEST_IPV4}::{GATEWAY_IPV4}:{NETMASK_IPV4}:kiln:eth0:off:{DNS_IPV4}")
}

/// The MAC as QEMU and `ip link` write it.
pub fn mac_string() -> String {
    GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How a backend connects the guest's interface.
#[derive(Debug, Clone)]
pub enum NetSpec {
    /// The hypervisor's own user-mode networking (QEMU's).
    Builtin,
    /// passt's frame stream on this end of a socket pair (see [`Passt`]),
    /// which the hypervisor inherits.
    Passt { stream: Arc<OwnedFd> },
}

/// A passt serving one VM's network on one end of a socket pair, the
/// other end being the VM's. It ends when the VM's end closes, and is
/// killed with its process group on drop. A pair rather than a socket in
/// the file system: nothing else can connect, and passt started by root
/// (which then runs as nobody) needs no directory it may write.
pub struct Passt {
    _daemon: SocketDaemon,
}

/// Finds passt: `KILN_PASST`, else PATH.
pub fn find_passt() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PASST").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    which("passt").context(
        "passt not found (kiln-vmm's --net needs it): install it with \
         'sudo apt-get install passt', or use --backend qemu",
    )
}

impl Passt {
    /// Starts passt with the addresses of [`kernel_arg`] on one end of a
    /// new socket pair, and returns the other end, the VM's.
    pub fn start() -> Result<(Passt, Arc<OwnedFd>)> {
        let binary = find_passt()?;
        let (vm_end, passt_end) = UnixStream::pair().context("making passt's socket pair")?;
        let mut cmd = Command::new(&binary);
        let fd = inherit_fd(&mut cmd, Arc::new(OwnedFd::from(passt_end)));
        cmd.args(["--foreground", "--quiet", "--fd"])
            .arg(fd.to_string())
            .args(["--address", GUEST_IPV4, "--netmask", NETMASK_IPV4])
            .args(["--gateway", GATEWAY_IPV4, "--dns-forward", DNS_IPV4])
            // The device offers no MTU feature: the guest keeps 1500 and
            // sizes its receive buffers for it.
            .args(["--mtu", "1500"]);
        // `cmd`, and with it kiln's copy of passt's end, is gone once
        // passt runs: the VM's end then sees passt's exit as the end of
        // the stream.
        let daemon = SocketDaemon::spawn(cmd, &format!("passt ({})", binary.display()))?;
        Ok((Passt { _daemon: daemon }, Arc::new(OwnedFd::from(vm_end))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_gets_address_gateway_mask_device_and_dns() {
        assert_eq!(
            kernel_arg(),
            "ip=10.0.2.15::10.0.2.2:255.255.255.0:kiln:eth0:off:10.0.2.3"
        );
        assert_eq!(mac_string(), "52:54:00:12:34:56");
        // Locally administered, unicast.
        assert_eq!(GUEST_MAC[0] & 0b11, 0b10);
    }
}
