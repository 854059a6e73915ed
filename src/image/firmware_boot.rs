//! `kiln boot IMAGE`: boots a built image as a whole PC (QEMU q35 with OVMF
//! for UEFI or SeaBIOS for BIOS; KVM where it runs unmodified guests, TCG
//! elsewhere) and succeeds when its serial console shows a pattern. The
//! image is never written: QEMU runs it as a snapshot.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kiln_vmm::host::KvmSupport;

use super::output::{detect_format, qemu_img};
use crate::sandbox::backend::qemu_command::{self, Accel, Display, QemuCommand, Serial};
use crate::sandbox::backend::{probe_kvm, spawn_hypervisor};
use crate::sandbox::SandboxError;
use crate::util::owned_dir::{self, OwnedDir};
use crate::util::process::{run_tool, tie};
use crate::util::{ctrl_c, tail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Firmware {
    Uefi,
    Bios,
}

/// What `kiln boot` boots, and how long it waits for what.
pub struct BootOptions {
    /// raw, qcow2, vmdk, vhdx, vpc, ova or iso (optionally .xz/.zst).
    pub image: PathBuf,
    pub firmware: Firmware,
    /// The pattern the serial console has to match.
    pub expect: String,
    /// Seconds to wait for it.
    pub timeout: f64,
    pub mem_mib: u32,
    /// The disk enlarged to this many bytes, in a throwaway overlay.
    pub disk_size: Option<u64>,
    /// A directory with cloud-init NoCloud seed files.
    pub cloud_init: Option<PathBuf>,
    /// Show the console on stderr as it comes.
    pub console: bool,
    pub json: bool,
}

/// Where Debian's ovmf package puts the firmware.
const OVMF_CODE: &[&str] = &[
    "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "/usr/share/OVMF/OVMF_CODE.fd",
];
const OVMF_VARS: &[&str] = &[
    "/usr/share/OVMF/OVMF_VARS_4M.fd",
    "/usr/share/OVMF/OVMF_VARS.fd",
];

fn first_existing(paths: &[&str]) -> Option<PathBuf> {
    paths.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Drops terminal escape sequences and carriage returns, so patterns match
/// the text a person would see.
fn strip_escapes(raw: &[u8], out: &mut String) {
    let text = String::from_utf8_lossy(raw);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' | '\0' => {}
            c => out.push(c),
        }
    }
}

/// Decompresses `.xz`/`.zst` images and unpacks an ova's disk into `work`.
fn unpack(image: &Path, work: &Path) -> Result<PathBuf> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for (ext, tool) in [(".xz", "xz"), (".zst", "zstd")] {
        if let Some(stem) = name.strip_suffix(ext) {
            let out = work.join(stem);
            let f = std::fs::File::create(&out)?;
            let status = tie(Command::new(tool).arg("-dc").arg(image).stdout(f))
                .status()
                .with_context(|| format!("running {tool}"))?;
            if !status.success() {
                bail!("decompressing {} with {tool} failed", image.display());
            }
            return unpack(&out, work);
        }
    }
    if name.ends_with(".ova") {
        let dir = work.join("ova");
        std::fs::create_dir_all(&dir)?;
        let status = tie(&mut Command::new("tar"))
            .arg("-xf")
            .arg(image)
            .arg("-C")
            .arg(&dir)
            .arg("--wildcards")
            .arg("*.vmdk")
            .status()
            .context("running tar")?;
        if !status.success() {
            bail!("{} is not an ova with a vmdk disk", image.display());
        }
        let disk = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "vmdk"))
            .with_context(|| format!("no vmdk in {}", image.display()))?;
        return Ok(disk);
    }
    Ok(image.to_path_buf())
}

/// The size of the disk an image holds, from qemu-img.
fn virtual_size(image: &Path, fmt: &str) -> Result<u64> {
    let out = run_tool(
        Command::new(qemu_img()?)
            .args(["info", "--output=json", "-f", fmt])
            .arg(image),
        "qemu-img info",
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")
}

/// A qcow2 overlay on `image`, `size` bytes large, that takes the guest's
/// writes; the image itself stays as it is.
fn grown_overlay(image: &Path, fmt: &str, size: u64, work: &Path) -> Result<PathBuf> {
    let have = virtual_size(image, fmt)?;
    if size < have {
        bail!(
            "--disk-size ({} MiB) is smaller than the image's disk ({} MiB): \
             give at least that",
            size >> 20,
            have.div_ceil(1 << 20)
        );
    }
    let overlay = work.join("grown.qcow2");
    run_tool(
        Command::new(qemu_img()?)
            .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
            .arg(std::path::absolute(image)?)
            .arg(&overlay)
            .arg(size.to_string()),
        "qemu-img create of an overlay",
    )?;
    Ok(overlay)
}

/// A NoCloud seed disk: a FAT filesystem labelled CIDATA holding the
/// user's user-data, meta-data and network-config, made with mtools.
fn cloud_init_seed(dir: &Path, work: &Path) -> Result<PathBuf> {
    if !dir.join("user-data").is_file() {
        bail!(
            "--cloud-init {}: no user-data file there; a NoCloud seed needs \
             user-data (for example '#cloud-config') and may have meta-data and network-config",
            dir.display()
        );
    }
    let seed_dir = work.join("cidata");
    std::fs::create_dir_all(&seed_dir)?;
    for name in ["user-data", "meta-data", "network-config"] {
        let src = dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, seed_dir.join(name))
                .with_context(|| format!("reading {}", src.display()))?;
        }
    }
    if !seed_dir.join("meta-data").exists() {
        std::fs::write(
            seed_dir.join("meta-data"),
            "instance-id: kiln-boot\nlocal-hostname: debian\n",
        )?;
    }
    let img = work.join("cidata.img");
    let tools = "making the cloud-init seed needs mkfs.fat and mcopy: \
                 sudo apt-get install dosfstools mtools";
    run_tool(
        Command::new("mkfs.fat")
            .args(["-C", "-n", "CIDATA"])
            .arg(&img)
            .arg("2048"),
        "mkfs.fat",
    )
    .context(tools)?;
    let mut mcopy = Command::new("mcopy");
    mcopy.arg("-i").arg(&img);
    for e in std::fs::read_dir(&seed_dir)? {
        mcopy.arg(e?.path());
    }
    run_tool(mcopy.arg("::/"), "mcopy").context(tools)?;
    Ok(img)
}

fn is_iso(p: &Path) -> bool {
    let mut buf = [0u8; 5];
    std::fs::File::open(p)
        .and_then(|mut f| {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(0x8001))?;
            f.read_exact(&mut buf)
        })
        .is_ok()
        && &buf == b"CD001"
}

pub fn boot(a: BootOptions) -> Result<u8> {
    let re = regex::Regex::new(&a.expect)
        .with_context(|| format!("--expect '{}' is not a valid regular expression", a.expect))?;
    if !a.image.is_file() {
        bail!("image {} does not exist", a.image.display());
    }
    let qemu = qemu_command::binary()?;
    let work = OwnedDir::new(owned_dir::BOOT).context("creating a work directory")?;
    let image = unpack(&a.image, work.path())?;
    let iso = is_iso(&image);
    if a.disk_size.is_some() && iso {
        bail!("--disk-size applies to disk images, not to an iso");
    }

    let mut q = QemuCommand::new(qemu, Display::Off);
    q.opt("-machine", "q35")
        .opt("-m", format!("{}M", a.mem_mib))
        .opt("-smp", "2")
        .serial(Serial::StdioNoSignals)
        .opt("-device", "virtio-rng-pci")
        .opt("-nic", "user,model=virtio-net-pci");
    let (device, kvm) = probe_kvm();
    match kvm {
        KvmSupport::Usable => {
            q.accel(Accel::Kvm);
        }
        other => {
            if !a.json {
                eprintln!(
                    "kiln: booting under TCG (software emulation, slower): {}",
                    other.explain(&device)
                );
            }
            q.accel(Accel::Tcg {
                thread_per_vcpu: true,
            });
        }
    }
    if a.firmware == Firmware::Uefi {
        let code = first_existing(OVMF_CODE)
            .context("OVMF not found, needed for --firmware uefi: sudo apt-get install ovmf")?;
        let vars_src = first_existing(OVMF_VARS)
            .context("OVMF variables not found: sudo apt-get install ovmf")?;
        let vars = work.path().join("OVMF_VARS.fd");
        std::fs::copy(&vars_src, &vars)?;
        q.pflash(0, &code, true);
        q.pflash(1, &vars, false);
    }
    if iso {
        q.drive(&image, "media=cdrom,readonly=on,if=ide");
    } else {
        let fmt = detect_format(&image)?;
        if let Some(size) = a.disk_size {
            let overlay = grown_overlay(&image, fmt, size, work.path())?;
            q.drive(&overlay, "format=qcow2,if=virtio");
        } else {
            // snapshot: writes go to a temporary overlay, never to the image.
            q.drive(&image, &format!("format={fmt},if=virtio,snapshot=on"));
        }
    }
    if let Some(dir) = &a.cloud_init {
        let seed = cloud_init_seed(dir, work.path())?;
        q.drive(&seed, "format=raw,if=virtio,readonly=on");
    }
    let mut child = spawn_hypervisor(q.into_command(), "qemu-system-x86_64")?;
    let mut out = child.child.stdout.take().context("qemu's console")?;
    let mut err = child.child.stderr.take().context("qemu's error stream")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.timeout);
    let mut text = String::new();
    // Matching restarts a little before the new text, so a match split
    // across two reads is still found.
    let mut searched = 0usize;
    let mut pending: Vec<u8> = Vec::new();
    let result = loop {
        if ctrl_c::requested() {
            break Err(anyhow::anyhow!(SandboxError::Interrupted));
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(data) => {
                if a.console {
                    use std::io::Write;
                    let _ = std::io::stderr().write_all(&data);
                }
                pending.extend_from_slice(&data);
                let rest = split_incomplete(&mut pending);
                strip_escapes(&pending, &mut text);
                pending = rest;
                let from = text.floor_char_boundary_compat(searched.saturating_sub(4096));
                if let Some(m) = re.find(&text[from..]) {
                    break Ok(m.as_str().to_string());
                }
                searched = text.len();
                if text.len() > 4 << 20 {
                    let cut = text.floor_char_boundary_compat(text.len() - (1 << 20));
                    text.drain(..cut);
                    searched = text.len();
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.try_wait()?;
                child.kill();
                let diag = err_thread.join().unwrap_or_default();
                break Err(anyhow::anyhow!(
                    "the machine stopped ({}) before its console matched '{}'.\n\
                     qemu said: {}\nlast console lines:\n{}",
                    status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "console closed".into()),
                    a.expect,
                    diag.trim(),
                    last_lines(&text, 25)
                ));
            }
        }
        if Instant::now() >= deadline {
            child.kill();
            eprintln!(
                "kiln: the console did not match '{}' within {} s; last console lines:\n{}",
                a.expect,
                a.timeout,
                last_lines(&text, 25)
            );
            break Err(anyhow::anyhow!(SandboxError::Timeout(
                a.timeout.ceil() as u64
            )));
        }
    };
    child.kill();
    let matched = result?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"matched": matched, "seconds": (secs * 10.0).round() / 10.0,
                "firmware": format!("{:?}", a.firmware).to_lowercase()})
        );
    } else {
        eprintln!("kiln: console matched '{}' after {secs:.1} s", a.expect);
    }
    Ok(0)
}

/// Splits off an incomplete escape sequence or UTF-8 character at the end
/// of `buf`, to be completed by the next read.
fn split_incomplete(buf: &mut Vec<u8>) -> Vec<u8> {
    let mut keep = buf.len();
    if let Some(esc) = buf.iter().rposition(|b| *b == 0x1b) {
        let rest = &buf[esc + 1..];
        let complete = match rest.first() {
            None => false,
            Some(b'[') => rest[1..].iter().any(|b| (0x40..=0x7e).contains(b)),
            Some(_) => true,
        };
        if !complete && buf.len() - esc < 64 {
            keep = esc;
        }
    }
    if let Err(e) = std::str::from_utf8(&buf[..keep]) {
        if e.error_len().is_none() {
            keep = e.valid_up_to();
        }
    }
    buf.split_off(keep)
}

fn last_lines(text: &str, n: usize) -> String {
    tail::last(text.lines(), n).join("\n")
}

trait CharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl CharBoundary for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sequences_wait_for_the_next_read() {
        let mut text = String::new();
        let mut pending = Vec::new();
        for chunk in [
            &b"Reached \x1b"[..],
            b"[0;1;39mtarget \xc3",
            b"\xa9\x1b[0m done",
        ] {
            pending.extend_from_slice(chunk);
            let rest = split_incomplete(&mut pending);
            strip_escapes(&pending, &mut text);
            pending = rest;
        }
        assert_eq!(text, "Reached target \u{e9} done");
    }

    #[test]
    fn escapes_are_stripped() {
        let mut s = String::new();
        strip_escapes(b"\x1b[2J\x1b[01;01Hdebian login: \r\n", &mut s);
        assert_eq!(s, "debian login: \n");
    }
}
