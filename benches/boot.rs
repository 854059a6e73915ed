//! Boot benchmark: `cargo bench --bench boot [-- RUNS]`.
//!
//! Prints the median wall time of `kiln run -- true` next to the median of a
//! bare `qemu-system-x86_64 -M microvm` boot of the same kernel whose init
//! (busybox) runs one command and powers off, measured interleaved in the
//! same run, and their ratio. A figure, not a test: nothing here fails on
//! speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/figures.rs"]
mod figures;

const BUSYBOX: &str = "/bin/busybox";

fn fail(msg: &str) -> ! {
    eprintln!("boot bench: {msg}");
    std::process::exit(1);
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// An initramfs whose /init runs `true` and restarts (which ends the VM,
/// as with kiln, through reboot=t and -no-reboot).
fn bare_initramfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "dev", "proc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap_or_else(|e| fail(&e.to_string()));
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap_or_else(|e| {
        fail(&format!(
            "{BUSYBOX}: {e} (install it: sudo apt-get install busybox-static)"
        ))
    });
    let init = root.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox true\n/bin/busybox reboot -f\n",
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    let status = Command::new("sh")
        .arg("-c")
        .arg("chmod 755 init && find . | cpio -o -H newc --quiet > ../bare.cpio")
        .current_dir(&root)
        .status()
        .unwrap_or_else(|e| fail(&format!("cpio: {e}")));
    if !status.success() {
        fail("building the bare initramfs failed");
    }
    dir.join("bare.cpio")
}

fn time(cmd: &mut Command, what: &str) -> (Duration, String) {
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("{what}: {e}")));
    let took = start.elapsed();
    if !out.status.success() {
        fail(&format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    (took, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let kernel = kiln()
        .args(["kernel", "path"])
        .output()
        .unwrap_or_else(|e| fail(&e.to_string()));
    if !kernel.status.success() {
        fail(&String::from_utf8_lossy(&kernel.stderr));
    }
    let kernel = String::from_utf8_lossy(&kernel.stdout).trim().to_string();
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&e.to_string()));
    let initrd = bare_initramfs(dir.path());

    // One warm-up of each, which also tells which accelerator kiln uses.
    let (_, note) = time(kiln().args(["run", "--", "true"]), "kiln run -- true");
    let tcg = note.contains("TCG");
    let bare_cmd = || {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args([
                "-M",
                "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on",
            ])
            .args(if tcg {
                ["-accel", "tcg", "-cpu", "max"]
            } else {
                ["-accel", "kvm", "-cpu", "host"]
            })
            .args(["-m", "1024M", "-smp", "1", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 reboot=t panic=-1 tsc=reliable no_timer_check \
                 8250.nr_uarts=1 random.trust_cpu=on quiet",
            ])
            .stdout(Stdio::null());
        c
    };
    time(&mut bare_cmd(), "bare qemu boot");

    let mut bare = Vec::with_capacity(runs);
    let mut kiln_times = Vec::with_capacity(runs);
    for i in 0..runs {
        bare.push(time(&mut bare_cmd(), "bare qemu boot").0);
        kiln_times.push(time(kiln().args(["run", "--", "true"]), "kiln run -- true").0);
        eprint!("\rrun {}/{runs}", i + 1);
    }
    eprintln!();
    let accel = if tcg { "TCG" } else { "KVM" };
    println!("boot benchmark ({runs} runs each, interleaved, QEMU {accel})");
    let b = figures::report(
        "  bare qemu -M microvm, busybox init runs one command:",
        &mut bare,
    );
    let k = figures::report(
        "  kiln run -- true:                                   ",
        &mut kiln_times,
    );
    println!(
        "  ratio kiln / bare: {:.2} (goal <= 1.25)",
        k.as_secs_f64() / b.as_secs_f64()
    );
}
