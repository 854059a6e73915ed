//! Output flood benchmark: `cargo bench --bench flood [-- SIZE]`.
//!
//! Runs `kiln run -- head -c SIZE /dev/zero` (SIZE in bytes, or with a K, M
//! or G suffix; 1G if not given) with kiln's stdout read slowly, 64 KiB and
//! then a 4 ms pause (at most 16 MiB/s; the guest writes about 25 MiB/s
//! under TCG here), and samples kiln's peak resident memory (VmHWM) every
//! 50 ms meanwhile. Prints the bytes received, the time and the peak, next
//! to the peak of `kiln run -- true`, and how often the reader found a full
//! chunk waiting (near 100%: kiln was holding the guest back rather than
//! buffering its output). The goal is a peak of at most 64 MiB. A figure,
//! not a test: nothing here fails on speed or memory; it fails if bytes go
//! missing.

#[path = "../src/util/size.rs"]
mod size;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const READ_CHUNK: usize = 64 * 1024;
const READ_PAUSE: Duration = Duration::from_millis(4);
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const GOAL_MIB: f64 = 64.0;

fn fail(msg: &str) -> ! {
    eprintln!("flood bench: {msg}");
    std::process::exit(1);
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// "1G", "256M", "4096K", "1000": a size in bytes.
fn parse_size(s: &str) -> Option<u64> {
    match size::parse(s)? {
        (_, size::Unit::T) => None,
        (n, unit) => n.checked_mul(unit.bytes()),
    }
}

/// The peak resident set (VmHWM) of process `pid` so far, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What one run of kiln gave.
struct Run {
    received: u64,
    /// Reads that got a whole [`READ_CHUNK`], and all reads.
    full_reads: u64,
    reads: u64,
    /// Whether every byte received was a zero.
    all_zero: bool,
    took: Duration,
    peak_kib: u64,
    stderr: String,
}

/// Runs kiln with `args`, reading its stdout slowly if `slow`, and samples
/// its peak memory until it exits.
fn run(args: &[&str], slow: bool) -> Run {
    let start = Instant::now();
    let mut child: Child = kiln()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("starting kiln: {e}")));
    let pid = child.id();
    let mut stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| fail("no stdout pipe"));
    let mut stderr = child
        .stderr
        .take()
        .unwrap_or_else(|| fail("no stderr pipe"));
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; READ_CHUNK];
        let (mut received, mut all_zero) = (0u64, true);
        let (mut full_reads, mut reads) = (0u64, 0u64);
        loop {
            match stdout.read(&mut buf) {
                Ok(0) => return (received, all_zero, full_reads, reads),
                Ok(n) => {
                    received += n as u64;
                    reads += 1;
                    full_reads += u64::from(n == READ_CHUNK);
                    all_zero &= buf[..n].iter().all(|&b| b == 0);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => fail(&format!("reading kiln's output: {e}")),
            }
            if slow {
                thread::sleep(READ_PAUSE);
            }
        }
    });
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut peak_kib = 0;
    let status = loop {
        // Sampled before each check: once kiln is reaped its /proc entry is
        // gone. VmHWM only grows, so the last sample misses at most the
        // final 50 ms.
        if let Some(k) = vm_hwm_kib(pid) {
            peak_kib = peak_kib.max(k);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => thread::sleep(SAMPLE_EVERY),
            Err(e) => fail(&format!("waiting for kiln: {e}")),
        }
    };
    let (received, all_zero, full_reads, reads) =
        reader.join().unwrap_or_else(|_| fail("reader panicked"));
    let took = start.elapsed();
    let stderr = errors.join().unwrap_or_default();
    if !status.success() {
        fail(&format!("kiln {args:?} failed ({status}): {stderr}"));
    }
    Run {
        received,
        full_reads,
        reads,
        all_zero,
        took,
        peak_kib,
        stderr,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let size = std::env::args()
        .skip(1)
        .find_map(|a| parse_size(&a))
        .unwrap_or(1 << 30);
    let size_arg = size.to_string();

    // The reference: kiln's peak with no output to move (also a warm-up).
    let idle = run(&["run", "--", "true"], false);
    let accel = if idle.stderr.contains("TCG") {
        "TCG"
    } else {
        "KVM"
    };
    let flood = run(&["run", "--", "head", "-c", &size_arg, "/dev/zero"], true);

    println!(
        "flood benchmark (QEMU {accel}): kiln run -- head -c {size} /dev/zero, \
         read {} KiB then {} ms pause",
        READ_CHUNK / 1024,
        READ_PAUSE.as_millis()
    );
    println!(
        "  bytes received: {} of {size}{}",
        flood.received,
        if flood.all_zero {
            ""
        } else {
            " (not all zero!)"
        }
    );
    let secs = flood.took.as_secs_f64();
    println!(
        "  time: {secs:.1} s ({:.1} MiB/s)",
        flood.received as f64 / (1 << 20) as f64 / secs
    );
    println!(
        "  reads that found a full {} KiB waiting: {:.1}%",
        READ_CHUNK / 1024,
        100.0 * flood.full_reads as f64 / flood.reads.max(1) as f64
    );
    println!(
        "  kiln peak RSS (VmHWM, sampled every {} ms): {:.1} MiB (goal <= {GOAL_MIB} MiB); \
         kiln run -- true: {:.1} MiB",
        SAMPLE_EVERY.as_millis(),
        mib(flood.peak_kib),
        mib(idle.peak_kib)
    );
    if flood.received != size || !flood.all_zero {
        fail("kiln's output was not what the guest wrote");
    }
}
