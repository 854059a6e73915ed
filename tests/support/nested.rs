//! The nested-KVM harness, one piece of code for `tests/run.rs` and
//! `benches/nested.rs`.
//!
//! This machine class's /dev/kvm (kvm_pvm) cannot run an unmodified Linux
//! guest, so kiln-vmm is proven one level down. The host's kiln boots a kiln
//! guest, "L1", with `--backend qemu`: under TCG that is `-cpu max`, whose
//! emulated AMD SVM with nested paging gives L1's kernel (KVM built in, see
//! kernel-config/) a real /dev/kvm; on a host with hardware KVM it is
//! `-cpu host` and the host's nested virtualization. kiln, copied into L1,
//! then runs `--backend kvm` there: kiln-vmm on real KVM ioctls, seccomp on.
//!
//! What goes into L1:
//! - the kiln binary under test and whatever else the caller adds, by
//!   copy-in (programs executed from a share under TCG run stale code;
//!   reading files through a share is fine);
//! - the host's kiln cache (kernel, tools image, initramfs), shared
//!   read-only and named by `KILN_CACHE_DIR`;
//! - virtiofsd and the libraries it links that the tools image lacks, so
//!   `--share` works under kiln-vmm too;
//! - with [`L1::net`], a network for L1 (`--net`) and passt, so `--net`
//!   works under kiln-vmm in L1 too.
#![allow(dead_code)] // each user takes the part it needs

#[path = "../../src/util/which.rs"]
mod which;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where the harness puts things inside L1.
pub const BIN: &str = "/opt/kiln/bin";
pub const LIB: &str = "/opt/kiln/lib";
pub const CACHE: &str = "/opt/kiln/cache";
/// The kiln binary inside L1.
pub const KILN: &str = "/opt/kiln/bin/kiln";

/// L1's size: room for a 1 GiB L2 beside the caller's files in L1's tmpfs.
const L1_MEM: &str = "3G";
const L1_CPUS: &str = "2";

/// Libraries the tools image provides itself; copying the host's would mix
/// two C libraries in one process.
const SYSTEM_LIBS: &[&str] = &[
    "linux-vdso",
    "ld-linux",
    "libc.so",
    "libm.so",
    "libpthread.so",
    "libdl.so",
    "librt.so",
];

/// One L1 run: what goes in, and the command to run there.
pub struct L1 {
    host_kiln: PathBuf,
    cache: PathBuf,
    copies: Vec<(PathBuf, String)>,
    env: Vec<(String, String)>,
    tools_packages: Vec<String>,
    net: bool,
    timeout_secs: u64,
}

impl L1 {
    /// An L1 for `host_kiln` (the binary that boots L1 and is copied in),
    /// with the host's cache and virtiofsd. Fails, saying why, when the host
    /// cannot provide them.
    pub fn new(host_kiln: &Path) -> Result<L1, String> {
        let cache = cache_root(host_kiln)?;
        let mut l1 = L1 {
            host_kiln: host_kiln.to_path_buf(),
            cache,
            copies: Vec::new(),
            env: Vec::new(),
            tools_packages: Vec::new(),
            net: false,
            timeout_secs: 900,
        };
        l1 = l1.copy_in(host_kiln, KILN);
        let virtiofsd = find_virtiofsd()?;
        l1 = l1.copy_in(&virtiofsd, &format!("{BIN}/virtiofsd"));
        for lib in linked_libraries(&virtiofsd)? {
            let name = lib
                .file_name()
                .ok_or_else(|| format!("library path {} has no name", lib.display()))?
                .to_string_lossy()
                .into_owned();
            l1 = l1.copy_in(&lib, &format!("{LIB}/{name}"));
        }
        Ok(l1
            .env("KILN_CACHE_DIR", CACHE)
            .env("KILN_VIRTIOFSD", &format!("{BIN}/virtiofsd"))
            .env("LD_LIBRARY_PATH", LIB)
            .env(
                "PATH",
                &format!("{BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            ))
    }

    /// Copies a host file into L1 (mode kept).
    pub fn copy_in(mut self, host: &Path, guest: &str) -> L1 {
        self.copies.push((host.to_path_buf(), guest.to_string()));
        self
    }

    /// Sets an environment variable for the command in L1.
    pub fn env(mut self, key: &str, value: &str) -> L1 {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Gives L1 a tools image with this Debian package added (kiln's
    /// `--tools-package`, built into the host's cache on first use).
    pub fn tools_package(mut self, package: &str) -> L1 {
        self.tools_packages.push(package.to_string());
        self
    }

    /// Gives L1 a network (`--net`) and the host's passt, which kiln-vmm's
    /// `--net` uses in L1. passt links only the C library, which the tools
    /// image has.
    pub fn net(mut self) -> Result<L1, String> {
        let passt = which::which("passt")
            .ok_or("passt not found: the nested harness copies it into L1 (run .ci/setup)")?;
        self.net = true;
        Ok(self
            .copy_in(&passt, &format!("{BIN}/passt"))
            .env("KILN_PASST", &format!("{BIN}/passt")))
    }

    /// Stops L1 after `secs` (kiln's `--timeout`, exit 124).
    pub fn timeout(mut self, secs: u64) -> L1 {
        self.timeout_secs = secs;
        self
    }

    /// The host command that boots L1 and runs `argv` in it.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut args: Vec<OsString> = ["run", "--backend", "qemu", "--mem", L1_MEM]
            .iter()
            .map(OsString::from)
            .collect();
        args.extend(["--cpus", L1_CPUS].map(OsString::from));
        args.push("--timeout".into());
        args.push(self.timeout_secs.to_string().into());
        args.push("--share".into());
        let mut share = self.cache.clone().into_os_string();
        share.push(format!(":{CACHE}:ro"));
        args.push(share);
        for (host, guest) in &self.copies {
            args.push("--copy-in".into());
            let mut spec = host.clone().into_os_string();
            spec.push(format!(":{guest}"));
            args.push(spec);
        }
        if self.net {
            args.push("--net".into());
        }
        for p in &self.tools_packages {
            args.push("--tools-package".into());
            args.push(p.into());
        }
        for (k, v) in &self.env {
            args.push("--env".into());
            args.push(format!("{k}={v}").into());
        }
        args.push("--".into());
        args.extend(argv.iter().map(OsString::from));
        let mut cmd = Command::new(&self.host_kiln);
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// Boots L1, runs `argv` there, and returns what it printed and its
    /// status (kiln's: the command's own, 124 on the timeout, 125 when L1
    /// itself failed).
    pub fn run(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.host_kiln.display()))
    }
}

/// The host's kiln cache, from where kiln finds its kernel
/// (`<cache>/kernel/<entry>/vmlinux`).
fn cache_root(kiln: &Path) -> Result<PathBuf, String> {
    let out = Command::new(kiln)
        .args(["kernel", "path"])
        .output()
        .map_err(|e| format!("running {} kernel path: {e}", kiln.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the nested harness needs the guest kernel: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let vmlinux = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    vmlinux
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("unexpected kernel path {}", vmlinux.display()))
}

/// virtiofsd as kiln finds it: `KILN_VIRTIOFSD`, PATH, /usr/libexec,
/// `~/.cargo/bin`.
fn find_virtiofsd() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_VIRTIOFSD").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut more = vec![PathBuf::from("/usr/libexec")];
    if let Some(home) = std::env::var_os("HOME") {
        more.push(PathBuf::from(home).join(".cargo/bin"));
    }
    which::which_also_in("virtiofsd", &more).ok_or_else(|| {
        "virtiofsd not found: the nested harness copies it into L1 (run .ci/setup)".into()
    })
}

/// The shared libraries `binary` links, but for the C library's own.
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "\tlibseccomp.so.2 => /lib/x86_64-linux-gnu/libseccomp.so.2 (0x...)"
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            continue;
        };
        if SYSTEM_LIBS.iter().any(|s| name.starts_with(s)) {
            continue;
        }
        if let Some(path) = rest
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}
