//! `--share HOST:GUEST[:ro]`: host directories served to the guest, by
//! virtiofsd over vhost-user (virtio-fs) or, under TCG, by QEMU's own
//! virtio-9p, and mounted by the agent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use kiln_agent::poll::poll_until;
use kiln_agent::MountRequest;
use kiln_vmm::FsConfig;

use crate::sandbox::backend::{ShareSpec, ShareTransport};
use crate::sandbox::socket_daemon::SocketDaemon;
use crate::util::which::which_also_in;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareArg {
    pub host: PathBuf,
    pub guest: String,
    pub readonly: bool,
}

impl std::str::FromStr for ShareArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected HOST:GUEST[:ro] with an absolute GUEST path";
        let (rest, readonly) = match s.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (s.strip_suffix(":rw").unwrap_or(s), false),
        };
        let (host, guest) = rest.rsplit_once(':').ok_or_else(|| usage.to_string())?;
        if host.is_empty() || !guest.starts_with('/') {
            return Err(usage.into());
        }
        Ok(ShareArg {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            readonly,
        })
    }
}

/// A share being served to the guest: the device the backend attaches, the
/// mount the agent makes, and the virtiofsd behind it if it has one
/// (stopped when the share is dropped).
pub struct Share {
    pub arg: ShareArg,
    pub spec: ShareSpec,
    virtiofsd: Option<SocketDaemon>,
}

/// The virtiofsd serving a share ended while the guest still used it.
#[derive(Debug, thiserror::Error)]
#[error(
    "virtiofsd serving {} stopped ({status}): the share {guest} is gone, and \
     whatever uses it in the guest would wait forever; kiln stopped the VM{}",
    host.display(),
    said(log)
)]
pub struct ShareLost {
    pub host: PathBuf,
    pub guest: String,
    pub status: std::process::ExitStatus,
    /// virtiofsd's last lines on stderr.
    pub log: Vec<String>,
}

fn said(log: &[String]) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("\nvirtiofsd said:\n{}", log.join("\n"))
    }
}

impl Share {
    /// `Err` once the share's virtiofsd has ended. The guest's requests to
    /// a vhost-user backend that is gone are never answered: neither the
    /// guest nor the VMM notices, so kiln has to.
    pub fn check(&mut self) -> Result<(), ShareLost> {
        let Some(v) = &mut self.virtiofsd else {
            return Ok(());
        };
        match v.process.try_wait() {
            Ok(Some(status)) => {
                // Its last words may still be in the pipe.
                poll_until(
                    Instant::now() + Duration::from_millis(200),
                    Duration::from_millis(5),
                    || {
                        v.reader
                            .as_ref()
                            .map_or(true, |r| r.is_finished())
                            .then_some(())
                    },
                );
                Err(ShareLost {
                    host: self.arg.host.clone(),
                    guest: self.arg.guest.clone(),
                    status,
                    log: v.log.tail(10),
                })
            }
            // Still running, or not ours to wait for: nothing to report.
            Ok(None) | Err(_) => Ok(()),
        }
    }

    /// What the agent mounts, where.
    pub fn mount_request(&self) -> MountRequest {
        let (fstype, options) = match self.spec {
            ShareSpec::Virtiofs(_) => ("virtiofs", ""),
            // cache=mmap: no caching beyond what mmap needs, so the guest
            // sees the host's changes; 9P2000.L for Linux modes and owners.
            ShareSpec::NineP { .. } => (
                "9p",
                "trans=virtio,version=9p2000.L,cache=mmap,msize=262144",
            ),
        };
        MountRequest {
            id: 0,
            fstype: fstype.into(),
            source: self.spec.tag().to_string(),
            target: self.arg.guest.clone(),
            options: options.into(),
            readonly: self.arg.readonly,
        }
    }
}

pub fn find_virtiofsd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_VIRTIOFSD").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // Debian's package puts it outside PATH; `cargo install` in ~/.cargo/bin.
    let mut more = vec![PathBuf::from("/usr/libexec")];
    if let Some(home) = std::env::var_os("HOME") {
        more.push(PathBuf::from(home).join(".cargo/bin"));
    }
    which_also_in("virtiofsd", &more).context(
        "virtiofsd not found (needed for --share): install it with \
         'sudo apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd'",
    )
}

/// Serves `arg` to the guest through `transport`: for virtio-fs, starts
/// virtiofsd and waits for its socket; virtio-9p needs nothing started
/// (the backend serves it).
pub fn start(
    arg: &ShareArg,
    index: usize,
    runtime: &Path,
    transport: ShareTransport,
) -> Result<Share> {
    let meta = std::fs::metadata(&arg.host)
        .with_context(|| format!("shared directory {}", arg.host.display()))?;
    if !meta.is_dir() {
        bail!("--share {}: not a directory", arg.host.display());
    }
    let tag = format!("kiln-share{index}");
    let (spec, virtiofsd) = match transport {
        ShareTransport::NineP => {
            // QEMU resolves the path itself, relative to its own directory.
            let dir = std::fs::canonicalize(&arg.host)
                .with_context(|| format!("shared directory {}", arg.host.display()))?;
            let spec = ShareSpec::NineP {
                tag,
                dir,
                readonly: arg.readonly,
            };
            (spec, None)
        }
        ShareTransport::Virtiofs => {
            let socket_path = runtime.join(format!("fs{index}.sock"));
            let virtiofsd = start_virtiofsd(arg, &socket_path)?;
            (
                ShareSpec::Virtiofs(FsConfig { socket_path, tag }),
                Some(virtiofsd),
            )
        }
    };
    Ok(Share {
        arg: arg.clone(),
        spec,
        virtiofsd,
    })
}

/// Starts virtiofsd serving `arg` on `socket` and waits for the socket.
fn start_virtiofsd(arg: &ShareArg, socket: &Path) -> Result<SocketDaemon> {
    let binary = find_virtiofsd()?;
    // Unprivileged, virtiofsd cannot build its namespace sandbox; it then
    // serves only what this user may access anyway.
    let root = rustix::process::geteuid().is_root();
    let mut cmd = Command::new(&binary);
    cmd.arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(&arg.host)
        .args(["--cache", "auto", "--log-level", "error"])
        .args(["--sandbox", if root { "chroot" } else { "none" }]);
    if arg.readonly {
        cmd.arg("--readonly");
    }
    SocketDaemon::start(
        cmd,
        socket,
        &format!("virtiofsd for {}", arg.host.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::process::Guarded;
    use crate::util::stream_tail::StreamTail;
    use std::process::Stdio;

    #[test]
    fn parses_shares() {
        let s: ShareArg = "/a/b:/mnt/x:ro".parse().expect("parse");
        assert_eq!(s.host, PathBuf::from("/a/b"));
        assert_eq!(s.guest, "/mnt/x");
        assert!(s.readonly);
        let s: ShareArg = "dir:/mnt".parse().expect("parse");
        assert!(!s.readonly);
        assert!("dir".parse::<ShareArg>().is_err());
        assert!("dir:relative".parse::<ShareArg>().is_err());
        assert!(":/mnt".parse::<ShareArg>().is_err());
    }

    #[test]
    fn a_virtiofsd_that_dies_is_reported_with_the_share() {
        // A stand-in for virtiofsd: says something, then serves forever.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo 'the last words' >&2; exec sleep 60"])
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Guarded::new(cmd.spawn().expect("spawn sh"));
        let log = StreamTail::new();
        let reader = process.child.stderr.take().map(|e| log.capture(e, false));
        let pid = rustix::process::Pid::from_child(&process.child);
        let mut share = Share {
            arg: "/srv/data:/s".parse().expect("share"),
            spec: ShareSpec::Virtiofs(FsConfig {
                socket_path: "/nowhere/fs0.sock".into(),
                tag: "kiln-share0".into(),
            }),
            virtiofsd: Some(SocketDaemon {
                process,
                log: log.clone(),
                reader,
            }),
        };
        assert!(share.check().is_ok(), "a running virtiofsd is fine");
        let within = || Instant::now() + Duration::from_secs(10);
        let every = Duration::from_millis(10);
        poll_until(within(), every, || log.tail(1).pop());
        rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill");
        let lost = poll_until(within(), every, || share.check().err())
            .expect("virtiofsd's death went unnoticed");
        let msg = lost.to_string();
        assert!(
            msg.starts_with("virtiofsd serving /srv/data stopped (signal: 9"),
            "{msg}"
        );
        assert!(msg.contains("the share /s is gone"), "{msg}");
        assert!(msg.contains("virtiofsd said:\nthe last words"), "{msg}");
        // Asked again, it says the same, and dropping it kills nothing.
        assert!(share.check().is_err());
    }
}
