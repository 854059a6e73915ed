//! A booted build VM with its agent connected: the one place that starts a
//! backend, the virtiofsd daemons and the agent channel, and that stops
//! them all on every exit path (they are dropped with the [`Guest`]).

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_agent::poll::{poll_until, try_poll_until};
use kiln_agent::{ExecRequest, WindowSize, TOOLS_DISK_SERIAL};
use kiln_vmm::{DiskConfig, DiskFormat};

use crate::sandbox::backend::{self, BackendChoice, Vm, VmSpec};
use crate::sandbox::cache::CacheUse;
use crate::sandbox::net::{self, NetSpec, Passt};
use crate::sandbox::session::{ExecOutcome, Session, Watch};
use crate::sandbox::share::{self, Share, ShareArg};
use crate::sandbox::SandboxError;
use crate::sandbox::{initramfs, kernel, tools};
use crate::util::ctrl_c;
use crate::util::owned_dir::{self, OwnedDir};
use crate::util::terminal;

/// The guest terminal's TERM when the user's has none.
const DEFAULT_TERM: &str = "xterm-256color";

/// An interactive root login shell: bash where the tools image has it (a
/// `--tools` image may not), else sh. A fixed script: nothing of the
/// user's goes in it.
pub fn login_shell() -> Vec<String> {
    const SCRIPT: &str = "if command -v bash >/dev/null 2>&1; then exec bash -il; fi; exec sh -il";
    ["sh", "-c", SCRIPT].map(String::from).to_vec()
}

/// What to boot.
pub struct GuestConfig {
    /// Disks in guest order, each with the serial it is known by.
    pub disks: Vec<DiskConfig>,
    pub shares: Vec<ShareArg>,
    /// In range for every backend (see `cli::vm_args`).
    pub mem_mib: u32,
    pub cpus: u8,
    /// Echo the guest console to stderr.
    pub console: bool,
    pub backend: BackendChoice,
    pub kernel: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub tools: Option<PathBuf>,
    /// Whole-run limit in seconds, counted from boot.
    pub timeout: Option<u64>,
    pub boot_timeout: f64,
    /// Outbound networking (`--net`); without it the guest has no network.
    pub net: bool,
}

/// Watches the VM, and the virtiofsd daemons serving its shares, while
/// kiln waits on the guest.
pub struct VmWatch {
    // Field order is drop order: the VM goes first, then the daemons it
    // used.
    vm: Box<dyn Vm>,
    shares: Vec<Share>,
    /// Serves the VM's network under kiln-vmm.
    _passt: Option<Passt>,
    /// Whether the guest still uses its shares: once it has powered off,
    /// virtiofsd ends when the hypervisor hangs up, as it should.
    shares_in_use: bool,
    deadline: Option<Instant>,
    timeout: u64,
}

impl VmWatch {
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
        if status.and_then(|s| s.signal()) == Some(libc::SIGSYS) {
            return anyhow::anyhow!(
                "the hypervisor was killed by its seccomp filter: it made a system call \
                 outside its allow list. This is a bug in kiln; please report it with \
                 these lines ({} runs without the filters, to confirm).\n\
                 hypervisor said:\n{diag}\nlast console lines:\n{console}",
                format_args!("{}=1", crate::sandbox::backend::kvm::NO_SECCOMP_ENV)
            );
        }
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into());
        anyhow::anyhow!(
            "the VM stopped before the guest powered off cleanly ({status}).\n\
             hypervisor said:\n{diag}\nlast console lines:\n{console}"
        )
    }
}

impl Watch for VmWatch {
    fn check(&mut self) -> Result<()> {
        if ctrl_c::requested() {
            bail!(SandboxError::Interrupted);
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            bail!(SandboxError::Timeout(self.timeout));
        }
        if self.shares_in_use {
            for s in &mut self.shares {
                s.check()?;
            }
        }
        Ok(())
    }

    fn connection_lost(&mut self, why: &str) -> anyhow::Error {
        // The channel closes when the VM ends; give it a moment to finish
        // so the report says how it ended.
        let ended = poll_until(
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                if let Err(e) = self.check() {
                    return Some(e);
                }
                match self.vm.try_wait() {
                    Ok(Some(status)) => Some(self.why_stopped(Some(status))),
                    Ok(None) => None,
                    Err(e) => Some(e),
                }
            },
        );
        ended.unwrap_or_else(|| {
            let e = self.why_stopped(None);
            e.context(format!("lost the connection to the guest agent ({why})"))
        })
    }
}

/// A running guest. Dropping it stops the VM and everything started for it;
/// [`Guest::shutdown`] is the clean way out.
pub struct Guest {
    // Field order is drop order: the VM goes first, then the daemons it
    // used (both in the watch), then the runtime directory holding their
    // sockets.
    watch: VmWatch,
    session: Session,
    _runtime: OwnedDir,
    /// The cache entries the VM boots from, held in use.
    _cached: Vec<CacheUse>,
}

impl Guest {
    /// Boots the VM and waits for the agent's handshake; mounts the shares.
    pub fn boot(cfg: GuestConfig) -> Result<Guest> {
        // What the VM boots from the cache is held in use for as long as
        // the Guest lives, so that no `kiln cache gc` removes it.
        let mut cached = Vec::new();
        let kernel = match &cfg.kernel {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => bail!("kernel {} does not exist", p.display()),
            None => {
                let k = kernel::locate()?;
                let vmlinux = k.vmlinux();
                cached.push(k.into_use());
                vmlinux
            }
        };
        let (tools_image, held) = tools::locate(cfg.tools.as_deref(), &tools::Extra::default())?;
        cached.push(held);
        let (initramfs, held) = initramfs::path()?;
        cached.push(held);
        let (backend, note) = backend::select(cfg.backend, &cfg.disks, cfg.net)?;
        if let Some(n) = note {
            eprintln!("{n}");
        }
        if cfg.console {
            eprintln!("kiln: backend {}", backend.name());
        }

        let runtime = OwnedDir::new(owned_dir::RUN).context("creating a runtime directory")?;
        let mut shares = Vec::new();
        if !cfg.shares.is_empty() {
            let (transport, why) = backend.share_transport();
            eprintln!("kiln: sharing through {why}");
            for (i, s) in cfg.shares.iter().enumerate() {
                shares.push(share::start(s, i, runtime.path(), transport)?);
            }
        }
        let (passt, passt_stream) = if cfg.net && backend.net_needs_passt() {
            let (p, stream) = Passt::start()?;
            (Some(p), Some(stream))
        } else {
            (None, None)
        };
        let agent_socket = runtime.path().join("agent.sock");
        let listener = UnixListener::bind(&agent_socket)
            .with_context(|| format!("listening on {}", agent_socket.display()))?;
        listener.set_nonblocking(true)?;

        let mut disks = cfg.disks;
        disks.push(DiskConfig {
            path: tools_image,
            format: DiskFormat::Raw,
            read_only: true,
            serial: TOOLS_DISK_SERIAL.to_string(),
        });
        let mut cmdline = String::from(
            "console=ttyS0 reboot=t panic=-1 tsc=reliable no_timer_check \
             8250.nr_uarts=1 random.trust_cpu=on rdinit=/init",
        );
        if !cfg.console {
            cmdline.push_str(" quiet");
        }
        if cfg.net {
            cmdline.push(' ');
            cmdline.push_str(&net::kernel_arg());
        }
        if let Some(extra) = &cfg.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let spec = VmSpec {
            kernel,
            initramfs,
            cmdline,
            mem_mib: cfg.mem_mib,
            cpus: cfg.cpus,
            disks,
            shares: shares.iter().map(|s| s.spec.clone()).collect(),
            agent_socket,
            echo_console: cfg.console,
            net: match passt_stream {
                Some(stream) => Some(NetSpec::Passt { stream }),
                None if cfg.net => Some(NetSpec::Builtin),
                None => None,
            },
        };

        let started = Instant::now();
        let vm = backend.launch(&spec)?;
        let mut watch = VmWatch {
            vm,
            shares,
            _passt: passt,
            shares_in_use: true,
            deadline: cfg.timeout.map(|t| started + Duration::from_secs(t)),
            timeout: cfg.timeout.unwrap_or(0),
        };
        let boot_deadline = started + Duration::from_secs_f64(cfg.boot_timeout);
        // The hypervisor (QEMU, or the kiln-vmm child) connects the channel
        // as it starts, before the guest boots.
        let stream = accept(&listener, &mut watch, started + Duration::from_secs(10))?;
        let mut session = Session::new(stream)?;
        session.handshake(&mut watch, boot_deadline, cfg.boot_timeout)?;
        let mut guest = Guest {
            watch,
            session,
            _runtime: runtime,
            _cached: cached,
        };
        for i in 0..guest.watch.shares.len() {
            let m = guest.watch.shares[i].mount_request();
            guest.session.mount(m, &mut guest.watch)?;
        }
        Ok(guest)
    }

    pub fn exec(
        &mut self,
        req: ExecRequest,
        stdout: &mut dyn std::io::Write,
        stderr: &mut dyn std::io::Write,
    ) -> Result<ExecOutcome> {
        self.session.exec(req, stdout, stderr, &mut self.watch)
    }

    /// Runs a command on a guest terminal (see [`Session::exec_tty`]).
    pub fn exec_tty(
        &mut self,
        req: ExecRequest,
        stdout: &mut dyn std::io::Write,
        resizes: &mut dyn FnMut() -> Option<kiln_agent::WindowSize>,
    ) -> Result<ExecOutcome> {
        self.session.exec_tty(req, stdout, resizes, &mut self.watch)
    }

    /// Runs `req` on a guest terminal the size of the user's (24 x 80 if
    /// stdin is not a terminal, whose bytes are then typed into it), with
    /// the user's terminal in raw mode until it ends, so every key (Ctrl-C
    /// and Ctrl-D too) goes to the guest. TERM is the user's unless
    /// `req.env` sets it.
    pub fn exec_on_terminal(&mut self, mut req: ExecRequest) -> Result<ExecOutcome> {
        // The guest has terminfo for the common terminals. First, so a
        // TERM in `req.env` wins.
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty() && !t.contains('\0'))
            .unwrap_or_else(|| DEFAULT_TERM.to_string());
        req.env.insert(0, ("TERM".to_string(), term));
        // Watching first, so a resize between the two is not missed.
        let mut resizes = terminal::Resizes::watch()?;
        let stdin = std::io::stdin();
        req.tty = Some(terminal::size(stdin.as_fd()).unwrap_or(WindowSize::DEFAULT));
        req.stdin = true;
        let raw = terminal::RawMode::enter()?;
        let outcome = self.exec_tty(req, &mut std::io::stdout(), &mut || resizes.poll());
        drop(raw);
        outcome
    }

    pub fn put_file(&mut self, host: &Path, guest: &str) -> Result<()> {
        self.session.put_file(host, guest, &mut self.watch)
    }

    pub fn put_tree(&mut self, host: &Path, guest: &str) -> Result<()> {
        self.session.put_tree(host, guest, &mut self.watch)
    }

    /// Copies a guest file or directory out (see [`Session::get_file`]).
    pub fn get_file(&mut self, guest: &str, host: &Path, keep_setuid: bool) -> Result<()> {
        self.session
            .get_file(guest, host, keep_setuid, &mut self.watch)
    }

    /// Syncs and powers the guest off, and waits for the VM to end.
    pub fn shutdown(mut self) -> Result<()> {
        self.session.poweroff(&mut self.watch)?;
        // The guest has synced; it now restarts, which ends the VM.
        self.watch.shares_in_use = false;
        let watch = &mut self.watch;
        let ended = try_poll_until(
            Instant::now() + Duration::from_secs(30),
            Duration::from_millis(5),
            || match watch.vm.try_wait()? {
                Some(status) => Ok(Some(status)),
                None => watch.check().map(|()| None),
            },
        )?;
        match ended {
            Some(status) if !status.success() => Err(self.watch.why_stopped(Some(status))),
            Some(_) => Ok(()),
            None => {
                bail!("the VM did not stop within 30 s after the guest synced and powered off")
            }
        }
    }
}

fn accept(listener: &UnixListener, watch: &mut VmWatch, deadline: Instant) -> Result<UnixStream> {
    let stream = try_poll_until(deadline, Duration::from_millis(2), || {
        match listener.accept() {
            Ok((stream, _)) => return Ok(Some(stream)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accepting the agent connection"),
        }
        watch.check()?;
        match watch.vm.try_wait()? {
            Some(status) => Err(watch.why_stopped(Some(status))),
            None => Ok(None),
        }
    })?;
    stream.context("the hypervisor did not connect the agent channel within 10 s of starting")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::stream_tail::StreamTail;

    /// A VM that has already ended with `status`.
    struct Ended {
        status: std::process::ExitStatus,
        console: StreamTail,
    }

    impl Vm for Ended {
        fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
            Ok(Some(self.status))
        }
        fn console(&self) -> &StreamTail {
            &self.console
        }
        fn diagnostics(&self) -> Vec<String> {
            Vec::new()
        }
    }

    fn report(raw_status: i32) -> String {
        let status = std::process::ExitStatus::from_raw(raw_status);
        let mut watch = VmWatch {
            vm: Box::new(Ended {
                status,
                console: StreamTail::new(),
            }),
            shares: Vec::new(),
            _passt: None,
            shares_in_use: true,
            deadline: None,
            timeout: 0,
        };
        format!("{:#}", watch.connection_lost("eof"))
    }

    #[test]
    fn a_seccomp_kill_is_reported_as_such() {
        // A wait status of "killed by SIGSYS".
        let msg = report(libc::SIGSYS);
        assert!(msg.contains("killed by its seccomp filter"), "{msg}");
        assert!(msg.contains("KILN_VMM_NO_SECCOMP=1"), "{msg}");
        let msg = report(1 << 8);
        assert!(!msg.contains("seccomp"), "{msg}");
        assert!(
            msg.contains("before the guest powered off cleanly"),
            "{msg}"
        );
    }
}
