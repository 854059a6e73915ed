//! What a VM is made of, as plain data: the kernel, memory, vCPUs, disks,
//! shared directories, the agent's port and the network. Nothing here is
//! open or running (no descriptors, no console writer: [`crate::Vm::new`]
//! takes those, or opens them from the paths given), and nothing here
//! parses a command line; serde lets kiln hand a [`VmConfig`] to its
//! `kiln __vmm` child as JSON, as it is.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// An uncompressed vmlinux.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line, without the virtio-mmio devices, which
    /// kiln-vmm appends.
    pub cmdline: String,
    /// Guest memory in MiB (at least 16).
    pub mem_mib: u32,
    pub vcpus: u8,
    /// virtio-blk disks in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// Shared directories, each served by a vhost-user-fs backend.
    pub fs: Vec<FsConfig>,
    pub agent_port: Option<AgentPortConfig>,
    /// A virtio-net device; absent (as in configs written before it
    /// existed), the guest has no network.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Run the VMM's threads under seccomp filters (off only to debug).
    pub seccomp: bool,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// An image file or a block device.
    pub path: PathBuf,
    /// What the image holds, as its user decided it (kiln-vmm reads raw
    /// images only, and refuses the others rather than misread them).
    pub format: DiskFormat,
    pub read_only: bool,
    /// The guest sees it as /dev/disk/by-id/virtio-SERIAL (at most 20 bytes).
    pub serial: String,
}

/// The format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// A shared directory served by a vhost-user-fs backend (virtiofsd)
/// listening on `socket_path`; the guest mounts it by `tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsConfig {
    pub socket_path: PathBuf,
    pub tag: String,
}

/// The agent's channel: a named virtio-console port whose host side is a
/// connection to the Unix socket `socket`, made as the VM is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPortConfig {
    /// The name the guest finds in /sys/class/virtio-ports/*/name.
    pub name: String,
    pub socket: PathBuf,
}

/// The guest's network: a virtio-net device whose frames go to passt (or
/// anything speaking QEMU's stream framing) through a Unix stream socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub peer: NetPeer,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
}

/// Where the network's stream socket comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetPeer {
    /// Connect to this socket as the VM is built.
    Socket(PathBuf),
    /// This descriptor, already connected, which the process inherited
    /// for the VM alone (one end of a socket pair whose other end the
    /// parent gave passt); the VM takes it over and closes it. Whoever
    /// writes the config vouches that nothing else in the process owns
    /// it (kiln passes it to its `kiln __vmm` child for this alone).
    Fd(i32),
}

impl std::fmt::Display for NetPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetPeer::Socket(p) => write!(f, "socket {}", p.display()),
            NetPeer::Fd(n) => write!(f, "inherited descriptor {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_goes_through_json_unchanged_with_formats_as_qemu_names_them() {
        assert_eq!(DiskFormat::Raw.to_string(), "raw");
        assert_eq!(DiskFormat::Qcow2.to_string(), "qcow2");
        let config = VmConfig {
            kernel: "/k/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            mem_mib: 64,
            vcpus: 1,
            disks: vec![DiskConfig {
                path: "/d/a.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: true,
                serial: "kiln0".into(),
            }],
            fs: vec![FsConfig {
                socket_path: "/run/fs0.sock".into(),
                tag: "kiln-share0".into(),
            }],
            agent_port: Some(AgentPortConfig {
                name: "kiln.agent".into(),
                socket: "/run/agent.sock".into(),
            }),
            net: Some(NetConfig {
                peer: NetPeer::Fd(3),
                mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            }),
            seccomp: true,
        };
        let json = serde_json::to_string(&config).expect("json");
        assert!(json.contains(r#""format":"qcow2""#), "{json}");
        assert_eq!(
            serde_json::from_str::<VmConfig>(&json).expect("parse"),
            config
        );
        let raw = json.replace(r#""qcow2""#, r#""raw""#);
        let back: VmConfig = serde_json::from_str(&raw).expect("parse");
        assert_eq!(back.disks[0].format, DiskFormat::Raw);
        let vmdk = json.replace(r#""qcow2""#, r#""vmdk""#);
        assert!(serde_json::from_str::<VmConfig>(&vmdk).is_err());
        assert!(
            json.contains(r#""net":{"peer":{"fd":3},"mac":[82,84,0,18,52,86]}"#),
            "{json}"
        );
        // A config written before the network existed still parses.
        let mut old: serde_json::Value = serde_json::from_str(&json).expect("value");
        old.as_object_mut().expect("object").remove("net");
        let old: VmConfig = serde_json::from_value(old).expect("parse");
        assert_eq!(old.net, None);
    }
}
