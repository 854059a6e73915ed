//! The kvm backend's child process, `kiln __vmm SPEC`, run the way the
//! backend runs it, with a tiny freestanding guest (assembled here with GNU
//! as, linked as an ELF "vmlinux") instead of Linux: such guests run under
//! any KVM this project meets, including the PVM of the development machine.
//! They skip with a message where /dev/kvm cannot be opened.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[path = "../vmm/tests/support/asm.rs"]
mod asm;

/// Assembles `source` (AT&T, 64-bit) into an ELF linked at 1 MiB, written
/// to `dir/vmlinux`.
fn tiny_kernel(dir: &Path, source: &str) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, asm::assemble_both(source).1).expect("write vmlinux");
    path
}

/// Prints a line on the serial port, then resets through the i8042 (what
/// Linux does to power off with reboot=t ends the same way).
const PRINT_AND_RESET: &str = r#"
    mov $0x3f8, %dx
    lea msg(%rip), %rsi
1:  movb (%rsi), %al
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %rsi
    jmp 1b
2:  mov $0xfe, %al
    outb %al, $0x64
    hlt
msg: .asciz "hello from the vmm child\n"
"#;

fn kvm_openable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("cannot open /dev/kvm ({e}); skipping");
            false
        }
    }
}

fn vmm(spec: &serde_json::Value, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("__vmm")
        .arg(spec.to_string())
        .args(extra)
        .env_remove("KILN_VMM_NO_SECCOMP")
        .stdin(Stdio::null())
        .output()
        .expect("run kiln __vmm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn the_child_runs_a_guest_to_its_reset_with_the_console_on_stdout() {
    if !kvm_openable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_kernel(dir.path(), PRINT_AND_RESET);
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let agent = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&agent).expect("bind");
    let spec = serde_json::json!({
        "kernel": kernel,
        "initrd": null,
        "cmdline": "console=ttyS0 reboot=t",
        "mem_mib": 64,
        "vcpus": 1,
        "disks": [{ "path": disk, "format": "raw", "read_only": false, "serial": "kiln0" }],
        "fs": [],
        "agent_port": { "name": "kiln.agent", "socket": agent },
        "seccomp": true,
    });
    // With the filters on (the default), and with them off for debugging.
    for extra in [&[][..], &["--no-seccomp"][..]] {
        let out = vmm(&spec, extra);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: stderr: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "hello from the vmm child\n");
        assert_eq!(text(&out.stderr), "");
        // The child connected the agent port to kiln's socket.
        listener.accept().expect("agent connection");
    }
}

#[test]
fn an_end_other_than_the_reset_is_a_failure_with_a_reason() {
    if !kvm_openable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = tiny_kernel(
        dir.path(),
        "mov $0xf4, %dx\n mov $7, %al\n outb %al, %dx\n hlt\n",
    );
    let spec = serde_json::json!({
        "kernel": kernel, "initrd": null, "cmdline": "", "mem_mib": 64, "vcpus": 1,
        "disks": [], "fs": [], "agent_port": null, "seccomp": true,
    });
    let out = vmm(&spec, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("status 7 to the test exit port"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_qcow2_disk_is_refused_with_the_conversion_to_run() {
    if !kvm_openable() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.qcow2");
    let mut data = b"QFI\xfb\0\0\0\x03".to_vec();
    data.resize(4096, 0);
    std::fs::write(&disk, data).expect("disk");
    // kiln decided the format (from the magic); kiln-vmm goes by it.
    let spec = serde_json::json!({
        "kernel": dir.path().join("vmlinux"), "initrd": null, "cmdline": "",
        "mem_mib": 64, "vcpus": 1,
        "disks": [{ "path": disk, "format": "qcow2", "read_only": true, "serial": "kiln0" }],
        "fs": [], "agent_port": null, "seccomp": true,
    });
    let out = vmm(&spec, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("qemu-img convert -O raw"), "{err}");
    assert!(err.contains("disk.qcow2"), "{err}");
}

#[test]
fn a_bad_spec_is_reported() {
    let out = vmm(&serde_json::json!({ "kernel": 3 }), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("reading the VM description"),
        "{}",
        text(&out.stderr)
    );
}
