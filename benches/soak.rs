//! Soak: `cargo bench --bench soak [-- IN_A_ROW CONCURRENT AT_ONCE]`
//! (default 200 50 4).
//!
//! IN_A_ROW `kiln run`s one after another, then CONCURRENT more, AT_ONCE at
//! a time. Each gets its own 16 MiB sparse raw disk: the guest makes an
//! ext4 filesystem on it, writes 4 MiB of random data into a file and
//! prints the sha256 of the file and of the whole disk (read with O_DIRECT,
//! past the guest's own cache); the host checks both against the image
//! (the file through debugfs, where the host has it). Afterwards it looks
//! for what the runs left behind: processes, its own file descriptors,
//! anything in the TMPDIR given to kiln, lock files. It prints counts and
//! times, and exits 1 on any failure or leak. Not run in CI (minutes).

#[path = "support/figures.rs"]
mod figures;
#[allow(dead_code)] // the bench takes the part it needs
#[path = "../src/util/which.rs"]
mod which;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use rustix::process::{kill_process, Pid, Signal};
use sha2::{Digest, Sha256};

/// The guest's work: a constant script, no host values in it.
const GUEST: &str = r#"set -eu
mkfs.ext4 -q -F /dev/vda
mount /dev/vda /mnt
dd if=/dev/urandom of=/mnt/data bs=64k count=64 status=none
echo "file $(sha256sum /mnt/data | cut -d' ' -f1)"
umount /mnt
echo "disk $(dd if=/dev/vda iflag=direct bs=1M status=none | sha256sum | cut -d' ' -f1)"
"#;

const DISK_SIZE: u64 = 16 << 20;
/// Far beyond a run's 1.5-2 s under TCG: a run this slow is stuck.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn fail(msg: &str) -> ! {
    eprintln!("soak bench: {msg}");
    std::process::exit(1);
}

struct Soak {
    /// Holds `tmp` and `disks`; kept on failure for a look.
    root: PathBuf,
    /// kiln's TMPDIR: empty again after every run.
    tmp: PathBuf,
    disks: PathBuf,
    debugfs: Option<PathBuf>,
}

impl Soak {
    /// One verified run on disk `n`: its wall time, and kiln's stderr.
    fn run(&self, n: usize) -> Result<(Duration, String), String> {
        let disk = self.disks.join(format!("disk-{n}.img"));
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_SIZE))
            .map_err(|e| format!("creating {}: {e}", disk.display()))?;
        let (took, out) = self.kiln_run(&disk)?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let what = || format!("run {n}: stdout {stdout:?}, stderr {stderr:?}");
        if !out.status.success() {
            return Err(format!("kiln exited with {}; {}", out.status, what()));
        }
        let said = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_owned)
                .ok_or_else(|| format!("no '{key}' line; {}", what()))
        };
        let (file_hash, disk_hash) = (said("file ")?, said("disk ")?);
        let image = std::fs::read(&disk).map_err(|e| format!("reading {}: {e}", disk.display()))?;
        let host_disk = hex::encode(Sha256::digest(&image));
        if host_disk != disk_hash {
            return Err(format!(
                "run {n}: the guest hashed the disk as {disk_hash}, the host as {host_disk}"
            ));
        }
        if let Some(debugfs) = &self.debugfs {
            let data = Command::new(debugfs)
                .args(["-R", "cat /data"])
                .arg(&disk)
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("debugfs: {e}"))?;
            let host_file = hex::encode(Sha256::digest(&data.stdout));
            if host_file != file_hash {
                return Err(format!(
                    "run {n}: the guest hashed /data as {file_hash}, the host as {host_file}"
                ));
            }
        }
        std::fs::remove_file(&disk).map_err(|e| format!("removing {}: {e}", disk.display()))?;
        Ok((took, stderr))
    }

    fn kiln_run(&self, disk: &Path) -> Result<(Duration, Output), String> {
        let start = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("run")
            .arg("--disk")
            .arg(disk)
            .args(["--", "sh", "-c", GUEST])
            .env("TMPDIR", &self.tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting kiln: {e}"))?;
        let pid = Pid::from_child(&child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let out = child.wait_with_output();
            let _ = tx.send((start.elapsed(), out));
        });
        let (took, out) = match rx.recv_timeout(RUN_TIMEOUT) {
            Ok(done) => done,
            Err(_) => {
                // kiln's VM and helpers die with it (PR_SET_PDEATHSIG).
                let _ = kill_process(pid, Signal::KILL);
                let _ = rx.recv();
                return Err(format!("kiln did not end within {RUN_TIMEOUT:?}; killed"));
            }
        };
        Ok((took, out.map_err(|e| format!("waiting for kiln: {e}"))?))
    }

    /// Processes other than this one that belong to the soak: kiln, QEMU,
    /// virtiofsd or kiln-vmm with the soak's TMPDIR in their environment,
    /// or its directory on their command line.
    fn processes(&self) -> Vec<String> {
        let me = std::process::id().to_string();
        let tmpdir = [
            b"TMPDIR=".as_slice(),
            self.tmp.as_os_str().as_encoded_bytes(),
        ]
        .concat();
        let root = self.root.as_os_str().as_encoded_bytes();
        let mut found = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return found;
        };
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let read = |f: &str| std::fs::read(p.path().join(f)).unwrap_or_default();
            let (environ, cmdline) = (read("environ"), read("cmdline"));
            let ours = environ
                .split(|&b| b == 0)
                .any(|var| var == tmpdir.as_slice())
                || cmdline.windows(root.len()).any(|w| w == root);
            if ours {
                let cmd: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let cmd = cmd.join(" ").replace('\n', " ");
                found.push(format!(
                    "{pid} {}",
                    cmd.chars().take(160).collect::<String>()
                ));
            }
        }
        found
    }
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Every path under `dir`, recursively.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path.clone());
            }
            all.push(path);
        }
    }
    all
}

fn main() {
    // `cargo bench` adds `--bench`; the numbers are ours.
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let in_a_row = counts.first().copied().unwrap_or(200);
    let concurrent = counts.get(1).copied().unwrap_or(50);
    let at_once = counts.get(2).copied().unwrap_or(4).max(1);

    let root = tempfile::Builder::new()
        .prefix("kiln-soak-")
        .tempdir()
        .unwrap_or_else(|e| fail(&e.to_string()))
        .keep();
    let soak = Soak {
        tmp: root.join("tmp"),
        disks: root.join("disks"),
        root,
        // An ordinary user's PATH lacks the sbin directories.
        debugfs: which::which_also_in("debugfs", &["/usr/sbin".into(), "/sbin".into()]),
    };
    for d in [&soak.tmp, &soak.disks] {
        std::fs::create_dir(d).unwrap_or_else(|e| fail(&e.to_string()));
    }
    if soak.debugfs.is_none() {
        eprintln!("soak bench: no debugfs (e2fsprogs): checking whole-disk hashes only");
    }
    let fds_before = fd_count();

    // One untimed run, which also says which backend kiln uses.
    let backend = match soak.run(usize::MAX) {
        Ok((_, note)) if note.contains("TCG") => "QEMU TCG",
        Ok(_) => "KVM",
        Err(e) => fail(&format!("the first run failed: {e}")),
    };

    let mut failures = Vec::new();
    let mut row_times = Vec::with_capacity(in_a_row);
    let row_start = Instant::now();
    for n in 0..in_a_row {
        match soak.run(n) {
            Ok((took, _)) => row_times.push(took),
            Err(e) => failures.push(e),
        }
        eprint!("\rin a row: {}/{in_a_row}", n + 1);
    }
    let row_total = row_start.elapsed();
    let row_failures = failures.len();
    eprintln!();

    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::with_capacity(concurrent));
    let par_start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..at_once {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= concurrent {
                    return;
                }
                let r = soak.run(in_a_row + i);
                let mut results = results.lock().expect("results lock");
                results.push(r);
                eprint!("\r{at_once} at a time: {}/{concurrent}", results.len());
            });
        }
    });
    let par_total = par_start.elapsed();
    eprintln!();
    let mut par_times = Vec::with_capacity(concurrent);
    for r in results.into_inner().expect("results lock") {
        match r {
            Ok((took, _)) => par_times.push(took),
            Err(e) => failures.push(e),
        }
    }
    let par_failures = failures.len() - row_failures;

    // kiln waits for its VM and helpers before it exits, so nothing should
    // be left; give a straggler a moment before calling it a leak.
    let procs = poll_until(
        Instant::now() + Duration::from_secs(2),
        Duration::from_millis(100),
        || {
            let procs = soak.processes();
            procs.is_empty().then_some(procs)
        },
    )
    .unwrap_or_else(|| soak.processes());
    let fds_after = fd_count();
    let left = tree(&soak.tmp);
    let locks: Vec<PathBuf> = tree(&soak.root)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".lock"))
        .collect();

    println!(
        "soak ({backend}): {in_a_row} runs in a row, then {concurrent} runs {at_once} at a time; \
         each writes and verifies a 16 MiB disk"
    );
    println!(
        "  in a row: {} runs, {row_failures} failures, total {:.1} s",
        in_a_row,
        row_total.as_secs_f64()
    );
    if !row_times.is_empty() {
        figures::report("  in a row, per run:", &mut row_times);
    }
    println!(
        "  {at_once} at a time: {} runs, {par_failures} failures, total {:.1} s ({:.2} s per run)",
        concurrent,
        par_total.as_secs_f64(),
        par_total.as_secs_f64() / concurrent.max(1) as f64
    );
    if !par_times.is_empty() {
        figures::report(&format!("  {at_once} at a time, per run:"), &mut par_times);
    }
    println!(
        "  leaks: {} processes, fds {fds_before} before / {fds_after} after, \
         {} entries left in TMPDIR, {} lock files",
        procs.len(),
        left.len(),
        locks.len()
    );
    for f in failures.iter().take(5) {
        println!("  failure: {f}");
    }
    for p in procs.iter().take(5) {
        println!("  process left: {p}");
    }
    for p in left.iter().chain(&locks).take(10) {
        println!("  left: {}", p.display());
    }
    let clean = failures.is_empty()
        && procs.is_empty()
        && fds_after == fds_before
        && left.is_empty()
        && locks.is_empty();
    if clean {
        let _ = std::fs::remove_dir_all(&soak.root);
    } else {
        println!("  kept for a look: {}", soak.root.display());
        std::process::exit(1);
    }
}
