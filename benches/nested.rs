//! kiln-vmm against QEMU, both on real KVM inside one nested-KVM guest:
//! `cargo bench --bench nested [-- RUNS]`.
//!
//! The host half boots L1 with the nested harness (tests/support/nested.rs)
//! and a tools image that has QEMU in it, copies this benchmark in and runs
//! it there. The L1 half times, interleaved, `kiln run --backend kvm -- true`
//! (kiln-vmm) and `kiln run --backend qemu -- true` (QEMU `-M microvm -accel
//! kvm`): the same kernel, initramfs and agent, from boot to the agent's
//! handshake, the command and the clean power-off, both from copies of
//! the kernel, initramfs and tools image in L1's memory (see
//! `localize_cache`). It prints both medians and their ratio. A figure,
//! not a test: nothing here fails on speed.

#[path = "support/figures.rs"]
mod figures;
#[path = "../tests/support/nested.rs"]
mod nested;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in L1: this process is the half that measures.
const INNER_ENV: &str = "KILN_BENCH_NESTED";

fn fail(msg: &str) -> ! {
    eprintln!("nested bench: {msg}");
    std::process::exit(1);
}

fn runs() -> usize {
    std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10)
        .max(1)
}

fn main() {
    if std::env::var_os(INNER_ENV).is_some() {
        measure(runs());
    } else {
        host(runs());
    }
}

/// Boots L1 and runs this benchmark there.
fn host(runs: usize) {
    let kiln = PathBuf::from(env!("CARGO_BIN_EXE_kiln"));
    let me = std::env::current_exe().unwrap_or_else(|e| fail(&e.to_string()));
    let inner = format!("{}/nested-bench", nested::BIN);
    let runs_arg = runs.to_string();
    let status = nested::L1::new(&kiln)
        .unwrap_or_else(|e| fail(&e))
        .tools_package("qemu-system-x86")
        .copy_in(&me, &inner)
        .env(INNER_ENV, "1")
        .timeout(3600)
        .command(&[&inner, &runs_arg])
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| fail(&e.to_string()));
    if !status.success() {
        fail(&format!("the nested half failed ({status})"));
    }
}

/// Where the L1 half keeps its copy of the cache.
const LOCAL_CACHE: &str = "/tmp/kiln-bench-cache";

/// Copies the kernel, tools image and initramfs entries from the shared
/// cache into L1's memory. On a user's host these files come from the page
/// cache; the harness's share caches nothing in L1 (under TCG it is 9p with
/// cache=mmap), which would add the same reads over the share to both
/// sides of every run and measure the share, not the VMMs.
fn localize_cache() {
    let local = Path::new(LOCAL_CACHE);
    let copy_dir = |from: &Path, to: &Path| {
        fs::create_dir_all(to).unwrap_or_else(|e| fail(&format!("{}: {e}", to.display())));
        let entries =
            fs::read_dir(from).unwrap_or_else(|e| fail(&format!("{}: {e}", from.display())));
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                fs::copy(e.path(), to.join(e.file_name()))
                    .unwrap_or_else(|err| fail(&format!("copying {}: {err}", e.path().display())));
            }
        }
    };
    for artifact in ["kernel", "tools"] {
        let out = Command::new(nested::KILN)
            .args([artifact, "path"])
            .output()
            .unwrap_or_else(|e| fail(&format!("{}: {e}", nested::KILN)));
        let file = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let (Some(entry), true) = (file.parent(), out.status.success()) else {
            fail(&format!(
                "kiln {artifact} path: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        };
        let name = entry.file_name().unwrap_or_default();
        copy_dir(entry, &local.join(artifact).join(name));
    }
    copy_dir(
        &Path::new(nested::CACHE).join("initramfs"),
        &local.join("initramfs"),
    );
}

fn time(backend: &str) -> Duration {
    let start = Instant::now();
    let out = Command::new(nested::KILN)
        .args(["run", "--backend", backend, "--", "true"])
        .env("KILN_CACHE_DIR", LOCAL_CACHE)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("{}: {e}", nested::KILN)));
    let took = start.elapsed();
    if !out.status.success() {
        fail(&format!(
            "kiln run --backend {backend} -- true failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The baseline is QEMU on L1's KVM; a fall back to TCG would make the
    // ratio meaningless.
    if String::from_utf8_lossy(&out.stderr).contains("TCG") {
        fail("QEMU in L1 fell back to TCG: L1's /dev/kvm does not work");
    }
    took
}

/// In L1: the interleaved timings and their ratio.
fn measure(runs: usize) {
    localize_cache();
    // One warm-up each (page cache, the initramfs in the cache).
    time("kvm");
    time("qemu");
    let mut vmm = Vec::with_capacity(runs);
    let mut qemu = Vec::with_capacity(runs);
    for i in 0..runs {
        vmm.push(time("kvm"));
        qemu.push(time("qemu"));
        eprint!("\rrun {}/{runs}", i + 1);
    }
    eprintln!();
    println!("nested KVM benchmark ({runs} runs each, interleaved, inside one L1 under QEMU TCG)");
    let v = figures::report(
        "  kiln run --backend kvm -- true (kiln-vmm):        ",
        &mut vmm,
    );
    let q = figures::report(
        "  kiln run --backend qemu -- true (microvm, kvm):   ",
        &mut qemu,
    );
    println!(
        "  ratio kiln-vmm / QEMU: {:.2} (goal <= 0.70)",
        v.as_secs_f64() / q.as_secs_f64()
    );
}
