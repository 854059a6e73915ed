//! `--share HOST:GUEST[:ro]`: host directories served to the guest by
//! virtiofsd over vhost-user, mounted as virtio-fs by the agent.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::backend::qemu::which;
use crate::console::Console;
use crate::process::{detach_and_tie, Guarded};

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

/// A running virtiofsd, stopped when dropped.
pub struct Virtiofsd {
    pub socket: PathBuf,
    pub tag: String,
    /// Stopped when the share is dropped.
    _process: Guarded,
}

pub fn find_virtiofsd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_VIRTIOFSD").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = which("virtiofsd") {
        return Ok(p);
    }
    let mut candidates = vec![PathBuf::from("/usr/libexec/virtiofsd")];
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/virtiofsd"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "virtiofsd not found (needed for --share): install it with \
         'sudo apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd'",
    )
}

/// Starts virtiofsd for `arg` and waits for its socket.
pub fn start(arg: &ShareArg, index: usize, runtime: &Path) -> Result<Virtiofsd> {
    let meta = std::fs::metadata(&arg.host)
        .with_context(|| format!("shared directory {}", arg.host.display()))?;
    if !meta.is_dir() {
        bail!("--share {}: not a directory", arg.host.display());
    }
    let binary = find_virtiofsd()?;
    let socket = runtime.join(format!("fs{index}.sock"));
    let tag = format!("kiln-share{index}");
    // Unprivileged, virtiofsd cannot build its namespace sandbox; it then
    // serves only what this user may access anyway.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = Command::new(&binary);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&arg.host)
        .args(["--cache", "auto", "--log-level", "error"])
        .args(["--sandbox", if root { "chroot" } else { "none" }]);
    if arg.readonly {
        cmd.arg("--readonly");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    detach_and_tie(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut process = Guarded::new(child);
    // Always drained, so virtiofsd never blocks on a full stderr pipe.
    let log = Console::new();
    let reader = process.child.stderr.take().map(|e| log.capture(e, false));
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = process.try_wait() {
            if let Some(r) = reader {
                let _ = r.join();
            }
            bail!(
                "virtiofsd for {} exited ({status}): {}",
                arg.host.display(),
                log.tail(10).join("\n")
            );
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!(
                "virtiofsd for {} did not create its socket in 10 s",
                arg.host.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Virtiofsd {
        socket,
        tag,
        _process: process,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
