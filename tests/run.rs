//! `kiln run` end to end, driven the way users drive it: the real binary,
//! the real kernel and tools image from the cache, real QEMU (TCG here).
//!
//! Every run goes through [`Kiln::run`], which also checks that kiln left no
//! temp files and no processes behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

struct Kiln {
    tmp: tempfile::TempDir,
}

impl Kiln {
    fn new() -> Kiln {
        Kiln {
            tmp: tempfile::Builder::new()
                .prefix("kiln-test-")
                .tempdir()
                .expect("tempdir"),
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

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(args)
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

fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").expect("proc").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = fs::read(e.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
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

#[test]
fn true_exits_zero() {
    let k = Kiln::new();
    let out = k.run(&["run", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[test]
fn exit_status_is_passed_through() {
    let k = Kiln::new();
    let out = k.run(&["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "{}", text(&out.stderr));
}

#[test]
fn killed_by_sigkill_gives_137() {
    let k = Kiln::new();
    let out = k.run(&["run", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(code(&out), 137, "{}", text(&out.stderr));
}

#[test]
fn stdout_and_stderr_arrive_on_their_own_streams() {
    let k = Kiln::new();
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

#[test]
fn hundred_mib_of_stdout_arrives_intact() {
    let k = Kiln::new();
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

#[test]
fn env_and_workdir_apply() {
    let k = Kiln::new();
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

#[test]
fn missing_workdir_is_a_clear_error() {
    let k = Kiln::new();
    let out = k.run(&["run", "--workdir", "/no/such/dir", "--", "true"]);
    assert_eq!(code(&out), 125);
    assert!(
        text(&out.stderr).contains("/no/such/dir does not exist"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stdin_is_forwarded() {
    let k = Kiln::new();
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

#[test]
fn command_not_found_gives_127() {
    let k = Kiln::new();
    let out = k.run(&["run", "--", "no-such-command", "arg"]);
    assert_eq!(code(&out), 127);
    assert!(
        text(&out.stderr).contains("no-such-command: command not found in the guest"),
        "{}",
        text(&out.stderr)
    );
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
    let efi = host("mtype", &["-i", &format!("{raw}@@{p2}"), "::EFI.TXT"]);
    assert_eq!(text(&efi.stdout).replace('\r', ""), "efi side\n");
}

#[test]
fn raw_disk_is_partitioned_formatted_and_readable_on_the_host() {
    let k = Kiln::new();
    let disk = k.dir().join("disk.img");
    sparse_file(&disk, 64 << 20);
    partition_and_format(&k, disk.to_str().expect("utf8"));
    verify_disk_on_host(&disk);
}

#[test]
fn qcow2_disk_works_the_same() {
    let k = Kiln::new();
    let disk = k.dir().join("disk.qcow2");
    let disk_s = disk.to_str().expect("utf8");
    host("qemu-img", &["create", "-q", "-f", "qcow2", disk_s, "64M"]);
    partition_and_format(&k, &format!("{disk_s},format=qcow2"));
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

#[test]
fn read_only_disk_refuses_writes() {
    let k = Kiln::new();
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

#[test]
fn timeout_gives_124_and_leaves_nothing_behind() {
    let k = Kiln::new();
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

#[test]
fn ctrl_c_stops_everything_and_cleans_up() {
    let k = Kiln::new();
    let mut child = k
        .command(&["run", "--", "sh", "-c", "echo started; exec sleep 600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait until the command runs in the guest, then interrupt kiln.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("read");
    assert_eq!(&first, b"started\n");
    // SAFETY: plain kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn copy_in_and_out_keep_a_50_mib_file_intact() {
    let k = Kiln::new();
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

#[test]
fn copy_out_of_a_missing_file_fails_and_writes_nothing() {
    let k = Kiln::new();
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

#[test]
fn shared_directory_is_readable_and_writable() {
    let k = Kiln::new();
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

#[test]
fn read_only_share_refuses_writes() {
    let k = Kiln::new();
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

#[test]
fn disks_keep_their_order_and_by_id_names() {
    let k = Kiln::new();
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

// Errors a user can cause, each with a message that names the fix.

#[test]
fn missing_disk_is_reported() {
    let k = Kiln::new();
    let out = k.run(&["run", "--disk", "/no/such/disk.img", "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("/no/such/disk.img does not exist"), "{err}");
    assert!(err.contains("truncate -s"), "{err}");
}

#[test]
fn disk_in_use_by_another_kiln_is_refused() {
    let k = Kiln::new();
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
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut up = [0u8; 3];
    std::io::Read::read_exact(first.stdout.as_mut().expect("stdout"), &mut up).expect("read");
    let second = k
        .command(&["run", "--disk", disk_s, "--", "true"])
        .output()
        .expect("second");
    // SAFETY: plain kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let _ = first.wait();
    k.assert_clean();
    assert_eq!(code(&second), 125);
    let err = text(&second.stderr);
    assert!(err.contains("in use by another kiln"), "{err}");
}

#[test]
fn bad_disk_option_is_a_usage_error() {
    let k = Kiln::new();
    let out = k.run(&["run", "--disk", "x.img,format=vmdk", "--", "true"]);
    assert_eq!(code(&out), 2);
    assert!(
        text(&out.stderr).contains("unknown disk option 'format=vmdk'"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn missing_kernel_names_the_build_command() {
    let k = Kiln::new();
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
    let k = Kiln::new();
    let kernel = Command::new(env!("CARGO_BIN_EXE_kiln"))
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

#[test]
fn missing_kvm_is_explained() {
    let k = Kiln::new();
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
#[test]
fn kvm_backend_runs_true_where_kvm_is_usable() {
    use kiln_vmm::host::{probe, KvmSupport};
    let support = probe(Path::new("/dev/kvm"), Path::new("/sys/module"));
    let k = Kiln::new();
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

#[test]
fn guest_kernel_panic_is_reported_with_the_console() {
    let k = Kiln::new();
    let out = k.run(&["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("the guest kernel panicked"), "{err}");
    assert!(err.contains("Kernel panic - not syncing"), "{err}");
}

#[test]
fn agent_not_connecting_in_time_is_reported() {
    let k = Kiln::new();
    // No kernel boots and starts its agent in 50 ms, even under KVM.
    let out = k.run(&["run", "--boot-timeout", "0.05", "--", "true"]);
    assert_eq!(code(&out), 125);
    let err = text(&out.stderr);
    assert!(err.contains("did not connect within 0.05 s"), "{err}");
    assert!(err.contains("--boot-timeout"), "{err}");
}

#[test]
fn orphans_are_reaped() {
    // A daemonized child is orphaned to PID 1 (the agent), which must reap it.
    let k = Kiln::new();
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

#[test]
fn root_is_writable_and_the_clock_is_set() {
    // The overlay is writable, and what one process writes the next sees.
    let k = Kiln::new();
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

/// The point of kiln: partitioning and formatting as an unprivileged user.
/// When the tests run as root, this one drops to `nobody` with runuser.
#[test]
fn an_unprivileged_user_partitions_and_formats_a_disk() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Every other test already runs unprivileged.
        return;
    }
    let k = Kiln::new();
    let path = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .output()
            .expect("kiln");
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
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_kiln"), "run"])
        .arg("--kernel")
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
        .stdin(Stdio::null())
        .output()
        .expect("runuser");
    k.assert_clean();
    assert_eq!(code(&out), 0, "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "0\n",
        "the command did not run as root in the guest"
    );
    let table = text(&host("sgdisk", &["-p", disk.to_str().expect("utf8")]).stdout);
    assert!(table.contains("8300"), "{table}");
    let label = host(
        "dumpe2fs",
        &["-h", &format!("{}?offset={}", disk.display(), 2048 * 512)],
    );
    assert!(
        text(&label.stdout).contains("mine"),
        "{}",
        text(&label.stdout)
    );
}

#[test]
fn a_filesystem_left_mounted_is_unmounted_cleanly() {
    // The command forgets to unmount; kiln still leaves a clean filesystem
    // with the data on it.
    let k = Kiln::new();
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

#[test]
fn a_closed_stdout_gives_the_command_sigpipe() {
    // `kiln run -- yes | head -c 2` must end, as `yes | head -c 2` does.
    let k = Kiln::new();
    let mut child = k
        .command(&["run", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 2];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("read");
    assert_eq!(&first, b"y\n");
    drop(stdout);
    let start = Instant::now();
    let out = child.wait_with_output().expect("wait");
    k.assert_clean();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(code(&out), 128 + 13, "{}", text(&out.stderr));
}
