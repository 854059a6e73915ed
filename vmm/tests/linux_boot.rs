//! Boots kiln's guest kernel under kiln-vmm and checks what comes out of
//! our serial device. On a PVM host (this machine class) an unmodified
//! kernel stops in early boot, so only the banner and the command line are
//! asserted there; where KVM runs unmodified guests the kernel must get all
//! the way to looking for its root filesystem. The agent handshake and
//! `kiln run --backend kvm -- true` need the `kiln` binary, so they are
//! checked by the root crate's `kvm_backend_runs_true_where_kvm_is_usable`
//! (tests/run.rs), which likewise decides from the host and says which it ran.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_vmm::host::{probe, KvmSupport};
use kiln_vmm::vstate::machine::Machine;

#[derive(Clone, Default)]
struct SharedLog(Arc<Mutex<Vec<u8>>>);

impl Write for SharedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// kiln's cached guest kernel (built by `kiln kernel build`), or $KILN_KERNEL.
fn kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("KILN_KERNEL") {
        return PathBuf::from(k);
    }
    let cache = std::env::var_os("KILN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kiln")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))
        .expect("no cache directory (set HOME)");
    let mut built: Vec<_> = std::fs::read_dir(cache.join("kernel"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .collect();
    built.sort_by_key(|p| p.metadata().and_then(|m| m.modified()).ok());
    built
        .pop()
        .expect("no guest kernel in kiln's cache: run 'kiln kernel build' (or set KILN_KERNEL)")
}

fn wait_for(log: &SharedLog, needle: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if log.text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn the_bundled_kernel_prints_its_banner_through_our_serial_device() {
    let support = probe(
        std::path::Path::new("/dev/kvm"),
        std::path::Path::new("/sys/module"),
    );
    if matches!(
        support,
        KvmSupport::Missing | KvmSupport::NoPermission { .. }
    ) {
        eprintln!("no usable /dev/kvm here; skipping");
        return;
    }
    let kernel = kernel();
    let log = SharedLog::default();
    let console = log.clone();
    const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 kiln.test=banner";
    // The vCPU runs on its own thread; the test ends once it has seen what
    // it needs (the thread goes with the test process).
    let runner = std::thread::spawn(move || {
        let mut m = Machine::new(256 << 20, console).expect("machine");
        let mut f = std::fs::File::open(&kernel).expect("open kernel");
        m.load_linux(&mut f, None, CMDLINE).expect("load kernel");
        m.run()
    });

    let limit = Duration::from_secs(120);
    let banner = wait_for(&log, "Linux version 6.1", limit);
    let cmdline = wait_for(
        &log,
        &format!("Command line: {CMDLINE}"),
        Duration::from_secs(30),
    );
    let out = log.text();
    let tail: String = out
        .lines()
        .rev()
        .take(15)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        banner,
        "no kernel banner on the serial port; got:\n{tail}\n(vCPU thread finished: {})",
        runner.is_finished()
    );
    assert!(cmdline, "no command line echoed; got:\n{tail}");

    match support {
        KvmSupport::Usable => {
            eprintln!("KVM runs unmodified guests here: checking the kernel boots through");
            assert!(
                wait_for(&log, "Unable to mount root fs", limit),
                "the kernel did not get to mounting its root; last lines:\n{}",
                log.text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
            );
        }
        other => eprintln!(
            "KVM here cannot run unmodified guests ({other:?}): asserted the banner and command line only"
        ),
    }
}
