//! `kiln run`: one command as root in a fresh VM.

use std::io::IsTerminal;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_agent::{ExecRequest, MountRequest, TOOLS_DISK_SERIAL, USER_DISK_SERIAL_PREFIX};

use crate::backend::{self, BackendChoice, DiskSpec, ShareSpec, Vm, VmSpec};
use crate::disk::{Disk, DiskArg, DiskFormat};
use crate::session::{ExecOutcome, Session, Watch};
use crate::share::{self, ShareArg};
use crate::{initramfs, interrupt, kernel, tools};

/// Ways a run ends that map to their own exit codes.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("interrupted; everything kiln started was stopped")]
    Interrupted,
    #[error("timed out after {0} s; the VM was stopped")]
    Timeout(u64),
}

/// `HOST:GUEST` for --copy-in / --copy-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyArg {
    pub host: PathBuf,
    pub guest: String,
}

impl std::str::FromStr for CopyArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, guest) = s
            .rsplit_once(':')
            .ok_or("expected HOST:GUEST with an absolute GUEST path")?;
        if host.is_empty() || !guest.starts_with('/') {
            return Err("expected HOST:GUEST with an absolute GUEST path".into());
        }
        Ok(CopyArg {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

pub struct RunOptions {
    pub disks: Vec<DiskArg>,
    pub mem_mib: u64,
    pub cpus: u32,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub timeout: Option<u64>,
    pub boot_timeout: f64,
    pub copy_in: Vec<CopyArg>,
    pub copy_out: Vec<CopyArg>,
    pub shares: Vec<ShareArg>,
    pub console: bool,
    pub backend: BackendChoice,
    pub kernel: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub tools: Option<PathBuf>,
    pub command: Vec<String>,
}

/// Watches the VM while kiln waits on the guest.
struct VmWatch<'a> {
    vm: &'a mut dyn Vm,
    deadline: Option<Instant>,
    timeout: u64,
}

impl VmWatch<'_> {
    fn why_stopped(&mut self, status: Option<std::process::ExitStatus>) -> anyhow::Error {
        let lines = self.vm.console().tail(200);
        if let Some(at) = lines.iter().rposition(|l| l.contains("Kernel panic")) {
            // From just before the panic message to the end, however long
            // the trace after it is.
            let from = at.saturating_sub(3);
            return anyhow::anyhow!(
                "the guest kernel panicked; its last console lines:\n{}",
                lines[from..].join("\n")
            );
        }
        let console = lines[lines.len().saturating_sub(25)..].join("\n");
        let diag = self.vm.diagnostics().join("\n");
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into());
        anyhow::anyhow!(
            "the VM stopped before the guest powered off cleanly ({status}).\n\
             hypervisor said:\n{diag}\nlast console lines:\n{console}"
        )
    }
}

impl Watch for VmWatch<'_> {
    fn check(&mut self) -> Result<()> {
        if interrupt::requested() {
            bail!(RunError::Interrupted);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            bail!(RunError::Timeout(self.timeout));
        }
        Ok(())
    }

    fn connection_lost(&mut self, why: &str) -> anyhow::Error {
        // The channel closes when the VM ends; give it a moment to finish
        // so the report says how it ended.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Err(e) = self.check() {
                return e;
            }
            match self.vm.try_wait() {
                Ok(Some(status)) => return self.why_stopped(Some(status)),
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return e,
            }
        }
        let e = self.why_stopped(None);
        e.context(format!("lost the connection to the guest agent ({why})"))
    }
}

/// Runs the command; returns the exit code kiln should exit with.
pub fn run(opts: RunOptions) -> Result<u8> {
    if opts.command.is_empty() {
        bail!("no command given: kiln run [OPTIONS] -- CMD [ARGS...]");
    }
    // Everything that can be checked on the host is checked before booting.
    let disks = opts
        .disks
        .iter()
        .map(Disk::open)
        .collect::<Result<Vec<_>>>()?;
    for c in &opts.copy_in {
        let meta = std::fs::metadata(&c.host)
            .with_context(|| format!("--copy-in {}", c.host.display()))?;
        if !meta.is_file() {
            bail!(
                "--copy-in {}: only regular files can be copied",
                c.host.display()
            );
        }
    }
    for c in &opts.copy_out {
        let parent = c.host.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(p) = parent {
            if !p.is_dir() {
                bail!(
                    "--copy-out {}: directory {} does not exist",
                    c.host.display(),
                    p.display()
                );
            }
        }
    }
    let kernel = match &opts.kernel {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => bail!("kernel {} does not exist", p.display()),
        None => kernel::locate()?.vmlinux(),
    };
    let tools_image = tools::locate(opts.tools.as_deref())?;
    let initramfs = initramfs::path()?;
    let (backend, note) = backend::select(opts.backend)?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    if opts.console {
        eprintln!("kiln: backend {}", backend.name());
    }

    let runtime = tempfile::Builder::new()
        .prefix("kiln-run-")
        .tempdir()
        .context("creating a runtime directory")?;
    let mut fs_daemons = Vec::new();
    for (i, s) in opts.shares.iter().enumerate() {
        fs_daemons.push(share::start(s, i, runtime.path())?);
    }
    let agent_socket = runtime.path().join("agent.sock");
    let listener = UnixListener::bind(&agent_socket)
        .with_context(|| format!("listening on {}", agent_socket.display()))?;
    listener.set_nonblocking(true)?;

    let mut vm_disks: Vec<DiskSpec> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| DiskSpec {
            path: d.path.clone(),
            format: d.format,
            readonly: d.readonly,
            serial: format!("{USER_DISK_SERIAL_PREFIX}{i}"),
        })
        .collect();
    vm_disks.push(DiskSpec {
        path: tools_image,
        format: DiskFormat::Raw,
        readonly: true,
        serial: TOOLS_DISK_SERIAL.to_string(),
    });
    let mut cmdline = String::from(
        "console=ttyS0 reboot=t panic=-1 tsc=reliable no_timer_check \
         8250.nr_uarts=1 random.trust_cpu=on rdinit=/init",
    );
    if !opts.console {
        cmdline.push_str(" quiet");
    }
    if let Some(extra) = &opts.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let spec = VmSpec {
        kernel,
        initramfs,
        cmdline,
        mem_mib: opts.mem_mib,
        cpus: opts.cpus,
        disks: vm_disks,
        shares: fs_daemons
            .iter()
            .map(|d| ShareSpec {
                socket: d.socket.clone(),
                tag: d.tag.clone(),
            })
            .collect(),
        agent_socket,
        echo_console: opts.console,
    };

    let started = Instant::now();
    let mut vm = backend.launch(&spec)?;
    let mut watch = VmWatch {
        vm: vm.as_mut(),
        deadline: opts.timeout.map(|t| started + Duration::from_secs(t)),
        timeout: opts.timeout.unwrap_or(0),
    };
    let boot_deadline = started + Duration::from_secs_f64(opts.boot_timeout);
    // QEMU connects the channel as it starts, before the guest boots.
    let stream = accept(&listener, &mut watch, started + Duration::from_secs(10))?;
    let mut session = Session::new(stream)?;
    session.handshake(&mut watch, boot_deadline, opts.boot_timeout)?;

    for (s, d) in opts.shares.iter().zip(&fs_daemons) {
        session.mount(
            MountRequest {
                id: 0,
                fstype: "virtiofs".into(),
                source: d.tag.clone(),
                target: s.guest.clone(),
                options: String::new(),
                readonly: s.readonly,
            },
            &mut watch,
        )?;
    }
    for c in &opts.copy_in {
        session.put_file(&c.host, &c.guest, &mut watch)?;
    }

    let outcome = session.exec(
        ExecRequest {
            id: 0,
            argv: opts.command.clone(),
            env: opts.env.clone(),
            cwd: opts.workdir.clone(),
            // A terminal is not forwarded: the command would steal keystrokes.
            stdin: !std::io::stdin().is_terminal(),
        },
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        &mut watch,
    )?;
    let code = match outcome {
        ExecOutcome::Exited(status) => match status.shell_code() {
            Some(code) => code,
            None => bail!("the guest reported an impossible exit status {status:?}"),
        },
        ExecOutcome::NotFound => {
            eprintln!("kiln: {}: command not found in the guest", opts.command[0]);
            127
        }
        ExecOutcome::NotExecutable => {
            eprintln!("kiln: {}: permission denied in the guest", opts.command[0]);
            126
        }
    };

    for c in &opts.copy_out {
        if let Err(e) = session.get_file(&c.guest, &c.host, &mut watch) {
            if code == 0 {
                return Err(e);
            }
            eprintln!("kiln: warning: {e:#}");
        }
    }

    session.poweroff(&mut watch)?;
    // The guest has synced; it now restarts, which ends the VM.
    let limit = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = watch.vm.try_wait()? {
            if !status.success() {
                return Err(watch.why_stopped(Some(status)));
            }
            break;
        }
        watch.check()?;
        if Instant::now() > limit {
            bail!("the VM did not stop within 30 s after the guest synced and powered off");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(code)
}

fn accept(listener: &UnixListener, watch: &mut VmWatch, deadline: Instant) -> Result<UnixStream> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting the agent connection"),
        }
        watch.check()?;
        if let Some(status) = watch.vm.try_wait()? {
            return Err(watch.why_stopped(Some(status)));
        }
        if Instant::now() >= deadline {
            bail!("the hypervisor did not connect the agent channel within 10 s of starting");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
