//! The guest's network under `--net`: user-mode networking, the same
//! addresses on both backends, so a guest cannot tell them apart. They are
//! QEMU's user-networking defaults; the guest kernel sets the interface up
//! itself from the command line (`ip=`), and lists the DNS server in
//! /proc/net/pnp, which the agent makes /etc/resolv.conf.
//!
//! QEMU serves the network itself (its user networking); kiln-vmm's
//! virtio-net device exchanges frames with passt (Debian's `passt`, the
//! user-mode stack podman and libvirt use), which kiln starts for the VM
//! and ends with it ([`Passt`]).
//!
//! Without `--net` the VM has no network device at all.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::sandbox::socket_daemon::SocketDaemon;
use crate::util::which::which;

/// The guest's IPv4 address, its gateway (the host, NATed) and the DNS
/// server the user-mode stack answers on.
pub const GUEST_IPV4: &str = "10.0.2.15";
pub const GATEWAY_IPV4: &str = "10.0.2.2";
pub const NETMASK_IPV4: &str = "255.255.255.0";
pub const DNS_IPV4: &str = "10.0.2.3";
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetSpec {
    /// The hypervisor's own user-mode networking (QEMU's).
    Builtin,
    /// passt's frame stream on this Unix socket (see [`Passt`]).
    Passt { socket: PathBuf },
}

/// A passt serving one VM's network on a Unix socket. It ends when the VM
/// hangs up (`--one-off`), and is killed with its process group on drop.
pub struct Passt {
    pub socket: PathBuf,
    _daemon: SocketDaemon,
}

/// Finds passt: `KILN_PASST`, else PATH.
fn find_passt() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_PASST").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    which("passt").context(
        "passt not found (kiln-vmm's --net needs it): install it with \
         'sudo apt-get install passt', or use --backend qemu",
    )
}

impl Passt {
    /// Starts passt listening on `runtime/net.sock`, with the addresses of
    /// [`kernel_arg`], and waits for its socket.
    pub fn start(runtime: &Path) -> Result<Passt> {
        let binary = find_passt()?;
        let socket = runtime.join("net.sock");
        let mut cmd = Command::new(&binary);
        cmd.args(["--foreground", "--quiet", "--one-off", "--socket"])
            .arg(&socket)
            .args(["--address", GUEST_IPV4, "--netmask", NETMASK_IPV4])
            .args(["--gateway", GATEWAY_IPV4, "--dns-forward", DNS_IPV4])
            // The device offers no MTU feature: the guest keeps 1500 and
            // sizes its receive buffers for it.
            .args(["--mtu", "1500"]);
        let daemon = SocketDaemon::start(cmd, &socket, &format!("passt ({})", binary.display()))?;
        Ok(Passt {
            socket,
            _daemon: daemon,
        })
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
