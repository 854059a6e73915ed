//! Network benchmark: `cargo bench --bench net [-- RUNS]`.
//!
//! Prints, as medians of RUNS interleaved paired runs (5 if not given):
//! 1. the cost of `--net` on `kiln run -- true`;
//! 2. the guest's download throughput against the host's, both fetching the
//!    same .deb from deb.debian.org over HTTP with curl, from curl's own
//!    timing (so the VM's boot is not counted);
//! 3. debos under kiln against debos with its own fakemachine: only a line
//!    saying why it is not measured where fakemachine cannot run.
//!
//! The backend is QEMU (kiln-vmm cannot boot Linux on the development
//! machine); `KILN_BENCH_BACKEND=kvm` uses kiln-vmm instead. A figure, not a
//! test: nothing here fails on speed; it fails if a command fails.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/figures.rs"]
mod figures;

const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &str = "dists/bookworm/main/binary-amd64/Packages.xz";
/// A package of a few tens of MB whose name changes with the kernel ABI:
/// `linux-image-6.1.0-N-cloud-amd64`, the highest N is taken.
const PACKAGE_PREFIX: &str = "linux-image-6.1.0-";
const PACKAGE_SUFFIX: &str = "-cloud-amd64";
/// curl's `-w`: status, bytes and seconds.
const CURL_FORMAT: &str = "%{http_code} %{size_download} %{time_total}";
const CURL_MAX_TIME: &str = "600";

fn fail(msg: &str) -> ! {
    eprintln!("net bench: {msg}");
    std::process::exit(1);
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs `cmd`, failing on a non-zero exit; its wall time, stdout, stderr.
fn time(cmd: &mut Command, what: &str) -> (Duration, String, String) {
    let start = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| fail(&format!("{what}: {e}")));
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        fail(&format!("{what} failed ({}): {stderr}", out.status));
    }
    (
        took,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// The package to fetch: its pool path and size, from the mirror's index.
fn resolve_package(dir: &Path) -> (String, String, u64) {
    let index = dir.join("Packages.xz");
    time(
        Command::new("curl")
            .args(["-sSf", "--max-time", CURL_MAX_TIME, "-o"])
            .arg(&index)
            .arg(format!("{MIRROR}/{PACKAGES}")),
        "downloading the package index",
    );
    let (_, text, _) = time(
        Command::new("xz").arg("-dc").arg(&index),
        "xz -dc Packages.xz",
    );
    let mut best: Option<(u32, String, String, u64)> = None;
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        };
        let (Some(package), Some(file), Some(size)) =
            (field("Package"), field("Filename"), field("Size"))
        else {
            continue;
        };
        let abi = package
            .strip_prefix(PACKAGE_PREFIX)
            .and_then(|r| r.strip_suffix(PACKAGE_SUFFIX))
            .and_then(|n| n.parse::<u32>().ok());
        if let (Some(abi), Ok(size)) = (abi, size.parse()) {
            if !matches!(&best, Some(b) if b.0 >= abi) {
                best = Some((abi, package.to_string(), file.to_string(), size));
            }
        }
    }
    let Some((_, package, file, size)) = best else {
        fail(&format!(
            "no {PACKAGE_PREFIX}N{PACKAGE_SUFFIX} in {MIRROR}/{PACKAGES}"
        ))
    };
    (package, format!("{MIRROR}/{file}"), size)
}

/// curl's `-w CURL_FORMAT` output: the download time, checked for a 200
/// and `size` bytes.
fn curl_time(out: &str, size: u64, what: &str) -> Duration {
    let f: Vec<&str> = out.split_whitespace().collect();
    let parsed = match f.as_slice() {
        [code, bytes, secs] => bytes
            .parse::<u64>()
            .ok()
            .zip(secs.parse::<f64>().ok())
            .map(|(b, s)| (*code, b, s)),
        _ => None,
    };
    match parsed {
        Some(("200", b, s)) if b == size && s > 0.0 => Duration::from_secs_f64(s),
        _ => fail(&format!(
            "{what}: expected \"200 {size} SECONDS\" from curl, got {out:?}"
        )),
    }
}

fn mb_per_s(size: u64, t: Duration) -> f64 {
    size as f64 / 1e6 / t.as_secs_f64()
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let backend = match std::env::var("KILN_BENCH_BACKEND").as_deref() {
        Ok("kvm") => "kvm",
        Ok("qemu") | Err(_) => "qemu",
        Ok(other) => fail(&format!("KILN_BENCH_BACKEND={other}: use kvm or qemu")),
    };
    let run = |net: bool| {
        let mut c = kiln();
        c.args(["run", "--backend", backend]);
        if net {
            c.arg("--net");
        }
        c.args(["--", "true"]);
        c
    };

    // 1. `kiln run -- true` with and without --net; one warm-up of each.
    let (_, _, note) = time(&mut run(false), "kiln run -- true");
    let accel = match (backend, note.contains("TCG")) {
        ("kvm", _) => "kiln-vmm",
        (_, true) => "QEMU TCG",
        _ => "QEMU KVM",
    };
    time(&mut run(true), "kiln run --net -- true");
    let mut plain = Vec::with_capacity(runs);
    let mut net = Vec::with_capacity(runs);
    for i in 0..runs {
        // Alternate which goes first, so neither always follows the other.
        for net_first in [i % 2 == 1, i % 2 == 0] {
            if net_first {
                net.push(time(&mut run(true), "kiln run --net -- true").0);
            } else {
                plain.push(time(&mut run(false), "kiln run -- true").0);
            }
        }
        eprint!("\r--net: run {}/{runs}", i + 1);
    }
    eprintln!();

    // 2. The same .deb fetched by the host's curl and by the guest's.
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&e.to_string()));
    let (package, url, size) = resolve_package(dir.path());
    let host_cmd = || {
        let mut c = Command::new("curl");
        c.args(["-s", "--max-time", CURL_MAX_TIME, "-o", "/dev/null", "-w"])
            .args([CURL_FORMAT, &url]);
        c
    };
    let guest_cmd = || {
        let mut c = kiln();
        c.args(["run", "--backend", backend, "--net"])
            .args(["--tools-package", "curl", "--", "curl", "-s"])
            .args(["--max-time", CURL_MAX_TIME, "-o", "/dev/null", "-w"])
            .args([CURL_FORMAT, &url]);
        c
    };
    // Warm-ups: the tools image with curl is built on first use, and the
    // mirror's cache gets the file.
    eprintln!("net bench: warming up (builds the tools image with curl on first use)");
    let (_, out, _) = time(&mut host_cmd(), "host curl");
    curl_time(&out, size, "host curl");
    let (_, out, _) = time(&mut guest_cmd(), "guest curl");
    curl_time(&out, size, "guest curl");
    let mut host = Vec::with_capacity(runs);
    let mut guest = Vec::with_capacity(runs);
    let mut guest_wall = Vec::with_capacity(runs);
    for i in 0..runs {
        for guest_first in [i % 2 == 1, i % 2 == 0] {
            if guest_first {
                let (wall, out, _) = time(&mut guest_cmd(), "guest curl");
                guest.push(curl_time(&out, size, "guest curl"));
                guest_wall.push(wall);
            } else {
                let (_, out, _) = time(&mut host_cmd(), "host curl");
                host.push(curl_time(&out, size, "host curl"));
            }
        }
        eprint!("\rdownload: run {}/{runs}", i + 1);
    }
    eprintln!();

    println!("network benchmark ({runs} runs each, interleaved, --backend {backend}, {accel})");
    println!("1. the cost of --net on `kiln run -- true`");
    let p = figures::report("  kiln run -- true:      ", &mut plain);
    let n = figures::report("  kiln run --net -- true:", &mut net);
    println!(
        "  ratio --net / without: {:.2} ({:+.0} ms)",
        n.as_secs_f64() / p.as_secs_f64(),
        (n.as_secs_f64() - p.as_secs_f64()) * 1e3
    );
    println!(
        "2. downloading {package} ({:.1} MB) over HTTP, by curl's own timing",
        size as f64 / 1e6
    );
    let h = figures::report("  host curl: ", &mut host);
    let g = figures::report("  guest curl:", &mut guest);
    println!(
        "  throughput: host {:.1} MB/s, guest {:.1} MB/s; ratio guest / host {:.2}",
        mb_per_s(size, h),
        mb_per_s(size, g),
        h.as_secs_f64() / g.as_secs_f64()
    );
    figures::report(
        "  whole guest command (boot, download, power off):",
        &mut guest_wall,
    );
    println!("  (MB = 10^6 bytes; {url})");

    // 3. debos: needs a machine where fakemachine works.
    let kvm = kiln_vmm::host::probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
    let debos = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("debos").is_file()));
    print!("3. debos under kiln vs debos with its own fakemachine: ");
    if !debos {
        println!(
            "not measured: debos is not installed; it needs a machine where fakemachine works"
        );
    } else if !kvm.is_usable() {
        println!(
            "not measured: {}; it needs a machine where fakemachine works",
            kvm.explain(Path::new("/dev/kvm"))
        );
    } else {
        println!(
            "not automated: time `debos images/debos/debian.yaml` against the README's \
             `kiln run ... -- /src/build.sh /src/debian.yaml` by hand"
        );
    }
}
