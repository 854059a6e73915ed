//! `kiln run` end to end, driven the way users drive it: the real binary,
//! the real kernel and tools image from the cache, real hypervisors.
//!
//! The behaviour cases (listed in [`both_backends!`]) run once per backend:
//! `qemu::NAME` with QEMU on this host (TCG here), and `kvm::NAME` with
//! kiln-vmm, seccomp on. The kvm cases run inside a nested-KVM guest
//! (tests/support/nested.rs): the host test boots L1 and runs this very
//! test binary there, filtered to the one case, which then drives kiln in
//! L1 exactly as the qemu case drives it here.
//!
//! Every run goes through [`Kiln::run`], which also checks that kiln left no
//! temp files and no processes behind.

#[path = "support/examples.rs"]
mod examples;
#[path = "support/leftovers.rs"]
mod leftovers;
#[path = "support/nested.rs"]
mod nested;
#[path = "support/tmux.rs"]
mod tmux;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln_agent::poll::poll_until;
use rustix::process::{geteuid, kill_process, Pid, Signal};
use sha2::{Digest, Sha256};

use examples::copy_example;
use leftovers::{processes_left_after, processes_mentioning};
use tmux::Tmux;

/// Set inside L1: this process is the nested half of a `kvm::` case.
const NESTED_ENV: &str = "KILN_TEST_NESTED";
/// Inside L1, where the kiln under test is.
const KILN_ENV: &str = "KILN_TEST_KILN";

/// The hypervisor a case runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// Whatever kiln picks (cases about picking, and kiln's other commands).
    Auto,
    Qemu,
    Kvm,
}

impl Backend {
    fn flag(self) -> Option<&'static str> {
        match self {
            Backend::Auto => None,
            Backend::Qemu => Some("qemu"),
            Backend::Kvm => Some("kvm"),
        }
    }
}

/// The kiln binary under test: cargo's, or inside L1 the copy the harness
/// put there.
fn kiln_exe() -> PathBuf {
    std::env::var_os(KILN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_kiln")))
}

/// Declares, for each case `fn NAME(k: &Kiln)`, the tests `qemu::NAME` and
/// `kvm::NAME`.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod qemu {
            $(
                #[test]
                fn $name() {
                    super::$name(&super::Kiln::new(super::Backend::Qemu));
                }
            )*
        }
        mod kvm {
            $(
                #[test]
                fn $name() {
                    super::on_kvm(concat!("kvm::", stringify!($name)), super::$name);
                }
            )*
        }
    };
}

/// Runs `case` with kiln-vmm. On the host: boots L1 and runs this test
/// binary there with `--exact NAME`; the case passes only if it ran there
/// and passed (a filter that matched nothing is a failure, not a pass).
fn on_kvm(name: &str, case: fn(&Kiln)) {
    if std::env::var_os(NESTED_ENV).is_some() {
        case(&Kiln::new(Backend::Kvm));
        return;
    }
    let tests = std::env::current_exe().expect("test binary");
    let inner = format!("{}/run-tests", nested::BIN);
    let mut l1 = nested::L1::new(&kiln_exe())
        .unwrap_or_else(|e| panic!("the nested-KVM harness cannot start L1: {e}"));
    if L1_NEEDS_NET.contains(&name) {
        l1 = l1
            .net()
            .unwrap_or_else(|e| panic!("L1 cannot have a network: {e}"));
    }
    let l1 = l1
        .copy_in(&tests, &inner)
        .env(NESTED_ENV, "1")
        .env(KILN_ENV, nested::KILN)
        .env("RUST_BACKTRACE", "1");
    let argv = [
        inner.as_str(),
        "--exact",
        name,
        "--test-threads=1",
        "--nocapture",
    ];
    let mut out = l1.run(&argv);
    // Under TCG, L1 has reset once in a CI run (the 100 MiB case, after
    // some hundreds of passing nested runs): no panic on its console, QEMU
    // exits as on a triple fault. That is the harness's machine failing,
    // not the case, so the case runs once more; but only once in a whole
    // run of this binary, so that a fault that recurs still fails.
    if l1_reset_itself(&out) && L1_RETRIES.fetch_add(1, Ordering::SeqCst) == 0 {
        // Straight to stderr, past the test harness's capture: the retry
        // shows in CI's log even when the case then passes.
        let _ = writeln!(
            std::io::stderr(),
            "{name}: L1 reset itself before the case ended; running it once more \
             (the only retry this run allows). kiln said:\n{}",
            text(&out.stderr)
        );
        out = l1.run(&argv);
    }
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} failed in the nested-KVM guest ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// How many kvm cases L1's reset made run again (at most one runs again).
static L1_RETRIES: AtomicUsize = AtomicUsize::new(0);

/// Whether L1 itself stopped under the case: the host's kiln said its VM
/// ended without the guest's clean power-off, and the test binary in L1
/// had not printed a result.
fn l1_reset_itself(out: &Output) -> bool {
    code(out) == 125
        && text(&out.stderr).contains("the VM stopped before the guest powered off cleanly")
        && !text(&out.stdout).contains("test result:")
}

both_backends!(
    true_exits_zero,
    exit_status_is_passed_through,
    killed_by_sigkill_gives_137,
    stdout_and_stderr_arrive_on_their_own_streams,
    hundred_mib_of_stdout_arrives_intact,
    env_and_workdir_apply,
    missing_workdir_is_a_clear_error,
    stdin_is_forwarded,
    command_not_found_gives_127,
    command_not_executable_gives_126,
    cpus_are_what_was_asked_for,
    raw_disk_is_partitioned_formatted_and_readable_on_the_host,
    qcow2_disk_works_the_same,
    read_only_disk_refuses_writes,
    timeout_gives_124_and_leaves_nothing_behind,
    ctrl_c_stops_everything_and_cleans_up,
    sigterm_stops_everything_and_cleans_up,
    a_sigkilled_run_is_cleaned_up_by_the_next_run,
    copy_in_and_out_keep_a_50_mib_file_intact,
    copy_out_of_a_missing_file_fails_and_writes_nothing,
    copy_out_drops_setuid_setgid_and_sticky_bits,
    keep_setuid_keeps_the_setuid_bit,
    a_directory_tree_goes_in_and_comes_back_whole,
    copy_out_never_writes_outside_the_destination,
    copy_out_of_a_tree_drops_setuid_unless_asked,
    copy_out_to_an_existing_directory_is_refused_and_leaves_nothing,
    copy_out_of_a_tree_keeps_owners_as_root,
    ctrl_c_during_a_tree_copy_out_leaves_nothing,
    shared_directory_is_readable_and_writable,
    read_only_share_refuses_writes,
    programs_run_from_a_share_run_the_host_bytes,
    a_killed_virtiofsd_ends_the_run_naming_the_share,
    running_out_of_memory_is_an_answer_not_a_hang,
    a_fork_bomb_is_stopped_by_the_guests_limits,
    disks_keep_their_order_and_by_id_names,
    a_block_device_is_attached_whole_with_device,
    missing_disk_is_reported,
    disk_in_use_by_another_kiln_is_refused,
    kvm_backend_runs_true_where_kvm_is_usable,
    guest_kernel_panic_is_reported_with_the_console,
    agent_not_connecting_in_time_is_reported,
    orphans_are_reaped,
    root_is_writable_and_the_clock_is_set,
    an_unprivileged_user_partitions_and_formats_a_disk,
    a_filesystem_left_mounted_is_unmounted_cleanly,
    a_closed_stdout_gives_the_command_sigpipe,
    the_guest_clock_needs_no_calibration,
    without_net_the_guest_has_no_network,
    net_gives_the_guest_dns_ipv4_and_ipv6,
);

/// The kvm cases whose L1 needs a network (and passt) of its own.
const L1_NEEDS_NET: &[&str] = &["kvm::net_gives_the_guest_dns_ipv4_and_ipv6"];

struct Kiln {
    tmp: tempfile::TempDir,
    backend: Backend,
}

impl Kiln {
    fn new(backend: Backend) -> Kiln {
        Kiln {
            tmp: tempfile::Builder::new()
                .prefix("kiln-test-")
                .tempdir()
                .expect("tempdir"),
            backend,
        }
    }

    /// kiln's TMPDIR for this test, where its runtime files go.
    fn runtime(&self) -> PathBuf {
        let p = self.tmp.path().join("runtime");
        fs::create_dir_all(&p).expect("mkdir runtime");
        p
    }

    /// A scratch directory for the test's own files.
    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// `args` with `--backend` after `run` unless the case chose one.
    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(b) = self.backend.flag() {
            if v.first().is_some_and(|a| a == "run") && !args.contains(&"--backend") {
                v.splice(1..1, ["--backend".to_string(), b.to_string()]);
            }
        }
        v
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kiln_exe());
        c.args(self.args(args))
            .env("TMPDIR", self.runtime())
            .stdin(Stdio::null())
            .current_dir(self.dir());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run kiln");
        self.assert_clean();
        out
    }

    /// Nothing of kiln's is left: no runtime files, no process using them.
    fn assert_clean(&self) {
        let runtime = self.runtime();
        let left: Vec<_> = fs::read_dir(&runtime)
            .expect("read runtime")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "kiln left files behind: {left:?}");
        let needle = runtime.to_string_lossy().into_owned();
        let procs = processes_mentioning(&needle);
        assert!(procs.is_empty(), "kiln left processes behind: {procs:?}");
    }
}

/// The first `n` bytes a running kiln prints on stdout (piped, as its
/// stderr). If it ends before, the test fails with what kiln said.
fn first_output(child: &mut std::process::Child, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    let stdout = child.stdout.as_mut().expect("stdout piped");
    if let Err(e) = stdout.read_exact(&mut buf) {
        let mut err = String::new();
        if let Some(stderr) = child.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut err);
        }
        let status = child.wait();
        panic!("kiln ended before printing {n} bytes ({e}; {status:?}):\n{err}");
    }
    buf
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn host(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        text(&out.stderr)
    );
    out
}

/// An empty (sparse) disk image of `size` bytes.
fn sparse_file(path: &Path, size: u64) {
    fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
}

fn random_file(path: &Path, size: usize) -> String {
    // xorshift: incompressible, deterministic, no dependency.
    let mut x: u64 = 0x2545F4914F6CDD1D ^ size as u64;
    let mut data = Vec::with_capacity(size);
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    fs::write(path, &data).expect("write random file");
    sha256(&data)
}

fn true_exits_zero(k: &Kiln) {
    let out = k.run(&["run", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

fn exit_status_is_passed_through(k: &Kiln) {
    let out = k.run(&["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
}

fn killed_by_sigkill_gives_137(k: &Kiln) {
    let out = k.run(&["run", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(code(&out), 137, "{}", text(&out.stderr));
}

fn stdout_and_stderr_arrive_on_their_own_streams(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; echo more-out",
    ]);
    assert_eq!(code(&out), 0);
    assert_eq!(text(&out.stdout), "to-out\nmore-out\n");
    let err = text(&out.stderr);
    assert!(err.contains("to-err\n"), "{err}");
    assert!(!err.contains("to-out"), "{err}");
}

fn hundred_mib_of_stdout_arrives_intact(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "head -c 104857600 /dev/urandom > /tmp/d && sha256sum /tmp/d >&2 && cat /tmp/d",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 100 << 20);
    let err = text(&out.stderr);
    let guest_sum = err
        .lines()
        .find(|l| l.ends_with("/tmp/d"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no checksum from the guest in: {err}"));
    assert_eq!(sha256(&out.stdout), guest_sum);
}

fn env_and_workdir_apply(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--env",
        "GREETING=hello world",
        "--env",
        "EMPTY=",
        "--workdir",
        "/usr/share",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|${EMPTY-unset}|$(pwd)|$HOME\"",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello world||/usr/share|/root\n");
}

fn missing_workdir_is_a_clear_error(k: &Kiln) {
    let out = k.run(&["run", "--workdir", "/no/such/dir", "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(
        text(&out.stderr).contains("/no/such/dir does not exist"),
        "{}",
        text(&out.stderr)
    );
}

fn stdin_is_forwarded(k: &Kiln) {
    let mut child = k
        .command(&["run", "--", "sh", "-c", "tr a-z A-Z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"quiet words\n").expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "QUIET WORDS\n");
}

fn command_not_found_gives_127(k: &Kiln) {
    let out = k.run(&["run", "--", "no-such-command", "arg"]);
    assert_eq!(code(&out), 127);
    assert!(
        text(&out.stderr).contains("no-such-command: command not found in the guest"),
        "{}",
        text(&out.stderr)
    );
}

fn command_not_executable_gives_126(k: &Kiln) {
    // No execute permission (EACCES).
    let out = k.run(&["run", "--", "/etc/passwd"]);
    assert_eq!(code(&out), 126, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot execute in the guest: /etc/passwd: Permission denied"),
        "{err}"
    );
    // Executable, but not a program (ENOEXEC), as sh reports it: 126.
    let junk = k.dir().join("junk");
    fs::write(&junk, [0x7f, b'E', b'L', b'X', 0, 1, 2, 3]).expect("write");
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = k.run(&[
        "run",
        "--copy-in",
        &format!("{}:/tmp/junk", junk.display()),
        "--",
        "/tmp/junk",
    ]);
    assert_eq!(code(&out), 126, "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("/tmp/junk: Exec format error"), "{err}");
}

fn cpus_are_what_was_asked_for(k: &Kiln) {
    for n in ["2", "4"] {
        let out = k.run(&["run", "--cpus", n, "--", "nproc"]);
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), n);
    }
}

/// Partition and format a disk inside the VM, then check it from the host
/// without root.
fn partition_and_format(k: &Kiln, disk_arg: &str) {
    let script = "set -e
        sgdisk -n1:0:+24M -t1:8300 -c1:root -n2:0:0 -t2:ef00 -c2:esp /dev/vda >/dev/null
        mkfs.ext4 -q -L root /dev/vda1
        mkfs.vfat -n ESP /dev/vda2 >/dev/null
        mount /dev/vda1 /mnt
        echo 'written in the guest' > /mnt/hello.txt
        umount /mnt
        mount /dev/vda2 /mnt
        echo 'efi side' > /mnt/EFI.TXT
        umount /mnt
        test -e /dev/disk/by-id/virtio-kiln0-part1";
    let out = k.run(&["run", "--disk", disk_arg, "--", "sh", "-c", script]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
}

fn verify_disk_on_host(raw: &Path) {
    let raw = raw.to_str().expect("utf8");
    let table = text(&host("sgdisk", &["-p", raw]).stdout);
    assert!(table.contains("8300") && table.contains("root"), "{table}");
    assert!(table.contains("EF00") && table.contains("esp"), "{table}");
    // Partition 1 starts at sector 2048; partition 2 right after its 24 MiB.
    let p1 = 2048 * 512;
    let p2 = p1 + (24 << 20);
    let cat = host(
        "debugfs",
        &["-R", "cat /hello.txt", &format!("{raw}?offset={p1}")],
    );
    assert_eq!(text(&cat.stdout), "written in the guest\n");
    // The guest's mkfs.ext4 (the tools image's backported e2fsprogs) makes
    // bookworm's features: none that older grub and e2fsck cannot read.
    let header = host(
        "debugfs",
        &["-R", "features", &format!("{raw}?offset={p1}")],
    );
    let features = text(&header.stdout);
    assert!(features.contains("metadata_csum"), "{features}");
    assert!(
        !features.contains("orphan_file") && !features.contains("metadata_csum_seed"),
        "{features}"
    );
    let efi = host("mtype", &["-i", &format!("{raw}@@{p2}"), "::EFI.TXT"]);
    assert_eq!(text(&efi.stdout).replace('\r', ""), "efi side\n");
}

fn raw_disk_is_partitioned_formatted_and_readable_on_the_host(k: &Kiln) {
    let disk = k.dir().join("disk.img");
    sparse_file(&disk, 64 << 20);
    partition_and_format(k, disk.to_str().expect("utf8"));
    verify_disk_on_host(&disk);
}

fn qcow2_disk_works_the_same(k: &Kiln) {
    let disk = k.dir().join("disk.qcow2");
    let disk_s = disk.to_str().expect("utf8");
    if k.backend == Backend::Kvm {
        // kiln-vmm takes raw disks only (auto picks QEMU for qcow2): an
        // explicit kvm backend refuses the disk, naming the conversion.
        fs::write(&disk, b"QFI\xfb\0\0\0\x03").expect("write");
        let out = k.run(&["run", "--disk", disk_s, "--", "true"]);
        assert_eq!(code(&out), 125, "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("is a qcow2 image"), "{err}");
        assert!(err.contains("qemu-img convert -O raw"), "{err}");
        return;
    }
    host("qemu-img", &["create", "-q", "-f", "qcow2", disk_s, "64M"]);
    partition_and_format(k, &format!("{disk_s},format=qcow2"));
    let raw = k.dir().join("converted.raw");
    host(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            disk_s,
            raw.to_str().expect("utf8"),
        ],
    );
    verify_disk_on_host(&raw);
}

fn read_only_disk_refuses_writes(k: &Kiln) {
    let disk = k.dir().join("ro.img");
    random_file(&disk, 4 << 20);
    let before = fs::read(&disk).expect("read");
    let out = k.run(&[
        "run",
        "--disk",
        &format!("{},ro", disk.display()),
        "--",
        "sh",
        "-c",
        "head -c 4096 /dev/vda | sha256sum; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync",
    ]);
    assert_ne!(code(&out), 0, "the write to a read-only disk succeeded");
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout).split_whitespace().next(),
        Some(sha256(&before[..4096]).as_str()),
        "the guest could not read the disk"
    );
    assert_eq!(
        fs::read(&disk).expect("read"),
        before,
        "the read-only disk changed"
    );
}

fn timeout_gives_124_and_leaves_nothing_behind(k: &Kiln) {
    let start = Instant::now();
    let out = k.run(&["run", "--timeout", "3", "--", "sleep", "600"]);
    assert_eq!(code(&out), 124, "{}", text(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(
        text(&out.stderr).contains("timed out after 3 s"),
        "{}",
        text(&out.stderr)
    );
}

fn ctrl_c_stops_everything_and_cleans_up(k: &Kiln) {
    interrupted_run_cleans_up(k, Signal::INT);
}

fn sigterm_stops_everything_and_cleans_up(k: &Kiln) {
    interrupted_run_cleans_up(k, Signal::TERM);
}

/// `signal` while the command runs: exit 130, the VM and helpers stopped,
/// temp files gone.
fn interrupted_run_cleans_up(k: &Kiln, signal: Signal) {
    let mut child = k
        .command(&["run", "--", "sh", "-c", "echo started; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the command runs in the guest, then interrupt kiln.
    let first = first_output(&mut child, 8);
    assert_eq!(&first, b"started\n");
    kill_process(Pid::from_child(&child), signal).expect("kill kiln");
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
}

/// `kill -9` of kiln mid-run: its helpers (the hypervisor, virtiofsd) die
/// with it, and its runtime directory, which it could not remove, is
/// removed by the next kiln.
fn a_sigkilled_run_is_cleaned_up_by_the_next_run(k: &Kiln) {
    let shared = k.dir().join("shared");
    fs::create_dir(&shared).expect("mkdir shared");
    let share = format!("{}:/mnt/shared", shared.display());
    let mut child = k
        .command(&[
            "run",
            "--share",
            &share,
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 30",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Once the command runs, the runtime directory and every helper exist.
    let first = first_output(&mut child, 8);
    assert_eq!(&first, b"started\n");
    let runtime = k.runtime();
    let needle = runtime.to_string_lossy().into_owned();
    let dirs: Vec<PathBuf> = fs::read_dir(&runtime)
        .expect("read runtime")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("kiln-run-"))
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1, "one runtime directory: {dirs:?}");
    let dir = &dirs[0];
    // The hypervisor, and virtiofsd where the backend shares through it.
    let kiln_pid = format!("{}: ", child.id());
    let helpers: Vec<String> = processes_mentioning(&needle)
        .into_iter()
        .filter(|p| !p.starts_with(&kiln_pid))
        .collect();
    assert!(!helpers.is_empty(), "no helper process of kiln's is seen");

    kill_process(Pid::from_child(&child), Signal::KILL).expect("kill kiln");
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(Signal::KILL.as_raw())
    );
    let procs = processes_left_after(&needle, Duration::from_secs(10));
    assert!(procs.is_empty(), "helpers outlived kiln: {procs:?}");
    // Nothing could remove it so far: what follows is the sweep's doing.
    assert!(
        dir.join("owner.lock").is_file(),
        "the killed kiln's runtime directory is already gone"
    );

    // Checks, as every run does, that nothing is left in TMPDIR.
    let out = k.run(&["run", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(!dir.exists(), "{} was not swept", dir.display());
}

fn copy_in_and_out_keep_a_50_mib_file_intact(k: &Kiln) {
    let input = k.dir().join("in.bin");
    let sum = random_file(&input, 50 << 20);
    let output = k.dir().join("out.bin");
    let out = k.run(&[
        "run",
        "--copy-in",
        &format!("{}:/tmp/in.bin", input.display()),
        "--copy-out",
        &format!("/tmp/out.bin:{}", output.display()),
        "--",
        "sh",
        "-c",
        "sha256sum /tmp/in.bin && cp -p /tmp/in.bin /tmp/out.bin",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&sum),
        "guest saw {}",
        text(&out.stdout)
    );
    assert_eq!(sha256(&fs::read(&output).expect("read out")), sum);
}

fn copy_out_of_a_missing_file_fails_and_writes_nothing(k: &Kiln) {
    let output = k.dir().join("never.bin");
    let out = k.run(&[
        "run",
        "--copy-out",
        &format!("/tmp/missing:{}", output.display()),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 125);
    assert!(
        text(&out.stderr).contains("/tmp/missing"),
        "{}",
        text(&out.stderr)
    );
    assert!(!output.exists());
    let stray: Vec<_> = fs::read_dir(k.dir())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".kiln"))
        .collect();
    assert!(stray.is_empty(), "partial copy-out left behind");
}

/// The mode bits (permissions and special bits) of a host file.
fn mode_of(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn copy_out_drops_setuid_setgid_and_sticky_bits(k: &Kiln) {
    use std::os::unix::fs::MetadataExt;
    let (u, g, t) = (k.dir().join("u"), k.dir().join("g"), k.dir().join("t"));
    let out = k.run(&[
        "run",
        "--copy-out",
        &format!("/tmp/u:{}", u.display()),
        "--copy-out",
        &format!("/tmp/g:{}", g.display()),
        "--copy-out",
        &format!("/tmp/t:{}", t.display()),
        "--",
        "sh",
        "-c",
        "cp /bin/sh /tmp/u && chmod 4755 /tmp/u && cp /bin/sh /tmp/g && chmod 2755 /tmp/g \
         && echo t > /tmp/t && chmod 1777 /tmp/t",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(mode_of(&u), 0o755, "setuid kept");
    assert_eq!(mode_of(&g), 0o755, "setgid kept");
    assert_eq!(mode_of(&t), 0o777, "sticky kept");
    let euid = geteuid().as_raw();
    for p in [&u, &g, &t] {
        let uid = fs::metadata(p).expect("stat").uid();
        assert_eq!(uid, euid, "{} is not the invoking user's", p.display());
    }
}

fn keep_setuid_keeps_the_setuid_bit(k: &Kiln) {
    let u = k.dir().join("u");
    let out = k.run(&[
        "run",
        "--keep-setuid",
        "--copy-out",
        &format!("/tmp/u:{}", u.display()),
        "--",
        "sh",
        "-c",
        "cp /bin/sh /tmp/u && chmod 4755 /tmp/u",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(mode_of(&u), 0o4755);
}

/// Ctrl-C while a tree is coming back: kiln stops, and neither the
/// destination nor its staging directory is left.
fn ctrl_c_during_a_tree_copy_out_leaves_nothing(k: &Kiln) {
    let out_dir = k.dir().join("out");
    let mut child = k
        .command(&[
            "run",
            "--copy-out",
            &format!("/tmp/t:{}", out_dir.display()),
            "--",
            "sh",
            "-c",
            // 400 MiB: seconds of streaming even under nested KVM.
            "mkdir /tmp/t && for i in $(seq 40); do head -c 10M /dev/zero > /tmp/t/f$i; done",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let staging = poll_until(
        Instant::now() + Duration::from_secs(300),
        Duration::from_millis(5),
        || {
            let seen = names_in(k.dir())
                .into_iter()
                .any(|n| n.starts_with(".kiln-copy-out-"));
            let ended = matches!(child.try_wait(), Ok(Some(_)));
            (seen || ended).then_some(seen)
        },
    );
    assert_eq!(staging, Some(true), "no copy-out was seen in progress");
    kill_process(Pid::from_child(&child), Signal::INT).expect("interrupt kiln");
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(!out_dir.exists(), "the destination appeared");
    let stray: Vec<_> = names_in(k.dir())
        .into_iter()
        .filter(|n| n.starts_with(".kiln"))
        .collect();
    assert!(stray.is_empty(), "copy-out left {stray:?}");
}

/// The xattr the tree case sets, where it can: `trusted.*`, which needs
/// root on the host, because the guest's tmpfs (Linux 6.1) keeps only the
/// `trusted.*` and `security.*` namespaces, not `user.*`.
const TREE_XATTR: (&str, &[u8]) = ("trusted.kiln", b"kiln-xattr-value");

/// One entry of a tree, as compared after a round trip.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
        owner: (u32, u32),
    },
    File {
        mode: u32,
        owner: (u32, u32),
        sha: String,
    },
    Link {
        target: PathBuf,
        owner: (u32, u32),
    },
}

/// Every entry under `root`, by relative path, never following a symlink.
fn tree_entries(root: &Path) -> std::collections::BTreeMap<PathBuf, Entry> {
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let owner = (meta.uid(), meta.gid());
        let mode = meta.mode() & 0o7777;
        let entry = if meta.is_symlink() {
            Entry::Link {
                target: fs::read_link(&path).expect("readlink"),
                owner,
            }
        } else if meta.is_dir() {
            for e in fs::read_dir(&path).expect("read_dir") {
                todo.push(rel.join(e.expect("entry").file_name()));
            }
            Entry::Dir { mode, owner }
        } else {
            assert!(meta.is_file(), "{} is not a file", path.display());
            Entry::File {
                mode,
                owner,
                sha: sha256(&fs::read(&path).expect("read")),
            }
        };
        out.insert(rel, entry);
    }
    out
}

fn a_directory_tree_goes_in_and_comes_back_whole(k: &Kiln) {
    use std::os::unix::fs::{symlink, MetadataExt};
    let tree = k.dir().join("tree");
    // 10,000 small files in 100 directories of 10 groups.
    for d in 0..100 {
        let dir = tree.join(format!("n/g{}/d{d:02}", d / 10));
        fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..100 {
            fs::write(dir.join(format!("f{f:02}")), format!("{d}/{f}\n")).expect("write");
        }
    }
    fs::write(tree.join("file"), "the chain's end\n").expect("write");
    fs::write(tree.join("mode640"), "x").expect("write");
    fs::set_permissions(tree.join("mode640"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::create_dir(tree.join("empty")).expect("mkdir");
    symlink("l2", tree.join("l1")).expect("symlink");
    symlink("file", tree.join("l2")).expect("symlink");
    symlink("../../../l1", tree.join("n/g3/d35/chain")).expect("symlink");
    symlink("d35", tree.join("n/g3/sibling")).expect("symlink");
    symlink("/etc", tree.join("etc")).expect("symlink");
    symlink("does/not/exist", tree.join("dangling")).expect("symlink");
    fs::write(tree.join("hard1"), "linked\n").expect("write");
    fs::hard_link(tree.join("hard1"), tree.join("hard2")).expect("link");
    // 64 MiB with a little data in the middle.
    let sparse = tree.join("sparse");
    sparse_file(&sparse, 64 << 20);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&sparse)
            .expect("open");
        f.seek(SeekFrom::Start(32 << 20)).expect("seek");
        f.write_all(b"kiln sparse data").expect("write");
    }
    let sparse_sum = sha256(&fs::read(&sparse).expect("read"));
    let xattr = geteuid().is_root()
        && rustix::fs::setxattr(
            tree.join("mode640"),
            TREE_XATTR.0,
            TREE_XATTR.1,
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
    if !xattr {
        eprintln!(
            "not root, or {} cannot be set here: no xattr in this run",
            TREE_XATTR.0
        );
    }

    let out_dir = k.dir().join("out");
    let check = format!(
        "cd /tmp/t && echo files $(find . -type f | wc -l) && \
         echo links $(readlink l1 l2 n/g3/d35/chain n/g3/sibling etc dangling) && \
         [ -L etc ] && [ -d etc/ ] && echo etc-is-a-link && \
         [ $(stat -c %i hard1) = $(stat -c %i hard2) ] && echo hard $(stat -c %h hard1) && \
         echo sparse $(stat -c %s sparse) $(du -k sparse | cut -f1) && \
         echo mode $(stat -c %a mode640) && [ -d empty ] && echo empty && \
         echo xattr $(tar -c --xattrs --xattrs-include='*' -f - mode640 | grep -a -c 'SCHILY.xattr.{}={}')",
        TREE_XATTR.0,
        String::from_utf8_lossy(TREE_XATTR.1)
    );
    let out = k.run(&[
        "run",
        "--copy-in",
        &format!("{}:/tmp/t", tree.display()),
        "--copy-out",
        &format!("/tmp/t:{}", out_dir.display()),
        "--",
        "sh",
        "-c",
        &check,
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let sparse_kib: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("sparse 67108864 "))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sparse line: {stdout}"));
    assert_eq!(
        lines,
        [
            "files 10005",
            "links l2 file ../../../l1 d35 /etc does/not/exist",
            "etc-is-a-link",
            "hard 2",
            &format!("sparse 67108864 {sparse_kib}"),
            "mode 640",
            "empty",
            if xattr { "xattr 1" } else { "xattr 0" },
        ],
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        sparse_kib < 1024,
        "the sparse file takes {sparse_kib} KiB in the guest"
    );

    // Back on the host: the same tree, entry by entry.
    let (before, after) = (tree_entries(&tree), tree_entries(&out_dir));
    assert_eq!(before.len(), after.len());
    for (path, entry) in &before {
        assert_eq!(after.get(path), Some(entry), "{}", path.display());
    }
    let etc = fs::symlink_metadata(out_dir.join("etc")).expect("lstat");
    assert!(etc.is_symlink(), "etc came back as a copy of /etc");
    let (h1, h2) = (
        fs::metadata(out_dir.join("hard1")).expect("stat"),
        fs::metadata(out_dir.join("hard2")).expect("stat"),
    );
    assert_eq!(
        (h1.ino(), h1.nlink()),
        (h2.ino(), 2),
        "the hard link is gone"
    );
    let s = fs::metadata(out_dir.join("sparse")).expect("stat");
    assert_eq!(
        sha256(&fs::read(out_dir.join("sparse")).expect("read")),
        sparse_sum
    );
    assert!(
        s.blocks() * 512 < 1 << 20,
        "the sparse file takes {} bytes on the host",
        s.blocks() * 512
    );
    if xattr {
        let mut buf = [0u8; 64];
        let n = rustix::fs::getxattr(out_dir.join("mode640"), TREE_XATTR.0, &mut buf[..])
            .expect("the xattr came back");
        assert_eq!(&buf[..n], TREE_XATTR.1);
    }
    let stray: Vec<_> = fs::read_dir(k.dir())
        .expect("ls")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".kiln"))
        .collect();
    assert!(stray.is_empty(), "copy-out left {stray:?}");
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn copy_out_never_writes_outside_the_destination(k: &Kiln) {
    // A host path outside the destination, which the guest's links name.
    let escape = k.dir().join("escape");
    let out_dir = k.dir().join("out");
    // kiln's TMPDIR is in there too.
    k.runtime();
    let before = names_in(k.dir());
    let script = format!(
        "mkdir -p /tmp/t/d /tmp/t/sub/deeper {esc} && echo inside > /tmp/t/d/f && \
         ln -s {esc} /tmp/t/esc && echo guest-side > /tmp/t/esc/x && \
         ln -s / /tmp/t/link && ln -s .. /tmp/t/up && ln -s ../../.. /tmp/t/sub/deeper/out && \
         ln -s {esc}/x /tmp/t/d/to-x",
        esc = escape.display()
    );
    let out = k.run(&[
        "run",
        "--copy-out",
        &format!("/tmp/t:{}", out_dir.display()),
        "--",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(
        !escape.exists() && fs::symlink_metadata(&escape).is_err(),
        "{} was written",
        escape.display()
    );
    let mut after = names_in(k.dir());
    after.retain(|n| n != "out");
    assert_eq!(after, before, "copy-out wrote beside its destination");
    for (name, target) in [
        ("link", PathBuf::from("/")),
        ("esc", escape.clone()),
        ("up", PathBuf::from("..")),
        ("sub/deeper/out", PathBuf::from("../../..")),
        ("d/to-x", escape.join("x")),
    ] {
        let p = out_dir.join(name);
        let meta = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(meta.is_symlink(), "{name} is not a symlink");
        assert_eq!(fs::read_link(&p).expect("readlink"), target);
    }
    assert_eq!(
        fs::read_to_string(out_dir.join("d/f")).expect("read"),
        "inside\n"
    );
    assert_eq!(names_in(&out_dir), ["d", "esc", "link", "sub", "up"]);
}

/// A guest tree with a setuid program, a setgid directory and a sticky one.
const SETUID_TREE: &str = "mkdir -p /tmp/t/sg /tmp/t/tmp && cp /bin/true /tmp/t/sg/u && \
     chmod 4755 /tmp/t/sg/u && chmod 2755 /tmp/t/sg && chmod 1777 /tmp/t/tmp";

fn copy_out_of_a_tree_drops_setuid_unless_asked(k: &Kiln) {
    for (keep, modes) in [
        (false, [0o755, 0o755, 0o777]),
        (true, [0o4755, 0o2755, 0o1777]),
    ] {
        let out_dir = k.dir().join(format!("out-{keep}"));
        let spec = format!("/tmp/t:{}", out_dir.display());
        let mut args = vec!["run", "--copy-out", &spec];
        if keep {
            args.push("--keep-setuid");
        }
        args.extend(["--", "sh", "-c", SETUID_TREE]);
        let out = k.run(&args);
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
        let got = [
            mode_of(&out_dir.join("sg/u")),
            mode_of(&out_dir.join("sg")),
            mode_of(&out_dir.join("tmp")),
        ];
        assert_eq!(got, modes, "--keep-setuid {keep}");
    }
}

fn copy_out_to_an_existing_directory_is_refused_and_leaves_nothing(k: &Kiln) {
    // An existing directory: refused before the VM starts.
    let out_dir = k.dir().join("out");
    fs::create_dir(&out_dir).expect("mkdir");
    fs::write(out_dir.join("mine"), "mine").expect("write");
    let spec = format!("/tmp/t:{}", out_dir.display());
    let make_tree = "mkdir /tmp/t && echo guest > /tmp/t/f";
    let started = Instant::now();
    let out = k.run(&["run", "--copy-out", &spec, "--", "sh", "-c", make_tree]);
    assert_eq!(code(&out), 125, "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a VM was started"
    );
    let want = format!(
        "{} exists; kiln copies a guest directory to a new path",
        out_dir.display()
    );
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    assert_eq!(names_in(&out_dir), ["mine"]);
    assert_eq!(
        fs::read_to_string(out_dir.join("mine")).expect("read"),
        "mine"
    );

    // An existing file, found to be in the way once the guest sends a
    // directory: refused, the file kept, nothing left beside it.
    let out_file = k.dir().join("file");
    fs::write(&out_file, "mine").expect("write");
    let spec = format!("/tmp/t:{}", out_file.display());
    let out = k.run(&["run", "--copy-out", &spec, "--", "sh", "-c", make_tree]);
    assert_eq!(code(&out), 125, "{}", text(&out.stderr));
    let want = format!(
        "{} exists; kiln copies a guest directory to a new path",
        out_file.display()
    );
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    assert_eq!(fs::read_to_string(&out_file).expect("read"), "mine");
    let stray: Vec<_> = names_in(k.dir())
        .into_iter()
        .filter(|n| n.starts_with(".kiln"))
        .collect();
    assert!(stray.is_empty(), "copy-out left {stray:?}");
}

/// Owners come back only when kiln runs as root; otherwise the files are
/// the invoking user's (the other tree cases check that they match).
fn copy_out_of_a_tree_keeps_owners_as_root(k: &Kiln) {
    use std::os::unix::fs::MetadataExt;
    if !geteuid().is_root() {
        return;
    }
    let out_dir = k.dir().join("out");
    let out = k.run(&[
        "run",
        "--copy-out",
        &format!("/tmp/t:{}", out_dir.display()),
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/t/d && echo x > /tmp/t/d/f && chown 1234:5678 /tmp/t/d/f && \
         chown 42:43 /tmp/t/d && ln -s f /tmp/t/d/l && chown -h 7:8 /tmp/t/d/l",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let owner = |p: &str| {
        let m = fs::symlink_metadata(out_dir.join(p)).expect("lstat");
        (m.uid(), m.gid())
    };
    assert_eq!(owner("d/f"), (1234, 5678));
    assert_eq!(owner("d"), (42, 43));
    assert_eq!(owner("d/l"), (7, 8));
}

fn shared_directory_is_readable_and_writable(k: &Kiln) {
    let share = k.dir().join("share");
    fs::create_dir_all(&share).expect("mkdir");
    fs::write(share.join("from-host.txt"), "host says hi\n").expect("write");
    let out = k.run(&[
        "run",
        "--share",
        &format!("{}:/mnt/work", share.display()),
        "--",
        "sh",
        "-c",
        "cat /mnt/work/from-host.txt && echo 'guest says hi' > /mnt/work/from-guest.txt",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "host says hi\n");
    assert_eq!(
        fs::read_to_string(share.join("from-guest.txt")).expect("read"),
        "guest says hi\n"
    );
}

fn read_only_share_refuses_writes(k: &Kiln) {
    let share = k.dir().join("share");
    fs::create_dir_all(&share).expect("mkdir");
    fs::write(share.join("f"), "x").expect("write");
    let out = k.run(&[
        "run",
        "--share",
        &format!("{}:/mnt/ro:ro", share.display()),
        "--",
        "sh",
        "-c",
        "cat /mnt/ro/f && touch /mnt/ro/new",
    ]);
    assert_ne!(code(&out), 0);
    assert_eq!(text(&out.stdout), "x");
    assert!(!share.join("new").exists());
}

/// The script `programs_run_from_a_share_run_the_host_bytes` runs: 50
/// executions each of a static program (ldconfig, static-pie in Debian)
/// and a dynamic one (sha256sum) from the share, then the data file read
/// through mmap(2) (perl-base's syscall, as the tools image has no other
/// mmap reader; 9 = SYS_mmap, PROT_READ, MAP_PRIVATE) and summed.
const SHARE_EXEC_SCRIPT: &str = r#"
reference=$(/sbin/ldconfig -p | sha256sum)
for i in $(seq 50); do
    got=$(/s/ldconfig -p | sha256sum) || echo "static run $i failed: $?"
    [ "$got" = "$reference" ] || echo "static run $i printed something else"
done
for i in $(seq 50); do
    /s/sha256sum /s/data || echo "dynamic run $i failed: $?"
done
perl -e '
    open(my $f, "<", "/s/data") or die "open: $!";
    my $len = -s $f;
    my $addr = syscall(9, 0, $len, 1, 2, fileno($f), 0);
    die "mmap: $!" if $addr == -1;
    my $data = unpack("P$len", pack("J", $addr));
    print "mmap ", length($data), " ", unpack("%32C*", $data), "
";
'
"#;

fn programs_run_from_a_share_run_the_host_bytes(k: &Kiln) {
    let share = k.dir().join("share");
    fs::create_dir_all(&share).expect("mkdir");
    for (from, to) in [
        ("/sbin/ldconfig", "ldconfig"),
        ("/usr/bin/sha256sum", "sha256sum"),
    ] {
        fs::copy(from, share.join(to)).unwrap_or_else(|e| panic!("copy {from}: {e}"));
    }
    let sum = random_file(&share.join("data"), 4 << 20);
    let data = fs::read(share.join("data")).expect("read data");
    let byte_sum = data.iter().fold(0u32, |a, b| a.wrapping_add(u32::from(*b)));
    let out = k.run(&[
        "run",
        "--share",
        &format!("{}:/s:ro", share.display()),
        "--",
        "sh",
        "-c",
        SHARE_EXEC_SCRIPT,
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut expected = format!("{sum}  /s/data\n").repeat(50);
    expected.push_str(&format!("mmap {} {byte_sum}\n", data.len()));
    assert_eq!(stdout, expected, "stderr: {}", text(&out.stderr));
    // Which device the share went through, and why, in one line.
    assert!(
        text(&out.stderr).contains("kiln: sharing through "),
        "{}",
        text(&out.stderr)
    );
}

/// virtiofsd killed while the command waits on its share: kiln says the
/// share is gone and ends with 125, where the guest would wait on the share
/// forever. Where kiln shares through QEMU's virtio-9p (QEMU under TCG)
/// there is no virtiofsd to kill: none runs, and the command just runs.
fn a_killed_virtiofsd_ends_the_run_naming_the_share(k: &Kiln) {
    let share = k.dir().join("share");
    fs::create_dir_all(&share).expect("mkdir");
    let mut child = k
        .command(&[
            "run",
            "--share",
            &format!("{}:/s", share.display()),
            "--",
            "sh",
            "-c",
            // Waits on the share, as a build step reading from it would.
            "echo ready; i=0; while [ ! -e /s/go ] && [ $i -lt 300 ]; do \
             sleep 0.2; i=$((i+1)); done; ls /s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    assert_eq!(first_output(&mut child, 6), b"ready\n");
    let stderr = Lines::read(child.stderr.take().expect("stderr piped"));
    // Said before the guest boots, so before "ready".
    let transport = stderr
        .wait_for("kiln: sharing through ", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("kiln did not say how it shares:\n{}", stderr.text()));
    let virtiofsd = virtiofsd_serving(&k.runtime());

    if !transport.starts_with("kiln: sharing through virtio-fs") {
        assert!(
            virtiofsd.is_empty(),
            "virtiofsd runs, though kiln said '{transport}': {virtiofsd:?}"
        );
        fs::write(share.join("go"), "").expect("write go");
        let status = wait_at_most(&mut child, Duration::from_secs(60), &stderr);
        k.assert_clean();
        assert_eq!(status.code(), Some(0), "{}", stderr.text());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut rest)
            .expect("read stdout");
        assert_eq!(rest, "go\n");
        return;
    }

    assert!(
        !virtiofsd.is_empty(),
        "kiln said '{transport}', but no virtiofsd serving it is seen"
    );
    for pid in &virtiofsd {
        // A pid that has meanwhile exited gets ESRCH.
        let _ = kill_process(*pid, Signal::KILL);
    }
    let status = wait_at_most(&mut child, Duration::from_secs(60), &stderr);
    k.assert_clean();
    let err = stderr.text();
    assert_eq!(status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!("virtiofsd serving {} stopped", share.display())),
        "{err}"
    );
    assert!(err.contains("the share /s is gone"), "{err}");
}

/// The pids of the virtiofsd processes whose arguments mention `runtime`
/// (their sockets are in kiln's runtime directory there).
fn virtiofsd_serving(runtime: &Path) -> Vec<Pid> {
    let needle = runtime.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e
            .file_name()
            .to_string_lossy()
            .parse()
            .ok()
            .and_then(Pid::from_raw)
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_virtiofsd = argv
            .first()
            .and_then(|a| Path::new(a).file_name())
            .is_some_and(|n| n == "virtiofsd");
        if is_virtiofsd && argv.iter().any(|a| a.contains(&needle)) {
            pids.push(pid);
        }
    }
    pids
}

/// A child's stderr, read line by line on a thread as it comes.
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Lines {
    fn read(from: std::process::ChildStderr) -> Lines {
        use std::io::BufRead;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(from).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Lines(lines)
    }

    fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.join("\n")
    }

    /// The first line starting with `prefix`, waiting up to `limit` for it.
    fn wait_for(&self, prefix: &str, limit: Duration) -> Option<String> {
        poll_until(Instant::now() + limit, Duration::from_millis(20), || {
            let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
            lines.iter().find(|l| l.starts_with(prefix)).cloned()
        })
    }
}

/// The child's status, once it ends within `limit`; else it is killed and
/// the test fails with what it said.
fn wait_at_most(
    child: &mut std::process::Child,
    limit: Duration,
    stderr: &Lines,
) -> std::process::ExitStatus {
    let ended = poll_until(Instant::now() + limit, Duration::from_millis(50), || {
        child.try_wait().expect("try_wait")
    });
    let Some(status) = ended else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "kiln did not end within {limit:?}; it said:\n{}",
            stderr.text()
        );
    };
    // Whatever it said last is read before it is looked at.
    std::thread::sleep(Duration::from_millis(100));
    status
}

fn running_out_of_memory_is_an_answer_not_a_hang(k: &Kiln) {
    // The shell keeps 400 MiB of output in memory, in a 128 MiB guest. The
    // timeout only marks a hang: an answer is 137 and the note.
    let out = k.run(&[
        "run",
        "--mem",
        "128M",
        "--timeout",
        "300",
        "--",
        "sh",
        "-c",
        "x=$(head -c 400M /dev/zero | tr '\\0' a); echo survived",
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(code(&out), 137, "{stderr}");
    assert!(stderr.contains("ran out of memory"), "{stderr}");
    assert!(stderr.contains("--mem 128M"), "{stderr}");
    // The whole command was ended, and the guest still powered off cleanly
    // (k.run checks nothing was left behind).
    assert!(!text(&out.stdout).contains("survived"));
}

fn a_fork_bomb_is_stopped_by_the_guests_limits(k: &Kiln) {
    // Forks sleeping children until a fork fails, however slowly the guest
    // runs: it ends at the guest's process limit (or, should memory run
    // out first, at the OOM killer); either way the guest keeps answering
    // and kiln stops what is left.
    let bomb = r#"
        my $n = 0;
        while (1) {
            my $pid = fork;
            if (!defined $pid) { print "fork failed after $n: $!\n"; last }
            if ($pid == 0) { sleep 1000; exit 0 }
            $n++;
        }
    "#;
    // The timeout marks a hang: an answer comes long before it.
    let out = k.run(&[
        "run",
        "--mem",
        "256M",
        "--timeout",
        "300",
        "--",
        "perl",
        "-e",
        bomb,
    ]);
    assert_ne!(code(&out), 124, "no answer in 300 s: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    if stderr.contains("ran out of memory") {
        assert_eq!(code(&out), 137, "{stderr}");
    } else {
        assert_eq!(code(&out), 0, "{stderr}");
        assert!(stdout.contains("fork failed after"), "{stdout}");
        assert!(
            stdout.contains("Resource temporarily unavailable"),
            "{stdout}"
        );
        assert!(stderr.contains("reached the guest's limit of"), "{stderr}");
    }
}

fn disks_keep_their_order_and_by_id_names(k: &Kiln) {
    let a = k.dir().join("a.img");
    let b = k.dir().join("b.img");
    sparse_file(&a, 8 << 20);
    sparse_file(&b, 16 << 20);
    let out = k.run(&[
        "run",
        "--disk",
        a.to_str().expect("utf8"),
        "--disk",
        b.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        "cat /sys/block/vda/size /sys/block/vdb/size; readlink /dev/disk/by-id/virtio-kiln0 /dev/disk/by-id/virtio-kiln1",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "16384\n32768\n../../vda\n../../vdb\n");
}

/// A loop device over a file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn over(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("running losetup");
        assert!(
            out.status.success(),
            "losetup (this case needs root, for a loop device): {}",
            text(&out.stderr)
        );
        LoopDevice(text(&out.stdout).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn a_block_device_is_attached_whole_with_device(k: &Kiln) {
    // A block device's st_size is 0: the guest must see its real size (a
    // bug kiln-vmm had), and what it writes must reach the device.
    let backing = k.dir().join("backing.img");
    sparse_file(&backing, 24 << 20);
    let dev = LoopDevice::over(&backing);
    let out = k.run(&[
        "run",
        "--disk",
        &format!("{},device", dev.0),
        "--",
        "sh",
        "-c",
        "cat /sys/block/vda/size; printf kiln-was-here | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "49152\n");
    drop(dev);
    let bytes = fs::read(&backing).expect("read backing file");
    assert_eq!(&bytes[51200..51213], b"kiln-was-here");
}

// Errors a user can cause, each with a message that names the fix.

fn missing_disk_is_reported(k: &Kiln) {
    let out = k.run(&["run", "--disk", "/no/such/disk.img", "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/disk.img does not exist"), "{err}");
    assert!(err.contains("truncate -s"), "{err}");
}

fn disk_in_use_by_another_kiln_is_refused(k: &Kiln) {
    let disk = k.dir().join("busy.img");
    sparse_file(&disk, 8 << 20);
    let disk_s = disk.to_str().expect("utf8");
    let mut first = k
        .command(&[
            "run",
            "--disk",
            disk_s,
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    first_output(&mut first, 3);
    let second = k
        .command(&["run", "--disk", disk_s, "--", "true"])
        .output()
        .expect("second");
    kill_process(Pid::from_child(&first), Signal::TERM).expect("kill the first kiln");
    let _ = first.wait();
    k.assert_clean();
    assert_eq!(code(&second), 125);
    let err = text(&second.stderr);
    assert!(err.contains("in use by another kiln"), "{err}");
}

#[test]
fn bad_disk_option_is_a_usage_error() {
    let k = Kiln::new(Backend::Auto);
    let out = k.run(&["run", "--disk", "x.img,format=vmdk", "--", "true"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("unknown disk option 'format=vmdk'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn character_device_disk_is_refused_before_boot() {
    let k = Kiln::new(Backend::Auto);
    // An empty cache: had kiln gone on towards a VM, it would have failed
    // for the missing kernel instead.
    let out = k
        .command(&["run", "--disk", "/dev/null", "--", "true"])
        .env("KILN_CACHE_DIR", k.dir().join("empty-cache"))
        .output()
        .expect("run");
    k.assert_clean();
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("/dev/null is a character device"), "{err}");
    assert!(
        err.contains("--disk takes a regular image file, or a block device with ',device'"),
        "{err}"
    );
}

#[test]
fn missing_kernel_names_the_build_command() {
    let k = Kiln::new(Backend::Auto);
    let empty = k.dir().join("empty-cache");
    let out = k
        .command(&["run", "--", "true"])
        .env("KILN_CACHE_DIR", &empty)
        .output()
        .expect("run");
    k.assert_clean();
    assert_eq!(code(&out), 125);
    assert!(
        text(&out.stderr).contains("kiln kernel build"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_tools_image_names_the_build_command() {
    let k = Kiln::new(Backend::Auto);
    let kernel = Command::new(kiln_exe())
        .args(["kernel", "path"])
        .output()
        .expect("kernel path");
    assert!(kernel.status.success(), "{}", text(&kernel.stderr));
    let kernel = text(&kernel.stdout).trim().to_string();
    let out = k
        .command(&["run", "--kernel", &kernel, "--", "true"])
        .env("KILN_CACHE_DIR", k.dir().join("empty-cache"))
        .output()
        .expect("run");
    k.assert_clean();
    assert_eq!(code(&out), 125);
    assert!(
        text(&out.stderr).contains("kiln tools build"),
        "{}",
        text(&out.stderr)
    );
}

/// Two kilns starting at once on a cache without an initramfs: both run,
/// and the cache ends with one initramfs, whole, and nothing half-written.
/// The kernel entry is a copy (new file times: both kilns hash it and
/// record its times at once); the tools entry is the real one, linked.
#[test]
fn two_kilns_starting_at_once_share_one_initramfs() {
    let k = Kiln::new(Backend::Auto);
    let cache = k.dir().join("cache");
    let entry = |what: &str| {
        let out = Command::new(kiln_exe())
            .args([what, "path"])
            .output()
            .expect("kiln");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let file = PathBuf::from(text(&out.stdout).trim());
        file.parent().expect("entry dir").to_path_buf()
    };
    let kernel = entry("kernel");
    let copy = cache
        .join("kernel")
        .join(kernel.file_name().expect("entry name"));
    fs::create_dir_all(&copy).expect("mkdir");
    for f in fs::read_dir(&kernel).expect("kernel entry").flatten() {
        fs::copy(f.path(), copy.join(f.file_name())).expect("copy kernel entry");
    }
    let tools = entry("tools");
    fs::create_dir_all(cache.join("tools")).expect("mkdir");
    std::os::unix::fs::symlink(
        &tools,
        cache
            .join("tools")
            .join(tools.file_name().expect("entry name")),
    )
    .expect("link tools entry");

    let start = || {
        k.command(&["run", "--", "true"])
            .env("KILN_CACHE_DIR", &cache)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let (a, b) = (start(), start());
    for out in [a.wait_with_output(), b.wait_with_output()] {
        let out = out.expect("wait");
        assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    }
    k.assert_clean();

    let names = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    // The entry, and the lock file of its users (`.NAME.use`).
    let initramfs: Vec<String> = names(&cache.join("initramfs"))
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(initramfs.len(), 1, "{initramfs:?}");
    assert!(initramfs[0].ends_with(".cpio"), "{initramfs:?}");
    // Whole: a 'cpio' magic at the start and the trailer at the end.
    let data = fs::read(cache.join("initramfs").join(&initramfs[0])).expect("read");
    assert!(data.starts_with(b"070701"));
    assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    // No staging directory or temp file anywhere (kiln's are dot names;
    // the entries' build and use lock files stay, by design).
    for dir in [
        &cache,
        &cache.join("kernel"),
        &copy,
        &cache.join("tools"),
        &cache.join("initramfs"),
    ] {
        let left: Vec<String> = names(dir)
            .into_iter()
            .filter(|n| n.starts_with('.') && !n.ends_with(".lock") && !n.ends_with(".use"))
            .collect();
        assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
    }
}

#[test]
fn missing_kvm_is_explained() {
    let k = Kiln::new(Backend::Auto);
    let out = k
        .command(&["run", "--backend", "kvm", "--", "true"])
        .env("KILN_KVM_DEVICE", "/no/such/kvm")
        .output()
        .expect("run");
    k.assert_clean();
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/kvm does not exist"), "{err}");
    assert!(err.contains("--backend qemu"), "{err}");

    // auto falls back to TCG and says so in one line.
    let out = k
        .command(&["run", "--", "true"])
        .env("KILN_KVM_DEVICE", "/no/such/kvm")
        .output()
        .expect("run");
    k.assert_clean();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let note: Vec<_> = text(&out.stderr)
        .lines()
        .filter(|l| l.contains("TCG"))
        .map(String::from)
        .collect();
    assert_eq!(note.len(), 1, "{note:?}");
    assert!(note[0].contains("/no/such/kvm does not exist"), "{note:?}");
}

/// `--backend kvm` runs kiln-vmm where KVM runs unmodified guests; on a host
/// whose KVM cannot (this machine class: kvm_pvm) it fails at once, saying
/// why and what to use instead. The test decides from the host and says
/// which it checked.
fn kvm_backend_runs_true_where_kvm_is_usable(k: &Kiln) {
    use kiln_vmm::host::{probe, KvmSupport};
    let support = probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
    let started = Instant::now();
    let out = k.run(&["run", "--backend", "kvm", "--", "true"]);
    let err = text(&out.stderr);
    match support {
        KvmSupport::Usable => {
            eprintln!("KVM runs unmodified guests here: checked 'kiln run --backend kvm -- true'");
            assert_eq!(code(&out), 0, "{err}");
            let out = k.run(&[
                "run",
                "--backend",
                "kvm",
                "--",
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ]);
            assert_eq!(code(&out), 3, "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "out\n");
            assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
        }
        other => {
            eprintln!(
                "KVM here cannot run unmodified guests ({other:?}): checked the fast failure"
            );
            assert_eq!(code(&out), 125, "{err}");
            assert!(err.contains("the kvm backend cannot run here"), "{err}");
            assert!(err.contains("use '--backend qemu'"), "{err}");
            if let KvmSupport::Restricted(why) = other {
                assert!(err.contains(&why), "{err}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "took {:?}",
                started.elapsed()
            );
        }
    }
}

fn guest_kernel_panic_is_reported_with_the_console(k: &Kiln) {
    let out = k.run(&["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
}

fn agent_not_connecting_in_time_is_reported(k: &Kiln) {
    // No kernel boots and starts its agent in 50 ms, even under KVM.
    let out = k.run(&["run", "--boot-timeout", "0.05", "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("did not connect within 0.05 s"), "{err}");
    assert!(err.contains("--boot-timeout"), "{err}");
}

fn orphans_are_reaped(k: &Kiln) {
    // A daemonized child is orphaned to PID 1 (the agent), which must reap it.
    let out = k.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "sh -c 'sleep 0.2 &'; sleep 1.5; grep -l '^State:.*Z' /proc/[0-9]*/status | wc -l",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "0", "zombies left in the guest");
}

fn root_is_writable_and_the_clock_is_set(k: &Kiln) {
    // The overlay is writable, and what one process writes the next sees.
    let out = k.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo one > /etc/kiln-test && sh -c 'cat /etc/kiln-test' && ls /run/kiln >/dev/null 2>&1; date +%Y",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let lines: Vec<_> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines[0], "one");
    // The guest clock comes from the host.
    let year: i32 = lines[1].parse().expect("year");
    assert!(year >= 2024, "guest clock not set: {year}");
}

/// nobody's primary group (Debian's nogroup).
const NOGROUP: u32 = 65534;

/// The point of kiln: partitioning and formatting as an unprivileged user.
/// When the tests run as root, this one drops to `nobody` with runuser.
fn an_unprivileged_user_partitions_and_formats_a_disk(k: &Kiln) {
    if !geteuid().is_root() {
        // Every other test already runs unprivileged.
        return;
    }
    let path = |args: &[&str]| {
        let out = Command::new(kiln_exe()).args(args).output().expect("kiln");
        assert!(out.status.success(), "{}", text(&out.stderr));
        PathBuf::from(text(&out.stdout).trim())
    };
    // nobody cannot read root's cache: give it copies, and a cache of its own.
    let shared = k.dir().join("shared");
    fs::create_dir_all(&shared).expect("mkdir");
    let kernel = shared.join("vmlinux");
    let tools = shared.join("tools.squashfs");
    fs::copy(path(&["kernel", "path"]), &kernel).expect("copy kernel");
    fs::copy(path(&["tools", "path"]), &tools).expect("copy tools");
    let disk = shared.join("disk.img");
    sparse_file(&disk, 32 << 20);
    let runtime = k.runtime();
    for p in [k.dir(), shared.as_path(), runtime.as_path()] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    fs::set_permissions(&disk, fs::Permissions::from_mode(0o666)).expect("chmod");
    let kiln = kiln_exe();
    let as_nobody = || {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(&kiln).arg("run");
        if let Some(b) = k.backend.flag() {
            c.args(["--backend", b]);
        }
        c.arg("--kernel")
            .arg(&kernel)
            .arg("--tools")
            .arg(&tools)
            .arg("--disk")
            .arg(&disk)
            .args([
                "--",
                "sh",
                "-c",
                "id -u && sgdisk -n1:0:0 /dev/vda >/dev/null && mkfs.ext4 -q -L mine /dev/vda1",
            ])
            .env("HOME", &shared)
            .env("KILN_CACHE_DIR", shared.join("cache"))
            .env("TMPDIR", &runtime)
            .stdin(Stdio::null());
        c
    };
    if k.backend == Backend::Kvm {
        // A user outside /dev/kvm's group is told how to join it; once in
        // the group (here: the device's group made nobody's), kiln-vmm runs.
        let kvm = Path::new("/dev/kvm");
        fs::set_permissions(kvm, fs::Permissions::from_mode(0o600)).expect("chmod kvm");
        let out = as_nobody().output().expect("runuser");
        k.assert_clean();
        assert_eq!(code(&out), 125, "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(err.contains("no permission to open /dev/kvm"), "{err}");
        assert!(err.contains("adduser $USER kvm"), "{err}");
        std::os::unix::fs::chown(kvm, None, Some(NOGROUP)).expect("chgrp kvm");
        fs::set_permissions(kvm, fs::Permissions::from_mode(0o660)).expect("chmod kvm");
    }
    let out = as_nobody().output().expect("runuser");
    k.assert_clean();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "0\n",
        "the command did not run as root in the guest"
    );
    let table = text(&host("sgdisk", &["-p", disk.to_str().expect("utf8")]).stdout);
    assert!(table.contains("8300"), "{table}");
    // debugfs, not dumpe2fs: the tools image's dumpe2fs (1.47.2, in L1)
    // resolves its argument through blkid and no longer takes a file with
    // `?offset=`.
    let label = host(
        "debugfs",
        &[
            "-R",
            "stats",
            &format!("{}?offset={}", disk.display(), 2048 * 512),
        ],
    );
    assert!(
        text(&label.stdout).contains("mine"),
        "{}",
        text(&label.stdout)
    );
}

fn a_filesystem_left_mounted_is_unmounted_cleanly(k: &Kiln) {
    // The command forgets to unmount; kiln still leaves a clean filesystem
    // with the data on it.
    let disk = k.dir().join("fs.img");
    sparse_file(&disk, 32 << 20);
    let out = k.run(&[
        "run",
        "--disk",
        disk.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        // A background process keeps the mount busy, too.
        "mkfs.ext4 -q /dev/vda && mount /dev/vda /mnt && echo kept > /mnt/kept.txt && cd /mnt && (sleep 600 &)",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let disk_s = disk.to_str().expect("utf8");
    let header = text(&host("dumpe2fs", &["-h", disk_s]).stdout);
    assert!(
        header.contains("Filesystem state:         clean"),
        "{header}"
    );
    assert!(!header.contains("needs_recovery"), "{header}");
    let cat = host("debugfs", &["-R", "cat /kept.txt", disk_s]);
    assert_eq!(text(&cat.stdout), "kept\n");
}

fn a_closed_stdout_gives_the_command_sigpipe(k: &Kiln) {
    // `kiln run -- yes | head -c 2` must end, as `yes | head -c 2` does.
    let mut child = k
        .command(&["run", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let first = first_output(&mut child, 2);
    assert_eq!(&first, b"y\n");
    drop(child.stdout.take());
    let start = Instant::now();
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(code(&out), 128 + 13, "{}", text(&out.stderr));
}

/// The guest keeps time on the TSC without calibrating it against the PIT,
/// which fails on a busy host and leaves a 10 ms jiffies clock (and, one
/// level down, nested guests that hang in early boot). Under KVM the rate
/// comes from kvmclock (kiln-vmm passes KVM's paravirt CPUID leaves
/// through); under TCG kiln measures the host's TSC and passes it as
/// `tsc_early_khz=`. The suite runs cases two at a time, which is load
/// enough to make the calibration fail.
fn the_guest_clock_needs_no_calibration(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "cd /sys/devices/system/clocksource/clocksource0 && \
         cat current_clocksource available_clocksource && dmesg",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let current = lines.next().unwrap_or_default();
    let available = lines.next().unwrap_or_default();
    assert!(!stdout.contains("Marking TSC unstable"), "{stdout}");
    if k.backend == Backend::Kvm {
        assert_eq!(current, "kvm-clock", "{stdout}");
        assert!(!stdout.contains("calibration using PIT"), "{stdout}");
        assert!(stdout.contains("kvm-clock: Using msrs"), "{stdout}");
    } else {
        // tsc-early until the kernel's delayed TSC set-up, a second in.
        assert!(
            ["tsc", "tsc-early", "kvm-clock"].contains(&current),
            "{stdout}"
        );
        assert!(available.contains("tsc"), "{stdout}");
    }
}

/// `--tools-package` runs on a tools image with the package added, built
/// into the cache on first use; a bad name is refused before anything runs.
#[test]
fn tools_package_adds_a_program_to_the_guest() {
    let k = Kiln::new(Backend::Qemu);
    let out = k.run(&["run", "--tools-package", "hello", "--", "hello"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "Hello, world!\n");
    let path = k.run(&["tools", "path", "--package", "hello"]);
    assert_eq!(code(&path), 0, "{}", text(&path.stderr));
    let standard = k.run(&["tools", "path"]);
    assert_ne!(path.stdout, standard.stdout, "one image for both");

    let out = k.run(&["run", "--tools-package", "a,b", "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("'a,b' is not a Debian package name"), "{err}");
}

/// The Debian mirror's host, which the tests reach the way apt would.
const MIRROR_HOST: &str = "deb.debian.org";

/// `--net`: names resolve, TCP reaches the mirror (asked for its bookworm
/// Release file over plain HTTP with bash's /dev/tcp: the tools image has
/// no HTTP client), and the interface has an IPv6 address beyond its
/// link-local one (from router advertisements). `$1` is the mirror. The
/// address is waited for up to 30 s: a router solicitation that goes
/// unanswered is sent again after 4 s, then 8 s, then 16 s, and under
/// nested KVM a 10 s wait has once been too short.
const NET_CHECK: &str = r#"set -e
getent hosts "$1"
exec 3<>"/dev/tcp/$1/80"
printf 'HEAD /debian/dists/bookworm/Release HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$1" >&3
head -n 1 <&3
global() { grep 'eth0$' /proc/net/if_inet6 | grep -v '^[0-9a-f]* [0-9a-f]* [0-9a-f]* 20 '; }
for _ in $(seq 300); do global >/dev/null && break; sleep 0.1; done
global | sed 's/^/ipv6 /'
cat /etc/resolv.conf"#;

/// On kiln-vmm through passt (which L1 gets with a network of its own,
/// see [`L1_NEEDS_NET`]), on QEMU through its user networking.
fn net_gives_the_guest_dns_ipv4_and_ipv6(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--net",
        "--",
        "bash",
        "-c",
        NET_CHECK,
        "net-check",
        MIRROR_HOST,
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains(MIRROR_HOST), "no address: {stdout}");
    assert!(stdout.contains("HTTP/1.1 200"), "no answer: {stdout}");
    assert!(stdout.contains("\nipv6 "), "no IPv6 address: {stdout}");
    assert!(stdout.contains("nameserver 10.0.2.3"), "{stdout}");
}

/// Without `--net` the guest is hermetic: no interface but loopback, no
/// route, and a connection attempt fails at once.
fn without_net_the_guest_has_no_network(k: &Kiln) {
    let out = k.run(&[
        "run",
        "--",
        "bash",
        "-c",
        "ls /sys/class/net; wc -l < /proc/net/route; \
         exec 3<>/dev/tcp/203.0.113.80/80 && echo connected",
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_ne!(code(&out), 0, "{stdout}");
    assert_eq!(stdout, "lo\n1\n", "{stderr}");
    assert!(stderr.contains("Network is unreachable"), "{stderr}");
}

/// The issue's own check: apt in the guest updates its lists from the
/// Debian mirror. apt is not in the base tools image; `--tools-package`
/// builds (once) and caches the image with it.
#[test]
fn apt_get_update_works_with_net() {
    let k = Kiln::new(Backend::Qemu);
    let out = k.run(&[
        "run",
        "--net",
        "--tools-package",
        "apt",
        "--",
        "apt-get",
        "update",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(code(&out), 0, "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("bookworm InRelease"), "{stdout}");
}

/// The README's pattern for other build systems: images/make/Makefile's
/// `make image` (losetup, sfdisk, mkfs, mount) runs in the guest on the
/// shared source directory, and its image appears on the host.
#[test]
fn a_makefile_step_that_needs_root_builds_its_image_in_kiln() {
    let k = Kiln::new(Backend::Qemu);
    let src = k.dir().join("src");
    copy_example("make", &src);
    let share = format!("{}:/src", src.display());
    let out = k.run(&[
        "run",
        "--tools-package",
        "make",
        "--share",
        &share,
        "--workdir",
        "/src",
        "--",
        "make",
        "image",
    ]);
    assert_eq!(code(&out), 0, "{}{}", text(&out.stdout), text(&out.stderr));
    let image = src.join("disk.img");
    assert!(!src.join("disk.img.part").exists());
    let image = image.to_str().expect("utf8");
    let table = text(&host("sgdisk", &["-p", image]).stdout);
    assert!(table.contains("8300") && table.contains("root"), "{table}");
    let motd = host(
        "debugfs",
        &[
            "-R",
            "cat /etc/motd",
            &format!("{image}?offset={}", 2048 * 512),
        ],
    );
    assert_eq!(text(&motd.stdout), "built by make under kiln\n");
}

/// `kiln shell` in a 100x30 terminal, typed at as a person would: the
/// prompt, output, the terminal's size and a resize, Ctrl-C for the
/// foreground job, and Ctrl-D to leave with status 0. Qemu only: the
/// terminal path is the same agent code on either backend.
#[test]
fn shell_is_an_interactive_terminal() {
    if !tmux::available() {
        return;
    }
    // Under TCG on a loaded machine, about one session in a hundred stops
    // answering right after the Ctrl-C: no prompt, no echo, for good. Each
    // time the guest's console showed its clock source switching from
    // tsc-early to tsc mid-session; a local bash in tmux, typed at the
    // same way, never did it in hundreds of runs. The cause is not found,
    // so a session that times out waiting for the screen is typed once
    // more, said on stderr past the harness's capture; any other failure,
    // or a second time-out, fails the test.
    let first = std::panic::catch_unwind(shell_session);
    let Err(payload) = first else {
        return;
    };
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or("");
    if !message.contains(tmux::SCREEN_TIMEOUT) {
        std::panic::resume_unwind(payload);
    }
    let _ = writeln!(
        std::io::stderr(),
        "shell_is_an_interactive_terminal: the session stopped answering; typing it \
         once more (the only retry). It said:\n{message}"
    );
    shell_session();
}

fn shell_session() {
    let k = Kiln::new(Backend::Qemu);
    let tmpdir = format!("TMPDIR={}", k.runtime().display());
    let kiln = kiln_exe().to_string_lossy().into_owned();
    let argv = ["env", &tmpdir, &kiln, "shell", "--backend", "qemu"];
    let tmux = Tmux::start(k.dir(), "shell", (100, 30), k.dir(), &argv);
    let boot = Duration::from_secs(60);
    let step = Duration::from_secs(30);

    // The prompt, and a command's output (not its echo: that has the `$((`).
    tmux.send(&["echo hi-$((6*7))", "Enter"]);
    tmux.wait_for_line("hi-42", 1, boot);
    let screen = tmux.screen();
    assert!(screen.contains("root@kiln:/# "), "no prompt:\n{screen}");

    tmux.send(&["stty size", "Enter"]);
    tmux.wait_for_line("30 100", 1, step);
    tmux.cmd(&["resize-window", "-t", tmux.session, "-x", "120", "-y", "40"]);
    // The resize reaches the guest on its own, shortly: retry until it has.
    let resized = poll_until(Instant::now() + step, Duration::from_millis(500), || {
        tmux.send(&["stty size", "Enter"]);
        std::thread::sleep(Duration::from_millis(300));
        tmux.screen()
            .lines()
            .any(|l| l.trim_end() == "40 120")
            .then_some(())
    });
    assert!(resized.is_some(), "no resize:\n{}", tmux.screen());

    // Ctrl-C stops the foreground job: the shell reports it killed by
    // SIGINT (130), long before the 100 s it would have slept.
    let started = Instant::now();
    tmux.send(&["echo sleeping-$((1+1)); sleep 100", "Enter"]);
    tmux.wait_for_line("sleeping-2", 1, step);
    tmux.send(&["C-c"]);
    // A fresh, empty prompt before typing on.
    tmux.wait_for_line("root@kiln:/#", 1, step);
    tmux.send(&["echo rc=$?", "Enter"]);
    tmux.wait_for_line("rc=130", 1, step);
    assert!(started.elapsed() < Duration::from_secs(60));

    // Ctrl-D leaves the shell, and kiln exits with its status. Typed at a
    // fresh prompt: bash's line editor shows it once the terminal is in
    // its raw mode, where ^D is a key (in the canonical mode of the moment
    // before, it would be an end-of-file mark the switch loses).
    tmux.wait_for_line("root@kiln:/#", 1, step);
    tmux.send(&["C-d"]);
    assert_eq!(
        tmux.wait_for_exit(Duration::from_secs(60)),
        Some(0),
        "kiln did not end with the shell:\n{}",
        tmux.screen()
    );
    drop(tmux);
    k.assert_clean();
}
