//! The KVM backend: kiln-vmm, run as a child process of kiln (`kiln __vmm
//! ARGS`), so that a VMM crash or a seccomp kill cannot take kiln down and
//! cleanup is the same process-group kill as for QEMU. The child's stdout
//! is the guest's serial console and its stderr says why it ended if the
//! end was not the guest's clean reset.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use kiln_agent::AGENT_PORT_NAME;
use kiln_vmm::{AgentPort, DiskConfig, Exit, FsConfig, VmConfig, VmError};
use serde::{Deserialize, Serialize};

use super::{spawn_child, Backend, ShareDevice, ShareTransport, Vm, VmSpec};
use crate::sandbox::disk::DiskFormat;

/// Set to `1` to run kiln-vmm's threads without their seccomp filters
/// (to debug a filter that kills the VMM).
pub const NO_SECCOMP_ENV: &str = "KILN_VMM_NO_SECCOMP";

/// The hidden subcommand that runs kiln-vmm in the child.
pub const SUBCOMMAND: &str = "__vmm";

/// Exit code of the child when kiln-vmm could not build or run the VM.
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit code of the child when the VM ended other than by the guest's reset.
pub const EXIT_UNEXPECTED_END: u8 = 2;

/// What the parent hands the `__vmm` child: one JSON argument.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmArgs {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Without the virtio-mmio announcements, which kiln-vmm appends.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub disks: Vec<VmmDisk>,
    pub shares: Vec<VmmShare>,
    /// The Unix socket kiln listens on for the agent's console port.
    pub agent_socket: Option<PathBuf>,
    pub seccomp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmDisk {
    pub path: PathBuf,
    pub read_only: bool,
    pub serial: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmShare {
    pub socket: PathBuf,
    pub tag: String,
}

/// Whether the user turned kiln-vmm's seccomp filters off.
pub fn seccomp_disabled_by_env() -> bool {
    std::env::var_os(NO_SECCOMP_ENV).is_some_and(|v| v == "1")
}

impl VmmArgs {
    /// Translates a backend-neutral [`VmSpec`]; fails on what kiln-vmm
    /// cannot run (qcow2 disks, sizes out of its range).
    pub fn from_spec(spec: &VmSpec, seccomp: bool) -> Result<VmmArgs> {
        if let Some(d) = spec.disks.iter().find(|d| d.format == DiskFormat::Qcow2) {
            bail!(VmError::Qcow2(d.path.clone()));
        }
        let mem_mib = u32::try_from(spec.mem_mib)
            .with_context(|| format!("{} MiB of guest memory is too much", spec.mem_mib))?;
        let vcpus = u8::try_from(spec.cpus)
            .with_context(|| format!("{} vCPUs are too many for kiln-vmm", spec.cpus))?;
        Ok(VmmArgs {
            kernel: spec.kernel.clone(),
            initrd: Some(spec.initramfs.clone()),
            cmdline: spec.cmdline.clone(),
            mem_mib,
            vcpus,
            disks: spec
                .disks
                .iter()
                .map(|d| VmmDisk {
                    path: d.path.clone(),
                    read_only: d.readonly,
                    serial: d.serial.clone(),
                })
                .collect(),
            shares: spec
                .shares
                .iter()
                .map(|s| match &s.device {
                    ShareDevice::Virtiofs { socket } => Ok(VmmShare {
                        socket: socket.clone(),
                        tag: s.tag.clone(),
                    }),
                    ShareDevice::NineP { dir, .. } => Err(anyhow!(
                        "kiln-vmm has no virtio-9p device (share {}); it shares through virtiofsd",
                        dir.display()
                    )),
                })
                .collect::<Result<_>>()?,
            agent_socket: Some(spec.agent_socket.clone()),
            seccomp,
        })
    }

    /// The kiln-vmm configuration, with the agent port connected and the
    /// serial console going to `console`.
    pub fn into_config(self, console: Box<dyn std::io::Write + Send>) -> Result<VmConfig> {
        let agent_port = match &self.agent_socket {
            Some(path) => {
                let stream = UnixStream::connect(path)
                    .with_context(|| format!("connecting the agent port to {}", path.display()))?;
                Some(AgentPort {
                    name: AGENT_PORT_NAME.to_string(),
                    stream: stream.into(),
                })
            }
            None => None,
        };
        Ok(VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            disks: self
                .disks
                .into_iter()
                .map(|d| DiskConfig {
                    path: d.path,
                    read_only: d.read_only,
                    serial: d.serial,
                })
                .collect(),
            agent_port,
            fs: self
                .shares
                .into_iter()
                .map(|s| FsConfig {
                    socket_path: s.socket,
                    tag: s.tag,
                })
                .collect(),
            console,
            seccomp: self.seccomp,
        })
    }
}

/// The child's side: `kiln __vmm ARGS`. Runs the VM to its end; 0 when the
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
    let mut args: VmmArgs = serde_json::from_str(json).context("reading the VM description")?;
    if no_seccomp || seccomp_disabled_by_env() {
        args.seccomp = false;
    }
    // Unbuffered, so the parent sees each console byte as it comes.
    let stdout = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    let config = args.into_config(Box::new(File::from(stdout)))?;
    Ok(kiln_vmm::run(config)?)
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
        let args = VmmArgs::from_spec(spec, self.seccomp)?;
        let json = serde_json::to_string(&args).context("describing the VM for kiln-vmm")?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(SUBCOMMAND).arg(json);
        let what = format!("kiln-vmm ({} {SUBCOMMAND})", self.exe.display());
        spawn_child(cmd, &what, spec.echo_console)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::backend::{DiskSpec, ShareDevice, ShareSpec};
    use kiln_agent::poll::poll_until;
    use std::time::{Duration, Instant};

    fn spec() -> VmSpec {
        VmSpec {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs.cpio".into(),
            cmdline: "console=ttyS0 reboot=t".into(),
            mem_mib: 1024,
            cpus: 2,
            disks: vec![
                DiskSpec {
                    path: "/d/a.raw".into(),
                    format: DiskFormat::Raw,
                    readonly: false,
                    serial: "kiln0".into(),
                },
                DiskSpec {
                    path: "/d/tools.squashfs".into(),
                    format: DiskFormat::Raw,
                    readonly: true,
                    serial: "kiln-tools".into(),
                },
            ],
            shares: vec![ShareSpec {
                tag: "kilnfs0".into(),
                device: ShareDevice::Virtiofs {
                    socket: "/run/fs0.sock".into(),
                },
            }],
            agent_socket: "/run/agent.sock".into(),
            echo_console: false,
        }
    }

    #[test]
    fn a_spec_translates_field_for_field() {
        let a = VmmArgs::from_spec(&spec(), true).expect("translate");
        assert_eq!(
            a,
            VmmArgs {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/k/initramfs.cpio".into()),
                cmdline: "console=ttyS0 reboot=t".into(),
                mem_mib: 1024,
                vcpus: 2,
                disks: vec![
                    VmmDisk {
                        path: "/d/a.raw".into(),
                        read_only: false,
                        serial: "kiln0".into(),
                    },
                    VmmDisk {
                        path: "/d/tools.squashfs".into(),
                        read_only: true,
                        serial: "kiln-tools".into(),
                    },
                ],
                shares: vec![VmmShare {
                    socket: "/run/fs0.sock".into(),
                    tag: "kilnfs0".into(),
                }],
                agent_socket: Some("/run/agent.sock".into()),
                seccomp: true,
            }
        );
        // The child gets it back intact through its one JSON argument.
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(serde_json::from_str::<VmmArgs>(&json).expect("parse"), a);

        let no_agent = VmmArgs {
            agent_socket: None,
            ..a
        };
        let c = no_agent
            .into_config(Box::new(std::io::sink()))
            .expect("config");
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[1].read_only);
        assert_eq!(c.disks[1].serial, "kiln-tools");
        assert_eq!(c.fs[0].tag, "kilnfs0");
        assert_eq!(c.fs[0].socket_path, PathBuf::from("/run/fs0.sock"));
        assert_eq!((c.mem_mib, c.vcpus, c.seccomp), (1024, 2, true));
        assert!(c.agent_port.is_none());
    }

    #[test]
    fn the_agent_port_is_connected_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let mut a = VmmArgs::from_spec(&spec(), false).expect("translate");
        a.agent_socket = Some(sock);
        let c = a.into_config(Box::new(std::io::sink())).expect("config");
        let port = c.agent_port.expect("agent port");
        assert_eq!(port.name, AGENT_PORT_NAME);
        assert!(!c.seccomp);
        listener.accept().expect("the child side connected");

        let mut a = VmmArgs::from_spec(&spec(), true).expect("translate");
        a.agent_socket = Some(dir.path().join("nobody-listens.sock"));
        let e = a
            .into_config(Box::new(std::io::sink()))
            .err()
            .expect("connected to nothing");
        assert!(format!("{e:#}").contains("nobody-listens.sock"), "{e:#}");
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
             case \"$2\" in *'\"agent_socket\":\"/run/agent.sock\"'*) ;; *) exit 8;; esac\n\
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

    #[test]
    fn qcow2_disks_and_oversized_machines_are_refused() {
        let mut s = spec();
        s.disks[0].format = DiskFormat::Qcow2;
        let e = VmmArgs::from_spec(&s, true).expect_err("qcow2 accepted");
        let msg = format!("{e:#}");
        assert!(msg.contains("qemu-img convert -O raw /d/a.raw"), "{msg}");

        let mut s = spec();
        s.cpus = 300;
        assert!(VmmArgs::from_spec(&s, true).is_err());
        let mut s = spec();
        s.mem_mib = u64::from(u32::MAX) + 1;
        assert!(VmmArgs::from_spec(&s, true).is_err());
    }
}
