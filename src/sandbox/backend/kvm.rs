//! The KVM backend: kiln-vmm, run as a child process of kiln (`kiln __vmm
//! CONFIG`, CONFIG being kiln-vmm's own [`VmConfig`] as JSON), so that a
//! VMM crash or a seccomp kill cannot take kiln down and cleanup is the
//! same process-group kill as for QEMU. The child's stdout is the guest's
//! serial console and its stderr says why it ended if the end was not the
//! guest's clean reset.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use kiln_agent::AGENT_PORT_NAME;
use kiln_vmm::{AgentPortConfig, Exit, NetConfig, NetPeer, VmConfig};

use super::{spawn_child, Backend, ShareSpec, ShareTransport, Vm, VmSpec};
use crate::sandbox::net::{self, NetSpec};
use crate::util::process::inherit_fd;

/// Set to `1` to run kiln-vmm's threads without their seccomp filters
/// (to debug a filter that kills the VMM).
pub const NO_SECCOMP_ENV: &str = "KILN_VMM_NO_SECCOMP";

/// The hidden subcommand that runs kiln-vmm in the child.
pub const SUBCOMMAND: &str = "__vmm";

/// Exit code of the child when kiln-vmm could not build or run the VM.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit code of the child when the VM ended other than by the guest's reset.
pub const EXIT_UNEXPECTED_END: u8 = 2;

/// Whether the user turned kiln-vmm's seccomp filters off.
pub fn seccomp_disabled_by_env() -> bool {
    std::env::var_os(NO_SECCOMP_ENV).is_some_and(|v| v == "1")
}

/// kiln-vmm's configuration for `spec`, which the `__vmm` child gets as
/// its one JSON argument. The disks and virtio-fs shares are kiln-vmm's
/// own types already; what kiln-vmm cannot run (a virtio-9p share) fails
/// here. A qcow2 disk does not reach here: backend selection refuses it
/// (and kiln-vmm, opening the disks, refuses it again).
fn vm_config(spec: &VmSpec, seccomp: bool) -> Result<VmConfig> {
    let fs = spec
        .shares
        .iter()
        .map(|s| match s {
            ShareSpec::Virtiofs(fs) => Ok(fs.clone()),
            ShareSpec::NineP { dir, .. } => bail!(
                "kiln-vmm has no virtio-9p device (share {}); it shares through virtiofsd",
                dir.display()
            ),
        })
        .collect::<Result<_>>()?;
    Ok(VmConfig {
        kernel: spec.kernel.clone(),
        initrd: Some(spec.initramfs.clone()),
        cmdline: spec.cmdline.clone(),
        mem_mib: spec.mem_mib,
        vcpus: spec.cpus,
        disks: spec.disks.clone(),
        fs,
        agent_port: Some(AgentPortConfig {
            name: AGENT_PORT_NAME.to_string(),
            socket: spec.agent_socket.clone(),
        }),
        net: match &spec.net {
            None => None,
            // The child inherits the descriptor at its own number (see
            // `launch`).
            Some(NetSpec::Passt { stream }) => Some(NetConfig {
                peer: NetPeer::Fd(stream.as_raw_fd()),
                mac: net::GUEST_MAC,
            }),
            // kiln-vmm has no network stack of its own.
            Some(NetSpec::Builtin) => bail!("kiln-vmm's network goes through passt"),
        },
        seccomp,
    })
}

/// The child's side: `kiln __vmm CONFIG`. Runs the VM to its end; 0 when the
/// guest reset (its clean power-off, with reboot=t), otherwise a message on
/// stderr and a non-zero status.
pub fn child_main(json: &str, no_seccomp: bool) -> u8 {
    match child_run(json, no_seccomp) {
        Ok(Exit::Shutdown) => 0,
        Ok(other) => {
            let why = match other {
                Exit::Status(n) => format!("the guest wrote status {n} to the test exit port"),
                Exit::Halted => "the guest halted with nothing left to wake it".into(),
                Exit::Stopped => "the VM was stopped".into(),
                Exit::Shutdown => unreachable!(),
            };
            eprintln!("kiln-vmm: {why}");
            EXIT_UNEXPECTED_END
        }
        Err(e) => {
            eprintln!("kiln-vmm: {e:#}");
            EXIT_VMM_ERROR
        }
    }
}

fn child_run(json: &str, no_seccomp: bool) -> Result<Exit> {
    let mut config: VmConfig = serde_json::from_str(json).context("reading the VM description")?;
    if no_seccomp || seccomp_disabled_by_env() {
        config.seccomp = false;
    }
    // Unbuffered, so the parent sees each console byte as it comes.
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    Ok(kiln_vmm::run(config, Box::new(File::from(stdout)))?)
}

/// The backend: starts `kiln __vmm` from kiln's own executable.
pub struct Kvm {
    exe: PathBuf,
    seccomp: bool,
}

impl Kvm {
    pub fn new() -> Result<Kvm> {
        let exe = std::env::current_exe().context("finding kiln's own executable")?;
        Ok(Kvm {
            exe,
            seccomp: !seccomp_disabled_by_env(),
        })
    }
}

impl Backend for Kvm {
    fn net_needs_passt(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        if self.seccomp {
            "kvm (kiln-vmm)".into()
        } else {
            format!("kvm (kiln-vmm, seccomp off by {NO_SECCOMP_ENV}=1)")
        }
    }

    fn share_transport(&self) -> (ShareTransport, &'static str) {
        (
            ShareTransport::Virtiofs,
            "virtio-fs through virtiofsd (kiln-vmm runs guest code on KVM, which sees \
             virtiofsd's writes to guest memory)",
        )
    }

    fn launch(&self, spec: &VmSpec) -> Result<Box<dyn Vm>> {
        let config = vm_config(spec, self.seccomp)?;
        let json = serde_json::to_string(&config).context("describing the VM for kiln-vmm")?;
        let mut cmd = Command::new(&self.exe);
        if let Some(NetSpec::Passt { stream }) = &spec.net {
            inherit_fd(&mut cmd, stream.clone());
        }
        cmd.arg(SUBCOMMAND).arg(json);
        let what = format!("kiln-vmm ({} {SUBCOMMAND})", self.exe.display());
        spawn_child(cmd, &what, spec.echo_console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_agent::poll::poll_until;
    use kiln_vmm::{DiskConfig, DiskFormat, FsConfig};
    use std::time::{Duration, Instant};

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: "console=ttyS0 reboot=t".into(),
            mem_mib: 1024,
            cpus: 2,
            disks: vec![
                DiskConfig {
                    path: "/d/a.raw".into(),
                    format: DiskFormat::Raw,
                    read_only: false,
                    serial: "kiln0".into(),
                },
                DiskConfig {
                    path: "/d/tools.squashfs".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                    serial: "kiln-tools".into(),
                },
            ],
            shares: vec![ShareSpec::Virtiofs(FsConfig {
                socket_path: "/run/fs0.sock".into(),
                tag: "kilnfs0".into(),
            })],
            agent_socket: "/run/agent.sock".into(),
            echo_console: false,
            net: None,
        }
    }

    #[test]
    fn the_network_goes_through_passts_socket_pair_with_kilns_mac() {
        let mut s = spec();
        assert_eq!(vm_config(&s, true).expect("config").net, None);
        let (vm_end, _passt_end) = std::os::unix::net::UnixStream::pair().expect("pair");
        let stream = std::sync::Arc::new(std::os::fd::OwnedFd::from(vm_end));
        let fd = stream.as_raw_fd();
        s.net = Some(NetSpec::Passt { stream });
        assert_eq!(
            vm_config(&s, true).expect("config").net,
            Some(NetConfig {
                peer: NetPeer::Fd(fd),
                mac: net::GUEST_MAC,
            })
        );
        s.net = Some(NetSpec::Builtin);
        assert!(vm_config(&s, true).is_err());
    }

    #[test]
    fn a_spec_becomes_kiln_vmm_config_with_disks_and_shares_as_they_are() {
        let s = spec();
        let c = vm_config(&s, true).expect("config");
        assert_eq!(
            c,
            VmConfig {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/k/initramfs.cpio".into()),
                cmdline: "console=ttyS0 reboot=t".into(),
                mem_mib: 1024,
                vcpus: 2,
                disks: s.disks.clone(),
                fs: vec![FsConfig {
                    socket_path: "/run/fs0.sock".into(),
                    tag: "kilnfs0".into(),
                }],
                agent_port: Some(AgentPortConfig {
                    name: AGENT_PORT_NAME.into(),
                    socket: "/run/agent.sock".into(),
                }),
                net: None,
                seccomp: true,
            }
        );
        // The child gets it back intact through its one JSON argument.
        let json = serde_json::to_string(&c).expect("json");
        assert_eq!(serde_json::from_str::<VmConfig>(&json).expect("parse"), c);
        assert!(!vm_config(&s, false).expect("config").seccomp);
    }

    #[test]
    fn a_9p_share_is_refused() {
        let mut s = spec();
        s.shares.push(ShareSpec::NineP {
            tag: "kilnfs1".into(),
            dir: "/srv/data".into(),
            readonly: false,
        });
        let e = vm_config(&s, true).expect_err("9p accepted");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("no virtio-9p device (share /srv/data)"),
            "{msg}"
        );
    }

    /// The parent's side with a stand-in for `kiln __vmm`: the arguments
    /// it is given, its stdout kept as the console, its stderr as the
    /// diagnostics, its exit status as the VM's.
    #[test]
    fn the_parent_captures_the_child_console_and_status() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = dir.path().join("fake-kiln");
        std::fs::write(
            &exe,
            "#!/bin/sh\n\
             [ \"$1\" = __vmm ] || exit 9\n\
             case \"$2\" in *'\"socket\":\"/run/agent.sock\"'*) ;; *) exit 8;; esac\n\
             echo 'Linux version 6.1'; printf 'no newline'\n\
             echo 'kiln-vmm: the guest halted' >&2\n\
             exit 2\n",
        )
        .expect("script");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let backend = Kvm { exe, seccomp: true };
        let mut vm = backend.launch(&spec()).expect("launch");
        let deadline = Instant::now() + Duration::from_secs(10);
        let every = Duration::from_millis(5);
        let status = poll_until(deadline, every, || vm.try_wait().expect("wait"))
            .expect("the child did not end");
        assert_eq!(status.code(), Some(2));
        // The readers finish once the pipes close.
        poll_until(deadline, every, || {
            (vm.console().tail(5).len() >= 2 && !vm.diagnostics().is_empty()).then_some(())
        });
        assert_eq!(
            vm.console().tail(5),
            vec!["Linux version 6.1", "no newline"]
        );
        assert_eq!(vm.diagnostics(), vec!["kiln-vmm: the guest halted"]);
    }
}
